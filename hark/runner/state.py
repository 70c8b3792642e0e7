"""What the runner keeps per request and per sequence between steps (see hark.step for when)."""
from dataclasses import dataclass, field

import torch

from hark.inputs import ProcessedPrompt, PromptPositions
from hark.sampling import SamplingParams


@dataclass(eq=False)
class RequestState:
    prompt: ProcessedPrompt
    lora_id: int = 0
    encoder_state: torch.Tensor | None = None    # encoder-decoder models: the encoder output
    cross_cache: dict = field(default_factory=dict)   # the model's cross-attention K/V of this request
    positions: PromptPositions | None = None     # M-RoPE models: the prompt's positions, from the model


@dataclass(eq=False)
class SequenceState:
    """A sequence as the sampler reads it: its params, generator and (when the step sent them) tokens."""
    request: RequestState
    params: SamplingParams
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    num_tokens: int = 0                          # set each step it samples
    token_ids: list[int] = field(default_factory=list)   # its history, when the step sent it

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens
