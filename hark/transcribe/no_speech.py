"""P(<|nospeech|>) read off the decode's first step, as a logits processor that only watches."""
import math

import torch


class NoSpeechProbe:
    """Records P(<|nospeech|>) from the raw logits at the first step (put it first in the processor list).

    When the decoder prompt ends with <|startoftranscript|> this is openai-whisper's no_speech_prob.
    """

    def __init__(self, no_speech_token: int):
        self.no_speech_token = no_speech_token
        self.prob = math.nan

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_ids:
            self.prob = torch.softmax(logits, dim=-1)[self.no_speech_token].item()
        return logits
