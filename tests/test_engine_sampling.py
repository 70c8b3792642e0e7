"""Sampling semantics, stopping, detokenization, KV accounting and input validation."""

import pytest
import torch

from hark import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(qwen2_ckpt):
    return LLM(qwen2_ckpt[0], block_size=4, seed=1)


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_seeded_sampling_is_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate("the cat", params, use_tqdm=False)
    other = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(["zebra crossing", "the cat", "in the end"], [other, params, other], use_tqdm=False)
    assert alone[0].outputs[0].token_ids == mixed[1].outputs[0].token_ids


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(["the cat", "in"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(["the cat", "in"], SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=8,
                                                          ignore_eos=True), use_tqdm=False)
    assert tokens(greedy) == tokens(top1)


def test_temperature_sampling_matches_softmax(qwen2_ckpt, llm):
    """Chi-square test of 2000 first-token draws against softmax(logits / T) of transformers."""
    path, model, tok = qwen2_ckpt
    prompt, temperature, draws = "the", 2.0, 2000
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(prompt)])).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, -1)
    params = [SamplingParams(n=100, temperature=temperature, max_tokens=1, seed=1000 * i, ignore_eos=True)
              for i in range(draws // 100)]
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    firsts = [c.token_ids[0] for o in outs for c in o.outputs]
    counts = torch.bincount(torch.tensor(firsts), minlength=len(probs)).float()
    top = torch.argsort(probs, descending=True)[:8]              # bins with enough expected mass
    expected = torch.cat([probs[top], (1 - probs[top].sum()).unsqueeze(0)]) * draws
    observed = torch.cat([counts[top], (draws - counts[top].sum()).unsqueeze(0)])
    chi2 = (((observed - expected) ** 2) / expected).sum().item()
    assert chi2 < 26.1, chi2                                    # p = 0.001 for 8 degrees of freedom


def test_n_samples_share_prompt_blocks(llm):
    prompt = "a prompt long enough to fill a few blocks of the cache"
    outs = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [c.index for c in outs[0].outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1
    assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.kv.num_blocks


def test_stop_strings_and_token_ids(llm):
    base = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    stop = text[3:5]
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)] and stop not in out.text
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                 stop_token_ids=[ids[4]]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == ids[4] and out.token_ids[-1] == ids[4]
    assert base.outputs[0].finish_reason == "length"


def test_detokenizer_handles_split_utf8(qwen2_ckpt):
    """Byte-level tokens: 'é', '中', '🙂' are split across tokens; forced through allowed_token_ids."""
    from hark.engine.detokenizer import Detokenizer
    from hark.engine.request import Request, Sequence
    from hark.inputs import ProcessedPrompt
    tok = qwen2_ckpt[2]
    text = "café 中文 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)
    prompt = tok.encode("x")
    req = Request("r", ProcessedPrompt(prompt), SamplingParams())
    seq = Sequence(0, req, 0, list(prompt), len(prompt))
    detok = Detokenizer(tok)
    detok.start(seq)
    pieces = []
    for t in ids:
        seq.token_ids.append(t)
        pieces.append(detok.step(seq))
    assert "".join(pieces) == text == seq.text
    assert all("\ufffd" not in p for p in pieces)


def force_tokens(ids: list[int]):
    """A logits processor that makes the n-th output token ids[n]."""
    def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[ids[len(output_ids)]] = 0.0
        return forced
    return force


def test_output_ending_inside_a_character_keeps_its_bytes(qwen2_ckpt):
    """Stopped by max_tokens halfway through '中': the held-back bytes end the text as U+FFFD, as
    tokenizer.decode of the output gives, in the final output and in the streamed deltas."""
    llm_path, _, tok = qwen2_ckpt
    ids = tok.encode("ok 中")
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    llm = LLM(llm_path, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=cut, ignore_eos=True,
                            logits_processors=[force_tokens(ids[:cut])])
    out = llm.generate("x", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:cut] and out.finish_reason == "length"
    assert out.text == tok.decode(ids[:cut]) and out.text.endswith("\ufffd")


def test_all_blocks_free_after_finish_abort_preempt(qwen2_ckpt):
    llm = LLM(qwen2_ckpt[0], block_size=4, num_kv_blocks=40, max_model_len=128, max_num_seqs=8)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=40, ignore_eos=True)
    ids = [engine.add_request("the quick brown fox jumps over the lazy dog " * 2, params) for _ in range(6)]
    for step in range(60):
        engine.step()
        if step == 10:
            engine.abort_request(ids[0])
            engine.abort_request(ids[3])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert all(r == 0 for r in engine.kv.ref_counts)


def test_abort_reports_abort(llm):
    engine = llm.llm_engine
    rid = engine.add_request("the cat", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    out = engine.abort_request(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"top_k": -5}, "top_k"),
    ({"logprobs": 50}, "logprobs"), ({"min_p": 2}, "min_p"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_without_disturbing_others(llm):
    engine = llm.llm_engine
    rid = engine.add_request("the cat", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    for bad, match in [("", "empty"), ({"prompt_token_ids": [10**6]}, "prompt_token_ids"),
                       ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
                       ({"prompt_token_ids": [5] * 600}, "max_model_len"), (42, "prompt")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(bad, SamplingParams())
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == rid and len(outs[-1].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(llm.llm_engine.loaded.model_path, max_model_len=10**6)


def test_unknown_architecture(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"], "model_type": "llama"}))
    from hark.models.registry import resolve
    with pytest.raises(ValueError, match="unknown architecture"):
        resolve("MadeUpForCausalLM")


def test_chat_uses_template(llm, qwen2_ckpt):
    tok = qwen2_ckpt[2]
    msgs = [{"role": "user", "content": "hi there"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 4
