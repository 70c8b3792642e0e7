"""The knobs of a transcription, checked once."""
import math
from collections.abc import Sequence
from dataclasses import dataclass


DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TASKS = ("transcribe", "translate")
SPLITS = ("quiet", "speech")


class InvalidTranscriptionRequest(ValueError):
    """A transcription option or input the user can fix."""


@dataclass
class TranscriptionOptions:
    language: str | None = None             # None: detect (multilingual models) or English
    task: str = "transcribe"                # or "translate" (to English)
    timestamps: bool = True                 # segment timestamps from Whisper's timestamp tokens
    word_timestamps: bool = False
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES   # fallback schedule
    best_of: int = 5                        # samples per window at a temperature > 0; the likeliest wins
    beam_size: int = 1                      # beams per window at temperature 0 (1: greedy; faster-whisper uses 5)
    patience: float = 1.0                   # beam search ends once beam_size × patience hypotheses finished
    length_penalty: float = 1.0             # hypotheses ranked by sum logprob / length ** length_penalty
    initial_prompt: str | None = None
    prefix: str | None = None               # text the first window's transcript starts with (not repeated in it)
    hotwords: str | None = None             # words to expect (names, terms), given as earlier text; not with prefix
    clip_timestamps: Sequence[float] | None = None   # transcribe only start,end[,start,end...] seconds (end optional last)
    max_new_tokens: int | None = None       # per window (default: half the decoder's context)
    compression_ratio_threshold: float | None = 2.4     # above: output is looping, decode again hotter
    logprob_threshold: float | None = -1.0              # below: output is unsure, decode again hotter
    no_speech_threshold: float | None = 0.6             # above (and unsure): the window is silence
    max_initial_timestamp: float = 1.0
    split: str = "speech"                   # long audio: cut around speech regions (VAD), or at "quiet" points
    seed: int | None = 0                    # for temperatures > 0
    logprobs: bool = False                  # keep each decoded token's log-probability (Window.token_logprobs)
    repetition_penalty: float = 1.0         # > 1 penalizes tokens already in the decoder's sequence (transformers')
    no_repeat_ngram_size: int = 0           # > 0: no n-gram of this many tokens appears twice in a window's output
    condition_on_previous_text: bool = False    # the previous window's text is the next one's prompt (sequential)
    prompt_reset_on_temperature: float = 0.5    # ... not after a window decoded hotter than this
    # Seconds: drop word-timed segments that look hallucinated and have longer silence around them
    # (needs word_timestamps; hallucination.py). Windows are not re-seeked as in openai-whisper.
    hallucination_silence_threshold: float | None = None

    def __post_init__(self):
        temps = (self.temperature,) if isinstance(self.temperature, (int, float)) else tuple(self.temperature)
        if not temps or any(not isinstance(t, (int, float)) or not 0 <= t <= 2 for t in temps):
            raise InvalidTranscriptionRequest(
                f"temperature must be a number in [0, 2] or a non-empty list of them, got {self.temperature!r}")
        self.temperature = tuple(float(t) for t in temps)
        if self.task not in TASKS:
            raise InvalidTranscriptionRequest(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.split not in SPLITS:
            raise InvalidTranscriptionRequest(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not isinstance(self.best_of, int) or self.best_of < 1:
            raise InvalidTranscriptionRequest(f"best_of must be an integer ≥ 1, got {self.best_of!r}")
        if isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int) or not 1 <= self.beam_size <= 64:
            raise InvalidTranscriptionRequest(f"beam_size must be an integer in [1, 64], got {self.beam_size!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, (int, float)) or not 0 < self.patience <= 16:
            raise InvalidTranscriptionRequest(f"patience must be a number in (0, 16], got {self.patience!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not math.isfinite(self.length_penalty):
            raise InvalidTranscriptionRequest(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise InvalidTranscriptionRequest(f"max_new_tokens must be an integer ≥ 1, got {self.max_new_tokens!r}")
        if self.clip_timestamps is not None:
            self.clip_timestamps = clip_spans(self.clip_timestamps)
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise InvalidTranscriptionRequest(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise InvalidTranscriptionRequest(
                f"no_repeat_ngram_size must be an integer ≥ 0, got {self.no_repeat_ngram_size!r}")
        threshold = self.hallucination_silence_threshold
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
                raise InvalidTranscriptionRequest(
                    f"hallucination_silence_threshold must be a number of seconds ≥ 0, got {threshold!r}")
            if not self.word_timestamps:
                raise InvalidTranscriptionRequest("hallucination_silence_threshold needs word_timestamps=True")
        if self.max_initial_timestamp < 0:
            raise InvalidTranscriptionRequest(f"max_initial_timestamp must be ≥ 0, got {self.max_initial_timestamp}")


def clip_spans(clip_timestamps) -> tuple[tuple[float, float], ...]:
    """"0,30,45" or [0, 30, 45] -> ((0, 30), (45, inf)): start,end pairs in seconds; a last start
    without an end runs to the end of the audio. Spans must be increasing and not overlap."""
    values = clip_timestamps.split(",") if isinstance(clip_timestamps, str) else list(clip_timestamps)
    try:
        times = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidTranscriptionRequest(
            f"clip_timestamps must be numbers of seconds, start,end,... , got {clip_timestamps!r}") from None
    if not times:
        raise InvalidTranscriptionRequest("clip_timestamps is empty; give start,end pairs in seconds")
    if len(times) % 2:
        times.append(float("inf"))
    spans = tuple(zip(times[::2], times[1::2]))
    if any(not 0 <= start < end for start, end in spans) or any(
            a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise InvalidTranscriptionRequest(
            f"clip_timestamps must be increasing start,end pairs of seconds ≥ 0, got {clip_timestamps!r}")
    return spans
