"""Turning one decoded window's tokens into timed segments."""
import zlib
from dataclasses import dataclass

from hark.transcribe.vocab import TIME_PRECISION, WhisperVocab


@dataclass
class TimedTokens:
    start: float        # seconds from the start of the window
    end: float
    tokens: list[int]   # with the segment's timestamp tokens, as openai-whisper keeps them


def compression_ratio(text: str) -> float:
    """gzip-style compression ratio of the text; repetitive (looping) output scores high."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def split_segments(tokens: list[int], vocab: WhisperVocab, window_duration: float) -> list[TimedTokens]:
    """Cut `tokens` (generated, <|endoftext|> removed) into segments at timestamp tokens.

    <|t0|> text <|t1|><|t1|> text <|t2|> gives (t0, t1) and (t1, t2). Text without a closing timestamp
    (output cut off) ends at the window's end; text without any timestamps spans the whole window.
    Times are clipped to [0, window_duration], so padding past the audio never leaks out.
    """
    def seconds(token: int) -> float:
        return min(max((token - vocab.timestamp_begin) * TIME_PRECISION, 0.0), window_duration)

    segments = []
    text, start, leading = [], 0.0, []
    for token in tokens:
        if not vocab.is_timestamp(token):
            text.append(token)
        elif text:
            end = max(start, seconds(token))
            segments.append(TimedTokens(start, end, leading + text + [token]))
            text, start, leading = [], end, []
        else:
            start, leading = seconds(token), [token]
    if text:
        segments.append(TimedTokens(start, window_duration, leading + text))
    return [s for s in segments if vocab.decode(s.tokens).strip()]
