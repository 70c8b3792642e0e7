"""Qwen2-VL's and Qwen2.5-VL's vision tower: native-resolution ViT with 2-D rotary positions and a 2 x 2
patch merger.

The image processor cuts an image into 14 x 14 patches (2 frames deep: an image is its frame twice),
ordered so each 2 x 2 block of neighbours is consecutive: pixel_values [N, 3 * 2 * 14 * 14] for a grid
(t, h, w) of N = t * h * w patches. Here: patch embedding (a Conv3d whose kernel is the patch, i.e.
a linear map), blocks of pre-LayerNorm attention and MLP, the attention rotary over (row, column)
of each patch (half the frequencies turn by the row, half by the column), each frame of each image
attending only to itself; then the merger (LayerNorm, 4 neighbours concatenated, MLP) gives
N / 4 embeddings of the LM's width.

Qwen2.5-VL (its config has fullatt_block_indexes): RMSNorms, a SwiGLU MLP with biases, and windowed
attention: the merge units (2 x 2 patches) are regrouped so that each window of window_size pixels
(112: 4 x 4 units) is contiguous, every block but those of fullatt_block_indexes attends within its
window only, and the merger's outputs are put back in the processor's order.
Checkpoint names: transformers' `visual.*` names.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.models.clip_vision import ACTIVATIONS
from hark.models.layers import Linear, RMSNorm, by_row_blocks, rotate_half
from hark.models.weights import WeightLoader


def patch_positions(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """[t * h * w, 2] (row, column) of each patch, in the processor's merge-block order."""
    t, h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows, cols = rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()
    return torch.stack((rows, cols), dim=-1).repeat(t, 1)


def window_order(grid: tuple[int, int, int], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL: the image's merge units in window order (window by window, row-major inside each;
    a frame's windows before the next frame's), and each window's length in patches."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    units = torch.arange(t * h * w).reshape(t, h, w)
    order, lengths = [], []
    for f in range(t):
        for top in range(0, h, window):
            for left in range(0, w, window):
                block = units[f, top:top + window, left:left + window].flatten()
                order.append(block)
                lengths.append(block.numel() * merge * merge)
    return torch.cat(order), lengths


def is_qwen2_5(config) -> bool:
    return hasattr(config, "fullatt_block_indexes")


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size if is_qwen2_5(config) else config.embed_dim
        self.num_heads, self.head_dim = config.num_heads, dim // config.num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.act = ACTIVATIONS.get(config.hidden_act) or getattr(F, config.hidden_act)
        if is_qwen2_5(config):
            self.norm1, self.norm2 = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
            self.gate_proj = Linear(dim, config.intermediate_size)
            self.up_proj = Linear(dim, config.intermediate_size)
            self.down_proj = Linear(config.intermediate_size, dim)
            self.mlp, self.mlp_width = self.gated_mlp, config.intermediate_size
        else:
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.fc1 = Linear(dim, int(dim * config.mlp_ratio))
            self.fc2 = Linear(int(dim * config.mlp_ratio), dim)
            self.mlp, self.mlp_width = self.plain_mlp, self.fc1.out_features

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[int]) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), cos, sin, frames)
        return x + by_row_blocks(self.mlp, self.norm2(x), self.mlp_width)

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

    def plain_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def gated_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2VLVisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS and not hasattr(F, config.hidden_act):
            raise ValueError(f"Qwen2-VL vision activation {config.hidden_act!r} is not supported.")
        self.merge = config.spatial_merge_size
        if is_qwen2_5(config):
            dim, out_dim = config.hidden_size, config.out_hidden_size
            self.window = config.window_size // config.spatial_merge_size // config.patch_size
            self.full_attention = set(config.fullatt_block_indexes)
        else:
            dim, out_dim = config.embed_dim, config.hidden_size
            self.window, self.full_attention = None, set(range(config.depth))
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_embed = Linear(patch_dim, dim, bias=False)
        head_dim = dim // config.num_heads
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        spatial = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        merged = dim * self.merge ** 2
        self.ln_q = RMSNorm(dim, 1e-6) if is_qwen2_5(config) else nn.LayerNorm(dim, eps=1e-6)
        self.merger_fc1 = Linear(merged, merged)
        self.merger_fc2 = Linear(merged, out_dim)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Per image (or video): pixel_values [t * h * w, patch_dim] of grid (t, h, w) -> [t * h * w / 4, hidden]."""
        x = self.patch_embed(torch.cat(pixels).to(self.patch_embed.weight.dtype))
        positions = torch.cat([patch_positions(g, self.merge) for g in grids])
        frames = [h * w for t, h, w in grids for _ in range(t)]
        unit = self.merge ** 2
        order, windows = None, frames
        if self.window is not None:                  # regroup merge units window by window
            orders, windows, first = [], [], 0
            for g in grids:
                o, lengths = window_order(g, self.merge, self.window)
                orders.append(o + first)
                windows += lengths
                first += g[0] * g[1] * g[2] // unit
            order = torch.cat(orders)
            x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)
            positions = positions.view(-1, unit, 2)[order].flatten(0, 1)
        angles = positions[..., None].float() * self.inv_freq
        angles = angles.flatten(1).repeat(1, 2)[:, None]            # [N, 1, Dh]: (rows, cols) twice
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_attention else windows)
        x = self.ln_q(x).view(-1, self.merger_fc1.in_features)
        x = self.merger_fc2(F.gelu(self.merger_fc1(x)))
        if order is not None:
            x = x[torch.argsort(order)]
        return list(x.split([t * h * w // unit for t, h, w in grids]))

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
