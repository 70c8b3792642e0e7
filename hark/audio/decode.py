"""Decoding encoded audio (wav, flac, mp3, ogg/vorbis, opus, m4a/aac, webm, mp4) with PyAV.

PCM and float wav take hark.audio.wav's numpy path instead; PyAV is imported only for the rest.

The container is recognised from the first bytes, and only those demuxers ever see the data.
Channels and sample rate are checked from the stream header before decoding; duration and
decoded bytes are counted frame by frame, so a decompression bomb stops at the cap. Frames are
mixed to mono and resampled (soxr, streaming) as they arrive: memory is bounded by the mono
output at the target rate.
"""
import io

import numpy as np
import soxr

from hark.audio.errors import AudioDecodeError, AudioError, NonFiniteAudioError
from hark.audio.limits import (
    BYTES_PER_SAMPLE,
    AudioLimits,
    check_channels,
    check_decoded,
    check_min_duration,
    check_sample_rate,
)
from hark.audio.pcm import pcm_to_float32
from hark.audio.wav import TRUNCATED, decode_wav

SUPPORTED = "wav, flac, mp3, ogg (vorbis, opus, flac), m4a/mp4 (aac), webm/mkv"
# Containers whose header states the length FFmpeg reports, so a shorter decode means truncated
# data (wav is checked on its RIFF header; mp3, adts and ogg are streams with no stated length).
EXACT_LENGTH_FORMATS = {"flac", "mp4", "matroska"}


def sniff_format(data: bytes) -> str:
    """FFmpeg demuxer name for the container that `data` starts with."""
    if data[:3] == b"ID3" and len(data) >= 10:  # ID3v2 tag before mp3, aac or flac
        size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
        size += 10 if data[5] & 0x10 else 0  # footer
        return sniff_format(data[size:size + 16])
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        return "aac" if head[1] & 0x06 == 0 else "mp3"  # layer bits 00 mean an ADTS header
    raise AudioDecodeError(f"the data is not audio in a supported format ({SUPPORTED})")


def frame_to_mono(frame) -> np.ndarray:
    samples = pcm_to_float32(frame.to_ndarray())
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: one row of interleaved samples
        samples = samples.reshape(-1, channels).T
    return samples[0] if channels == 1 else samples.mean(axis=0)


def decode_audio(data: bytes, target_sr: int, limits: AudioLimits) -> np.ndarray:
    """Float32 mono audio at `target_sr` from an encoded file's bytes."""
    container_format = sniff_format(data)
    if container_format == "wav":
        audio = decode_wav(data, target_sr, limits)      # None: a codec for PyAV (truncation already checked)
        if audio is not None:
            return audio
    return decode_with_pyav(data, container_format, target_sr, limits)


def decode_with_pyav(data: bytes, container_format: str, target_sr: int, limits: AudioLimits) -> np.ndarray:
    import av

    try:
        with av.open(io.BytesIO(data), format=container_format, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioDecodeError("the file holds no audio stream")
            stream = container.streams.audio[0]
            return _decode_stream(container, stream, container_format, target_sr, limits)
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, IndexError, EOFError) as e:
        raise AudioDecodeError(
            f"could not decode the audio: it is corrupt, truncated or not in a supported format "
            f"({SUPPORTED})"
        ) from e


def _decode_stream(container, stream, container_format: str, target_sr: int, limits: AudioLimits) -> np.ndarray:
    sample_rate = stream.codec_context.sample_rate
    check_sample_rate(sample_rate)
    check_channels(stream.codec_context.channels, limits)
    resampler = None
    if sample_rate != target_sr:
        resampler = soxr.ResampleStream(sample_rate, target_sr, 1, dtype="float32", quality="HQ")
    pieces, samples, decoded_bytes = [], 0, 0
    for frame in container.decode(stream):
        if frame.sample_rate != sample_rate:
            raise AudioDecodeError("the audio changes sample rate mid-stream; re-encode it at one rate")
        channels = frame.layout.nb_channels
        check_channels(channels, limits)
        samples += frame.samples
        decoded_bytes += frame.samples * channels * BYTES_PER_SAMPLE
        check_decoded(samples, sample_rate, decoded_bytes, limits)
        mono = frame_to_mono(frame)
        if not np.isfinite(mono).all():
            raise NonFiniteAudioError("the audio contains NaN or infinite samples")
        pieces.append(resampler.resample_chunk(mono) if resampler else mono)
    if container_format in EXACT_LENGTH_FORMATS:
        _check_complete(container, stream, samples / sample_rate)
    check_min_duration(samples, sample_rate)
    if resampler:
        pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    return np.concatenate(pieces)


def _check_complete(container, stream, decoded_s: float) -> None:
    import av

    if stream.duration:
        declared_s = float(stream.duration * stream.time_base)
    elif container.duration:
        declared_s = container.duration / av.time_base
    else:
        return
    if decoded_s < 0.98 * declared_s - 0.05:
        raise AudioDecodeError(
            TRUNCATED.format(f"its header declares {declared_s:.2f} s but only {decoded_s:.2f} s decode")
        )
