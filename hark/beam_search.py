"""What LLM.beam_search returns, as in vLLM: a BeamSearchOutput per prompt, its best sequences first."""
from dataclasses import dataclass, field

from hark.outputs import Logprob


@dataclass
class BeamSearchSequence:
    tokens: list[int]                       # the prompt's tokens, then the generated ones
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)   # per generated token
    cum_logprob: float = 0.0
    text: str | None = None                 # the decoded tokens (prompt included, end-of-sequence token not)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]
