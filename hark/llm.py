"""The offline API, as in vLLM: LLM(model=...).generate / chat / transcribe."""
from typing import Sequence as Seq

import torch

from hark.config import EngineConfig
from hark.engine.engine import LLMEngine
from hark.outputs import RequestOutput
from hark.sampling import SamplingParams


def set_num_threads(n: int) -> None:
    """torch's intra-op threads (default: one per physical core)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be an integer ≥ 1, got {n!r}.")
    torch.set_num_threads(n)


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, seed: int = 0, limit_mm_per_prompt: dict | None = None,
                 block_size: int = 16, kv_cache_memory_bytes: int = 4 * 2**30, num_kv_blocks: int | None = None,
                 device: str = "auto", num_threads: int | None = None, **kwargs):
        if num_threads is not None:
            set_num_threads(num_threads)
        if model is None:
            from hark.models.default import default_model_path
            model = default_model_path()
        config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              enable_prefix_caching=enable_prefix_caching, seed=seed,
                              limit_mm_per_prompt=limit_mm_per_prompt, block_size=block_size,
                              kv_cache_memory_bytes=kv_cache_memory_bytes, num_kv_blocks=num_kv_blocks,
                              device=device, **kwargs)
        self.llm_engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts.")
        return self._run(prompts, params, use_tqdm)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        processed = [engine.process_prompt(p) for p in prompts]   # all validation before scheduling
        for p in params:
            p.validate()
        ids = [engine.add_request(prompt, p, processed=pp) for prompt, p, pp in zip(prompts, params, processed)]
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        from tqdm import tqdm
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return results

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of OpenAI-style messages) or a list of conversations."""
        from hark.chat import build_chat_prompt
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [build_chat_prompt(self.llm_engine, conv, chat_template, add_generation_prompt,
                                     chat_template_kwargs or {}) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def transcribe(self, audio, **kwargs):
        """Transcribes (or translates) audio of any length with a Whisper model; see hark.transcribe."""
        from hark.transcribe import transcribe
        return transcribe(self, audio, **kwargs)
