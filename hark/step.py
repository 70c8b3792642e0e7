"""The engine ↔ runner seam: what the scheduler asks of one forward pass, and what comes back.

The engine (scheduler, KV block manager, requests, beams, grammars, detokenizer) and the runner
(model, KV-cache tensors, encoder outputs, cross-attention K/V, sampling) share nothing but these
records: plain data (ints, strings, lists, tensors, SamplingParams, ProcessedPrompt), so a step can be
pickled to worker processes. `hark.executor.Executor` holds the model and runner and is the engine's
only handle on them: `execute(SchedulerOutput) -> ModelRunnerOutput`, `encode(items)`,
`decode_dense(...)`.

The contract of one `SchedulerOutput`:
- `new_requests`: requests whose first sequence runs for the first time this step, sent once. The
  runner keeps per-request state under `request_id` (the prompt and its multimodal items, encoder
  output, cross-attention K/V, model-built positions) until the id comes back in
  `finished_request_ids`.
- `new_seqs`: sequences run for the first time (also forked beams), sent once. The runner keeps their
  sampling state (params, seeded generator) under `seq_id` until `finished_seq_ids` names it; a
  preempted sequence keeps it (it is recomputed from its tokens, its generator goes on).
- `block_copies` (src, dst) KV blocks, in every layer, are copied before the forward (beam forks).
- `seqs`: the packed batch in row order; each computes `token_ids` at positions `start`.. on top of
  the KV already in its `block_table`. A sequence with `sample` returns a next token (or, with
  `num_candidates`, its beam-search candidates); `prompt_logprob_targets` asks for the logprobs of
  those prompt tokens from the chunk's first rows.
- `grammar_mask`: what structured outputs allow, over the rows that sample (not beams), in order.

`ModelRunnerOutput` answers in the same orders: one sampled token per sampling row, candidates per
beam row, prompt logprobs per sequence id that asked.
"""
from dataclasses import dataclass, field

import torch

from hark.inputs import ProcessedPrompt
from hark.outputs import Logprob
from hark.sampling import SamplingParams


@dataclass
class NewRequest:
    request_id: str
    prompt: ProcessedPrompt         # token ids, multimodal items and their placeholder offsets
    lora_id: int = 0                # the LoRA adapter its rows run with (0: the base model)


@dataclass
class NewSequence:
    seq_id: int
    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    seed: int | None = None         # its sampling generator's seed (None: greedy or beam search, none)


@dataclass
class ScheduledSequence:
    seq_id: int
    start: int                      # tokens already in the KV cache: token_ids[0] is at position start
    token_ids: list[int]            # the tokens this step computes
    block_table: list[int]          # all of the sequence's KV blocks
    sample: bool = False            # token_ids end the sequence: its next token comes back
    num_candidates: int = 0         # beam search: the k best next tokens come back instead of a sample
    prompt_logprob_targets: list[int] | None = None   # prompt tokens predicted by rows 0.. of this chunk
    history: list[int] | None = None    # every token so far, when sampling reads them (penalties, processors)


@dataclass
class GrammarMask:
    bitmask: torch.Tensor        # int32 [batch, ceil(vocab / 32)], one bit per token
    rows: list[int]              # the constrained rows

    def apply(self, logits: torch.Tensor) -> None:
        """Sets the logits of the tokens the grammars forbid to -inf, in place (xgrammar's kernel)."""
        import xgrammar as xgr
        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=min(logits.shape[-1], self.bitmask.shape[-1] * 32),
                                        indices=self.rows if len(self.rows) < logits.shape[0] else None)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSequence] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    new_seqs: list[NewSequence] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    grammar_mask: GrammarMask | None = None


@dataclass
class ModelRunnerOutput:
    token_ids: list[int] = field(default_factory=list)          # per sampling row
    logprobs: list[float] = field(default_factory=list)         # of each sampled token
    top_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)   # when asked for
    beam_logprobs: list[list[float]] = field(default_factory=list)   # per beam row, best first
    beam_token_ids: list[list[int]] = field(default_factory=list)
    prompt_logprobs: dict[int, list[dict[int, Logprob]]] = field(default_factory=dict)   # seq_id -> per target
