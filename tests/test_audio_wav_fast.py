"""hark.audio.wav, the numpy wav path: the same audio and the same errors as the PyAV path it skips."""
import glob
import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from hark.audio import (
    AudioDecodeError,
    AudioLimits,
    AudioTooLargeError,
    AudioTooLongError,
    TooManyChannelsError,
    load_audio,
)
from hark.audio.decode import decode_audio, decode_with_pyav
from hark.audio.wav import decode_wav

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPS = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "*.wav")))
LIMITS = AudioLimits()


def speech(sample_rate: int, channels: int) -> np.ndarray:
    """A real clip's first 1.5 s at `sample_rate`, a louder copy in channel 2, in [-1, 1]."""
    import soxr
    clip, sr = sf.read(CLIPS[0], dtype="float32")
    clip = soxr.resample(clip[: int(1.5 * sr)], sr, sample_rate).astype(np.float32)
    columns = [clip * np.float32(0.9 ** c) for c in range(channels)]
    return np.clip(np.stack(columns, axis=1), -1, 0.999)


def wav_bytes(samples: np.ndarray, sample_rate: int, subtype: str, container: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def both_paths(data: bytes, target_sr: int = 16000, limits: AudioLimits = LIMITS):
    fast = decode_wav(data, target_sr, limits)
    assert fast is not None, "the fast path declined a format it reads"
    return fast, decode_with_pyav(data, "wav", target_sr, limits)


@pytest.mark.parametrize("path", CLIPS, ids=os.path.basename)
def test_real_clips_equal_pyav_bit_for_bit(path):
    with open(path, "rb") as f:
        data = f.read()
    fast, reference = both_paths(data)
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert np.array_equal(fast, reference)
    assert np.array_equal(load_audio(path), reference)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("container", ["WAV", "WAVEX", "RF64"])
@pytest.mark.parametrize("sample_rate,channels", [(8000, 1), (16000, 2), (22050, 2), (44100, 1), (48000, 2)])
def test_formats_equal_pyav(subtype, container, sample_rate, channels):
    data = wav_bytes(speech(sample_rate, channels), sample_rate, subtype, container)
    fast, reference = both_paths(data)
    assert fast.shape == reference.shape and fast.dtype == np.float32
    assert np.array_equal(fast, reference)  # the same arithmetic, so bit for bit
    assert np.abs(fast).max() > 0.1  # real audio came out, not silence


def test_long_file_spanning_blocks_equals_pyav():
    samples = np.tile(speech(44100, 2), (3, 1))  # 4.5 s: several of the fast path's blocks
    fast, reference = both_paths(wav_bytes(samples, 44100, "PCM_16"))
    assert np.array_equal(fast, reference)  # the same arithmetic, so bit for bit


@pytest.mark.parametrize("subtype", ["ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM"])
def test_other_wav_codecs_fall_back_to_pyav(subtype):
    data = wav_bytes(speech(16000, 1), 16000, subtype)
    assert decode_wav(data, 16000, LIMITS) is None
    audio = decode_audio(data, 16000, LIMITS)
    assert audio.shape[0] > 16000 and np.abs(audio).max() > 0.1


def same_error(data: bytes, limits: AudioLimits, error: type) -> None:
    with pytest.raises(error) as fast:
        decode_audio(data, 16000, limits)
    with pytest.raises(error) as reference:
        decode_with_pyav(data, "wav", 16000, limits)
    assert type(fast.value) is type(reference.value)


def test_too_many_channels():
    same_error(wav_bytes(speech(16000, 3), 16000, "PCM_16"), AudioLimits(max_channels=2), TooManyChannelsError)


def test_too_long():
    same_error(wav_bytes(speech(16000, 1), 16000, "PCM_16"), AudioLimits(max_duration_s=1.0), AudioTooLongError)


def test_unbounded_duration_as_offline_transcription():
    data = wav_bytes(speech(16000, 1), 16000, "PCM_16")
    fast, reference = both_paths(data, limits=AudioLimits(max_duration_s=float("inf")))
    assert np.array_equal(fast, reference)
    same_error(data, AudioLimits(max_duration_s=float("inf"), max_decoded_bytes=1000), AudioTooLargeError)


def test_too_many_decoded_bytes():
    limits = AudioLimits(max_decoded_bytes=40_000)  # 1.5 s stereo at 16 kHz decodes to 192 kB
    same_error(wav_bytes(speech(16000, 2), 16000, "PCM_16"), limits, AudioTooLargeError)


def test_too_big_input_refused_before_decoding():
    data = wav_bytes(speech(16000, 1), 16000, "PCM_16")
    with pytest.raises(AudioTooLargeError):
        load_audio(data, limits=AudioLimits(max_input_bytes=len(data) - 1))


def data_chunk_offset(data: bytes) -> int:
    return data.index(b"data")


@pytest.mark.parametrize("subtype", ["PCM_16", "ALAW"])       # read here, or handed to PyAV
def test_truncated_data_chunk_is_an_error(subtype):
    data = wav_bytes(speech(16000, 1), 16000, subtype)
    with pytest.raises(AudioDecodeError, match="truncated"):
        decode_audio(data[: len(data) // 2], 16000, LIMITS)


@pytest.mark.parametrize("declared", [2**31, 0xFFFFFFFE])
def test_bogus_data_size_is_truncated(declared):
    data = bytearray(wav_bytes(speech(16000, 1), 16000, "PCM_16"))
    at = data_chunk_offset(data) + 4
    data[at:at + 4] = struct.pack("<I", declared)
    with pytest.raises(AudioDecodeError, match="truncated"):
        decode_audio(bytes(data), 16000, LIMITS)


def test_bogus_rf64_data_size_is_truncated():
    data = bytearray(wav_bytes(speech(16000, 1), 16000, "PCM_16", "RF64"))
    ds64 = data.index(b"ds64") + 8
    data[ds64 + 8:ds64 + 16] = struct.pack("<Q", 2**40)
    with pytest.raises(AudioDecodeError, match="truncated"):
        decode_audio(bytes(data), 16000, LIMITS)


def test_unknown_data_size_reads_what_is_there():
    data = bytearray(wav_bytes(speech(16000, 1), 16000, "PCM_16"))
    at = data_chunk_offset(data) + 4
    data[at:at + 4] = struct.pack("<I", 0xFFFFFFFF)  # streamed wav
    fast, reference = both_paths(bytes(data))
    assert np.array_equal(fast, reference)


def test_header_claiming_huge_rate_or_channels_fails_before_reading():
    data = bytearray(wav_bytes(speech(16000, 1), 16000, "PCM_16"))
    fmt = data.index(b"fmt ") + 8
    data[fmt + 2:fmt + 4] = struct.pack("<H", 1000)  # 1000 channels; block_align now disagrees
    data[fmt + 12:fmt + 14] = struct.pack("<H", 2000)
    with pytest.raises(TooManyChannelsError):
        decode_audio(bytes(data), 16000, LIMITS)


def test_loading_a_wav_does_not_import_pyav():
    code = (
        "import sys; from hark.audio import load_audio; "
        f"audio = load_audio({CLIPS[0]!r}); assert audio.size > 16000; "
        "assert 'av' not in sys.modules, 'av was imported'; print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
