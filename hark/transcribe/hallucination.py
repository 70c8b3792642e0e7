"""hallucination_silence_threshold: drop word-timed segments that look hallucinated and sit in silence.

openai-whisper's rule (transcribe.py), as faster-whisper has it too: a word is anomalous when it is
unlikely (probability < 0.15), very short (< 0.133 s) or very long (> 2 s); a segment is anomalous
when its first (up to 8) words, punctuation skipped, score 3 or more, or about one each. openai-whisper
re-seeks its window past such a segment when silence longer than the threshold surrounds it (and
faster-whisper's sequential WhisperModel.transcribe likewise; its BatchedInferencePipeline has no such
option). hark does not re-seek, with condition_on_previous_text either: word timings are computed once
every window is decoded, so it drops those segments afterwards (drop_hallucinations), the same in both
modes. Speech windows (split="speech") already leave most long silences out of every window.
"""
from hark.transcribe.result import Segment, Word
from hark.transcribe.words import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS

PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS
MAX_SCORED_WORDS = 8
EDGE_S = 2.0    # a segment this close to the audio's end has nothing after it but (possible) silence


def word_anomaly_score(word: Word) -> float:
    duration = word.end - word.start
    score = 0.0
    if word.probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: Segment | None) -> bool:
    if segment is None or not segment.words:
        return False
    words = [w for w in segment.words if w.word not in PUNCTUATION][:MAX_SCORED_WORDS]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def drop_hallucinations(segments: list[Segment], threshold: float, duration: float) -> list[Segment]:
    """The segments of one input (time order, words attached) without the anomalous ones that have
    silence longer than `threshold` seconds before them (since the last kept speech, or from the
    audio's start) and after them (until the next worded segment, which may itself be anomalous, or
    the audio's end within EDGE_S)."""
    worded = [s for s in segments if s.words]
    kept, last_end = [], 0.0
    for i, s in enumerate(worded):
        if is_segment_anomaly(s):
            following = worded[i + 1] if i + 1 < len(worded) else None
            next_start = following.words[0].start if following else duration
            silence_before = s.start - last_end > threshold or s.start < threshold
            silence_after = (next_start - s.end > threshold or is_segment_anomaly(following)
                             or duration - s.end < EDGE_S)
            if silence_before and silence_after:
                continue
        kept.append(s)
        last_end = s.end
    keep = {id(s) for s in kept}
    return [s for s in segments if id(s) in keep or not s.words]
