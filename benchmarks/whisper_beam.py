"""Beam search cost and quality on Whisper tiny.en (the built-in `LLM()`), 2 threads: beam 5 against
greedy, with hark's default fallback schedule and at temperature 0.

Two inputs: the five LibriVox clips of tests/data concatenated (24.7 s), and a messy mix (30.4 s) built
from them: clips 1-3 with 2 s pauses, clips 4-5 at 0.6 gain with 3 s pauses starting 4 s into clip 2
(two speakers overlapping), Gaussian noise (std 0.02) over all of it. WER is on a simple normalization
(lower case, no punctuation or hyphens, Mr./Mrs. spelled out) against the transcripts, for the mix in
the order the speakers start. --rounds N keeps each setting's fastest run (wall) on a shared machine;
CPU time (process) is reported too, being less sensitive to other load.

    .venv/bin/python benchmarks/whisper_beam.py [--rounds 3] [--threads 2]
"""
import argparse
import glob
import json
import os
import re
import time

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")


def normalize(text: str) -> str:
    text = text.lower().replace("mr.", "mister").replace("mrs.", "missus").replace("-", " ")
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text).split())


def inputs() -> dict[str, tuple[np.ndarray, str]]:
    wavs = sorted(glob.glob(os.path.join(DATA, "*.wav")))
    clips = [sf.read(w, dtype="float32")[0] for w in wavs]
    refs = [open(w[:-4] + ".txt").read() for w in wavs]
    pause = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)
    first = np.concatenate([np.concatenate([c, pause(2)]) for c in clips[:3]])
    second = np.concatenate([np.concatenate([c, pause(3)]) for c in clips[3:]])
    start = len(clips[0]) + 6 * SAMPLE_RATE
    mix = np.zeros(max(len(first), start + len(second)) + 2 * SAMPLE_RATE, np.float32)
    mix[:len(first)] += first
    mix[start:start + len(second)] += 0.6 * second
    mix += 0.02 * np.random.default_rng(0).standard_normal(len(mix)).astype(np.float32)
    return {"clean": (np.concatenate(clips), normalize(" ".join(refs))),
            "messy": (mix, normalize(" ".join(refs[:1] + refs[3:] + refs[1:3])))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import jiwer
    from hark import LLM
    llm = LLM(num_threads=args.threads)
    audio = inputs()
    llm.transcribe(audio["clean"][0][:5 * SAMPLE_RATE])      # warm-up
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, (samples, reference) in audio.items():
            for schedule, kwargs in (("default", {}), ("t0", {"temperature": 0.0})):
                for beam in (1, 5):
                    wall, cpu = time.perf_counter(), time.process_time()
                    text = llm.transcribe(samples, beam_size=beam, **kwargs).text
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    key = f"{name} {schedule} beam{beam}"
                    if key not in best or wall < best[key]["wall_s"]:
                        best[key] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                     "wer": round(jiwer.wer(reference, normalize(text)), 4)}
    for key, row in best.items():
        print(f"{key:24s} {json.dumps(row)}")
    for name in audio:
        for schedule in ("default", "t0"):
            b, g = best[f"{name} {schedule} beam5"], best[f"{name} {schedule} beam1"]
            print(f"{name} {schedule}: beam 5 / greedy = {b['wall_s'] / g['wall_s']:.2f}x wall, "
                  f"{b['cpu_s'] / g['cpu_s']:.2f}x CPU")


if __name__ == "__main__":
    main()
