"""Decoded samples of any numeric type -> float32, integers scaled to [-1, 1)."""
import numpy as np

from hark.audio.errors import AudioError


def pcm_to_float32(samples: np.ndarray) -> np.ndarray:
    """Integer PCM scaled to [-1, 1); floats cast to float32."""
    kind, bits = samples.dtype.kind, 8 * samples.dtype.itemsize
    if kind == "f":
        return samples.astype(np.float32, copy=False)
    if kind == "i":
        return samples.astype(np.float32) * np.float32(2.0 ** (1 - bits))
    if kind == "u":
        return (samples.astype(np.float32) - np.float32(2 ** (bits - 1))) * np.float32(2.0 ** (1 - bits))
    raise AudioError(f"audio samples of type {samples.dtype} are not supported; use float or integer PCM")
