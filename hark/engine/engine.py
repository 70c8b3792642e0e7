"""The synchronous engine: add requests, step, collect outputs.

It owns requests, the scheduler, KV blocks, beams, grammars and detokenizing; the model is behind an
executor (hark.executor) that it drives with step records (hark.step) and that answers with token ids
and logprobs.
"""
import itertools
import logging
import time
from functools import cached_property

import torch

from hark.config import EngineConfig
from hark.engine.beam import BeamSearch
from hark.engine.detokenizer import Detokenizer, find_stop_string
from hark.engine.kv_cache import KVCacheManager
from hark.engine.request import Request, Sequence, SequenceStatus
from hark.engine.scheduler import Scheduler
from hark.engine.structured_output import StructuredOutputs
from hark.inputs import ProcessedPrompt
from hark.lora.adapter import LoRAAdapter
from hark.lora.manager import LoRAManager
from hark.lora.request import LoRARequest
from hark.outputs import CompletionOutput, RequestMetrics, RequestOutput
from hark.sampling import SamplingParams
from hark.step import ModelRunnerOutput, NewRequest, NewSequence, ScheduledSequence, SchedulerOutput

logger = logging.getLogger("hark")


class LLMEngine:
    def __init__(self, config: EngineConfig, make_executor):
        """make_executor(config): the executor that loads the model (hark.executor.Executor)."""
        self.config = config
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.executor = make_executor(config)
        self.loaded = self.executor.loaded
        self.is_encoder_decoder = self.executor.is_encoder_decoder
        self.tokenizer = self.loaded.tokenizer
        self.processor = self.loaded.processor
        if hasattr(self.processor, "configure"):        # audio limits, media policy, mm embeds
            self.processor.configure(config)
        self.eos_token_ids = self.loaded.eos_token_ids
        self.vocab_size = self._vocab_size()
        model_max = self.executor.max_positions or getattr(
            self.loaded.hf_config, "max_position_embeddings", None) or 2048
        if config.max_model_len is None:
            config.max_model_len = model_max
        elif config.max_model_len > model_max:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's {model_max} positions.")
        self.max_model_len = config.max_model_len

        bs = config.block_size
        blocks_per_seq = -(-self.max_model_len // bs)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            fit = max(1, config.kv_cache_memory_bytes // self.executor.kv_block_bytes(bs))
            num_blocks = min(fit, config.max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            raise ValueError(f"the KV cache ({num_blocks} blocks of {bs} tokens) cannot hold one sequence of "
                             f"max_model_len={self.max_model_len}; lower max_model_len or raise the KV memory.")
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        self.executor.init_kv_cache(num_blocks, bs, self.eos_token_ids)
        self.lora = self.executor.lora_manager(config.max_lora_rank, config.max_cpu_loras or config.max_loras
                                               ) if config.enable_lora else None
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras if config.enable_lora else None)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._finished_request_ids: list[str] = []     # for the runner, with the next step record
        self._block_copies: list[tuple[int, int]] = []   # beam forks' KV copies, run before the next forward
        if hasattr(self.processor, "audio_tokens"):
            logger.info("hark engine: the KV cache holds %d concurrent requests with 30 s of audio",
                        self.max_concurrent_audio_requests())
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._rng = torch.Generator()        # draws the seeds of requests that name none
        if config.seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(config.seed)
        logger.info("hark engine: %s, %d KV blocks × %d tokens (%.0f MiB), max_model_len %d",
                    self.loaded.model_path, num_blocks, bs,
                    num_blocks * self.executor.kv_block_bytes(bs) / 2**20, self.max_model_len)

    def _vocab_size(self) -> int:
        cfg = self.loaded.hf_config
        if hasattr(cfg, "get_text_config"):         # transformers configs, nested ones too (Qwen2.5-Omni)
            cfg = cfg.get_text_config()
        else:
            cfg = getattr(cfg, "text_config", None) or cfg
        return max(cfg.vocab_size, len(self.tokenizer))

    @property
    def hf_config(self):
        """The checkpoint's config (transformers' PretrainedConfig)."""
        return self.loaded.hf_config

    @property
    def generation_config(self):
        return self.loaded.generation_config

    @property
    def model_path(self) -> str:
        return self.loaded.model_path

    @property
    def lora_enabled(self) -> bool:
        return self.lora is not None

    @cached_property
    def structured_outputs(self) -> StructuredOutputs:
        """Grammar compiler and matchers for structured outputs, built on first use."""
        return StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)

    def max_concurrent_audio_requests(self, audio_s: float = 30.0, text_tokens: int = 64,
                                      max_tokens: int = 256) -> int:
        """How many requests of audio_s seconds of audio, text_tokens of text and max_tokens of output
        the KV cache holds at once (the scheduler admits requests while their blocks fit)."""
        audio_tokens = self.processor.audio_tokens(audio_s) if hasattr(self.processor, "audio_tokens") else 0
        tokens = min(audio_tokens + text_tokens + max_tokens, self.max_model_len)
        blocks = -(-tokens // self.kv.block_size)
        return min(self.kv.num_blocks // blocks, self.scheduler.max_num_seqs)

    # --- input processing ---------------------------------------------------------------------
    def process_prompt(self, prompt) -> ProcessedPrompt:
        if self.processor is not None:
            processed = self.processor.process(prompt)
        elif isinstance(prompt, str):
            processed = ProcessedPrompt(self.tokenizer.encode(prompt), prompt=prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            processed = ProcessedPrompt(list(prompt["prompt_token_ids"]), prompt=prompt.get("prompt"))
        elif isinstance(prompt, dict) and "prompt" in prompt:
            if prompt.get("multi_modal_data"):
                raise ValueError("this model takes no audio: multi_modal_data is not supported for it.")
            processed = ProcessedPrompt(self.tokenizer.encode(prompt["prompt"]), prompt=prompt["prompt"])
        else:
            raise ValueError("a prompt must be a string, {'prompt': str, ...} or {'prompt_token_ids': [...]}.")
        ids = processed.prompt_token_ids
        if not ids:
            raise ValueError("prompt is empty: it must hold at least one token.")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size}).")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             f"so it must be at most {self.max_model_len - 1} tokens.")
        return processed

    # --- LoRA adapters (vLLM's LLMEngine methods) -----------------------------------------------
    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True (hark serve --enable-lora).")
        return self.lora

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Loads a peft adapter; ValueError if it does not fit the model or the LoRA limits. `adapter`:
        what read_lora returned for it, when it was read ahead (the server reads off the engine thread)."""
        return self._lora_manager().add_lora(lora_request, adapter)

    def read_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Reads and checks an adapter without loading it (safe from any thread)."""
        return self._lora_manager().read(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._lora_manager().remove_lora(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self._lora_manager().pin_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self._lora_manager().list_loras()

    # --- requests -----------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None,
                    processed: ProcessedPrompt | None = None, lora_request: LoRARequest | None = None) -> str:
        """Validates and queues a request. Raises ValueError before anything is scheduled."""
        params.validate()
        if params.beam_width > self.scheduler.max_num_seqs:
            raise ValueError(f"beam_width={params.beam_width} exceeds max_num_seqs={self.scheduler.max_num_seqs}: "
                             f"every beam is a running sequence.")
        processed = processed or self.process_prompt(prompt)
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        grammar = self.structured_outputs.compile(params.structured_outputs) if params.structured_outputs else None
        n_prompt = len(processed.prompt_token_ids)
        request = Request(request_id, processed, params, lora_request=lora_request)
        request.metrics = RequestMetrics(arrival_time=time.time(), num_prompt_tokens=n_prompt)
        if self.is_encoder_decoder or self.executor.cross_attends_items:     # every token sees the items
            request.cache_salt = "\0".join(item.hash for item in processed.mm_items) or None
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        if params.uses_beam_search:
            stops = set(params.stop_token_ids)
            request.beam = BeamSearch(params.beam_width, float(params.length_penalty), params.patience,
                                      stops | (set() if params.ignore_eos else set(self.eos_token_ids)), stops)
        parent = None
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else int(
                torch.randint(0, 2**62, (1,), generator=self._rng))
            seq = Sequence(next(self._seq_ids), request, index, list(processed.prompt_token_ids), n_prompt,
                           seed=None if params.greedy else seed, parent=parent)
            if params.logprobs is not None:
                seq.logprobs = []
            if grammar is not None:
                seq.grammar = self.structured_outputs.xgr.GrammarMatcher(grammar)
            self.detokenizer.start(seq)
            request.seqs.append(seq)
            parent = parent or seq
        if request.beam is not None:
            request.beam.live = list(request.seqs)
        if lora_request is not None:        # the last check (a bad adapter): it holds the adapter from here on
            request.lora_cache_key = self._lora_manager().acquire(lora_request)
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        if request.beam is not None:
            self._end_beam_search(request)
        self._release(request)
        if not self.requests:
            self._free_finished()
        return self._output(request)

    def _release(self, request: Request) -> None:
        """A request that is done lets go of its runner state (encoder output, cross-attention K/V) and its
        LoRA adapter."""
        if request.announced:
            self._finished_request_ids.append(request.request_id)
        if request.lora_request is not None and request.lora_cache_key is not None:
            self.lora.release(request.lora_int_id)
            request.lora_cache_key = None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one forward over the scheduled batch; returns outputs of the requests that moved."""
        batch = self.scheduler.schedule()
        if batch.empty:
            self._free_finished()
            return []
        now = time.time()
        for seq in batch.seqs:
            m = seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
                m.num_cached_tokens = seq.num_cached_tokens
        record, sampling, beams, prompt = self._step_record(batch.seqs, batch.num_new_tokens)
        result = self.executor.execute(record)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.commit_full_blocks(seq)
        for seq in prompt:
            seq.request.prompt_logprobs.extend(result.prompt_logprobs[seq.seq_id])
        moved = {}
        for row, seq in enumerate(sampling):
            self._append_token(seq, result.token_ids[row], result.logprobs[row], result.top_logprobs[row])
            moved[id(seq.request)] = seq.request
        if beams:
            for request in self._step_beams(beams, result):
                moved[id(request)] = request
        outputs = []
        for request in moved.values():
            if request.finished:
                request.metrics.finished_time = time.time()
                self.requests.pop(request.request_id, None)
                self._release(request)
            outputs.append(self._output(request))
        if not self.requests:
            self._free_finished()
        return outputs

    def _step_record(self, seqs: list[Sequence], counts: list[int]):
        """The step record of a batch, and its sequences that sample, that give beam candidates and that
        get prompt logprobs (in the orders of the runner's answer)."""
        scheduled, new_requests, new_seqs = [], [], []
        sampling, beams, prompt = [], [], []
        for seq, n in zip(seqs, counts):
            request = seq.request
            if not seq.announced:
                if not request.announced:
                    request.announced = True
                    new_requests.append(NewRequest(request.request_id, request.prompt, request.lora_int_id))
                seq.announced = True
                new_seqs.append(NewSequence(seq.seq_id, request.request_id, request.params, seq.num_prompt_tokens,
                                            seq.seed))
            start = seq.num_computed_tokens
            end = start + n
            s = ScheduledSequence(seq.seq_id, start, seq.token_ids[start:end], seq.block_table)
            params = request.params
            if params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1 and seq.index == 0 \
                    and len(request.prompt_logprobs) == start + 1:      # not again after a preemption
                s.prompt_logprob_targets = seq.token_ids[start + 1: min(end, seq.num_prompt_tokens - 1) + 1]
                prompt.append(seq)
            if end == seq.num_tokens:
                s.sample = True
                if params.uses_penalties or params.logits_processors:
                    s.history = seq.token_ids
                if request.beam is not None:
                    s.num_candidates = request.beam.num_candidates
                    beams.append(seq)
                else:
                    sampling.append(seq)
            scheduled.append(s)
        grammar_mask = self.structured_outputs.bitmask([s.grammar for s in sampling]) if any(
            s.grammar is not None for s in sampling) else None
        record = SchedulerOutput(scheduled, new_requests, new_seqs, self._finished_request_ids,
                                 self.scheduler.take_finished(), self._block_copies, grammar_mask)
        self._finished_request_ids, self._block_copies = [], []
        return record, sampling, beams, prompt

    def _free_finished(self) -> None:
        """Tells the runner at once which requests and sequences ended (an idle engine sends no step)."""
        finished = self.scheduler.take_finished()
        if finished or self._finished_request_ids:
            self.executor.execute(SchedulerOutput(finished_request_ids=self._finished_request_ids,
                                                  finished_seq_ids=finished))
            self._finished_request_ids = []
        self._block_copies = []             # no sequence is left to read them

    # --- multimodal encoders and dense decoder runs (transcription) -------------------------------
    def encode(self, items: list) -> list[torch.Tensor]:
        """Encoder outputs of MultiModalItems (Whisper: [1500, D] per window), from the encoder cache."""
        return self.executor.encode(items)

    def decode_dense(self, encoder_states: torch.Tensor, tokens: torch.Tensor, return_cross_attn: bool = False):
        """Whisper's decoder over whole token rows [B, L], no cache -> (logits [B, L, V], cross-attention
        weights per layer or None)."""
        return self.executor.decode_dense(encoder_states, tokens, return_cross_attn)

    def _append_token(self, seq: Sequence, token: int, logprob: float, top) -> None:
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            seq.logprobs.append(top)
        m = seq.request.metrics
        if m.first_token_time is None:
            m.first_token_time = time.time()
        new_text = self.detokenizer.step(seq)
        params = seq.params
        reason = stop_reason = None
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            # only when other constraints (allowed_token_ids, logits processors) left no token it allows
            logger.warning("request %s: its grammar refused token %d; the output ends here",
                           seq.request.request_id, token)
            reason = "abort"
        elif seq.grammar is not None and seq.grammar.is_terminated():
            reason = "stop"
        elif seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                reason, stop_reason = "stop", token
            elif not params.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            else:
                stop = find_stop_string(seq, len(new_text))
                if stop is not None:
                    reason, stop_reason = "stop", stop
        if reason is None:
            if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            if not isinstance(stop_reason, str):          # a stop string already cut the text
                self.detokenizer.flush(seq)
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)

    # --- beam search --------------------------------------------------------------------------
    def _step_beams(self, seqs: list[Sequence], result: ModelRunnerOutput) -> list[Request]:
        """Takes the candidates of beams that reached this step; moves every request whose live beams
        all did one token on. Returns the requests that finished."""
        requests = {}
        for seq, v, t in zip(seqs, result.beam_logprobs, result.beam_token_ids):
            n = seq.request.beam.num_candidates
            seq.request.beam.pending[seq] = (v[:n], t[:n])
            requests[id(seq.request)] = seq.request
        finished = []
        copies: list[tuple[int, int]] = []
        for request in requests.values():
            if request.beam.ready:
                copies += self._advance_beams(request)
                if request.beam.done:
                    finished.append(request)
        self._block_copies += copies
        return finished

    def _advance_beams(self, request: Request) -> list[tuple[int, int]]:
        """One beam-search step of request: the chosen candidates continue (a beam chosen twice or more
        forks), the others are dropped and free their blocks. Returns the KV blocks forks must copy."""
        beam = request.beam
        length = beam.live[0].num_tokens + 1          # beams advance together: all have the same length
        at_limit = length >= self.max_model_len or (
            request.params.max_tokens is not None and length - beam.live[0].num_prompt_tokens >= request.params.max_tokens)
        chosen = beam.select(beam.candidates(), at_limit)
        m = request.metrics
        if m.first_token_time is None:
            m.first_token_time = time.time()
        taken = {c.seq for c in chosen}
        for seq in beam.live:                          # dropped beams free their blocks first
            if seq not in taken:
                self.scheduler.finish(seq)
        targets, copies, used = [], [], set()
        for c in chosen:                               # forks before any token is appended
            if c.seq not in used:
                used.add(c.seq)
                targets.append(c.seq)
                continue
            child, copy = self._fork(c.seq)
            targets.append(child)
            if copy is not None:
                copies.append(copy)
        for c, seq in zip(chosen, targets):
            seq.token_ids.append(c.token)
            seq.cumulative_logprob = c.cum_logprob
            if seq.logprobs is not None:
                seq.logprobs.append(c.logprob_entry)
        beam.live = request.seqs = targets
        if beam.done:
            self._end_beam_search(request)
        return copies

    def _fork(self, parent: Sequence) -> tuple[Sequence, tuple[int, int] | None]:
        """A new beam with parent's tokens and KV blocks (shared; the last partial one copied)."""
        child = Sequence(next(self._seq_ids), parent.request, 0, list(parent.token_ids), parent.num_prompt_tokens,
                         cumulative_logprob=parent.cumulative_logprob,
                         logprobs=None if parent.logprobs is None else list(parent.logprobs))
        copy = self.kv.fork(parent, child) if parent.status == SequenceStatus.RUNNING else None
        self.scheduler.add_fork(child)
        return child, copy

    def _end_beam_search(self, request: Request) -> None:
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
        request.seqs = []
        request.beam.done = True
        if request.beam.admitted:
            self.scheduler.release_seats(request.beam.width)

    def _output(self, request: Request) -> RequestOutput:
        if request.beam is not None:
            outs = [self._beam_output(i, h, request.params) for i, h in enumerate(request.beam.results())]
        else:
            outs = [CompletionOutput(s.index, s.text, s.output_token_ids, s.cumulative_logprob, s.logprobs,
                                     s.finish_reason, s.stop_reason) for s in request.seqs]
        p = request.prompt
        return RequestOutput(request.request_id, p.prompt, p.prompt_token_ids, outs, request.finished,
                             prompt_logprobs=request.prompt_logprobs, metrics=request.metrics,
                             num_cached_tokens=request.metrics.num_cached_tokens,
                             encoder_prompt_token_ids=p.encoder_prompt_token_ids,
                             encoder_prompt="" if self.is_encoder_decoder else None)

    def _beam_output(self, index: int, h, params: SamplingParams) -> CompletionOutput:
        shown = h.token_ids if h.finish_reason != "stop" or params.include_stop_str_in_output else h.token_ids[:-1]
        text = self.detokenizer.decode(shown, params.skip_special_tokens)
        return CompletionOutput(index, text, h.token_ids, h.cum_logprob, h.logprobs, h.finish_reason, h.stop_reason)

    def shutdown(self) -> None:
        """Stops the executor's tensor-parallel worker ranks (nothing to do on one rank)."""
        self.executor.shutdown()

    # --- stats --------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.kv.usage,
            "kv_free_blocks": self.kv.num_free_blocks,
            "kv_total_blocks": self.kv.num_blocks,
            "prefix_cache_hit_rate": self.kv.prefix_hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.executor.stats(),
            "max_concurrent_30s_audio_requests": self.max_concurrent_audio_requests(),
            "lora_adapters_loaded": len(self.lora.list_loras()) if self.lora is not None else 0,
            "lora_adapters_running": len({s.request.lora_int_id for s in self.scheduler.running} - {0}),
        }
