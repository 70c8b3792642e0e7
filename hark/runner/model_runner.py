"""Owns the model, its KV-cache tensors and all per-request device state; runs one step record.

Per request id: the prompt and its multimodal items, the encoder output (encoder-decoder models), the
model's cross-attention K/V, M-RoPE positions. Per sequence id: sampling params and the seeded
generator. A step's finished ids drop them (hark.step describes the contract). The runner samples:
the engine gets token ids and logprobs back, never logits.
"""
import torch

from hark.inputs import MultiModalItem
from hark.lora.rows import AdapterRows, adapter_rows
from hark.runner import sampler
from hark.runner.attention import SDPABackend
from hark.runner.encoder_cache import EncoderCache
from hark.runner.state import RequestState, SequenceState
from hark.step import GrammarMask, ModelRunnerOutput, ScheduledSequence, SchedulerOutput


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 encoder_cache_bytes: int, eos_token_ids: list[int]):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        shape = (model.num_kv_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Uninitialised: attention reads only slots already written, and on CPU untouched pages
        # cost no memory until a block is first used.
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        for i, module in enumerate(model.kv_attention_modules()):
            module.k_cache, module.v_cache = self.k_cache[i], self.v_cache[i]
        self.attention = SDPABackend(block_size, device)
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        # M-RoPE models say where each prompt token sits (model.prompt_positions); others use token indices
        self.model_positions = hasattr(model, "prompt_positions")
        # models that cross-attend to all of a prompt's items (mllama's images) make each request's encoder
        # state from those items' encoder outputs (model.encoder_state); Whisper's is its one clip's output
        self.cross_attends_items = hasattr(model, "encoder_state")
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[int, SequenceState] = {}
        self.encoder_calls = 0          # batched encoder invocations
        self.encoder_items = 0          # multimodal items encoded

    @staticmethod
    def block_bytes(model, block_size: int, dtype: torch.dtype) -> int:
        return 2 * model.num_kv_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """KV copy-on-write for forked beams: block dst gets block src's keys and values, in every layer."""
        if pairs:
            src = torch.tensor([a for a, _ in pairs], device=self.device)
            dst = torch.tensor([b for _, b in pairs], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]

    # --- per-request and per-sequence state ----------------------------------------------------
    def _update_states(self, step: SchedulerOutput) -> None:
        for seq_id in step.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for request_id in step.finished_request_ids:       # before new ones: an id may be used again
            self.requests.pop(request_id, None)
        for r in step.new_requests:
            self.requests[r.request_id] = RequestState(r.prompt, r.lora_id)
        for s in step.new_seqs:
            generator = None if s.seed is None else torch.Generator().manual_seed(s.seed)
            self.seqs[s.seq_id] = SequenceState(self.requests[s.request_id], s.params, s.num_prompt_tokens, generator)

    # --- multimodal encoders ------------------------------------------------------------------
    def encode(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """Encoder outputs for items, from the cache or one batched encoder call for the misses."""
        found = {i.hash: i.embeddings for i in items if i.embeddings is not None}   # precomputed
        missing = []
        for item in items:
            if item.hash not in found:           # taken before new entries may evict it
                found[item.hash] = self.encoder_cache.get(item.hash)
                if found[item.hash] is None:
                    missing.append(item)
        if missing:
            with torch.inference_mode():
                outputs = self.model.embed_multimodal(missing)
            self.encoder_calls += 1
            self.encoder_items += len(missing)
            for item, out in zip(missing, outputs):
                found[item.hash] = out
                self.encoder_cache.put(item.hash, out)
        return [found[i.hash] for i in items]

    def _prepare_encoder_states(self, requests: list[RequestState]) -> None:
        pending = [r for r in requests if r.encoder_state is None]
        if pending:
            pending = list({id(r): r for r in pending}.values())
            if self.cross_attends_items:
                outputs = iter(self.encode([item for r in pending for item in r.prompt.mm_items]))
                for request in pending:
                    items = [next(outputs) for _ in request.prompt.mm_items]
                    request.encoder_state = self.model.encoder_state(request.prompt, items)
                return
            states = self.encode([r.prompt.mm_items[0] for r in pending])
            for request, state in zip(pending, states):
                request.encoder_state = state

    def _mm_embeddings(self, seqs: list[ScheduledSequence], requests: list[RequestState],
                       input_ids: torch.Tensor) -> torch.Tensor | None:
        """inputs_embeds with encoder embeddings placed over the placeholder tokens of this chunk."""
        needed: list[tuple[int, int, int, MultiModalItem]] = []   # (row, start, end) within the item's span
        row = 0
        for seq, request in zip(seqs, requests):
            start, end = seq.start, seq.start + len(seq.token_ids)
            prompt = request.prompt
            for item, offset in zip(prompt.mm_items, prompt.placeholder_offsets):
                lo, hi = max(start, offset), min(end, offset + item.num_embeds)
                if lo < hi:
                    needed.append((row + lo - start, lo - offset, hi - offset, item))
            row += end - start
        if not needed:
            return None
        embeds = self.model.get_input_embeddings(input_ids)
        outputs = self.encode([item for *_, item in needed])
        for (row, lo, hi, item), out in zip(needed, outputs):
            if item.is_embed is None:
                embeds[row: row + hi - lo] = out[lo:hi].to(embeds.dtype)
            else:                           # only the marked positions, from the item's embedding count so far
                first = int(item.is_embed[:lo].sum())
                rows = row + item.is_embed[lo:hi].nonzero()[:, 0]
                embeds[rows.to(embeds.device)] = out[first: first + len(rows)].to(embeds.dtype)
        return embeds

    def _model_positions(self, seqs: list[ScheduledSequence], requests: list[RequestState]) -> torch.Tensor:
        """[3, T] positions of this step's tokens, from each request's model-computed prompt positions."""
        rows = []
        for seq, request in zip(seqs, requests):
            if request.positions is None:
                request.positions = self.model.prompt_positions(request.prompt)
            rows.append(request.positions.rows(seq.start, seq.start + len(seq.token_ids)))
        return torch.cat(rows, dim=1)

    @staticmethod
    def _adapter_rows(seqs: list[ScheduledSequence], requests: list[RequestState],
                      output_rows: list[int] | None) -> AdapterRows | None:
        """The LoRA adapter of each row of this step (None when no sequence has one)."""
        if not any(r.lora_id for r in requests):
            return None
        ids = [i for s, r in zip(seqs, requests) for i in [r.lora_id] * len(s.token_ids)]
        return AdapterRows.of(ids, output_rows)

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(step)
        self.copy_blocks(step.block_copies)
        seqs = step.seqs
        if not seqs:
            return ModelRunnerOutput()
        states = [self.seqs[s.seq_id] for s in seqs]
        requests = [s.request for s in states]
        meta = self.attention.build_metadata(seqs)
        query_start = meta.query_start
        input_ids, positions = [], []
        sample_rows, logit_rows, prompt_spans = [], [], {}
        for i, seq in enumerate(seqs):
            input_ids.extend(seq.token_ids)
            if not self.model_positions:
                positions.extend(range(seq.start, seq.start + len(seq.token_ids)))
            if seq.prompt_logprob_targets:                 # rows predicting prompt tokens start + 1..
                n = len(seq.prompt_logprob_targets)
                prompt_spans[seq.seq_id] = (len(logit_rows), n, seq.prompt_logprob_targets)
                logit_rows.extend(range(query_start[i], query_start[i] + n))
            if seq.sample:
                sample_rows.append(i)
        sample_logit_start = len(logit_rows)
        logit_rows.extend(query_start[i + 1] - 1 for i in sample_rows)

        dev = self.device
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        inputs_embeds = None
        if self.model.is_encoder_decoder or self.cross_attends_items:
            self._prepare_encoder_states(requests)
            meta.encoder_states = [r.encoder_state for r in requests]
            meta.cross_caches = [r.cross_cache for r in requests]
        elif any(r.prompt.mm_items for r in requests):
            inputs_embeds = self._mm_embeddings(seqs, requests, ids)
        reorder = None
        if logit_rows != list(range(len(input_ids))):
            if len(logit_rows) == len(input_ids):    # all rows out of order (prompt logprobs of several sequences)
                reorder = torch.tensor(logit_rows, dtype=torch.long, device=dev)
            else:
                meta.output_rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        if self.model_positions:
            positions = self._model_positions(seqs, requests).to(dev)
        else:
            positions = torch.tensor(positions, dtype=torch.long, device=dev)
        with adapter_rows(self._adapter_rows(seqs, requests, logit_rows if meta.output_rows is not None else None)):
            hidden = self.model(ids, positions, meta, inputs_embeds=inputs_embeds)
        if reorder is not None:
            hidden = hidden[reorder]
        logits = self.model.compute_logits(hidden) if logit_rows else hidden.new_zeros(0, 0)
        out = ModelRunnerOutput()
        for seq_id, (a, n, targets) in prompt_spans.items():
            k = self.seqs[seq_id].params.prompt_logprobs
            out.prompt_logprobs[seq_id] = sampler.prompt_logprobs(logits[a: a + n], targets, k)
        if sample_rows:
            self._sample(seqs, states, sample_rows, logits[sample_logit_start:], step.grammar_mask, out)
        return out

    def _sample(self, seqs: list[ScheduledSequence], states: list[SequenceState], sample_rows: list[int],
                logits: torch.Tensor, grammar_mask: GrammarMask | None, out: ModelRunnerOutput) -> None:
        """Next tokens of the rows that sample; beam-search rows give their best candidates instead."""
        for i in sample_rows:
            seq, state = seqs[i], states[i]
            state.num_tokens = seq.start + len(seq.token_ids)
            if seq.history is not None:
                state.token_ids = seq.history
        plain = [r for r, i in enumerate(sample_rows) if not seqs[i].num_candidates]
        if plain:
            rows = logits if len(plain) == len(sample_rows) else logits[plain]
            sampled = sampler.sample(rows, [states[sample_rows[r]] for r in plain], self.eos_token_ids, grammar_mask)
            out.token_ids, out.logprobs, out.top_logprobs = sampled.token_ids, sampled.logprobs, sampled.top_logprobs
        beams = [r for r, i in enumerate(sample_rows) if seqs[i].num_candidates]
        if beams:
            k = max(seqs[sample_rows[r]].num_candidates for r in beams)
            out.beam_logprobs, out.beam_token_ids = sampler.beam_candidates(
                logits[beams], [states[sample_rows[r]] for r in beams], self.eos_token_ids, k)
