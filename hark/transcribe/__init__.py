"""Speech-to-text with Whisper checkpoints: `transcribe(llm, audio, ...)` and its output formats.

Names load on first use, so the command line reads formats and options without importing torch.
"""
__all__ = ["FORMATS", "InvalidTranscriptionRequest", "Segment", "Transcription", "TranscriptionOptions", "TranscriptionRun",
           "Word",
           "format_transcription", "transcribe"]

_MODULES = {"FORMATS": "formats", "format_transcription": "formats", "InvalidTranscriptionRequest": "options",
            "TranscriptionOptions": "options", "TranscriptionRun": "pipeline", "transcribe": "pipeline",
            "Segment": "result", "Transcription": "result", "Word": "result"}


def __getattr__(name: str):
    if name in _MODULES:
        import importlib
        value = getattr(importlib.import_module(f"hark.transcribe.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hark.transcribe' has no attribute {name!r}")
