"""Qwen2.5-Omni thinker on hark: greedy and logit parity with transformers on a tiny random
checkpoint (0, 1 and 2 clips of odd sample counts, batched, chunked prefill), placeholder counts
as transformers' processor, 3-D positions as get_rope_index, M-RoPE as transformers' rotary
embedding, chat and the server, encoder and prefix caches, limits."""

import numpy as np
import pytest
import torch

from hark import LLM, SamplingParams
from conftest import make_byte_tokenizer, randomize, served_chat_matches_offline, wav_b64, worst_logprob_error
from test_qwen2_audio import speech

SPECIAL_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>",
                  "<|vision_eos|>"]
TOKEN_ATTRIBUTES = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                    "vision_eos_token": "<|vision_eos|>"}
PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# odd sample counts: 2.79 s -> 279 mel frames (ceil, as transformers) -> 70 embeddings; the others
# end in chunks of odd length (502 = 200 + 200 + 102 frames, 334 = 200 + 134)
CLIP_A, CLIP_B, CLIP_C = 44_580, 80_171, 53_329
EMBEDS = {CLIP_A: 70, CLIP_B: 125, CLIP_C: 83}


def clip(samples: int, offset: int = 0) -> np.ndarray:
    return speech(40.0)[offset: offset + samples]


def make_tiny_omni(path: str):
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
    tok = make_byte_tokenizer(path, SPECIAL_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=64),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],      # transformers' get_rope_index reads it
        eos_token_id=tok.eos_token_id, architectures=["Qwen2_5OmniThinkerForConditionalGeneration"])
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    randomize(model, std=0.1)
    randomize(model.model.audio_tower, std=0.05, seed=1)   # audio embeddings that do not swamp the text
    model.eval()
    model.save_pretrained(path)
    return model, tok


def reference_processor(tok):
    """transformers' Qwen2.5-Omni processor over the test tokenizer (no image / video processors:
    they need PIL and torchvision, and audio prompts never call them)."""
    from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

    class AudioOnlyProcessor(Qwen2_5OmniProcessor):
        def check_argument_for_proper_class(self, name, argument):
            return type(argument)

    for attribute, token in TOKEN_ATTRIBUTES.items():
        setattr(tok, attribute, token)
        setattr(tok, attribute + "_id", tok.convert_tokens_to_ids(token))
    return AudioOnlyProcessor(image_processor=None, video_processor=None,
                              feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_5_omni"))
    model, tok = make_tiny_omni(path)
    return path, model, tok, reference_processor(tok)


def hf_inputs(processor, text: str, audios: list[np.ndarray]):
    return processor(text=text, audio=audios or None, return_tensors="pt", sampling_rate=16000)


def reference(model, processor, text: str, audios: list[np.ndarray]) -> list[int]:
    """transformers' own processor and model, one prompt at a time."""
    inputs = hf_inputs(processor, text, audios)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=processor.tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


CASES = [
    ("no audio here, just text", []),
    (f"{PLACEHOLDER}what is said?", [clip(CLIP_A)]),
    (f"first {PLACEHOLDER} then {PLACEHOLDER} compare", [clip(CLIP_B, 7_000), clip(CLIP_C, 90_000)]),
]


def test_greedy_matches_transformers_batched(ckpt):
    path, model, tok, processor = ckpt
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [(a, 16000) for a in audios]}} if audios else text
               for text, audios in CASES]
    llm = LLM(path, max_num_batched_tokens=96)        # chunked prefill cuts through the clips
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [reference(model, processor, text, audios) for text, audios in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len({tuple(e) for e in expected}) == len(expected)        # the clips change the answers
    audio_id = model.config.audio_token_index
    assert [o.prompt_token_ids for o in outs] == [hf_inputs(processor, t, a)["input_ids"][0].tolist() for t, a in CASES]
    assert [sum(t == audio_id for t in o.prompt_token_ids) for o in outs] == [0, 70, 125 + 83]
    assert llm.llm_engine.executor.runner.encoder_items == 3


def test_placeholder_count_matches_transformers_for_odd_lengths(ckpt):
    path, model, tok, processor = ckpt
    llm = LLM(path)
    for samples in [CLIP_A, CLIP_B, CLIP_C, 401, 479, 481, 639, 641, 16_000 * 30 - 1, 16_000 * 30]:
        audio = clip(samples)
        expected = int((hf_inputs(processor, PLACEHOLDER, [audio])["input_ids"] == model.config.audio_token_index).sum())
        processed = llm.llm_engine.process_prompt({"prompt": PLACEHOLDER, "multi_modal_data": {"audio": (audio, 16000)}})
        assert sum(i.num_embeds for i in processed.mm_items) == expected, samples
        assert EMBEDS.get(samples, expected) == expected


def test_logits_close_to_transformers(ckpt):
    path, model, tok, processor = ckpt
    text, audios = CASES[2]
    llm = LLM(path)
    out = llm.generate({"prompt": text, "multi_modal_data": {"audio": [(a, 16000) for a in audios]}},
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=1),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    inputs = hf_inputs(processor, text, audios)
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        ref = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    assert worst_logprob_error(out, ref) < 1e-5          # measured 1e-6


def test_positions_equal_get_rope_index(ckpt):
    """hark's model computes each prompt's 3-D positions and decode delta as transformers'
    get_rope_index does, both on its text path and on its per-modality path (forced here with an
    empty image grid), for prompts with 0, 1 and 2 clips."""
    path, model, tok, processor = ckpt
    llm = LLM(path)
    engine = llm.llm_engine
    for text, audios in CASES + [(f"{PLACEHOLDER}", [clip(CLIP_A)]), (f"{PLACEHOLDER}x{PLACEHOLDER}",
                                                                     [clip(CLIP_C), clip(CLIP_A, 5)])]:
        processed = engine.process_prompt({"prompt": text, "multi_modal_data": {"audio": [(a, 16000) for a in audios]}})
        positions = engine.executor.model.prompt_positions(processed)
        inputs = hf_inputs(processor, text, audios)
        lengths = inputs["feature_attention_mask"].sum(-1) if audios else None
        for grid in (None, torch.zeros(0, 3, dtype=torch.long)):
            ref, delta = model.get_rope_index(inputs["input_ids"], image_grid_thw=grid, attention_mask=inputs["attention_mask"],
                                              audio_seqlens=lengths)
            assert torch.equal(positions.prompt, ref[:, 0]), text
            assert positions.delta == int(delta[0, 0])
        n = positions.prompt.shape[1]
        assert torch.equal(positions.rows(n - 2, n + 3)[0], torch.arange(n - 2, n + 3) + positions.delta)


def test_multimodal_rope_matches_transformers(ckpt):
    """Positions whose three axes differ (as an image's would) turn each mrope_section band by its own axis."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding, apply_rotary_pos_emb
    from hark.models.layers import MRotaryEmbedding
    path, model, tok, processor = ckpt
    text_config = model.config.text_config
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4000, (3, 37), generator=g)
    q, k = torch.randn(37, 4, 16, generator=g), torch.randn(37, 2, 16, generator=g)
    cos, sin = Qwen2_5OmniRotaryEmbedding(text_config)(q, positions[:, None, :])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    hark_q, hark_k = MRotaryEmbedding(text_config, 4096, [2, 3, 3])(positions, q, k)
    torch.testing.assert_close(hark_q, ref_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hark_k, ref_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_chat_and_server_match_transformers(ckpt):
    path, model, tok, processor = ckpt
    audio = clip(CLIP_A, 1234)
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(audio), "format": "wav"}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is said?"}]}]
    llm = LLM(path, max_model_len=1024)
    offline = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = f"<|im_start|>user\n{PLACEHOLDER}\nWhat is said?<|im_end|>\n<|im_start|>assistant\n"
    assert offline.outputs[0].token_ids == reference(model, processor, text, [audio])
    served_chat_matches_offline(llm, "omni", messages, offline, MAX_NEW)


def test_encoder_cache_prefix_cache_and_limits(ckpt):
    path, model, tok, processor = ckpt
    llm = LLM(path, limit_mm_per_prompt={"audio": 1})
    audio = (clip(CLIP_B), 16000)
    first = llm.generate({"prompt": f"{PLACEHOLDER}question one", "multi_modal_data": {"audio": audio}},
                         GREEDY, use_tqdm=False)[0]
    second = llm.generate({"prompt": f"{PLACEHOLDER}another question", "multi_modal_data": {"audio": audio}},
                          GREEDY, use_tqdm=False)[0]
    runner = llm.llm_engine.executor.runner
    assert runner.encoder_items == 1 and runner.encoder_calls == 1
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == (2 + 125) // 16 * 16
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate({"prompt": PLACEHOLDER * 2, "multi_modal_data": {"audio": [audio, audio]}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="image or video placeholder"):
        llm.generate("look: <|vision_bos|><|IMAGE|><|vision_eos|>", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": audio}}, GREEDY, use_tqdm=False)
    out = llm.generate({"prompt": f"{PLACEHOLDER}ok", "multi_modal_data": {"audio": audio}}, GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference(model, processor, f"{PLACEHOLDER}ok", [audio[0]])


def test_checkpoint_names_of_the_whole_omni_model():
    from hark.models.qwen2_5_omni import checkpoint_name
    assert checkpoint_name("thinker.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert checkpoint_name("thinker.audio_tower.conv1.weight") == "audio_tower.conv1.weight"
    assert checkpoint_name("thinker.lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("model.language_model.norm.weight") == "model.norm.weight"
    assert checkpoint_name("model.audio_tower.proj.bias") == "audio_tower.proj.bias"
    for skipped in ["thinker.visual.blocks.0.attn.qkv.weight", "model.visual.merger.ln_q.weight",
                    "talker.model.layers.0.mlp.up_proj.weight", "token2wav.code2wav_dit_model.x"]:
        assert checkpoint_name(skipped) is None


def test_whole_omni_checkpoint_runs_its_thinker(ckpt, tmp_path):
    """A Qwen2_5OmniModel checkpoint (config with thinker_config, weights under thinker.*, plus the
    talker's and token2wav's, which hark skips) answers as its thinker does."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5OmniConfig
    path, model, tok, processor = ckpt
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(f"{path}/{name}", tmp_path / name)
    with open(f"{path}/config.json") as f:
        Qwen2_5OmniConfig(thinker_config=json.load(f), architectures=["Qwen2_5OmniModel"]).save_pretrained(tmp_path)
    weights = {f"thinker.{name}": t for name, t in load_file(f"{path}/model.safetensors").items()}
    weights["talker.model.norm.weight"] = torch.ones(8)
    weights["token2wav.code2wav_bigvgan_model.conv_pre.weight"] = torch.ones(2, 2)
    save_file(weights, str(tmp_path / "model.safetensors"))
    text, audios = CASES[1]
    out = LLM(str(tmp_path)).generate({"prompt": text, "multi_modal_data": {"audio": (audios[0], 16000)}}, GREEDY,
                                      use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(model, processor, text, audios)
