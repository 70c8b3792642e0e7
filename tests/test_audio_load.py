"""load_audio on real speech: every supported format round-tripped through an encoder, stereo in
both layouts, resampling, in-memory arrays and tensors."""
import glob
import io
import pathlib

import av
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from hark.audio import AudioError, load_audio

DATA = pathlib.Path(__file__).parent / "data"
SPEECH_PATH = sorted(glob.glob(str(DATA / "*.wav")))[0]


def read_speech() -> np.ndarray:
    audio, sample_rate = sf.read(SPEECH_PATH, dtype="float32")
    assert sample_rate == 16000
    return audio


def encode(channels: np.ndarray, sample_rate: int, container: str, codec: str, rate: int | None = None, options=None) -> bytes:
    """Encode float32 (channels, time) audio with PyAV."""
    layout = {1: "mono", 2: "stereo"}[len(channels)]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate or sample_rate, options=options or {})
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels, np.float32), format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def best_alignment(decoded: np.ndarray, reference: np.ndarray, max_lag: int = 2048) -> tuple[int, float]:
    """(lag, correlation) of decoded against reference, for codecs that add a priming delay."""
    n = len(reference) - 2 * max_lag
    best = max(range(0, max_lag + 1), key=lambda lag: float(np.dot(decoded[lag:lag + n], reference[:n])))
    a, b = decoded[best:best + n], reference[:n]
    return best, float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


LOSSLESS = [("wav", "pcm_s16le", None), ("flac", "flac", None)]
LOSSY = [
    ("mp3", "libmp3lame", None),
    ("ogg", "libopus", 48000),
    ("ipod", "aac", None),  # m4a
    ("mp4", "aac", None),
    ("adts", "aac", None),
    ("webm", "libopus", 48000),
]


@pytest.mark.parametrize("container,codec,rate", LOSSLESS)
def test_lossless_round_trip_is_exact_to_16_bits(container, codec, rate):
    speech = read_speech()
    data = encode(speech[None], 16000, container, codec, rate)
    decoded = load_audio(data)
    assert decoded.dtype == np.float32 and decoded.shape == speech.shape
    assert np.abs(decoded - speech).max() <= 1 / 32768


@pytest.mark.parametrize("container,codec,rate", LOSSY)
def test_lossy_round_trip_keeps_duration_and_samples(container, codec, rate):
    speech = read_speech()
    data = encode(speech[None], 16000, container, codec, rate)
    decoded = load_audio(data)
    assert decoded.dtype == np.float32
    assert abs(len(decoded) - len(speech)) <= 0.07 * 16000  # aac adds up to 2048 samples of priming/padding
    lag, correlation = best_alignment(decoded, speech)
    assert correlation > 0.97, (lag, correlation)


def test_ogg_vorbis_stereo_round_trip():
    speech = read_speech()
    data = encode(np.stack([speech, 0.5 * speech]), 16000, "ogg", "vorbis", options={"strict": "experimental"})
    decoded = load_audio(data)
    assert abs(len(decoded) - len(speech)) <= 0.07 * 16000
    _, correlation = best_alignment(decoded, 0.75 * speech)
    assert correlation > 0.97


def test_format_comes_from_content_not_name(tmp_path):
    speech = read_speech()
    path = tmp_path / "speech.wav"  # really flac
    path.write_bytes(encode(speech[None], 16000, "flac", "flac"))
    decoded = load_audio(path)
    assert np.abs(decoded - speech).max() <= 1 / 32768


def test_path_str_bytes_and_file_object_agree():
    from_path = load_audio(SPEECH_PATH)
    data = pathlib.Path(SPEECH_PATH).read_bytes()
    assert np.array_equal(load_audio(pathlib.Path(SPEECH_PATH)), from_path)
    assert np.array_equal(load_audio(data), from_path)
    assert np.array_equal(load_audio(io.BytesIO(data)), from_path)
    with open(SPEECH_PATH, "rb") as f:
        assert np.array_equal(load_audio(f), from_path)
    assert np.abs(from_path - read_speech()).max() == 0


def test_stereo_file_is_averaged_to_mono():
    speech = read_speech()
    left, right = speech, -0.25 * speech[::-1].copy()
    data = encode(np.stack([left, right]), 16000, "flac", "flac")
    decoded = load_audio(data)
    assert np.abs(decoded - (left + right) / 2).max() <= 1 / 32768


@pytest.mark.parametrize("layout", [None, "channels_first", "channels_last"])
def test_stereo_arrays_in_both_layouts(layout):
    speech = read_speech()
    other = 0.5 * speech[::-1]
    expected = (speech + other) / 2
    channels_first = np.stack([speech, other])
    if layout != "channels_last":
        assert np.allclose(load_audio((channels_first, 16000), channel_layout=layout), expected, atol=1e-7)
    if layout != "channels_first":
        assert np.allclose(load_audio((channels_first.T, 16000), channel_layout=layout), expected, atol=1e-7)
        assert np.allclose(load_audio((torch.from_numpy(channels_first.T.copy()), 16000), channel_layout=layout), expected, atol=1e-7)


def test_explicit_layout_overrides_inference():
    # 3 channels x 2 samples would be inferred as (time=3, channels=2) from the shape alone
    short = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32) / 8
    long_enough = np.repeat(short, 400, axis=1)  # (3, 800): 50 ms at 16 kHz
    assert np.allclose(load_audio((long_enough, 16000), channel_layout="channels_first"), long_enough.mean(axis=0))
    assert np.allclose(load_audio((long_enough.T, 16000), channel_layout="channels_last"), long_enough.mean(axis=0))
    with pytest.raises(ValueError, match="channel_layout"):
        load_audio((long_enough, 16000), channel_layout="interleaved")


@pytest.mark.parametrize("sample_rate", [8000, 11025, 22050, 44100, 48000])
def test_resampling_from_common_rates(sample_rate):
    speech = read_speech()
    at_rate = soxr.resample(speech, 16000, sample_rate, quality="VHQ")
    data = encode(at_rate[None], sample_rate, "wav", "pcm_s16le")
    decoded = load_audio(data)
    assert abs(len(decoded) - len(speech)) <= 1
    n = min(len(decoded), len(speech))
    if sample_rate >= 16000:  # nothing lost: back to the original within 16-bit noise
        assert np.abs(decoded[:n] - speech[:n]).max() < 2e-3
    else:  # band-limited to sample_rate / 2: compare with the same band of the original
        band = soxr.resample(at_rate, sample_rate, 16000, quality="VHQ")
        assert np.abs(decoded[:n] - band[:n]).max() < 2e-3
        assert np.corrcoef(decoded[:n], speech[:n])[0, 1] > 0.9


def test_resampling_to_other_target_rates():
    speech = read_speech()
    for target in (8000, 24000, 44100):
        out = load_audio((speech, 16000), target_sr=target)
        assert abs(len(out) - len(speech) * target / 16000) <= 1


@pytest.mark.parametrize(
    "dtype,scale", [(np.int16, 32767), (np.int32, 2**31 - 1), (np.float64, 1.0), (np.uint8, None)]
)
def test_integer_and_double_input_becomes_float32_in_unit_range(dtype, scale):
    speech = read_speech()
    samples = (np.round(speech * 127) + 128).astype(np.uint8) if scale is None else (speech * scale).astype(dtype)
    out = load_audio((samples, 16000))
    assert out.dtype == np.float32
    assert np.abs(out).max() <= 1.0
    assert np.abs(out - speech).max() < (1 / 127 if scale is None else 1e-4)


def test_bare_array_and_tensor_are_taken_at_target_rate():
    speech = read_speech()
    assert np.array_equal(load_audio(speech), speech)
    assert np.array_equal(load_audio(torch.from_numpy(speech)), speech)
    assert np.allclose(load_audio(torch.from_numpy(speech).to(torch.bfloat16)), speech, atol=1e-2)


def test_urls_and_unknown_sources_are_refused_clearly():
    with pytest.raises(AudioError, match="does not fetch URLs"):
        load_audio("https://example.com/a.wav")
    with pytest.raises(AudioError, match="cannot load audio from a dict"):
        load_audio({"path": SPEECH_PATH})
    with pytest.raises(AudioError, match="binary mode"):
        load_audio(io.StringIO("RIFF"))
