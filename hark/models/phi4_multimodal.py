"""Phi-4-multimodal (transformers' native Phi4MultimodalForCausalLM), its speech path: a conformer audio
encoder, the speech projector and a Phi-3-style LM. Images are not supported (their weights are skipped).

Audio encoder, per clip of T log-mel frames [T, 80] (hark.audio.fbank), as transformers computes it:
  1. (x - global_mean) * global_invstd
  2. conv subsampling (NeMo style): Conv2d(1, C, 3, stride 2) and ReLU, then log2(time_reduction) - 1
     times a depthwise Conv2d(3, stride 2), a pointwise Conv2d and ReLU, over (time, mel); the channels
     and the remaining mel bins are flattened and projected (out) to D: ceil(T / 8) frames.
  3. frames are cut into windows of 500 (a clip longer than 500 frames, 40 s, has its last window
     zero-padded to 500 and attended whole, as transformers' unfold with a single clip), each window
     encoded on its own by the conformer blocks, with attention scores plus a learnt relative-position
     bias (bias_values[clip(j - i, -1000, 999) + 1000], per head) plus transformers' mask added as a
     number (1 where a key may be seen: everywhere when chunk_size <= 0, else the key's chunk is at
     most left_chunk chunks back).
  4. conformer block: x + 0.5 FF(x); x + attn(LN(x)); x + conv(x); x + 0.5 FF(x); LN. FF: LN,
     up / gate halves of one projection, up * swish(gate), down. conv: LN, a GLU pointwise conv
     ((a + b1) * swish(b + b2)), a causal depthwise conv (kernel k, left padding k - 1) and pointwise
     conv, swish, a pointwise conv.
Projector (speech mode): up_proj_for_speech -> GELU -> down_proj_for_speech into the LM's width.
One embedding per encoder frame: ceil(T / 8) for T = (samples - 400) // 160 + 1 (2.79 s -> 35).

A prompt with several clips is encoded clip by clip. transformers pads the clips of one prompt to the
longest and its encoder does not mask the padding (the boolean mask is added to the scores as 0 / 1),
so there a shorter clip's embeddings depend on the longer one's length; hark's equal that clip
encoded alone, which is also what makes them cacheable by content.

The LM is Phi-3's: fused qkv_proj and gate_up_proj (hark's Llama layers under the same names), RoPE
on the first partial_rotary_factor of each head. LongRoPE: transformers turns every position by the
short factors while a sequence fits original_max_position_embeddings and recomputes everything with
the long factors past it; a paged KV cache cannot, so hark caps such a model's context at
original_max_position_embeddings, where both agree.
"""
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.inputs import MultiModalItem
from hark.models.audio_lm import AudioLanguageModel
from hark.models.layers import Linear, RotaryEmbedding
from hark.models.llama import LlamaForCausalLM
from hark.models.weights import WeightLoader

WINDOW = 500                 # encoder frames attended together (transformers' max_seq_len)
AUDIO_PREFIX = "model.embed_tokens_extend.audio_embed."
SKIPPED = ("model.embed_tokens_extend.image_embed.", AUDIO_PREFIX + "up_proj_for_vision_speech.",
           AUDIO_PREFIX + "down_proj_for_vision_speech.")
ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def activation(name: str, inplace: bool = False) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"Phi-4-multimodal audio activation {name!r} is not supported ({', '.join(ACTIVATIONS)}).")
    return nn.GELU() if name == "gelu" else ACTIVATIONS[name](inplace=inplace)


class ConvSubsampling(nn.Module):
    def __init__(self, config):
        super().__init__()
        channels = config.nemo_conv_channels
        # in-place activations: the first output is C x T/2 x 40 floats (92 MB for 30 s at C = 384)
        act = config.nemo_activation
        layers = [nn.Conv2d(1, channels, 3, stride=2, padding=1), activation(act, inplace=True)]
        for _ in range(int(math.log2(config.time_reduction)) - 1):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                       nn.Conv2d(channels, channels, 1), activation(act, inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.out = Linear(channels * config.nemo_final_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, mels] -> [ceil(T / time_reduction), D]"""
        x = self.conv(x[None, None])[0]                      # [C, T', F']
        return self.out(x.transpose(0, 1).flatten(1))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [W, n, D] windows; bias [H, n, n] added to the scores."""
        w, n, d = x.shape
        q, k, v = (p(x).view(w, n, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.o_proj(o.transpose(1, 2).reshape(w, n, d))


class GluPointwiseConv(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.channels = config.ext_pw_out_channel
        self.ext_pw_conv_1d = nn.Conv1d(config.hidden_size, 2 * self.channels, 1)
        self.b1 = nn.Parameter(torch.zeros(1, self.channels, 1))
        self.b2 = nn.Parameter(torch.zeros(1, self.channels, 1))
        self.act = activation(config.conv_glu_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[W, C, n] -> [W, C, n]"""
        x = self.ext_pw_conv_1d(x)
        return (x[:, :self.channels] + self.b1) * self.act(x[:, self.channels:] + self.b2)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.dw_conv = nn.Conv1d(d, d * config.depthwise_multiplier, config.kernel_size,
                                 padding=config.kernel_size - 1, groups=d)
        self.pw_conv = nn.Conv1d(d * config.depthwise_multiplier, config.depthwise_separable_out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.dw_conv(x))


class ConvModule(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kernel_size = config.kernel_size
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.glu = GluPointwiseConv(config)
        self.dw_sep_conv_1d = DepthwiseSeparableConv(config)
        self.act = activation(config.conv_activation)
        self.ext_pw_conv_1d = nn.Conv1d(config.hidden_size, config.ext_pw_out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.glu(self.layer_norm(x).transpose(1, 2))
        x = self.dw_sep_conv_1d(x)
        if self.kernel_size > 1:                 # causal: drop the outputs that saw the right padding
            x = x[:, :, :-(self.kernel_size - 1)]
        return self.ext_pw_conv_1d(self.act(x)).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.feed_forward_in = FeedForward(config)
        self.self_attn = SelfAttention(config)
        self.conv = ConvModule(config)
        self.feed_forward_out = FeedForward(config)
        self.layer_norm_att = nn.LayerNorm(config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward_in(x)
        x = x + self.self_attn(self.layer_norm_att(x), bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class RelativeAttentionBias(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.max_distance = config.bias_max_distance
        self.symmetric = config.bias_symmetric
        self.num_buckets = self.max_distance * (1 if self.symmetric else 2)
        self.bias_values = nn.Embedding(self.num_buckets, config.num_attention_heads)

    def forward(self, n: int) -> torch.Tensor:
        """[H, n, n]: the bias of key j for query i."""
        positions = torch.arange(n, device=self.bias_values.weight.device)
        relative = (positions[None, :] - positions[:, None]).clamp(-self.max_distance, self.max_distance - 1)
        index = relative.abs() if self.symmetric else relative + self.num_buckets // 2
        return self.bias_values(index).permute(2, 0, 1)


def visible_keys(n: int, chunk_size: int, left_chunk: int) -> torch.Tensor:
    """bool [n, n]: key j is visible from query i (transformers' streaming mask): all of them when
    chunk_size <= 0, else the keys from left_chunk chunks before i's chunk to the end of i's chunk."""
    if chunk_size <= 0:
        return torch.ones(n, n, dtype=torch.bool)
    chunk = torch.arange(n) // chunk_size
    lo = (chunk - left_chunk).clamp(min=0) * chunk_size
    hi = ((chunk + 1) * chunk_size).clamp(max=n)
    keys = torch.arange(n)[None, :]
    return (keys >= lo[:, None]) & (keys < hi[:, None])


class ConformerEncoder(nn.Module):
    """Per clip: features [T, mels] -> [ceil(T / time_reduction), D]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # buffers in transformers; parameters here so the weight loader checks they are in the checkpoint
        self.global_mean = nn.Parameter(torch.zeros(config.input_size), requires_grad=False)
        self.global_invstd = nn.Parameter(torch.ones(config.input_size), requires_grad=False)
        self.embed = ConvSubsampling(config)
        self.relative_attention_bias_layer = RelativeAttentionBias(config)
        self.encoders = nn.ModuleList(ConformerBlock(config) for _ in range(config.num_blocks))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        dtype = self.global_mean.dtype
        frames = [self.embed((f.to(self.global_mean.device, dtype) - self.global_mean) * self.global_invstd)
                  for f in features]
        windows = []                                   # (clip, first frame, window [n, D])
        for i, x in enumerate(frames):
            if x.shape[0] <= WINDOW:
                windows.append((i, 0, x))
                continue
            padded = F.pad(x, (0, 0, 0, -x.shape[0] % WINDOW))
            windows += [(i, start, padded[start:start + WINDOW]) for start in range(0, padded.shape[0], WINDOW)]
        by_length: dict[int, list[int]] = {}
        for k, (_, _, w) in enumerate(windows):
            by_length.setdefault(w.shape[0], []).append(k)
        encoded: list[torch.Tensor | None] = [None] * len(windows)
        for n, indices in by_length.items():
            x = torch.stack([windows[k][2] for k in indices])
            bias = self.attention_bias(n)
            for block in self.encoders:
                x = block(x, bias)
            for k, out in zip(indices, x):
                encoded[k] = out
        out = [torch.empty(f.shape[0], f.shape[1], dtype=f.dtype, device=f.device) for f in frames]
        for (i, start, _), e in zip(windows, encoded):
            rows = min(e.shape[0], frames[i].shape[0] - start)
            out[i][start:start + rows] = e[:rows]
        return out

    def attention_bias(self, n: int) -> torch.Tensor:
        """[H, n, n]: relative-position bias plus the visibility mask as transformers adds it (1 / 0)."""
        mask = visible_keys(n, self.config.chunk_size, self.config.left_chunk).to(self.global_mean.device)
        return self.relative_attention_bias_layer(n) + mask


class SpeechProjector(nn.Module):
    def __init__(self, audio_dim: int, hidden: int):
        super().__init__()
        self.up_proj_for_speech = Linear(audio_dim, hidden)
        self.down_proj_for_speech = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj_for_speech(F.gelu(self.up_proj_for_speech(x)))


def check_config(config) -> None:
    audio = config.audio_config
    if getattr(audio, "downsample_rate", 1) != 1:
        raise ValueError("Phi-4-multimodal audio with downsample_rate != 1 is not supported.")
    if audio.depthwise_separable_out_channel != audio.hidden_size or audio.ext_pw_out_channel != audio.hidden_size:
        raise ValueError("Phi-4-multimodal audio conv channels must equal the encoder's hidden_size.")
    if config.hidden_act != "silu":
        raise ValueError(f"Phi-4-multimodal LM activation {config.hidden_act!r} is not supported (silu only).")
    params = config.rope_parameters or {}
    if params.get("rope_type", "default") not in ("default", "longrope"):
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported for Phi-4-multimodal.")


def context_limit(config) -> int:
    """Positions hark serves: original_max_position_embeddings for LongRoPE whose long and short
    factors differ (see the module docstring), else max_position_embeddings."""
    params = config.rope_parameters or {}
    original = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if params.get("rope_type") == "longrope" and params.get("long_factor") != params.get("short_factor") and original:
        return min(original, config.max_position_embeddings)
    return config.max_position_embeddings


def phi3_language_model(name: str, config, dtype: torch.dtype) -> tuple[LlamaForCausalLM, int]:
    """The Phi-3 LM on hark's Llama, and the positions it serves (context_limit), with a cos / sin
    table for just those; shared by Phi-4-multimodal and Phi-3.5-vision."""
    limit = context_limit(config)
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and sliding < limit:
        raise ValueError(f"{name} with sliding_window={sliding} is not supported.")
    lm = LlamaForCausalLM(config, dtype)
    if limit < config.max_position_embeddings:
        lm.rope = RotaryEmbedding(config, limit)
    return lm, limit


class Phi4MultimodalForCausalLM(AudioLanguageModel):
    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_config(config)
        self.config = config
        self.language_model, max_positions = phi3_language_model("Phi-4-multimodal", config, dtype)
        self.audio_tower = ConformerEncoder(config.audio_config)
        self.audio_projector = SpeechProjector(config.audio_config.hidden_size, config.hidden_size)
        self._bind_language_model(config)
        self.max_positions = max_positions

    # --- audio --------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [num_embeds, H] LM-space tensor per item."""
        hidden = self.audio_tower([item.features for item in items])
        embeds = self.audio_projector(torch.cat(hidden)).split([h.shape[0] for h in hidden])
        return [e.clone() for e in embeds]

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        audio, lm = WeightLoader(self.audio_tower), []
        projector = WeightLoader(self.audio_projector)
        for name, tensor in weights:
            if name.startswith(SKIPPED):
                continue
            if name.startswith(AUDIO_PREFIX + "encoder."):
                target = name.removeprefix(AUDIO_PREFIX + "encoder.").removeprefix("encoder_embedding.")
                audio.copy(target, tensor, name)
            elif name.startswith(AUDIO_PREFIX):
                projector.copy(name.removeprefix(AUDIO_PREFIX), tensor, name)
            elif name.startswith("model.") or name == "lm_head.weight":
                lm.append((name, tensor))
            else:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        audio.check_complete()
        projector.check_complete()
        self.language_model.load_weights(lm)
