"""Shared fixtures: tiny random checkpoints written with transformers' save_pretrained."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_byte_tokenizer(path: str, special_tokens: list[str] = (), chat_template: str | None = CHAT_TEMPLATE):
    """A real byte-level BPE tokenizer (256 byte tokens, a few merges) plus special tokens, saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *special_tokens]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def randomize(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> None:
    """Re-draws every weight with a larger std so greedy outputs vary (HF init makes them repeat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_tiny_lm(path: str, arch: str = "qwen2", tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    tokenizer = make_byte_tokenizer(path)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, architectures=["Qwen2ForCausalLM"]))
    else:
        rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128, "rope_theta": 10000.0}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=rope, architectures=["LlamaForCausalLM"]))
    randomize(model)
    model.eval()
    model.save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    model, tok = make_tiny_lm(path, "qwen2", tie=True)
    return path, model, tok


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    model, tok = make_tiny_lm(path, "llama", tie=False)
    return path, model, tok


def image_data_url(image, fmt: str = "PNG") -> str:
    """A data: URL of a PIL image encoded as fmt, as an image_url content part carries it."""
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def wav_b64(audio) -> str:
    """Base64 of a float 16 kHz wav of `audio`, as an input_audio content part carries it."""
    import base64
    import io
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


def worst_logprob_error(out, ref: torch.Tensor) -> float:
    """The largest |logprob - reference| over a RequestOutput's prompt logprobs and its sampled tokens' top
    logprobs, ref being the reference's log-softmax [prompt + output tokens, V]; each greedy token must be
    the reference's argmax."""
    ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
    n_prompt, worst = len(out.prompt_token_ids), 0.0
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        worst = max(worst, abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()))
    for step, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert token == int(ref[n_prompt - 1 + step].argmax())
        for t, logprob in entry.items():
            worst = max(worst, abs(logprob.logprob - ref[n_prompt - 1 + step, t].item()))
    return worst


def served_chat_matches_offline(llm, name: str, messages: list, offline, max_tokens: int) -> None:
    """Serves llm's engine as `name`: the chat answers as `offline` did, and an image part is a 400."""
    import openai
    from hark.engine.async_engine import AsyncLLMEngine
    from hark.server.app import BackgroundServer, build_app
    from hark.server.metrics import Metrics
    from hark.server.state import ServedModel
    metrics = Metrics()
    app = build_app([ServedModel(name, AsyncLLMEngine(llm.llm_engine), metrics)], metrics)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=max_tokens)
        assert r.choices[0].message.content == offline.outputs[0].text
        assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
        try:                                              # an image part: a clear 400, not a crash
            client.chat.completions.create(model=name, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
        except openai.BadRequestError:
            return
        raise AssertionError("an image part was accepted")
