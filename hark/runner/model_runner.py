"""Owns the model and its KV-cache tensors; turns a scheduled batch into one forward pass."""
from dataclasses import dataclass

import torch

from hark.engine.encoder_cache import EncoderCache
from hark.engine.request import Sequence
from hark.inputs import AudioItem
from hark.lora.rows import AdapterRows, adapter_rows
from hark.runner.attention import AttentionMetadata


@dataclass
class ForwardResult:
    sample_rows: list[int]             # indices (into the scheduled seqs) that produce a token
    logits: torch.Tensor               # [len(sample_rows), V]
    prompt_logits: dict[int, tuple[torch.Tensor, int]]  # seq index -> (logits of its chunk rows, first position)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 encoder_cache_bytes: int):
        self.model = model
        self.block_size = block_size
        self.device = device
        shape = (model.num_kv_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Uninitialised: attention reads only slots already written, and on CPU untouched pages
        # cost no memory until a block is first used.
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        for i, module in enumerate(model.kv_attention_modules()):
            module.k_cache, module.v_cache = self.k_cache[i], self.v_cache[i]
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        # M-RoPE models say where each prompt token sits (model.prompt_positions); others use token indices
        self.model_positions = hasattr(model, "prompt_positions")
        # models that cross-attend to all of a prompt's items (mllama's images) make each request's encoder
        # state from those items' encoder outputs (model.encoder_state); Whisper's is its one clip's output
        self.cross_attends_items = hasattr(model, "encoder_state")
        self.encoder_calls = 0          # batched encoder invocations
        self.encoder_items = 0          # audio items encoded

    @staticmethod
    def num_blocks_for(model, block_size: int, dtype: torch.dtype, memory_bytes: int) -> int:
        per_block = 2 * model.num_kv_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize
        return max(1, memory_bytes // per_block)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """KV copy-on-write for forked beams: block dst gets block src's keys and values, in every layer."""
        if pairs:
            src = torch.tensor([a for a, _ in pairs], device=self.device)
            dst = torch.tensor([b for _, b in pairs], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]

    # --- audio encoder ------------------------------------------------------------------------
    def encode_audio(self, items: list[AudioItem]) -> list[torch.Tensor]:
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
                outputs = self.model.embed_audio(missing)
            self.encoder_calls += 1
            self.encoder_items += len(missing)
            for item, out in zip(missing, outputs):
                found[item.hash] = out
                self.encoder_cache.put(item.hash, out)
        return [found[i.hash] for i in items]

    def _prepare_encoder_states(self, seqs: list[Sequence]) -> None:
        pending = [s.request for s in seqs if s.request.encoder_state is None]
        if pending:
            pending = list({id(r): r for r in pending}.values())
            if self.cross_attends_items:
                outputs = iter(self.encode_audio([item for r in pending for item in r.prompt.audio_items]))
                for request in pending:
                    items = [next(outputs) for _ in request.prompt.audio_items]
                    request.encoder_state = self.model.encoder_state(request.prompt, items)
                return
            states = self.encode_audio([r.prompt.audio_items[0] for r in pending])
            for request, state in zip(pending, states):
                request.encoder_state = state

    def _audio_embeddings(self, seqs, counts, input_ids) -> torch.Tensor | None:
        """inputs_embeds with audio embeddings placed over the placeholder tokens of this chunk."""
        needed: list[tuple[int, int, int, AudioItem]] = []   # (row, start, end) within the item's span
        row = 0
        for seq, n in zip(seqs, counts):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            prompt = seq.request.prompt
            for item, offset in zip(prompt.audio_items, prompt.placeholder_offsets):
                lo, hi = max(start, offset), min(end, offset + item.num_embeds)
                if lo < hi:
                    needed.append((row + lo - start, lo - offset, hi - offset, item))
            row += n
        if not needed:
            return None
        embeds = self.model.get_input_embeddings(input_ids)
        outputs = self.encode_audio([item for *_, item in needed])
        for (row, lo, hi, item), out in zip(needed, outputs):
            if item.is_embed is None:
                embeds[row: row + hi - lo] = out[lo:hi].to(embeds.dtype)
            else:                           # only the marked positions, from the item's embedding count so far
                first = int(item.is_embed[:lo].sum())
                rows = row + item.is_embed[lo:hi].nonzero()[:, 0]
                embeds[rows.to(embeds.device)] = out[first: first + len(rows)].to(embeds.dtype)
        return embeds

    def _model_positions(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """[3, T] positions of this step's tokens, from each request's model-computed prompt positions."""
        rows = []
        for seq, n in zip(seqs, counts):
            request = seq.request
            if request.positions is None:
                request.positions = self.model.prompt_positions(request.prompt)
            rows.append(request.positions.rows(seq.num_computed_tokens, seq.num_computed_tokens + n))
        return torch.cat(rows, dim=1)

    @staticmethod
    def _adapter_rows(seqs: list[Sequence], counts: list[int], output_rows: list[int] | None) -> AdapterRows | None:
        """The LoRA adapter of each row of this step (None when no sequence has one)."""
        if all(s.request.lora_request is None for s in seqs):
            return None
        ids = [i for s, n in zip(seqs, counts) for i in [s.request.lora_int_id] * n]
        return AdapterRows.of(ids, output_rows)

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], counts: list[int]) -> ForwardResult:
        bs = self.block_size
        input_ids, positions, slots, query_start, context_lens, tables = [], [], [], [0], [], []
        sample_rows, logit_rows, prompt_spans = [], [], {}
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            if not self.model_positions:
                positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            tables.append(torch.tensor(table, dtype=torch.long))
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(end, seq.num_prompt_tokens - 1)     # rows predicting prompt tokens 1..
                prompt_spans[i] = (len(logit_rows), last - start, start)
                logit_rows.extend(range(query_start[-2], query_start[-2] + last - start))
            if end == seq.num_tokens:
                sample_rows.append(i)
        sample_logit_start = len(logit_rows)
        logit_rows.extend(query_start[i + 1] - 1 for i in sample_rows)

        dev = self.device
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), query_start=query_start,
            context_lens=context_lens, block_tables=tables, block_size=bs)
        inputs_embeds = None
        if self.model.is_encoder_decoder or self.cross_attends_items:
            self._prepare_encoder_states(seqs)
            meta.encoder_states = [s.request.encoder_state for s in seqs]
            meta.cross_caches = [s.request.cross_cache for s in seqs]
        elif any(s.request.prompt.audio_items for s in seqs):
            inputs_embeds = self._audio_embeddings(seqs, counts, ids)
        reorder = None
        if logit_rows != list(range(len(input_ids))):
            if len(logit_rows) == len(input_ids):    # all rows out of order (prompt logprobs of several sequences)
                reorder = torch.tensor(logit_rows, dtype=torch.long, device=dev)
            else:
                meta.output_rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        meta.prepare()
        if self.model_positions:
            positions = self._model_positions(seqs, counts).to(dev)
        else:
            positions = torch.tensor(positions, dtype=torch.long, device=dev)
        with adapter_rows(self._adapter_rows(seqs, counts, logit_rows if meta.output_rows is not None else None)):
            hidden = self.model(ids, positions, meta, inputs_embeds=inputs_embeds)
        if reorder is not None:
            hidden = hidden[reorder]
        logits = self.model.compute_logits(hidden) if logit_rows else hidden.new_zeros(0, 0)
        prompt_logits = {i: (logits[a: a + n], first) for i, (a, n, first) in prompt_spans.items()}
        return ForwardResult(sample_rows, logits[sample_logit_start:], prompt_logits)
