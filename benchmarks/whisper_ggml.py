"""Writes a CTranslate2 Whisper directory (the weights hark and faster-whisper run) as a whisper.cpp ggml
file, so whisper.cpp runs the very same weights in benchmarks/whisper_cpu.py.

The ggml layout (whisper.cpp's models/ README and its HF converter): int32 magic 0x67676d6c; eleven int32
hyper-parameters (n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx,
n_text_state, n_text_head, n_text_layer, n_mels, ftype 1 = float16); the mel filter bank (int32 n_mels,
int32 n_fft bins, float32 rows); the BPE vocabulary without the special tokens (int32 count, then per
token int32 length and its bytes); then per tensor int32 n_dims, int32 name length, int32 dtype
(0 float32, 1 float16), the dims innermost first, the name and the data. 1-D tensors, the convolution
biases (as [n, 1]) and the positional embeddings are float32, the rest float16; names are openai-whisper's.

    .venv/bin/python benchmarks/whisper_ggml.py CT2_DIR OUT.bin
"""
import json
import os
import struct
import sys

import numpy as np
import torch

GGML_MAGIC = 0x67676D6C
HF_TO_OPENAI = {   # the part of an HF name after model.{encoder,decoder}.layers.N. / model.
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
HF_TOP_LEVEL = {
    "encoder.layer_norm": "encoder.ln_post", "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.layer_norm": "decoder.ln", "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
}
FLOAT32_NAMES = ("encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding",
                 "decoder.positional_embedding")


def openai_name(hf_name: str) -> str:
    side, _, rest = hf_name.removeprefix("model.").partition(".")
    if rest.startswith("layers."):
        _, index, rest = rest.split(".", 2)
        module, _, kind = rest.rpartition(".")
        return f"{side}.blocks.{index}.{HF_TO_OPENAI[module]}.{kind}"
    name = f"{side}.{rest}"
    for hf, openai in HF_TOP_LEVEL.items():
        if name.startswith(hf):
            return openai + name[len(hf):]
    return name


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def write_ggml(ct2_dir: str, out_path: str) -> None:
    from hark.audio.mel import N_FFT, mel_filters
    from hark.models.ct2_whisper import load_ct2_whisper
    config, weights, _, _ = load_ct2_whisper(ct2_dir)
    with open(os.path.join(ct2_dir, "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    chars = byte_decoder()
    with open(out_path, "wb") as out:
        out.write(struct.pack("<12i", GGML_MAGIC, config.vocab_size, config.max_source_positions, config.d_model,
                              config.encoder_attention_heads, config.encoder_layers, config.max_target_positions,
                              config.d_model, config.decoder_attention_heads, config.decoder_layers,
                              config.num_mel_bins, 1))
        filters = mel_filters(config.num_mel_bins, torch.device("cpu")).t().contiguous().numpy().astype(np.float32)
        assert filters.shape == (config.num_mel_bins, N_FFT // 2 + 1)
        out.write(struct.pack("<2i", *filters.shape))
        out.write(filters.tobytes())
        out.write(struct.pack("<i", len(vocab)))
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            data = bytes(chars[c] for c in token)
            out.write(struct.pack("<i", len(data)) + data)
        for hf_name, tensor in weights:
            if hf_name == "proj_out.weight":          # tied to the token embedding
                continue
            name = openai_name(hf_name)
            data = tensor.float().numpy()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(-1, 1)
            as_float32 = data.ndim < 2 or name in FLOAT32_NAMES
            data = data.astype(np.float32 if as_float32 else np.float16)
            encoded = name.encode()
            out.write(struct.pack("<3i", data.ndim, len(encoded), 0 if as_float32 else 1))
            out.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
            out.write(encoded)
            out.write(np.ascontiguousarray(data).tobytes())


if __name__ == "__main__":
    write_ggml(sys.argv[1], sys.argv[2])
