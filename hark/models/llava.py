"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer projector, a Llama LM.

Per image (resized and cropped to the tower's square by the checkpoint's image processor): the hidden
states of `vision_feature_layer` (-2 in LLaVA-1.5; a list concatenates several layers' states),
without the class token unless vision_feature_select_strategy is "full", then linear_1 -> act ->
linear_2 to the LM's width: (336 / 14)^2 = 576 embeddings for LLaVA-1.5, laid over the prompt's
<image> tokens. Checkpoint names: vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*,
language_model.model.*, language_model.lm_head.* (and transformers 5's model.* names).
"""
import copy
from typing import Iterable

import torch
from torch import nn

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel, legacy_name
from hark.models.clip_vision import CLIPVisionTower
from hark.models.layers import Linear
from hark.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

LANGUAGE_MODELS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


class LlavaProjector(nn.Module):
    def __init__(self, config, vision_width: int):
        super().__init__()
        from transformers.activations import get_activation
        bias = getattr(config, "multimodal_projector_bias", True)
        hidden = config.text_config.hidden_size
        self.linear_1 = Linear(vision_width, hidden, bias=bias)
        self.act = get_activation(config.projector_hidden_act)
        self.linear_2 = Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        vision = config.vision_config
        if vision.model_type not in ("clip_vision_model", "clip"):
            raise ValueError(f"LLaVA with a {vision.model_type!r} vision tower is not supported (CLIP only).")
        text_config = copy.deepcopy(config.text_config)
        if text_config.model_type not in LANGUAGE_MODELS:
            raise ValueError(f"LLaVA with a {text_config.model_type!r} language model is not supported; hark runs "
                             f"{', '.join(LANGUAGE_MODELS)}.")
        text_config.tie_word_embeddings = getattr(config, "tie_word_embeddings", text_config.tie_word_embeddings)
        layer = config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.keep_class_token = config.vision_feature_select_strategy == "full"
        self.vision_tower = CLIPVisionTower(vision)
        self.multi_modal_projector = LlavaProjector(config, vision.hidden_size * len(self.feature_layers))
        self.language_model = LANGUAGE_MODELS[text_config.model_type](text_config, dtype)
        self._bind_language_model(text_config)

    @property
    def image_tokens(self) -> int:
        """Embeddings (prompt tokens) of one image."""
        return self.vision_tower.num_patches + self.keep_class_token

    # --- images -------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [image_tokens, H] tensor per image item (features: pixel_values [3, S, S]); one tower call."""
        pixels = torch.stack([item.features for item in items])
        states = self.vision_tower.hidden_states(pixels, self.feature_layers)
        if not self.keep_class_token:
            states = [s[:, 1:] for s in states]
        embeds = self.multi_modal_projector(torch.cat(states, dim=-1))
        return [e.clone() for e in embeds.unbind(0)]

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        vision, projector, lm = self._split_weights(((legacy_name(n), t) for n, t in weights),
                                                    "multi_modal_projector.", audio_prefix="vision_tower.")
        self._load_parts(self.vision_tower, vision, projector, lm)
