"""Multi-LoRA cost: the same requests on hark with 4 adapters mixed in every batch vs one merged model.

A random Qwen2 of Qwen2-0.5B's width (throughput.py's checkpoint) and 4 random peft adapters of rank 16
on every attention and MLP projection. The merged model is the base with adapter 0 merged in (peft's
merge_and_unload): what serving one fine-tune costs without LoRA. The LoRA engine runs the same requests,
round-robin over the 4 adapters (max_loras=4: all of them in each batch). Greedy, ignore_eos; prefix
caching off so both engines compute every prompt. The engines run in turn, --rounds times, and each
one's best round counts (the machine is shared: the others' load comes and goes).

    .venv/bin/python benchmarks/lora.py [--threads 1] [--layers 4] [--requests 32] [--rank 16] [--rounds 2]
"""
import argparse
import os
import tempfile

import torch

from common import Timer, peak_rss_mib, set_threads
from throughput import build_checkpoint, workload

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(base: str, root: str, n: int, rank: int) -> tuple[list[str], str]:
    """n random adapters under root; returns their paths and a checkpoint with the first one merged in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        paths.append(os.path.join(root, f"adapter{i}"))
        peft_model.save_pretrained(paths[-1])
        if i == 0:
            merged = os.path.join(root, "merged")
            peft_model.merge_and_unload().save_pretrained(merged)
            AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    return paths, merged


class Engine:
    def __init__(self, label: str, path: str, reqs, loras=None, **engine_args):
        from hark import LLM, SamplingParams
        self.label, self.loras, self.best = label, loras, None
        self.llm = LLM(path, max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=False, **engine_args)
        self.prompts = [{"prompt_token_ids": p} for p, _ in reqs]
        self.params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
        self.llm.generate(self.prompts[:2], self.params[:2], use_tqdm=False,
                          lora_request=loras[:2] if loras else None)      # warm-up

    def run(self) -> None:
        with Timer() as t:
            outs = self.llm.generate(self.prompts, self.params, use_tqdm=False, lora_request=self.loras)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if self.best is None or t.seconds < self.best[1]:
            self.best = (tokens, t.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.best[0] / self.best[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    from hark.lora import LoRARequest
    root = tempfile.mkdtemp(prefix="hark-bench-lora-")
    base = os.path.join(root, "base")
    model = build_checkpoint(base, args.layers, args.vocab)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    del model
    paths, merged = build_adapters(base, root, args.adapters, args.rank)
    reqs = [(p, min(m, 128)) for p, m in workload(args.requests, args.vocab)]
    loras = [LoRARequest(f"adapter{i % args.adapters}", i % args.adapters + 1, paths[i % args.adapters])
             for i in range(len(reqs))]
    print(f"model: Qwen2 width 896, {args.layers} layers, vocab {args.vocab}, {params_m:.0f}M params, fp32, "
          f"{args.threads} threads; {len(reqs)} requests, {sum(m for _, m in reqs)} output tokens; "
          f"{args.adapters} adapters of rank {args.rank} on all 7 projections")
    lora_args = dict(enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank)
    engines = [Engine("merged model (no LoRA)", merged, reqs),
               Engine("LoRA engine, no adapter named", base, reqs, **lora_args),
               Engine(f"{args.adapters} adapters mixed per batch", base, reqs, loras, **lora_args)]
    for _ in range(args.rounds):
        for engine in engines:
            engine.run()
    for engine in engines:
        tokens, seconds = engine.best
        print(f"{engine.label:<30}: {engine.tokens_per_s:8.1f} tok/s  ({tokens} tokens in {seconds:.1f} s, best of "
              f"{args.rounds})")
    merged_tps, lora_tps = engines[0].tokens_per_s, engines[2].tokens_per_s
    print(f"LoRA cost (merged / mixed): {merged_tps / lora_tps:.2f}x   peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
