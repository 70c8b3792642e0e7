"""This process's place in the tensor-parallel group: rank, world size, and the collectives the
parallel layers call. Without a group (the default) the world is one rank and nothing is sent."""
import datetime
import os
import socket

import torch
import torch.distributed as dist

_rank, _world = 0, 1


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank_: int, world: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """Joins the group: gloo on CPU, NCCL on CUDA (each rank on its own GPU)."""
    global _rank, _world
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else rank_)
    dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _rank, _world = rank_, world


def destroy() -> None:
    global _rank, _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _world = 0, 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the ranks (x itself in a world of one)."""
    if _world > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's x concatenated along dim, rank 0's first (x itself in a world of one)."""
    if _world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def gather_to_first(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Every rank's x concatenated along dim on rank 0; None on the other ranks."""
    if _world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world)] if _rank == 0 else None
    if x.is_cuda:           # NCCL has no gather: all_gather, the others drop the result
        return all_gather(x, dim) if _rank == 0 else (all_gather(x, dim), None)[1]
    dist.gather(x.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=dim) if _rank == 0 else None


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)
