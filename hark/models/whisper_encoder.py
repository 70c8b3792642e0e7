"""Whisper's audio encoder: variable-length clips, batched without padding. Whisper itself uses it
over whole 30 s windows; the audio LLMs over each clip's own length.

Audio LLMs (Qwen2-Audio, Ultravox) feed the LM only the encoder frames that come from real
audio, and those frames attend to real frames only (Qwen2-Audio masks the padding of its 30 s
window; Ultravox encodes each clip at its own length). So each clip is encoded at its own length:
the convolutions run per clip over the mel frames the valid outputs depend on (valid + 2), then
the frames of all clips are packed into one [sum of frames, D] tensor for the projections and MLPs
(one GEMM for the whole batch) and attention runs per clip. A 5 s clip costs 1/6 of a 30 s window,
and no clip pays for another's length.

MiniCPM-o's encoder attends block-causally (`attention_chunk` frames: each frame sees every frame up to
the end of its own chunk): one attention call per chunk over the keys up to its end, no mask (for a
30 s window of 50-frame chunks 404 ms against 689 ms with a mask and 613 ms unmasked full attention,
whisper-medium sizes, 1 thread).

Weight names are transformers' WhisperEncoder / Qwen2AudioEncoder names (conv1, conv2,
embed_positions, layers.N.self_attn.{q,k,v,out}_proj, ..., layer_norm); Q, K and V are fused here.
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.models.layers import Linear, by_row_blocks
from hark.models.parallel import QKVParallelLinear
from hark.models.weights import QKV, WeightLoader


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
        # K has no bias: its slice stays zero. Not split over tensor-parallel ranks: rank 0 runs the encoder
        self.qkv_proj = QKVParallelLinear(d_model, self.head_dim, num_heads, num_heads, bias=True, shard=False)
        self.out_proj = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, spans: list[tuple[int, int]], chunk: int | None = None) -> torch.Tensor:
        """x [N, D]: the frames of several clips one after another; clip i has spans[i] = (frames,
        keys): its frames attend to its first `keys` frames; with `chunk`, a frame attends only to
        those before the end of its chunk."""
        # [3, 1, H, N, Dh]: 4-D, contiguous q/k/v so SDPA takes its flash CPU kernel (3-D inputs
        # fall back to the math path, measured 3x slower on a 30 s clip)
        qkv = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(1, 2, 0, 3)
        qkv = qkv.contiguous().unsqueeze(1)
        out = torch.empty_like(qkv[0, 0])
        start = 0
        for n, keys in spans:
            q = qkv[0, :, :, start:start + n]
            k, v = qkv[1:, :, :, start:start + keys].unbind(0)
            step = chunk or n
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                upto = keys if chunk is None else min(hi, keys)
                out[:, start + lo:start + hi] = F.scaled_dot_product_attention(
                    q[:, :, lo:hi], k[:, :, :upto], v[:, :, :upto])[0]
            start += n
        return self.out_proj(out.transpose(0, 1).flatten(1))


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = EncoderAttention(config.d_model, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, spans: list[tuple[int, int]], chunk: int | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), spans, chunk)
        return x + by_row_blocks(self.mlp, self.final_layer_norm(x), self.fc1.out_features)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WhisperAudioEncoder(nn.Module):
    """Per clip: mel [n_mels, f] whose first `mel_frames` frames are real audio -> [valid frames, D].

    out_frames (per clip, default the valid frames): frames to return; those past the valid ones
    are what an encoder over padded input, keys masked, computes at its padding positions
    (Ultravox's projector stacks them into a padded last chunk's last embedding).
    avg_pool: Qwen2-Audio's stride-2 average pooling before the final layer norm (frames halve again).
    attention_chunk: MiniCPM-o's block-causal attention over chunks of that many frames (None: full).
    """

    def __init__(self, config, avg_pool: bool = False, attention_chunk: int | None = None):
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
        self.attention_chunk = attention_chunk

    def forward(self, features: list[torch.Tensor], mel_frames: list[int],
                out_frames: list[int] | None = None) -> list[torch.Tensor]:
        spans, frames = [], []
        for i, (mel, n) in enumerate(zip(features, mel_frames)):
            x = F.gelu(self.conv2(F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)[None]))))[0].t()
            valid = conv_output_frames(n)     # later frames only matter to masked (Qwen2-Audio) keys
            rows = max(valid, min(out_frames[i], x.shape[0])) if out_frames is not None else valid
            frames.append(x[:rows] + self.embed_positions.weight[:rows])
            spans.append((rows, valid))
        x = torch.cat(frames)
        for layer in self.layers:
            x = layer(x, spans, self.attention_chunk)
        outputs = x.split([rows for rows, _ in spans])
        if self.avg_pool:
            outputs = [F.avg_pool1d(o.t()[None], kernel_size=2, stride=2)[0].t() for o in outputs]
        return [self.layer_norm(o) for o in outputs]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF encoder names without prefix (conv1.weight, layers.0.self_attn.q_proj.weight, ...)."""
        load_encoder_weights(self, weights)


def load_encoder_weights(encoder: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Loads HF names into an encoder built of EncoderLayers: q/k/v_proj go into the fused qkv_proj
    (whose K bias stays zero, as Whisper's K projection has none); other names are copied as they are."""
    loader = WeightLoader(encoder, "audio encoder weight")
    for name, tensor in weights:
        loader.load(name, tensor, name, QKV)
    loader.check_complete()
