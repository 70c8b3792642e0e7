"""Errors a caller can cause with the audio they hand in. All are ValueErrors with messages that
say what was wrong and how to fix it; none carries decoder internals."""


class AudioError(ValueError):
    """Base class of every audio input error."""


class AudioDecodeError(AudioError):
    """The data is not audio in a supported format, or it is corrupt or truncated."""


class AudioTooLongError(AudioError):
    """The decoded audio is longer than `AudioLimits.max_duration_s`."""


class AudioTooLargeError(AudioError):
    """The input or decoded audio exceeds a byte cap (`max_input_bytes`, `max_decoded_bytes`)."""


class TooManyChannelsError(AudioError):
    """The audio has more channels than `AudioLimits.max_channels`."""


class AudioTooShortError(AudioError):
    """The audio is empty or shorter than 25 ms."""


class InvalidSampleRateError(AudioError):
    """The sample rate is outside 1 kHz - 384 kHz."""


class NonFiniteAudioError(AudioError):
    """The audio contains NaN or infinite samples."""
