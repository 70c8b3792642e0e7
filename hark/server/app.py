"""The FastAPI app: routes, API-key check, draining, request counting; and running it under uvicorn."""
import hmac
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from hark.server import audio, completions, lora
from hark.server.body_limit import BodyLimit
from hark.server.errors import APIError, error_response, install_error_handlers
from hark.server.metrics import Metrics
from hark.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest,
                                  UnloadLoRAAdapterRequest)
from hark.server.state import ServedModel

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/audio/transcriptions", "/v1/audio/translations",
             "/v1/models", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health", "/metrics")


class _Gate:
    """Pure ASGI middleware, outermost: counts responses by endpoint and status; refuses /v1 requests
    without the API key (before their body is read) and every request but /health and /metrics while
    draining."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None, is_draining):
        self.app, self.metrics, self.is_draining = app, metrics, is_draining
        self.api_key = api_key.encode() if api_key is not None else None

    def _refusal(self, scope: Scope, endpoint: str):
        if self.is_draining() and endpoint not in ("/health", "/metrics"):
            return error_response(503, "the server is shutting down; retry on another instance", code="shutting_down")
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return error_response(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        refusal = self._refusal(scope, endpoint)
        if refusal is not None:
            self.metrics.requests.labels(endpoint, str(refusal.status_code)).inc()
            return await refusal(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(models: list[ServedModel], metrics: Metrics, api_key: str | None = None,
              max_upload_bytes: int = 25 * 2**20, body_read_timeout_s: float = 30.0) -> FastAPI:
    by_name = {name: m for m in models for name in (m.name, *m.aliases)}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for m in models:
            m.engine.shutdown()

    app = FastAPI(title="hark", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.draining = False
    app.state.max_upload_bytes = max_upload_bytes
    install_error_handlers(app)

    def pick(name: str | None, whisper: bool):
        """(the served model, the LoRA adapter or None) that `model=name` asks for."""
        adapter = lora.find_adapter(models, name) if name is not None and name not in by_name else None
        if name is not None and name not in by_name and adapter is None:
            names = [*by_name, *(n for m in models for n in m.loras)]
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists "
                                f"{', '.join(repr(n) for n in names)}", param="model", code="model_not_found")
        if adapter is not None:
            served, lora_request = adapter
        else:
            lora_request = None
            served = by_name[name] if name is not None else next(
                (m for m in models if m.is_whisper == whisper), models[0])
        if served.is_whisper != whisper:
            kind = "a Whisper model: use /v1/audio/transcriptions" if served.is_whisper else \
                "not a Whisper model: it cannot transcribe"
            raise APIError(400, f"model {name or served.name!r} is {kind}", param="model")
        return served, lora_request

    @app.get("/health")
    async def health():
        for m in models:
            if m.engine.dead is not None:
                return error_response(503, f"the engine of model {m.name!r} stopped; restart the server",
                                      code="engine_dead")
        if app.state.draining:
            return error_response(503, "the server is shutting down", code="shutting_down")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render({m.name: m.engine for m in models}), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse({"object": "list", "data": lora.model_cards(models, int(time.time()))})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        served, lora_request = pick(body.model, whisper=False)
        return await completions.chat_completions(served, body, request, lora_request)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        served, lora_request = pick(body.model, whisper=False)
        return await completions.completions(served, body, request, lora_request)

    def pick_transcriber(name: str | None) -> ServedModel:
        """A Whisper model, or an audio LLM that transcribes from a prompt (Voxtral)."""
        if name is None and not any(m.is_whisper for m in models):
            name = next((m.name for m in models if m.transcribes_by_prompt), None)
        if name is not None and name in by_name and by_name[name].transcribes_by_prompt:
            return by_name[name]
        return pick(name, whisper=True)[0]

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        form = await audio.read_form(request)
        served = pick_transcriber(form.model)
        if served.transcribes_by_prompt:
            return await audio.transcribe_by_prompt(served, form, request)
        return await audio.transcribe(served, form, "transcribe", request)

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        form = await audio.read_form(request)
        served = pick_transcriber(form.model)
        if served.transcribes_by_prompt:
            raise APIError(400, f"model {served.name!r} transcribes but does not translate; use a Whisper model",
                           param="model")
        return await audio.transcribe(served, form, "translate", request)

    if any(m.engine.lora_enabled for m in models):
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest):
            return await lora.load_adapter(models, body)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
            return await lora.unload_adapter(models, body)

    app.add_middleware(BodyLimit, max_upload_bytes=max_upload_bytes,
                       max_json_bytes=max_upload_bytes * 4 // 3 + 2**20, read_timeout_s=body_read_timeout_s)
    app.add_middleware(_Gate, metrics=metrics, api_key=api_key, is_draining=lambda: app.state.draining)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT first marks the app as draining (new requests get 503)
    and then stops accepting connections and waits for in-flight ones up to timeout_graceful_shutdown."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.draining = True
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
                            log_level=log_level, access_log=False)
    DrainingServer(config).run()


class BackgroundServer:
    """The app under uvicorn in a daemon thread, on a free port (tests, benchmarks):
    `with BackgroundServer(app) as url: ...` stops it (and its engines) on exit."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", shutdown_timeout: float = 5.0):
        config = uvicorn.Config(app, host=host, port=0, timeout_graceful_shutdown=shutdown_timeout,
                                log_level="warning", access_log=False)
        self.server = DrainingServer(config)
        self.thread = threading.Thread(target=self.server.run, name="hark-server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
