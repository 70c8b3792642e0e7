"""Multi-LoRA: greedy ids identical to peft (each adapter merged into the base, in transformers) with two
adapters and the base model mixed in one batch, through every scheduling path; adapter management;
prefix caching per adapter; bad adapters refused before scheduling."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hark import LLM, SamplingParams
from hark.lora import LoRARequest
from lora_adapters import ALL_PROJECTIONS, greedy_ids, make_adapter

PROMPTS = ["the cat sat on the mat and then", "in", "zebra",
           "a much longer prompt that spans several kv blocks of sixteen tokens, so that chunking matters here",
           "the weather today is", "hello there"]
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def setup(request, qwen2_ckpt, llama_ckpt, tmp_path_factory):
    """Base checkpoint, adapter 'every' (all projections, r 8) and 'qv' (q/v only, r 4, rslora), and the
    reference ids of each prompt under each adapter (index 0: base, 1: every, 2: qv)."""
    path, base, tok = qwen2_ckpt if request.param == "qwen2" else llama_ckpt
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    every, qv = str(root / "every"), str(root / "qv")
    merged_every = make_adapter(path, every, ALL_PROJECTIONS, r=8, lora_alpha=16, seed=1)
    merged_qv = make_adapter(path, qv, ["q_proj", "v_proj"], r=4, lora_alpha=8, seed=2, use_rslora=True)
    refs = [greedy_ids(m, tok, PROMPTS, MAX_NEW) for m in (base, merged_every, merged_qv)]
    assert refs[0] != refs[1] and refs[0] != refs[2] and refs[1] != refs[2]     # the adapters matter
    loras = [None, LoRARequest("every", 1, every), LoRARequest("qv", 2, qv)]
    return path, loras, refs, tok, root


def mixed(n: int) -> list[int]:
    """Which adapter (0 base, 1, 2) each of n requests runs with: all three interleaved."""
    return [i % 3 for i in range(n)]


@pytest.mark.parametrize("engine_kwargs", [
    {},                                                      # one batch
    {"max_num_batched_tokens": 7},                           # chunked prefill
    {"max_loras": 1},                                        # one adapter per batch: adapters take turns
    {"num_kv_blocks": 40, "block_size": 4, "max_model_len": 128},   # preemption
], ids=["batch", "chunked", "max-loras-1", "preemption"])
def test_mixed_batch_matches_peft_merged(setup, engine_kwargs):
    path, loras, refs, _, _ = setup
    max_loras = engine_kwargs.pop("max_loras", 2)
    llm = LLM(path, enable_lora=True, max_loras=max_loras, max_lora_rank=8, **engine_kwargs)
    engine = llm.llm_engine
    mixes, execute = [], engine.executor.execute
    adapter_of = {}

    def counting(step):                   # how many adapters (and whether the base) each batch mixes
        adapter_of.update({r.request_id: r.lora_id for r in step.new_requests})
        adapter_of.update({s.seq_id: adapter_of[s.request_id] for s in step.new_seqs})
        if step.seqs:
            mixes.append({adapter_of[s.seq_id] for s in step.seqs})
        return execute(step)
    engine.executor.execute = counting
    which = mixed(2 * len(PROMPTS))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(which))]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[loras[w] for w in which])
    got = [o.outputs[0].token_ids for o in outs]
    want = [refs[w][i % len(PROMPTS)] for i, w in enumerate(which)]
    assert got == want
    assert max(len(m - {0}) for m in mixes) == max_loras          # never more adapters than max_loras
    assert any(0 in m and len(m) > 1 for m in mixes)               # the base model shares batches too
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.lora.users
    if "num_kv_blocks" in engine_kwargs:
        assert engine.scheduler.num_preemptions > 0


def test_one_adapter_for_all_prompts_and_the_batch_order(setup):
    path, loras, refs, _, _ = setup
    llm = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=8)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=loras[2])
    assert [o.outputs[0].token_ids for o in outs] == refs[2]
    batch = None
    for i, prompt in enumerate(PROMPTS):
        llm.llm_engine.add_request(prompt, GREEDY, lora_request=loras[(i + 1) % 3])
    batch = llm.llm_engine.scheduler.schedule()
    ids = [s.request.lora_int_id for s in batch.seqs]
    assert ids == sorted(ids) and set(ids) == {0, 1, 2}      # grouped by adapter: one run each


def test_row_blocks_and_prompt_logprobs_keep_each_rows_adapter(setup, monkeypatch):
    """Long prefills computed in row blocks (by_row_blocks) and all rows returned out of order (prompt
    logprobs of several sequences): every row still gets its own adapter's update."""
    import hark.models.layers as layers
    monkeypatch.setattr(layers, "TEMP_BYTES", 1)               # blocks of 64 rows
    path, loras, refs, _, _ = setup
    llm = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=8)
    which = mixed(len(PROMPTS))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False, lora_request=[loras[w] for w in which])
    assert [o.outputs[0].token_ids for o in outs] == [refs[w][i] for i, w in enumerate(which)]


def test_prompt_logprobs_match_the_merged_model(setup):
    path, loras, _, tok, root = setup
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, loras[1].lora_path).merge_and_unload().eval()
    prompt = PROMPTS[3]
    ids = tok.encode(prompt)
    with torch.no_grad():
        want = torch.log_softmax(merged(torch.tensor([ids])).logits[0].float(), -1)
    llm = LLM(path, enable_lora=True, max_lora_rank=8)
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                       lora_request=loras[1])[0]
    got = [entry[ids[i]].logprob for i, entry in enumerate(out.prompt_logprobs) if entry is not None]
    expect = [float(want[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(got, expect)) < 1e-3


def test_prefix_cache_blocks_are_per_adapter(setup):
    path, loras, refs, _, _ = setup
    llm = LLM(path, enable_lora=True, max_lora_rank=8, block_size=4)
    prompt = PROMPTS[3]
    order = [1, 0, 2, 1, 2, 0]
    for w in order:               # one request at a time: each finds what the ones before it cached
        out = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=loras[w])[0]
        assert out.outputs[0].token_ids == refs[w][3]
    cached = [llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=loras[w])[0].num_cached_tokens
              for w in (0, 1, 2)]
    assert all(c > 0 for c in cached)              # each adapter's own blocks were found again
    fresh = LLM(path, enable_lora=True, max_lora_rank=8, block_size=4)
    fresh.generate(prompt, GREEDY, use_tqdm=False, lora_request=loras[1])
    others = [fresh.generate(prompt, GREEDY, use_tqdm=False, lora_request=loras[w])[0] for w in (0, 2)]
    assert [o.num_cached_tokens for o in others] == [0, 0]     # no adapter reads another's KV
    assert [o.outputs[0].token_ids for o in others] == [refs[0][3], refs[2][3]]


def test_add_remove_list_pin_and_eviction(setup):
    path, loras, refs, _, root = setup
    third = LoRARequest("qv-again", 3, loras[2].lora_path)
    llm = LLM(path, enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    engine = llm.llm_engine
    assert engine.add_lora(loras[1]) and engine.add_lora(loras[2])
    assert engine.list_loras() == {1, 2}
    assert engine.pin_lora(1)
    assert engine.add_lora(third)                  # over max_cpu_loras: the LRU unpinned one (2) goes
    assert engine.list_loras() == {1, 3}
    outs = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False, lora_request=[loras[2], loras[1], third])
    assert [o.outputs[0].token_ids for o in outs] == [refs[2][0], refs[1][1], refs[2][2]]   # 2 loaded again
    assert len(engine.list_loras()) == 2 and 1 in engine.list_loras()
    assert engine.remove_lora(1) and not engine.remove_lora(1) and 1 not in engine.list_loras()
    assert not engine.remove_lora(99) and not engine.pin_lora(99)
    # removing an adapter while a request uses it: the request finishes with it, then it is unloaded
    rid = engine.add_request(PROMPTS[0], GREEDY, lora_request=loras[2])
    engine.step()
    assert engine.remove_lora(2) and 2 not in engine.list_loras()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id == rid and out.outputs[0].token_ids == refs[2][0]
    assert 2 not in engine.lora.loaded
    with pytest.raises(ValueError, match="another id"):
        engine.add_lora(LoRARequest("clash", 3, loras[1].lora_path))


# --- bad adapters ---------------------------------------------------------------------------------
def copy_adapter(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(path: str, **changes) -> None:
    file = os.path.join(path, "adapter_config.json")
    config = json.load(open(file))
    config.update(changes)
    json.dump(config, open(file, "w"))


def edit_weights(path: str, fn) -> None:
    file = os.path.join(path, "adapter_model.safetensors")
    save_file(fn(load_file(file)), file)


def bad_adapters(root, every: str) -> dict:
    """name -> (adapter directory, the error it must raise)."""
    cases = {}
    cases["missing-dir"] = (str(root / "nowhere"), "not a directory")
    p = copy_adapter(every, root / "no-weights")
    os.remove(os.path.join(p, "adapter_model.safetensors"))
    cases["missing-weights"] = (p, "no adapter_model.safetensors")
    p = copy_adapter(every, root / "no-config")
    os.remove(os.path.join(p, "adapter_config.json"))
    cases["missing-config"] = (p, "no adapter_config.json")
    p = copy_adapter(every, root / "unknown-listed")
    edit_config(p, target_modules=["q_proj", "embed_tokens"])
    cases["unknown-target-listed"] = (p, "unknown target module.*embed_tokens")
    p = copy_adapter(every, root / "unknown-weight")
    edit_weights(p, lambda sd: {k.replace("layers.1.self_attn.o_proj", "layers.7.self_attn.o_proj"): v
                                for k, v in sd.items()})
    cases["unknown-target-weights"] = (p, "unknown target module 'model.layers.7.self_attn.o_proj'")
    p = copy_adapter(every, root / "shape")
    edit_weights(p, lambda sd: {k: (v[:, :32].contiguous() if k.endswith("down_proj.lora_A.weight") else v) for k, v in sd.items()})
    cases["shape-mismatch"] = (p, "shape mismatch for model.layers.0.mlp.down_proj")
    p = copy_adapter(every, root / "half")
    edit_weights(p, lambda sd: {k: v for k, v in sd.items() if "layers.0.self_attn.k_proj.lora_B" not in k})
    cases["missing-factor"] = (p, "k_proj has lora_B missing")
    p = copy_adapter(every, root / "encoder")
    edit_weights(p, lambda sd: {k.replace("model.layers.0.self_attn.q_proj", "model.audio_tower.layers.0.self_attn.q_proj"): v
                                for k, v in sd.items()})
    cases["outside-the-lm"] = (p, "'model.audio_tower.layers.0.self_attn.q_proj': it is outside the language model")
    p = copy_adapter(every, root / "twice")
    edit_weights(p, lambda sd: {**sd, **{k.replace("q_proj", "qkv_proj"): v.clone() for k, v in sd.items() if "layers.0.self_attn.q_proj" in k}})
    cases["overlap"] = (p, "more than one update for the rows of 'model.layers.0.self_attn.q")
    p = copy_adapter(every, root / "dora")
    edit_config(p, use_dora=True)
    cases["dora"] = (p, "DoRA")
    return cases


def test_bad_adapters_raise_before_scheduling(setup):
    path, loras, refs, _, root = setup
    strict = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=4)
    llm = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=8)
    cases = [(strict, "rank-over-max", loras[1].lora_path, r"rank 8 \(model.layers.0.mlp.down_proj\) is over max_lora_rank=4")]
    cases += [(llm, name, adapter, message) for name, (adapter, message) in bad_adapters(root / "bad", loras[1].lora_path).items()]
    for i, (engine_llm, name, adapter, message) in enumerate(cases):
        engine = engine_llm.llm_engine
        bad = LoRARequest(name, 10 + i, adapter)
        with pytest.raises(ValueError, match=message):
            engine_llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=[loras[2], bad])
        assert not engine.has_unfinished_requests() and not engine.scheduler.waiting
        with pytest.raises(ValueError, match=message):
            engine.add_lora(bad)
        assert engine.list_loras() <= {2}
    for engine_llm in (strict, llm):             # both still serve
        out = engine_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=loras[2])[0]
        assert out.outputs[0].token_ids == refs[2][0]


def fuse_projections(src: str, dst: str, fused: dict[str, list[str]]) -> None:
    """Rewrites adapter src as a checkpoint that fuses projections would hold it (Phi-3 / Phi-4's qkv_proj,
    gate_up_proj): one lora_A / lora_B per fused linear, its rank the parts' ranks added up, B block-diagonal;
    rank_pattern / alpha_pattern keep each update's scale."""
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(src, "adapter_config.json")))
    r, alpha = config["r"], config["lora_alpha"]
    out = {}
    for key, value in sd.items():
        if not any(f".{part}." in key for parts in fused.values() for part in parts):
            out[key] = value
    layers = {k.split(".layers.")[1].split(".")[0] for k in sd}
    for layer in layers:
        for name, parts in fused.items():
            block = "self_attn" if name == "qkv_proj" else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}."
            a = torch.cat([sd[f"{prefix}{p}.lora_A.weight"] for p in parts])
            b = torch.block_diag(*[sd[f"{prefix}{p}.lora_B.weight"] for p in parts])
            out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = a, b.contiguous()
    save_file(out, os.path.join(dst, "adapter_model.safetensors"))
    config["target_modules"] = [m for m in config["target_modules"] if not any(m in p for p in fused.values())] + list(fused)
    config["rank_pattern"] = {name: r * len(parts) for name, parts in fused.items()}
    config["alpha_pattern"] = {name: alpha * len(parts) for name, parts in fused.items()}
    json.dump(config, open(os.path.join(dst, "adapter_config.json"), "w"))


def test_adapters_of_fused_projections_and_rank_alpha_patterns(setup):
    """An adapter on fused qkv_proj / gate_up_proj (as Phi-4-multimodal's speech LoRA is) updates hark's
    fused linears whole: the same ids as the unfused adapter it was made from, merged by peft."""
    path, loras, refs, _, root = setup
    fused = str(root / "fused")
    if not os.path.exists(fused):
        fuse_projections(loras[1].lora_path, fused, {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                     "gate_up_proj": ["gate_proj", "up_proj"]})
    llm = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=24)
    which = mixed(len(PROMPTS))
    lora_for = [None, LoRARequest("fused", 7, fused), loras[2]]
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=[lora_for[w] for w in which])
    assert [o.outputs[0].token_ids for o in outs] == [refs[w][i] for i, w in enumerate(which)]


def test_lora_arguments_are_checked(setup):
    path, loras, _, _, _ = setup
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        LLM(path, max_model_len=64).generate("x", lora_request=loras[1])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LLM(path, enable_lora=True, max_loras=3, max_cpu_loras=2)
    with pytest.raises(ValueError, match="lora_int_id must be an integer ≥ 1"):
        LoRARequest("x", 0, loras[1].lora_path)
    llm = LLM(path, enable_lora=True, max_lora_rank=8, max_model_len=64)
    with pytest.raises(ValueError, match="2 lora_requests for 1 prompts"):
        llm.generate("x", lora_request=[loras[1], loras[2]])
    with pytest.raises(ValueError, match="hark.lora.LoRARequest"):
        llm.generate("x", lora_request=[object()])


def test_audio_language_model_adapter_with_audio_in_the_batch(tmp_path):
    """Qwen2-Audio: an adapter on its language model (peft names it model.language_model.layers...),
    requests with audio and without, with the adapter and without, in one batch: the ids of transformers'
    model with the adapter merged. The audio encoder is not touched."""
    from peft import LoraConfig, get_peft_model
    from test_qwen2_audio import PLACEHOLDER, make_tiny_qwen2_audio, reference, speech
    from transformers import Qwen2AudioForConditionalGeneration
    base_path, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    base, tok = make_tiny_qwen2_audio(base_path)
    targets = r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|v_proj|o_proj)|mlp\.down_proj)"
    peft_model = get_peft_model(Qwen2AudioForConditionalGeneration.from_pretrained(base_path),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()
    cases = [(f"{PLACEHOLDER}what is said?", [3.0]), ("no audio here, just text", []),
             (f"{PLACEHOLDER}and here?", [5.0])]
    lora = LoRARequest("audio-lm", 1, adapter)
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [(speech(s), 16000) for s in secs]}} if secs else text
               for text, secs in cases] * 2
    loras = [lora] * len(cases) + [None] * len(cases)
    llm = LLM(base_path, enable_lora=True, max_lora_rank=4, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    want = [reference(m, tok, text, [speech(s) for s in secs]) for m in (merged, base) for text, secs in cases]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert want[:3] != want[3:]
