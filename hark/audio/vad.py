"""Long-form chunking on speech regions: silero-vad finds speech, regions are packed into chunks of
at most `max_clip_duration_s`, silence between chunks is dropped. Without silero-vad and
onnxruntime it falls back to `split_audio`'s energy-based cuts.

silero-vad runs its ONNX model (shipped in the pip package, no hub access) on onnxruntime with one
thread: the TorchScript model is ~100x slower on two threads here, and torch's thread count is
process-wide."""
import functools
import threading

import numpy as np
import soxr
import torch

from hark.audio.split import split_audio

VAD_SAMPLE_RATES = (8000, 16000)
_vad_lock = threading.Lock()  # the silero model keeps state between calls


def split_on_speech(audio: np.ndarray, sample_rate: int, max_clip_duration_s: float = 30.0) -> list[tuple[np.ndarray, float]]:
    """(chunk, start_s) pairs, each spanning one or more speech regions; [] when there is no speech."""
    regions = speech_regions(audio, sample_rate)
    if regions is None:
        return split_audio(audio, sample_rate, max_clip_duration_s)
    max_len = int(max_clip_duration_s * sample_rate)
    groups = []
    for start, end in regions:
        if groups and end - groups[-1][0] <= max_len:
            groups[-1][1] = end
        else:
            groups.append([start, end])
    chunks = []
    for start, end in groups:
        pieces = split_audio(audio[start:end], sample_rate, max_clip_duration_s)  # a region can be longer
        chunks += [(piece, start / sample_rate + offset) for piece, offset in pieces]
    return chunks


def speech_regions(audio: np.ndarray, sample_rate: int) -> list[tuple[int, int]] | None:
    """[start, end) sample ranges of speech, or None when silero-vad or onnxruntime is missing."""
    vad = _load_silero()
    if vad is None:
        return None
    model, get_speech_timestamps = vad
    vad_rate = sample_rate if sample_rate in VAD_SAMPLE_RATES else 16000
    vad_audio = audio if vad_rate == sample_rate else soxr.resample(audio, sample_rate, vad_rate)
    with _vad_lock:
        stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(vad_audio, np.float32)), model, sampling_rate=vad_rate)
    scale = sample_rate / vad_rate
    return [(round(s["start"] * scale), min(len(audio), round(s["end"] * scale))) for s in stamps]


@functools.cache
def _load_silero():
    """The silero-vad ONNX model and its timestamp function, or None."""
    threads = torch.get_num_threads()  # importing silero_vad sets torch to one thread
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad

        return load_silero_vad(onnx=True), get_speech_timestamps
    except ImportError:
        return None
    finally:
        torch.set_num_threads(threads)
