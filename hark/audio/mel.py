"""Whisper's log-mel spectrogram in torch, batched, matching transformers' WhisperFeatureExtractor.

Per item: zero-pad (or truncate) to n_frames * 160 samples, reflect-pad 200 on each side, periodic
Hann window of 400, |rfft|^2, slaney mel filters up to 8 kHz, log10 of max(mel, 1e-10), clamp to
(item max - 8), then (x + 4) / 4. Frames whose window holds only padding zeros are not computed:
their log-mel is exactly log10(1e-10) = -10 before the clamp.
"""
import functools

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
LOG_FLOOR = -10.0  # log10 of the 1e-10 power floor


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    """[N_FFT // 2 + 1, n_mels] slaney-normalised slaney-scale filters over 0 - 8 kHz."""
    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
        max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )
    return torch.from_numpy(filters).to(device, torch.float32)


@functools.lru_cache(maxsize=None)
def hann_window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def log_mel_spectrogram(
    audios: list[np.ndarray | torch.Tensor], n_mels: int = 80, n_frames: int | None = 3000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features float32 [B, n_mels, n_frames] and mask bool [B, n_frames], True on frames from real
    samples (len(audio) // 160). Audio is 16 kHz mono; `n_frames=None` pads to the longest item,
    longer items are truncated to n_frames * 160 samples (split them first)."""
    audios = [torch.as_tensor(audio) for audio in audios]
    if not audios or any(audio.ndim != 1 for audio in audios):
        raise ValueError("log_mel_spectrogram takes a non-empty list of 1-D (mono, 16 kHz) audio arrays")
    device = audios[0].device
    lengths = torch.tensor([len(audio) for audio in audios])
    n_samples = n_frames * HOP_LENGTH if n_frames is not None else max(int(lengths.max()), N_FFT)
    n_frames = n_samples // HOP_LENGTH
    padded = torch.zeros(len(audios), n_samples + N_FFT, device=device)
    for row, audio in zip(padded, audios):
        audio = audio[:n_samples]
        row[N_FFT // 2:N_FFT // 2 + len(audio)] = audio
    half = N_FFT // 2  # reflect padding, as torch.stft(center=True)
    padded[:, :half] = padded[:, half + 1:2 * half + 1].flip(-1)
    padded[:, -half:] = padded[:, -2 * half - 1:-half - 1].flip(-1)

    longest = min(int(lengths.max()), n_samples)
    n_computed = min(n_frames, -(-(longest + half) // HOP_LENGTH))  # later frames see only zeros
    frames = padded.unfold(-1, N_FFT, HOP_LENGTH)[:, :n_computed] * hann_window(device)
    spectrum = torch.fft.rfft(frames)
    power = spectrum.real.square() + spectrum.imag.square()
    log_mel = (power @ mel_filters(n_mels, device)).clamp_(min=1e-10).log10_()

    features = torch.full((len(audios), n_mels, n_frames), LOG_FLOOR, device=device)
    features[:, :, :n_computed] = log_mel.transpose(1, 2)
    item_max = features.amax(dim=(1, 2), keepdim=True)
    features = (torch.maximum(features, item_max - 8.0) + 4.0) / 4.0
    mask = torch.arange(n_frames) < (lengths // HOP_LENGTH)[:, None]
    return features, mask.to(device)
