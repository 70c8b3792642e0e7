"""The engine's loaded LoRA adapters: vLLM's add_lora / remove_lora / list_loras / pin_lora.

Up to max_cpu_loras adapters stay loaded (their factors attached to the model's linears); past that the
least recently used one that no live request holds is unloaded, and loaded again from its path when a
request names it. A request holds its adapter from add_request to its end, so removing an adapter in use
takes effect when its last request finishes. (vLLM's max_loras, the adapters one batch may mix, is the
scheduler's to keep.)
"""
import logging
from collections import OrderedDict

import torch

from hark.lora.adapter import LoRAAdapter, read_adapter
from hark.lora.layer import LinearLoRA
from hark.lora.request import LoRARequest
from hark.lora.targets import LoRATargets

logger = logging.getLogger("hark")


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_lora_rank: int, max_cpu_loras: int):
        if getattr(model, "is_encoder_decoder", False):
            raise ValueError("enable_lora: LoRA adapters are served for decoder language models, not Whisper.")
        self.targets = LoRATargets.of(model)
        if not self.targets.modules:
            raise ValueError(f"enable_lora: {type(model).__name__} has no linear layers LoRA can update.")
        self.max_lora_rank = max_lora_rank
        self.capacity = max_cpu_loras
        weight = next(iter(self.targets.modules.values())).weight
        self.dtype, self.device = weight.dtype, weight.device
        for linear in self.targets.modules.values():
            linear.lora = LinearLoRA()
        self.loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()   # least recently used first
        self.pinned: set[int] = set()
        self.users: dict[int, int] = {}          # adapter id -> live requests holding it
        self.removed: set[int] = set()           # removed while in use: unloaded once free

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Reads and checks the adapter; changes nothing, so it may run off the engine's thread."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a hark.lora.LoRARequest, got {type(request).__name__}.")
        return read_adapter(request, self.targets, self.max_lora_rank, self.dtype, self.device)

    # --- vLLM's API -----------------------------------------------------------------------------
    def add_lora(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Loads the adapter (ValueError if it does not fit the model); True once it is loaded.
        `adapter`: the request's adapter as read() returned it (read ahead, off the engine thread)."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a hark.lora.LoRARequest, got {type(request).__name__}.")
        loaded = self.loaded.get(request.lora_int_id)
        if loaded is not None:
            if loaded.request.lora_path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is adapter {loaded.request.lora_name!r} "
                                 f"({loaded.request.lora_path}); give {request.lora_name!r} another id.")
            self.removed.discard(request.lora_int_id)     # removed while in use, and asked for again
            self.loaded.move_to_end(request.lora_int_id)
            return True
        if adapter is None or adapter.request != request:
            adapter = self.read(request)
        self._attach(adapter)
        self._evict(keep=adapter.id)
        logger.info("LoRA adapter %r (id %d) loaded: rank %d, %d linears, %.1f MiB", request.lora_name,
                    adapter.id, adapter.rank, len(adapter.factors), adapter.num_bytes / 2**20)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        if lora_id not in self.loaded or lora_id in self.removed:
            return False
        self.pinned.discard(lora_id)
        if self.users.get(lora_id):
            self.removed.add(lora_id)
        else:
            self._detach(lora_id)
        return True

    def pin_lora(self, lora_id: int) -> bool:
        if lora_id not in self.loaded or lora_id in self.removed:
            return False
        self.pinned.add(lora_id)
        return True

    def list_loras(self) -> set[int]:
        return set(self.loaded) - self.removed

    # --- requests -------------------------------------------------------------------------------
    def acquire(self, request: LoRARequest) -> tuple:
        """Loads the request's adapter if needed and holds it for the request; returns its prefix-cache key."""
        self.add_lora(request)
        self.users[request.lora_int_id] = self.users.get(request.lora_int_id, 0) + 1
        return self.loaded[request.lora_int_id].cache_key

    def release(self, lora_id: int) -> None:
        self.users[lora_id] -= 1
        if self.users[lora_id] == 0:
            del self.users[lora_id]
            if lora_id in self.removed:
                self._detach(lora_id)
            self._evict()

    # --- attaching factors to the linears ---------------------------------------------------------
    def _attach(self, adapter: LoRAAdapter) -> None:
        for name, factors in adapter.factors.items():
            self.targets.modules[name].lora.weights[adapter.id] = factors
        self.loaded[adapter.id] = adapter

    def _detach(self, lora_id: int) -> None:
        adapter = self.loaded.pop(lora_id)
        for name in adapter.factors:
            del self.targets.modules[name].lora.weights[lora_id]
        self.removed.discard(lora_id)
        self.pinned.discard(lora_id)

    def _evict(self, keep: int | None = None) -> None:
        """Unloads least recently used adapters no request holds (nor `keep`, just loaded) while more than
        the capacity are loaded."""
        for lora_id in list(self.loaded):
            if len(self.loaded) <= self.capacity:
                return
            if lora_id != keep and lora_id not in self.pinned and not self.users.get(lora_id):
                self._detach(lora_id)
