"""Splitting long audio into model-sized chunks at quiet points (vLLM's speech-to-text semantics).

Chunks are contiguous and disjoint: concatenated they give back the input, and each comes with its
start time so timestamps map back exactly. `overlap_duration_s` is the search window before each
boundary in which the cut goes to the quietest RMS window, as in vLLM; chunks never overlap.
"""
import numpy as np


def split_audio(
    audio: np.ndarray,
    sample_rate: int,
    max_clip_duration_s: float = 30.0,
    overlap_duration_s: float = 1.0,
    min_energy_window_size: int = 1600,
) -> list[tuple[np.ndarray, float]]:
    """(chunk, start_s) pairs of at most `max_clip_duration_s` each; `audio` is (time,) or
    (channels, time), split along the last axis."""
    chunk_size = int(sample_rate * max_clip_duration_s)
    search_size = int(sample_rate * overlap_duration_s)
    if chunk_size <= 0 or not 0 <= search_size < chunk_size or min_energy_window_size <= 0:
        raise ValueError(
            "split_audio needs max_clip_duration_s > 0, 0 <= overlap_duration_s < max_clip_duration_s "
            "and min_energy_window_size > 0"
        )
    length = audio.shape[-1]
    chunks, start = [], 0
    while length - start > chunk_size:
        boundary = start + chunk_size
        cut = find_split_point(audio, boundary - search_size, boundary, min_energy_window_size)
        chunks.append((audio[..., start:cut], start / sample_rate))
        start = cut
    chunks.append((audio[..., start:], start / sample_rate))
    return chunks


def find_split_point(audio: np.ndarray, start: int, end: int, window_size: int) -> int:
    """Start of the quietest (lowest RMS, first on ties) whole window in audio[..., start:end];
    `start` itself when no whole window fits."""
    n_windows = (end - start) // window_size
    if n_windows == 0:
        return start
    segment = audio[..., start:start + n_windows * window_size].astype(np.float64)
    windows = segment.reshape(*segment.shape[:-1], n_windows, window_size)
    energy = np.sqrt(np.square(windows).mean(axis=-1))
    if energy.ndim > 1:  # (channels, windows): all channels count
        energy = energy.mean(axis=tuple(range(energy.ndim - 1)))
    return start + int(np.argmin(energy)) * window_size
