"""openai-whisper's quality gates: when to decode a window again at a higher temperature, and when
a window is silence."""
from dataclasses import dataclass

from hark.transcribe.options import TranscriptionOptions


@dataclass
class WindowDecode:
    """One decode of one window."""
    tokens: list[int]           # generated, without <|endoftext|>
    text: str
    temperature: float
    avg_logprob: float          # per token, counting the end token
    compression_ratio: float
    no_speech_prob: float


def is_silence(d: WindowDecode, opts: TranscriptionOptions) -> bool:
    """The model says no speech and is unsure of what it wrote."""
    if opts.no_speech_threshold is None or not d.no_speech_prob > opts.no_speech_threshold:
        return False
    return opts.logprob_threshold is None or d.avg_logprob < opts.logprob_threshold


def needs_fallback(d: WindowDecode, opts: TranscriptionOptions) -> bool:
    """Looping (compresses too well) or unsure (low log-probability), unless it is silence anyway."""
    looping = opts.compression_ratio_threshold is not None and d.compression_ratio > opts.compression_ratio_threshold
    unsure = opts.logprob_threshold is not None and d.avg_logprob < opts.logprob_threshold
    return (looping or unsure) and not is_silence(d, opts)
