"""The audio front end every hark model starts from: loading, splitting and log-mel features."""
from hark.audio.errors import (
    AudioDecodeError,
    AudioError,
    AudioTooLargeError,
    AudioTooLongError,
    AudioTooShortError,
    InvalidSampleRateError,
    NonFiniteAudioError,
    TooManyChannelsError,
)
from hark.audio.limits import TRANSCRIPTION_LIMITS, AudioLimits
from hark.audio.load import load_audio
from hark.audio.split import split_audio
from hark.audio.mel import log_mel_spectrogram
from hark.audio.vad import split_on_speech
