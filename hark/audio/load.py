"""`load_audio`: any audio a user hands in -> float32 mono at the model's sample rate."""
import os

import numpy as np
import soxr
import torch

from hark.audio.decode import decode_audio
from hark.audio.pcm import pcm_to_float32
from hark.audio.errors import AudioError, NonFiniteAudioError
from hark.audio.limits import (
    BYTES_PER_SAMPLE,
    AudioLimits,
    check_channels,
    check_decoded,
    check_input_bytes,
    check_min_duration,
    check_sample_rate,
)

CHANNEL_LAYOUTS = ("channels_first", "channels_last")  # (channels, time) torchaudio; (time, channels) soundfile


def load_audio(
    source,
    target_sr: int = 16000,
    *,
    limits: AudioLimits | None = None,
    channel_layout: str | None = None,
) -> np.ndarray:
    """Float32 mono audio at `target_sr`, in [-1, 1] for integer input.

    `source` is a path, encoded bytes, a binary file-like object, an `(array, sample_rate)` tuple
    (numpy or torch), or a bare numpy array / torch tensor taken to be at `target_sr` already.
    Encoded data is recognised from its content, not a file name. A 2-D array is mixed to mono; its
    layout is `channel_layout` ("channels_first" or "channels_last") or, when None, inferred as
    vLLM does: the longer axis is time. Raises an `AudioError` subclass for anything the caller can
    fix (caps in `limits`, default `AudioLimits()`).
    """
    limits = limits or AudioLimits()
    check_sample_rate(target_sr)
    if channel_layout not in (None, *CHANNEL_LAYOUTS):
        raise ValueError(f"channel_layout must be None or one of {CHANNEL_LAYOUTS}, not {channel_layout!r}")
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("an audio tuple must be (samples, sample_rate)")
        samples, sample_rate = source
        return load_samples(samples, int(sample_rate), target_sr, limits, channel_layout)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return load_samples(source, target_sr, target_sr, limits, channel_layout)
    return decode_audio(read_encoded(source, limits), target_sr, limits)


def read_encoded(source, limits: AudioLimits) -> bytes:
    """The bytes of an encoded file, refusing more than `limits.max_input_bytes`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        check_input_bytes(len(source), limits)
        return bytes(source)
    if isinstance(source, str) and source.startswith(("http://", "https://", "data:")):
        raise AudioError("load_audio does not fetch URLs; fetch the audio first and pass its bytes")
    if isinstance(source, (str, os.PathLike)):
        check_input_bytes(os.path.getsize(source), limits)
        with open(source, "rb") as f:
            data = f.read(limits.max_input_bytes + 1)
    elif hasattr(source, "read"):
        data = source.read(limits.max_input_bytes + 1)
        if not isinstance(data, bytes):
            raise AudioError("a file-like audio source must be opened in binary mode")
    else:
        raise AudioError(
            f"cannot load audio from a {type(source).__name__}; pass a path, bytes, a binary file, "
            "an (array, sample_rate) tuple or a torch tensor"
        )
    check_input_bytes(len(data), limits)
    return data


def load_samples(samples, sample_rate: int, target_sr: int, limits: AudioLimits, channel_layout: str | None) -> np.ndarray:
    """Validate, mix to mono and resample decoded samples."""
    check_sample_rate(sample_rate)
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        samples = (samples.float() if samples.dtype in (torch.bfloat16, torch.float16) else samples).numpy()
    samples = np.asarray(samples)
    if samples.ndim == 2:
        channels_first = samples.shape[0] <= samples.shape[1] if channel_layout is None else channel_layout == "channels_first"
        if not channels_first:
            samples = samples.T
    elif samples.ndim == 1:
        samples = samples[None]
    else:
        raise AudioError(f"audio must be 1-D (time) or 2-D (channels and time), not of shape {samples.shape}")
    channels, length = samples.shape
    check_channels(channels, limits)
    check_decoded(length, sample_rate, length * channels * BYTES_PER_SAMPLE, limits)
    check_min_duration(length, sample_rate)
    samples = pcm_to_float32(samples)
    mono = samples[0] if channels == 1 else samples.mean(axis=0)
    if not np.isfinite(mono).all():
        raise NonFiniteAudioError("the audio contains NaN or infinite samples")
    if sample_rate != target_sr:
        mono = soxr.resample(mono, sample_rate, target_sr, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
