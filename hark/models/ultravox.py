"""Ultravox (fixie-ai): Whisper encoder, frame stacking + a SwiGLU projector, a Llama (or Qwen2) LM.

Per clip: Whisper encoder frames (50 per second) are padded to a multiple of stack_factor and
every stack_factor of them concatenated (the padding: zeros where the features end with the clip;
the encoder's outputs at masked positions where they were padded, as a long clip's last chunk is); the projector maps each stack to one LM embedding:
RMSNorm -> linear_1 -> SwiGLU (x * silu(gate), halves in that order) -> [ln_mid] -> linear_2 ->
[ln_post] (projector_ln_mid picks where the second norm sits: v0.5+ mid, older post).

UltravoxConfig is remote code on the hub, so hark reads config.json itself (`read_config`):
audio_config / text_config dicts become transformers' WhisperConfig / LlamaConfig; when a
checkpoint names audio_model_id / text_model_id instead (the published ones do for the LM), that
checkpoint's config and weights are loaded for the missing part.
Weight names: audio_tower.* (or audio_tower.model.encoder.*), multi_modal_projector.{ln_pre,
linear_1, linear_2, ln_mid | ln_post}.weight, language_model.model.*, language_model.lm_head.weight.
"""
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel
from hark.models.layers import Linear, RMSNorm
from hark.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from hark.models.whisper_encoder import WhisperAudioEncoder, conv_output_frames

LANGUAGE_MODELS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


@dataclass
class UltravoxConfig:
    audio_config: object                     # transformers WhisperConfig
    text_config: object                      # transformers LlamaConfig / Qwen2Config
    architectures: list = field(default_factory=lambda: ["UltravoxModel"])
    hidden_size: int = 4096                  # projector width
    stack_factor: int = 8
    projector_act: str = "swiglu"
    projector_ln_mid: bool = False
    audio_token_index: int | None = None
    audio_model_id: str | None = None
    text_model_id: str | None = None
    torch_dtype: str | None = None
    eos_token_id: int | list | None = None

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings


def read_config(path: str, raw: dict) -> UltravoxConfig:
    """config.json of an Ultravox checkpoint (model_type "ultravox") without its remote code."""
    from transformers import CONFIG_MAPPING
    from hark.models.loader import resolve_model_path

    def sub_config(key: str, default_type: str, model_id: str | None):
        if raw.get(key) is not None:
            spec = dict(raw[key])
            model_type = spec.pop("model_type", default_type)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"Ultravox {key} has model_type {model_type!r}, which transformers does not know.")
            return CONFIG_MAPPING[model_type](**spec)
        if model_id is None:
            raise ValueError(f"Ultravox config.json in {path} has neither {key} nor {key.split('_')[0]}_model_id.")
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(resolve_model_path(model_id))

    text_config = sub_config("text_config", "llama", raw.get("text_model_id"))
    if text_config.model_type not in LANGUAGE_MODELS:
        raise ValueError(f"Ultravox with a {text_config.model_type!r} language model is not supported; hark runs "
                         f"{', '.join(LANGUAGE_MODELS)}.")
    audio_config = sub_config("audio_config", "whisper", raw.get("audio_model_id"))
    if audio_config.model_type != "whisper":
        raise ValueError(f"Ultravox with a {audio_config.model_type!r} audio encoder is not supported (whisper only).")
    keys = ("architectures", "hidden_size", "stack_factor", "projector_act", "projector_ln_mid", "audio_token_index",
            "audio_model_id", "text_model_id", "torch_dtype", "eos_token_id")
    kwargs = {k: raw[k] for k in keys if raw.get(k) is not None}
    kwargs.setdefault("torch_dtype", raw.get("dtype"))
    return UltravoxConfig(audio_config, text_config, **kwargs)


class UltravoxProjector(nn.Module):
    def __init__(self, config: UltravoxConfig):
        super().__init__()
        dim_in = config.audio_config.d_model * config.stack_factor
        dim_mid = config.hidden_size // 2 if config.projector_act == "swiglu" else config.hidden_size
        dim_out = config.text_config.hidden_size
        self.ln_pre = RMSNorm(dim_in, 1e-6)
        self.linear_1 = Linear(dim_in, config.hidden_size, bias=False)
        if config.projector_act == "swiglu":
            self.act = swiglu
        else:
            from transformers.activations import get_activation
            self.act = get_activation(config.projector_act)
        self.ln_mid = RMSNorm(dim_mid, 1e-6) if config.projector_ln_mid else nn.Identity()
        self.linear_2 = Linear(dim_mid, dim_out, bias=False)
        self.ln_post = nn.Identity() if config.projector_ln_mid else RMSNorm(dim_out, 1e-6)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        x = self.act(self.linear_1(self.ln_pre(stacked)))
        return self.ln_post(self.linear_2(self.ln_mid(x)))


def swiglu(x: torch.Tensor) -> torch.Tensor:
    x, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * x


class UltravoxModel(AudioLanguageModel):
    def __init__(self, config: UltravoxConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.stack_factor = config.stack_factor
        self.audio_tower = WhisperAudioEncoder(config.audio_config)
        self.multi_modal_projector = UltravoxProjector(config)
        self.language_model = LANGUAGE_MODELS[config.text_config.model_type](config.text_config, dtype)
        self._bind_language_model(config.text_config)

    # --- audio --------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [num_embeds, H] tensor per item; the encoder and projector run once over the batch."""
        frames = [item.num_frames for item in items]
        stacked = [math.ceil(conv_output_frames(n) / self.stack_factor) * self.stack_factor for n in frames]
        hidden = self.audio_tower([item.features for item in items], frames, stacked)
        stacks = [self.stack_frames(h) for h in hidden]
        embeds = self.multi_modal_projector(torch.cat(stacks)).split([s.shape[0] for s in stacks])
        return [e.clone() for e in embeds]      # cached apart from the batch

    def stack_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [ceil(T / stack_factor), D * stack_factor], the last stack padded with zeros."""
        padded = math.ceil(frames.shape[0] / self.stack_factor) * self.stack_factor
        return F.pad(frames, (0, 0, 0, padded - frames.shape[0])).reshape(padded // self.stack_factor, -1)

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        audio, projector, lm = self._split_weights(weights, "multi_modal_projector.")
        audio = [(name.removeprefix("model.encoder."), tensor) for name, tensor in audio]
        if not lm and self.config.text_model_id:
            lm = secondary_weights(self.config.text_model_id)
        if not audio and self.config.audio_model_id:
            audio = [(n.removeprefix("model.encoder."), t) for n, t in secondary_weights(self.config.audio_model_id)
                     if n.startswith("model.encoder.")]
        self._load_parts(self.audio_tower, audio, projector, lm)


def secondary_weights(model_id: str) -> list[tuple[str, torch.Tensor]]:
    """Weights of the checkpoint an Ultravox config names for its LM or encoder."""
    from hark.models.loader import iter_checkpoint_weights, resolve_model_path
    return list(iter_checkpoint_weights(resolve_model_path(model_id)))
