"""Whisper's audio encoder for audio LLMs: variable-length, batched, with a per-item key mask.

Audio LLMs (Qwen2-Audio, Ultravox) feed the LM only the encoder frames that come from real
audio. Those frames attend to real frames only (Qwen2-Audio masks the padding; Ultravox encodes
each clip at its own length), so a clip's valid outputs do not depend on how far it is padded:
hark cuts the mel input to what the valid outputs can see (frames + 2, for the two convolutions)
and pads a batch only to its longest item. A 5 s clip costs 1/6 of a padded 30 s window.

Weight names are transformers' WhisperEncoder / Qwen2AudioEncoder names (conv1, conv2,
embed_positions, layers.N.self_attn.{q,k,v,out}_proj, ..., layer_norm); Q, K and V are fused here.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def conv_output_frames(mel_frames: int) -> int:
    """Encoder frames (after the stride-2 convolution) that come from `mel_frames` valid mel frames."""
    return (mel_frames - 1) // 2 + 1


def mel_frames_needed(mel_frames: int, max_frames: int) -> int:
    """Mel frames the valid encoder outputs depend on: the valid ones plus the convolutions' reach."""
    return min(mel_frames + 2, max_frames)


class EncoderAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)      # K has no bias: its slice stays zero
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, D]; key_mask [B, 1, 1, S] True where a key may be attended to, or None."""
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(o.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = EncoderAttention(config.d_model, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperAudioEncoder(nn.Module):
    """mel [B, n_mels, F] + valid mel frames per item -> hidden [B, S, D] and valid frames per item.

    avg_pool: Qwen2-Audio's stride-2 average pooling before the final layer norm (S halves again).
    """

    def __init__(self, config, avg_pool: bool = False):
        super().__init__()
        if getattr(config, "scale_embedding", False):
            raise ValueError("audio encoders with scale_embedding=True are not supported.")
        if getattr(config, "activation_function", "gelu") != "gelu":
            raise ValueError(f"audio encoder activation {config.activation_function!r} is not supported (gelu only).")
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.avg_pool = avg_pool
        self.max_mel_frames = 2 * config.max_source_positions   # one 30 s window

    def output_frames(self, mel_frames: int) -> int:
        n = conv_output_frames(mel_frames)
        return (n - 2) // 2 + 1 if self.avg_pool else n

    def forward(self, features: torch.Tensor, feature_frames: list[int],
                mel_frames: list[int]) -> tuple[torch.Tensor, list[int]]:
        """features [B, n_mels, F]: item i holds feature_frames[i] frames (zeros after), of which the
        first mel_frames[i] come from real audio. Each item is encoded as if it were alone."""
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        if min(feature_frames) < x.shape[-1]:   # an item alone would see conv2's zero padding there
            x = x * (torch.arange(x.shape[-1], device=x.device) < torch.tensor(feature_frames, device=x.device)[:, None])[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        length = x.shape[1]
        x = x + self.embed_positions.weight[:length]
        valid = torch.tensor([conv_output_frames(n) for n in mel_frames], device=x.device)
        key_mask = None
        if int(valid.min()) < length:
            key_mask = (torch.arange(length, device=x.device) < valid[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        if self.avg_pool:
            x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        return self.layer_norm(x), [self.output_frames(n) for n in mel_frames]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF encoder names without prefix (conv1.weight, layers.0.self_attn.q_proj.weight, ...)."""
        params = dict(self.named_parameters())
        loaded = set()
        d = self.conv1.out_channels
        for name, tensor in weights:
            parts = name.split(".")
            if len(parts) == 5 and parts[3] in ("q_proj", "k_proj", "v_proj"):
                target = ".".join(parts[:3] + ["qkv_proj", parts[4]])
                shard = ("q_proj", "k_proj", "v_proj").index(parts[3])
                params[target].data[shard * d:(shard + 1) * d].copy_(tensor)
                loaded.add(target)
                continue
            if name not in params:
                raise ValueError(f"checkpoint has an unexpected audio encoder weight {name!r}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing audio encoder weights: {missing[:5]}")
        for layer in self.layers:          # Whisper's K projection has no bias
            layer.self_attn.qkv_proj.bias.data[d:2 * d].zero_()


def pad_features(items) -> tuple[torch.Tensor, list[int]]:
    """Stacks items' mel features [n_mels, f_i] into [B, n_mels, max f_i] (zero padded); returns the f_i."""
    lengths = [item.features.shape[-1] for item in items]
    batch = items[0].features.new_zeros(len(items), items[0].features.shape[0], max(lengths))
    for row, item, n in zip(batch, items, lengths):
        row[:, :n] = item.features
    return batch, lengths
