"""Qwen2-Audio on hark: greedy parity with transformers on a tiny random checkpoint, placeholder
expansion, limits, long audio, encoder and prefix caches, precomputed embeddings."""
import glob
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from hark import LLM, SamplingParams
from conftest import CHAT_TEMPLATE, make_byte_tokenizer, randomize

DATA = os.path.join(os.path.dirname(__file__), "data")
AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def speech(seconds: float) -> np.ndarray:
    """Real speech from tests/data, concatenated and repeated to `seconds` (16 kHz float32)."""
    clips = [sf.read(f, dtype="float32")[0] for f in sorted(glob.glob(os.path.join(DATA, "*.wav")))]
    whole = np.concatenate(clips)
    n = int(seconds * 16000)
    return np.tile(whole, n // len(whole) + 1)[:n]


def make_tiny_qwen2_audio(path: str, chat_template: str | None = CHAT_TEMPLATE):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    tok = make_byte_tokenizer(path, AUDIO_TOKENS, chat_template)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tok.eos_token_id),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"), architectures=["Qwen2AudioForConditionalGeneration"])
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)
    randomize(model, std=0.1)
    model.eval()
    model.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_audio"))
    model, tok = make_tiny_qwen2_audio(path)
    return path, model, tok


def reference(model, tok, text: str, audios: list[np.ndarray]) -> list[int]:
    """transformers' own processor and model, one prompt at a time."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tok)
    inputs = processor(text=text, audio=audios or None, return_tensors="pt", sampling_rate=16000)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


CASES = [
    ("no audio here, just text", []),
    (f"{PLACEHOLDER}what is said?", [3.0]),
    (f"first {PLACEHOLDER} then {PLACEHOLDER} compare", [10.0, 30.0]),
    (f"{PLACEHOLDER}the long one", [30.0]),
]


def test_greedy_matches_transformers(ckpt):
    path, model, tok = ckpt
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [(speech(s), 16000) for s in secs]}}
               if secs else text for text, secs in CASES]
    llm = LLM(path, max_num_batched_tokens=512)   # chunked prefill splits the 750-embedding clips
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [reference(model, tok, text, [speech(s) for s in secs]) for text, secs in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    n_audio = [sum(t == model.config.audio_token_index for t in o.prompt_token_ids) for o in outs]
    assert n_audio == [0, 75, 250 + 750, 750]
    runner = llm.llm_engine.executor.runner
    assert runner.encoder_items == 3     # the 30 s clip is encoded once for both prompts that hold it


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_same_clip_twice_runs_encoder_once(ckpt, prefix_caching):
    path, _, _ = ckpt
    llm = LLM(path, enable_prefix_caching=prefix_caching)
    clip = (speech(6.0), 16000)
    first = llm.generate({"prompt": f"{PLACEHOLDER}question one", "multi_modal_data": {"audio": clip}},
                         GREEDY, use_tqdm=False)[0]
    second = llm.generate({"prompt": f"{PLACEHOLDER}another question",
                           "multi_modal_data": {"audio": clip}}, GREEDY, use_tqdm=False)[0]
    engine = llm.llm_engine
    assert engine.executor.runner.encoder_items == 1 and engine.executor.runner.encoder_calls == 1
    assert first.num_cached_tokens == 0
    if prefix_caching:       # the KV of everything before the question (block-aligned) is reused
        assert second.num_cached_tokens == (1 + 150) // 16 * 16
    else:                    # the audio is recomputed in the LM, from the cached encoder output
        assert second.num_cached_tokens == 0
        assert engine.stats()["encoder_cache_hits"] >= 1


def test_uuid_lets_later_requests_omit_the_audio(ckpt):
    path, _, _ = ckpt
    llm = LLM(path)
    clip = (speech(4.0), 16000)
    with_audio = llm.generate({"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio": clip},
                               "multi_modal_uuids": {"audio": "call-17"}}, GREEDY, use_tqdm=False)[0]
    by_name = llm.generate({"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio": None},
                            "multi_modal_uuids": {"audio": "call-17"}}, GREEDY, use_tqdm=False)[0]
    assert by_name.outputs[0].token_ids == with_audio.outputs[0].token_ids
    assert llm.llm_engine.executor.runner.encoder_items == 1
    with pytest.raises(ValueError, match="no audio is known under the uuid 'call-18'"):
        llm.generate({"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio": None},
                      "multi_modal_uuids": {"audio": "call-18"}}, GREEDY, use_tqdm=False)


def test_placeholder_mismatch_and_limits_raise_value_error(ckpt):
    path, _, _ = ckpt
    llm = LLM(path, limit_mm_per_prompt={"audio": 1})
    clip = (speech(2.0), 16000)
    with pytest.raises(ValueError, match="1 audio placeholder"):     # placeholder text, no audio
        llm.generate(f"{PLACEHOLDER} what is this", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="0 audio placeholder"):
        llm.generate({"prompt": "no placeholder", "multi_modal_data": {"audio": clip}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate({"prompt": PLACEHOLDER * 2, "multi_modal_data": {"audio": [clip, clip]}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.generate({"prompt": PLACEHOLDER, "multi_modal_data": {"image": clip}}, GREEDY, use_tqdm=False)
    # the engine is still usable after refused requests
    out = llm.generate({"prompt": f"{PLACEHOLDER}ok", "multi_modal_data": {"audio": clip}}, GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == MAX_NEW


def test_audio_longer_than_30s_is_chunked(ckpt):
    path, _, _ = ckpt
    llm = LLM(path)
    processed = llm.llm_engine.process_prompt({"prompt": f"{PLACEHOLDER}x",
                                               "multi_modal_data": {"audio": (speech(70.0), 16000)}})
    assert [i.num_embeds for i in processed.mm_items] == [750, 750, 250]
    assert processed.placeholder_offsets == [1, 751, 1501]
    assert llm.llm_engine.processor.audio_tokens(70.0) == 1750
    assert llm.llm_engine.max_concurrent_audio_requests() >= 1


def test_precomputed_embeddings_match_audio(ckpt):
    path, _, _ = ckpt
    clip = (speech(5.0), 16000)
    llm = LLM(path, enable_mm_embeds=True)
    engine = llm.llm_engine
    audio_out = llm.generate({"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio": clip}}, GREEDY,
                             use_tqdm=False)[0]
    item = engine.process_prompt({"prompt": PLACEHOLDER, "multi_modal_data": {"audio": clip}}).mm_items[0]
    embeds = engine.executor.model.embed_multimodal([item])[0].detach()
    embeds_out = llm.generate({"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio_embeds": embeds}}, GREEDY,
                              use_tqdm=False)[0]
    assert embeds_out.outputs[0].token_ids == audio_out.outputs[0].token_ids
    for bad, message in [(embeds[:, :10], r"shape \[num_embeds >= 1, 64\]"),
                         (embeds.to(torch.int32), "float32, float16 or bfloat16"),
                         (torch.full_like(embeds, float("nan")), "NaN or infinite"),
                         ([1.0, 2.0], "must be a torch tensor")]:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": PLACEHOLDER, "multi_modal_data": {"audio_embeds": bad}}, GREEDY, use_tqdm=False)
    off = LLM(path)
    with pytest.raises(ValueError, match="enable_mm_embeds=True"):
        off.generate({"prompt": PLACEHOLDER, "multi_modal_data": {"audio_embeds": embeds}}, GREEDY, use_tqdm=False)
