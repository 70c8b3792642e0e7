"""Tensor-parallel layers (Megatron's split): each rank holds a slice of every large weight.

- Column-parallel linears (QKV, gate/up, cross-attention K/V) keep this rank's output rows: their
  outputs are this rank's heads / MLP columns, nothing is sent.
- Row-parallel linears (o_proj, down_proj, out_proj, fc2) keep this rank's input columns and sum
  their partial outputs over the ranks (one all-reduce); the bias lives on rank 0 only.
- The vocabulary-parallel embedding keeps a block of rows and all-reduces the looked-up vectors;
  the LM head keeps the same block (so tied weights stay tied) and gathers the logits on rank 0.

Each parameter has `weight_loader(param, loaded, shard_id=None)`, which copies this rank's slice of
a whole checkpoint tensor (`shard_id` names which stacked projection it is: "q", "k", "v" or an
index). In a world of one rank every layer is the plain Linear / nn.Embedding it subclasses, with
the same shapes, names and forward.
"""
import torch
import torch.nn.functional as F
from torch import nn

from hark.distributed import state
from hark.models.layers import Linear


def _rank_world(shard: bool) -> tuple[int, int]:
    return (state.rank(), state.world_size()) if shard else (0, 1)


def _divide(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"tensor_parallel_size={world} must divide the model's {what} ({n}).")
    return n // world


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """The whole tensor (a replicated parameter)."""
    param.data.copy_(loaded)


def _set_loader(layer: nn.Module, loader) -> None:
    for p in layer.parameters(recurse=False):
        p.weight_loader = loader


class ColumnParallelLinear(Linear):
    """Linear whose outputs are parts (`output_sizes`, stacked in that order: gate/up, K/V) each split
    evenly over the ranks: this rank holds its slice of every part, one after another."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, shard: bool = True):
        self.rank, self.world = _rank_world(shard)
        self.output_sizes = list(output_sizes)
        self.local_sizes = [_divide(n, self.world, "projection width") for n in output_sizes]
        super().__init__(input_size, sum(self.local_sizes), bias=bias)
        _set_loader(self, self.weight_loader)

    def part_rows(self, shard_id) -> tuple[int, int, int]:
        """(offset in this rank's rows, rows, first row in the checkpoint tensor) of a part."""
        i = int(shard_id)
        n = self.local_sizes[i]
        return sum(self.local_sizes[:i]), n, self.rank * n

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:            # a checkpoint that fuses the parts too (Phi-3's qkv_proj)
            for i, part in enumerate(loaded.split(self.full_sizes(), dim=0)):
                self.weight_loader(param, part, i)
            return
        offset, n, first = self.part_rows(shard_id)
        default_weight_loader(param.data[offset:offset + n], loaded[first:first + n])

    def full_sizes(self) -> list[int]:
        return self.output_sizes


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V stacked; a rank takes num_heads / world query heads and as many K/V heads: its
    share when the K/V heads divide over the ranks, else (fewer K/V heads than ranks) the one K/V
    head its query heads attend to, held by several ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 shard: bool = True):
        rank, world = _rank_world(shard)
        self.num_heads = _divide(num_heads, world, "attention heads")
        if num_kv_heads >= world:
            self.num_kv_heads = _divide(num_kv_heads, world, "key/value heads")
            self.kv_head = rank * self.num_kv_heads
        else:
            if world % num_kv_heads:
                raise ValueError(f"tensor_parallel_size={world} must be a multiple of the model's "
                                 f"key/value heads ({num_kv_heads}) when it is larger.")
            self.num_kv_heads, self.kv_head = 1, rank * num_kv_heads // world
        self.head_dim = head_dim
        self.full = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden, [q * world, kv * world, kv * world], bias=bias, shard=shard)
        if bias:
            self.bias.data.zero_()      # a checkpoint without a K bias (Whisper) leaves its slice zero

    def part_rows(self, shard_id) -> tuple[int, int, int]:
        i = "qkv".index(shard_id) if isinstance(shard_id, str) else int(shard_id)
        offset = sum(self.local_sizes[:i])
        first = self.rank * self.local_sizes[0] if i == 0 else self.kv_head * self.head_dim
        return offset, self.local_sizes[i], first

    def full_sizes(self) -> list[int]:
        return self.full


class RowParallelLinear(Linear):
    """Linear over this rank's slice of the input features; the partial outputs are summed over the
    ranks. The bias is rank 0's alone (zero elsewhere), so the sum adds it once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, shard: bool = True):
        self.rank, self.world = _rank_world(shard)
        super().__init__(_divide(input_size, self.world, "projection input width"), output_size, bias=bias)
        _set_loader(self, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:
            default_weight_loader(param, loaded if self.rank == 0 else torch.zeros_like(loaded))
            return
        n = param.shape[1]
        default_weight_loader(param, loaded[:, self.rank * n:(self.rank + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return state.all_reduce(out) if self.world > 1 else out


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding over this rank's block of ceil(vocab / world) rows (the last block zero-padded)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.rank, self.world = _rank_world(True)
        self.vocab_size = num_embeddings
        self.rows = -(-num_embeddings // self.world)
        self.first = self.rank * self.rows
        super().__init__(self.rows, embedding_dim)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if self.world == 1:
            default_weight_loader(param, loaded)
            return
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"checkpoint embedding of {loaded.shape[0]} rows does not fit a vocabulary "
                             f"of {self.vocab_size}")
        block = loaded[self.first:self.first + self.rows]
        param.data.zero_()
        param.data[:len(block)].copy_(block)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return super().forward(ids)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return state.all_reduce(out.masked_fill(outside[..., None], 0))


class ParallelLMHead(Linear):
    """The vocabulary projection over the embedding's block of rows; forward returns the whole
    vocabulary's logits on rank 0 and None on the others."""

    def __init__(self, hidden: int, vocab_size: int, bias: bool = False):
        self.rank, self.world = _rank_world(True)
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.world)
        super().__init__(hidden, self.rows, bias=bias)
        _set_loader(self, self.weight_loader)

    weight_loader = VocabParallelEmbedding.weight_loader
    first = property(lambda self: self.rank * self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        out = super().forward(x)
        if self.world == 1:
            return out
        whole = state.gather_to_first(out, dim=-1)
        return None if whole is None else whole[..., :self.vocab_size]


def tie(head: ParallelLMHead, embedding: VocabParallelEmbedding) -> None:
    """The head multiplies by the embedding's weight (the same rows on every rank)."""
    head.weight = embedding.weight
