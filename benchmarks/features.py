"""hark's log-mel features vs transformers' WhisperFeatureExtractor, same audio, same run.

    .venv/bin/python benchmarks/features.py [--repeats 20] [--threads 1]

One thread by default, as the other benchmarks (see the README: on this shared 2-core machine two
OpenMP threads stall at barriers); --threads 2 gives the two-core figure.

Audio: the speech in tests/data, tiled to 8 clips of 30 s (the issue's case), then 8 clips of
3 - 10 s padded to 30 s (what a chat request batch looks like). Prints median and best times.
"""
import argparse
import glob
import pathlib
import statistics
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from hark.audio import load_audio
from hark.audio.mel import log_mel_spectrogram

DATA = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"


def timings(fn, repeats: int) -> list[float]:
    fn()  # warm up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def compare(name: str, audios: list[np.ndarray], repeats: int) -> None:
    extractor = WhisperFeatureExtractor(feature_size=80)
    reference = lambda: extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    ours = lambda: log_mel_spectrogram(audios, n_mels=80)[0]
    max_diff = (ours() - reference()).abs().max().item()
    # interleave so both see the same machine load
    hf, hark = [], []
    for _ in range(repeats):
        hf += timings(reference, 1)
        hark += timings(ours, 1)
    hf_med, hark_med = statistics.median(hf), statistics.median(hark)
    print(
        f"{name}: WhisperFeatureExtractor {1e3 * hf_med:.1f} ms (best {1e3 * min(hf):.1f}), "
        f"hark {1e3 * hark_med:.1f} ms (best {1e3 * min(hark):.1f}), "
        f"speed-up {hf_med / hark_med:.1f}x median, {min(hf) / min(hark):.1f}x best; max |diff| {max_diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speech = np.concatenate([load_audio(p) for p in sorted(glob.glob(str(DATA / "*.wav")))])
    tiled = np.tile(speech, -(-8 * 480000 // len(speech)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    compare("8 x 30 s", [tiled[i * 480000:(i + 1) * 480000] for i in range(8)], args.repeats)
    compare("8 x 3-10 s", [tiled[i * 480000:i * 480000 + 16000 * (3 + i)] for i in range(8)], args.repeats)


if __name__ == "__main__":
    main()
