"""log_mel_spectrogram against transformers' WhisperFeatureExtractor on real speech."""
import glob
import pathlib

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from hark.audio import load_audio, log_mel_spectrogram

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [load_audio(p) for p in sorted(glob.glob(str(DATA / "*.wav")))]


def reference(audios, n_mels, **kwargs) -> torch.Tensor:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(audios, sampling_rate=16000, return_tensors="pt", **kwargs).input_features


@pytest.mark.parametrize("n_mels", [80, 128])
def test_matches_whisper_feature_extractor_padded_to_30_s(clips, n_mels):
    features, mask = log_mel_spectrogram(clips, n_mels=n_mels)
    assert features.shape == (len(clips), n_mels, 3000) and features.dtype == torch.float32
    assert (features - reference(clips, n_mels)).abs().max() < 1e-3
    assert mask.shape == (len(clips), 3000) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(c) // 160 for c in clips]
    assert all(mask[i, : len(c) // 160].all() for i, c in enumerate(clips))


# 2.79 s, 12.34 s, 29.99 s and 30.01 s of speech, a few samples either side of a hop, and tiny clips
ODD_LENGTHS = [44_580, 197_443, 479_839, 480_161, 160 * 250 + 1, 160 * 250 - 1, 1, 159, 161, 399]


@pytest.fixture(scope="module")
def odd_clips(clips) -> list[np.ndarray]:
    speech = np.concatenate(clips * 2)
    return [speech[1000: 1000 + n] for n in ODD_LENGTHS]


def test_odd_lengths_match_the_extractor_and_its_attention_mask(odd_clips):
    extractor = WhisperFeatureExtractor(feature_size=128)
    ref = extractor(odd_clips, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    features, mask = log_mel_spectrogram(odd_clips, n_mels=128)
    assert (features - ref.input_features).abs().max() < 1e-3
    assert torch.equal(mask, ref.attention_mask.bool())          # a last partial hop counts: ceil(L / 160)
    assert [int(mask[i].sum()) for i in (0, 2, 3, 6)] == [279, 2999, 3000, 1]


def test_odd_lengths_padded_to_the_longest_match_pad_to_multiple_of_a_hop(odd_clips):
    # what Ultravox's processor asks of the extractor: padding="longest", pad_to_multiple_of=160
    extractor = WhisperFeatureExtractor(feature_size=80)
    for clip in [c for c in odd_clips if 200 < len(c) < 480_000]:     # the extractor's STFT needs > 200
        ref = extractor(clip, sampling_rate=16000, return_tensors="pt", padding="longest", pad_to_multiple_of=160,
                        truncation=False, return_attention_mask=True)
        features, mask = log_mel_spectrogram([clip], n_frames=None)
        assert features.shape == ref.input_features.shape == (1, 80, -(-len(clip) // 160))
        assert (features - ref.input_features).abs().max() < 1e-3
        assert torch.equal(mask, ref.attention_mask.bool())


def test_matches_on_full_and_overlong_audio(clips):
    speech = np.concatenate(clips * 2)  # 49 s: truncated to 30 s like the reference
    features, mask = log_mel_spectrogram([speech, speech[:480000]])
    ref = reference([speech], 80)
    assert (features[0] - ref[0]).abs().max() < 1e-3 and (features[1] - ref[0]).abs().max() < 1e-3
    assert mask.all()


def test_pad_to_longest_and_to_a_given_length(clips):
    features, mask = log_mel_spectrogram(clips, n_frames=None)
    longest = max(len(c) for c in clips)
    assert features.shape == (len(clips), 80, longest // 160)
    assert (features - reference(clips, 80, padding="longest")).abs().max() < 1e-3
    assert mask.sum(1).tolist() == [len(c) // 160 for c in clips]

    features, mask = log_mel_spectrogram(clips, n_frames=1000)  # 10 s
    assert features.shape == (len(clips), 80, 1000)
    ref = reference(clips, 80, padding="max_length", max_length=160_000, truncation=True)
    assert (features - ref).abs().max() < 1e-3


def test_batched_equals_one_by_one_and_accepts_tensors(clips):
    batched, _ = log_mel_spectrogram(clips)
    for i, clip in enumerate(clips):
        single, _ = log_mel_spectrogram([torch.from_numpy(clip)])
        assert torch.equal(single[0], batched[i])


def test_silence_and_bad_input():
    features, mask = log_mel_spectrogram([np.zeros(16000, np.float32)])
    assert (features == (-10.0 + 4) / 4).all() and mask.sum() == 100
    assert (features - reference([np.zeros(16000, np.float32)], 80)).abs().max() < 1e-3
    with pytest.raises(ValueError):
        log_mel_spectrogram([])
    with pytest.raises(ValueError):
        log_mel_spectrogram([np.zeros((2, 16000), np.float32)])


@pytest.mark.parametrize("n_mels", [80, 128])
def test_gpu_shaped_path_matches_the_cpu_chunked_path(clips, n_mels):
    # the batched one-pass path runs on GPUs; check it here against the chunked CPU path, with
    # lengths that end inside a chunk, on a chunk edge, and past the window
    from hark.audio import mel
    audios = [torch.from_numpy(c) for c in clips] + [torch.from_numpy(np.concatenate(clips * 3))]
    for n_samples in (mel.CHUNK_FRAMES * mel.HOP_LENGTH, 480000, 1234 * mel.HOP_LENGTH):
        chunked = mel._log_mel_chunked(audios, n_mels, n_samples)
        batched = mel._log_mel_batched(audios, n_mels, n_samples)
        assert chunked.shape == (len(audios), n_mels, n_samples // mel.HOP_LENGTH)
        assert (chunked - batched).abs().max() < 1e-5


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers_filter_bank(n_mels):
    from transformers.audio_utils import mel_filter_bank

    from hark.audio.mel import mel_filters
    expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                               sampling_rate=16000, norm="slaney", mel_scale="slaney")
    assert torch.equal(mel_filters(n_mels, torch.device("cpu")), torch.from_numpy(expected).float())
