"""Offline throughput: hark vs transformers `generate` on the same random-weight Qwen2, one process.

64 requests, prompt lengths 32-512 and output lengths 16-256 (ignore_eos), greedy. transformers
runs one-at-a-time and in padded batches of 8 and 16 (left padding); its best is the baseline.

    .venv/bin/python benchmarks/throughput.py [--layers 4] [--requests 64] [--hf-requests 32]
"""
import argparse
import random
import tempfile

import torch

from common import Timer, peak_rss_mib, set_threads


def build_checkpoint(path: str, layers: int, vocab: int):
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from tokenizers import Tokenizer, models
    # Qwen2-0.5B's width (hidden 896, 14 heads, 2 KV heads, FFN 4864, tied embeddings); fewer layers.
    config = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"], eos_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1")),
                                  eos_token="t0", pad_token="t0")
    tok.save_pretrained(path)
    return model


def workload(n: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256)) for _ in range(n)]


def run_hark(path, reqs):
    from hark import LLM, SamplingParams
    llm = LLM(path, max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)   # warm-up
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / t.seconds, tokens, t.seconds


def run_hf(model, reqs, batch_size: int):
    tokens, seconds = 0, 0.0
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i: i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        new = max(m for _, m in chunk)   # one generate call per batch runs to the longest request
        with Timer() as t, torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        seconds += t.seconds
        tokens += sum(m for _, m in chunk)   # only the tokens each request asked for count
    return tokens / seconds, tokens, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=32, help="subset for transformers (tokens/s is per-token)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    path = tempfile.mkdtemp(prefix="hark-bench-")
    model = build_checkpoint(path, args.layers, args.vocab)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    reqs = workload(args.requests, args.vocab)
    print(f"model: Qwen2 width 896, {args.layers} layers, vocab {args.vocab}, {params_m:.0f}M params, fp32, "
          f"{args.threads} threads; {len(reqs)} requests, {sum(m for _, m in reqs)} output tokens")
    hark_tps, n, s = run_hark(path, reqs)
    print(f"hark                      : {hark_tps:8.1f} tok/s  ({n} tokens in {s:.1f} s)")
    sub = reqs[: args.hf_requests]
    results = {}
    for bs in (1, 8, 16):
        run_hf(model, sub[:1], 1) if bs == 1 else None
        tps, n, s = run_hf(model, sub if bs > 1 else sub[:8], bs)
        results[bs] = tps
        print(f"transformers batch {bs:<2}     : {tps:8.1f} tok/s  ({n} tokens in {s:.1f} s)")
    best = max(results.values())
    print(f"ratio hark / transformers best: {hark_tps / best:.2f}x   peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
