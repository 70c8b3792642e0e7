"""Multi-LoRA serving: peft adapters applied per request, many adapters (and none) in one batch."""
from hark.lora.request import LoRARequest

__all__ = ["LoRARequest"]
