"""vLLM's serving guide on hark: its `serve` command line (with --transcription-model) and its OpenAI-client
scripts, run against the server as vLLM ships them (only the audio assets, the base URL and the model
names differ):
  examples/online_serving/openai_transcription_client.py (sync, AsyncOpenAI streaming, raw HTTP streaming)
  examples/online_serving/openai_chat_completion_client_for_multimodal.py (run_audio), and its parts streamed
Below each `# --- example ---` line the code is vLLM's."""
import asyncio
import base64
import json
import os
import re

import pytest
import requests
from openai import AsyncOpenAI, OpenAI

from hark.cli import parse_args
from hark.server.app import BackgroundServer
from hark.server.launch import build_server_app
from test_media_http import LocalServer, send
from test_qwen2_audio import make_tiny_qwen2_audio
from test_vllm_examples import AudioAsset, reference_words


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    qwen = str(tmp_path_factory.mktemp("qwen2_audio"))
    make_tiny_qwen2_audio(qwen)
    with open(AudioAsset("winning_call").get_local_path(), "rb") as f:
        media = LocalServer({"/winning_call.wav": send(f.read())})
    # vLLM's guide: `vllm serve Qwen/Qwen2-Audio-7B-Instruct --max-model-len 4096 ...`; the transcription
    # model takes its own settings (Whisper has 448 positions).
    args = parse_args(["serve", "--allowed-media-domains", "localhost", qwen, "--max-model-len", "4096",
                       "--transcription-model", "default", "--trust-remote-code", "--enforce-eager",
                       "--served-model-name", "Qwen/Qwen2-Audio-7B-Instruct", "qwen2-audio",
                       "--generation-config", "auto", "--uvicorn-log-level", "warning",
                       "--allow-private-media-addresses"])
    with BackgroundServer(build_server_app(args)) as url:
        yield url + "/v1", media
    media.close()


def test_models_and_settings(server):
    client = OpenAI(api_key="EMPTY", base_url=server[0])
    models = {m.id: m for m in client.models.list().data}
    assert list(models)[:2] == ["Qwen/Qwen2-Audio-7B-Instruct", "qwen2-audio"]
    assert models["Qwen/Qwen2-Audio-7B-Instruct"].max_model_len == 4096
    assert models["whisper-1"].max_model_len == 448 == models["whisper-tiny.en"].max_model_len


# --- example: openai_transcription_client.py ---
def sync_openai(audio_path: str, client: OpenAI, model: str):
    """
    Perform synchronous transcription using OpenAI-compatible API.
    """
    with open(audio_path, "rb") as f:
        transcription = client.audio.transcriptions.create(
            file=f,
            model=model,
            language="en",
            response_format="json",
            temperature=0.0,
            # Additional sampling params not provided by OpenAI API.
            extra_body=dict(
                seed=4419,
                repetition_penalty=1.3,
            ),
        )
        print("transcription result [sync]:", transcription.text)


async def stream_openai_response(audio_path: str, client: AsyncOpenAI, model: str):
    """
    Perform asynchronous transcription using OpenAI-compatible API.
    """
    print("\ntranscription result [stream]:", end=" ")
    with open(audio_path, "rb") as f:
        transcription = await client.audio.transcriptions.create(
            file=f,
            model=model,
            language="en",
            response_format="json",
            temperature=0.0,
            # Additional sampling params not provided by OpenAI API.
            extra_body=dict(
                seed=420,
                top_p=0.6,
            ),
            stream=True,
        )
        async for chunk in transcription:
            if chunk.choices:
                content = chunk.choices[0].get("delta", {}).get("content")
                print(content, end="", flush=True)

    print()  # Final newline after stream ends


def stream_api_response(audio_path: str, model: str, openai_api_base: str):
    """
    Perform streaming transcription using raw HTTP requests to the vLLM API server.
    """
    import json
    import os

    import requests

    api_url = f"{openai_api_base}/audio/transcriptions"
    headers = {"User-Agent": "Transcription-Client"}
    with open(audio_path, "rb") as f:
        files = {"file": (os.path.basename(audio_path), f)}
        data = {
            "stream": "true",
            "model": model,
            "language": "en",
            "response_format": "json",
        }

        print("\ntranscription result [stream]:", end=" ")
        response = requests.post(
            api_url, headers=headers, files=files, data=data, stream=True
        )
        for chunk in response.iter_lines(
            chunk_size=8192, decode_unicode=False, delimiter=b"\n"
        ):
            if chunk:
                data = chunk[len("data: ") :]
                data = json.loads(data.decode("utf-8"))
                data = data["choices"][0]
                delta = data["delta"]["content"]
                print(delta, end="", flush=True)

                finish_reason = data.get("finish_reason")
                if finish_reason is not None:
                    print(f"\n[Stream finished reason: {finish_reason}]")
                    break
# --- end of example ---


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def close_to(text: str, name: str) -> bool:
    want = reference_words(name)
    return sum(a == b for a, b in zip(words(text), want)) >= 0.6 * len(want)


def test_transcription_client(server, capsys):
    openai_api_base = server[0]
    mary_had_lamb = AudioAsset("mary_had_lamb").get_local_path()
    winning_call = AudioAsset("winning_call").get_local_path()
    client = OpenAI(api_key="EMPTY", base_url=openai_api_base)
    model = "whisper-1"
    sync_openai(mary_had_lamb, client, model)
    asyncio.run(stream_openai_response(winning_call, AsyncOpenAI(api_key="EMPTY", base_url=openai_api_base), model))
    stream_api_response(winning_call, model, openai_api_base)
    out = capsys.readouterr().out
    sync = re.search(r"transcription result \[sync\]: (.*)\n", out).group(1)
    streamed = re.findall(r"transcription result \[stream\]: (.*)\n", out)
    assert close_to(sync, "mary_had_lamb") and len(streamed) == 2
    assert all(close_to(s, "winning_call") for s in streamed) and streamed[0] == streamed[1]
    assert "[Stream finished reason: stop]" in out


# --- example: openai_chat_completion_client_for_multimodal.py, run_audio ---
def encode_base64_content_from_url(content_url: str) -> str:
    """Encode a content retrieved from a remote url to base64 format."""

    with requests.get(content_url) as response:
        response.raise_for_status()
        result = base64.b64encode(response.content).decode("utf-8")

    return result


def run_audio(client, model: str, max_completion_tokens: int, audio_url: str) -> None:
    audio_base64 = encode_base64_content_from_url(audio_url)

    # OpenAI-compatible schema (`input_audio`)
    chat_completion_from_base64 = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this audio?"},
                    {
                        "type": "input_audio",
                        "input_audio": {
                            # Any format supported by librosa is supported
                            "data": audio_base64,
                            "format": "wav",
                        },
                    },
                ],
            }
        ],
        model=model,
        max_completion_tokens=max_completion_tokens,
    )

    result = chat_completion_from_base64.choices[0].message.content
    print("Chat completion output from input audio:\n", result)

    # HTTP URL
    chat_completion_from_url = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this audio?"},
                    {
                        "type": "audio_url",
                        "audio_url": {
                            # Any format supported by librosa is supported
                            "url": audio_url
                        },
                    },
                ],
            }
        ],
        model=model,
        max_completion_tokens=max_completion_tokens,
    )

    result = chat_completion_from_url.choices[0].message.content
    print("Chat completion output from audio url:\n", result)

    # base64 URL
    chat_completion_from_base64 = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this audio?"},
                    {
                        "type": "audio_url",
                        "audio_url": {
                            # Any format supported by librosa is supported
                            "url": f"data:audio/ogg;base64,{audio_base64}"
                        },
                    },
                ],
            }
        ],
        model=model,
        max_completion_tokens=max_completion_tokens,
    )

    result = chat_completion_from_base64.choices[0].message.content
    print("Chat completion output from base64 encoded audio:\n", result)
# --- end of example ---


def test_chat_client_audio_parts(server, capsys):
    base, media = server
    client = OpenAI(api_key="EMPTY", base_url=base)
    model = client.models.list().data[0].id
    audio_url = media.url("/winning_call.wav", host="localhost")
    run_audio(client, model, 16, audio_url)
    out = capsys.readouterr().out
    heads = re.findall(r"Chat completion output from ([^\n]*):\n", out)
    assert heads == ["input audio", "audio url", "base64 encoded audio"]
    assert [path for path, _ in media.requests].count("/winning_call.wav") >= 2   # the script's and the server's


def test_chat_audio_streamed(server):
    base, media = server
    client = OpenAI(api_key="EMPTY", base_url=base)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What's in this audio?"},
        {"audio_url": media.url("/winning_call.wav", host="localhost")},          # vLLM's short part
    ]}]
    whole = client.chat.completions.create(model="qwen2-audio", messages=messages, max_completion_tokens=16,
                                           temperature=0, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="qwen2-audio", messages=messages, max_completion_tokens=16,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    # (the tiny model's bytes are mostly not UTF-8, so the streamed text is not compared with the whole)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 16

