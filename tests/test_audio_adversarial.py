"""Hostile and broken input: each case raises its specific AudioError quickly, before decoding
everything, with a message free of decoder internals, and peak memory stays bounded."""
import io
import pathlib
import re
import struct
import time
import tracemalloc

import av
import numpy as np
import pytest
from test_audio_load import SPEECH_PATH, encode, read_speech

from hark.audio import (
    AudioDecodeError,
    AudioError,
    AudioLimits,
    AudioTooLargeError,
    AudioTooLongError,
    AudioTooShortError,
    InvalidSampleRateError,
    NonFiniteAudioError,
    TooManyChannelsError,
    load_audio,
)

INTERNALS = re.compile(r"0x[0-9a-f]{6,}|Errno|avcodec|avformat|ffmpeg|Traceback|<.*object", re.IGNORECASE)


def rejects(error: type[AudioError], source, max_seconds: float = 5.0, **kwargs) -> str:
    # generous bounds: a shared CI core must not flake; memory bounds below are the strict check
    start = time.perf_counter()
    with pytest.raises(error) as info:
        load_audio(source, **kwargs)
    assert time.perf_counter() - start < max_seconds
    message = str(info.value)
    assert isinstance(info.value, ValueError) and message and not INTERNALS.search(message), message
    return message


def wav_header(sample_rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_bytes))


def opus_silence(seconds: float) -> bytes:
    """Ogg Opus of `seconds` of silence: one encoded 120 ms packet muxed over and over."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000, options={"frame_duration": "120"})
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 5760), np.int16), format="s16", layout="mono")
        frame.sample_rate = 48000
        first = [*stream.encode(frame), *stream.encode(None)][0]
        payload, time_base = bytes(first), first.time_base
        for i in range(int(seconds / 0.12)):
            packet = av.Packet(payload)
            packet.stream, packet.time_base, packet.duration = stream, time_base, 5760
            packet.pts = packet.dts = i * 5760
            out.mux(packet)
    return buf.getvalue()


def flac_silence(seconds: float, sample_rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=sample_rate, options={"frame_size": "16384"})
        stream.layout = "mono"
        minute = av.AudioFrame.from_ndarray(np.zeros((1, 60 * sample_rate), np.int16), format="s16", layout="mono")
        minute.sample_rate = sample_rate
        for i in range(int(seconds // 60)):
            minute.pts = i * 60 * sample_rate
            for packet in stream.encode(minute):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def opus_hour() -> bytes:
    data = opus_silence(3600)
    assert len(data) < 600_000
    return data


@pytest.fixture(scope="module")
def flac_three_hours() -> bytes:
    data = flac_silence(3 * 3600)
    assert len(data) < 200_000
    return data


def peak_traced_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_opus_bomb_stops_at_the_duration_cap(opus_hour):
    """1 h of 48 kHz opus in ~540 KB: decoding it all would take 660 MiB as float32."""
    def load():
        message = rejects(AudioTooLongError, opus_hour, max_seconds=10.0)
        assert "600 s" in message and "max_duration_s" in message

    cap_output = 600 * 16000 * 4  # mono float32 at the target rate, what is kept while decoding
    assert peak_traced_bytes(load) < 1.3 * cap_output
    assert peak_traced_bytes(lambda: rejects(AudioTooLongError, opus_hour, limits=AudioLimits(max_duration_s=30))) < 4 * 2**20


def test_flac_bomb_stops_at_the_decoded_bytes_cap(flac_three_hours):
    """3 h of 8 kHz flac in < 200 KB, past the duration cap: the byte cap stops it."""
    limits = AudioLimits(max_duration_s=24 * 3600, max_decoded_bytes=8 * 2**20)
    message = rejects(AudioTooLargeError, flac_three_hours, max_seconds=6.0, limits=limits)
    assert "max_decoded_bytes" in message
    peak = peak_traced_bytes(lambda: rejects(AudioTooLargeError, flac_three_hours, max_seconds=6.0, limits=limits))
    assert peak < 8 * 2**20 * 2 * 1.3  # 8 MiB at 8 kHz is 16 MiB once upsampled to 16 kHz
    assert "max_duration_s" in rejects(AudioTooLongError, flac_three_hours)


def test_high_sample_rate_is_bounded_by_decoded_bytes_not_header_rate():
    """A 384 kHz 8-channel claim passes the header checks; the byte cap still stops it early."""
    data = wav_header(384_000, 8, 384_000 * 8 * 2 * 3) + bytes(384_000 * 8 * 2 * 3)
    rejects(AudioTooLargeError, data, limits=AudioLimits(max_decoded_bytes=16 * 2**20, max_input_bytes=2**26))


def test_wav_header_claiming_1_mhz():
    message = rejects(InvalidSampleRateError, wav_header(1_000_000, 1, 32000) + bytes(32000))
    assert "1000000 Hz" in message


def test_wav_header_claiming_64_channels():
    message = rejects(TooManyChannelsError, wav_header(16000, 64, 64 * 2 * 1600) + bytes(64 * 2 * 1600))
    assert "64 channels" in message and "max_channels" in message


def test_header_only_wav():
    rejects(AudioTooShortError, wav_header(16000, 1, 0))  # a valid, empty file
    rejects(AudioDecodeError, wav_header(16000, 1, 32000))  # promises samples it lacks


@pytest.mark.parametrize("container,codec,rate", [("wav", "pcm_s16le", None), ("flac", "flac", None), ("ipod", "aac", None), ("webm", "libopus", 48000), ("adts", "aac", None)])
@pytest.mark.parametrize("kept", [0.1, 0.5, 0.9])
def test_truncated_files(container, codec, rate, kept):
    data = encode(read_speech()[None], 16000, container, codec, rate)
    message = rejects(AudioDecodeError, data[: int(len(data) * kept)])
    assert "truncated" in message or "corrupt" in message


def test_random_bytes_and_garbage_after_a_valid_magic():
    rng = np.random.default_rng(0)
    rejects(AudioDecodeError, rng.bytes(100_000))
    rejects(AudioDecodeError, b"")
    for magic in (b"OggS", b"fLaC", b"\x1a\x45\xdf\xa3", b"\xff\xfb", b"ID3\x04\x00\x00\x00\x00\x00\x00"):
        rejects(AudioDecodeError, magic + rng.bytes(50_000))


def test_input_bytes_cap(tmp_path):
    data = pathlib.Path(SPEECH_PATH).read_bytes()
    limits = AudioLimits(max_input_bytes=len(data) - 1)
    for source in (data, io.BytesIO(data), SPEECH_PATH):
        assert "max_input_bytes" in rejects(AudioTooLargeError, source, limits=limits)


def test_too_many_channels_in_arrays():
    rejects(TooManyChannelsError, (np.zeros((9, 16000), np.float32), 16000))
    load_audio((np.zeros((9, 16000), np.float32), 16000), limits=AudioLimits(max_channels=9))


def test_duration_cap_on_arrays():
    rejects(AudioTooLongError, (np.zeros(16000 * 11, np.float32), 16000), limits=AudioLimits(max_duration_s=10))


def test_short_and_empty_audio():
    assert "25 ms" in rejects(AudioTooShortError, (np.zeros(399, np.float32), 16000))
    rejects(AudioTooShortError, (np.zeros(0, np.float32), 16000))
    assert len(load_audio((np.zeros(400, np.float32), 16000))) == 400


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    samples = read_speech().copy()
    samples[1234] = bad
    rejects(NonFiniteAudioError, (samples, 16000))
    rejects(NonFiniteAudioError, (np.stack([samples, samples]), 16000))
    float_wav = io.BytesIO()
    import soundfile as sf

    sf.write(float_wav, samples, 16000, subtype="FLOAT", format="WAV")
    rejects(NonFiniteAudioError, float_wav.getvalue())


@pytest.mark.parametrize("sample_rate", [0, 999, 384_001, 10**9])
def test_sample_rates_outside_1k_384k(sample_rate):
    rejects(InvalidSampleRateError, (np.zeros(16000, np.float32), sample_rate))


def test_bad_target_rate_and_shapes():
    rejects(InvalidSampleRateError, SPEECH_PATH, target_sr=500)
    rejects(AudioError, (np.zeros((2, 2, 16000), np.float32), 16000))
    rejects(AudioError, (np.zeros(16000, np.complex64), 16000))
