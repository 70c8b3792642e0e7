"""Qwen2-Audio: Whisper-style encoder (masked, average-pooled), a linear projector, a Qwen2 LM.

The encoder turns each clip (at most 30 s) into (((L - 1) // 2 + 1) - 2) // 2 + 1 embeddings for L
valid mel frames (25 per second); the runner places them over the prompt's <|AUDIO|> tokens.
Checkpoint names: audio_tower.*, multi_modal_projector.linear.*, language_model.model.*,
language_model.lm_head.* (transformers 5 in-memory names under model.* are accepted too). As in
transformers, lm_head is its own weight whatever tie_word_embeddings says.
"""
import copy
from typing import Iterable

import torch

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel, legacy_name
from hark.models.layers import Linear
from hark.models.llama import Qwen2ForCausalLM
from hark.models.whisper_encoder import WhisperAudioEncoder


class Qwen2AudioForConditionalGeneration(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        text_config = copy.deepcopy(config.text_config)
        text_config.tie_word_embeddings = False
        self.audio_tower = WhisperAudioEncoder(config.audio_config, avg_pool=True)
        self.multi_modal_projector = Linear(config.audio_config.d_model, text_config.hidden_size)
        self.language_model = Qwen2ForCausalLM(text_config, dtype)
        self._bind_language_model(text_config)

    # --- audio --------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [num_embeds, H] LM-space tensor per item; the encoder runs once over the batch."""
        hidden = self.audio_tower([item.features for item in items], [item.num_frames for item in items])
        embeds = self.multi_modal_projector(torch.cat(hidden)).split([h.shape[0] for h in hidden])
        return [e.clone() for e in embeds]      # cached apart from the batch

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        audio, projector, lm = self._split_weights(((legacy_name(name), tensor) for name, tensor in weights),
                                                   "multi_modal_projector.linear.")
        self.audio_tower.load_weights(audio)
        if set(projector) != {"weight", "bias"}:
            raise ValueError("checkpoint is missing multi_modal_projector.linear weights")
        self.multi_modal_projector.load_state_dict(projector)
        self.language_model.load_weights(lm)
