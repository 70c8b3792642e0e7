"""Image chat throughput on a random Phi-3.5-vision-shaped model: hark vs the composed transformers reference.

Random weights, float32, written in the remote checkpoint's layout by tests/test_phi3_vision.py's
make_tiny_phi3v: a CLIP tower at 336 pixels / patch 14 (576 patches a crop) of --vision-width (4 heads of
64 at 256) and --vision-layers layers (feature layer -2), the HD glue and projector, and a Phi-3 LM of
Qwen2-0.5B's width (hidden 896, 14 heads, 2 KV heads, FFN 4864, --lm-layers layers, LongRoPE) with a
byte-level vocabulary; num_crops 4 (Phi-3.5-vision-instruct's), so 469-757 image tokens a photo.

Workload: benchmarks/image_chat.py's (--requests requests of 1 or 2 random crops of the real photos and a
question, greedy, outputs 16-128, ignore_eos), written as Phi-3.5-vision prompts. The transformers side
is the tests' composed reference (the remote processor and image glue transcribed, transformers'
CLIPVisionModel and Phi3ForCausalLM): one request at a time, then left-padded batches of 8 of
inputs_embeds, over the first --hf-requests; its best rate is the baseline, and its one-at-a-time ids are
compared with hark's.

    .venv/bin/python benchmarks/image_chat_phi3v.py [--requests 16] [--hf-requests 8] [--threads 1]
"""
import argparse
import os
import sys
import tempfile

import torch

from common import Timer, set_threads
from image_chat import report, run_hark, workload

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def prompt_text(images, question) -> str:
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, len(images) + 1))
    return f"<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"


def run_reference(parts, reqs, batch_size: int):
    from test_phi3_vision import ref_inputs_embeds
    clip, glue, lm, tok = parts
    tokens, seconds, ids = 0, 0.0, []
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i: i + batch_size]
        new = max(m for *_, m in chunk)
        with Timer() as t, torch.no_grad():
            rows = [ref_inputs_embeds(clip, glue, lm, tok, prompt_text(im, q), im) for im, q, _ in chunk]
            length = max(r.shape[0] for r in rows)
            embeds = torch.zeros(len(rows), length, rows[0].shape[1])
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for j, r in enumerate(rows):                 # left padding
                embeds[j, length - r.shape[0]:] = r
                mask[j, length - r.shape[0]:] = 1
            out = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=tok.eos_token_id)
        seconds += t.seconds
        tokens += sum(m for *_, m in chunk)
        ids += [row[:m].tolist() for row, (*_, m) in zip(out, chunk)]
    return tokens / seconds, tokens, seconds, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    from test_phi3_vision import make_tiny_phi3v
    path = tempfile.mkdtemp(prefix="hark-phi3v-bench-")
    vision = dict(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                  num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_width // 64, image_size=336,
                  patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    lm_size = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=args.lm_layers, num_attention_heads=14,
                   num_key_value_heads=2)
    parts = make_tiny_phi3v(path, vision, lm_size, stds=(0.02, 0.02, 0.02))[:4]
    reqs = workload(args.requests)
    params = sum(p.numel() for part in parts[:3] for p in part.parameters()) / 1e6
    report("phi3v", params, reqs, args.threads, run_hark(path, reqs, prompt_text),
           lambda batch_size: run_reference(parts, reqs[: args.hf_requests], batch_size))

if __name__ == "__main__":
    main()
