"""Engine configuration."""
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"                  # auto: float32 on CPU, the checkpoint's dtype on GPU
    device: str = "auto"
    max_model_len: int | None = None     # default: the model's maximum positions
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_bytes: int = 4 * 2**30
    num_kv_blocks: int | None = None     # overrides the memory budget (tests use tiny values)
    enable_prefix_caching: bool = True
    seed: int | None = 0                 # None: a different random stream each run
    limit_mm_per_prompt: dict | None = None
    max_audio_duration_s: float = 600.0
    encoder_cache_bytes: int = 512 * 2**20
    enable_mm_embeds: bool = False
    trust_remote_code: bool = False
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple = ()
    generation_config: str = "auto"      # or a folder whose generation_config.json replaces the model's
    enable_lora: bool = False            # serve peft LoRA adapters per request (generate(lora_request=...))
    max_loras: int = 1                   # adapters one batch may mix
    max_lora_rank: int = 16              # adapters of a higher rank are refused
    max_cpu_loras: int | None = None     # adapters kept loaded (default: max_loras)
    tensor_parallel_size: int = 1        # ranks (processes) the model is split over
    distributed_executor_backend: str | None = None     # "mp" (the default: local processes)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be ≥ 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be ≥ 1, got {self.max_num_batched_tokens}.")
        if self.block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {self.block_size}.")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be ≥ 1, got {self.max_loras} and {self.max_lora_rank}.")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be ≥ max_loras ({self.max_loras}).")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer ≥ 1, got {self.tensor_parallel_size!r}.")
        if self.distributed_executor_backend not in (None, "mp"):
            raise ValueError(f"distributed_executor_backend must be 'mp', got {self.distributed_executor_backend!r}.")
        if self.tensor_parallel_size > 1 and self.enable_lora:
            raise ValueError("LoRA adapters are not supported with tensor_parallel_size > 1.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}.")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if self.dtype == "auto":
            if self.torch_device().type == "cpu" or checkpoint_dtype is None:
                return torch.float32
            return checkpoint_dtype
        return DTYPES[self.dtype]
