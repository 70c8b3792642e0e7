"""Llama-family decoder LM (Llama, and Qwen2 with its QKV bias) on the paged engine."""
from typing import Iterable

import torch
from torch import nn

from hark.models.layers import Linear, RMSNorm, RotaryEmbedding, SiluGatedMLP
from hark.models.weights import WeightLoader
from hark.runner.attention import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size,
                                bias=getattr(config, "attention_bias", False) and not qkv_bias)
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, x, positions, rope: RotaryEmbedding, meta: AttentionMetadata, rows=None):
        """Writes K/V of every row; returns the output of `rows` only (all when None)."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k)
        o = meta.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        if rows is not None:
            o = o[rows]
        return self.o_proj(o.flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        self.self_attn = Attention(config, qkv_bias)
        self.mlp = SiluGatedMLP(config.hidden_size, config.intermediate_size,
                                bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, rope, meta, rows=None):
        attn = self.self_attn(self.input_layernorm(x), positions, rope, meta, rows)
        x = (x if rows is None else x[rows]) + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    is_encoder_decoder = False
    # fused projection -> the checkpoint's projections it stacks, in row order (weights and LoRA adapters)
    packed_modules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.qkv_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config, config.max_position_embeddings)
        attn = self.layers[0].self_attn
        self.num_kv_layers, self.num_kv_heads, self.head_dim = len(self.layers), attn.num_kv_heads, attn.head_dim

    def kv_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, meta, inputs_embeds=None) -> torch.Tensor:
        """Hidden states of `meta.output_rows` (all rows when None). The last layer runs its
        attention output, MLP and the norm on those rows only: the other rows of a prefill chunk
        only leave K/V behind, which that layer writes before the rows are dropped."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers[:-1]:
            x = layer(x, positions, self.rope, meta)
        return self.norm(self.layers[-1](x, positions, self.rope, meta, meta.output_rows))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], prefix: str = "model.") -> None:
        """Loads HF names (model.layers.N.self_attn.q_proj.weight, lm_head.weight, ...)."""
        loader = WeightLoader(self)
        fused = {part: (name, i) for name, parts in self.packed_modules.items() for i, part in enumerate(parts)}
        for name, tensor in weights:
            if name == "lm_head.weight":
                if self.tie_word_embeddings:
                    continue
                target = name
            elif name.startswith(prefix):
                target = name[len(prefix):]
            else:
                continue
            if "rotary_emb" in target:
                continue
            parts = target.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                fused_name, shard = fused[parts[-2]]
                target = ".".join(parts[:-2] + [fused_name, parts[-1]])
                sizes = self.shard_sizes(fused_name)
                offset = sum(sizes[:shard])
                loader.copy(target, tensor, name, slice(offset, offset + sizes[shard]))
                continue
            loader.copy(target, tensor, name)
        loader.check_complete()

    def shard_sizes(self, fused_name: str) -> list[int]:
        """Output rows of each projection that packed_modules[fused_name] stacks."""
        if fused_name == "qkv_proj":
            a = self.layers[0].self_attn
            return [a.q_size, a.kv_size, a.kv_size]
        inter = self.config.intermediate_size
        return [inter, inter]


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
