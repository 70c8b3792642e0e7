"""Turns the logits of a batch into next tokens, each row under its own SamplingParams.

Order per row: logits processors, allowed tokens, min_tokens and the grammar mask of a structured
output (constraints) -> logprobs are taken
here -> penalties -> greedy argmax, or temperature, top-k, top-p, min-p and a draw from the row's
own torch.Generator (so a seeded request samples the same tokens in any batch).

Beam search rows take `beam_candidates` instead: the best tokens of each row by log-probability, after
the constraints, the penalties and the temperature (when > 0).
"""
from dataclasses import dataclass

import torch

from hark.runner.state import SequenceState as Sequence
from hark.step import GrammarMask
from hark.outputs import Logprob


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]                             # of each sampled token
    top_logprobs: list[dict[int, Logprob] | None]     # when the request asked for logprobs


def _apply_constraints(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.logits_processors:
            out = seq.output_token_ids
            for fn in p.logits_processors:
                logits[row] = fn(out, logits[row])
        if p.allowed_token_ids is not None:
            mask = torch.full_like(logits[row], float("-inf"))
            mask[p.allowed_token_ids] = 0
            logits[row] += mask
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
            if banned:
                logits[row, banned] = float("-inf")


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.uses_penalties:
            continue
        out = torch.tensor(seq.output_token_ids, dtype=torch.long)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Masks one row (already divided by temperature) to the tokens top-k / top-p / min-p keep."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest set reaching top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def _top_logprobs(logprobs_row: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    lp = logprobs_row[token].item()
    rank = int((logprobs_row > lp).sum().item()) + 1
    result = {token: Logprob(lp, rank)}
    if k:
        values, ids = torch.topk(logprobs_row, k)
        for r, (v, i) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            result.setdefault(i, Logprob(v, r))
    return result


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int],
           grammar_mask: GrammarMask | None = None) -> SampleResult:
    """grammar_mask: what the rows' grammars allow (StructuredOutputs.bitmask), if any row has one."""
    logits = logits.float()
    _apply_constraints(logits, seqs, eos_ids)
    if grammar_mask is not None:
        grammar_mask.apply(logits)
    logprobs = torch.log_softmax(logits, dim=-1)
    _apply_penalties(logits, seqs)
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row_logits = _filter(logits[row] / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = row_logits.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=seq.generator)
        tokens[row] = int((probs / noise).argmax())
    chosen = logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
    tops = [_top_logprobs(logprobs[row], tokens[row], seq.params.logprobs)
            if seq.params.logprobs is not None else None for row, seq in enumerate(seqs)]
    return SampleResult(tokens, chosen, tops)


@torch.inference_mode()
def beam_candidates(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int],
                    k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Per row, the k most likely next tokens and their log-probabilities (best first)."""
    logits = logits.float()
    _apply_constraints(logits, seqs, eos_ids)
    _apply_penalties(logits, seqs)
    temperatures = [s.params.temperature if s.params.temperature > 1e-5 else 1.0 for s in seqs]
    if any(t != 1.0 for t in temperatures):
        logits /= torch.tensor(temperatures, dtype=logits.dtype).unsqueeze(1)
    values, ids = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[1]), dim=-1)
    return values.tolist(), ids.tolist()


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, next_tokens: list[int], k: int) -> list[dict[int, Logprob]]:
    """Logprobs of each prompt token given what precedes it (rows are positions 0..n-2)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [_top_logprobs(logprobs[i], tok, k) for i, tok in enumerate(next_tokens)]
