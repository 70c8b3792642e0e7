"""LoRA adapters over the API with the real openai client: `hark serve --enable-lora --lora-modules
name=path` (its parsed arguments, served in a thread), model=<adapter> answers as the offline engine
does with that adapter, /v1/models lists adapters with their parent, /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's bodies) behind the API key."""
import httpx
import openai
import pytest

from hark.cli import parse_args
from hark.lora import LoRARequest
from hark.llm import LLM
from hark.sampling import SamplingParams
from hark.server.app import BackgroundServer
from hark.server.launch import build_server_app
from lora_adapters import ALL_PROJECTIONS, make_adapter

KEY = "test-key"
PROMPT = "the cat sat on the mat and then"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def adapters(qwen2_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-lora")
    every, qv = str(root / "every"), str(root / "qv")
    make_adapter(qwen2_ckpt[0], every, ALL_PROJECTIONS, r=8, lora_alpha=16, seed=1)
    make_adapter(qwen2_ckpt[0], qv, ["q_proj", "v_proj"], r=4, lora_alpha=8, seed=2, use_rslora=True)
    bad = root / "bad"
    bad.mkdir()
    return every, qv, str(bad)


@pytest.fixture(scope="module")
def server(qwen2_ckpt, adapters):
    every, _, _ = adapters
    args = parse_args(["serve", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                       "--served-model-name", "tiny", "--max-model-len", "256", "--api-key", KEY,
                       "--lora-modules", f"every={every}", qwen2_ckpt[0]])
    assert args.model == qwen2_ckpt[0] and args.lora_modules == [f"every={every}"]
    with BackgroundServer(build_server_app(args)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(qwen2_ckpt, adapters):
    every, qv, _ = adapters
    llm = LLM(qwen2_ckpt[0], enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=12)

    def text(lora: LoRARequest | None, chat: bool = False) -> str:
        if chat:
            return llm.chat(HELLO, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
        return llm.generate(PROMPT, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
    return text, LoRARequest("every", 1, every), LoRARequest("qv", 2, qv)


def post(server: str, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + path, json=body, headers=headers, timeout=60)


def test_model_names_an_adapter(client, offline):
    text, every, _ = offline
    base = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=12)
    with_lora = client.completions.create(model="every", prompt=PROMPT, temperature=0, max_tokens=12)
    assert base.choices[0].text == text(None) and with_lora.choices[0].text == text(every)
    assert with_lora.choices[0].text != base.choices[0].text and with_lora.model == "every"
    chat = client.chat.completions.create(model="every", messages=HELLO, temperature=0, max_tokens=12)
    assert chat.choices[0].message.content == text(every, chat=True) and chat.model == "every"
    stream = client.chat.completions.create(model="every", messages=HELLO, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text(every, chat=True)


def test_concurrent_requests_for_the_base_and_adapters(server, client, offline, adapters):
    """Requests for the base model and two adapters at once (they share the engine's batches)."""
    import asyncio
    text, every, qv = offline
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": adapters[1]}).status_code == 200

    async def ask_all():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
        names = ["tiny", "every", "qv"] * 3
        outs = await asyncio.gather(*(aclient.completions.create(model=n, prompt=PROMPT, temperature=0, max_tokens=12)
                                      for n in names))
        await aclient.close()
        return names, outs
    try:
        names, outs = asyncio.run(ask_all())
        want = {"tiny": text(None), "every": text(every), "qv": text(qv)}
        assert [o.choices[0].text for o in outs] == [want[n] for n in names]
    finally:
        assert post(server, "/v1/unload_lora_adapter", {"lora_name": "qv"}).status_code == 200


def test_models_lists_adapters_with_their_parent(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards)[:2] == ["tiny", "every"]
    assert cards["every"].parent == "tiny" and cards["every"].root == adapters[0]
    assert cards["tiny"].parent is None


def test_load_and_unload(server, client, offline, adapters):
    text, _, qv = offline
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=2)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": adapters[1]})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'qv' added successfully."
    assert "qv" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="qv", prompt=PROMPT, temperature=0, max_tokens=12)
    assert out.choices[0].text == text(qv)
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": adapters[1]})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "qv"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'qv' removed successfully."
    assert "qv" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=2)
    gone = post(server, "/v1/unload_lora_adapter", {"lora_name": "qv"})
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]


def test_bad_adapters_are_a_400_that_says_why(server, client, adapters):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": adapters[2]})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        f"LoRA adapter 'bad': no adapter_config.json in {adapters[2]}.")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": adapters[1]})
    assert r.status_code == 400                    # a base model's name
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    assert "bad" not in [m.id for m in client.models.list().data]


def test_adapter_endpoints_need_the_api_key(server, adapters):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": adapters[1]}),
                       ("/v1/unload_lora_adapter", {"lora_name": "every"})):
        assert post(server, path, body, key=None).status_code == 401
        assert post(server, path, body, key="wrong").status_code == 401
    models = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [m["id"] for m in models] == ["tiny", "every"]      # nothing changed
    assert 'hark_lora_adapters_loaded{model="tiny"} 1.0' in httpx.get(server + "/metrics").text


def test_serve_arguments_are_checked(qwen2_ckpt):
    with pytest.raises(ValueError, match="--lora-modules needs --enable-lora"):
        build_server_app(parse_args(["serve", qwen2_ckpt[0], "--lora-modules", "a=/x"]))
    with pytest.raises(ValueError, match="name=path"):
        build_server_app(parse_args(["serve", qwen2_ckpt[0], "--enable-lora", "--lora-modules", "a=/x", "=y"]))
