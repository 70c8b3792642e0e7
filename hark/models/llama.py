"""Llama-family decoder LM (Llama, and Qwen2 with its QKV bias) on the paged engine."""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.models.layers import RMSNorm, RotaryEmbedding, by_row_blocks
from hark.models.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                  VocabParallelEmbedding, tie)
from hark.models.weights import GATE_UP, QKV, WeightLoader
from hark.runner.attention import AttentionMetadata


class SiluGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (this rank's columns)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_row_blocks(self.rows_forward, x, self.gate_up_proj.out_features)

    def rows_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """This rank's query heads and their K/V heads (all of them in a world of one)."""

    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = config.num_key_value_heads or num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size,
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
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.qkv_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            tie(self.lm_head, self.embed_tokens)
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary (None on tensor-parallel ranks other than 0)."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], prefix: str = "model.") -> None:
        """Loads HF names (model.layers.N.self_attn.q_proj.weight, lm_head.weight, ...)."""
        loader = WeightLoader(self)
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
            loader.load(target, tensor, name, QKV + GATE_UP)
        loader.check_complete()

    def shard_sizes(self, fused_name: str) -> list[int]:
        """Output rows of each projection that packed_modules[fused_name] stacks (on this rank)."""
        layer = self.layers[0]
        return (layer.self_attn.qkv_proj if fused_name == "qkv_proj" else layer.mlp.gate_up_proj).local_sizes


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
