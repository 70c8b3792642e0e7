"""Splitting text tokens into words and fitting timed words to segments (openai-whisper's rules)."""
import string

import numpy as np

from hark.transcribe.result import Word
from hark.transcribe.vocab import WhisperVocab

NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
REPLACEMENT_CHAR = "\ufffd"


def split_on_unicode(vocab: WhisperVocab, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
    """Cut wherever the tokens so far decode to whole characters (a UTF-8 sequence may span tokens)."""
    full = vocab.tokenizer.decode(tokens)
    words, word_tokens, current, offset = [], [], [], 0
    for token in tokens:
        current.append(token)
        decoded = vocab.tokenizer.decode(current)
        bad = decoded.find(REPLACEMENT_CHAR)
        if bad < 0 or (offset + bad < len(full) and full[offset + bad] == REPLACEMENT_CHAR):
            words.append(decoded)
            word_tokens.append(current)
            current = []
            offset += len(decoded)
    return words, word_tokens


def split_to_word_tokens(vocab: WhisperVocab, language: str, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
    """Words with their tokens: a word starts at a space, a punctuation mark or a special token;
    languages written without spaces split at every whole character instead."""
    subwords, subword_tokens = split_on_unicode(vocab, tokens)
    if language in NO_SPACE_LANGUAGES:
        return subwords, subword_tokens
    words, word_tokens = [], []
    for subword, toks in zip(subwords, subword_tokens):
        starts_word = toks[0] >= vocab.eot or subword.startswith(" ") or subword.strip() in string.punctuation
        if starts_word or not words:
            words.append(subword)
            word_tokens.append(list(toks))
        else:
            words[-1] += subword
            word_tokens[-1].extend(toks)
    return words, word_tokens


def merge_punctuations(alignment: list, prepended: str = PREPEND_PUNCTUATIONS, appended: str = APPEND_PUNCTUATIONS) -> None:
    """Glue opening punctuation to the following word and closing punctuation to the previous one,
    in place; the emptied entries keep their (empty) place so token counts still line up."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def attach_words(segments: list, alignment: list, vocab: WhisperVocab, offset: float, last_speech: float) -> float:
    """Give each segment of one window its words (segment.words), shifted by `offset` seconds, and
    tighten segment bounds to them as openai-whisper does. `alignment`: WordTimings of all the
    window's text tokens in order. Returns the time the last speech ended."""
    durations = np.array([w.end - w.start for w in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median_duration * 2

    # Words at sentence boundaries are not longer than twice the median word.
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_duration:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + max_duration
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - max_duration
    merge_punctuations(alignment)

    index = 0
    for segment in segments:
        text_count = sum(1 for t in segment.tokens if t < vocab.eot)
        words, taken = [], 0
        while index < len(alignment) and taken < text_count:
            timing = alignment[index]
            if timing.word:
                words.append(Word(timing.word, round(offset + timing.start, 2), round(offset + timing.end, 2),
                                  round(timing.probability, 4)))
            taken += len(timing.tokens)
            index += 1
        if words:
            _fit_words_to_segment(segment, words, median_duration, max_duration, last_speech)
            last_speech = segment.end
        segment.words = words
    return last_speech


def _fit_words_to_segment(segment, words, median_duration, max_duration, last_speech) -> None:
    first = words[0]
    # The first words after a long pause are not longer than twice the median word.
    if first.end - last_speech > median_duration * 4 and (
        first.end - first.start > max_duration or (len(words) > 1 and words[1].end - first.start > max_duration * 2)
    ):
        if len(words) > 1 and words[1].end - words[1].start > max_duration:
            boundary = max(words[1].end / 2, words[1].end - max_duration)
            first.end = words[1].start = boundary
        first.start = max(0.0, first.end - max_duration)
    # Prefer the segment's timestamps over a first/last word that runs long.
    if segment.start < first.end and segment.start - 0.5 > first.start:
        first.start = max(0.0, min(first.end - median_duration, segment.start))
    else:
        segment.start = first.start
    last = words[-1]
    if segment.end > last.start and segment.end + 0.5 < last.end:
        last.end = max(last.start + median_duration, segment.end)
    else:
        segment.end = last.end


FRAME_S = 0.02            # energy frames for trimming silence off word edges
QUIET_RELATIVE = 0.03     # a frame quieter than this fraction of the window's speech level (-30 dB) is silence
MIN_WORD_S = 0.06


def trim_silence(alignment: list, samples: np.ndarray, sample_rate: int = 16000) -> None:
    """Pulls each word's start and end in from audio that is silent, so a word followed by a pause
    ends where its sound ends (DTW tends to run a sentence's last word into the pause after it).
    Times are seconds from the start of `samples`; words never shrink below MIN_WORD_S."""
    hop = int(FRAME_S * sample_rate)
    n = len(samples) // hop
    if n == 0:
        return
    rms = np.sqrt(np.mean(np.square(samples[: n * hop].reshape(n, hop), dtype=np.float64), axis=1))
    quiet = rms < max(float(np.percentile(rms, 95)) * QUIET_RELATIVE, 1e-5)
    keep = max(1, round(MIN_WORD_S / FRAME_S))
    for w in alignment:
        first, last = int(w.start / FRAME_S), min(n, int(np.ceil(w.end / FRAME_S)))
        while last - first > keep and quiet[last - 1]:
            last -= 1
        while last - first > keep and quiet[first]:
            first += 1
        w.start, w.end = max(w.start, first * FRAME_S), min(w.end, last * FRAME_S)
