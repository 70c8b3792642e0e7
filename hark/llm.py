"""The offline API, as in vLLM: LLM(model=...).generate / chat / transcribe."""
from typing import Sequence as Seq

import torch

from hark.engine.engine import LLMEngine
from hark.engine_args import EngineArgs
from hark.executor import Executor
from hark.lora.request import LoRARequest
from hark.outputs import RequestOutput
from hark.beam_search import BeamSearchOutput, BeamSearchSequence
from hark.sampling import BeamSearchParams, SamplingParams


def set_num_threads(n: int) -> None:
    """torch's intra-op threads (default: one per physical core)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be an integer ≥ 1, got {n!r}.")
    torch.set_num_threads(n)


class LLM:
    """LLM(model, **engine_args): the arguments are EngineArgs' fields (model, dtype, max_model_len,
    max_num_seqs, seed, limit_mm_per_prompt, num_threads, ...); unknown ones raise ValueError listing the
    accepted."""

    def __init__(self, model: str | None = None, **kwargs):
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        if args.num_threads is not None:
            set_num_threads(args.num_threads)
        self.llm_engine = LLMEngine(args.engine_config(), Executor)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """lora_request: one adapter for every prompt, or a list with one (or None: the base model) per
        prompt; the engine needs enable_lora=True."""
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
        return self._run(prompts, params, use_tqdm, per_prompt(lora_request, len(prompts)))

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False,
                    lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: the beam_width best sequences of each prompt, all prompts' beams in one
        continuous batch (see hark.engine.beam for the search and its ranking)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        sampling = params.sampling_params()
        decode = self.llm_engine.detokenizer.decode
        outputs = []
        for out in self._run(prompts, [sampling] * len(prompts), use_tqdm, per_prompt(lora_request, len(prompts))):
            sequences = []
            for c in out.outputs:
                tokens = list(out.prompt_token_ids) + list(c.token_ids)
                shown = tokens[:-1] if c.finish_reason == "stop" else tokens
                sequences.append(BeamSearchSequence(tokens=tokens, logprobs=c.logprobs, cum_logprob=c.cumulative_logprob,
                                                    text=decode(shown, False), finish_reason=c.finish_reason,
                                                    stop_reason=c.stop_reason))
            outputs.append(BeamSearchOutput(sequences))
        return outputs

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool,
             loras: list[LoRARequest | None]) -> list[RequestOutput]:
        engine = self.llm_engine
        processed = [engine.process_prompt(p) for p in prompts]   # all validation before scheduling
        for p in params:
            p.validate()
        for lora in dict.fromkeys(lora for lora in loras if lora is not None):
            engine.add_lora(lora)
        ids = [engine.add_request(prompt, p, processed=pp, lora_request=lora)
               for prompt, p, pp, lora in zip(prompts, params, processed, loras)]
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
             lora_request: LoRARequest | None = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of OpenAI-style messages) or a list of conversations."""
        from hark.chat import build_chat_prompt
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [build_chat_prompt(self.llm_engine, conv, chat_template, add_generation_prompt,
                                     chat_template_kwargs or {}) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def transcribe(self, audio, **kwargs):
        """Transcribes (or translates) audio of any length with a Whisper model, see hark.transcribe;
        with an audio LLM that has a transcription prompt (Voxtral), see hark.transcribe.prompted."""
        if hasattr(self.llm_engine.processor, "transcription_prompt"):
            from hark.transcribe.prompted import transcribe_by_prompt
            return transcribe_by_prompt(self, audio, **kwargs)
        from hark.transcribe import transcribe
        return transcribe(self, audio, **kwargs)


def per_prompt(lora_request, n: int) -> list:
    """One adapter (or None) for every prompt, or a list with one per prompt."""
    if not isinstance(lora_request, (list, tuple)):
        return [lora_request] * n
    if len(lora_request) != n:
        raise ValueError(f"got {len(lora_request)} lora_requests for {n} prompts.")
    return list(lora_request)
