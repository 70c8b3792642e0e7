"""Where hark's time goes on benchmarks/vllm_cpu.py's text workload: cProfile (Python functions) and
torch.profiler (ops), one generate of the whole workload after a warm-up.

    .venv/bin/python benchmarks/profile_text.py [--threads 2] [--top 25] [--torch]
"""
import argparse
import cProfile
import pstats
import tempfile
import time

from hark import LLM, SamplingParams      # before torch: hark sets its OpenMP wait policy
import torch

from vllm_cpu import build_text, text_workload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="1: process CPU time is then the engine thread's")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--torch", action="store_true", help="also torch.profiler's op table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = tempfile.mkdtemp(prefix="hark-profile-")
    build_text(path, 6, 32000)
    requests = text_workload(args.requests, 32000)
    llm = LLM(path, max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
    llm.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(r["max_tokens"] for r in requests)
    print(f"unprofiled: {tokens / seconds:.1f} tok/s ({seconds:.2f} s)")
    profile = cProfile.Profile(time.process_time)   # CPU time: the machine is shared
    profile.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    if args.torch:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
