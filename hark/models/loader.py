"""Loads a checkpoint directory (or hub id) into a hark model, tokenizer and prompt processor."""
import contextlib
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from hark.models import registry

# model_type: module with read_config(path, raw_json) for configs AutoConfig cannot read (hub remote code),
# and read_tokenizer(path) where the tokenizer class is remote code too
CONFIG_READERS = {"ultravox": "hark.models.ultravox", "minicpmo": "hark.models.minicpmo",
                  "phi3_v": "hark.models.phi3_vision"}
# model_type: module with read_tokenizer(path) only (the config is transformers' own)
TOKENIZER_READERS = {"voxtral": "hark.models.voxtral"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    hf_config: object
    tokenizer: object
    processor: object | None
    model_path: str
    generation_config: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)


def resolve_model_path(model: str) -> str:
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"model {model!r} is a file; pass the checkpoint directory.")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, no access
        raise ValueError(f"model {model!r} is not a local directory and could not be fetched from the "
                         f"Hugging Face hub ({type(e).__name__}); pass a local checkpoint directory.") from None


def iter_checkpoint_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    index = _read_json(os.path.join(path, "model.safetensors.index.json")).get("weight_map")
    if index:       # only the indexed shards: Mistral repos also hold consolidated.safetensors (other names)
        files = sorted(set(index.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        from safetensors import safe_open
        for f in files:
            with safe_open(os.path.join(path, f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        return
    bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for f in bins:
        yield from torch.load(os.path.join(path, f), map_location="cpu", weights_only=True).items()


def _read_json(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _checkpoint_dtype(hf_config) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


@contextlib.contextmanager
def _no_random_init():
    """Linear, embedding and convolution weights are built uninitialised: the checkpoint overwrites
    every one (the weight loaders refuse a checkpoint that misses any), and drawing them at random
    took 0.3 s of a 1 s clip's start-up with tiny.en."""
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)
    saved = [layer.reset_parameters for layer in layers]
    for layer in layers:
        layer.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for layer, reset in zip(layers, saved):
            layer.reset_parameters = reset


def load_model(config) -> LoadedModel:
    """config: EngineConfig. A CTranslate2 Whisper directory loads without importing transformers."""
    path = resolve_model_path(config.model)
    if os.path.exists(os.path.join(path, "model.bin")):  # CTranslate2 (faster-whisper) directory
        from hark.models.ct2_whisper import is_ct2_whisper_dir, load_ct2_whisper
        if not is_ct2_whisper_dir(path):
            raise ValueError(f"{path} holds a CTranslate2 model.bin that is not a Whisper model.")
        hf_config, weights, tokenizer, generation_config = load_ct2_whisper(path)
    else:
        from transformers import AutoConfig, AutoTokenizer
        raw_config = _read_json(os.path.join(path, "config.json"))
        reader = None
        if raw_config.get("model_type") in CONFIG_READERS:      # remote-code configs hark reads itself
            reader = importlib.import_module(CONFIG_READERS[raw_config["model_type"]])
            hf_config = reader.read_config(path, raw_config)
        else:
            if raw_config.get("model_type") in TOKENIZER_READERS:
                reader = importlib.import_module(TOKENIZER_READERS[raw_config["model_type"]])
            try:
                hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
            except Exception as e:
                raise ValueError(f"cannot read config.json in {path}: {e}") from None
        if config.tokenizer is None and hasattr(reader, "read_tokenizer"):
            tokenizer = reader.read_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or path,
                                                      trust_remote_code=config.trust_remote_code)
        weights = iter_checkpoint_weights(path)
        generation_config = _read_json(os.path.join(path, "generation_config.json"))
    if config.generation_config not in ("auto", "vllm"):    # vLLM's --generation-config FOLDER
        override = os.path.join(config.generation_config, "generation_config.json")
        if not os.path.isfile(override):
            raise ValueError(f"generation_config: {override} does not exist; pass 'auto' or a folder holding "
                             f"generation_config.json.")
        generation_config = {**generation_config, **_read_json(override)}
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError(f"config.json in {path} names no architectures; hark supports "
                         f"{', '.join(registry.supported_architectures())}.")
    model_cls, processor_cls = registry.resolve(archs[0])
    device = config.torch_device()
    dtype = config.torch_dtype(_checkpoint_dtype(hf_config))
    with torch.device(device), _no_random_init():
        model = model_cls(hf_config, dtype)
    model.load_weights(weights)
    model.to(dtype).eval()
    processor = processor_cls(hf_config, tokenizer, path) if processor_cls else None
    eos = generation_config.get("eos_token_id", getattr(hf_config, "eos_token_id", None))
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return LoadedModel(model, hf_config, tokenizer, processor, path, generation_config, eos_ids)
