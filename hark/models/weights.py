"""Copying checkpoint tensors into a hark model's parameters, shared by every model's load_weights."""
import torch
from torch import nn

from hark.models.parallel import default_weight_loader

# (stacked parameter's module, checkpoint projection it stacks, shard id): the fused projections of
# hark's attention and MLP layers, each checkpoint projection a part of one hark linear
QKV = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")]
GATE_UP = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
KV = [("kv_proj", "k_proj", 0), ("kv_proj", "v_proj", 1)]


class WeightLoader:
    """Loads tensors into `module`'s parameters through each parameter's `weight_loader` (this rank's
    slice of a tensor-parallel layer, or a part of a stacked projection; a plain copy for the others)
    and, at the end, says which parameters the checkpoint left out."""

    def __init__(self, module: nn.Module, what: str = "weight"):
        self.params = dict(module.named_parameters())
        self.loaded: set[str] = set()
        self.what = what

    def copy(self, target: str, tensor: torch.Tensor, checkpoint_name: str, rows: slice | None = None,
             shard_id=None) -> None:
        """tensor into parameter `target`: into its `rows` (a model's own stacking, not tensor-parallel), or
        through its weight_loader (shard_id: which stacked part it is)."""
        param = self.params.get(target)
        if param is None:
            raise ValueError(f"checkpoint has an unexpected {self.what} {checkpoint_name!r}")
        if rows is not None:
            param.data[rows].copy_(tensor)
        else:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
        self.loaded.add(target)

    def load(self, target: str, tensor: torch.Tensor, checkpoint_name: str, stacked=()) -> None:
        """copy(), with a checkpoint projection (layers.0.self_attn.q_proj.weight) that hark stacks
        into a fused one (stacked: QKV, GATE_UP, KV or their sum) loaded as its part."""
        parts = target.split(".")
        if len(parts) >= 2:
            for fused, projection, shard_id in stacked:
                if parts[-2] == projection:
                    fused_target = ".".join(parts[:-2] + [fused, parts[-1]])
                    if fused_target in self.params:
                        self.copy(fused_target, tensor, checkpoint_name, shard_id=shard_id)
                        return
        self.copy(target, tensor, checkpoint_name)

    def check_complete(self) -> None:
        missing = [name for name in self.params if name not in self.loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {self.what}s: {missing[:5]}")
