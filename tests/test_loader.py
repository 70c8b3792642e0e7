"""Checkpoint loading: safetensors and pytorch_model.bin, dtypes, bad directories."""
import json

import pytest
import torch

from hark import LLM, SamplingParams

from conftest import make_tiny_lm


def test_pytorch_bin_checkpoint_matches_safetensors(tmp_path, qwen2_ckpt):
    model = qwen2_ckpt[1]
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")   # the pre-safetensors format
    qwen2_ckpt[2].save_pretrained(tmp_path)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(str(tmp_path)).generate("the cat", params, use_tqdm=False)[0].outputs[0].token_ids
    b = LLM(qwen2_ckpt[0]).generate("the cat", params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_dtypes(qwen2_ckpt, dtype, torch_dtype):
    llm = LLM(qwen2_ckpt[0], dtype=dtype)
    assert next(llm.llm_engine.executor.model.parameters()).dtype == torch_dtype
    assert llm.llm_engine.executor.runner.k_cache.dtype == torch_dtype
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tmp_path), dtype="int3")
    with pytest.raises(ValueError, match="local"):
        LLM(str(tmp_path / "missing-dir"))
    make_tiny_lm(str(tmp_path), "qwen2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["NotAModelForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_nn_linear(dtype):
    from hark.models.layers import PACKED_DTYPES, Linear
    if dtype not in PACKED_DTYPES:
        pytest.skip(f"{dtype} weights are not packed on this CPU")
    torch.manual_seed(0)
    layer = Linear(96, 160).to(dtype)
    x = torch.randn(7, 96, dtype=dtype)
    with torch.inference_mode():
        packed = layer(x)
        assert layer.packed is not None
        torch.testing.assert_close(packed, torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(2)             # a changed weight is packed again
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
