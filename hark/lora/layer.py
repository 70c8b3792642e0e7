"""The low-rank updates of one Linear, for every loaded adapter that targets it."""
import torch

from hark.lora.rows import active_rows


class LinearLoRA:
    """out[rows of adapter i] += (x[rows] @ A_i) @ B_i for each adapter i of the step's batch: one pair of
    products per adapter over its rows (grouped), the base weight untouched. A_i [in, r], B_i [r, out] hold
    the scaling, and for a fused projection (qkv, gate/up) the shards' factors side by side: A_i is
    their A's concatenated, B_i block-diagonal, so a shard without an update has zero rows there."""

    def __init__(self):
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # adapter id -> (A, B)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = active_rows() if self.weights else None
        if rows is None:
            return out
        for adapter_id, start, end in rows.runs(x.shape[0]):
            factors = self.weights.get(adapter_id)
            if factors is not None:
                a, b = factors
                out[start:end].addmm_(x[start:end] @ a, b)
        return out
