"""Tensor parallelism: one process per rank over torch.distributed (see tensor_parallel.py)."""
