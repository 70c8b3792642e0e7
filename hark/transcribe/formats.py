"""Writing a Transcription as text, json, verbose_json (OpenAI's shapes), srt or vtt."""
import json
from dataclasses import asdict

from transformers.models.whisper.tokenization_whisper import LANGUAGES

from hark.transcribe.result import Transcription
from hark.transcribe.options import InvalidTranscriptionRequest

FORMATS = ("text", "json", "verbose_json", "srt", "vtt")
EXTENSIONS = {"text": "txt", "json": "json", "verbose_json": "json", "srt": "srt", "vtt": "vtt"}


def verbose_json(t: Transcription) -> dict:
    segments = [{k: v for k, v in asdict(s).items() if k != "words"} for s in t.segments]
    # OpenAI's shape names the language ("english"), where Transcription.language holds its code.
    body = {"task": t.task, "language": LANGUAGES.get(t.language, t.language), "duration": round(t.duration, 3),
            "text": t.text,
            "segments": segments}
    if t.words is not None:
        body["words"] = [asdict(w) for w in t.words]
    return body


def timestamp(seconds: float, decimal_marker: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    return text.strip().replace("-->", "->")


def srt(t: Transcription) -> str:
    cues = [f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{_cue_text(s.text)}\n"
            for i, s in enumerate(t.segments, start=1)]
    return "\n".join(cues)


def vtt(t: Transcription) -> str:
    cues = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{_cue_text(s.text)}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def format_transcription(t: Transcription, response_format: str) -> str:
    if response_format == "text":
        return t.text + "\n"
    if response_format == "json":
        return json.dumps({"text": t.text}, ensure_ascii=False)
    if response_format == "verbose_json":
        return json.dumps(verbose_json(t), ensure_ascii=False)
    if response_format == "srt":
        return srt(t)
    if response_format == "vtt":
        return vtt(t)
    raise InvalidTranscriptionRequest(f"unknown format {response_format!r}; use one of {', '.join(FORMATS)}")
