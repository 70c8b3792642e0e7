"""Hostile input against a live hark serve (tiny LM + Whisper tiny.en): each attack gets a clean 4xx in
OpenAI's shape and is followed by a normal request that must still succeed. All traffic stays on 127.0.0.1."""
import glob
import io
import os
import socket
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.media import MediaPolicy
from hark.server.app import BackgroundServer, build_app
from hark.server.metrics import Metrics
from hark.server.state import ServedModel
from test_media_http import PUBLIC_IP, LocalServer, RouteToLoopback

WAV = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "*.wav")))[0]
MAX_UPLOAD = 2**20
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(qwen2_ckpt):
    metrics = Metrics()
    lm = ServedModel("tiny", AsyncLLMEngine(LLM(qwen2_ckpt[0], max_model_len=256, num_kv_blocks=64).llm_engine),
                     metrics)
    whisper = ServedModel("whisper-1", AsyncLLMEngine(LLM().llm_engine), metrics)
    app = build_app([lm, whisper], metrics, max_upload_bytes=MAX_UPLOAD, body_read_timeout_s=1.0)
    with BackgroundServer(app) as url:
        yield url, lm


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, text: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text and "site-packages" not in r.text and "/work/" not in error["message"]
    if text:
        assert text in error["message"], error["message"]
    return error


def still_serves(http: httpx.Client, transcribe: bool = False) -> None:
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    if transcribe:
        with open(WAV, "rb") as f:
            r = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", f.read())}, data={"model": "whisper-1"})
        assert r.status_code == 200 and "Dashwood" in r.json()["text"]


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16000), np.float32), 16000, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("name, audio", [
    ("empty", b""),
    ("not audio", b"this is not audio at all" * 100),
    ("corrupt wav", b"RIFF" + os.urandom(2000)),
    ("truncated wav", open(WAV, "rb").read()[:60]),
    ("header only", wav_bytes(0.5)[:44]),
    ("too short", wav_bytes(0.001)),
])
def test_bad_audio_is_400(http, name, audio):
    r = http.post("/v1/audio/transcriptions", files={"file": ("x.wav", audio)}, data={"model": "whisper-1"})
    assert_error(r, 400)
    still_serves(http)


def test_truncated_real_audio_transcribes_what_is_there(http):
    data = open(WAV, "rb").read()
    r = http.post("/v1/audio/transcriptions", files={"file": ("x.wav", data[: len(data) // 2])},
                  data={"model": "whisper-1"})
    assert r.status_code in (200, 400)
    if r.status_code == 400:
        assert_error(r, 400)
    still_serves(http, transcribe=True)


@pytest.mark.parametrize("form, param", [
    ({"response_format": "docx"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "5"}, "temperature"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),        # needs verbose_json
    ({"timestamp_granularities[]": "syllable", "response_format": "verbose_json"}, "timestamp_granularities[]"),
    ({"stream": "maybe"}, "stream"),
    ({"stream": "true", "response_format": "srt"}, "stream"),
    ({"language": "klingon"}, None),
])
def test_bad_transcription_parameters_are_400(http, form, param):
    with open(WAV, "rb") as f:
        r = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", f.read())},
                      data={"model": "whisper-1", **form})
    error = assert_error(r, 400)
    if param:
        assert error["param"] == param
    still_serves(http)


def test_missing_file_wrong_model_and_wrong_endpoint(http):
    assert_error(http.post("/v1/audio/transcriptions", data={"model": "whisper-1"}), 400, "file")
    assert_error(http.post("/v1/audio/transcriptions", json={"model": "whisper-1"}), 400, "multipart")
    with open(WAV, "rb") as f:
        audio = f.read()
    assert_error(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, data={"model": "gpt-9"}), 404)
    assert_error(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, data={"model": "tiny"}), 400)
    assert_error(http.post("/v1/chat/completions", json={"model": "whisper-1", "messages": HELLO}), 400)
    assert_error(http.get("/v1/nothing"), 404)
    still_serves(http, transcribe=True)


def test_oversize_upload_is_413_before_the_body_is_read(http, server):
    big = b"\0" * (MAX_UPLOAD + 1000)
    t0 = time.monotonic()
    r = http.post("/v1/audio/transcriptions", files={"file": ("big.wav", big)}, data={"model": "whisper-1"})
    assert_error(r, 413, "limit")
    # no Content-Length (chunked): counted while it arrives, refused at the first byte over the cap
    sent = 0

    def chunks():
        nonlocal sent
        yield (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.wav\"\r\n"
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(1024):   # 64 MiB, if the server kept reading
            sent += 2**16
            yield b"\0" * 2**16
        yield b"\r\n--b--\r\n"

    try:
        r = http.post("/v1/audio/transcriptions", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert_error(r, 413)
    except httpx.TransportError:   # the server may close the connection while the client still sends
        pass
    assert sent < 16 * 2**20     # it did not: the connection closed (what is sent is socket buffers)
    assert time.monotonic() - t0 < 20
    still_serves(http, transcribe=True)


def test_slow_client_does_not_block_others_and_times_out(http, server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port))
    try:
        slow.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
        t0 = time.monotonic()
        still_serves(http)                       # others are served while the slow body stalls
        assert time.monotonic() - t0 < 5
        slow.settimeout(10)
        reply = b""
        while chunk := slow.recv(4096):          # the server closes the connection after its reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b'"error"' in reply
    finally:
        slow.close()
    still_serves(http)


def audio_url_chat(url: str) -> dict:
    return {"model": "tiny", "max_tokens": 3, "messages": [
        {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}


def test_media_host_resolving_to_loopback_is_refused(http, server):
    _, lm = server
    target = LocalServer({"/a.wav": lambda h: (h.send_response(200), h.end_headers(), h.wfile.write(b"RIFF"))})
    lm.media_policy = MediaPolicy(allowed_domains=("localhost",))
    try:
        r = http.post("/v1/chat/completions", json=audio_url_chat(target.url("/a.wav", host="localhost")))
        assert_error(r, 400)
        r = http.post("/v1/chat/completions", json=audio_url_chat(target.url("/a.wav")))   # 127.0.0.1: not allowed
        assert_error(r, 400, "not allowed")
        assert target.requests == []
    finally:
        lm.media_policy = MediaPolicy()
    still_serves(http)


def test_redirect_from_allowed_host_to_private_address_is_refused(http, server):
    _, lm = server
    private = LocalServer({"/secret": lambda h: (h.send_response(200), h.end_headers(), h.wfile.write(b"secret"))})

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", private.url("/secret"))
        h.end_headers()

    public = LocalServer({"/a.wav": redirect, "/gone.wav": lambda h: (h.send_response(404), h.end_headers())})
    transport = RouteToLoopback()
    lm.media_policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), transport=transport)
    try:
        r = http.post("/v1/chat/completions", json=audio_url_chat(f"http://{PUBLIC_IP}:{public.port}/a.wav"))
        assert_error(r, 400)
        assert [path for path, _ in public.requests] == ["/a.wav"]
        assert private.requests == [] and "127.0.0.1" not in transport.sent_to
        r = http.post("/v1/chat/completions", json=audio_url_chat(f"http://{PUBLIC_IP}:{public.port}/gone.wav"))
        assert_error(r, 422, "404")
    finally:
        lm.media_policy = MediaPolicy()
    still_serves(http)


def test_file_urls_stay_inside_the_allowed_folder(http, server, tmp_path):
    _, lm = server
    allowed = tmp_path / "media"
    allowed.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", allowed / "link.wav")
    lm.media_policy = MediaPolicy(allowed_local_root=str(allowed))
    try:
        for url in (f"file://{allowed}/../secret.txt", f"file://{allowed}/link.wav", "file:///etc/passwd",
                    f"file://{allowed}/%2e%2e/secret.txt"):
            error = assert_error(http.post("/v1/chat/completions", json=audio_url_chat(url)), 400)
            assert "secret" != error["message"]
        lm.media_policy = MediaPolicy()
        assert_error(http.post("/v1/chat/completions", json=audio_url_chat(f"file://{allowed}/x.wav")), 400, "disabled")
    finally:
        lm.media_policy = MediaPolicy()
    still_serves(http)


def test_garbage_bodies(http):
    headers = {"Content-Type": "application/json"}
    for body in (b"", b"[]", b"null", b'{"model": "tiny", "messages": [{"role": "user", "content": {"x": 1}}]}',
                 b'{"model": "tiny", "prompt": [[1, 2], "x"]}', b"\xff\xfe" * 100, b'{"messages": ' * 2000):
        r = http.post("/v1/chat/completions", content=body, headers=headers)
        assert_error(r, 400)
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": [10**9]}), 400)
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": [[1, 2], "x"]}), 400)
    still_serves(http)
