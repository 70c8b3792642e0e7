"""Qwen2-VL's vision tower: native-resolution ViT with 2-D rotary positions and a 2 x 2 patch merger.

The image processor cuts an image into 14 x 14 patches (2 frames deep: an image is its frame twice),
ordered so each 2 x 2 block of neighbours is consecutive: pixel_values [N, 3 * 2 * 14 * 14] for a grid
(t, h, w) of N = t * h * w patches. Here: patch embedding (a Conv3d whose kernel is the patch, i.e.
a linear map), blocks of pre-LayerNorm attention and MLP, the attention rotary over (row, column)
of each patch (half the frequencies turn by the row, half by the column), each frame of each image
attending only to itself; then the merger (LayerNorm, 4 neighbours concatenated, MLP) gives
N / 4 embeddings of the LM's width. Checkpoint names: transformers' Qwen2-VL `visual.*` names.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.models.clip_vision import ACTIVATIONS
from hark.models.layers import Linear, by_row_blocks, rotate_half
from hark.models.weights import WeightLoader


def patch_positions(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """[t * h * w, 2] (row, column) of each patch, in the processor's merge-block order."""
    t, h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows, cols = rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()
    return torch.stack((rows, cols), dim=-1).repeat(t, 1)


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.embed_dim
        self.num_heads, self.head_dim = config.num_heads, dim // config.num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = Linear(dim, int(dim * config.mlp_ratio))
        self.fc2 = Linear(int(dim * config.mlp_ratio), dim)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[int]) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), cos, sin, frames)
        return x + by_row_blocks(self.mlp, self.norm2(x), self.fc1.out_features)

    def attention(self, x, cos, sin, frames: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)     # [N, H, Dh]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = torch.empty_like(q)
        start = 0
        for n in frames:                           # each frame of each image attends within itself
            span = slice(start, start + n)
            out[span] = F.scaled_dot_product_attention(
                q[span].transpose(0, 1)[None], k[span].transpose(0, 1)[None], v[span].transpose(0, 1)[None]
            )[0].transpose(0, 1)
            start += n
        return self.proj(out.flatten(1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VLVisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Qwen2-VL vision activation {config.hidden_act!r} is not supported.")
        self.merge = config.spatial_merge_size
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_embed = Linear(patch_dim, config.embed_dim, bias=False)
        head_dim = config.embed_dim // config.num_heads
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        spatial = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        merged = config.embed_dim * self.merge ** 2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.merger_fc1 = Linear(merged, merged)
        self.merger_fc2 = Linear(merged, config.hidden_size)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Per image (or video): pixel_values [t * h * w, patch_dim] of grid (t, h, w) -> [t * h * w / 4, hidden]."""
        x = self.patch_embed(torch.cat(pixels).to(self.patch_embed.weight.dtype))
        angles = torch.cat([patch_positions(g, self.merge) for g in grids])[..., None].float() * self.inv_freq
        angles = angles.flatten(1).repeat(1, 2)[:, None]            # [N, 1, Dh]: (rows, cols) twice
        cos, sin = angles.cos(), angles.sin()
        frames = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        x = self.ln_q(x).view(-1, self.merger_fc1.in_features)
        x = self.merger_fc2(F.gelu(self.merger_fc1(x)))
        return list(x.split([t * h * w // self.merge ** 2 for t, h, w in grids]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """transformers' names under visual.: patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
        mlp.fc2}, merger.{ln_q, mlp.0, mlp.2}."""
        loader = WeightLoader(self, "vision tower weight")
        renames = {"patch_embed.proj.weight": "patch_embed.weight", "merger.ln_q.weight": "ln_q.weight",
                   "merger.ln_q.bias": "ln_q.bias", "merger.mlp.0.weight": "merger_fc1.weight",
                   "merger.mlp.0.bias": "merger_fc1.bias", "merger.mlp.2.weight": "merger_fc2.weight",
                   "merger.mlp.2.bias": "merger_fc2.bias"}
        for name, tensor in weights:
            target = renames.get(name, name.replace(".attn.", ".").replace(".mlp.", "."))
            if target == "patch_embed.weight":
                tensor = tensor.flatten(1)
            loader.copy(target, tensor, name)
        loader.check_complete()
