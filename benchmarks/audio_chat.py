"""Audio chat throughput: hark vs transformers `generate` on the same random-weight Qwen2-Audio.

Model (random weights, float32; `--dtype bfloat16` runs both engines in bfloat16), sized so the whole comparison runs in minutes on 2 CPU cores: a
whisper-tiny-sized audio encoder (4 layers, d_model 384, 6 heads, FFN 1536, 128 mel bins, 30 s
window: 750 audio tokens) and a Qwen2 LM of Qwen2-0.5B's width (hidden 896, 14 heads, 2 KV heads,
FFN 4864; `--lm-hidden 512` gives a 512-wide, FFN 2048, 8-head LM) with 4 layers and a
byte-level vocabulary (~260 tokens): about 70 M parameters in all (24 M at width 512).

Workload: 32 requests, each a 5-30 s clip of real speech (tests/data, concatenated and repeated
to length) and a question, greedy with mixed output lengths 32-256 (ignore_eos). transformers
runs its own processor + generate one request at a time and in left-padded batches of 8 and 16
over the first --hf-requests requests; its best rate is the baseline.

Second scenario: 8 questions about one 30 s clip, sent one after another (a conversation about a
recording); hark with its encoder and prefix caches against hark with both off.

    .venv/bin/python benchmarks/audio_chat.py [--requests 32] [--hf-requests 16] [--threads 1]

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

from common import Timer, peak_rss_mib, set_threads

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
QUESTIONS = ["What is said in this recording?", "Who is speaking?", "Summarize the audio.",
             "What is the mood of the speaker?", "Transcribe the first sentence.", "Is there any music?",
             "How many people speak?", "What language is this?"]


def build_checkpoint(path: str, lm_layers: int, lm_hidden: int = 896):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"])
    tok.save_pretrained(path)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=lm_hidden,
                         intermediate_size=4864 if lm_hidden == 896 else 4 * lm_hidden,
                         num_hidden_layers=lm_layers, num_attention_heads=lm_hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tok.eos_token_id),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"), architectures=["Qwen2AudioForConditionalGeneration"])
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return model, tok


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


def run_hark(path, reqs, **engine_kwargs):
    from hark import LLM, SamplingParams
    llm = LLM(path, max_num_seqs=64, max_num_batched_tokens=2048, **engine_kwargs)
    prompts = [{"prompt": PLACEHOLDER + q, "multi_modal_data": {"audio": (a, 16000)}} for a, q, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for *_, m in reqs]
    llm.generate(["warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return llm, tokens / t.seconds, tokens, t.seconds


def run_hf(model, tok, reqs, batch_size: int, dtype: torch.dtype):
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
    tok.padding_side = "left"
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tok)
    tokens, seconds = 0, 0.0
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i: i + batch_size]
        new = max(m for *_, m in chunk)              # one generate call runs to the longest request
        with Timer() as t:
            inputs = processor(text=[PLACEHOLDER + q for _, q, _ in chunk], audio=[a for a, _, _ in chunk],
                               sampling_rate=16000, return_tensors="pt", padding=True)
            inputs["input_features"] = inputs["input_features"].to(dtype)
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=tok.eos_token_id)
        seconds += t.seconds
        tokens += sum(m for *_, m in chunk)          # the tokens the requests asked for
    return tokens / seconds, tokens, seconds


def questions_about_one_clip(path, caches: bool, dtype: str):
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
            out = llm.generate({"prompt": PLACEHOLDER + q, "multi_modal_data": {"audio": clip}}, params,
                               use_tqdm=False)[0]
            cached += out.num_cached_tokens
    return t.seconds, llm.llm_engine.runner.encoder_items, cached


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--hf-requests", type=int, default=16)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--lm-hidden", type=int, default=896, help="896 (Qwen2-0.5B's width) or 512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both engines' dtype")
    args = ap.parse_args()
    set_threads(args.threads)
    path = tempfile.mkdtemp(prefix="hark-audio-bench-")
    model, tok = build_checkpoint(path, args.lm_layers, args.lm_hidden)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    reqs = workload(args.requests)
    audio_s = sum(len(a) for a, _, _ in reqs) / 16000
    print(f"model: random Qwen2-Audio, {params:.0f} M params; {len(reqs)} requests, {audio_s:.0f} s of audio, "
          f"{sum(m for *_, m in reqs)} output tokens; {args.dtype}, {args.threads} threads")

    llm, hark_rate, hark_tokens, hark_s = run_hark(path, reqs, dtype=args.dtype)
    stats = llm.llm_engine.stats()
    print(f"hark:                     {hark_rate:6.1f} tok/s  ({hark_tokens} tokens in {hark_s:.1f} s; "
          f"{stats['encoder_calls']} batched encoder calls; KV holds "
          f"{stats['max_concurrent_30s_audio_requests']} concurrent 30 s requests)")
    del llm
    model.to(getattr(torch, args.dtype))
    hf = {}
    for batch_size in (1, 8, 16):
        rate, tokens, seconds = run_hf(model, tok, reqs[: args.hf_requests], batch_size, getattr(torch, args.dtype))
        hf[batch_size] = rate
        print(f"transformers batch {batch_size:<2}:    {rate:6.1f} tok/s  ({tokens} tokens in {seconds:.1f} s)")
    best = max(hf.values())
    print(f"hark / best transformers: {hark_rate / best:.2f}x")

    for caches in (True, False):
        seconds, encoded, cached = questions_about_one_clip(path, caches, args.dtype)
        label = "caches on " if caches else "caches off"
        print(f"8 questions about one 30 s clip, {label}: {seconds:5.1f} s, encoder ran on {encoded} item(s), "
              f"{cached} prompt tokens from the prefix cache")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
