"""Whisper's log-mel spectrogram in torch, batched, matching transformers' WhisperFeatureExtractor.

Per item: zero-pad (or truncate) to n_frames * 160 samples, reflect-pad 200 on each side, periodic
Hann window of 400, |rfft|^2, slaney mel filters up to 8 kHz, log10 of max(mel, 1e-10), clamp to
(item max - 8), then (x + 4) / 4. Frames whose window holds only padding zeros are not computed:
their log-mel is exactly log10(1e-10) = -10 before the clamp.

Valid frames (the mask): ceil(L / 160) for L samples, the frames whose window centre is a real
sample; WhisperFeatureExtractor's attention_mask is the sample mask taken every 160th sample, so
a last partial hop counts (2.79 s = 44,580 samples -> 279 frames, not 278). Padding to the longest
item (n_frames=None) pads to a whole number of hops, ceil(L / 160) * 160 samples, as Ultravox's
processor asks the extractor to (pad_to_multiple_of=160), so every valid frame is in the features.

On CPU the frames go through in chunks that stay in cache (window, FFT, power, mel, log on one chunk
before the next), and the mel product skips the filter bank's zeros: each filter touches only a few
neighbouring frequency bins, so the filters are multiplied in groups, each over the bins its group
covers. Both are about memory traffic, not arithmetic: one pass over the whole batch per step
costs more than the step itself.
"""
import functools

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
LOG_FLOOR = -10.0  # log10 of the 1e-10 power floor
CHUNK_FRAMES = 1000  # frames per cache-sized chunk on CPU (1.6 MB of windowed frames)
GROUP_COST = 300  # a filter group's fixed cost, in multiply-adds per frame, when choosing groups


def hertz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step)


def slaney_mel_to_hertz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    """[N_FFT // 2 + 1, n_mels] slaney-normalised slaney-scale filters over 0 - 8 kHz (librosa's and
    transformers' WhisperFeatureExtractor's): triangles between neighbouring mel-spaced centres, each
    scaled to unit area."""
    edges = slaney_mel_to_hertz(np.linspace(0.0, hertz_to_slaney_mel(8000.0), n_mels + 2))
    bins = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    rising = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])
    filters = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))
    return torch.from_numpy(filters).to(device, torch.float32)


@functools.lru_cache(maxsize=None)
def filter_groups(n_mels: int) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """The filters split into runs (first, end, first bin, end bin, weights [filters, bins]) that
    minimise the multiply-adds of the grouped product plus GROUP_COST per group."""
    filters = mel_filters(n_mels, torch.device("cpu"))
    nonzero = filters > 0
    lo = [int(nonzero[:, m].nonzero().min()) if nonzero[:, m].any() else 0 for m in range(n_mels)]
    hi = [int(nonzero[:, m].nonzero().max()) + 1 if nonzero[:, m].any() else 1 for m in range(n_mels)]
    best, start = [0.0] + [float("inf")] * n_mels, [0] * (n_mels + 1)
    for end in range(1, n_mels + 1):
        for first in range(end):
            cost = best[first] + (end - first) * (max(hi[first:end]) - min(lo[first:end])) + GROUP_COST
            if cost < best[end]:
                best[end], start[end] = cost, first
    groups, end = [], n_mels
    while end > 0:
        first = start[end]
        bin_lo, bin_hi = min(lo[first:end]), max(hi[first:end])
        groups.append((first, end, bin_lo, bin_hi, filters[bin_lo:bin_hi, first:end].t().contiguous()))
        end = first
    return tuple(reversed(groups))


@functools.lru_cache(maxsize=None)
def hann_window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def valid_frames(num_samples: int) -> int:
    """Mel frames that hold real audio for num_samples samples: ceil(num_samples / 160)."""
    return -(-num_samples // HOP_LENGTH)


def log_mel_spectrogram(
    audios: list[np.ndarray | torch.Tensor], n_mels: int = 80, n_frames: int | None = 3000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features float32 [B, n_mels, n_frames] and mask bool [B, n_frames], True on the
    valid_frames(len(audio)) frames from real samples. Audio is 16 kHz mono; `n_frames=None` pads
    to the longest item's valid frames (at least 2), longer items are truncated to n_frames * 160
    samples (split them first)."""
    audios = [torch.as_tensor(audio) for audio in audios]
    if not audios or any(audio.ndim != 1 for audio in audios):
        raise ValueError("log_mel_spectrogram takes a non-empty list of 1-D (mono, 16 kHz) audio arrays")
    device = audios[0].device
    lengths = torch.tensor([len(audio) for audio in audios])
    if n_frames is None:
        n_frames = max(valid_frames(int(lengths.max())), 2)   # reflect padding needs > N_FFT // 2 samples
    n_samples = n_frames * HOP_LENGTH
    if device.type == "cpu":
        features = _log_mel_chunked(audios, n_mels, n_samples)
    else:
        features = _log_mel_batched(audios, n_mels, n_samples)
    mask = torch.arange(n_frames) < (-(-lengths // HOP_LENGTH))[:, None]
    return features, mask.to(device)


def _computed_frames(length: int, n_samples: int) -> int:
    """Frames up to the last one whose window reaches a real sample; later ones see only zeros."""
    return min(n_samples // HOP_LENGTH, -(-(min(length, n_samples) + N_FFT // 2) // HOP_LENGTH))


def _reflect_pad(row: torch.Tensor) -> None:
    """Fill the N_FFT // 2 samples at each end of `row` (last dim) by reflection, as torch.stft(center=True)."""
    half = N_FFT // 2
    row[..., :half] = row[..., half + 1:2 * half + 1].flip(-1)
    row[..., -half:] = row[..., -2 * half - 1:-half - 1].flip(-1)


def _log_mel_chunked(audios: list[torch.Tensor], n_mels: int, n_samples: int) -> torch.Tensor:
    n_frames = n_samples // HOP_LENGTH
    window, groups = hann_window(torch.device("cpu")), filter_groups(n_mels)
    features = torch.empty(len(audios), n_mels, n_frames)
    row = torch.empty(n_samples + N_FFT)  # one item, padded; reused
    frames = torch.empty(CHUNK_FRAMES * N_FFT)
    power = torch.empty(CHUNK_FRAMES * (N_FFT // 2 + 1))
    for item, audio in enumerate(audios):
        audio = audio[:n_samples].to(torch.float32)
        computed = _computed_frames(len(audio), n_samples)
        start = N_FFT // 2
        row[start:start + len(audio)] = audio
        row[start + len(audio):] = 0.0
        _reflect_pad(row)
        all_frames = row.unfold(0, N_FFT, HOP_LENGTH)
        for first in range(0, computed, CHUNK_FRAMES):
            count = min(CHUNK_FRAMES, computed - first)
            chunk = frames[:count * N_FFT].view(count, N_FFT)
            torch.mul(all_frames[first:first + count], window, out=chunk)
            spectrum = torch.view_as_real(torch.fft.rfft(chunk)).square_()
            chunk_power = power[:count * (N_FFT // 2 + 1)].view(count, N_FFT // 2 + 1)
            torch.add(spectrum[..., 0], spectrum[..., 1], out=chunk_power)
            out = features[item, :, first:first + count]
            for mel_lo, mel_hi, bin_lo, bin_hi, weights in groups:
                torch.mm(weights, chunk_power[:, bin_lo:bin_hi].t(), out=out[mel_lo:mel_hi])
            out.clamp_(min=1e-10).log10_()
        features[item, :, computed:] = LOG_FLOOR
    bound = features.amax(dim=(1, 2), keepdim=True) - 8.0
    return features.clamp_(min=bound).add_(4.0).div_(4.0)


def _log_mel_batched(audios: list[torch.Tensor], n_mels: int, n_samples: int) -> torch.Tensor:
    """The whole batch in one pass of each step: the better shape for a GPU."""
    device = audios[0].device
    padded = torch.zeros(len(audios), n_samples + N_FFT, device=device)
    for row, audio in zip(padded, audios):
        audio = audio[:n_samples]
        row[N_FFT // 2:N_FFT // 2 + len(audio)] = audio
    _reflect_pad(padded)
    computed = max(_computed_frames(len(audio), n_samples) for audio in audios)
    frames = padded.unfold(-1, N_FFT, HOP_LENGTH)[:, :computed] * hann_window(device)
    spectrum = torch.fft.rfft(frames)
    power = spectrum.real.square() + spectrum.imag.square()
    log_mel = (power @ mel_filters(n_mels, device)).clamp_(min=1e-10).log10_()
    features = torch.full((len(audios), n_mels, n_samples // HOP_LENGTH), LOG_FLOOR, device=device)
    features[:, :, :computed] = log_mel.transpose(1, 2)
    bound = features.amax(dim=(1, 2), keepdim=True) - 8.0
    return (torch.maximum(features, bound) + 4.0) / 4.0
