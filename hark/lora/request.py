"""LoRARequest: which adapter a request runs with, as vLLM names it (vllm.lora.request.LoRARequest)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str               # what the user calls it (the server's model=name)
    lora_int_id: int             # unique id ≥ 1; the engine keys loaded adapters by it
    lora_path: str = ""          # a peft adapter directory (adapter_config.json, adapter_model.safetensors)
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest: lora_name must be a non-empty string, got {self.lora_name!r}.")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest: lora_int_id must be an integer ≥ 1, got {self.lora_int_id!r}.")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path must name the adapter's directory.")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
