"""Copying checkpoint tensors into a hark model's parameters, shared by every model's load_weights."""
import torch
from torch import nn


class WeightLoader:
    """Copies tensors into `module`'s parameters (whole, or as a row slice of a fused projection)
    and, at the end, says which parameters the checkpoint left out."""

    def __init__(self, module: nn.Module, what: str = "weight"):
        self.params = dict(module.named_parameters())
        self.loaded: set[str] = set()
        self.what = what

    def copy(self, target: str, tensor: torch.Tensor, checkpoint_name: str, rows: slice | None = None) -> None:
        param = self.params.get(target)
        if param is None:
            raise ValueError(f"checkpoint has an unexpected {self.what} {checkpoint_name!r}")
        (param.data if rows is None else param.data[rows]).copy_(tensor)
        self.loaded.add(target)

    def check_complete(self) -> None:
        missing = [name for name in self.params if name not in self.loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {self.what}s: {missing[:5]}")
