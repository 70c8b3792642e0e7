"""Attention over the paged KV cache, for packed batches that mix prefills and decodes.

The CPU backend uses PyTorch SDPA, one call per sequence over its own blocks: 4-D, unmasked
(or causal) calls take SDPA's flash kernel. One batched call for all decodes over a padded gather
needs a mask, which sends SDPA to its math path: measured 1.6 s slower over the 253 decode steps of
benchmarks/audio_chat.py, Python loop included (and, on 24 decodes of 40-500 positions, a batched
matmul over the padded gather, or block-diagonal queries against all KV heads at once, cost as
much CPU time as the loop: the padding doubles the keys). The decode loop runs on one thread: each
of its calls is too small to share, and on 2 cores two threads made every one of them a fork and
a join (1.65 ms a layer against 0.96 ms on one thread, 24 decodes).

A backend is `build_metadata(seqs)` (the step record's scheduled sequences -> its metadata, shared by
every layer of one forward), `forward(q, k, v, k_cache, v_cache, meta, scale)` (paged self-attention)
and the cross-attention pair `cross_forward(q, spans, scale)` / `pooled_cross_forward(q, keys, values,
rows, scale)` (layouts in cross_attention.py). Models call them through `meta.backend`, so a GPU backend
(FlashAttention / Triton, with metadata of its own) fits without touching them. `SDPABackend` is the
CPU one.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hark.runner.cross_attention import cross_attention, pooled_cross_attention
from hark.step import ScheduledSequence


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] cache slot of each new token
    query_start: list[int]              # len S+1
    context_lens: list[int]             # per seq, past + new tokens
    block_tables: list[torch.Tensor]    # per seq, int64 block ids
    block_size: int
    encoder_states: list[torch.Tensor] | None = None
    cross_caches: list[dict] | None = None
    output_rows: torch.Tensor | None = None  # rows whose hidden state the forward returns (None: all)
    backend: object = field(default_factory=lambda: SDPABackend, repr=False)   # whose forward the models call
    # Precomputed by prepare(): shared by every layer of one forward.
    decodes: list[tuple[int, int, torch.Tensor]] = field(default_factory=list, repr=False)  # (row, ctx, blocks)
    prefills: list[tuple[int, int, int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def prepare(self) -> "AttentionMetadata":
        """Splits the batch into decodes and prefill chunks, with each one's blocks and mask."""
        self.decodes, self.prefills = [], []
        for i, ctx in enumerate(self.context_lens):
            start, end = self.query_start[i], self.query_start[i + 1]
            n = end - start
            blocks = self.block_tables[i][:(ctx + self.block_size - 1) // self.block_size]
            if n == 1:
                self.decodes.append((start, ctx, blocks))
                continue
            mask = None
            if n != ctx:  # chunk after cached context: query j sees keys up to ctx - n + j
                key_pos = torch.arange(ctx)
                query_pos = torch.arange(ctx - n, ctx)
                mask = key_pos[None, :] <= query_pos[:, None]
            self.prefills.append((start, end, ctx, blocks, mask))
        return self


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]. Returns [T, Hq, D]."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for start, end, ctx, blocks, mask in meta.prefills:
        if ctx == end - start and mask is None:  # whole context is new: attend to the fresh k/v
            keys, values = k[start:end], v[start:end]
        else:
            keys = k_cache.index_select(0, blocks).flatten(0, 1)[:ctx]
            values = v_cache.index_select(0, blocks).flatten(0, 1)[:ctx]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    if not meta.decodes:
        return out
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    with one_thread(q.device):
        for row, ctx, blocks in meta.decodes:
            # One query: the query heads sharing a KV head become that head's "positions", so GQA needs
            # no repeated K/V. index_select gathers blocks far faster than fancy indexing.
            keys = k_cache.index_select(0, blocks).view(-1, hkv, d)[:ctx].transpose(0, 1).unsqueeze(0)
            values = v_cache.index_select(0, blocks).view(-1, hkv, d)[:ctx].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q[row].view(1, hkv, -1, d), keys, values, scale=scale)
            out[row] = o.view(-1, d)
    return out


@contextmanager
def one_thread(device: torch.device):
    """Runs the block on one intra-op thread (CPU only), then restores the thread count."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SDPABackend:
    """The CPU backend: PyTorch SDPA per sequence over its own blocks (paged_attention above), and over
    the encoder K/V each model hands it (cross_attention.py)."""
    forward = staticmethod(paged_attention)
    cross_forward = staticmethod(cross_attention)
    pooled_cross_forward = staticmethod(pooled_cross_attention)

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def build_metadata(self, seqs: list[ScheduledSequence]) -> AttentionMetadata:
        bs = self.block_size
        slots, query_start, context_lens, tables = [], [0], [], []
        for seq in seqs:
            start, end = seq.start, seq.start + len(seq.token_ids)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + end - start)
            context_lens.append(end)
            tables.append(torch.tensor(table, dtype=torch.long))
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device), query_start=query_start,
            context_lens=context_lens, block_tables=tables, block_size=bs, backend=self).prepare()
