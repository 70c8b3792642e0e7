"""Load test of `hark serve` on loopback: N concurrent streaming chat clients plus M transcription uploads
against one server (a chat model and Whisper tiny.en side by side). Reports time to first token (p50/p99),
throughput, transcription latency (p50/p99), errors (must be 0) and whether every KV block is free at the end.

    python benchmarks/serve_load.py                       # tiny random LM, 100 chats + 20 uploads
    python benchmarks/serve_load.py --model PATH --chats 50 --max-tokens 64
"""
import argparse
import asyncio
import glob
import json
import os
import sys
import tempfile
import time

import httpx
import numpy as np

from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.server.app import BackgroundServer, build_app
from hark.server.metrics import Metrics
from hark.server.state import ServedModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAVS = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "*.wav")))


async def chat_client(http: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": "chat", "stream": True, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8,
            "seed": i, "messages": [{"role": "user", "content": f"client {i}: tell me a story"}],
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != max_tokens:
        return {"error": f"got {tokens} tokens, wanted {max_tokens}"}
    return {"ttft": ttft, "tokens": tokens, "latency": time.perf_counter() - t0}


async def upload_client(http: httpx.AsyncClient, wav: str) -> dict:
    with open(wav, "rb") as f:
        data = f.read()
    t0 = time.perf_counter()
    r = await http.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                        data={"model": "whisper-1", "response_format": "json"})
    if r.status_code != 200 or not r.json().get("text"):
        return {"error": f"{r.status_code} {r.text[:200]}"}
    return {"latency": time.perf_counter() - t0, "seconds": r.json()["usage"]["seconds"]}


async def run_load(url: str, chats: int, uploads: int, max_tokens: int, time_limit: float) -> tuple[list, list, float]:
    limits = httpx.Limits(max_connections=chats + uploads + 4)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit, limits=limits) as http:
        t0 = time.perf_counter()
        tasks = [chat_client(http, i, max_tokens) for i in range(chats)]
        tasks += [upload_client(http, WAVS[i % len(WAVS)]) for i in range(uploads)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), time_limit)
        wall = time.perf_counter() - t0
    return results[:chats], results[chats:], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="chat checkpoint (default: a tiny random Qwen2 LM)")
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds before the run counts as failed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from conftest import make_tiny_lm
            model = os.path.join(tmp, "lm")
            make_tiny_lm(model)
        metrics = Metrics()
        chat = ServedModel("chat", AsyncLLMEngine(LLM(model, max_model_len=512, max_num_seqs=args.max_num_seqs)
                                                  .llm_engine), metrics, max_queued_requests=args.chats)
        whisper = ServedModel("whisper-1", AsyncLLMEngine(LLM(max_num_seqs=32).llm_engine), metrics,
                              max_queued_requests=args.uploads)
        app = build_app([chat, whisper], metrics)
        with BackgroundServer(app, host="127.0.0.1") as url:
            chats, uploads, wall = asyncio.run(run_load(url, args.chats, args.uploads, args.max_tokens,
                                                        args.time_limit))
            time.sleep(0.5)
            kv = {m.name: m.engine.stats for m in (chat, whisper)}

    errors = [r["error"] for r in chats + uploads if "error" in r]
    ttfts = np.array([r["ttft"] for r in chats if "ttft" in r])
    tokens = sum(r.get("tokens", 0) for r in chats)
    audio_s = sum(r.get("seconds", 0) for r in uploads)
    kv_free = all(s["kv_free_blocks"] == s["kv_total_blocks"] for s in kv.values())
    print(f"{args.chats} streaming chats x {args.max_tokens} tokens + {args.uploads} transcriptions in {wall:.1f} s")
    if len(ttfts):
        print(f"time to first token: p50 {np.percentile(ttfts, 50):.3f} s, p99 {np.percentile(ttfts, 99):.3f} s")
    upload_latency = np.array([r["latency"] for r in uploads if "latency" in r] or [0.0])
    print(f"throughput: {tokens / wall:.0f} generated tok/s, {len(chats) / wall:.2f} chats/s, "
          f"{audio_s / wall:.1f} s of audio per s ({len(uploads)} uploads)")
    print(f"transcription latency: p50 {np.percentile(upload_latency, 50):.2f} s, "
          f"p99 {np.percentile(upload_latency, 99):.2f} s")
    print(f"errors: {len(errors)}" + (f" e.g. {errors[:3]}" if errors else ""))
    print("KV blocks free at the end: " + ", ".join(f"{n} {s['kv_free_blocks']}/{s['kv_total_blocks']}"
                                                      for n, s in kv.items()) + (" (all free)" if kv_free else ""))
    return 0 if not errors and kv_free else 1


if __name__ == "__main__":
    sys.exit(main())
