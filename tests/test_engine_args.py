"""LLM's arguments as vLLM code passes them: EngineArgs, seed=None, vLLM-only settings, unknown names."""
import logging
from dataclasses import asdict

import pytest

from hark import LLM, EngineArgs, SamplingParams


def test_seed_none_runs_and_samples_differ_between_engines(qwen2_ckpt):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [LLM(qwen2_ckpt[0], seed=None, max_model_len=128, num_kv_blocks=32).generate(["Hello"] * 4, params,
                                                                                       use_tqdm=False)
            for _ in range(2)]
    texts = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert all(len(t) == 12 for run in texts for t in run)
    assert texts[0] != texts[1]          # no fixed seed: each engine draws its own request seeds


def test_engine_args_asdict_round_trip_and_vllm_only_settings_are_noted(qwen2_ckpt, caplog):
    args = EngineArgs(model=qwen2_ckpt[0], max_model_len=128, max_num_seqs=5, limit_mm_per_prompt={"audio": 0},
                      enforce_eager=True, gpu_memory_utilization=0.9, trust_remote_code=True)
    with caplog.at_level(logging.WARNING, logger="hark"):
        llm = LLM(**asdict(args) | {"seed": None})
    notes = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(notes) == 1 and "enforce_eager" in notes[0] and "gpu_memory_utilization" in notes[0]
    assert llm.llm_engine.max_model_len == 128 and llm.llm_engine.scheduler.max_num_seqs == 5
    greedy = SamplingParams(temperature=0, max_tokens=8)
    same = LLM(qwen2_ckpt[0], max_model_len=128).generate("Hi there", greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate("Hi there", greedy, use_tqdm=False)[0].outputs[0].token_ids == same


def test_unknown_argument_lists_the_accepted_ones(qwen2_ckpt):
    with pytest.raises(ValueError, match="unknown engine argument.*max_num_sequences.*accepts: model.*max_num_seqs"):
        LLM(qwen2_ckpt[0], max_num_sequences=4)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(qwen2_ckpt[0], tensor_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(qwen2_ckpt[0], pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="LoRA"):
        LLM(qwen2_ckpt[0], max_model_len=64).generate("x", lora_request=object())


def test_generation_config_folder_replaces_the_models(qwen2_ckpt, tmp_path):
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    llm = LLM(qwen2_ckpt[0], max_model_len=64, generation_config=str(tmp_path))
    assert llm.llm_engine.eos_token_ids == [5, 7]
    with pytest.raises(ValueError, match="generation_config.json"):
        LLM(qwen2_ckpt[0], max_model_len=64, generation_config=str(tmp_path / "none"))
