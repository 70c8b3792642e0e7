"""Phi-4-multimodal's log-mel filterbank features, as transformers' Phi4MultimodalFeatureExtractor computes
them for one clip (a batch there zero-pads each clip; hark featurises each clip on its own).

For L samples at 16 kHz: (L - 400) // 160 + 1 frames of 400 samples every 160 (no centring: the last
samples that do not fill a frame are dropped). Each frame: pre-emphasis within the frame (x[i] - 0.97
x[i-1], the first sample taking itself as its predecessor), times 32768, a symmetric Hamming window,
|rfft(512)|^2, 80 triangular filters spaced and shaped on Kaldi's mel scale (1127 ln(1 + f / 700))
over 0 - 7690 Hz without area normalisation, then ln(max(., 1)). Whisper's log-mel (hark.audio.mel)
differs in every step (centred Hann frames of 400, slaney filters, log10, dynamic-range clamp).
"""
import functools

import numpy as np
import torch

SAMPLE_RATE = 16000
WIN_LENGTH = 400
HOP_LENGTH = 160
N_FFT = 512
PREEMPHASIS = 0.97
MEL_MAX_HZ = 7690.0
CHUNK_FRAMES = 1000          # frames per cache-sized chunk (as hark.audio.mel)


def num_frames(num_samples: int) -> int:
    """Feature frames of a clip of num_samples samples (0 when shorter than one window)."""
    return max(0, (num_samples - WIN_LENGTH) // HOP_LENGTH + 1)


def kaldi_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> torch.Tensor:
    """[N_FFT // 2 + 1, n_mels]: triangles between neighbouring centres equally spaced in Kaldi mels,
    the FFT bins placed on the same scale (triangular in mel space), peak 1."""
    edges = np.linspace(kaldi_mel(0.0), kaldi_mel(MEL_MAX_HZ), n_mels + 2)
    bins = kaldi_mel(np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT)
    rising = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling))).float()


@functools.lru_cache(maxsize=None)
def hamming_window() -> torch.Tensor:
    return torch.hamming_window(WIN_LENGTH, periodic=False, dtype=torch.float64)


def log_fbank(samples: np.ndarray | torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """float32 [num_frames(len(samples)), n_mels] features of one 16 kHz mono clip."""
    audio = torch.as_tensor(samples, dtype=torch.float32)
    if audio.ndim != 1:
        raise ValueError("log_fbank takes one 1-D (mono, 16 kHz) audio array")
    n = num_frames(len(audio))
    out = torch.empty(n, n_mels)
    if n == 0:
        return out
    frames = audio.unfold(0, WIN_LENGTH, HOP_LENGTH)
    filters, window = mel_filters(n_mels), hamming_window()
    for first in range(0, n, CHUNK_FRAMES):
        chunk = frames[first:first + CHUNK_FRAMES]
        previous = torch.cat((chunk[:, :1], chunk[:, :-1]), dim=1)
        emphasised = (chunk - PREEMPHASIS * previous) * 32768
        spectrum = torch.fft.rfft(window * emphasised, n=N_FFT).to(torch.complex64)
        power = spectrum.abs() ** 2
        out[first:first + len(chunk)] = (power @ filters).clamp_(min=1.0).log_()
    return out
