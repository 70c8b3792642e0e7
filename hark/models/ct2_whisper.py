"""Load a CTranslate2 Whisper directory (model.bin, config.json, vocabulary.txt, tokenizer.json)
as a Hugging Face Whisper checkpoint: config, parameters under HF names, tokenizer, generation config.

model.bin, little-endian: u32 binary version; string spec name; u32 spec revision; u32 variable
count; per variable: string name, u8 rank, u32 x rank dims, u8 dtype, u32 byte count, raw bytes;
then u32 alias count and (alias, target) string pairs. A string is a u16 length counting a
trailing NUL, then the bytes. int8 weights come with a float32 `<name>_scale` per output row:
weight = int8 / scale.
"""

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hark.models.whisper_tokenizer import WhisperTokenizer

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
BF16_CODE = 5
CT2_FLOAT_NAMES = {0: "float32", 4: "float16", 5: "bfloat16"}  # the checkpoint's dtype, for config.dtype
GELU_CODE = 3  # ctranslate2.specs.common_spec.Activation.GELU


class CT2FormatError(ValueError):
    pass


@dataclass
class WhisperConfig:
    """The fields of transformers' WhisperConfig that a CTranslate2 model fixes (the rest keep their
    defaults); hark's Whisper reads only these, so loading one needs no transformers import."""
    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    scale_embedding: bool
    decoder_start_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    suppress_tokens: list | None
    begin_suppress_tokens: list | None
    dtype: str
    activation_function: str = "gelu"
    tie_word_embeddings: bool = True
    architectures: tuple = ("WhisperForConditionalGeneration",)
    model_type: str = "whisper"
    is_encoder_decoder: bool = True

    def to_transformers(self):
        """transformers' WhisperConfig with these fields (imports transformers)."""
        from transformers import WhisperConfig as HFWhisperConfig
        fields = {k: v for k, v in asdict(self).items() if k not in ("model_type", "is_encoder_decoder")}
        return HFWhisperConfig(**{**fields, "architectures": list(self.architectures)})


@dataclass
class CT2Variable:
    shape: tuple[int, ...]
    dtype_code: int
    offset: int  # byte offset of the raw data in model.bin
    nbytes: int


class CT2ModelFile:
    """The variables of a model.bin, read lazily from a memory map.

    The map is private (copy-on-write), so its tensors are writable views of the file and loading
    copies each weight once, from the page cache straight into the model's (float32) parameter: no
    intermediate copy, and the file's pages are dropped when the last view goes."""

    def __init__(self, path: str):
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="c")
        self.pos = 0
        self.version = self._u32()
        self.spec_name = self._string()
        self.spec_revision = self._u32()
        self.variables: dict[str, CT2Variable] = {}
        for _ in range(self._u32()):
            name = self._string()
            rank = self._read("<B")
            shape = tuple(self._u32() for _ in range(rank))
            dtype_code = self._read("<B")
            nbytes = self._u32()
            if dtype_code not in CT2_DTYPES:
                raise CT2FormatError(f"{path}: variable {name} has unknown CTranslate2 dtype {dtype_code}")
            self.variables[name] = CT2Variable(shape, dtype_code, self.pos, nbytes)
            self.pos += nbytes
        self.aliases = {}
        if self.pos < len(self.data):
            for _ in range(self._u32()):
                alias = self._string()
                self.aliases[alias] = self._string()

    def _read(self, fmt: str):
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(fmt, self.data[self.pos : self.pos + size].tobytes())
        self.pos += size
        return value

    def _u32(self) -> int:
        return self._read("<I")

    def _string(self) -> str:
        length = self._read("<H")
        text = self.data[self.pos : self.pos + length - 1].tobytes().decode("utf-8")
        self.pos += length
        return text

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor, as stored (int8 weights stay int8): a view of the memory map."""
        var = self.variables[self.aliases.get(name, name)]
        dtype = np.dtype(CT2_DTYPES[var.dtype_code])
        array = np.frombuffer(self.data, dtype, var.nbytes // dtype.itemsize, var.offset).reshape(var.shape)
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if var.dtype_code == BF16_CODE else tensor

    def scalar(self, name: str) -> int:
        return int(self.raw(name).item())

    def tensor(self, name: str) -> torch.Tensor:
        """A floating-point tensor; int8 weights are dequantized to float32 with their row scales."""
        name = self.aliases.get(name, name)
        tensor = self.raw(name)
        if name + "_scale" not in self:
            return tensor
        scale = self.raw(name + "_scale").float()
        return tensor.float() / scale.view(-1, *([1] * (tensor.dim() - 1)))


def is_ct2_whisper_dir(path: str) -> bool:
    """True when `path` is a CTranslate2 Whisper model directory."""
    model_bin = os.path.join(path, "model.bin")
    if not (os.path.isfile(model_bin) and os.path.isfile(os.path.join(path, "vocabulary.txt"))):
        return False
    with open(model_bin, "rb") as f:
        header = f.read(4 + 2 + 64)
    if len(header) < 6:
        return False
    (length,) = struct.unpack_from("<H", header, 4)
    return header[6 : 6 + length - 1] == b"WhisperSpec"


def _num_layers(model: CT2ModelFile, side: str) -> int:
    pattern = re.compile(rf"{side}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in model.variables if (m := pattern.match(name)))


def _read_vocabulary(path: str) -> list[str]:
    with open(os.path.join(path, "vocabulary.txt"), encoding="utf-8") as f:
        tokens = f.read().split("\n")
    return tokens[:-1] if tokens and tokens[-1] == "" else tokens


def _hf_config(model: CT2ModelFile, vocabulary: list[str], ct2_config: dict) -> WhisperConfig:
    if model.scalar("decoder/activation") != GELU_CODE:
        raise CT2FormatError(f"{model.path}: only GELU Whisper models are supported")
    vocab_size, d_model = model.variables["decoder/embeddings/weight"].shape
    n_mels = model.variables["encoder/conv1/weight"].shape[1]
    eot = vocabulary.index("<|endoftext|>")
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_num_layers(model, "encoder"),
        decoder_layers=_num_layers(model, "decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=model.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=model.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=model.variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=model.variables["decoder/position_encodings/encodings"].shape[0],
        scale_embedding=bool(model.scalar("decoder/scale_embeddings")),
        decoder_start_token_id=vocabulary.index("<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        dtype=CT2_FLOAT_NAMES.get(model.variables["decoder/layer_norm/gamma"].dtype_code, "float32"),
    )


def _split_rows(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(tensor.chunk(parts, dim=0))


def _linear(model: CT2ModelFile, ct2: str, hf: str, bias: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{hf}.weight", model.tensor(f"{ct2}/weight")
    if bias:
        yield f"{hf}.bias", model.tensor(f"{ct2}/bias")


def _layer_norm(model: CT2ModelFile, ct2: str, hf: str) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{hf}.weight", model.tensor(f"{ct2}/gamma")
    yield f"{hf}.bias", model.tensor(f"{ct2}/beta")


def _fused_projections(model: CT2ModelFile, ct2: str, hf: str, names: list[str]):
    """A fused linear (QKV or KV) split into HF's separate projections; k_proj has no bias."""
    weights = _split_rows(model.tensor(f"{ct2}/weight"), len(names))
    biases = _split_rows(model.tensor(f"{ct2}/bias"), len(names))
    for name, weight, bias in zip(names, weights, biases):
        yield f"{hf}.{name}.weight", weight
        if name != "k_proj":
            yield f"{hf}.{name}.bias", bias


def _state_dict(model: CT2ModelFile, config: WhisperConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for side, num_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf_side = f"model.{side}"
        if side == "encoder":
            yield from _linear(model, "encoder/conv1", f"{hf_side}.conv1")
            yield from _linear(model, "encoder/conv2", f"{hf_side}.conv2")
        else:
            yield f"{hf_side}.embed_tokens.weight", model.tensor("decoder/embeddings/weight")
        yield f"{hf_side}.embed_positions.weight", model.tensor(f"{side}/position_encodings/encodings")
        yield from _layer_norm(model, f"{side}/layer_norm", f"{hf_side}.layer_norm")
        for i in range(num_layers):
            ct2, hf = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            yield from _layer_norm(model, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            yield from _fused_projections(
                model, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ["q_proj", "k_proj", "v_proj"])
            yield from _linear(model, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            if side == "decoder":
                yield from _layer_norm(model, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
                yield from _linear(model, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                yield from _fused_projections(
                    model, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ["k_proj", "v_proj"])
                yield from _linear(model, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
            yield from _layer_norm(model, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
            yield from _linear(model, f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            yield from _linear(model, f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    projection = "decoder/projection/weight" if "decoder/projection/weight" in model else "decoder/embeddings/weight"
    yield "proj_out.weight", model.tensor(projection)


def _tokenizer(path: str, vocabulary: list[str]) -> WhisperTokenizer:
    try:
        return WhisperTokenizer(path, vocabulary)
    except ValueError as e:
        raise CT2FormatError(str(e)) from None


def _generation_config(vocabulary: list[str], config: WhisperConfig, ct2_config: dict) -> dict:
    """The fields of HF's Whisper generation_config.json."""
    ids = {token: i for i, token in enumerate(vocabulary)}
    is_multilingual = config.vocab_size >= 51865
    generation = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [])),
        "alignment_heads": [list(h) for h in ct2_config.get("alignment_heads", [])],
        "max_initial_timestamp_index": 50,
        "max_length": config.max_target_positions,
        "is_multilingual": is_multilingual,
    }
    if is_multilingual:
        generation["lang_to_id"] = {vocabulary[i]: i for i in ct2_config.get("lang_ids", [])}
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return generation


def load_ct2_whisper(path: str):
    """Read a CTranslate2 Whisper directory.

    Returns (hf_config: WhisperConfig (hark's, `.to_transformers()` for transformers'), weights:
    iterator of (HF parameter name, tensor), tokenizer: WhisperTokenizer with timestamp tokens
    (`.to_transformers()` for a WhisperTokenizerFast), generation_config: dict in the format of HF's
    generation_config.json). Weights come in their stored float dtype (int8
    ones dequantized to float32); the caller casts.
    """
    if not is_ct2_whisper_dir(path):
        raise CT2FormatError(f"{path} is not a CTranslate2 Whisper directory (model.bin + vocabulary.txt)")
    model = CT2ModelFile(os.path.join(path, "model.bin"))
    config_path = os.path.join(path, "config.json")
    ct2_config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            ct2_config = json.load(f)
    vocabulary = _read_vocabulary(path)
    config = _hf_config(model, vocabulary, ct2_config)
    if len(vocabulary) != config.vocab_size:
        raise CT2FormatError(
            f"{path}: vocabulary.txt has {len(vocabulary)} tokens but model.bin has {config.vocab_size} embeddings")
    return config, _state_dict(model, config), _tokenizer(path, vocabulary), _generation_config(
        vocabulary, config, ct2_config)
