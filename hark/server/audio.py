"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's multipart form and response shapes).

The upload is decoded off the event loop under the transcription caps; the transcription itself runs
as a job in the engine thread (hark.transcribe drives the engine, whose steps keep serving every other
request meanwhile). Audio of any length is cut into windows by hark.transcribe.
"""
import asyncio
import math
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import UploadFile

from hark.audio import TRANSCRIPTION_LIMITS, load_audio
from hark.server.completions import sse, unless_disconnected
from hark.server.errors import APIError
from hark.server.state import ServedModel
from hark.transcribe import FORMATS, Transcription, format_transcription, transcribe as run_transcription
from hark.transcribe.formats import verbose_json

SAMPLE_RATE = 16000
GRANULARITIES = ("segment", "word")
TEXT_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


@dataclass
class TranscriptionForm:
    audio: bytes
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    granularities: list[str] = field(default_factory=list)
    temperature: float | None = None
    stream: bool = False


def _field(form, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise APIError(400, f"form field {name!r} must be text, not a file", param=name)
    return value if value not in (None, "") else None


async def read_form(request: Request) -> TranscriptionForm:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the audio as multipart/form-data with a 'file' field")
    async with request.form(max_files=1, max_fields=64) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "the form has no 'file' upload; attach the audio as 'file'", param="file")
        data = await upload.read()
        response_format = _field(form, "response_format") or "json"
        if response_format not in FORMATS:
            raise APIError(400, f"response_format {response_format!r} is not supported; use one of "
                                f"{', '.join(FORMATS)}", param="response_format")
        granularities = form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities")
        if any(g not in GRANULARITIES for g in granularities):
            raise APIError(400, f"timestamp_granularities[] takes {' and/or '.join(GRANULARITIES)}",
                           param="timestamp_granularities[]")
        if granularities and response_format != "verbose_json":
            raise APIError(400, "timestamp_granularities[] needs response_format=verbose_json",
                           param="timestamp_granularities[]")
        temperature = _field(form, "temperature")
        try:
            temperature = None if temperature is None else float(temperature)
        except ValueError:
            raise APIError(400, f"temperature must be a number, got {temperature!r}", param="temperature") from None
        if temperature is not None and not 0 <= temperature <= 1:
            raise APIError(400, "temperature must be in [0, 1]", param="temperature")
        stream = (_field(form, "stream") or "false").lower()
        if stream not in ("true", "false"):
            raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
        if stream == "true" and response_format not in ("json", "text"):
            raise APIError(400, "stream=true gives transcript events; use response_format json or text",
                           param="stream")
        return TranscriptionForm(audio=data, model=_field(form, "model"), language=_field(form, "language"),
                                 prompt=_field(form, "prompt"), response_format=response_format,
                                 granularities=list(granularities), temperature=temperature,
                                 stream=stream == "true")


class _LLMView:
    """What hark.transcribe needs of an LLM: its engine."""

    def __init__(self, engine):
        self.llm_engine = engine


def usage(t: Transcription) -> dict:
    return {"type": "duration", "seconds": math.ceil(t.duration)}


async def transcribe(served: ServedModel, form: TranscriptionForm, task: str, request: Request):
    cap = request.app.state.max_upload_bytes
    limits = replace(TRANSCRIPTION_LIMITS, max_input_bytes=cap)
    # OpenAI: temperature 0 (the default) lets the decoder raise it on failure; another value is used as is.
    temperature = {"temperature": form.temperature} if form.temperature else {}
    words = "word" in form.granularities

    with served.admit():
        samples = await asyncio.to_thread(load_audio, form.audio, SAMPLE_RATE, limits=limits)
        form.audio = b""

        def job(engine) -> Transcription:
            return run_transcription(_LLMView(engine), samples, language=form.language, task=task,
                                     word_timestamps=words, initial_prompt=form.prompt, **temperature)

        result = await unless_disconnected(request, served.engine.run_job(job))
    served.metrics.audio_seconds.labels(served.name).inc(result.duration)

    if form.stream:
        return StreamingResponse(_events(result), media_type="text/event-stream")
    if form.response_format == "json":
        return JSONResponse({"text": result.text, "usage": usage(result)})
    if form.response_format == "verbose_json":
        body = verbose_json(result)
        if words and "segment" not in form.granularities:
            body.pop("segments")
        return JSONResponse({**body, "usage": usage(result)})
    return PlainTextResponse(format_transcription(result, form.response_format),
                             media_type=TEXT_TYPES[form.response_format])


async def _events(result: Transcription):
    """OpenAI's transcript events: a delta per segment (sent once the whole file is transcribed:
    hark.transcribe decodes all windows in one batch), then the whole text with usage."""
    for i, segment in enumerate(result.segments):
        text = segment.text.lstrip() if i == 0 else segment.text
        yield sse({"type": "transcript.text.delta", "delta": text, "logprobs": None})
    yield sse({"type": "transcript.text.done", "text": result.text, "logprobs": None, "usage": usage(result)})
    yield sse("[DONE]")
