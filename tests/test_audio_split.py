"""split_audio (vLLM's energy-based cuts) and split_on_speech (silero-vad regions) on real speech."""
import glob
import pathlib

import numpy as np
import pytest

from hark.audio import load_audio, split_audio, split_on_speech
from hark.audio.split import find_split_point
from hark.audio.vad import speech_regions

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The five clips back to back: ~25 s of read speech with its natural pauses."""
    return np.concatenate([load_audio(p) for p in sorted(glob.glob(str(DATA / "*.wav")))])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("max_s,overlap_s", [(5.0, 1.0), (7.3, 2.0), (10.0, 0.5), (30.0, 1.0)])
def test_chunks_concatenate_to_the_input_and_offsets_add_up(speech, max_s, overlap_s):
    chunks = split_audio(speech, 16000, max_s, overlap_s)
    assert np.array_equal(np.concatenate([c for c, _ in chunks]), speech)
    position = 0
    for chunk, start_s in chunks:
        assert start_s == position / 16000
        assert 0 < len(chunk) <= max_s * 16000
        position += len(chunk)
    if len(speech) > max_s * 16000:
        assert len(chunks) > 1
        for chunk, _ in chunks[:-1]:  # each cut lies in the search window before the boundary
            assert (max_s - overlap_s) * 16000 <= len(chunk)


def test_cuts_land_in_pauses():
    """Clips joined by 0.5 s pauses of faint noise; every search window (8 s) holds a whole pause."""
    rng = np.random.default_rng(0)
    clips = [load_audio(p) for p in sorted(glob.glob(str(DATA / "*.wav")))] * 2
    pause = lambda: (1e-3 * rng.standard_normal(8000)).astype(np.float32)
    pieces = [piece for clip in clips for piece in (clip, pause())]
    audio = np.concatenate(pieces)
    pause_spans, position = [], 0
    for piece in pieces:
        if len(piece) == 8000:
            pause_spans.append((position, position + 8000))
        position += len(piece)

    window = 1600
    chunks = split_audio(audio, 16000, 10.0, 8.0, window)
    assert len(chunks) > 3
    for _, start_s in chunks[1:]:
        cut = round(start_s * 16000)
        assert any(start <= cut and cut + window <= end for start, end in pause_spans), cut


def test_split_point_is_the_quietest_window():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(20000).astype(np.float32)
    audio[13200:14800] *= 0.01  # the only quiet window on the 1600 grid from 10000
    assert find_split_point(audio, 10000, 18000, 1600) == 13200
    assert find_split_point(audio, 10000, 11000, 1600) == 10000  # no whole window fits


def test_short_audio_is_one_chunk_and_stereo_splits_on_time(speech):
    assert [(len(c), s) for c, s in split_audio(speech[:16000], 16000)] == [(16000, 0.0)]
    stereo = np.stack([speech, speech[::-1]])
    chunks = split_audio(stereo, 16000, 5.0)
    assert all(c.shape[0] == 2 for c, _ in chunks)
    assert np.array_equal(np.concatenate([c for c, _ in chunks], axis=1), stereo)


def test_bad_split_settings():
    with pytest.raises(ValueError):
        split_audio(np.zeros(100), 16000, 1.0, 1.0)
    with pytest.raises(ValueError):
        split_audio(np.zeros(100), 16000, 0.0)


def test_speech_regions_skip_the_silence_between_clips():
    clips = [load_audio(p) for p in sorted(glob.glob(str(DATA / "*.wav")))]
    gap = np.zeros(3 * 16000, np.float32)
    audio = np.concatenate([piece for clip in clips for piece in (clip, gap)])
    regions = speech_regions(audio, 16000)
    clip_starts = np.cumsum([0] + [len(c) + len(gap) for c in clips[:-1]])
    assert len(regions) >= len(clips)
    for start, end in regions:  # every region lies inside a clip, none in the gaps
        assert any(s <= start and end <= s + len(c) + 0.1 * 16000 for s, c in zip(clip_starts, clips))

    chunks = split_on_speech(audio, 16000, max_clip_duration_s=10.0)
    assert chunks and all(len(c) <= 10 * 16000 for c, _ in chunks)
    for chunk, start_s in chunks:  # each chunk is exactly the audio at its offset
        start = round(start_s * 16000)
        assert np.array_equal(chunk, audio[start:start + len(chunk)])
    assert sum(len(c) for c, _ in chunks) < len(audio) - 10 * 16000  # the 15 s of gaps are mostly dropped
    assert split_on_speech(np.zeros(5 * 16000, np.float32), 16000) == []


def test_sequence_vad_finds_the_streaming_models_regions(speech):
    """The batched sequence model hark runs gives silero's streaming model's regions (frame by frame,
    its LSTM state carried in Python), with the background noise and pauses of real speech."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    threads = torch.get_num_threads()
    streaming = load_silero_vad(onnx=True)
    torch.set_num_threads(threads)
    noisy = speech + np.random.default_rng(0).normal(0, 0.01, len(speech)).astype(np.float32)
    for audio in (speech, noisy):
        expected = get_speech_timestamps(torch.from_numpy(audio), streaming, sampling_rate=16000)
        assert len(expected) > 3
        assert speech_regions(audio, 16000) == [(s["start"], s["end"]) for s in expected]


def test_speech_regions_at_other_rates_map_back_to_input_samples(speech):
    at_44k = load_audio((speech, 16000), target_sr=44100)
    regions_16k = speech_regions(speech, 16000)
    regions_44k = speech_regions(at_44k, 44100)
    assert len(regions_44k) == len(regions_16k)
    for (s16, e16), (s44, e44) in zip(regions_16k, regions_44k):
        assert abs(s44 / 44100 - s16 / 16000) < 0.1 and abs(e44 / 44100 - e16 / 16000) < 0.1


def test_long_speech_region_is_split_by_energy(speech):
    chunks = split_on_speech(speech, 16000, max_clip_duration_s=3.0)
    assert all(len(c) <= 3 * 16000 for c, _ in chunks)
    for chunk, start_s in chunks:
        start = round(start_s * 16000)
        assert np.array_equal(chunk, speech[start:start + len(chunk)])
