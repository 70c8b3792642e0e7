"""Attention over the paged KV cache, for packed batches that mix prefills and decodes.

The CPU backend uses PyTorch SDPA: decodes (one new token per sequence) run as one batched call
over their gathered, padded context; prefill chunks run one call per sequence. A GPU backend
(FlashAttention / Triton) would implement the same `paged_attention` signature.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] cache slot of each new token
    query_start: list[int]              # len S+1
    context_lens: list[int]             # per seq, past + new tokens
    block_tables: list[torch.Tensor]    # per seq, int64 block ids
    block_size: int
    encoder_states: list[torch.Tensor] | None = None
    cross_caches: list[dict] | None = None
    # Precomputed by prepare(): shared by every layer of one forward.
    decode_rows: torch.Tensor | None = field(default=None, repr=False)      # rows of decode tokens
    decode_blocks: torch.Tensor | None = field(default=None, repr=False)    # [Sd * max_blocks], row-major
    decode_mask: torch.Tensor | None = field(default=None, repr=False)      # [Sd, 1, 1, max_ctx]
    prefills: list[tuple[int, int, int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def prepare(self) -> "AttentionMetadata":
        """Splits the batch into the decode group and per-sequence prefills, and builds masks."""
        decode_seqs, self.prefills = [], []
        for i, ctx in enumerate(self.context_lens):
            start, end = self.query_start[i], self.query_start[i + 1]
            n = end - start
            if n == 1:
                decode_seqs.append(i)
                continue
            num_blocks = (ctx + self.block_size - 1) // self.block_size
            blocks = self.block_tables[i][:num_blocks]
            mask = None
            if n != ctx:  # chunk after cached context: query j sees keys up to ctx - n + j
                key_pos = torch.arange(ctx)
                query_pos = torch.arange(ctx - n, ctx)
                mask = key_pos[None, :] <= query_pos[:, None]
            self.prefills.append((start, end, ctx, blocks, mask))
        if decode_seqs:
            ctxs = [self.context_lens[i] for i in decode_seqs]
            max_ctx = max(ctxs)
            max_blocks = (max_ctx + self.block_size - 1) // self.block_size
            table = torch.zeros(len(decode_seqs), max_blocks, dtype=torch.long)
            for row, i in enumerate(decode_seqs):
                bt = self.block_tables[i][:max_blocks]
                table[row, : len(bt)] = bt
            self.decode_blocks = table.flatten()
            self.decode_rows = torch.tensor([self.query_start[i] for i in decode_seqs], dtype=torch.long)
            lens = torch.tensor(ctxs)
            width = max_blocks * self.block_size
            self.decode_mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :]
        else:
            self.decode_rows = self.decode_blocks = self.decode_mask = None
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
    if meta.decode_rows is not None:
        # One query per sequence: the query heads sharing a KV head become that head's "positions",
        # so GQA needs no repeated K/V. index_select gathers blocks far faster than fancy indexing.
        rows = meta.decode_rows
        sd, hkv, d = len(rows), k_cache.shape[2], k_cache.shape[3]
        keys = k_cache.index_select(0, meta.decode_blocks).view(sd, -1, hkv, d).transpose(1, 2)
        values = v_cache.index_select(0, meta.decode_blocks).view(sd, -1, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[rows].view(sd, hkv, -1, d), keys, values,
                                           attn_mask=meta.decode_mask, scale=scale)  # [Sd, Hkv, G, D]
        out[rows] = o.reshape(sd, -1, d)
    return out
