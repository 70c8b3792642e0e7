"""Reading a peft LoRA adapter directory into the factors hark's linears add, checked against the model.

peft stores, per projection, lora_A [r, in] and lora_B [out, r]; the update is scale · B A x with scale
lora_alpha / r (lora_alpha / √r with use_rslora; alpha_pattern / rank_pattern override per module).
Everything is checked here, before a request with the adapter is scheduled: a bad adapter is a
ValueError that says what is wrong with it.
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from hark.lora.request import LoRARequest
from hark.lora.targets import LoRATargets

WEIGHT_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) weights", "lora_bias": "LoRA biases",
               "modules_to_save": "modules_to_save", "trainable_token_indices": "trainable token embeddings",
               "layer_replication": "layer_replication", "target_parameters": "target_parameters"}


@dataclass
class LoRAAdapter:
    request: LoRARequest
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]   # hark linear -> (A [in, R], scaled B [R, out])
    rank: int                                               # the largest rank of its projections
    cache_key: tuple                # what its KV depends on: id, weights file and its version (prefix cache)

    @property
    def id(self) -> int:
        return self.request.lora_int_id

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the value of the first key that matches the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(path: str, what: str) -> dict:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{what}: no adapter_config.json in {path}.")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: cannot read adapter_config.json ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what}: adapter_config.json must hold a JSON object.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{what}: peft_type is {config.get('peft_type')!r}; hark serves LORA adapters only.")
    for key, name in UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{what}: {name} ({key} in adapter_config.json) is not supported.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{what}: bias={config['bias']!r} is not supported (only 'none').")
    if not isinstance(config.get("r", 8), int) or not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise ValueError(f"{what}: r must be an integer and lora_alpha a number in adapter_config.json.")
    return config


def _weights_file(path: str, what: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ValueError(f"{what}: no adapter_model.safetensors (or adapter_model.bin) in {path}.")


def _read_tensors(file: str, what: str) -> dict[str, torch.Tensor]:
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:          # truncated or foreign file
        raise ValueError(f"{what}: cannot read its weights ({type(e).__name__}: {e}).") from None


def read_adapter(request: LoRARequest, targets: LoRATargets, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> LoRAAdapter:
    """The adapter in request.lora_path as factors for the targets' linears; ValueError if it does not fit."""
    what = f"LoRA adapter {request.lora_name!r}"
    path = request.lora_path
    if not os.path.isdir(path):
        raise ValueError(f"{what}: {path} is not a directory (a peft adapter directory holds adapter_config.json "
                         f"and adapter_model.safetensors).")
    config = _read_config(path, what)
    known = targets.projection_names
    listed = config.get("target_modules")
    if isinstance(listed, list):
        unknown = sorted({m for m in listed if m.rpartition(".")[2] not in known})
        if unknown:
            raise ValueError(f"{what}: unknown target module(s) {', '.join(unknown)}; LoRA can update "
                             f"{', '.join(sorted(known))}.")

    file = _weights_file(path, what)
    stat = os.stat(file)
    cache_key = (request.lora_int_id, os.path.realpath(file), stat.st_mtime_ns, stat.st_size)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in _read_tensors(file, what).items():
        found = WEIGHT_NAME.match(name)
        if found is None:
            raise ValueError(f"{what}: unsupported weight {name!r} (hark reads lora_A / lora_B of linear layers).")
        pairs.setdefault(found["module"], {})[found["factor"]] = tensor
    if not pairs:
        raise ValueError(f"{what}: adapter_model holds no LoRA weights.")

    parts: dict[str, list] = {}          # hark linear -> [(shard, A [r, in], scaled B [size, r])]
    taken: dict[str, list[tuple[int, int]]] = {}     # hark linear -> output row ranges updated so far
    largest = 0
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            raise ValueError(f"{what}: {module} has lora_{'A' if 'A' not in factors else 'B'} missing.")
        hit = targets.find(module)
        if hit is None and targets.outside_lm(module):
            raise ValueError(f"{what}: unknown target module {module!r}: it is outside the language model, and "
                             f"hark's LoRA updates the language model's {', '.join(sorted(known))} only.")
        if hit is None:
            raise ValueError(f"{what}: unknown target module {module!r}; LoRA can update the language model's "
                             f"{', '.join(sorted(known))}.")
        name, shard = hit
        start, end = shard.offset, shard.offset + shard.size
        if any(s < end and start < e for s, e in taken.setdefault(shard.module, [])):
            raise ValueError(f"{what}: more than one update for the rows of {module!r}.")
        taken[shard.module].append((start, end))
        a, b = factors["A"], factors["B"]
        linear = targets.modules[shard.module]
        rank = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != linear.in_features or tuple(b.shape) != (shard.size, rank):
            raise ValueError(f"{what}: shape mismatch for {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                             f"the model needs ({rank if rank > 0 else 'r'}, {linear.in_features}) and "
                             f"({shard.size}, {rank if rank > 0 else 'r'}).")
        configured = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        if rank != configured:
            raise ValueError(f"{what}: shape mismatch for {module}: lora_A has rank {rank}, adapter_config.json "
                             f"says r={configured}.")
        if rank > max_rank:
            raise ValueError(f"{what}: rank {rank} ({module}) is over max_lora_rank={max_rank}; raise max_lora_rank.")
        largest = max(largest, rank)
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        parts.setdefault(shard.module, []).append((shard, a.float(), b.float() * scale))

    adapter_factors = {}
    for module, shards in parts.items():
        linear = targets.modules[module]
        a = torch.cat([sa for _, sa, _ in shards])                    # [R, in]
        b = torch.zeros(linear.out_features, a.shape[0])              # [out, R], block-diagonal over shards
        col = 0
        for shard, sa, sb in shards:
            b[shard.offset: shard.offset + shard.size, col: col + sa.shape[0]] = sb
            col += sa.shape[0]
        adapter_factors[module] = (a.t().contiguous().to(device, dtype), b.t().contiguous().to(device, dtype))
    return LoRAAdapter(request, adapter_factors, largest, cache_key)
