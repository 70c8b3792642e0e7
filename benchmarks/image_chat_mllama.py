"""Image chat throughput with cross-attention: hark vs transformers `generate` on the same random-weight
Llama-3.2-Vision-shaped (mllama) model, on benchmarks/image_chat.py's workload.

Random weights, float32: a tiled vision tower at ViT-B/16's size (hidden 768, 12 heads, FFN 3072;
--vision-layers local + 2 global layers; 224-pixel tiles, up to 4 per image, 197 tokens each) and an LM
of Qwen2-0.5B's width (hidden 896, 14 heads, 2 KV heads, FFN 4864) with --lm-layers self-attention layers
and 2 cross-attention layers among them, byte-level vocabulary. Both sides use the checkpoint's
MllamaImageProcessor. Each prompt is its images' `<|image|>`s, then the question.

    .venv/bin/python benchmarks/image_chat_mllama.py [--requests 24] [--hf-requests 8] [--threads 1]
"""
import argparse
import os
import sys
import tempfile

import torch

from common import set_threads
from image_chat import report, run_hark, run_hf, workload

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build(path: str, args):
    from conftest import make_byte_tokenizer, randomize
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    tok = make_byte_tokenizer(path, ["<|begin_of_text|>", "<|image|>"])
    tok.bos_token, tok.padding_side = "<|begin_of_text|>", "left"
    tok.save_pretrained(path)
    image_id = tok.convert_tokens_to_ids("<|image|>")
    layers = args.lm_layers + 2
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=args.vision_layers, num_global_layers=2,
                  attention_heads=12, image_size=224, patch_size=16, max_num_tiles=4,
                  intermediate_layers_indices=[1, args.vision_layers - 1], vision_output_dim=768 * 3)
    text = dict(vocab_size=image_id, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                num_attention_heads=14, num_key_value_heads=2, cross_attention_layers=[1, layers - 2],
                max_position_embeddings=4096, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.eos_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          architectures=["MllamaForConditionalGeneration"])
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    randomize(model, std=0.02)
    model.eval()
    model.save_pretrained(path)
    MllamaImageProcessorPil(size={"height": 224, "width": 224}, max_image_tiles=4).save_pretrained(path)
    return model, tok


def prompt_text(images, question) -> str:
    return "<|image|>" * len(images) + question


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    path = tempfile.mkdtemp(prefix="hark-mllama-bench-")
    model, tok = build(path, args)
    reqs = workload(args.requests)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    from transformers import AutoImageProcessor, MllamaProcessor
    processor = MllamaProcessor(AutoImageProcessor.from_pretrained(path), tok)
    report("mllama", params, reqs, args.threads, run_hark(path, reqs, prompt_text),
           lambda batch_size: run_hf(model, tok, processor, reqs[: args.hf_requests], batch_size, prompt_text,
                                     images_per_prompt=True))


if __name__ == "__main__":
    main()
