"""Whisper's decoding rules as engine logits processors: fn(output token ids, logits row [V]) -> row.

Each processor is built per request and sees only that request's generated tokens.
"""
import torch

from hark.transcribe.vocab import TIME_PRECISION, WhisperVocab

NEG_INF = float("-inf")


class SuppressTokens:
    """Never emit `tokens`; at the first step also not `begin_tokens` (a blank or an immediate end)."""

    def __init__(self, tokens: list[int], begin_tokens: list[int]):
        self.tokens = torch.tensor(sorted(set(tokens)), dtype=torch.long)
        self.begin_tokens = torch.tensor(sorted(set(tokens) | set(begin_tokens)), dtype=torch.long)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.begin_tokens if not output_ids else self.tokens] = NEG_INF
        return logits


class TimestampRules:
    """openai-whisper's timestamp rules.

    - <|notimestamps|> is never sampled;
    - timestamps come in pairs (end of one segment, start of the next), except right before <|endoftext|>;
    - timestamps never decrease, and a segment never has zero length;
    - the first token is a timestamp no later than `max_initial_timestamp` seconds;
    - when the probability mass of all timestamps beats the most likely text token, a timestamp is forced.
    """

    def __init__(self, vocab: WhisperVocab, max_initial_timestamp: float | None = 1.0, preceding: list[int] = ()):
        self.vocab = vocab
        self.preceding = list(preceding)    # prompt tokens the rules count as output (a prefix)
        self.max_initial_index = None if max_initial_timestamp is None else round(max_initial_timestamp / TIME_PRECISION)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        eot, ts_begin = self.vocab.eot, self.vocab.timestamp_begin
        if self.preceding:
            output_ids = self.preceding + list(output_ids)
        logits[self.vocab.no_timestamps] = NEG_INF

        if not output_ids:
            logits[:ts_begin] = NEG_INF
            if self.max_initial_index is not None:
                logits[ts_begin + self.max_initial_index + 1:] = NEG_INF
        else:
            last_was_timestamp = output_ids[-1] >= ts_begin
            penultimate_was_timestamp = len(output_ids) < 2 or output_ids[-2] >= ts_begin
            if last_was_timestamp:
                if penultimate_was_timestamp:   # a pair just closed: text (or the end) must follow
                    logits[ts_begin:] = NEG_INF
                else:                           # a segment just ended: the next start or the end
                    logits[:eot] = NEG_INF
            last_timestamp = next((t for t in reversed(output_ids) if t >= ts_begin), None)
            if last_timestamp is not None:
                # the next segment may start where the last one ended; otherwise time moves strictly forward
                lowest = last_timestamp if last_was_timestamp and not penultimate_was_timestamp else last_timestamp + 1
                logits[ts_begin:lowest] = NEG_INF

        timestamp_mass = torch.logsumexp(logits[ts_begin:], dim=-1)
        if timestamp_mass > logits[:ts_begin].max():
            logits[:ts_begin] = NEG_INF
        return logits


class NoRepeatNGram:
    """No n-gram of `size` tokens twice in the output (with `preceding` prompt tokens counted as output):
    the tokens that would complete an n-gram seen before are banned, as transformers'
    NoRepeatNGramLogitsProcessor and CTranslate2's no_repeat_ngram_size do."""

    def __init__(self, size: int, preceding: list[int] = ()):
        self.size, self.preceding = size, list(preceding)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        tokens = self.preceding + list(output_ids)
        n = self.size
        if len(tokens) < n - 1 or n < 1:
            return logits
        if n == 1:
            banned = set(tokens)
        else:
            last = tokens[len(tokens) - n + 1:]
            banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == last}
        if banned:
            logits[list(banned)] = NEG_INF
        return logits
