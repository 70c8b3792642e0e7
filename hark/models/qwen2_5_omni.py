"""Qwen2.5-Omni thinker (audio and text in, text out): a chunked Whisper-style audio encoder and a
Qwen2 LM with multimodal RoPE.

Audio encoder, per clip of L valid mel frames: the frames are cut into chunks of 2 * n_window (200,
2 s); each chunk goes through the two convolutions on its own and gets the sinusoidal positions
from 0, and attention runs within each chunk only. The clip's frames are then averaged in pairs,
layer-normed (ln_post) and projected (proj) straight into the LM's width: (((L - 1) // 2 + 1) - 2)
// 2 + 1 embeddings, 25 per second. The chunks of all clips are packed into one [frames, D] tensor
for the projections and MLPs (hark.models.whisper_encoder's layers).

Positions (TMRoPE): each token has a (time, height, width) position and the rotary frequency bands
of mrope_section turn by one axis each (layers.MRotaryEmbedding). Text and audio advance all three
axes together, audio at position_id_per_seconds (25) per second, i.e. one per audio embedding, so
an audio and text prompt sits at 0..L-1 on every axis and decoding continues at L (delta 0), as
transformers' get_rope_index gives. Images and video (whose t/h/w grids break that) are not
supported: their weights (visual.*) are not loaded and their tokens are not accepted.

Checkpoints: a thinker saved by transformers (audio_tower.*, model.*, lm_head.weight, visual.*),
transformers 5 in-memory names (model.audio_tower.*, model.language_model.*), or the whole
Qwen2.5-Omni model (thinker.* of those; talker.* and token2wav.*, the speech output, are skipped).
"""
import copy
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.inputs import MultiModalItem, ProcessedPrompt, PromptPositions
from hark.models.audio_lm import AudioLanguageModel
from hark.models.layers import Linear, MRotaryEmbedding
from hark.models.llama import Qwen2ForCausalLM
from hark.models.whisper_encoder import EncoderLayer, conv_output_frames, load_encoder_weights


def thinker_config(hf_config):
    """The thinker's config, from a thinker checkpoint or a whole Qwen2.5-Omni one."""
    return getattr(hf_config, "thinker_config", None) or hf_config


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels]: sin of position * timescale for channels / 2 timescales, then cos."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2).float())
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat((scaled.sin(), scaled.cos()), dim=1)


class OmniAudioEncoder(nn.Module):
    """Per clip: mel [n_mels, >= L] whose first L frames are real audio -> [embeds, LM hidden]."""

    def __init__(self, config):
        super().__init__()
        if getattr(config, "scale_embedding", False):
            raise ValueError("audio encoders with scale_embedding=True are not supported.")
        if getattr(config, "activation_function", "gelu") != "gelu":
            raise ValueError(f"audio encoder activation {config.activation_function!r} is not supported (gelu only).")
        self.chunk_frames = 2 * config.n_window
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.max_source_positions, config.d_model),
                             persistent=False)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.ln_post = nn.LayerNorm(config.d_model)
        self.proj = Linear(config.d_model, config.output_dim)

    def forward(self, features: list[torch.Tensor], mel_frames: list[int]) -> list[torch.Tensor]:
        chunks = [mel[:, start:min(start + self.chunk_frames, n)]
                  for mel, n in zip(features, mel_frames) for start in range(0, n, self.chunk_frames)]
        frames = self.conv_chunks(chunks)
        spans = [(f.shape[0], f.shape[0]) for f in frames]
        x = torch.cat([f + self.positional_embedding[:f.shape[0]] for f in frames])
        for layer in self.layers:
            x = layer(x, spans)
        clips = x.split([conv_output_frames(n) for n in mel_frames])
        pooled = [(c[0:c.shape[0] // 2 * 2:2] + c[1:c.shape[0] // 2 * 2:2]) / 2 for c in clips]
        out = self.proj(self.ln_post(torch.cat(pooled)))
        return list(out.split([p.shape[0] for p in pooled]))

    def conv_chunks(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """conv1 -> gelu -> conv2 -> gelu of each chunk at its own length: [frames, D] per chunk.
        Chunks of one length (all the full ones) go through as one batch."""
        out: list[torch.Tensor | None] = [None] * len(chunks)
        by_length: dict[int, list[int]] = {}
        for i, chunk in enumerate(chunks):
            by_length.setdefault(chunk.shape[1], []).append(i)
        for indices in by_length.values():
            mel = torch.stack([chunks[i] for i in indices]).to(self.conv1.weight.dtype)
            x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
            for i, frames in zip(indices, x):
                out[i] = frames
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # audio_bos_eos_token: embeddings the thinker never uses (its prompts carry the tokens)
        load_encoder_weights(self, ((n, t) for n, t in weights if not n.startswith("audio_bos_eos_token.")))


class OmniLanguageModel(Qwen2ForCausalLM):
    """Qwen2 with multimodal RoPE: positions [3, T]."""

    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__(config, dtype)
        params = getattr(config, "rope_parameters", None) or {}
        self.rope = MRotaryEmbedding(config, config.max_position_embeddings, params.get("mrope_section", [16, 24, 24]))


class Qwen2_5OmniThinkerForConditionalGeneration(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        config = thinker_config(config)
        self.config = config
        text_config = copy.deepcopy(config.text_config)
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))  # as transformers
        if getattr(text_config, "use_sliding_window", False):
            raise ValueError("Qwen2.5-Omni with use_sliding_window=True is not supported.")
        if config.audio_config.output_dim != text_config.hidden_size:
            raise ValueError(f"audio encoder output_dim {config.audio_config.output_dim} is not the LM's hidden "
                             f"size {text_config.hidden_size}.")
        self.audio_tower = OmniAudioEncoder(config.audio_config)
        self.language_model = OmniLanguageModel(text_config, dtype)
        self._bind_language_model(text_config)

    # --- positions ----------------------------------------------------------------------------
    def prompt_positions(self, prompt: ProcessedPrompt) -> PromptPositions:
        """TMRoPE positions of an audio / text prompt: each token one step on all three axes (an
        audio embedding is 1 / 25 s = one position), so 0..L-1 and delta 0."""
        n = len(prompt.prompt_token_ids)
        return PromptPositions(torch.arange(n).expand(3, n), delta=0)

    # --- audio --------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [num_embeds, H] LM-space tensor per item; the encoder runs once over the batch."""
        embeds = self.audio_tower([item.features for item in items], [item.num_frames for item in items])
        return [e.clone() for e in embeds]      # cached apart from the batch

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        audio, lm = [], []
        for name, tensor in weights:
            name = checkpoint_name(name)
            if name is None:
                continue
            if name.startswith("audio_tower."):
                audio.append((name.removeprefix("audio_tower."), tensor))
            elif name.startswith("model.") or name == "lm_head.weight":
                lm.append((name, tensor))
            else:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        self.audio_tower.load_weights(audio)
        self.language_model.load_weights(lm)


SKIPPED_PREFIXES = ("visual.", "talker.", "token2wav.")


def checkpoint_name(name: str) -> str | None:
    """A thinker weight's saved name (audio_tower.*, model.*, lm_head.weight), or None for the
    weights hark does not run (vision encoder, talker, token2wav)."""
    if name.startswith(("talker.", "token2wav.")):
        return None
    name = name.removeprefix("thinker.")
    if name.startswith("model.audio_tower."):
        name = name.removeprefix("model.")
    elif name.startswith("model.language_model."):
        name = "model." + name.removeprefix("model.language_model.")
    elif name.startswith("model.visual."):
        return None
    return None if name.startswith(SKIPPED_PREFIXES) else name
