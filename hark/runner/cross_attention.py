"""Cross-attention of the CPU backend (SDPABackend): decoder queries over per-request encoder K/V.

Two layouts, both unmasked (a query sees every key it is given):
- `cross_attention(q, spans, scale)`: runs of rows, each with its own K/V. q [T, Hq, D]; spans
  [(start, end, k, v)] with k, v [Hkv, S, D] contiguous: rows start:end attend to that k, v (rows no span
  covers are left unset). GQA: the query heads of a KV head are folded into its query positions, so no
  K/V is repeated, and every call is 4-D (SDPA's flash kernel). Whisper's prompt chunks, mllama's
  image segments.
- `pooled_cross_attention(q, keys, values, rows, scale)`: one query per sequence over a pool of K/V
  slots, keys, values [R, H, S, D]; sequence i attends to slot rows.row_list[i] (slot i when rows is
  None). One SDPA call for the whole step: the queries are laid out [R, H, rows.width, D], a slot's
  sequences (beams sharing it) one position each, slots without sequences get zero queries. Whisper's
  decode steps.
Both return [T, Hq, D].
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CrossRows:
    """Where each sequence of a step finds its K/V: slot rows[i], and query position slots[i] within that
    slot's queries (sequences sharing a slot, e.g. beams, one position each)."""
    row_list: list[int]
    rows: torch.Tensor
    slots: torch.Tensor
    width: int                  # queries per slot: the most sequences sharing one slot

    @classmethod
    def of(cls, row_list: list[int]) -> "CrossRows":
        seen: dict[int, int] = {}
        slots = []
        for r in row_list:
            slots.append(seen.get(r, 0))
            seen[r] = slots[-1] + 1
        return cls(row_list, torch.tensor(row_list), torch.tensor(slots), max(seen.values()))


def cross_attention(q: torch.Tensor, spans: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                    scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    _, hq, d = q.shape
    for start, end, k, v in spans:
        n, hkv = end - start, k.shape[0]
        g = hq // hkv
        folded = q[start:end].view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * n, d)
        o = F.scaled_dot_product_attention(folded, k.unsqueeze(0), v.unsqueeze(0), scale=scale)
        out[start:end] = o.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
    return out


def pooled_cross_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: CrossRows | None,
                           scale: float) -> torch.Tensor:
    if rows is None:
        return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=scale).squeeze(2)
    padded = q.new_zeros(len(keys), q.shape[1], rows.width, q.shape[2])
    padded[rows.rows, :, rows.slots] = q
    out = F.scaled_dot_product_attention(padded, keys, values, scale=scale)
    return out[rows.rows, :, rows.slots]
