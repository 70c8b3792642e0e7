"""Builds a tiny random Qwen2 checkpoint and generates from it with hark's offline API."""
import tempfile

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from hark import LLM, SamplingParams


def main():
    path = tempfile.mkdtemp(prefix="hark-demo-")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"],
                         eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    llm = LLM(path, max_model_len=512)
    outs = llm.generate(["Hello, hark!", "Audio models"] * 4,
                        SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=32, ignore_eos=True))
    for o in outs[:2]:
        print(repr(o.prompt), "->", repr(o.outputs[0].text), f"({len(o.outputs[0].token_ids)} tokens)")
    print(llm.llm_engine.stats())


if __name__ == "__main__":
    main()
