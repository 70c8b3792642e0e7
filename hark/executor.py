"""The engine's handle on the model: builds it and its runner, and runs step records on them.

The engine talks to an executor only through plain data (hark.step): `execute(SchedulerOutput) ->
ModelRunnerOutput`, `encode(items)` (encoder outputs, cached) and `decode_dense` (Whisper's decoder over
whole token rows, for transcription's probes and word timing). This one runs everything in the engine's
process; with tensor_parallel_size > 1 the model is rank 0's shard (hark.distributed.tensor_parallel):
its forward, logits, token embeddings and dense decoder run on every rank, and rank 0 samples.
"""
import torch

from hark.config import EngineConfig
from hark.distributed.tensor_parallel import WorkerGroup, copy_blocks_on_every_rank
from hark.inputs import MultiModalItem
from hark.lora.manager import LoRAManager
from hark.models.loader import load_model
from hark.runner.model_runner import ModelRunner
from hark.step import ModelRunnerOutput, SchedulerOutput


class Executor:
    def __init__(self, config: EngineConfig):
        self.config = config
        # the worker ranks first: the model's layers take their slices by rank
        self.group = WorkerGroup.start(config) if config.tensor_parallel_size > 1 else None
        self.loaded = load_model(config)            # model, tokenizer, processor, configs
        self.model = self.loaded.model if self.group is None else self.group.attach(self.loaded.model)
        self.is_encoder_decoder = bool(getattr(self.model, "is_encoder_decoder", False))
        self.cross_attends_items = hasattr(self.model, "encoder_state")    # mllama: every token sees the images
        self.max_positions = getattr(self.model, "max_positions", None)
        self.dtype = next(self.model.parameters()).dtype
        self.runner: ModelRunner | None = None      # once the engine has sized the KV cache

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of K and V of one KV block in every layer."""
        return ModelRunner.block_bytes(self.model, block_size, self.dtype)

    def init_kv_cache(self, num_blocks: int, block_size: int, eos_token_ids: list[int]) -> None:
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.dtype, self.config.torch_device(),
                                  self.config.encoder_cache_bytes, eos_token_ids)
        if self.group is not None:          # beam forks copy KV blocks on every rank
            self.runner.copy_blocks = copy_blocks_on_every_rank(self.runner.copy_blocks, self.model)

    def lora_manager(self, max_lora_rank: int, max_cpu_loras: int) -> LoRAManager:
        return LoRAManager(self.model, max_lora_rank, max_cpu_loras)

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(step)

    def encode(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        return self.runner.encode(items)

    def decode_dense(self, encoder_states: torch.Tensor, tokens: torch.Tensor, return_cross_attn: bool = False):
        return self.model.decode_dense(encoder_states, tokens.to(encoder_states.device), return_cross_attn)

    def shutdown(self) -> None:
        """Stops the tensor-parallel worker ranks (nothing to do on one rank)."""
        if self.group is not None:
            self.group.shutdown()

    def stats(self) -> dict:
        runner = self.runner
        return {"encoder_cache_hits": runner.encoder_cache.hits, "encoder_calls": runner.encoder_calls,
                "encoder_items": runner.encoder_items}
