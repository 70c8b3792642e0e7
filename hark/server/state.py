"""What the server holds per served model: its async engine, admission control, metrics hooks."""
import asyncio
import base64
from dataclasses import dataclass, field

from hark.chat import build_chat_prompt
from hark.engine.async_engine import AsyncLLMEngine
from hark.lora.request import LoRARequest
from hark.media import MediaPolicy, afetch_media
from hark.multimodal.content_parts import normalize_part
from hark.outputs import RequestOutput
from hark.server.errors import APIError
from hark.server.metrics import Metrics


class Admission:
    """One admitted request. Leaving the `with` block releases it unless keep() handed it to a stream."""

    def __init__(self, served: "ServedModel"):
        self.served, self.kept, self.released = served, False, False

    def __enter__(self) -> "Admission":
        served = self.served
        if served.in_flight >= served.engine.max_num_seqs + served.max_queued_requests:
            served.metrics.rejected.labels(served.name).inc()
            raise APIError(429, f"the server is at capacity ({served.in_flight} requests in flight for "
                                f"model {served.name!r}); retry later", code="server_overloaded")
        served.in_flight += 1
        return self

    def __exit__(self, *exc) -> None:
        if not self.kept:
            self.release()

    def keep(self) -> None:
        self.kept = True

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.served.in_flight -= 1


@dataclass
class ServedModel:
    name: str
    engine: AsyncLLMEngine
    metrics: Metrics
    media_policy: MediaPolicy = field(default_factory=MediaPolicy)
    max_queued_requests: int = 256
    chat_template: str | None = None
    aliases: tuple = ()          # further names the model answers to (--served-model-name a b, whisper-1)
    in_flight: int = 0
    loras: dict[str, LoRARequest] = field(default_factory=dict)   # LoRA adapters it serves, by model name
    lora_ids: int = 0            # the last lora_int_id handed out

    def next_lora_id(self) -> int:
        self.lora_ids += 1
        return self.lora_ids

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_whisper(self) -> bool:
        return self.engine.is_encoder_decoder

    @property
    def transcribes_by_prompt(self) -> bool:
        """An audio LLM with a transcription prompt (Voxtral): /v1/audio/transcriptions generates from it."""
        return hasattr(self.engine.processor, "transcription_prompt")

    def admit(self) -> Admission:
        return Admission(self)

    def observe_finished(self, out: RequestOutput) -> None:
        self.metrics.observe_finished(self.name, out)

    async def chat_prompt(self, messages: list, chat_template: str | None, add_generation_prompt: bool,
                          template_kwargs: dict):
        """The engine prompt for a conversation; audio, image and video URLs are fetched here (async, under the
        media policy) and handed on as data: URLs, so the model's processor never touches the network."""
        messages = [await self._fetch_media_urls(m) for m in messages]
        return await asyncio.to_thread(build_chat_prompt, self.engine, messages,
                                       chat_template or self.chat_template, add_generation_prompt, template_kwargs)

    async def _fetch_media_urls(self, message):
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            return message
        parts = []
        for part in map(normalize_part, message["content"]):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("audio_url", "image_url", "video_url"):
                spec = part.get(kind)
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ValueError(f"an {kind} content part needs {{'{kind}': {{'url': '...'}}}}.")
                if not url[:5].lower() == "data:":
                    data = await afetch_media(url, self.media_policy)
                    part = {**part, kind: {**(spec if isinstance(spec, dict) else {}), "url": _data_url(data)}}
            parts.append(part)
        return {**message, "content": parts}


def _data_url(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")
