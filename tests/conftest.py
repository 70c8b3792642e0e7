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
