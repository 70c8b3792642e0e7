"""Phi-3.5-vision / Phi-3-vision (`Phi3VForCausalLM`, remote code on the hub: image_embedding_phi3_v.py):
a CLIP ViT-L/14-336 tower, the HD feature layout with learnt separators, a two-layer projector, a Phi-3 LM.

Per image (hark.multimodal.phi3_vision makes the pixels: the global 336 x 336 image, then rows x cols crops):
  1. every crop through the CLIP tower; the hidden states of img_processor.layer_idx (-2: the
     penultimate layer's output), without the class token: [24 * 24, 1024] a crop;
  2. 2 x 2 merge: each 2 x 2 block of patches becomes one 4096-wide vector (channels ordered by row of
     the block, then column, then channel): 12 x 12 a crop; the crops tile one grid of rows * 12 x cols * 12;
  3. sub_GN appended at the end of every row of that grid, then glb_GN, then the global image's
     12 x 12 grid with sub_GN after each of its rows (hd_transform_order "sub_glb");
  4. img_projection: Linear(4096, H) -> GELU -> Linear(H, H).
rows * 12 * (cols * 12 + 1) + 1 + 12 * 13 embeddings, laid over the prompt's image tokens.

The remote code fixes the tower to CLIP ViT-L/14-336 (config.json has no vision config); hark does too,
unless img_processor holds a `vision_config` dict (CLIPVisionConfig fields), which small test
checkpoints use. Phi3V's config is remote code as well: `read_config` builds a transformers Phi3Config
from config.json (rope_scaling "su" / "longrope" become LongRoPE) with img_processor and embd_layer.
The LM is hark's Llama with Phi-3's fused qkv_proj / gate_up_proj; LongRoPE models are served up to
original_max_position_embeddings, as Phi-4-multimodal (see hark.models.phi4_multimodal).
Weight names are the remote checkpoint's: model.vision_embed_tokens.{img_processor.vision_model.*,
glb_GN, sub_GN, img_projection.{0,2}.*}, model.embed_tokens / model.layers.* / model.norm, lm_head
(model.vision_embed_tokens.wte, where present, is the same embedding).
"""
from typing import Iterable

import torch
from torch import nn

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel
from hark.models.clip_vision import CLIPVisionTower
from hark.models.layers import Linear
from hark.models.phi4_multimodal import phi3_language_model
from hark.models.weights import WeightLoader

CLIP_VIT_LARGE_PATCH14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, num_channels=3,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
VISION_PREFIX = "model.vision_embed_tokens."
NOT_LM_KEYS = ("img_processor", "embd_layer", "auto_map", "model_type", "_attn_implementation")


def read_config(path: str, raw: dict):
    """config.json of a Phi3VForCausalLM checkpoint (model_type "phi3_v") without its remote code."""
    from transformers import CLIPVisionConfig, Phi3Config
    img, embd = raw.get("img_processor"), raw.get("embd_layer")
    if not isinstance(img, dict) or not isinstance(embd, dict):
        raise ValueError(f"Phi-3-vision config.json in {path} needs img_processor and embd_layer dicts.")
    if img.get("name", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"Phi-3-vision img_processor {img.get('name')!r} is not supported (clip_vision_model only).")
    wanted = {"use_hd_transform": True, "with_learnable_separator": True, "hd_transform_order": "sub_glb",
              "projection_cls": "mlp"}
    wrong = {k: embd.get(k) for k, v in wanted.items() if embd.get(k) != v}
    if wrong:
        raise ValueError(f"Phi-3-vision embd_layer {wrong} is not supported; hark runs {wanted}.")
    if img.get("type_feature", "patch") != "patch":
        raise ValueError(f"Phi-3-vision type_feature {img['type_feature']!r} is not supported (patch only).")
    lm = {k: v for k, v in raw.items() if k not in NOT_LM_KEYS}
    scaling = lm.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) == "su":
        # Phi-3-vision's name for LongRoPE, which transformers' Phi3Config renames only after validating it
        lm["rope_scaling"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "longrope"}
    try:
        config = Phi3Config(**lm)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read Phi-3-vision config.json in {path}: {e}") from None
    config.img_processor, config.embd_layer = dict(img), dict(embd)
    config.vision_config = CLIPVisionConfig(**{**CLIP_VIT_LARGE_PATCH14_336, **img.get("vision_config", {})})
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if side % 2 or img.get("image_dim_out", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"Phi-3-vision needs an even patch grid and image_dim_out = the tower's width "
                         f"({vision.hidden_size}); got {side} x {side} and {img.get('image_dim_out')}.")
    if img.get("num_img_tokens", (side // 2) ** 2) != (side // 2) ** 2:
        raise ValueError(f"Phi-3-vision num_img_tokens {img['num_img_tokens']} must be {(side // 2) ** 2}.")
    return config


def read_tokenizer(path: str):
    """The checkpoint's tokenizer (a Llama tokenizer for Microsoft's), found without the remote config class:
    AutoTokenizer would otherwise try to read config.json as a generic config and fail on its rope_scaling."""
    import json
    import os
    from transformers import AutoTokenizer
    with open(os.path.join(path, "config.json")) as f:
        config = read_config(path, json.load(f))
    return AutoTokenizer.from_pretrained(path, config=config)


def merge_2x2(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols crops, side * side, C] -> [rows * side/2, cols * side/2, 4C]: each 2 x 2 patch block
    one vector, the crops tiled in raster order."""
    n, length, c = features.shape
    half = int(length ** 0.5) // 2
    blocks = features.view(rows, cols, half, 2, half, 2, c).permute(0, 2, 1, 4, 3, 5, 6)
    return blocks.reshape(rows * half, cols * half, 4 * c)


class Phi3ImageEmbedding(nn.Module):
    """model.vision_embed_tokens: the tower, the separators and the projector."""

    def __init__(self, config):
        super().__init__()
        self.layer_idx = config.img_processor.get("layer_idx", -2)
        self.img_processor = CLIPVisionTower(config.vision_config)
        dim = 4 * config.vision_config.hidden_size
        self.glb_GN = nn.Parameter(torch.empty(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, dim))
        self.img_projection = nn.Sequential(Linear(dim, config.hidden_size), nn.GELU(),
                                            Linear(config.hidden_size, config.hidden_size))

    def with_row_ends(self, grid: torch.Tensor) -> torch.Tensor:
        """[h, w, D] -> [h * (w + 1), D]: sub_GN after each row."""
        ends = self.sub_GN[0].expand(grid.shape[0], 1, -1)
        return torch.cat([grid, ends], dim=1).flatten(0, 1)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """pixels: per image [1 + rows * cols, 3, 336, 336] (global first); one tower call for all crops."""
        states = self.img_processor.hidden_states(torch.cat(pixels), [self.layer_idx])[0][:, 1:]
        laid = []
        for crops, (rows, cols) in zip(states.split([p.shape[0] for p in pixels]), grids):
            laid.append(torch.cat([self.with_row_ends(merge_2x2(crops[1:], rows, cols)), self.glb_GN[0],
                                   self.with_row_ends(merge_2x2(crops[:1], 1, 1))]))
        embeds = self.img_projection(torch.cat(laid))
        return list(embeds.split([x.shape[0] for x in laid]))


class Phi3VForCausalLM(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        if config.hidden_act != "silu":
            raise ValueError(f"Phi-3-vision LM activation {config.hidden_act!r} is not supported (silu only).")
        params = config.rope_parameters or {}
        if params.get("rope_type", "default") not in ("default", "longrope"):
            raise ValueError(f"rope_type {params['rope_type']!r} is not supported for Phi-3-vision.")
        self.language_model, max_positions = phi3_language_model("Phi-3-vision", config, dtype)
        self.vision_embed_tokens = Phi3ImageEmbedding(config)
        self._bind_language_model(config)
        self.max_positions = max_positions

    # --- images -------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [num_embeds, H] tensor per image item (features: its crops, grid_thw (1, rows, cols))."""
        embeds = self.vision_embed_tokens([item.features for item in items],
                                          [item.grid_thw[1:] for item in items])
        return [e.clone() for e in embeds]

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tower, glue, lm = [], WeightLoader(self.vision_embed_tokens, "vision weight"), []
        for name, tensor in weights:
            if name == VISION_PREFIX + "wte.weight":         # the LM's embedding, shared in the remote model
                lm.append(("model.embed_tokens.weight", tensor))
            elif name.startswith(VISION_PREFIX + "img_processor."):
                tower.append((name.removeprefix(VISION_PREFIX + "img_processor."), tensor))
            elif name.startswith(VISION_PREFIX):
                glue.copy(name.removeprefix(VISION_PREFIX), tensor, name)
            elif name.startswith("model.") or name == "lm_head.weight":
                lm.append((name, tensor))
            else:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        self.vision_embed_tokens.img_processor.load_weights(tower)
        glue.loaded |= {n for n in glue.params if n.startswith("img_processor.")}
        glue.check_complete()
        self.language_model.load_weights(lm)
