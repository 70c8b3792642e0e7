"""Which linears of a model a LoRA adapter may update, under the names a peft checkpoint gives them.

Adapters update the language model's projections (attention and MLP; not lm_head or embeddings). An
adapter names them as transformers does (layers.0.self_attn.q_proj); where hark fuses projections into
one linear (qkv_proj, gate_up_proj: the LM's packed_modules) each name is a row range of that linear,
and the fused name is all of it (checkpoints that fuse them too: Phi-3, Phi-4-multimodal).

A model takes adapters when its LM is `model.language_model` (or the model itself), its projections
are hark.models.layers.Linear, and a linear that stacks several checkpoint projections is named in
the LM's `packed_modules` ({"qkv_proj": ("q_proj", "k_proj", "v_proj")}) with `shard_sizes(name)`
giving their output rows, as LlamaForCausalLM does.
"""
from dataclasses import dataclass

from torch import nn

from hark.models.layers import Linear

# names that may stand between peft's "base_model.model." and the LM's layers: the LM's prefix in a
# plain or audio LM's checkpoint (model., model.language_model., language_model.model., llm.model., ...)
LM_PREFIX_PARTS = {"model", "language_model", "llm", "thinker"}


@dataclass
class Shard:
    module: str          # the hark linear (layers.0.self_attn.qkv_proj)
    offset: int          # its first output row that this projection owns
    size: int


@dataclass
class LoRATargets:
    modules: dict[str, Linear]           # hark linear name under the LM -> the linear
    shards: dict[str, Shard]             # checkpoint projection name (layers.0.self_attn.q_proj) -> rows

    @classmethod
    def of(cls, model: nn.Module) -> "LoRATargets":
        lm = getattr(model, "language_model", model)
        packed = getattr(lm, "packed_modules", {})
        modules, shards = {}, {}
        for name, module in lm.named_modules():
            parent, _, leaf = name.rpartition(".")
            if not isinstance(module, Linear) or leaf == "lm_head":
                continue
            modules[name] = module
            shards[name] = Shard(name, 0, module.out_features)
            if leaf not in packed:
                continue
            offset = 0
            for part, size in zip(packed[leaf], lm.shard_sizes(leaf)):
                shards[f"{parent}.{part}" if parent else part] = Shard(name, offset, size)
                offset += size
        return cls(modules, shards)

    @property
    def projection_names(self) -> set[str]:
        """The projections' own names (q_proj, down_proj, ...), as adapter_config's target_modules lists them."""
        return {name.rpartition(".")[2] for name in self.shards}

    def find(self, path: str) -> tuple[str, Shard] | None:
        """The projection a peft module path (model.layers.0.self_attn.q_proj) names, or None."""
        parts = path.split(".")
        for i in range(len(parts)):
            name = ".".join(parts[i:])
            if name in self.shards and all(p in LM_PREFIX_PARTS for p in parts[:i]):
                return name, self.shards[name]
        return None

    def outside_lm(self, path: str) -> bool:
        """Whether the path ends like one of the LM's projections but lies elsewhere (an audio encoder's)."""
        parts = path.split(".")
        return any(".".join(parts[i:]) in self.shards for i in range(1, len(parts)))
