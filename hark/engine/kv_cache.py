"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and a hash-chained prefix cache.

The tensors live in the model runner; this file only decides which block holds what. A full block
is identified by hash(parent block hash, its token ids, extra keys such as audio item hashes), so a
block can be shared by every sequence whose prefix matches. Freed blocks keep their hash and stay
reusable until they are handed out again (least recently freed first).
"""
from collections import OrderedDict

from hark.engine.request import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                      # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_queries = 0                               # tokens looked up
        self.prefix_hits = 0                                  # tokens found

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = (seq.num_computed_tokens + num_new_tokens + self.block_size - 1) // self.block_size
        return max(0, total - len(seq.block_table))

    # --- hashing ------------------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, index: int, parent: int | None) -> int:
        start = index * self.block_size
        tokens = tuple(seq.token_ids[start: start + self.block_size])
        extra = block_extra_keys(seq, start, start + self.block_size)
        return hash((parent, tokens, extra))

    def _hashes_up_to(self, seq: Sequence, num_blocks: int) -> list[int]:
        while len(seq.block_hashes) < num_blocks:
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(self._block_hash(seq, len(seq.block_hashes), parent))
        return seq.block_hashes[:num_blocks]

    # --- allocation ---------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        if self.block_hash[block] is not None:                 # evict its cached content
            if self.cached.get(self.block_hash[block]) == block:
                del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def reuse_prefix(self, seq: Sequence) -> int:
        """On a sequence's first scheduling: share cached blocks of its prefix. Returns tokens reused."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        parent = seq.parent
        if parent is not None and parent.prefilled and parent.block_table and not parent.is_finished:
            n = (seq.num_prompt_tokens - 1) // self.block_size      # leave ≥ 1 token to compute
            for block in parent.block_table[:n]:
                self._take(block)
            seq.block_table = list(parent.block_table[:n])
            seq.block_hashes = list(parent.block_hashes[:n])
        elif self.enable_prefix_caching:
            max_blocks = (seq.num_tokens - 1) // self.block_size
            self.prefix_queries += seq.num_tokens
            for h in self._hashes_up_to(seq, max_blocks):
                block = self.cached.get(h)
                if block is None:
                    break
                self._take(block)
                seq.block_table.append(block)
            self.prefix_hits += len(seq.block_table) * self.block_size
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Makes room for num_new_tokens more tokens of seq; False (and nothing taken) if it can't."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Gives child (a copy of parent's tokens) parent's KV: its full blocks shared (one more reference
        each), its last partial block copied into a new block (copy-on-write: both go on writing there).
        Returns (source, destination) of the block the runner must copy, if any. When no block is free
        for the copy nothing is shared (child.num_computed_tokens stays 0): child recomputes its tokens."""
        computed = parent.num_computed_tokens
        full = computed // self.block_size
        partial = computed % self.block_size != 0
        if partial and not self.free_queue:
            return None
        for block in parent.block_table[:full]:
            self._take(block)
        child.block_table = list(parent.block_table[:full])
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_committed_blocks = min(parent.num_committed_blocks, full)
        child.num_computed_tokens = computed
        child.num_cached_tokens = parent.num_cached_tokens
        if not partial:
            return None
        copy = self._pop_free()
        child.block_table.append(copy)
        return parent.block_table[full], copy

    def free(self, seq: Sequence) -> None:
        """Releases seq's blocks; hashed blocks stay findable until reused, tail blocks go first."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_hash[block] is None:
                    self.free_queue.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def commit_full_blocks(self, seq: Sequence) -> None:
        """After a step: registers seq's newly filled blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = self._hashes_up_to(seq, full)
        for i in range(seq.num_committed_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
        seq.num_committed_blocks = max(seq.num_committed_blocks, full)


def block_extra_keys(seq: Sequence, start: int, end: int) -> tuple:
    """What besides token ids determines a block's KV: audio embedded in it, the request's salt, its
    LoRA adapter (in the first block: later blocks chain from it)."""
    request = seq.request
    keys = []
    if start == 0 and request.cache_salt is not None:
        keys.append(request.cache_salt)
    if start == 0 and request.lora_cache_key is not None:
        keys.append(("lora", request.lora_cache_key))
    prompt = request.prompt
    for item, offset in zip(prompt.mm_items, prompt.placeholder_offsets):
        if offset < end and offset + item.num_embeds > start:
            keys.append((item.hash, start - offset))
    return tuple(keys)
