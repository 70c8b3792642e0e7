"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's multipart form and response shapes).

The upload is decoded and cut into windows off the event loop, under the transcription caps
(hark.transcribe.TranscriptionRun). Each window's decode is an engine request like any other, so the
windows of every upload share the engine's batches with each other and with all other requests. What
the run does between decodes (dense probes, word alignment, choosing retries and tails) runs as short
jobs in the engine thread. With stream=true the text is sent token by token as it is sampled
(hark.server.transcript_stream). A client that goes away aborts the decodes still running.
"""
import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import UploadFile

from hark.audio import TRANSCRIPTION_LIMITS, load_audio
from hark.engine.async_engine import AsyncLLMEngine
from hark.server.completions import sse, unless_disconnected
from hark.server.errors import APIError, error_body, to_api_error
from hark.server.state import Admission, ServedModel
from hark.sampling import SamplingParams
from hark.server.transcript_stream import logprob_entries, stream_transcript
from hark.transcribe import FORMATS, Transcription, TranscriptionOptions, format_transcription
from hark.transcribe.formats import verbose_json
from hark.transcribe.pipeline import TranscriptionRun, WindowRequest

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
    logprobs: bool = False          # include[]=logprobs
    beam: dict = field(default_factory=dict)   # use_beam_search=true: beam_size, length_penalty (at temperature 0)
    repetition_penalty: float = 1.0     # vLLM's sampling field


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
        beam = _beam_fields(form)
        penalty = _field(form, "repetition_penalty")
        try:
            penalty = 1.0 if penalty is None else float(penalty)
        except ValueError:
            penalty = math.nan
        if not penalty > 0 or math.isinf(penalty):
            raise APIError(400, "repetition_penalty must be a number > 0", param="repetition_penalty")
        include = form.getlist("include[]") or form.getlist("include")
        if any(i != "logprobs" for i in include):
            raise APIError(400, "include[] takes logprobs", param="include[]")
        if include and response_format != "json" and stream != "true":
            raise APIError(400, "include[]=logprobs needs response_format=json (or stream=true)", param="include[]")
        return TranscriptionForm(audio=data, model=_field(form, "model"), language=_field(form, "language"),
                                 prompt=_field(form, "prompt"), response_format=response_format,
                                 granularities=list(granularities), temperature=temperature,
                                 stream=stream == "true", logprobs=bool(include), beam=beam,
                                 repetition_penalty=penalty)


def _beam_fields(form) -> dict:
    """use_beam_search (as vLLM has it), with beam_width (default 5, faster-whisper's) and length_penalty."""
    use = (_field(form, "use_beam_search") or "false").lower()
    if use not in ("true", "false"):
        raise APIError(400, f"use_beam_search must be true or false, got {use!r}", param="use_beam_search")
    given = [name for name in ("beam_width", "length_penalty") if _field(form, name) is not None]
    if use == "false":
        if given:
            raise APIError(400, f"{given[0]} needs use_beam_search=true", param=given[0])
        return {}
    beam = {"beam_size": 5}
    for name, key, kind in (("beam_width", "beam_size", int), ("length_penalty", "length_penalty", float)):
        value = _field(form, name)
        if value is None:
            continue
        try:
            beam[key] = kind(value)
        except ValueError:
            raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                           param=name) from None
    if not 1 <= beam["beam_size"] <= 16:
        raise APIError(400, "beam_width must be in [1, 16]", param="beam_width")
    return beam


def usage(t: Transcription) -> dict:
    return {"type": "duration", "seconds": math.ceil(t.duration)}


async def transcribe(served: ServedModel, form: TranscriptionForm, task: str, request: Request):
    cap = request.app.state.max_upload_bytes
    limits = replace(TRANSCRIPTION_LIMITS, max_input_bytes=cap)
    # OpenAI: temperature 0 (the default) lets the decoder raise it on failure; another value is used as is.
    temperature = {"temperature": form.temperature} if form.temperature else {}
    if form.stream:     # each window decoded once, tokens sent as sampled (hark.server.transcript_stream)
        temperature = {"temperature": form.temperature or 0.0, "timestamps": False, "best_of": 1}
    words = "word" in form.granularities
    opts = TranscriptionOptions(language=form.language, task=task, word_timestamps=words,
                                initial_prompt=form.prompt, logprobs=form.logprobs,
                                repetition_penalty=form.repetition_penalty, **temperature, **form.beam)

    with served.admit() as ticket:
        # A TranscriptionRun drives the LLMEngine itself (in run_job, between steps): it is built on that engine.
        run = await asyncio.to_thread(TranscriptionRun, served.engine.engine, [form.audio], opts, limits)
        form.audio = b""
        if form.stream:
            ticket.keep()
            return StreamingResponse(_events(served, ticket, run, form.logprobs), media_type="text/event-stream")
        result = await unless_disconnected(request, _transcribe(served, run))

    if form.response_format == "json":
        body = {"text": result.text, "usage": usage(result)}
        if form.logprobs:
            pairs = [p for w in run.timelines[0] for p in run.text_logprobs(w)]
            body["logprobs"] = logprob_entries(served.tokenizer, pairs)
        return JSONResponse(body)
    if form.response_format == "verbose_json":
        body = verbose_json(result)
        if words and "segment" not in form.granularities:
            body.pop("segments")
        return JSONResponse({**body, "usage": usage(result)})
    return PlainTextResponse(format_transcription(result, form.response_format),
                             media_type=TEXT_TYPES[form.response_format])


async def _decode_windows(engine: AsyncLLMEngine, run: TranscriptionRun) -> AsyncIterator[str]:
    """Runs the run's window decodes on the engine until none is left; yields the text as it becomes
    final, in time order. Leaving early (client gone, task cancelled) aborts the decodes still running."""
    decodes: dict[asyncio.Task, WindowRequest] = {}

    def submit(requests: list[WindowRequest]) -> None:
        for d in requests:
            outputs = engine.generate(None, d.params, processed=d.processed)
            decodes[asyncio.ensure_future(_final_output(outputs))] = d

    try:
        submit(await engine.run_job(lambda _: run.start()))
        while decodes:
            finished, _ = await asyncio.wait(decodes, return_when=asyncio.FIRST_COMPLETED)
            done = [(decodes.pop(task), task.result().outputs) for task in finished]
            follow_ups, text = await engine.run_job(lambda _: (run.finish(done), run.take_text()))
            submit(follow_ups)
            if text:
                yield text
    finally:
        for task in decodes:
            task.cancel()       # each aborts its engine request
        await asyncio.gather(*decodes, return_exceptions=True)


async def _final_output(outputs):
    out = None
    async for out in outputs:
        pass
    return out


async def _result(served: ServedModel, run: TranscriptionRun) -> Transcription:
    result = (await served.engine.run_job(lambda _: run.results()))[0]
    served.metrics.audio_seconds.labels(served.name).inc(result.duration)
    return result


async def _transcribe(served: ServedModel, run: TranscriptionRun) -> Transcription:
    async for _ in _decode_windows(served.engine, run):
        pass
    return await _result(served, run)


async def _events(served: ServedModel, ticket: Admission, run: TranscriptionRun, logprobs: bool) -> AsyncIterator[str]:
    """OpenAI's transcript events (a delta per piece of text as it is sampled, then the whole text with
    usage), each with vLLM's "choices" too. An error mid-stream becomes an error event."""
    deltas = stream_transcript(served.engine, run)
    sent = []
    try:
        async for d in deltas:
            entries = logprob_entries(served.tokenizer, d.tokens) if logprobs else None
            sent += entries or []
            yield sse({"type": "transcript.text.delta", "delta": d.text, "logprobs": entries,
                       "choices": [{"index": 0, "delta": {"content": d.text}, "finish_reason": None}]})
        result = await _result(served, run)
        yield sse({"type": "transcript.text.done", "text": result.text, "logprobs": sent if logprobs else None,
                   "usage": usage(result),
                   "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]})
    except Exception as e:  # the headers are gone: report in-band
        err = to_api_error(e)
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        await deltas.aclose()
        ticket.release()
    yield sse("[DONE]")


async def transcribe_by_prompt(served: ServedModel, form: TranscriptionForm, request: Request):
    """An audio LLM's transcript (Voxtral): one generate request over its transcription prompt for the
    whole upload (the model's processor cuts it into its own windows); json or text, no timestamps."""
    if form.response_format not in ("json", "text"):
        raise APIError(400, f"model {served.name!r} gives plain transcripts: use response_format json or text",
                       param="response_format")
    if form.stream or form.logprobs or form.prompt is not None:
        field_name = "stream" if form.stream else "include[]" if form.logprobs else "prompt"
        raise APIError(400, f"{field_name} is not supported with model {served.name!r}", param=field_name)
    engine = served.engine
    limits = replace(TRANSCRIPTION_LIMITS, max_input_bytes=request.app.state.max_upload_bytes)
    with served.admit():
        samples = await asyncio.to_thread(load_audio, form.audio, SAMPLE_RATE, limits=limits)
        form.audio = b""
        processed = await asyncio.to_thread(engine.processor.transcription_prompt, samples, form.language)
        room = engine.max_model_len - len(processed.prompt_token_ids)
        if room < 1:
            raise APIError(400, f"the audio is too long for model {served.name!r}: its prompt takes "
                                f"{len(processed.prompt_token_ids)} of {engine.max_model_len} tokens", param="file")
        params = SamplingParams(temperature=form.temperature or 0.0, max_tokens=room)
        out = await unless_disconnected(request, _final_output(served.engine.generate(None, params,
                                                                                      processed=processed)))
    duration = len(samples) / SAMPLE_RATE
    served.metrics.audio_seconds.labels(served.name).inc(duration)
    text = out.outputs[0].text.strip()
    if form.response_format == "text":
        return PlainTextResponse(text, media_type=TEXT_TYPES["text"])
    return JSONResponse({"text": text, "usage": {"type": "duration", "seconds": math.ceil(duration)}})
