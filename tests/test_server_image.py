"""hark serve with LLaVA and the openai client: image_url chat parts (data: and file: URLs) answer as the
offline API does; hostile images get 400s with an OpenAI-style error body while the server keeps serving."""
import base64

import httpx
import openai
import pytest

from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.media import MediaPolicy
from hark.sampling import SamplingParams
from hark.server.app import BackgroundServer, build_app
from hark.server.metrics import Metrics
from hark.server.state import ServedModel
from test_llava import make_tiny_llava, photos
from test_media_image import encode, gif_frames, huge_png


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llava"))
    make_tiny_llava(path)
    media = tmp_path_factory.mktemp("media")
    llm = LLM(path, allowed_local_media_path=str(media))
    metrics = Metrics()
    served = ServedModel("llava", AsyncLLMEngine(llm.llm_engine), metrics,
                         media_policy=MediaPolicy(allowed_local_root=str(media)))
    with BackgroundServer(build_app([served], metrics)) as url:
        yield url, llm, media


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def test_image_chat_matches_offline_and_hostile_images_get_400(llava_server):
    url, llm, media = llava_server
    photo = encode(photos()[0], "JPEG")
    (media / "photo.jpg").write_bytes(photo)
    question = {"type": "text", "text": "what is this?"}
    offline = llm.chat([{"role": "user", "content": [image_part(photo, "image/jpeg"), question]}],
                       SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    for part in (image_part(photo, "image/jpeg"), {"type": "image_url", "image_url": {"url": f"file://{media}/photo.jpg"}}):
        r = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": [part, question]}],
                                           temperature=0, max_tokens=8)
        assert r.choices[0].message.content == offline.outputs[0].text
        assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    from PIL import Image
    hostile = {
        "30000x30000 png": huge_png(),
        "truncated jpeg": photo[: len(photo) // 2],
        "animated gif, 100k frames": gif_frames(50_000),
        "1x1 image": encode(Image.new("RGB", (1, 1)), "PNG"),
        "not an image": b"GIF89a" + bytes(64),
    }
    for name, data in hostile.items():
        bad = httpx.post(url + "/v1/chat/completions", timeout=60, json={"model": "llava", "messages": [
            {"role": "user", "content": [image_part(data), question]}]})
        assert bad.status_code == 400, name
        message = bad.json()["error"]["message"]
        assert message and "Traceback" not in message and "PIL" not in message, (name, message)
    r = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": [image_part(photo), question]}],
                                       temperature=0, max_tokens=8)
    assert r.choices[0].message.content == offline.outputs[0].text
    refused = httpx.post(url + "/v1/chat/completions", json={"model": "llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/x.png"}}, question]}]})
    assert refused.status_code in (400, 403) and refused.json()["error"]["message"]
