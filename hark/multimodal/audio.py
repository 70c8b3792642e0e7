"""vllm.multimodal.audio's helpers under the same path and signature, for code written against vLLM:
`split_audio(audio_data=..., sample_rate=..., max_clip_duration_s=..., overlap_duration_s=...,
min_energy_window_size=...)` returns the chunks (numpy arrays, split along the last axis).

The cut before each boundary goes to the quietest `min_energy_window_size` window of the
`overlap_duration_s` before it; chunks are contiguous and never overlap. (hark.audio.split_audio is
the same split with each chunk's start time, which hark's own transcription uses.)
"""
import numpy as np

from hark.audio import split


def split_audio(audio_data: np.ndarray, sample_rate: int, max_clip_duration_s: float, overlap_duration_s: float,
                min_energy_window_size: int) -> list[np.ndarray]:
    chunks = split.split_audio(np.asarray(audio_data), sample_rate, max_clip_duration_s, overlap_duration_s,
                               min_energy_window_size)
    return [chunk for chunk, _ in chunks]


def find_split_point(wav: np.ndarray, start_idx: int, end_idx: int, min_energy_window: int) -> int:
    return split.find_split_point(np.asarray(wav), start_idx, end_idx, min_energy_window)
