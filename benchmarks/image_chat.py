"""Image chat throughput: hark vs transformers `generate` on the same random-weight LLaVA-1.5-shaped model.

Random weights, float32: a CLIP ViT-B/16-shaped tower cut to --vision-layers layers at 224 pixels (196
patches per image, feature layer -2), LLaVA's projector, and an LM of Qwen2-0.5B's width (hidden 896,
14 heads, 2 KV heads, FFN 4864, --lm-layers layers) with a byte-level vocabulary. Both sides use the
checkpoint's CLIPImageProcessor.

Workload: --requests requests, each 1 or 2 real photos (tests/data: crops of the astronaut and the
Hubble deep field, scikit-image's data) and a question, greedy with mixed output lengths 16-128
(ignore_eos). transformers runs one request at a time and in left-padded batches of 8 over the first
--hf-requests; its best rate is the baseline; the one-at-a-time ids are compared with hark's.

    .venv/bin/python benchmarks/image_chat.py [--requests 24] [--hf-requests 8] [--threads 1]
"""
import argparse
import os
import random
import sys
import tempfile

import torch
from PIL import Image

from common import Timer, peak_rss_mib, set_threads

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
QUESTIONS = ["What is in this picture?", "Describe the colours.", "Is it day or night?", "What stands out?",
             "Count the objects.", "Where was this taken?"]
TEMPLATE = "USER: {images}{question} ASSISTANT:"


def build(path: str, args):
    from conftest import make_byte_tokenizer, randomize
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import Qwen2Config
    tok = make_byte_tokenizer(path, ["<image>"])
    tok.padding_side = "left"
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=args.vision_layers,
                              num_attention_heads=12, image_size=224, patch_size=16)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=args.lm_layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         architectures=["LlavaForConditionalGeneration"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    randomize(model, std=0.02)
    model.eval()
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return model, tok


def workload(n: int, seed: int = 0):
    """(images, question, max_tokens) per request: random crops of the real photos."""
    rng = random.Random(seed)
    photos = [Image.open(os.path.join(DATA, f)).convert("RGB") for f in ("astronaut_160.jpg", "hubble_deep_field.jpg")]
    reqs = []
    for _ in range(n):
        images = []
        for _ in range(rng.choice((1, 1, 2))):
            p = rng.choice(photos)
            w, h = p.size
            cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            images.append(p.crop((x, y, x + cw, y + ch)))
        reqs.append((images, rng.choice(QUESTIONS), rng.randint(16, 128)))
    return reqs


def prompt_text(images, question) -> str:
    return TEMPLATE.format(images="<image>\n" * len(images), question=question)


def run_hark(path, reqs, prompt=prompt_text):
    """hark on the workload, prompts written by `prompt(images, question)`: (ids, tok/s, tokens, seconds)."""
    from hark import LLM, SamplingParams
    llm = LLM(path, max_num_seqs=64, max_num_batched_tokens=2048)
    prompts = [{"prompt": prompt(i, q), "multi_modal_data": {"image": i}} for i, q, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for *_, m in reqs]
    llm.generate(["warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return [list(o.outputs[0].token_ids) for o in outs], tokens / t.seconds, tokens, t.seconds


def report(name: str, params_m: float, reqs, threads: int, hark_result, run_reference) -> None:
    """Prints hark's rate, the reference's at batch 1 and 8 (`run_reference(batch_size)` ->
    (tok/s, tokens, seconds, ids)), the ids match at batch 1 and the ratio to the reference's best."""
    hark_ids, hark_rate, hark_tokens, hark_s = hark_result
    print(f"== {name}: random weights, {params_m:.0f} M params; {len(reqs)} requests, "
          f"{sum(len(i) for i, _, _ in reqs)} images, {sum(m for *_, m in reqs)} output tokens; {threads} threads")
    print(f"hark:                     {hark_rate:6.1f} tok/s  ({hark_tokens} tokens in {hark_s:.1f} s)")
    best = 0.0
    for batch_size in (1, 8):
        rate, tokens, seconds, ids = run_reference(batch_size)
        best = max(best, rate)
        line = f"transformers batch {batch_size:<2}:    {rate:6.1f} tok/s  ({tokens} tokens in {seconds:.1f} s)"
        if batch_size == 1:
            line += f"; greedy ids match hark's on {sum(a == b for a, b in zip(ids, hark_ids))}/{len(ids)} requests"
        print(line)
    print(f"hark / best transformers: {hark_rate / best:.2f}x")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


def llava_processor(path, tok):
    from transformers import AutoImageProcessor, LlavaProcessor
    return LlavaProcessor(AutoImageProcessor.from_pretrained(path), tok, patch_size=16,
                          num_additional_image_tokens=1, vision_feature_select_strategy="default")


def run_hf(model, tok, processor, reqs, batch_size: int, prompt=prompt_text, images_per_prompt: bool = False):
    """transformers generate over reqs in padded batches: (tok/s, tokens, seconds, ids). The processor
    gets the batch's images as one flat list, or one list per prompt (images_per_prompt)."""
    tokens, seconds, ids = 0, 0.0, []
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i: i + batch_size]
        new = max(m for *_, m in chunk)
        images = [im for im, _, _ in chunk] if images_per_prompt else [x for im, _, _ in chunk for x in im]
        inputs = processor(text=[prompt(im, q) for im, q, _ in chunk], images=images, return_tensors="pt",
                           padding=True)
        with Timer() as t, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        seconds += t.seconds
        tokens += sum(m for *_, m in chunk)
        ids += [row[inputs["input_ids"].shape[1]:][:m].tolist() for row, (*_, m) in zip(out, chunk)]
    return tokens / seconds, tokens, seconds, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    path = tempfile.mkdtemp(prefix="hark-image-bench-")
    model, tok = build(path, args)
    reqs = workload(args.requests)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    report("llava", params, reqs, args.threads, run_hark(path, reqs),
           lambda batch_size: run_hf(model, tok, llava_processor(path, tok), reqs[: args.hf_requests], batch_size))

if __name__ == "__main__":
    main()
