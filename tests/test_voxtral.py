"""Voxtral on hark: greedy and logit parity with transformers' VoxtralForConditionalGeneration on a
tiny random checkpoint (0, 1 and 2 clips of odd sample counts, one over 30 s, batched), placeholder
counts as mistral_common writes them, features as transformers' VoxtralProcessor builds them, the
tekken tokenizer, chat, a served transcription, encoder and prefix caches, limits.

The tokenizer is a tiny tekken.json (Mistral's format) with Voxtral's special tokens at their ranks;
hark loads it through transformers' tekken converter (mistral_common is not installed here). The
reference prompts are built as mistral_common's instruct tokenizer writes them:
<s>[INST]([BEGIN_AUDIO][AUDIO]*375k | text)*[/INST].
"""
import base64
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import soundfile as sf
import torch

from hark import LLM, SamplingParams
from conftest import randomize, wav_b64, worst_logprob_error
from test_qwen2_audio import speech

# Voxtral's tekken special tokens (ranks 0..): the ones hark uses sit where Voxtral's tekken.json has them
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
            "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"] + \
           [f"<SPECIAL_{i}>" for i in range(20, 24)] + ["[AUDIO]", "[BEGIN_AUDIO]"] + \
           [f"<SPECIAL_{i}>" for i in range(26, 32)] + ["[ARGS]", "[CALL_ID]", "[TRANSCRIBE]"]
BOS, INST, END_INST, AUDIO, BEGIN_AUDIO, TRANSCRIBE = 1, 3, 4, 24, 25, 34
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
WINDOW = 480_000
# odd sample counts: 2.79 s, 12.34 s (+ 1), 31.7 s (+ 3): 375, 375 and 750 audio tokens
CLIP_A, CLIP_B, CLIP_C = 44_640, 197_441, 507_203


def clip(samples: int, offset: int = 0) -> np.ndarray:
    return speech(max(40.0, (offset + samples) / 16000 + 1))[offset: offset + samples]


def write_tekken(path: str) -> None:
    """A tiny tekken.json: the specials above, the 256 bytes and a few merges."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"in", b" t", b"the", b" the", b"at"]
    vocab = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
             for i, t in enumerate(tokens)]
    specials = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(SPECIALS)]
    config = {"pattern": PATTERN, "num_vocab_tokens": len(tokens) + len(SPECIALS),
              "default_vocab_size": len(tokens) + len(SPECIALS), "default_num_special_tokens": len(SPECIALS),
              "version": "v7"}
    with open(f"{path}/tekken.json", "w") as f:
        json.dump({"config": config, "vocab": vocab, "special_tokens": specials}, f)


def make_tiny_voxtral(path: str):
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration
    from hark.models.voxtral import read_tokenizer
    write_tekken(path)
    tok = read_tokenizer(path)
    config = VoxtralConfig(
        audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_theta=100_000_000.0),
        audio_token_id=AUDIO, architectures=["VoxtralForConditionalGeneration"])
    torch.manual_seed(0)
    model = VoxtralForConditionalGeneration(config)
    randomize(model, std=0.1)
    randomize(model.model.audio_tower, std=0.05, seed=1)    # audio embeddings that do not swamp the text
    model.eval()
    model.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("voxtral"))
    model, tok = make_tiny_voxtral(path)
    return path, model, tok


def features(audios: list[np.ndarray]) -> torch.Tensor:
    """transformers' VoxtralProcessor features: its own _retrieve_input_features with its audio_kwargs."""
    from transformers import VoxtralProcessor, WhisperFeatureExtractor
    host = SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=128))
    return VoxtralProcessor._retrieve_input_features(host, audios, 3000, sampling_rate=16000, padding=True,
                                                     truncation=False, pad_to_multiple_of=WINDOW, return_tensors="pt")


def audio_ids(samples: int) -> list[int]:
    """mistral_common's AudioEncoder: [BEGIN_AUDIO] + [AUDIO] x 375 per (padded) 30 s window."""
    return [BEGIN_AUDIO] + [AUDIO] * (375 * math.ceil(samples / WINDOW))


def prompt_ids(tok, parts: list) -> list[int]:
    """<s>[INST]parts[/INST], each part text or an audio clip, as mistral_common's v7 user message."""
    ids = [BOS, INST]
    for part in parts:
        ids += audio_ids(len(part)) if isinstance(part, np.ndarray) else tok.encode(part, add_special_tokens=False)
    return ids + [END_INST]


def reference(model, ids: list[int], audios: list[np.ndarray], max_new: int = MAX_NEW) -> list[int]:
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if audios:
        inputs["input_features"] = features(audios)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def hark_prompt(tok, parts: list) -> dict:
    """The same prompt as text with [BEGIN_AUDIO][AUDIO] placeholders and the clips in multi_modal_data."""
    text = "<s>[INST]" + "".join("[BEGIN_AUDIO][AUDIO]" if isinstance(p, np.ndarray) else p for p in parts) + "[/INST]"
    audios = [(p, 16000) for p in parts if isinstance(p, np.ndarray)]
    return {"prompt": text, "multi_modal_data": {"audio": audios}} if audios else text


CASES = [
    ["no audio here, just text"],
    [clip(CLIP_A), "What is said?"],
    ["first", clip(CLIP_B, 7_000), "then", clip(CLIP_C, 90_000), "compare"],
]


def test_greedy_matches_transformers_batched(ckpt):
    path, model, tok = ckpt
    llm = LLM(path, max_num_batched_tokens=512, max_model_len=2048)     # chunked prefill cuts through the clips
    outs = llm.generate([hark_prompt(tok, parts) for parts in CASES], GREEDY, use_tqdm=False)
    expected = [reference(model, prompt_ids(tok, parts), [p for p in parts if isinstance(p, np.ndarray)])
                for parts in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len({tuple(e) for e in expected}) == len(expected)        # the clips change the answers
    assert [o.prompt_token_ids for o in outs] == [prompt_ids(tok, parts) for parts in CASES]
    assert [sum(t == AUDIO for t in o.prompt_token_ids) for o in outs] == [0, 375, 375 + 750]
    assert llm.llm_engine.executor.runner.encoder_items == 4       # 1 + 1 + 2 windows


def test_placeholder_counts_and_features_match_transformers(ckpt):
    """375 audio tokens per padded 30 s window for any length; each window's features are
    transformers' VoxtralProcessor's (one log-mel over the padded clip, cut into 3000 frames)."""
    path, model, tok = ckpt
    engine = LLM(path).llm_engine
    for samples in [CLIP_A, CLIP_B, CLIP_C, 401, 479_999, 480_000, 480_001, 960_001]:
        audio = clip(samples)
        processed = engine.process_prompt({"prompt": "[BEGIN_AUDIO][AUDIO]", "multi_modal_data": {"audio": (audio, 16000)}})
        assert processed.prompt_token_ids == audio_ids(samples), samples
        assert engine.processor.audio_tokens(samples / 16000) == 375 * math.ceil(samples / WINDOW)
        if samples in (CLIP_A, CLIP_C, 960_001):
            ref = features([audio])
            got = torch.stack([item.features for item in processed.mm_items])
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)      # measured 1.2e-7


def test_logits_close_to_transformers(ckpt):
    path, model, tok = ckpt
    parts = CASES[2]
    out = LLM(path, max_model_len=2048).generate(
        hark_prompt(tok, parts), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3,
                                                prompt_logprobs=1), use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), input_features=features([p for p in parts
                                                                               if isinstance(p, np.ndarray)])).logits
    ref = torch.log_softmax(logits[0].float(), dim=-1)
    assert worst_logprob_error(out, ref) < 1e-5          # measured 1e-6


def test_chat_as_mistral_common_writes_it(ckpt):
    path, model, tok = ckpt
    audio = clip(CLIP_A, 1234)
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(audio), "format": "wav"}}
    llm = LLM(path, max_model_len=1024)
    out = llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "What is said?"}]}], GREEDY,
                   use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt_ids(tok, [audio, "What is said?"])
    assert out.outputs[0].token_ids == reference(model, out.prompt_token_ids, [audio])
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "again"}]
    text_only = llm.chat(turns, GREEDY, use_tqdm=False)[0]
    enc = lambda s: tok.encode(s, add_special_tokens=False)     # noqa: E731
    assert text_only.prompt_token_ids == [BOS, INST, *enc("hi"), END_INST, *enc("hello"), 2, INST, *enc("again"),
                                          END_INST]


def transcription_ids(tok, audio: np.ndarray, language: str | None) -> list[int]:
    """vLLM's Voxtral transcription prompt (mistral_common's encode_transcription)."""
    lang = tok.encode(f"lang:{language}", add_special_tokens=False) if language else []
    return [BOS, INST, *audio_ids(len(audio)), END_INST, *lang, TRANSCRIBE]


def test_served_transcription_and_chat(ckpt):
    from hark.engine.async_engine import AsyncLLMEngine
    from hark.server.app import BackgroundServer, build_app
    from hark.server.metrics import Metrics
    from hark.server.state import ServedModel
    path, model, tok = ckpt
    audio = clip(CLIP_A, 555)
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="FLOAT")
    wav = buf.getvalue()
    llm = LLM(path, max_model_len=420)      # room for ~30 new tokens: the random model never says </s>
    ids = transcription_ids(tok, audio, "en")
    offline = llm.generate({"prompt_token_ids": [BOS, INST, BEGIN_AUDIO, AUDIO, END_INST, *ids[ids.index(END_INST) + 1:]],
                            "multi_modal_data": {"audio": (audio, 16000)}},
                           SamplingParams(temperature=0.0, max_tokens=420 - len(ids)), use_tqdm=False)[0]
    assert offline.prompt_token_ids == ids
    assert offline.outputs[0].token_ids == reference(model, ids, [audio], max_new=420 - len(ids))
    metrics = Metrics()
    app = build_app([ServedModel("voxtral", AsyncLLMEngine(llm.llm_engine), metrics)], metrics)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.audio.transcriptions.create(model="voxtral", file=("a.wav", wav), language="en")
        assert r.text == offline.outputs[0].text.strip()
        text = client.audio.transcriptions.create(file=("a.wav", wav), model="voxtral", language="en",
                                                  response_format="text")
        assert text.strip() == r.text
        untagged = llm.llm_engine.processor.transcription_prompt(audio, None)
        assert untagged.prompt_token_ids == transcription_ids(tok, audio, None)
        for bad in [dict(response_format="srt"), dict(language="english!")]:
            with pytest.raises(openai.BadRequestError):
                client.audio.transcriptions.create(model="voxtral", file=("a.wav", wav), **bad)
        with pytest.raises(openai.BadRequestError, match="does not translate"):
            client.audio.translations.create(model="voxtral", file=("a.wav", wav))
        chat = client.chat.completions.create(model="voxtral", temperature=0, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav_b64(audio), "format": "wav"}},
                                         {"type": "text", "text": "hi"}]}])
        assert chat.usage.prompt_tokens == len(prompt_ids(tok, [audio, "hi"]))


def test_encoder_cache_prefix_cache_and_limits(ckpt):
    path, model, tok = ckpt
    llm = LLM(path, limit_mm_per_prompt={"audio": 1}, max_model_len=1024)
    audio = clip(CLIP_B)
    first = llm.generate(hark_prompt(tok, [audio, "question one"]), GREEDY, use_tqdm=False)[0]
    second = llm.generate(hark_prompt(tok, [audio, "another question"]), GREEDY, use_tqdm=False)[0]
    runner = llm.llm_engine.executor.runner
    assert runner.encoder_items == 1 and runner.encoder_calls == 1
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == (3 + 375) // 16 * 16
    other = llm.generate(hark_prompt(tok, [clip(CLIP_B, 3), "question one"]), GREEDY, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0            # same token ids, other audio: no prefix hit
    assert other.outputs[0].token_ids == reference(model, other.prompt_token_ids, [clip(CLIP_B, 3)])
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate(hark_prompt(tok, [audio, "x", audio]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="placeholder"):
        llm.generate({"prompt": "<s>[INST]no placeholder[/INST]", "multi_modal_data": {"audio": (audio, 16000)}},
                     GREEDY, use_tqdm=False)


def test_checkpoint_names():
    from hark.models.qwen2_audio import legacy_name
    assert legacy_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "language_model.model.layers.0.mlp.up_proj.weight"
    assert legacy_name("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    assert legacy_name("lm_head.weight") == "language_model.lm_head.weight"


def test_published_layout_loads(ckpt, tmp_path):
    """The hub layout: weights under the published names in indexed shards, next to a
    consolidated.safetensors (Mistral's own format, other names) that hark must not read; tekken.json only."""
    import shutil
    from safetensors.torch import load_file, save_file
    from hark.models.qwen2_audio import legacy_name
    path, model, tok = ckpt
    for name in ["config.json", "tekken.json"]:
        shutil.copy(f"{path}/{name}", tmp_path / name)
    weights = {legacy_name(n): t for n, t in load_file(f"{path}/model.safetensors").items()}
    assert {n.split(".")[0] for n in weights} == {"audio_tower", "multi_modal_projector", "language_model"}
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k].contiguous() for k in keys}, str(tmp_path / shard))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}, f)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(tmp_path / "consolidated.safetensors"))
    parts = CASES[1]
    out = LLM(str(tmp_path), max_model_len=1024).generate(hark_prompt(tok, parts), GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(model, prompt_ids(tok, parts), [parts[0]])


def test_offline_transcribe(ckpt):
    """LLM.transcribe with Voxtral: its transcription prompt, generated greedy until </s> or the model length."""
    path, model, tok = ckpt
    audio, long_audio = clip(CLIP_A, 555), clip(CLIP_C, 11)
    llm = LLM(path, max_model_len=800)
    results = llm.transcribe([(audio, 16000), (long_audio, 16000)], language="en")
    for result, a in zip(results, [audio, long_audio]):
        ids = transcription_ids(tok, a, "en")
        tail = ids[ids.index(END_INST) + 1:]
        offline = llm.generate({"prompt_token_ids": [BOS, INST, BEGIN_AUDIO, AUDIO, END_INST, *tail],
                                "multi_modal_data": {"audio": (a, 16000)}},
                               SamplingParams(temperature=0.0, max_tokens=800 - len(ids)), use_tqdm=False)[0]
        assert offline.outputs[0].token_ids == reference(model, ids, [a], max_new=800 - len(ids))
        assert result.text == offline.outputs[0].text.strip()
        assert result.duration == pytest.approx(len(a) / 16000, abs=1e-3) and result.language == "en"
    with pytest.raises(ValueError, match="does not translate"):
        llm.transcribe((audio, 16000), task="translate")
    with pytest.raises(ValueError, match="word_timestamps"):
        llm.transcribe((audio, 16000), word_timestamps=True)


def test_checkpoint_errors_are_clear(ckpt, tmp_path):
    import shutil
    from transformers import VoxtralConfig
    from hark.models.voxtral import VoxtralForConditionalGeneration
    path, model, tok = ckpt
    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="neither tokenizer.json nor tekken.json"):
        LLM(str(tmp_path))
    bad = VoxtralConfig(audio_config=dict(hidden_size=32, intermediate_size=100, num_attention_heads=4),
                        text_config=dict(vocab_size=300, hidden_size=64), audio_token_id=AUDIO)
    with pytest.raises(ValueError, match="intermediate_size 100 must be a multiple of d_model 32"):
        VoxtralForConditionalGeneration(bad)
