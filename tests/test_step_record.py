"""The step records (hark.step) are plain data: pickled to and fro they give the same outputs, they
name no engine or runner object, and the runner's per-request state goes when the requests end."""
import pickle

import numpy as np
import pytest

from hark import LLM, SamplingParams, StructuredOutputsParams

PROMPTS = ["the cat sat", "in the end the", "a", "then the dog"]


def mixed_params() -> list[SamplingParams]:
    """Each thing the record carries: seeded samples (n > 1), logprobs and prompt logprobs, the history
    penalties read, beam search, and a grammar mask."""
    return [SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=10, logprobs=2, prompt_logprobs=2, repetition_penalty=1.3,
                           frequency_penalty=0.5, ignore_eos=True),
            SamplingParams(beam_width=3, max_tokens=6, ignore_eos=True),
            SamplingParams(temperature=0.7, seed=3, max_tokens=12, structured_outputs=StructuredOutputsParams(
                regex="(cat|dog)( (cat|dog)){2}"))]


def outputs(llm: LLM) -> list:
    outs = llm.generate(PROMPTS, mixed_params(), use_tqdm=False)
    return [(o.prompt_logprobs, [(c.token_ids, c.cumulative_logprob, c.logprobs, c.text) for c in o.outputs])
            for o in outs]


def test_pickled_steps_give_the_same_outputs(qwen2_ckpt):
    pytest.importorskip("xgrammar")
    kwargs = dict(block_size=4, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=9, seed=0)   # chunks, preemptions
    want = outputs(LLM(qwen2_ckpt[0], **kwargs))

    llm = LLM(qwen2_ckpt[0], **kwargs)
    engine = llm.llm_engine
    execute, blobs = engine.executor.execute, []

    def through_pickle(step):             # as a worker process would receive it, and answer
        blobs.append(pickle.dumps(step))
        out = pickle.dumps(execute(pickle.loads(blobs[-1])))
        blobs.append(out)
        return pickle.loads(out)
    engine.executor.execute = through_pickle
    assert outputs(llm) == want
    assert engine.scheduler.num_preemptions > 0
    # the records name only hark.step / hark.inputs / hark.sampling / hark.outputs classes
    assert not any(b"hark.engine" in b or b"hark.runner" in b or b"hark.models" in b for b in blobs)
    assert any(b"NewRequest" in b for b in blobs) and any(b"GrammarMask" in b for b in blobs)
    runner = engine.executor.runner
    assert runner.requests == {} and runner.seqs == {}        # all freed by the finished ids


def test_runner_state_is_freed_after_abort_and_reused_ids(qwen2_ckpt):
    llm = LLM(qwen2_ckpt[0], block_size=4)
    engine, runner = llm.llm_engine, llm.llm_engine.executor.runner
    engine.add_request("the cat", SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=50), request_id="a")
    engine.add_request("the dog", SamplingParams(max_tokens=50), request_id="b")
    engine.step()
    engine.step()
    assert set(runner.requests) == {"a", "b"} and len(runner.seqs) == 3
    engine.abort_request("a")
    engine.step()
    assert set(runner.requests) == {"b"} and len(runner.seqs) == 1
    engine.abort_request("b")                  # the engine is idle: it frees at once, with no step
    assert runner.requests == {} and runner.seqs == {}
    # an id used again after its request ended is a new request to the runner
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate({"prompt": "the cat"}, greedy, use_tqdm=False)
    engine.add_request("the cat", greedy, request_id="a")
    while engine.has_unfinished_requests():
        out = engine.step()
    assert out[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert runner.requests == {} and runner.seqs == {}


def test_whisper_encoder_output_and_cross_attention_are_freed():
    llm = LLM()                                # the built-in Whisper tiny.en
    engine, runner = llm.llm_engine, llm.llm_engine.executor.runner
    clip = np.zeros(16000, dtype=np.float32)
    engine.add_request({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, 16000)}},
                        "decoder_prompt": "<|startoftranscript|><|notimestamps|>"}, SamplingParams(max_tokens=3))
    engine.step()
    (state,) = runner.requests.values()
    assert state.encoder_state is not None and "ticket" in state.cross_cache
    pool = llm.llm_engine.executor.model.cross_kv
    assert len(pool.uids) == 1 and pool.keys               # its K/V hold a slot of the model's pool
    del state
    while engine.has_unfinished_requests():
        engine.step()
    assert runner.requests == {} and runner.seqs == {}
    assert pool.uids == [] and pool.keys == []             # ... freed with the request's state
    assert engine.stats()["encoder_items"] == 1
