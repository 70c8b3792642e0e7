"""hark serve end to end with the openai client on audio: transcription and translation with Whisper tiny.en
(every response format, word timestamps, streaming, long audio, concurrent uploads sharing engine steps,
disconnects) and audio chat with a tiny random Qwen2-Audio."""
import asyncio
import base64
import glob
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jiwer
import numpy as np
import openai
import pytest
import soundfile as sf

from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.media import MediaPolicy
from hark.sampling import SamplingParams
from hark.server.app import BackgroundServer, build_app
from hark.server.metrics import Metrics
from hark.server.state import ServedModel
from test_transcribe_pipeline import speech_after_a_pause

DATA = os.path.join(os.path.dirname(__file__), "data")
WAVS = sorted(glob.glob(os.path.join(DATA, "*.wav")))


def reference_words(wav: str) -> list[str]:
    with open(wav[:-4] + ".txt") as f:
        return [w.strip(".,;:!?\"'").lower() for w in f.read().split()]


def words_of(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'").lower() for w in text.split()]


@pytest.fixture(scope="module")
def whisper_server():
    llm = LLM(max_num_seqs=16)
    metrics = Metrics()
    engine = AsyncLLMEngine(llm.llm_engine)
    app = build_app([ServedModel("whisper-1", engine, metrics)], metrics)
    with BackgroundServer(app) as url:
        yield url, engine


@pytest.fixture
def client(whisper_server):
    return openai.OpenAI(base_url=whisper_server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def paused_speech() -> bytes:
    """A wav whose first window decodes in a few steps and whose two later windows take about 100 each."""
    buf = io.BytesIO()
    sf.write(buf, speech_after_a_pause([(sf.read(w, dtype="float32")[0], None) for w in WAVS]), 16000, format="WAV")
    return buf.getvalue()


def wait_until_idle(engine: AsyncLLMEngine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.num_in_flight or engine.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine still has requests"
        time.sleep(0.02)


def all_blocks_free(engine: AsyncLLMEngine, timeout_s: float = 5.0) -> bool:
    """Whether the engine's stats come to show every KV block free: the loop refreshes them after the step
    that applies an abort, a moment after the request is gone from the engine."""
    deadline = time.monotonic() + timeout_s
    while engine.stats["kv_free_blocks"] != engine.stats["kv_total_blocks"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_transcription_formats(client):
    wav = WAVS[0]
    want = reference_words(wav)
    with open(wav, "rb") as f:
        audio = f.read()
    r = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="json")
    got = words_of(r.text)
    assert sum(a == b for a, b in zip(got, want)) >= 0.8 * len(want)
    assert r.usage.type == "duration" and r.usage.seconds == int(np.ceil(sf.info(wav).duration))
    text = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="text")
    assert text.strip() == r.text
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:") and r.text.split()[0] in srt
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")
    verbose = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio),
                                                 response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"])
    assert verbose.text == r.text and verbose.language == "english" and abs(verbose.duration - sf.info(wav).duration) < 0.01
    assert 0.0 <= verbose.segments[0].start <= 0.5 and verbose.segments[-1].end <= verbose.duration + 0.5
    assert [w.word.strip() for w in verbose.words] == r.text.split()
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in verbose.words)


def test_transcription_stream_and_long_audio(client):
    clips = [sf.read(w, dtype="float32")[0] for w in WAVS]
    long_audio = np.concatenate(clips * 2)       # 49 s: several windows
    assert len(long_audio) > 40 * 16000
    buf = io.BytesIO()
    sf.write(buf, long_audio, 16000, format="WAV")
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("long.wav", buf.getvalue()), stream=True))
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    done = events[-1]
    assert done.type == "transcript.text.done" and "".join(e.delta for e in events[:-1]).strip() == done.text
    assert done.usage.seconds == int(np.ceil(len(long_audio) / 16000))
    # A stream decodes each window once, without timestamps: as transcribe does with those options.
    assert done.text == LLM().transcribe(long_audio, timestamps=False, temperature=0.0).text
    reference = " ".join(" ".join(reference_words(w)) for w in WAVS * 2)
    assert jiwer.wer(reference, " ".join(words_of(done.text.replace("Mr.", "mister")))) < 0.3


def test_concurrent_uploads_decode_in_the_same_steps(whisper_server):
    url, engine = whisper_server

    def upload(wav: str) -> dict:
        with open(wav, "rb") as f:
            r = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", f.read())},
                           data={"model": "whisper-1", "response_format": "verbose_json"}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    wait_until_idle(engine)
    steps = engine.num_steps
    with ThreadPoolExecutor(2) as pool:
        bodies = list(pool.map(upload, [WAVS[0], WAVS[3]]))
    steps = engine.num_steps - steps
    tokens = [sum(len(s["tokens"]) for s in body["segments"]) for body in bodies]
    # A step decodes at most one token of each request, so one upload after the other would take at
    # least sum(tokens) steps.
    assert min(tokens) > 20 and steps < sum(tokens), (steps, tokens)


def test_stream_sends_tokens_as_they_are_sampled(client, whisper_server, paused_speech):
    _, engine = whisper_server
    events, busy = [], False
    stream = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", paused_speech), stream=True,
                                                include=["logprobs"])
    for event in stream:
        if not events:
            busy = engine.engine.has_unfinished_requests()      # the first delta comes while windows decode
        events.append(event)
    deltas, done = events[:-1], events[-1]
    assert busy and all(e.type == "transcript.text.delta" for e in deltas)
    assert done.type == "transcript.text.done" and "".join(e.delta for e in deltas).strip() == done.text
    words = done.text.split()
    assert len(deltas) > len(words) / 2          # about a token per delta, not a window per delta
    assert deltas[0].delta.startswith("He") and done.usage.seconds == 79
    logprobs = [lp for e in deltas for lp in e.logprobs]
    assert "".join(lp.token for lp in logprobs).strip() == done.text == "".join(
        bytes(b for lp in done.logprobs for b in lp.bytes).decode()).strip()
    assert all(lp.logprob <= 0 for lp in logprobs)


def test_json_logprobs_and_the_whisper_1_alias(client):
    with open(WAVS[1], "rb") as f:
        audio = f.read()
    r = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="json",
                                           include=["logprobs"])
    assert "".join(lp.token for lp in r.logprobs).strip() == r.text and all(lp.logprob <= 0 for lp in r.logprobs)
    plain = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="json")
    assert plain.text == r.text and getattr(plain, "logprobs", None) is None


def test_disconnect_aborts_the_window_decodes(whisper_server, paused_speech):
    url, engine = whisper_server
    request = {"files": {"file": ("a.wav", paused_speech)}, "data": {"model": "whisper-1", "stream": "true"}}
    # The whole file takes over 100 steps; its first delta comes after about 15.
    wait_until_idle(engine)
    with httpx.stream("POST", url + "/v1/audio/transcriptions", timeout=120, **request) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["type"] == "transcript.text.delta"
        steps = engine.num_steps
    wait_until_idle(engine)
    assert engine.num_steps - steps < 40
    assert all_blocks_free(engine)

    async def leave_once_decoding():   # without streaming: the client goes while the windows decode
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            upload = asyncio.ensure_future(http.post("/v1/audio/transcriptions", **request | {"data": {}}))
            while not engine.engine.has_unfinished_requests():
                await asyncio.sleep(0.005)
            upload.cancel()
            return engine.num_steps
    steps = asyncio.run(leave_once_decoding())
    wait_until_idle(engine)
    assert engine.num_steps - steps < 40
    assert all_blocks_free(engine)


def test_translation_needs_a_multilingual_model(client, whisper_server):
    with open(WAVS[0], "rb") as f:
        with pytest.raises(openai.BadRequestError, match="English-only"):
            client.audio.translations.create(model="whisper-1", file=("a.wav", f.read()))
    with open(WAVS[1], "rb") as f:
        assert client.audio.transcriptions.create(model="whisper-1", file=("b.wav", f.read())).text


def test_repetition_penalty_field(client):
    """vLLM's repetition_penalty on transcriptions: passed to the decodes; a bad value is a 400."""
    clip, rate = sf.read(WAVS[4], dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, np.concatenate([clip, clip]), rate, format="WAV")    # the sentence twice: its tokens repeat
    audio = buf.getvalue()
    # The fallback may recover the plain text at a higher temperature, so the decodes' scores are compared.
    plain = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="verbose_json")
    penalized = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio),
                                                   response_format="verbose_json", extra_body={"repetition_penalty": 3.0})
    scores = lambda r: [(s.temperature, round(s.avg_logprob, 3)) for s in r.segments]     # noqa: E731
    assert plain.text and scores(penalized) != scores(plain)
    for bad in ("0", "-1", "x", "inf"):
        with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
            client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio),
                                               extra_body={"repetition_penalty": bad})


@pytest.fixture(scope="module")
def audio_chat_server(tmp_path_factory):
    from test_qwen2_audio import make_tiny_qwen2_audio
    path = str(tmp_path_factory.mktemp("qwen2_audio"))
    make_tiny_qwen2_audio(path)
    media = tmp_path_factory.mktemp("media")
    llm = LLM(path, max_model_len=1024, num_kv_blocks=256, allowed_local_media_path=str(media))
    metrics = Metrics()
    served = ServedModel("qwen2-audio", AsyncLLMEngine(llm.llm_engine), metrics,
                         media_policy=MediaPolicy(allowed_local_root=str(media)))
    app = build_app([served], metrics)
    with BackgroundServer(app) as url:
        yield url, llm, media


def test_audio_chat_matches_offline(audio_chat_server):
    url, llm, media = audio_chat_server
    with open(WAVS[0], "rb") as f:
        wav = f.read()
    (media / "clip.wav").write_bytes(wav)
    b64 = base64.b64encode(wav).decode()
    question = {"type": "text", "text": "What is said?"}
    parts = {
        "input_audio": {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
        "data_url": {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64}},
        "file_url": {"type": "audio_url", "audio_url": {"url": f"file://{media}/clip.wav"}},
    }
    offline = llm.chat([{"role": "user", "content": [parts["input_audio"], question]}],
                       SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    for name, part in parts.items():
        r = client.chat.completions.create(model="qwen2-audio", messages=[{"role": "user", "content": [part, question]}],
                                           temperature=0, max_tokens=8)
        assert r.choices[0].message.content == offline.outputs[0].text, name
        assert r.usage.prompt_tokens == len(offline.prompt_token_ids) > 200   # 7 s of audio: ~180 audio tokens
    bad = httpx.post(url + "/v1/chat/completions", json={"model": "qwen2-audio", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + bytes(100)).decode(), "format": "wav"}},
        question]}]})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
