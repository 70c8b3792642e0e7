"""Llama 3.2 Vision (`MllamaForConditionalGeneration`): a tiled ViT (hark.models.mllama_vision), a linear
projector, and a Llama LM in which the layers of `cross_attention_layers` cross-attend to the images
instead of self-attending.

Images never enter the token stream: each `<|image|>` stays one token (its own embedding row; the
embedding table has vocab_size + 8 rows, the LM head vocab_size). Every image's vision output (all
max_num_tiles tiles x (patches + 1) tokens, projected to the LM's width) is an encoder-cache item; a
request's cross-attention K/V are computed from them once, at its first step, in each cross layer
(K through k_norm), and kept in its cross cache.

Which images a token attends is transformers' MllamaProcessor rule (get_cross_attention_token_mask):
image i is seen from its `<|image|>` up to the next image's, the last one to the end; consecutive
images form a group seen together until the group after them. Only an image's real tiles are seen.
Generated tokens see what the last prompt token sees. So a prompt falls into segments of positions
that see the same keys; each segment's K/V are gathered once and attended without a mask.
Tokens before the first image see no image: as in transformers (full_text_row_masked_out_mask), their
cross-attention MLP output is dropped, but their attention is unmasked, over every token of every
image of the prompt, padding tiles included, and still added (vLLM zeroes it; transformers is the
reference here). A prompt without images skips the cross layers entirely.

Cross-attention gates: residual + tanh(attn_gate) * attention, then + tanh(mlp_gate) * MLP.
Checkpoint names: vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*
(or transformers 5's model.vision_model.*, model.language_model.*, lm_head.*).
"""
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hark.inputs import MultiModalItem, ProcessedPrompt
from hark.models.layers import Linear, RMSNorm, RotaryEmbedding
from hark.models.llama import DecoderLayer, SiluGatedMLP
from hark.models.mllama_vision import MllamaVisionTower
from hark.models.weights import WeightLoader
from hark.runner.attention import AttentionMetadata


@dataclass
class Segment:
    """Prompt positions start..end-1 (end None: to the end of the sequence) that see the same image keys."""
    start: int
    end: int | None
    keys: torch.Tensor | None     # indices into the request's vision tokens (None: all of them, no image)

    @property
    def sees_images(self) -> bool:
        return self.keys is not None


@dataclass
class ImageCrossState:
    """What a request cross-attends to: its images' vision tokens one after another, and its segments."""
    states: torch.Tensor | None   # [images * max_tiles * tokens, H]; None without images
    segments: list[Segment]


def attended_spans(offsets: list[int], length: int) -> list[tuple[int, int]]:
    """transformers' get_cross_attention_token_mask on the prompt's image positions: per image, the
    positions start..end-1 that attend it."""
    if len(offsets) == 1:
        return [(offsets[0], length)]
    spans = [[a, b] for a, b in zip(offsets[:-1], offsets[1:])] + [[offsets[-1], length]]
    last_end = spans[-1][1]
    for span in reversed(spans):           # consecutive images attend together to what follows them
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(a, min(b, length)) for a, b in spans]


def image_segments(offsets: list[int], length: int, tiles: list[int], tokens: int, max_tiles: int) -> list[Segment]:
    """The segments of a prompt of `length` tokens with images at `offsets` (tiles[i] real tiles each)."""
    spans = attended_spans(offsets, length)
    cuts = sorted({0, length} | {p for span in spans for p in span if p < length})
    segments: list[Segment] = []
    for start, end in zip(cuts[:-1], cuts[1:]):
        seen = [i for i, (a, b) in enumerate(spans) if a <= start < b]
        keys = torch.cat([i * max_tiles * tokens + torch.arange(tiles[i] * tokens) for i in seen]) if seen else None
        if segments and segments[-1].keys is None and keys is None:
            segments[-1].end = end
            continue
        segments.append(Segment(start, end, keys))
    segments[-1].end = None              # generated tokens see what the last prompt token sees
    return segments


@dataclass
class CrossRun:
    """Rows rows_start..rows_end-1 of a step: one sequence's positions inside one of its segments."""
    rows_start: int
    rows_end: int
    cache: dict                   # the request's cross cache: "kv" -> per cross layer, per segment (K, V)
    segment: int
    sees_images: bool


@dataclass
class CrossPlan:
    """The cross-attending rows of one forward: the runs in row order, the rows they cover (None: every
    row), which of those rows run the MLP (None: all of them), and the attention backend that attends."""
    runs: list[CrossRun]
    rows: torch.Tensor | None
    mlp_rows: torch.Tensor | None
    backend: object


class CrossAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = Linear(config.hidden_size, 2 * self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tokens [S, H] -> K (normed), V [Hkv, S, D], contiguous."""
        k, v = self.kv_proj(states).view(len(states), 2, self.num_kv_heads, self.head_dim).unbind(1)
        return self.k_norm(k).transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()

    def forward(self, x: torch.Tensor, plan: CrossPlan, layer: int) -> torch.Tensor:
        q = self.q_norm(self.q_proj(x).view(len(x), self.num_heads, self.head_dim))
        spans, row = [], 0
        for run in plan.runs:      # the plan's rows are its runs' rows, one after another
            n = run.rows_end - run.rows_start
            spans.append((row, row + n, *run.cache["kv"][layer][run.segment]))
            row += n
        return self.o_proj(plan.backend.cross_forward(q, spans, self.scale).flatten(1))


class CrossAttentionDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.cross_attn = CrossAttention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = SiluGatedMLP(config.hidden_size, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, plan: CrossPlan, layer: int) -> torch.Tensor:
        """x [T, H]: the plan's rows cross-attend; the others pass unchanged."""
        h = x if plan.rows is None else x[plan.rows]
        h = h + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(h), plan, layer)
        gate = self.cross_attn_mlp_gate.tanh()
        if plan.mlp_rows is None:
            h = h + gate * self.mlp(self.post_attention_layernorm(h))
        elif len(plan.mlp_rows):
            h = h.index_add(0, plan.mlp_rows, gate * self.mlp(self.post_attention_layernorm(h[plan.mlp_rows])))
        return h if plan.rows is None else x.index_copy(0, plan.rows, h)


class MllamaForConditionalGeneration(nn.Module):
    is_encoder_decoder = False

    def __init__(self, config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        text = config.text_config
        if getattr(text, "tie_word_embeddings", False):
            raise ValueError("mllama checkpoints with tied word embeddings are not supported.")
        vision = config.vision_config
        self.vision_model = MllamaVisionTower(vision)
        self.multi_modal_projector = Linear(vision.vision_output_dim, text.hidden_size)
        if self.vision_model.output_dim != vision.vision_output_dim:
            raise ValueError(f"vision_output_dim {vision.vision_output_dim} must be hidden_size x (1 + "
                             f"len(intermediate_layers_indices)) = {self.vision_model.output_dim}.")
        self.cross_layers = set(text.cross_attention_layers)
        self.embed_tokens = nn.Embedding(text.vocab_size + 8, text.hidden_size)
        self.layers = nn.ModuleList(CrossAttentionDecoderLayer(text) if i in self.cross_layers
                                    else DecoderLayer(text, qkv_bias=False) for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        self.rope = RotaryEmbedding(text, text.max_position_embeddings)
        self.self_attention = [layer.self_attn for layer in self.layers if isinstance(layer, DecoderLayer)]
        self.cross_attention = [layer.cross_attn for layer in self.layers if isinstance(layer, CrossAttentionDecoderLayer)]
        self.num_kv_layers = len(self.self_attention)
        self.num_kv_heads, self.head_dim = self.self_attention[0].num_kv_heads, self.self_attention[0].head_dim
        self.max_positions = text.max_position_embeddings
        self.logit_pad = max(0, config.image_token_index + 1 - text.vocab_size)

    def kv_attention_modules(self) -> list[nn.Module]:
        return self.self_attention

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    # --- images -------------------------------------------------------------------------------
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One [max_tiles * tokens, H] tensor per image item (features: its tiles [max_tiles, 3, S, S],
        grid_thw: (1, rows, cols) of its canvas); one tower call."""
        pixels = torch.stack([item.features for item in items])
        states = self.vision_model(pixels, [item.grid_thw[1:] for item in items])
        embeds = self.multi_modal_projector(states.flatten(1, 2))
        return [e.clone() for e in embeds.unbind(0)]

    def encoder_state(self, prompt: ProcessedPrompt, outputs: list[torch.Tensor]) -> ImageCrossState:
        """The runner's hook, once per request: its images' vision outputs (in prompt order) and segments."""
        if not outputs:
            return ImageCrossState(None, [])
        tiles = [item.grid_thw[1] * item.grid_thw[2] for item in prompt.mm_items]
        segments = image_segments(list(prompt.placeholder_offsets), len(prompt.prompt_token_ids), tiles,
                                  self.vision_model.tokens, self.vision_model.max_tiles)
        return ImageCrossState(torch.cat(outputs), segments)

    def _cross_plan(self, meta: AttentionMetadata, dtype: torch.dtype) -> CrossPlan:
        """The cross-attending rows of this step, each sequence's chunk cut at its segments; K/V are
        computed here for requests at their first step."""
        runs = []
        for i, state in enumerate(meta.encoder_states):
            if not state.segments:                      # no image: the cross layers skip its rows
                continue
            cache = meta.cross_caches[i]
            if "kv" not in cache:
                cache["kv"] = self._cross_keys_values(state, dtype)
            row0, end = meta.query_start[i], meta.context_lens[i]
            first = end - (meta.query_start[i + 1] - row0)   # position of the chunk's first token
            for s, seg in enumerate(state.segments):
                lo, hi = max(seg.start, first), end if seg.end is None else min(seg.end, end)
                if lo < hi:
                    runs.append(CrossRun(row0 + lo - first, row0 + hi - first, cache, s, seg.sees_images))
        if not runs:
            return CrossPlan([], None, None, meta.backend)
        device = meta.slot_mapping.device
        spans = [torch.arange(r.rows_start, r.rows_end) for r in runs]
        rows = None if sum(map(len, spans)) == meta.query_start[-1] else torch.cat(spans).to(device)
        if all(r.sees_images for r in runs):
            return CrossPlan(runs, rows, None, meta.backend)
        starts = [0] + [int(n) for n in torch.tensor([len(x) for x in spans]).cumsum(0)]
        mlp = [torch.arange(a, b) for r, a, b in zip(runs, starts, starts[1:]) if r.sees_images]
        mlp_rows = (torch.cat(mlp) if mlp else torch.zeros(0, dtype=torch.long)).to(device)
        return CrossPlan(runs, rows, mlp_rows, meta.backend)

    def _cross_keys_values(self, state: ImageCrossState, dtype: torch.dtype) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per cross layer, per segment: the (K, V) that segment's positions attend."""
        states = state.states.to(self.multi_modal_projector.weight.device, dtype)
        layers = []
        for attn in self.cross_attention:
            k, v = attn.keys_values(states)
            keys = [None if seg.keys is None else seg.keys.to(k.device) for seg in state.segments]
            layers.append([(k, v) if i is None else (k[:, i].contiguous(), v[:, i].contiguous()) for i in keys])
        return layers

    # --- the LM -------------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta: AttentionMetadata, inputs_embeds=None) -> torch.Tensor:
        """Hidden states of `meta.output_rows` (all rows when None)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        plan = self._cross_plan(meta, x.dtype) if meta.encoder_states else None
        last = len(self.layers) - 1
        cross = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionDecoderLayer):
                if plan is not None and plan.runs:
                    x = layer(x, plan, cross)
                cross += 1
            else:
                x = layer(x, positions, self.rope, meta, meta.output_rows if i == last else None)
        if isinstance(self.layers[last], CrossAttentionDecoderLayer) and meta.output_rows is not None:
            x = x[meta.output_rows]
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] logits, then -inf up to <|image|> when it lies past the head (as in Llama 3.2): the
        token can never be sampled, and as a prompt token its logprob is -inf."""
        logits = self.lm_head(hidden).float()
        return F.pad(logits, (0, self.logit_pad), value=float("-inf")) if self.logit_pad else logits

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        text = self.config.text_config
        heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
        d = text.hidden_size // heads
        # checkpoint projection -> (fused parameter, first row, rows)
        fused = {"self_attn.q_proj": ("self_attn.qkv_proj", 0, heads * d),
                 "self_attn.k_proj": ("self_attn.qkv_proj", heads * d, kv_heads * d),
                 "self_attn.v_proj": ("self_attn.qkv_proj", (heads + kv_heads) * d, kv_heads * d),
                 "cross_attn.k_proj": ("cross_attn.kv_proj", 0, kv_heads * d),
                 "cross_attn.v_proj": ("cross_attn.kv_proj", kv_heads * d, kv_heads * d),
                 "mlp.gate_proj": ("mlp.gate_up_proj", 0, text.intermediate_size),
                 "mlp.up_proj": ("mlp.gate_up_proj", text.intermediate_size, text.intermediate_size)}
        vision, loader = [], WeightLoader(self, "weight")
        for name, tensor in weights:
            name = name.removeprefix("model.") if name.startswith(("model.vision_model.", "model.multi_modal_projector.")) \
                else name.replace("model.language_model.", "language_model.model.", 1)
            if name in ("lm_head.weight", "language_model.lm_head.weight"):
                loader.copy("lm_head.weight", tensor, name)
            elif name.startswith("vision_model."):
                vision.append((name.removeprefix("vision_model."), tensor))
            elif name.startswith("multi_modal_projector."):
                loader.copy(name, tensor, name)
            elif name.startswith("language_model.model."):
                target = name.removeprefix("language_model.model.")
                parts = target.split(".")
                key = ".".join(parts[2:4])
                if parts[0] == "layers" and key in fused:
                    param, start, rows = fused[key]
                    loader.copy(".".join(parts[:2] + [param, parts[-1]]), tensor, name, slice(start, start + rows))
                else:
                    loader.copy(target, tensor, name)
            else:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        loader.loaded |= {n for n in loader.params if n.startswith("vision_model.")}
        loader.check_complete()
        self.vision_model.load_weights(vision)
