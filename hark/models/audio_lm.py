"""What Qwen2-Audio, Ultravox, MiniCPM-o and LLaVA share: an audio (or vision) encoder whose embeddings
feed a decoder LM.

Subclasses build `audio_tower`, a projector and `language_model` (a hark Llama / Qwen2), then call
`_bind_language_model()`; the engine's LM calls are delegated here.
"""
from typing import Iterable

import torch
from torch import nn


class AudioLanguageModel(nn.Module):
    is_encoder_decoder = False
    language_model: nn.Module

    def _bind_language_model(self, text_config) -> None:
        lm = self.language_model
        self.num_kv_layers, self.num_kv_heads, self.head_dim = lm.num_kv_layers, lm.num_kv_heads, lm.head_dim
        self.max_positions = text_config.max_position_embeddings

    def kv_attention_modules(self) -> list[nn.Module]:
        return self.language_model.kv_attention_modules()

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings(input_ids)

    def forward(self, input_ids, positions, meta, inputs_embeds=None) -> torch.Tensor:
        return self.language_model(input_ids, positions, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def _load_parts(self, encoder: nn.Module, encoder_weights, projector: dict, lm_weights) -> None:
        """Loads the encoder (its load_weights), the projector (a state dict) and the LM."""
        encoder.load_weights(encoder_weights)
        try:
            self.multi_modal_projector.load_state_dict(projector)
        except RuntimeError as e:
            raise ValueError(f"checkpoint's multi_modal_projector weights do not fit its config: {e}") from None
        self.language_model.load_weights(lm_weights)

    @staticmethod
    def _split_weights(weights: Iterable[tuple[str, torch.Tensor]], projector_prefix: str,
                       audio_prefix: str = "audio_tower.", lm_prefix: str = "language_model."):
        """(audio tower weights, projector state dict, LM weights), their prefixes taken off; a
        weight under none of the three prefixes is an error."""
        audio, projector, lm = [], {}, []
        for name, tensor in weights:
            if name.startswith(audio_prefix):
                audio.append((name.removeprefix(audio_prefix), tensor))
            elif name.startswith(projector_prefix):
                projector[name.removeprefix(projector_prefix)] = tensor
            elif name.startswith(lm_prefix):
                lm.append((name.removeprefix(lm_prefix), tensor))
            else:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        return audio, projector, lm


def legacy_name(name: str) -> str:
    """transformers 5 in-memory names (model.audio_tower.*, model.vision_tower.*, model.multi_modal_projector.*,
    model.language_model.*, lm_head.*) -> the published checkpoints' names (audio_tower.*, ...,
    language_model.model.*, language_model.lm_head.*)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name.startswith(("model.audio_tower.", "model.vision_tower.", "model.multi_modal_projector.")):
        return name.removeprefix("model.")
    return name
