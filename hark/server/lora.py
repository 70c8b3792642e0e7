"""LoRA adapters over the API, as vLLM serves them: `model=<adapter name>` runs the request with the
adapter, /v1/models lists adapters with their parent model, /v1/load_lora_adapter and
/v1/unload_lora_adapter load and unload them at run time (behind the API key, as all of /v1)."""
import json
import logging
from dataclasses import dataclass

from fastapi.responses import PlainTextResponse

from hark.lora.request import LoRARequest
from hark.server.errors import APIError
from hark.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from hark.server.state import ServedModel

logger = logging.getLogger("hark.server")


@dataclass
class LoRAModule:
    """One --lora-modules entry: name=path, or JSON {"name", "path", "base_model_name"}."""
    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, value: str) -> "LoRAModule":
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
                return cls(str(spec["name"]), str(spec["path"]), spec.get("base_model_name"))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: {value!r} is not JSON of the form "
                                 f"{{\"name\": ..., \"path\": ..., \"base_model_name\": ...}}") from None
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path (or JSON), got {value!r}")
        return cls(name, path)


def lora_model(models: list[ServedModel]) -> ServedModel:
    """The served model that takes adapters (the one started with --enable-lora)."""
    for m in models:
        if m.engine.lora_enabled:
            return m
    raise APIError(400, "LoRA is not enabled on this server; start it with --enable-lora")


def find_adapter(models: list[ServedModel], name: str) -> tuple[ServedModel, LoRARequest] | None:
    for m in models:
        if name in m.loras:
            return m, m.loras[name]
    return None


def model_cards(models: list[ServedModel], created: int) -> list[dict]:
    cards = []
    for m in models:
        for name in (m.name, *m.aliases):
            cards.append({"id": name, "object": "model", "created": created, "owned_by": "hark",
                          "root": m.engine.model_path, "parent": None,
                          "max_model_len": m.engine.max_model_len})
    for m in models:
        for lora in m.loras.values():
            cards.append({"id": lora.lora_name, "object": "model", "created": created, "owned_by": "hark",
                          "root": lora.lora_path, "parent": lora.base_model_name or m.name,
                          "max_model_len": m.engine.max_model_len})
    return cards


def _taken(models: list[ServedModel], name: str) -> bool:
    return find_adapter(models, name) is not None or any(name in (m.name, *m.aliases) for m in models)


async def load_adapter(models: list[ServedModel], body: LoadLoRAAdapterRequest) -> PlainTextResponse:
    if not body.lora_name or not body.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    served = lora_model(models)
    if _taken(models, body.lora_name):
        raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
    lora = LoRARequest(body.lora_name, served.next_lora_id(), body.lora_path)
    await served.engine.add_lora(lora)            # ValueError (400) if the adapter does not fit
    if _taken(models, body.lora_name):            # loaded twice at once: the other one won
        await served.engine.remove_lora(lora.lora_int_id)
        raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
    served.loras[lora.lora_name] = lora
    logger.info("loaded LoRA adapter %r from %s", lora.lora_name, lora.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")


async def unload_adapter(models: list[ServedModel], body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    if not body.lora_name and body.lora_int_id is None:
        raise APIError(400, "either 'lora_name' or 'lora_int_id' needs to be provided.")
    served = lora_model(models)
    lora = next((lr for lr in served.loras.values() if (body.lora_name is None or lr.lora_name == body.lora_name)
                 and (body.lora_int_id is None or lr.lora_int_id == body.lora_int_id)), None)
    if lora is None:
        raise APIError(404, f"The lora adapter '{body.lora_name or body.lora_int_id}' cannot be found.",
                       param="lora_name", code="model_not_found")
    del served.loras[lora.lora_name]
    await served.engine.remove_lora(lora.lora_int_id)     # requests running with it finish with it
    logger.info("unloaded LoRA adapter %r", lora.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")
