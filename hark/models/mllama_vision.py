"""Llama 3.2 Vision's image encoder (transformers' MllamaVisionModel): tiles through a local and a global ViT.

Each image comes as max_num_tiles tiles of S x S pixels (the image processor resizes it onto a canvas of
rows x cols tiles and pads the tile count with zero tiles) and its aspect-ratio id (the canvas' index
in the (rows, cols) enumeration of `aspect_ratios`, plus one). Per image:

  patches (a stride-p convolution, no bias) -> + gated aspect-ratio embedding -> a class token in
  front of each tile's patches -> + gated position and tile-position embeddings -> layernorm_pre ->
  pad each tile to a multiple of 8 tokens -> the local transformer over all tiles' tokens at once,
  keeping the outputs of `intermediate_layers_indices` -> layernorm_post -> + gated aspect-ratio
  embedding -> the global transformer (tanh-gated residuals) -> padding removed -> the final states
  beside the intermediate ones, interleaved as transformers stacks them: [tiles, patches + 1, D * (1 + k)].

Attention masks only pairs of padding tokens (padding tiles, and the pad to 8): a real token sees
every token of the image, padding included, and a padding token sees the real ones, as transformers'
_prepare_aspect_ratio_attention_mask builds it; so padding tiles change the real tokens' states and
every image runs with max_num_tiles tiles.
"""
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.models.layers import Linear, by_row_blocks
from hark.models.weights import WeightLoader


def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) canvases of at most max_tiles tiles, in the order aspect-ratio ids count them (from 1)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv_proj = Linear(dim, 3 * dim, bias=False)
        self.o_proj = Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class VisionLayer(nn.Module):
    def __init__(self, config, gated: bool):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"mllama vision activation {config.hidden_act!r} is not supported (gelu).")
        d = config.hidden_size
        self.self_attn = VisionAttention(d, config.attention_heads)
        self.fc1 = Linear(d, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, d)
        self.input_layernorm = nn.LayerNorm(d, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=config.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = by_row_blocks(self.mlp, self.post_attention_layernorm(x).flatten(0, 1), self.fc1.out_features).view_as(x)
        return x + (self.gate_ffn.tanh() * h if self.gated else h)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class AspectRatioEmbedding(nn.Module):
    """One gated [D] vector per tile, chosen by the image's aspect-ratio id."""

    def __init__(self, num_ids: int, max_tiles: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_ids, max_tiles * dim)
        self.gate = nn.Parameter(torch.zeros(1))
        self.max_tiles = max_tiles

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, tiles, tokens, D]."""
        return x + self.gate.tanh() * self.embedding(ids).view(len(ids), self.max_tiles, 1, -1)


class GatedPositionEmbedding(nn.Module):
    """(1 - tanh g) x a position embedding per token + tanh g x a tile-position embedding per aspect ratio."""

    def __init__(self, num_ids: int, max_tiles: int, tokens: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(tokens, dim))
        self.gate = nn.Parameter(torch.zeros(1))
        self.tile_embedding = nn.Embedding(num_ids, max_tiles * tokens * dim)
        self.shape = (max_tiles, tokens, dim)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        return x + gate * self.tile_embedding(ids).view(len(ids), *self.shape)


class MllamaVisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.image_size, self.patch_size, self.max_tiles = config.image_size, config.patch_size, config.max_num_tiles
        self.tokens = (config.image_size // config.patch_size) ** 2 + 1          # per tile, class token included
        self.padded = -(-self.tokens // 8) * 8
        self.intermediate = list(config.intermediate_layers_indices)
        self.ratio_ids = {r: i + 1 for i, r in enumerate(aspect_ratios(self.max_tiles))}
        num_ids = len(config.supported_aspect_ratios) + 1
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.gated_positional_embedding = GatedPositionEmbedding(num_ids, self.max_tiles, self.tokens, d)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(num_ids, self.max_tiles, d)
        self.post_tile_positional_embedding = AspectRatioEmbedding(num_ids, self.max_tiles, d)
        self.layernorm_pre = nn.LayerNorm(d)
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = nn.ModuleList(VisionLayer(config, False) for _ in range(config.num_hidden_layers))
        self.global_transformer = nn.ModuleList(VisionLayer(config, True) for _ in range(config.num_global_layers))
        self.output_dim = d * (1 + len(self.intermediate))

    def forward(self, pixels: torch.Tensor, canvases: list[tuple[int, int]]) -> torch.Tensor:
        """pixels [B, max_tiles, 3, S, S], each image's (rows, cols) canvas -> [B, max_tiles, tokens, output_dim]."""
        b, t = pixels.shape[:2]
        if t != self.max_tiles or pixels.shape[-1] != self.image_size:
            raise ValueError(f"the vision tower takes {self.max_tiles} tiles of {self.image_size} pixels, got "
                             f"{t} of {pixels.shape[-1]}")
        ids = torch.tensor([self.ratio_ids[c] for c in canvases], device=pixels.device)
        x = self.patch_embedding(pixels.flatten(0, 1).to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(x.unflatten(0, (b, t)), ids)
        x = torch.cat((self.class_embedding.expand(b, t, 1, -1), x), dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ids))
        x = F.pad(x, (0, 0, 0, self.padded - self.tokens))                       # [B, T, L, D]
        real_tiles = torch.arange(t) < torch.tensor([r * c for r, c in canvases])[:, None]
        real = (real_tiles[:, :, None] & (torch.arange(self.padded) < self.tokens)).flatten(1).to(x.device)
        mask = (real[:, :, None] | real[:, None, :]).unsqueeze(1)                  # [B, 1, T*L, T*L]
        x = x.flatten(1, 2)
        outputs = []
        for layer in self.transformer:
            x = layer(x, mask)
            outputs.append(x)
        kept = torch.stack([outputs[i] for i in self.intermediate], dim=-1).flatten(-2)   # [B, T*L, D * k]
        x = self.post_tile_positional_embedding(self.layernorm_post(x).unflatten(1, (t, self.padded)), ids)
        x = x.flatten(1, 2)
        for layer in self.global_transformer:
            x = layer(x, mask)
        x = torch.cat((x, kept), dim=-1).unflatten(1, (t, self.padded))
        return x[:, :, :self.tokens]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """transformers' MllamaVisionModel names (without vision_model.); Q, K and V are fused here."""
        loader = WeightLoader(self, "vision tower weight")
        d = self.class_embedding.shape[0]
        for name, tensor in weights:
            target = name.replace(".layers.", ".").replace(".mlp.", ".")
            parts = target.split(".")
            if len(parts) == 5 and parts[3] in ("q_proj", "k_proj", "v_proj"):
                shard = ("q_proj", "k_proj", "v_proj").index(parts[3])
                loader.copy(".".join(parts[:3] + ["qkv_proj", parts[4]]), tensor, name, slice(shard * d, (shard + 1) * d))
            else:
                loader.copy(target, tensor, name)
        loader.check_complete()
