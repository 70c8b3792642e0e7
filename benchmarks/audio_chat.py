"""Audio chat throughput: hark vs transformers `generate` on the same random-weight audio LLM.

`--model` picks one or more of the models in benchmarks/audio_chat_models.py (qwen2_audio, ultravox,
voxtral, qwen2_5_omni, minicpmo; `all` runs each): random weights, float32 (`--dtype bfloat16` runs both engines in bfloat16),
sized so the whole comparison runs in minutes on 2 CPU cores: a whisper-tiny-sized audio encoder
(4 layers, d_model 384, 6 heads, FFN 1536, 30 s window) and an LM of Qwen2-0.5B's width (hidden
896, 14 heads, 2 KV heads, FFN 4864; `--lm-hidden 512` gives a 512-wide, FFN 2048, 8-head LM)
with 4 layers and a byte-level vocabulary (~260 tokens): about 70 M parameters in all (24 M at
width 512). The transformers side of each model is named in its registration (Ultravox is remote
code on the hub: its parts in transformers, composed as fixie-ai's model).

Workload: 32 requests, each a 5-30 s clip of real speech (tests/data, concatenated and repeated
to length; lengths in samples are not whole 10 ms hops) and a question, greedy with mixed output
lengths 32-256 (ignore_eos). transformers runs one request at a time and in left-padded batches
of 8 and 16 over the first --hf-requests requests; its best rate is the baseline. The one-at-a-
time run's greedy ids are compared with hark's (`ids match`).

Second scenario: 8 questions about one 30 s clip, sent one after another (a conversation about a
recording); hark with its encoder and prefix caches against hark with both off.

    .venv/bin/python benchmarks/audio_chat.py [--model qwen2_audio,ultravox | all] [--requests 32]
        [--hf-requests 16] [--threads 1]

One thread by default: on a CPU shared with other jobs, two OpenMP threads stall at every GEMM's
barrier (small-batch GEMMs measured 10-50x slower); both engines run under the same setting.
"""
import argparse
import glob
import os
import random
import tempfile

import numpy as np
import soundfile as sf
import torch

from audio_chat_models import MODELS, Size
from common import Timer, peak_rss_mib, set_threads

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
QUESTIONS = ["What is said in this recording?", "Who is speaking?", "Summarize the audio.",
             "What is the mood of the speaker?", "Transcribe the first sentence.", "Is there any music?",
             "How many people speak?", "What language is this?"]


def speech(seconds: float) -> np.ndarray:
    clips = [sf.read(f, dtype="float32")[0] for f in sorted(glob.glob(os.path.join(DATA, "*.wav")))]
    whole = np.concatenate(clips)
    n = int(seconds * 16000)
    return np.tile(whole, n // len(whole) + 1)[:n]


def workload(n: int, seed: int = 0):
    """(audio, question, max_tokens) per request; clips start at different points of the speech."""
    rng = random.Random(seed)
    long = speech(60.0)
    reqs = []
    for _ in range(n):
        seconds, start = rng.uniform(5, 30), rng.randrange(0, 30 * 16000)
        reqs.append((long[start: start + int(seconds * 16000)], rng.choice(QUESTIONS), rng.randint(32, 256)))
    return reqs


def run_hark(path, spec, reqs, **engine_kwargs):
    from hark import LLM, SamplingParams
    llm = LLM(path, max_num_seqs=64, max_num_batched_tokens=2048, **engine_kwargs)
    prompts = [{"prompt": spec.placeholder + q + spec.suffix, "multi_modal_data": {"audio": (a, 16000)}}
               for a, q, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for *_, m in reqs]
    llm.generate(["warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return llm, [list(o.outputs[0].token_ids) for o in outs], tokens / t.seconds, tokens, t.seconds


def run_hf(reference, spec, reqs, batch_size: int, dtype: torch.dtype):
    """(tok/s, tokens, seconds, greedy ids per request: each cut to what the request asked for)."""
    tokens, seconds, ids = 0, 0.0, []
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i: i + batch_size]
        new = max(m for *_, m in chunk)              # one generate call runs to the longest request
        with Timer() as t:
            out = reference.generate([(a, spec.placeholder + q + spec.suffix) for a, q, _ in chunk], new, dtype)
        seconds += t.seconds
        tokens += sum(m for *_, m in chunk)          # the tokens the requests asked for
        ids += [row[:m] for row, (*_, m) in zip(out, chunk)]
    return tokens / seconds, tokens, seconds, ids


def questions_about_one_clip(path, spec, caches: bool, dtype: str):
    """8 questions, one after another, about the same 30 s clip: seconds in all, encoder runs, cached tokens."""
    from hark import LLM, SamplingParams
    kwargs = {} if caches else {"enable_prefix_caching": False, "encoder_cache_bytes": 0}
    llm = LLM(path, dtype=dtype, **kwargs)
    clip = (speech(30.0), 16000)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate(["warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
    cached = 0
    with Timer() as t:
        for q in QUESTIONS:
            prompt = {"prompt": spec.placeholder + q + spec.suffix, "multi_modal_data": {"audio": clip}}
            out = llm.generate(prompt, params, use_tqdm=False)[0]
            cached += out.num_cached_tokens
    return t.seconds, llm.llm_engine.stats()["encoder_items"], cached


def bench(name: str, args) -> None:
    spec = MODELS[name]
    path = tempfile.mkdtemp(prefix=f"hark-audio-bench-{name}-")
    reference = spec.build(path, Size(args.lm_layers, args.lm_hidden))
    params = sum(p.numel() for p in reference.model.parameters()) / 1e6
    reqs = workload(args.requests)
    audio_s = sum(len(a) for a, _, _ in reqs) / 16000
    print(f"== {name}: random weights, {params:.0f} M params; {len(reqs)} requests, {audio_s:.0f} s of audio, "
          f"{sum(m for *_, m in reqs)} output tokens; {args.dtype}, {args.threads} threads")
    print(f"transformers side: {spec.reference}")

    llm, hark_ids, hark_rate, hark_tokens, hark_s = run_hark(path, spec, reqs, dtype=args.dtype)
    stats = llm.llm_engine.stats()
    print(f"hark:                     {hark_rate:6.1f} tok/s  ({hark_tokens} tokens in {hark_s:.1f} s; "
          f"{stats['encoder_calls']} batched encoder calls; KV holds "
          f"{stats['max_concurrent_30s_audio_requests']} concurrent 30 s requests)")
    del llm
    dtype = getattr(torch, args.dtype)
    reference.model.to(dtype)
    hf = {}
    for batch_size in (1, 8, 16):
        rate, tokens, seconds, ids = run_hf(reference, spec, reqs[: args.hf_requests], batch_size, dtype)
        hf[batch_size] = rate
        line = f"transformers batch {batch_size:<2}:    {rate:6.1f} tok/s  ({tokens} tokens in {seconds:.1f} s)"
        if batch_size == 1:
            same = sum(a == b for a, b in zip(ids, hark_ids))
            line += f"; greedy ids match hark's on {same}/{len(ids)} requests"
        print(line)
    print(f"hark / best transformers: {hark_rate / max(hf.values()):.2f}x")

    for caches in (True, False):
        seconds, encoded, cached = questions_about_one_clip(path, spec, caches, args.dtype)
        label = "caches on " if caches else "caches off"
        print(f"8 questions about one 30 s clip, {label}: {seconds:5.1f} s, encoder ran on {encoded} item(s), "
              f"{cached} prompt tokens from the prefix cache")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2_audio",
                    help=f"comma-separated, of {', '.join(MODELS)}; or all")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--hf-requests", type=int, default=16)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--lm-hidden", type=int, default=896, help="896 (Qwen2-0.5B's width) or 512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both engines' dtype")
    args = ap.parse_args()
    names = list(MODELS) if args.model == "all" else args.model.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown --model {', '.join(unknown)}; choose from {', '.join(MODELS)} or all")
    set_threads(args.threads)
    for name in names:
        bench(name, args)
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
