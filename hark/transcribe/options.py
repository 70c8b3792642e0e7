"""The knobs of a transcription, checked once."""
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
    initial_prompt: str | None = None
    compression_ratio_threshold: float | None = 2.4     # above: output is looping, decode again hotter
    logprob_threshold: float | None = -1.0              # below: output is unsure, decode again hotter
    no_speech_threshold: float | None = 0.6             # above (and unsure): the window is silence
    max_initial_timestamp: float = 1.0
    split: str = "quiet"                    # long audio: cut at quiet points, or "speech" regions (VAD)
    seed: int | None = 0                    # for temperatures > 0
    logprobs: bool = False                  # keep each decoded token's log-probability (Window.token_logprobs)

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
        if self.max_initial_timestamp < 0:
            raise InvalidTranscriptionRequest(f"max_initial_timestamp must be ≥ 0, got {self.max_initial_timestamp}")
