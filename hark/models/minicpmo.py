"""MiniCPM-o 2.6 (openbmb), its audio path: a Whisper-medium encoder (apm), a linear-ReLU-linear
projector (audio_projection_layer), average pooling (audio_pool_step) and a Qwen2.5 LM (llm).

Per window of at most 30 s (L valid mel frames): the encoder yields (L - 1) // 2 + 1 frames (50 a
second) whose attention is block-causal over audio_chunk_length seconds (1 s: a frame sees every frame
up to the end of its own second), as MiniCPM-o's get_audio_embedding builds its mask; its last hidden
state (after the final layer norm) goes through linear1 -> ReLU -> linear2 into the LM's width, then an
average pool of audio_pool_step frames: (frames - p) // p + 1 embeddings, 25 a second. Each window is
encoded on its own, as MiniCPM-o does for one clip (batched, its processor zero-pads the mel frames of
shorter clips, which reaches the last frame of a clip with an odd L).

MiniCPMOConfig is remote code on the hub, so hark reads config.json itself (`read_config`): the top
level is the Qwen2 LM's config (MiniCPMOConfig extends Qwen2Config), audio_config a WhisperConfig.
The tokenizer is remote code too (MiniCPMOTokenizerFast, a Qwen2 fast tokenizer): `read_tokenizer`
loads its tokenizer.json as a plain fast tokenizer. Weight names: apm.*, audio_projection_layer.
{linear1, linear2}.{weight, bias}, llm.model.*, llm.lm_head.weight. Vision (vpm.*, resampler.*) and
speech output (tts.*) are not part of hark: their weights are skipped.
"""
from typing import Iterable

import torch
from torch import nn

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel
from hark.models.layers import Linear
from hark.models.llama import Qwen2ForCausalLM
from hark.models.whisper_encoder import WhisperAudioEncoder

ENCODER_FRAMES_PER_SECOND = 50
SKIPPED_PREFIXES = ("vpm.", "resampler.", "tts.")
NOT_LM_KEYS = ("audio_config", "vision_config", "tts_config", "slice_config", "auto_map", "model_type")


def read_config(path: str, raw: dict):
    """config.json of a MiniCPM-o checkpoint (model_type "minicpmo") without its remote code: a
    Qwen2Config with audio_config (WhisperConfig), audio_pool_step and audio_chunk_length set."""
    from transformers import Qwen2Config, WhisperConfig
    if not isinstance(raw.get("audio_config"), dict):
        raise ValueError(f"MiniCPM-o config.json in {path} has no audio_config.")
    if raw.get("init_audio") is False:
        raise ValueError(f"MiniCPM-o config.json in {path} has init_audio false: the checkpoint has no audio encoder.")
    if raw.get("scale_emb") not in (None, 1, 1.0):
        raise ValueError("MiniCPM-o checkpoints with scale_emb are not supported.")
    audio = {k: v for k, v in raw["audio_config"].items() if k != "model_type"}
    config = Qwen2Config(**{k: v for k, v in raw.items() if k not in NOT_LM_KEYS})
    config.audio_config = WhisperConfig(**audio)
    config.audio_pool_step = raw.get("audio_pool_step", 2)
    config.audio_chunk_length = raw.get("audio_chunk_length", 1.0)
    return config


def read_tokenizer(path: str):
    """MiniCPMOTokenizerFast without its remote code: the same tokenizer.json, chat template and special tokens."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(path)


class MultiModalProjector(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = Linear(dim_in, dim_out)
        self.linear2 = Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.linear1(x)))


class MiniCPMO(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        audio = config.audio_config
        chunk = config.audio_chunk_length
        self.pool_step = config.audio_pool_step
        self.audio_tower = WhisperAudioEncoder(
            audio, attention_chunk=int(chunk * ENCODER_FRAMES_PER_SECOND) if chunk and chunk > 0 else None)
        self.audio_projection_layer = MultiModalProjector(audio.encoder_ffn_dim // 4, config.hidden_size)
        self.language_model = Qwen2ForCausalLM(config, dtype)
        self._bind_language_model(config)

    # --- audio --------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [num embeddings, H] tensor per item; the encoder and projector run once over the batch."""
        hidden = self.audio_tower([item.features for item in items], [item.num_frames for item in items])
        projected = self.audio_projection_layer(torch.cat(hidden)).split([h.shape[0] for h in hidden])
        return [self.pool(p) for p in projected]

    def pool(self, frames: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T // p, H]: means of consecutive p frames (AvgPool1d(p, stride=p); a last partial group is dropped)."""
        n = frames.shape[0] // self.pool_step
        return frames[:n * self.pool_step].unflatten(0, (n, self.pool_step)).mean(1)

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = ((name, tensor) for name, tensor in weights if not name.startswith(SKIPPED_PREFIXES))
        audio, projector, lm = self._split_weights(weights, "audio_projection_layer.", audio_prefix="apm.",
                                                   lm_prefix="llm.")
        self.audio_tower.load_weights(audio)
        try:
            self.audio_projection_layer.load_state_dict(projector)
        except RuntimeError as e:
            raise ValueError(f"checkpoint's audio_projection_layer weights do not fit its config: {e}") from None
        self.language_model.load_weights(lm)
