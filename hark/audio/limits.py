"""Caps on what one piece of audio may cost, and the checks that enforce them."""
from dataclasses import dataclass

from hark.audio.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    AudioTooShortError,
    InvalidSampleRateError,
    TooManyChannelsError,
)

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MIN_DURATION_S = 0.025
BYTES_PER_SAMPLE = 4  # decoded audio is counted as float32


@dataclass
class AudioLimits:
    max_duration_s: float = 600.0  # chat default; see TRANSCRIPTION_LIMITS
    max_decoded_bytes: int = 256 * 2**20  # samples x channels x 4, whatever rate the header claims
    max_channels: int = 8
    max_input_bytes: int = 25 * 2**20  # the encoded file, as OpenAI's audio endpoints allow


# Transcription takes long recordings (chunked downstream): 2 h, e.g. 48 kHz stereo throughout.
TRANSCRIPTION_LIMITS = AudioLimits(max_duration_s=7200.0, max_decoded_bytes=3 * 2**30)


def check_sample_rate(sample_rate: int) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidSampleRateError(
            f"audio sample rate {sample_rate} Hz is outside the supported range "
            f"{MIN_SAMPLE_RATE} - {MAX_SAMPLE_RATE} Hz; resample the audio before sending it"
        )


def check_channels(channels: int, limits: AudioLimits) -> None:
    if channels > limits.max_channels:
        raise TooManyChannelsError(
            f"audio has {channels} channels, more than the limit of {limits.max_channels}; "
            "mix it down first or raise AudioLimits.max_channels"
        )


def check_input_bytes(n_bytes: int, limits: AudioLimits) -> None:
    if n_bytes > limits.max_input_bytes:
        raise AudioTooLargeError(
            f"audio input is larger than the limit of {limits.max_input_bytes / 2**20:.1f} MiB; "
            "send a shorter or more compressed file, or raise AudioLimits.max_input_bytes"
        )


def check_decoded(samples: int, sample_rate: int, decoded_bytes: int, limits: AudioLimits) -> None:
    """Called after every decoded frame: `samples` per channel and `decoded_bytes` so far."""
    if samples > limits.max_duration_s * sample_rate:
        raise AudioTooLongError(
            f"audio is longer than the limit of {limits.max_duration_s:g} s; "
            "send a shorter clip or raise AudioLimits.max_duration_s"
        )
    if decoded_bytes > limits.max_decoded_bytes:
        raise AudioTooLargeError(
            f"decoded audio exceeds the limit of {limits.max_decoded_bytes / 2**20:.0f} MiB "
            "(samples x channels x 4 bytes); send fewer channels or a lower sample rate, "
            "or raise AudioLimits.max_decoded_bytes"
        )


def check_min_duration(samples: int, sample_rate: int) -> None:
    if samples < MIN_DURATION_S * sample_rate:
        raise AudioTooShortError(
            f"audio is {1000 * samples / sample_rate:.1f} ms long; "
            f"at least {1000 * MIN_DURATION_S:g} ms of audio is needed"
        )
