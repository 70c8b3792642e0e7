"""What rank 0 sends its workers each call: plain data (ids, positions, block tables, tensors),
never engine objects. A worker rebuilds the forward's AttentionMetadata from a ForwardRecord."""
import itertools
from dataclasses import dataclass, field

import torch

from hark.runner.attention import AttentionMetadata


@dataclass
class ForwardRecord:
    input_ids: torch.Tensor
    positions: torch.Tensor
    inputs_embeds: torch.Tensor | None          # audio embeddings placed by rank 0 (which runs the encoders)
    slot_mapping: torch.Tensor
    query_start: list[int]
    context_lens: list[int]
    block_tables: list[torch.Tensor]
    block_size: int
    output_rows: torch.Tensor | None
    cache_shape: tuple[int, ...]                 # the KV cache the worker allocates on its first forward
    cross_uids: list[int] | None = None          # encoder-decoder: each sequence's cross-attention cache
    encoder_states: dict[int, torch.Tensor] = field(default_factory=dict)   # of caches new to the workers

    def metadata(self, caches: dict[int, dict]) -> AttentionMetadata:
        """The forward's metadata; caches (uid -> cross cache) keeps this step's requests only."""
        meta = AttentionMetadata(self.slot_mapping, self.query_start, self.context_lens, self.block_tables,
                                 self.block_size, output_rows=self.output_rows)
        if self.cross_uids is not None:
            kept = {uid: self.cross_cache(caches, uid) for uid in self.cross_uids}
            caches.clear()
            caches.update(kept)
            meta.cross_caches = [caches[uid] for uid in self.cross_uids]
            meta.encoder_states = [self.encoder_states.get(uid) for uid in self.cross_uids]
        return meta.prepare()

    def cross_cache(self, caches: dict[int, dict], uid: int) -> dict:
        if uid in self.encoder_states or uid not in caches:       # sent again: its K/V are computed afresh
            return {"uid": uid}
        return caches[uid]


_cache_uids = itertools.count(1 << 40)        # apart from whisper.py's own uids


class RecordWriter:
    """Rank 0's side: a ForwardRecord from the runner's forward arguments. The encoder state of a
    request goes to the workers when it joins (was not in the previous forward); workers keep the
    cross-attention caches of the requests of their last forward only."""

    def __init__(self):
        self.worker_uids: set[int] = set()

    def forward(self, input_ids, positions, meta: AttentionMetadata, inputs_embeds, cache_shape) -> ForwardRecord:
        record = ForwardRecord(input_ids, positions, inputs_embeds, meta.slot_mapping, meta.query_start,
                               meta.context_lens, meta.block_tables, meta.block_size, meta.output_rows,
                               tuple(cache_shape))
        if meta.cross_caches is not None:
            for cache in meta.cross_caches:
                if "uid" not in cache:
                    cache["uid"] = next(_cache_uids)
            record.cross_uids = [c["uid"] for c in meta.cross_caches]
            record.encoder_states = {uid: s for uid, s in zip(record.cross_uids, meta.encoder_states)
                                     if uid not in self.worker_uids}
            self.worker_uids = set(record.cross_uids)
        return record
