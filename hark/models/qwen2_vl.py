"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`),
images and video: the native-resolution vision tower
(hark.models.qwen2_vl_vision) and a Qwen2 LM with multimodal RoPE.

An image of patch grid (t, h, w) gives t * h * w / 4 embeddings, laid over its <|image_pad|> tokens.
Positions (M-RoPE, as transformers' get_rope_index): text tokens advance all three axes together;
an image placed at position p gives its tokens (p + frame, p + row, p + column) over the merged
grid, and the text after it resumes at p + max(h, w) / 2. A video's frame axis is its temporal patch
index (Qwen2-VL) or that times tokens_per_second x seconds per temporal patch (Qwen2.5-VL). Generated tokens continue from the
prompt's largest position + 1 (`delta` = that - prompt length).
Checkpoint names: visual.*, model.* (LM), lm_head.weight, or transformers 5's model.visual.*,
model.language_model.*.
"""
import copy
from typing import Iterable

import torch

from hark.inputs import MultiModalItem, ProcessedPrompt, PromptPositions
from hark.models.audio_lm import AudioLanguageModel
from hark.models.qwen2_5_omni import OmniLanguageModel
from hark.models.qwen2_vl_vision import Qwen2VLVisionTower


class Qwen2VLForConditionalGeneration(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        text_config = copy.deepcopy(config.text_config)
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text_config.tie_word_embeddings))
        if getattr(text_config, "use_sliding_window", False):
            raise ValueError("Qwen2-VL with use_sliding_window=True is not supported.")
        self.merge = config.vision_config.spatial_merge_size
        self.temporal = config.vision_config.temporal_patch_size
        self.tokens_per_second = getattr(config.vision_config, "tokens_per_second", None)   # Qwen2.5-VL
        self.visual = Qwen2VLVisionTower(config.vision_config)
        self.language_model = OmniLanguageModel(text_config, dtype)
        self._bind_language_model(text_config)

    # --- positions ----------------------------------------------------------------------------
    def prompt_positions(self, prompt: ProcessedPrompt) -> PromptPositions:
        n = len(prompt.prompt_token_ids)
        pieces, pos, prev = [], 0, 0
        for item, offset in zip(prompt.mm_items, prompt.placeholder_offsets):
            pieces.append(torch.arange(pos, pos + offset - prev).expand(3, -1))
            pos += offset - prev
            t, h, w = item.grid_thw
            h, w = h // self.merge, w // self.merge
            frames = torch.arange(t)
            if item.fps is not None and self.tokens_per_second is not None:   # Qwen2.5-VL video: time-aligned
                frames = (frames * (self.tokens_per_second * self.temporal / item.fps)).long()
            grid = torch.stack(torch.meshgrid(frames, torch.arange(h), torch.arange(w), indexing="ij"))
            pieces.append(grid.reshape(3, -1) + pos)
            pos += max(h, w)
            prev = offset + item.num_embeds
        pieces.append(torch.arange(pos, pos + n - prev).expand(3, -1))
        positions = torch.cat(pieces, dim=1)
        return PromptPositions(positions, delta=int(positions.max()) + 1 - n)

    # --- images -------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [t * h * w / 4, H] tensor per image item (features: its pixel_values patches); one tower call."""
        embeds = self.visual([item.features for item in items], [item.grid_thw for item in items])
        return [e.clone() for e in embeds]

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        visual, lm = [], []
        for name, tensor in weights:
            name = name.removeprefix("model.") if name.startswith("model.visual.") else name
            if name.startswith("model.language_model."):
                name = "model." + name.removeprefix("model.language_model.")
            if name.startswith("visual."):
                visual.append((name.removeprefix("visual."), tensor))
            elif name.startswith("model.") or name == "lm_head.weight":
                lm.append((name, tensor))
            else:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        self.visual.load_weights(visual)
        self.language_model.load_weights(lm)
