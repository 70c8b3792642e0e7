"""hark serve end to end with the real openai client: chat and completions on a tiny random LM, served by
uvicorn on 127.0.0.1 in a thread; outputs are checked against the offline LLM on the same checkpoint."""
import asyncio
import re
import time

import httpx
import openai
import pytest

from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.sampling import SamplingParams
from hark.server.app import BackgroundServer, build_app
from hark.server.metrics import Metrics
from hark.server.state import ServedModel

KEY = "test-key"
HELLO = [{"role": "user", "content": "hello there"}]


def live_app(path: str, max_num_seqs: int = 8, max_queued_requests: int = 64, num_kv_blocks: int = 64, **app_kw):
    llm = LLM(path, max_model_len=256, max_num_seqs=max_num_seqs, num_kv_blocks=num_kv_blocks)
    metrics = Metrics()
    served = ServedModel("tiny", AsyncLLMEngine(llm.llm_engine), metrics, max_queued_requests=max_queued_requests)
    return build_app([served], metrics, **app_kw), served


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1))


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(qwen2_ckpt):
    app, served = live_app(qwen2_ckpt[0], api_key=KEY)
    with BackgroundServer(app) as url:
        yield url, served


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(qwen2_ckpt):
    return LLM(qwen2_ckpt[0], max_model_len=256, num_kv_blocks=64)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_greedy_matches_offline_llm(client, offline):
    want = offline.chat(HELLO, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == len(want.token_ids) == 12
    assert r.usage.prompt_tokens == len(offline.chat(HELLO, SamplingParams(max_tokens=1), use_tqdm=False)[0]
                                        .prompt_token_ids)


def test_chat_stream_concatenates_to_the_same_text(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_completion_tokens=20)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_completion_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_n_seed_stop_and_logprobs(client):
    kw = dict(model="tiny", messages=HELLO, temperature=1.0, max_tokens=10, n=3, seed=7, logprobs=True, top_logprobs=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]   # seeded
    assert len({c.message.content for c in a.choices}) > 1
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    for c in a.choices:
        for t in c.logprobs.content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2
            assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.logprob - 1e-5 or \
                t.logprob == t.top_logprobs[0].logprob   # sampled token: in the top 2, or less likely than both
    text = a.choices[0].message.content
    stop = text[3:5]
    if stop.strip():
        r = client.chat.completions.create(**{**kw, "n": 1, "stop": [stop], "logprobs": False})
        assert stop not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_chat_n_stream(client):
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, n=2, seed=1, stream=True)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, n=2, seed=1)
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_completions_text_token_ids_and_stream(client, offline):
    want = offline.generate("the cat", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0, logprobs=1)
    assert r.choices[0].text == want.outputs[0].text
    assert len(r.choices[0].logprobs.tokens) == 8 and r.choices[0].logprobs.text_offset[0] == 0
    by_ids = client.completions.create(model="tiny", prompt=want.prompt_token_ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == want.outputs[0].text
    batch = client.completions.create(model="tiny", prompt=["the cat", "a b"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and batch.choices[0].text == batch.choices[1].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the cat", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == want.outputs[0].text


@pytest.mark.parametrize("body, param", [
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "temperature": 7}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, None),   # longer than max_model_len
])
def test_bad_chat_requests_are_400_in_openai_shape(server, body, param):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", **body}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in error["message"]
    if param:
        assert error["param"] == param
    ok = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_auth_unknown_model_and_bad_json(server, client):
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/health").status_code == 200


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    url, served = server
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in seen)
        assert metric(url, "hark_kv_cache_usage_perc") > 0
    assert wait_for(lambda: metric(url, "hark_kv_cache_usage_perc") == 0.0
                    and metric(url, "hark_num_requests_in_flight") == 0)
    assert not served.engine.engine.has_unfinished_requests()


def test_metrics_count_requests_tokens_and_latency(server, client):
    url, _ = server
    before = metric(url, "hark_generation_tokens_total")
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
    text = httpx.get(url + "/metrics").text
    assert metric(url, "hark_generation_tokens_total") == before + 5
    assert 'hark_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert metric(url, "hark_time_to_first_token_seconds_count") >= 1
    assert "hark_time_per_output_token_seconds_bucket" in text and "hark_encoder_cache_hits" in text


def test_overload_answers_429_at_once_then_recovers(qwen2_ckpt):
    app, served = live_app(qwen2_ckpt[0], max_num_seqs=2, max_queued_requests=1)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 120, "ignore_eos": True}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(8)))

    with BackgroundServer(app) as url:
        t0 = time.monotonic()
        replies = asyncio.run(burst(url))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) == 3 and codes.count(429) == 5, codes
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.elapsed.total_seconds() < min(r.elapsed.total_seconds() for r in replies if r.status_code == 200)
        assert time.monotonic() - t0 < 60
        assert httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
        assert metric(url, "hark_requests_rejected_total") == 5


def test_engine_death_fails_requests_and_health(qwen2_ckpt):
    app, served = live_app(qwen2_ckpt[0])
    engine = served.engine.engine

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure: /secret/internal/path")

    with BackgroundServer(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        engine.executor.execute = broken   # the engine's next forward fails
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 4})
        assert r.status_code == 503 and "secret" not in r.text and "Traceback" not in r.text
        assert r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(url + "/health").status_code == 503
        again = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4})
        assert again.status_code == 503


def test_streaming_request_failing_validation_gets_a_status_code(server):
    url, _ = server
    # a too-long prompt fails before streaming starts: a proper 400, not a broken stream
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 3000, "stream": True},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
    assert r.headers["content-type"] == "application/json"
