"""PCM and IEEE-float WAV (RIFF and RF64, WAVE_FORMAT_EXTENSIBLE too) decoded with numpy alone.

`hark transcribe clip.wav` then starts without importing PyAV (~0.13 s). The header is parsed and
every cap is checked from it before a sample is read; samples are converted, mixed to mono and
resampled block by block as PyAV's frames are, with the same arithmetic, so the output equals the
PyAV path's. Codecs this does not read (a-law, mu-law, ADPCM, odd layouts) return None and go to
PyAV.
"""
from dataclasses import dataclass

import numpy as np
import soxr

from hark.audio.errors import AudioDecodeError, NonFiniteAudioError
from hark.audio.limits import (
    BYTES_PER_SAMPLE,
    AudioLimits,
    check_channels,
    check_decoded,
    check_min_duration,
    check_sample_rate,
)
from hark.audio.pcm import pcm_to_float32

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
KSDATAFORMAT_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # GUID after the tag
SAMPLE_DTYPES = {
    (WAVE_FORMAT_PCM, 8): np.dtype("u1"),
    (WAVE_FORMAT_PCM, 16): np.dtype("<i2"),
    (WAVE_FORMAT_PCM, 24): None,  # three bytes, widened to int32 as FFmpeg does
    (WAVE_FORMAT_PCM, 32): np.dtype("<i4"),
    (WAVE_FORMAT_IEEE_FLOAT, 32): np.dtype("<f4"),
    (WAVE_FORMAT_IEEE_FLOAT, 64): np.dtype("<f8"),
}
UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streamed wav, or RF64's placeholder before ds64
BLOCK_FRAMES = 1 << 16  # frames converted at a time: memory stays at the mono output
TRUNCATED = "the audio is truncated: {}; send the complete file"


@dataclass
class WavHeader:
    format_tag: int  # WAVE_FORMAT_PCM or _IEEE_FLOAT once EXTENSIBLE is resolved
    channels: int
    sample_rate: int
    bits_per_sample: int
    block_align: int
    data_offset: int
    data_size: int  # bytes of samples to read, present in the file


def read_le(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset:offset + size], "little")


def parse_wav_header(data: bytes) -> WavHeader | None:
    """The fmt and data chunks of a RIFF/RF64 WAVE file; None when they are missing or malformed
    (PyAV then reports it as today). Raises if the data chunk claims more bytes than the file holds
    (FFmpeg would read what is there), whether or not the fast path then reads the file."""
    rf64_data_size, fmt = None, None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], read_le(data, offset + 4, 4)
        body = offset + 8
        if chunk_id == b"ds64" and data[:4] == b"RF64" and size >= 24:
            rf64_data_size = read_le(data, body + 8, 8)
        elif chunk_id == b"fmt " and size >= 16:
            fmt = data[body:body + size]
        elif chunk_id == b"data":
            available = len(data) - body
            if size == 0xFFFFFFFF and rf64_data_size is not None:
                size = rf64_data_size
            elif size in UNKNOWN_SIZES:
                size = available
            if size > available:
                raise AudioDecodeError(TRUNCATED.format(f"it declares {size} bytes of samples but holds {available}"))
            if fmt is None or len(fmt) < 16:
                return None
            return WavHeader(
                format_tag=fmt_tag(fmt),
                channels=read_le(fmt, 2, 2),
                sample_rate=read_le(fmt, 4, 4),
                bits_per_sample=read_le(fmt, 14, 2),
                block_align=read_le(fmt, 12, 2),
                data_offset=body,
                data_size=size,
            )
        offset = body + size + (size & 1)
    return None


def fmt_tag(fmt: bytes) -> int:
    tag = read_le(fmt, 0, 2)
    if tag == WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 40 and fmt[26:40] == KSDATAFORMAT_SUFFIX:
        return read_le(fmt, 24, 2)
    return tag


def is_fast_path(header: WavHeader) -> bool:
    return (
        (header.format_tag, header.bits_per_sample) in SAMPLE_DTYPES
        and header.channels >= 1
        and header.block_align == header.channels * header.bits_per_sample // 8
    )


def decode_wav(data: bytes, target_sr: int, limits: AudioLimits) -> np.ndarray | None:
    """Float32 mono audio at `target_sr`, or None for a wav this module does not read."""
    header = parse_wav_header(data)
    if header is None or not is_fast_path(header):
        return None
    check_sample_rate(header.sample_rate)
    check_channels(header.channels, limits)
    frames = header.data_size // header.block_align
    check_caps(frames, header, limits)
    resampler = None
    if header.sample_rate != target_sr:
        resampler = soxr.ResampleStream(header.sample_rate, target_sr, 1, dtype="float32", quality="HQ")
    pieces = []
    for start in range(0, frames, BLOCK_FRAMES):
        mono = block_to_mono(data, header, start, min(frames, start + BLOCK_FRAMES))
        if not np.isfinite(mono).all():
            raise NonFiniteAudioError("the audio contains NaN or infinite samples")
        pieces.append(resampler.resample_chunk(mono) if resampler else mono)
    check_min_duration(frames, header.sample_rate)
    if resampler:
        pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    return np.concatenate(pieces)


def check_caps(frames: int, header: WavHeader, limits: AudioLimits) -> None:
    """Duration and decoded-bytes caps from the header, raising the error that counting frame by
    frame raises first."""
    over_bytes = limits.max_decoded_bytes // (header.channels * BYTES_PER_SAMPLE) + 1
    counted = min(frames, over_bytes)  # past the duration cap too only if that came first
    check_decoded(counted, header.sample_rate, counted * header.channels * BYTES_PER_SAMPLE, limits)


def block_to_mono(data: bytes, header: WavHeader, start: int, stop: int) -> np.ndarray:
    begin = header.data_offset + start * header.block_align
    raw = np.frombuffer(data, np.uint8, (stop - start) * header.block_align, begin)
    dtype = SAMPLE_DTYPES[header.format_tag, header.bits_per_sample]
    if dtype is None:  # 24-bit: the three bytes in an int32's top bytes, as FFmpeg's s32 output
        triples = raw.reshape(-1, 3).astype(np.uint32)
        samples = ((triples[:, 0] << 8) | (triples[:, 1] << 16) | (triples[:, 2] << 24)).view(np.int32)
    else:
        samples = raw.view(dtype)
    samples = pcm_to_float32(samples).reshape(-1, header.channels).T
    return samples[0] if header.channels == 1 else samples.mean(axis=0)
