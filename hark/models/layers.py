"""Building blocks shared by hark's models: linear layers, norms, rotary embeddings, row blocks."""
import torch
from torch import nn

from hark.lora.rows import row_window

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# dtypes whose weights are packed: bfloat16 only where the CPU has bf16 instructions oneDNN uses
PACKED_DTYPES = {torch.float32}
if ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported():
    PACKED_DTYPES.add(torch.bfloat16)


class Linear(nn.Linear):
    """nn.Linear that, in float32 (or bfloat16) inference on CPU, multiplies by a copy of its weight
    packed in oneDNN's blocked layout (made on first use, again whenever the weight changes). On this
    project's 2-core EPYC (1 thread) that measured 1.6x faster than nn.Linear for a 151936-token
    vocabulary projection of 64 rows and 1.1-1.45x for a decoder layer's projections (bfloat16:
    1.1-1.5x). It holds a second copy of the weight."""

    packed = packed_for = None
    lora = None          # with LoRA enabled: a hark.lora.layer.LinearLoRA adding each adapter's update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x)
        return out if self.lora is None else self.lora(x, out)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (ONEDNN and w.device.type == "cpu" and w.dtype == x.dtype and w.dtype in PACKED_DTYPES
                and not torch.is_grad_enabled()):
            return super().forward(x)
        if self.packed_for != (w.data_ptr(), w._version):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self.packed_for = (w.data_ptr(), w._version)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE (default, linear, llama3, yarn...)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))     # Phi-3 / Phi-4: the first dims only
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' is not supported; use a checkpoint with static RoPE scaling.")
    return ROPE_INIT_FUNCTIONS[rope_type](config)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table indexed by position. With a partial rotary
    factor the table is narrower than a head: only the first dims turn, the rest pass through."""

    def __init__(self, config, max_positions: int):
        super().__init__()
        inv_freq, scaling = rope_inv_freq(config)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)   # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        d = cos.shape[-1]
        if d < q.shape[-1]:
            return (torch.cat((q[..., :d] * cos + rotate_half(q[..., :d]) * sin, q[..., d:]), dim=-1),
                    torch.cat((k[..., :d] * cos + rotate_half(k[..., :d]) * sin, k[..., d:]), dim=-1))
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL, Qwen2.5-Omni): each token has three positions (time, height,
    width) and the rotary frequencies are split into mrope_section bands, band i turned by
    position i % 3. positions [3, T] (or [T]: the same on all three axes, which is plain RoPE)."""

    def __init__(self, config, max_positions: int, mrope_section: list[int]):
        super().__init__(config, max_positions)
        half = self.cos.shape[-1] // 2
        if sum(mrope_section) != half:
            raise ValueError(f"mrope_section {mrope_section} must add up to head_dim / 2 = {half}.")
        band = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])
        self.register_buffer("axis", torch.cat((band, band)), persistent=False)   # [D]: which position

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if positions.ndim == 1:
            positions = positions.expand(3, -1)
        index = positions[self.axis].t()                       # [T, D]: the position each dim turns by
        cos = self.cos.gather(0, index).unsqueeze(1).to(q.dtype)
        sin = self.sin.gather(0, index).unsqueeze(1).to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# glibc hands out allocations over 32 MB as fresh mmap pages every time, and page-faulting them in
# costs as much as a GEMM: a 2048-row prefill chunk of a 4864-wide MLP made 80 MB of gate/up output
# per layer (1.8 s of 20 s prefill in benchmarks/audio_chat.py). Row blocks that keep the widest
# temporary under this size are reused from the heap instead, and their GEMMs are as efficient.
TEMP_BYTES = 24 << 20


def by_row_blocks(fn, x: torch.Tensor, width: int) -> torch.Tensor:
    """fn(x) for a row-wise, shape-preserving fn whose widest temporary is [rows, width], computed
    in row blocks that keep that temporary under TEMP_BYTES."""
    rows = max(64, TEMP_BYTES // (width * x.element_size()))
    if x.shape[0] <= rows:
        return fn(x)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], rows):
        with row_window(x.shape[0], start):       # LoRA linears inside see this block's rows
            out[start:start + rows] = fn(x[start:start + rows])
    return out
