"""Logits processors that only watch: they record what openai-whisper reads off its decoder's logits."""
import math

import torch


class NoSpeechProbe:
    """P(<|nospeech|>) at the first step, from the raw logits (put it first in the processor list).

    When the decoder prompt ends with <|startoftranscript|> this is openai-whisper's no_speech_prob.
    """

    def __init__(self, no_speech_token: int):
        self.no_speech_token = no_speech_token
        self.prob = math.nan

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_ids:
            self.prob = torch.softmax(logits, dim=-1)[self.no_speech_token].item()
        return logits


class LogprobMeter:
    """Sum of the generated tokens' log-probabilities under the *processed* logits, without the
    temperature, as openai-whisper scores a decode (put it last in the processor list).

    A step's token is only known at the next call, so the last processed row is kept; `total`
    adds the final token's share once the output is known.
    """

    def __init__(self):
        self.sum = 0.0
        self.row: torch.Tensor | None = None
        self.step = -1

    def _add(self, token: int) -> None:
        self.sum += (self.row[token] - torch.logsumexp(self.row, dim=-1)).item()

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.row is not None and len(output_ids) == self.step + 1:
            self._add(output_ids[-1])
        self.row, self.step = logits.clone(), len(output_ids)
        return logits

    def total(self, token_ids: list[int]) -> float:
        if self.row is not None and len(token_ids) == self.step + 1:
            self._add(token_ids[-1])
            self.row = None
        return self.sum
