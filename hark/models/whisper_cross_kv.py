"""Whisper's cross-attention K/V of the running requests, in one slot pool per model.

A request's K/V (per decoder layer, [H, S_enc, Dh] each) are computed from its encoder output at its
first step and written into a free slot of per-layer buffers K, V [capacity, H, S_enc, Dh]. The live
requests hold slots 0..n-1: when one ends, the request in the last slot moves into its slot (one
slot's copy, 18 MiB for tiny.en's 4 layers), so a decode step attends over the view [:n] of every
layer, one SDPA call over all of them, without gathering or stacking. Rebuilding a stack of the step's
requests whenever one joined copied every request's K/V each time (1.7 s of a 12 s beam-5 run on the
benchmark conversation).

A request's cache dict (Request.cross_cache) holds its ticket; the engine clears the dict when the
request ends, and the slot is free from the next step. A request that misses a step (preempted) may
lose its slot: it gets its K/V computed again when it is back, so nothing but time depends on slots.
"""
import itertools

import torch

from hark.runner.cross_attention import CrossRows

_uids = itertools.count()


class _Ticket:
    """A request's claim on the pool; dropping it (the request's cache dict cleared) frees the slot."""

    def __init__(self, pool: "CrossKVPool"):
        self.uid, self.pool = next(_uids), pool

    def __del__(self):
        self.pool.end(self.uid)


class CrossKVPool:
    def __init__(self):
        self.keys: list[torch.Tensor] = []      # per layer [capacity, H, S, Dh]
        self.values: list[torch.Tensor] = []
        self.uids: list[int] = []               # slot -> request uid, live slots only
        self.ended: set[int] = set()            # uids whose request ended since the last step

    def layers(self, caches: list[dict], encoder_states: list[torch.Tensor], compute) -> tuple[
            list[tuple[torch.Tensor, torch.Tensor]], CrossRows | None]:
        """Per layer (K, V) [n, H, S, Dh] over the live slots, and each sequence's slot (None: slot i for
        sequence i). caches/encoder_states: per sequence of the step; compute(states [F, S, D]) -> per
        layer (K, V) [F, H, S, Dh] for the requests new to the pool."""
        for cache in caches:
            if "ticket" not in cache or cache["ticket"].pool is not self:
                cache["ticket"] = _Ticket(self)
        members = [c["ticket"].uid for c in caches]
        step = set(members)
        self._retire([u for u in self.uids if u not in step or u in self.ended])
        self.ended.clear()
        fresh, states = [], []
        slot_of = {u: s for s, u in enumerate(self.uids)}
        for uid, state in zip(members, encoder_states):
            if uid not in slot_of:
                slot_of[uid] = len(self.uids) + len(fresh)
                fresh.append(uid)
                states.append(state)
        if fresh:
            self._admit(fresh, compute(torch.stack(states)))
        n = len(self.uids)
        kv = [(k[:n], v[:n]) for k, v in zip(self.keys, self.values)]
        if members == self.uids:
            return kv, None
        return kv, CrossRows.of([slot_of[u] for u in members])

    def end(self, uid: int) -> None:
        """The request ended: its slot is free from the next step; with no live request left the
        buffers go at once (no K/V held between transcriptions)."""
        self.ended.add(uid)
        if all(u in self.ended for u in self.uids):
            self.keys, self.values, self.uids = [], [], []

    def _retire(self, uids: list[int]) -> None:
        for uid in uids:
            slot, last = self.uids.index(uid), len(self.uids) - 1
            if slot != last:            # the last live slot moves into the freed one
                for k, v in zip(self.keys, self.values):
                    k[slot].copy_(k[last])
                    v[slot].copy_(v[last])
                self.uids[slot] = self.uids[last]
            self.uids.pop()
        if not self.uids:
            self.keys, self.values = [], []     # idle: the memory goes back

    def _admit(self, uids: list[int], computed: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        n, needed = len(self.uids), len(self.uids) + len(uids)
        if not self.keys or needed > len(self.keys[0]):
            capacity = max(needed, 2 * len(self.keys[0]) if self.keys else 0)
            grown = [(k.new_empty((capacity, *k.shape[1:])), v.new_empty((capacity, *v.shape[1:])))
                     for k, v in computed]
            for (k, v), (old_k, old_v) in zip(grown, zip(self.keys, self.values)):
                k[:n], v[:n] = old_k[:n], old_v[:n]
            self.keys, self.values = [k for k, _ in grown], [v for _, v in grown]
        for layer, (k, v) in enumerate(computed):
            self.keys[layer][n:needed] = k
            self.values[layer][n:needed] = v
        self.uids += uids
