"""Speech-to-text with Whisper checkpoints: `transcribe(llm, audio, ...)` and its output formats."""
from hark.transcribe.formats import FORMATS, format_transcription
from hark.transcribe.options import InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.pipeline import TranscriptionRun, transcribe
from hark.transcribe.result import Segment, Transcription, Word

__all__ = ["FORMATS", "InvalidTranscriptionRequest", "Segment", "Transcription", "TranscriptionOptions", "TranscriptionRun",
           "Word",
           "format_transcription", "transcribe"]
