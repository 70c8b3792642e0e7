"""CLIP's vision tower (ViT), as LLaVA uses it: the hidden states of one chosen layer, not its pooled output.

pixel_values [B, 3, S, S] -> patch embedding (a stride-`patch` convolution, no bias) -> a class token in
front -> learned positions -> pre-layernorm ("pre_layrnorm" in the checkpoint) -> pre-norm encoder layers
(full attention, quick_gelu MLP). `hidden_states(pixels, layers)` returns what transformers' outputs
.hidden_states[i] are: index 0 is the input of the first layer, index i the output of layer i, negative
indices count from the last layer's output. Only the layers up to the deepest one asked for run.

Weight names are transformers' CLIPVisionModel names under vision_model. (older checkpoints) or without it;
Q, K and V are fused here.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.models.layers import Linear, by_row_blocks
from hark.models.parallel import QKVParallelLinear
from hark.models.weights import QKV, WeightLoader

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv_proj = QKVParallelLinear(dim, self.head_dim, num_heads, num_heads, bias=True, shard=False)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class VisionLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision tower activation {config.hidden_act!r} is not supported "
                             f"({', '.join(ACTIVATIONS)}).")
        self.act = ACTIVATIONS[config.hidden_act]
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + by_row_blocks(self.mlp, self.layer_norm2(x), self.fc1.out_features)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPVisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, config.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))

    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """[B, 1 + patches, D] hidden states at each index of `layers` (transformers' hidden_states indexing)."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"the vision tower takes {self.image_size} x {self.image_size} pixels, "
                             f"got {tuple(pixels.shape[-2:])}")
        total = len(self.layers)
        wanted = [i if i >= 0 else total + 1 + i for i in layers]
        if any(not 0 <= i <= total for i in wanted):
            raise ValueError(f"vision_feature_layer {layers} is outside the tower's {total} layers")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        x = self.pre_layrnorm(torch.cat((cls, patches), dim=1) + self.position_embedding.weight)
        states = {0: x}
        for i, layer in enumerate(self.layers[:max(wanted)], start=1):
            x = layer(x)
            states[i] = x
        return [states[i] for i in wanted]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """transformers' CLIPVisionModel names, with or without the vision_model. prefix; the unused
        post_layernorm (and the layers past the deepest feature layer) may be in the checkpoint."""
        loader = WeightLoader(self, "vision tower weight")
        for name, tensor in weights:
            name = name.removeprefix("vision_model.").replace("embeddings.", "").replace("encoder.", "").replace("mlp.", "")
            if name.startswith("post_layernorm.") or name == "position_ids":
                continue
            loader.load(name, tensor, name, QKV)
        loader.check_complete()
