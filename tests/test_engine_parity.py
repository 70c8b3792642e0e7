"""Greedy parity with transformers on tiny random Qwen2 / Llama, through every scheduling path."""
import pytest
import torch

from hark import LLM, SamplingParams

PROMPTS = [
    "the cat sat on the mat and then",
    "in",
    "a much longer prompt that spans several kv blocks of sixteen tokens, so that chunking matters here",
    "the weather today is",
    "zebra",
]
MAX_NEW = 12


def reference(model, tok, prompts, max_new=MAX_NEW):
    outs = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        gen = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def ckpt(request, qwen2_ckpt, llama_ckpt):
    path, model, tok = qwen2_ckpt if request.param == "qwen2" else llama_ckpt
    return path, model, tok, reference(model, tok, PROMPTS)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("engine_kwargs", [
    {},                                                      # plain batch
    {"num_kv_blocks": 40, "block_size": 4, "max_model_len": 128},  # forces preemption
    {"max_num_batched_tokens": 7},                           # forces chunked prefill
    {"max_num_seqs": 2},                                     # continuous batching: join / leave
], ids=["batch", "preemption", "chunked", "few-seqs"])
def test_greedy_matches_transformers(ckpt, engine_kwargs):
    path, _, _, expected = ckpt
    llm = LLM(path, **engine_kwargs)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    engine = llm.llm_engine
    if "num_kv_blocks" in engine_kwargs:
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_prefix_cache_hits_keep_outputs(ckpt):
    path, _, _, expected = ckpt
    llm = LLM(path, block_size=4)
    first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    second = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in second] == expected
    assert sum(o.num_cached_tokens for o in second) > sum(o.num_cached_tokens for o in first)
    assert llm.llm_engine.kv.prefix_hit_rate > 0.3


def test_logprobs_close_to_transformers(ckpt):
    path, model, tok, expected = ckpt
    llm = LLM(path)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                                   logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    ids = tok.encode(PROMPTS[0]) + expected[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    n_prompt = len(tok.encode(PROMPTS[0]))
    for step, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert entry[token].rank == 1
        assert abs(entry[token].logprob - ref[n_prompt - 1 + step, token].item()) < 1e-4
        assert len(entry) == 3
    assert out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token = ids[pos]
        assert abs(entry[token].logprob - ref[pos - 1, token].item()) < 1e-4
    total = sum(e[t].logprob for t, e in zip(out.outputs[0].token_ids, out.outputs[0].logprobs))
    assert abs(out.outputs[0].cumulative_logprob - total) < 1e-4
