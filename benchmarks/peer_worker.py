"""One engine (hark or vLLM) in its own process, driven by benchmarks/vllm_cpu.py over stdin/stdout.

Runs under either project's Python, so it imports only the standard library, numpy and the engine.
It builds the engine, prints `ready` (wall-clock time, for the parent's start-up figure), warms up,
then answers each `round` line on stdin with one timed `generate` of the whole workload, and `quit`.
Every message to the parent is one line `@@peer {json}`; anything else on stdout is the engine's log.

    python peer_worker.py --engine hark|vllm --model DIR --workload FILE.json --threads 2
"""
import argparse
import json
import os
import sys
import time

TAG = "@@peer "


def say(**message) -> None:
    sys.stdout.write(TAG + json.dumps(message) + "\n")
    sys.stdout.flush()


def load_workload(path: str):
    """(prompts, max_tokens): token-id prompts, or audio prompts whose clips are .npy files beside it."""
    import numpy as np
    with open(path) as f:
        spec = json.load(f)
    prompts = []
    for item in spec["requests"]:
        if "prompt_token_ids" in item:
            prompts.append({"prompt_token_ids": item["prompt_token_ids"]})
        else:
            audio = np.load(os.path.join(os.path.dirname(path), item["audio"]))
            prompts.append({"prompt": item["prompt"], "multi_modal_data": {"audio": (audio, 16000)}})
    return prompts, [item["max_tokens"] for item in spec["requests"]]


def build_hark(args):
    from hark import LLM, SamplingParams    # before torch: hark sets its OpenMP wait policy first
    import torch
    torch.set_num_threads(args.threads)
    # caches off: every round repeats the same prompts, which would otherwise skip their prefill
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              enable_prefix_caching=False, encoder_cache_bytes=0)
    return llm, SamplingParams


def build_vllm(args):
    from vllm import LLM, SamplingParams
    kwargs = dict(dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, enable_prefix_caching=False, seed=0)
    if args.audio:
        kwargs.update(limit_mm_per_prompt={"audio": 1}, mm_processor_cache_gb=0)
    return LLM(args.model, **kwargs), SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=("hark", "vllm"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--audio", action="store_true")
    args = ap.parse_args()
    prompts, max_tokens = load_workload(args.workload)
    llm, SamplingParams = (build_hark if args.engine == "hark" else build_vllm)(args)
    say(event="ready", time=time.time())
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    start = time.perf_counter()
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    say(event="warm", seconds=time.perf_counter() - start)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        ids = [list(o.outputs[0].token_ids) for o in outs]
        say(event="round", seconds=seconds, tokens=sum(map(len, ids)), ids=ids)
    sys.stdout.flush()
    if args.engine == "hark":
        os._exit(0)     # skips torch's teardown; vLLM shuts its engine process down at exit


if __name__ == "__main__":
    main()
