"""A request and its sequences (one per sample when n > 1)."""
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from hark.inputs import ProcessedPrompt
from hark.lora.request import LoRARequest
from hark.outputs import Logprob, RequestMetrics
from hark.sampling import SamplingParams

if TYPE_CHECKING:
    from hark.engine.beam import BeamSearch


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list["Sequence"] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics | None = None
    cache_salt: str | None = None                # mixed into the first block hash (audio of enc-dec)
    lora_request: LoRARequest | None = None      # the adapter it runs with (None: the base model)
    lora_cache_key: tuple | None = None          # mixed into the first block hash (set while it holds the adapter)
    beam: "BeamSearch | None" = None             # beam search: its state; seqs are then the live beams
    announced: bool = False                      # the runner has had it (hark.step.NewRequest)

    @property
    def lora_int_id(self) -> int:
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(s.status == SequenceStatus.FINISHED for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int                                  # sample index within the request
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int | None = None                     # of its sampling generator, kept by the runner (None: greedy)
    parent: "Sequence | None" = None            # n > 1: samples share the parent's prompt blocks
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0               # blocks of block_table already offered to the prefix cache
    num_cached_tokens: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    grammar: object | None = None               # structured outputs: this sample's xgrammar GrammarMatcher
    announced: bool = False                     # the runner has had it (hark.step.NewSequence)
    # detokenizer state
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def prefilled(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens
