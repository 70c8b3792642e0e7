"""Long-form chunking on speech regions: silero-vad finds speech, regions are packed into chunks of
at most `max_clip_duration_s`, silence between chunks is dropped. Without silero-vad and
onnxruntime it falls back to `split_audio`'s energy-based cuts.

silero-vad runs its "sequence" ONNX model (shipped in the pip package since 6.2, no hub access) on
onnxruntime with one thread: one call per 512 frames (16 s) instead of one per 32 ms frame, the same
per-frame probabilities as the streaming model (the LSTM state is carried inside the call), so the
same regions. On the 313 s conversation of benchmarks/whisper_cpu.py: 0.36 s against 0.97 s for the
streaming ONNX model called frame by frame (its TorchScript model is ~100x slower on two threads)."""
import functools
import threading

import numpy as np
import soxr

from hark.audio.split import split_audio

VAD_SAMPLE_RATE = 16000    # the sequence model's rate; other rates are resampled to it
_vad_lock = threading.Lock()  # one onnxruntime session, shared


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
    """[start, end) sample ranges of speech (silero-vad's default settings), or None when silero-vad
    (≥ 6.2) or onnxruntime is missing."""
    vad = _load_silero()
    if vad is None:
        return None
    model, timestamps_from_probs = vad
    vad_rate = VAD_SAMPLE_RATE
    vad_audio = audio if vad_rate == sample_rate else soxr.resample(audio, sample_rate, vad_rate)
    vad_audio = np.ascontiguousarray(vad_audio, np.float32).reshape(-1)
    with _vad_lock:
        probs = model.audio_forward(vad_audio, sampling_rate=vad_rate)
    stamps = timestamps_from_probs(probs, sampling_rate=vad_rate, audio_length_samples=len(vad_audio))
    scale = sample_rate / vad_rate
    return [(round(s["start"] * scale), min(len(audio), round(s["end"] * scale))) for s in stamps]


@functools.cache
def _load_silero():
    """silero-vad's sequence model (16 kHz) and its timestamp rule, or None."""
    try:
        import torch
        threads = torch.get_num_threads()  # importing silero_vad sets torch to one thread
        try:
            from silero_vad import load_silero_vad
            from silero_vad.utils_vad import get_speech_timestamps_from_probs
            return load_silero_vad(sequence=True), get_speech_timestamps_from_probs
        finally:
            torch.set_num_threads(threads)
    except (ImportError, TypeError):     # no silero-vad / onnxruntime, or a silero-vad before 6.2
        return None
