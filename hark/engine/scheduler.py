"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step has a token budget (max_num_batched_tokens) and a cap on running sequences
(max_num_seqs). Running sequences go first (a decode costs one token, an unfinished prefill takes
what the budget leaves: chunked prefill); then waiting ones are admitted in arrival order while
budget, sequence slots and KV blocks for their whole remaining prompt last. When a running sequence needs a block and none is free,
the newest running sequence is preempted: its blocks are freed and it is recomputed later from its
tokens, so its output does not change.

With LoRA (max_loras set), the running sequences use at most max_loras adapters: a waiting sequence
whose adapter would be one more waits, and the others pass it. A batch is ordered by adapter, so each
adapter's rows are one run for the grouped low-rank products.

Beam search: a request's beams are sequences like any other. Its first sequence is admitted only
when `beam_width` seats are free, and the request keeps those seats (`reserved` counts the ones its
live beams do not fill) until it ends, so forking never exceeds max_num_seqs. A beam that has reported
its candidates has no token to compute until the request's other beams have: it is skipped (and
preempted when a waiting sibling needs its blocks).
"""
from collections import deque
from dataclasses import dataclass

from hark.engine.kv_cache import KVCacheManager
from hark.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None):
        self.kv = kv
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.reserved = 0           # seats held by beam-search requests beyond their running beams
        self.finished_seq_ids: list[int] = []   # finished since the last take_finished (for the runner)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule()
        while batch.empty and self.waiting and self.running:
            # Only beams waiting for a sibling that has no room to run: make room (their candidates
            # are kept, so the sibling's step still completes the request's step).
            victim = self.running.pop()
            self._preempt(victim)
            self.waiting.remove(victim)      # behind the sibling it makes room for
            self.waiting.append(victim)
            batch = self._schedule()
            batch.preempted.append(victim)
        return batch

    def _schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:              # a beam waiting for its request's other beams
                i += 1
                continue
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()            # the newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
                counts.append(n)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing newer is left running

        if not preempted:
            skipped = []
            adapters = {s.request.lora_int_id for s in self.running} - {0}
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                beam = seq.request.beam
                if beam is not None and not beam.admitted and \
                        len(self.running) + self.reserved + beam.width > self.max_num_seqs:
                    break           # a beam search starts only with seats for all its beams
                if seq.parent is not None and not seq.parent.prefilled and not seq.parent.is_finished:
                    skipped.append(self.waiting.popleft())      # wait for the parent's prompt KV
                    continue
                adapter = seq.request.lora_int_id
                if adapter and adapter not in adapters and len(adapters) >= (self.max_loras or 0):
                    skipped.append(self.waiting.popleft())      # its adapter would be one too many
                    continue
                if not seq.block_table:
                    self.kv.reuse_prefix(seq)
                remaining = seq.num_tokens - seq.num_computed_tokens
                if self.kv.blocks_needed(seq, remaining) > self.kv.num_free_blocks:
                    break       # admit only what can finish its prefill: long prompts don't thrash
                n = min(remaining, budget)
                if not self.kv.allocate(seq, n):
                    break
                self.waiting.popleft()
                if beam is not None:
                    self.reserved += beam.width - 1 if not beam.admitted else -1
                    beam.admitted = True
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                scheduled.append(seq)
                counts.append(n)
                budget -= n
                if adapter:
                    adapters.add(adapter)
            self.waiting.extendleft(reversed(skipped))
        if self.max_loras is not None and len(scheduled) > 1:
            order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].request.lora_int_id)
            scheduled, counts = [scheduled[i] for i in order], [counts[i] for i in order]
        return ScheduledBatch(scheduled, counts, preempted)

    def add_fork(self, seq: Sequence) -> None:
        """A beam forked from a running one: it runs at once on its own share of its request's seats."""
        self.reserved -= 1
        if seq.num_computed_tokens:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:                       # no KV to share: it recomputes its tokens, on a reserved seat
            self.reserved += 1
            self.waiting.appendleft(seq)

    def release_seats(self, width: int) -> None:
        """A beam-search request ended: its seats (all free by now) go back."""
        self.reserved -= width

    def _preempt(self, seq: Sequence) -> None:
        if seq.request.beam is not None:
            self.reserved += 1
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if seq.request.metrics is not None:
            seq.request.metrics.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence and frees its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
            if seq.request.beam is not None:
                self.reserved += 1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.announced:
            self.finished_seq_ids.append(seq.seq_id)

    def take_finished(self) -> list[int]:
        """The ids of the sequences finished since the last call."""
        ids, self.finished_seq_ids = self.finished_seq_ids, []
        return ids
