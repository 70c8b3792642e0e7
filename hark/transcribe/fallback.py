"""openai-whisper's quality gates: when to decode a window again at a higher temperature, and when
a window is silence; and the guard that ends a decode as soon as it cannot pass them."""
from dataclasses import dataclass

from hark.transcribe.options import TranscriptionOptions
from hark.transcribe.segments import compression_ratio


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


# A decode is doomed when its text so far ends in a loop: a run of text tokens that repeats with a period
# of at most LOOP_MAX_PERIOD tokens, LOOP_MIN_REPEATS times or more and over LOOP_MIN_TOKENS tokens at
# least ("the the the ..." 30 times, a 10-token sentence 3 times). Whisper rarely leaves such a loop: the
# decode would run to its token limit and fail the compression gate.
LOOP_MIN_REPEATS = 3
LOOP_MIN_TOKENS = 30
LOOP_MAX_PERIOD = 50
CHECK_EVERY = 8         # tokens between two checks of a decode


def ends_in_loop(text_tokens: list[int]) -> bool:
    n = len(text_tokens)
    for period in range(1, min(LOOP_MAX_PERIOD, n // LOOP_MIN_REPEATS) + 1):
        span = max(period * LOOP_MIN_REPEATS, LOOP_MIN_TOKENS)
        if span <= n and text_tokens[n - span:n - period] == text_tokens[n - span + period:]:
            return True
    return False


class DoomedDecodeGuard:
    """A logits processor (put it last) that ends a decode's sample at once, by allowing only
    <|endoftext|>, when its tokens so far will not pass the gates: they end in a loop, or their text
    already compresses better than compression_ratio_threshold. Checked every CHECK_EVERY tokens. The
    engine then finishes the sample (and frees its blocks) like any other that ended, while the other
    samples of its request go on; `doomed` tells the run which samples it ended.

    Only for decodes that have a next temperature to go to.
    """

    def __init__(self, vocab, compression_ratio_threshold: float):
        self.vocab, self.threshold = vocab, compression_ratio_threshold

    def doomed(self, tokens: list[int]) -> bool:
        text = [t for t in tokens if t < self.vocab.eot]
        return ends_in_loop(text) or compression_ratio(self.vocab.decode(text)) > self.threshold

    def __call__(self, output_ids: list[int], logits):
        if output_ids and len(output_ids) % CHECK_EVERY == 0 and self.doomed(output_ids):
            logits.fill_(float("-inf"))
            logits[self.vocab.eot] = 0.0
        return logits
