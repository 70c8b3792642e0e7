"""`hark serve` as a process: it starts from the command line, and SIGTERM drains in-flight requests
(they finish) while new ones are refused, then the process exits."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_process(qwen2_ckpt):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hark.cli", "serve", qwen2_ckpt[0], "--port", str(port), "--served-model-name", "tiny",
         "--max-model-len", "512", "--shutdown-timeout", "30", "--api-key", "k"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(serve_process):
    proc, url = serve_process
    headers = {"Authorization": "Bearer k"}
    assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
    events, started = [], threading.Event()

    def stream():
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:   # new requests: refused (503 while draining) or the listener is closed already
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=5,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503
    except httpx.TransportError:
        pass
    reader.join(60)
    assert events[-1] == "[DONE]"
    finish = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c.get("finish_reason")]
    assert finish == ["length"]         # the in-flight request ran to its end
    assert proc.wait(30) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal once drained
