"""Whisper (encoder-decoder ASR) on the paged engine.

The encoder is the audio LLMs' one (`whisper_encoder.py`), over whole 30 s log-mel windows
([B, n_mels, 3000] -> [B, 1500, D]). The
decoder's self-attention uses the paged KV cache; its cross-attention K/V are computed once per
request from that request's encoder output and kept in the model's slot pool (whisper_cross_kv.py),
where a step's requests are one view (`cross_keys_values`).
`decode_dense` runs the decoder without a cache for the transcription pipeline (language
detection, no-speech probability, word-timestamp alignment heads).
"""
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.distributed import state
from hark.inputs import MultiModalItem
from hark.models.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                  VocabParallelEmbedding, tie)
from hark.models.weights import KV, QKV, WeightLoader
from hark.models.whisper_cross_kv import CrossKVPool
from hark.models.whisper_encoder import WhisperAudioEncoder
from hark.runner.attention import AttentionMetadata
from hark.runner.cross_attention import CrossRows


class MLP(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, [ffn_dim])
        self.fc2 = RowParallelLinear(ffn_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Q, K and V fused in one projection (Whisper's K has no bias: its bias slice stays zero);
    this rank's heads."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.head_dim = d_model // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(d_model, self.head_dim, num_heads, num_heads, bias=True)
        self.num_heads = self.qkv_proj.num_heads
        self.out_proj = RowParallelLinear(d_model, d_model)
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed decoder tokens x [T, D] over the paged cache."""
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        o = meta.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.out_proj(o.flatten(1))

    def forward_dense(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x [B, L, D] without a cache: the encoder (causal=False) and `decode_dense`."""
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale)
        return self.out_proj(o.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Decoder queries over the encoder output; K and V fused (K without bias); this rank's heads."""

    def __init__(self, d_model: int, num_heads: int, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads // state.world_size(), d_model // num_heads
        self.scale = self.head_dim ** -0.5
        self.layer_idx = layer_idx
        self.q_proj = ColumnParallelLinear(d_model, [d_model])
        self.kv_proj = ColumnParallelLinear(d_model, [d_model, d_model])
        self.kv_proj.bias.data.zero_()     # Whisper's K has no bias: its slice stays zero
        self.out_proj = RowParallelLinear(d_model, d_model)

    def keys_values(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_states [..., S, D] -> K, V [..., H, S, Dh], contiguous (SDPA is much slower on views)."""
        k, v = self.kv_proj(encoder_states).unflatten(-1, (2, self.num_heads, self.head_dim)).movedim(-3, 0)
        return k.transpose(-3, -2).contiguous(), v.transpose(-3, -2).contiguous()

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor],
                rows: CrossRows | None) -> torch.Tensor:
        """Packed decoder tokens x [T, D]; sequence i attends to row rows.rows[i] (row i when rows is None)
        of kv = (K, V) [R, H, S_enc, Dh].

        A decode step (one token per sequence) is the backend's pooled cross-attention over all rows (the
        beams of a window share its K/V); steps with prompt chunks give it one span per sequence.
        """
        k, v = kv
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        if len(q) == meta.num_seqs:
            out = meta.backend.pooled_cross_forward(q, k, v, rows, self.scale)
        else:
            spans = [(meta.query_start[i], meta.query_start[i + 1], k[r], v[r])
                     for i, r in enumerate(range(meta.num_seqs) if rows is None else rows.row_list)]
            out = meta.backend.cross_forward(q, spans, self.scale)
        return self.out_proj(out.flatten(1))

    def forward_dense(self, x: torch.Tensor, encoder_states: torch.Tensor, return_weights: bool):
        """x [B, L, D], encoder_states [B, S, D] -> (out [B, L, D], weights [B, H, L, S] or None)."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.keys_values(encoder_states)
        if return_weights:
            weights = torch.softmax((q @ k.transpose(-1, -2)).float() * self.scale, dim=-1)
            o = weights.to(v.dtype) @ v
        else:
            weights = None
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(1, 2).flatten(2)), weights


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = SelfAttention(config.d_model, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = CrossAttention(config.d_model, config.decoder_attention_heads, layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config.d_model, config.decoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cross_kv: tuple[torch.Tensor, torch.Tensor],
                cross_rows: CrossRows | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), meta)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), meta, cross_kv, cross_rows)
        return x + self.mlp(self.final_layer_norm(x))

    def forward_dense(self, x: torch.Tensor, encoder_states: torch.Tensor, return_weights: bool):
        x = x + self.self_attn.forward_dense(self.self_attn_layer_norm(x), causal=True)
        h, weights = self.encoder_attn.forward_dense(self.encoder_attn_layer_norm(x), encoder_states, return_weights)
        x = x + h
        return x + self.mlp(self.final_layer_norm(x)), weights


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_target_positions, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)


class WhisperForConditionalGeneration(nn.Module):
    is_encoder_decoder = True

    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        if getattr(config, "scale_embedding", False):
            raise ValueError("Whisper checkpoints with scale_embedding=True are not supported.")
        self.config = config
        self.encoder = WhisperAudioEncoder(config)
        self.decoder = Decoder(config)
        self.proj_out = ParallelLMHead(config.d_model, config.vocab_size, bias=False)
        tie(self.proj_out, self.decoder.embed_tokens)
        self.num_kv_layers = config.decoder_layers
        self.num_kv_heads = self.decoder.layers[0].self_attn.num_heads     # this rank's
        self.head_dim = config.d_model // config.decoder_attention_heads
        self.num_frames = 2 * config.max_source_positions  # mel frames per 30 s window
        self.max_positions = config.max_target_positions  # decoder tokens
        self.cross_kv = CrossKVPool()       # the running requests' cross-attention K/V

    def kv_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.decoder.layers]

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Log-mel features [B, n_mels, 3000] -> encoder output [B, 1500, D]."""
        return torch.stack(self._encode(list(features)))

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One encoder output [1500, D] per item. On CPU the encoder runs one window at a time (its
        activations then stay in cache: 400 ms per window against 442 ms in batches of 6, 1 thread),
        elsewhere once over all of them."""
        if self.encoder.conv1.weight.is_cpu:
            return [self._encode([item.features])[0] for item in items]
        return self._encode([item.features for item in items])

    def _encode(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole 30 s windows through the shared Whisper encoder (the audio LLMs' one)."""
        for mel in features:
            if mel.shape[-1] != self.num_frames:
                raise ValueError(f"Whisper needs log-mel features padded to {self.num_frames} frames, "
                                 f"got {mel.shape[-1]}.")
        weight = self.encoder.conv1.weight
        return self.encoder([mel.to(weight) for mel in features], [self.num_frames] * len(features))

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def forward(self, input_ids, positions, meta: AttentionMetadata, inputs_embeds=None) -> torch.Tensor:
        """Packed decoder tokens [T] at `positions` -> hidden of `meta.output_rows` (all when None)."""
        x = self.get_input_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.decoder.embed_positions(positions)
        cross, rows = self.cross_keys_values(meta, x.dtype)
        for layer, cross_kv in zip(self.decoder.layers, cross):
            x = layer(x, meta, cross_kv, rows)
        if meta.output_rows is not None:
            x = x[meta.output_rows]
        return self.decoder.layer_norm(x)

    def cross_keys_values(self, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[
            list[tuple[torch.Tensor, torch.Tensor]], CrossRows | None]:
        """The cross-attention K/V of this step's requests, per layer [n, H, S_enc, Dh] over the live
        slots of the model's pool (whisper_cross_kv.py), and the slot of each sequence (None: slot i for
        sequence i). The beams of a request share its slot. A request's K/V are computed at its first step."""
        def compute(states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            states = states.to(dtype)
            return [layer.encoder_attn.keys_values(states) for layer in self.decoder.layers]

        return self.cross_kv.layers(meta.cross_caches, meta.encoder_states, compute)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary (None on tensor-parallel ranks other than 0)."""
        logits = self.proj_out(hidden)
        return None if logits is None else logits.float()

    @torch.inference_mode()
    def decode_dense(self, encoder_states: torch.Tensor, tokens: torch.Tensor, return_cross_attn: bool = False):
        """Decoder over whole token sequences without a cache.

        encoder_states [B, S, D], tokens [B, L] -> (logits [B, L, V] float32, cross-attention
        weights per layer [B, H, L, S] float32 if return_cross_attn else None).
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.decoder.embed_tokens(tokens) + self.decoder.embed_positions(positions)
        encoder_states = encoder_states.to(x.dtype)
        weights = []
        for layer in self.decoder.layers:
            x, w = layer.forward_dense(x, encoder_states, return_cross_attn)
            weights.append(None if w is None else state.all_gather(w, dim=1))     # every rank's heads
        return self.compute_logits(self.decoder.layer_norm(x)), weights if return_cross_attn else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF Whisper names (model.encoder..., model.decoder..., proj_out.weight)."""
        loader, encoder = WeightLoader(self.decoder), []
        for name, tensor in weights:
            if name == "proj_out.weight":
                continue  # tied to model.decoder.embed_tokens.weight
            if name.startswith("model.encoder."):
                encoder.append((name.removeprefix("model.encoder."), tensor))
                continue
            if not name.startswith("model.decoder."):
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
            target = name.removeprefix("model.decoder.").replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2.")
            loader.load(target, tensor, name, QKV if ".self_attn." in target else KV)
        loader.check_complete()
        self.encoder.load_weights(encoder)
