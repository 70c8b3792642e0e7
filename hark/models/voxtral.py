"""Voxtral (Mistral): a Whisper-large-v3-style encoder, a projector over 4 stacked encoder frames, a Llama LM.

Per 30 s window (3000 log-mel frames of 128 bins, the window's padding included: Voxtral's encoder
takes no mask and attends over all of it, as transformers' VoxtralEncoder does): 1500 encoder frames
after the stride-2 convolution, every `intermediate_size / d_model` (4) of them concatenated into one
row, then linear_1 -> gelu -> linear_2 into the LM's width: 375 embeddings per window. Audio longer
than 30 s is padded to whole windows, each encoded on its own; their embeddings follow one another.

Checkpoint names (transformers' published layout): audio_tower.*, multi_modal_projector.{linear_1,
linear_2}.weight, language_model.model.*, language_model.lm_head.weight; transformers 5 in-memory
names (model.audio_tower.*, model.language_model.*, lm_head.weight) are accepted too. As in
transformers, lm_head is its own weight. The tokenizer is Mistral's tekken: `read_tokenizer` loads
tekken.json through transformers' tekken converter (no mistral_common needed) when the checkpoint has
no tokenizer.json.
"""
import copy
import os
from typing import Iterable

import torch
from torch import nn

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel
from hark.models.layers import Linear
from hark.models.llama import LlamaForCausalLM
from hark.models.qwen2_audio import legacy_name
from hark.models.whisper_encoder import WhisperAudioEncoder

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def read_tokenizer(path: str):
    """tokenizer.json if the checkpoint has one, else tekken.json converted to a fast tokenizer."""
    from transformers import PreTrainedTokenizerFast
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    tekken = os.path.join(path, "tekken.json")
    if not os.path.exists(tekken):
        raise ValueError(f"the Voxtral checkpoint in {path} has neither tokenizer.json nor tekken.json.")
    from transformers.integrations.mistral.tokenizer import MistralConverter
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=MistralConverter(tekken).converted())
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens({k: v for k, v in SPECIAL_TOKENS.items() if v in vocab})
    return tokenizer


class VoxtralProjector(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN
        self.linear_1 = Linear(dim_in, dim_out, bias=False)
        self.act = ACT2FN[act]
        self.linear_2 = Linear(dim_out, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VoxtralForConditionalGeneration(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        audio = config.audio_config
        if audio.intermediate_size % audio.d_model or audio.max_source_positions % (audio.intermediate_size //
                                                                                     audio.d_model):
            raise ValueError(f"Voxtral audio_config: intermediate_size {audio.intermediate_size} must be a multiple "
                             f"of d_model {audio.d_model} dividing max_source_positions {audio.max_source_positions}.")
        self.stack = audio.intermediate_size // audio.d_model
        self.window_frames = 2 * audio.max_source_positions        # mel frames of one 30 s window
        text_config = copy.deepcopy(config.text_config)
        text_config.tie_word_embeddings = False
        self.audio_tower = WhisperAudioEncoder(audio)
        self.multi_modal_projector = VoxtralProjector(audio.intermediate_size, text_config.hidden_size,
                                                      config.projector_hidden_act)
        self.language_model = LlamaForCausalLM(text_config, dtype)
        self._bind_language_model(text_config)

    # --- audio --------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [375, H] tensor per 30 s window; the encoder and projector run once over the batch."""
        for item in items:
            if item.features.shape[-1] != self.window_frames:
                raise ValueError(f"Voxtral encodes whole {self.window_frames}-frame windows, got "
                                 f"{item.features.shape[-1]} frames.")
        hidden = self.audio_tower([item.features for item in items], [self.window_frames] * len(items))
        stacked = torch.cat([h.reshape(-1, self.stack * h.shape[-1]) for h in hidden])
        embeds = self.multi_modal_projector(stacked).split(self.window_frames // 2 // self.stack)
        return [e.clone() for e in embeds]      # cached apart from the batch

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        audio, projector, lm = self._split_weights(((legacy_name(name), tensor) for name, tensor in weights),
                                                   "multi_modal_projector.")
        self._load_parts(self.audio_tower, audio, projector, lm)
