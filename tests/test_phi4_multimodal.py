"""Phi-4-multimodal (speech path) on hark: greedy and logit parity with transformers on a tiny random
checkpoint (partial RoPE, LongRoPE, random feature normalisation) with 0, 1 and 2 real clips of odd
lengths, batched and through chunked prefill; log-mel features, encoder outputs (also past the 500-frame
window, 45 s) and placeholder counts as transformers'; `<|audio_k|>` numbering, chat, the server,
the encoder cache, limits and refusals."""

import numpy as np
import pytest
import torch

from hark import LLM, SamplingParams
from conftest import make_byte_tokenizer, randomize, served_chat_matches_offline, wav_b64, worst_logprob_error
from test_qwen2_audio import speech

AUDIO_TOKEN, IMAGE_TOKEN = "<|endoftext11|>", "<|endoftext10|>"
SPECIAL_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", IMAGE_TOKEN, AUDIO_TOKEN]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
ORIGINAL_MAX = 1024          # LongRoPE's switch point: hark serves up to here
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
SPEECH = speech(60.0)
# 2.79 s and 12.34 s: (44,580 - 400) // 160 + 1 = 277 frames -> 35 embeddings; 1,232 -> 154
CLIP_A, CLIP_B = 44_580, 197_443
EMBEDS = {CLIP_A: 35, CLIP_B: 154}


def clip(samples: int, offset: int = 0) -> np.ndarray:
    return SPEECH[offset: offset + samples]


def make_tiny_phi4(path: str):
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM
    tok = make_byte_tokenizer(path, SPECIAL_TOKENS, CHAT_TEMPLATE)
    rotary_half = 16 * 3 // 4 // 2        # head_dim 16, partial_rotary_factor 0.75
    config = Phi4MultimodalConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL_MAX, original_max_position_embeddings=ORIGINAL_MAX,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0 + 0.3 * i for i in range(rotary_half)],
                         "long_factor": [2.0 + i for i in range(rotary_half)]},
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=4,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                          audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN)),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28,
                           image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN)),
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        architectures=["Phi4MultimodalForCausalLM"])
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(config)
    randomize(model, std=0.1)
    encoder = model.model.embed_tokens_extend.audio_embed.encoder
    randomize(encoder, std=0.05, seed=1)       # audio embeddings that do not swamp the text
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():                       # buffers: randomize leaves them at 0 and 1
        encoder.encoder_embedding.global_mean.copy_(8 + torch.randn(80, generator=g))
        encoder.encoder_embedding.global_invstd.copy_(0.2 + 0.1 * torch.rand(80, generator=g))
    model.eval()
    model.save_pretrained(path)
    return model, tok


def reference_processor(tok):
    """transformers' Phi-4 processor over the test tokenizer (no image processor: it needs torchvision)."""
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalProcessor

    class AudioOnlyProcessor(Phi4MultimodalProcessor):
        def check_argument_for_proper_class(self, name, argument):
            return type(argument)

    for attribute, token in {"audio_token": AUDIO_TOKEN, "image_token": IMAGE_TOKEN}.items():
        setattr(tok, attribute, token)
        setattr(tok, attribute + "_id", tok.convert_tokens_to_ids(token))
    return AudioOnlyProcessor(image_processor=None, audio_processor=Phi4MultimodalFeatureExtractor(), tokenizer=tok)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("phi4_multimodal"))
    model, tok = make_tiny_phi4(path)
    return path, model, tok, reference_processor(tok)


def hf_text(text: str) -> str:
    """The prompt as transformers' processor takes it: the audio token for each `<|audio_k|>` (in order)."""
    import re
    return re.sub(r"<\|audio_\d+\|>", AUDIO_TOKEN, text)


def hf_inputs(processor, text: str, audios: list[np.ndarray]):
    return processor(text=hf_text(text), audio=audios or None, return_tensors="pt", sampling_rate=16000)


def hf_clip_embeds(model, processor, audio: np.ndarray) -> torch.Tensor:
    """transformers' audio embeddings of one clip, as its Phi4MultimodalAudioEmbedding computes them."""
    embed = model.model.embed_tokens_extend.audio_embed
    features = processor.audio_processor(audio, sampling_rate=16000, return_tensors="pt")["audio_input_features"]
    with torch.no_grad():
        hidden = embed.up_proj_for_speech(embed.encoder(features, None))
        return embed.down_proj_for_speech(torch.nn.functional.gelu(hidden))[0]


def hf_inputs_embeds(model, processor, text: str, audios: list[np.ndarray]):
    """(input ids, inputs_embeds) with each clip's embeddings computed on its own (transformers pads the
    clips of one prompt to the longest, and its encoder lets that padding reach the shorter clip)."""
    ids = hf_inputs(processor, text, audios)["input_ids"]
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
    rows = (ids[0] == model.config.audio_config.audio_token_id).nonzero()[:, 0]
    if audios:
        embeds[0, rows] = torch.cat([hf_clip_embeds(model, processor, a) for a in audios])
    return ids, embeds


def reference(model, processor, text: str, audios: list[np.ndarray]) -> list[int]:
    """transformers, one prompt at a time: its processor and model end to end for at most one clip;
    with more, its per-clip audio embeddings fed to its generate."""
    kwargs = dict(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                  pad_token_id=processor.tokenizer.eos_token_id)
    with torch.no_grad():
        if len(audios) <= 1:
            inputs = hf_inputs(processor, text, audios)
            return model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
        ids, embeds = hf_inputs_embeds(model, processor, text, audios)
        return model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()


CASES = [
    ("<|user|>no audio here, just text<|end|><|assistant|>", []),
    ("<|user|><|audio_1|>what is said?<|end|><|assistant|>", [clip(CLIP_A)]),
    ("<|user|>first <|audio_1|> then <|audio_2|> compare<|end|><|assistant|>",
     [clip(CLIP_B, 7_000), clip(CLIP_A + 333, 300_000)]),
]


def prompt_of(text: str, audios: list[np.ndarray]):
    return {"prompt": text, "multi_modal_data": {"audio": [(a, 16000) for a in audios]}} if audios else text


def test_greedy_matches_transformers_batched(ckpt):
    path, model, tok, processor = ckpt
    llm = LLM(path, max_num_batched_tokens=64)        # chunked prefill cuts through the clips
    outs = llm.generate([prompt_of(t, a) for t, a in CASES], GREEDY, use_tqdm=False)
    expected = [reference(model, processor, t, a) for t, a in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len({tuple(e) for e in expected}) == len(expected)        # the clips change the answers
    assert [o.prompt_token_ids for o in outs] == [hf_inputs(processor, t, a)["input_ids"][0].tolist() for t, a in CASES]
    audio_id = model.config.audio_config.audio_token_id
    assert [sum(t == audio_id for t in o.prompt_token_ids) for o in outs] == [0, 35, 154 + 35]
    assert llm.llm_engine.executor.runner.encoder_items == 3


def test_audio_placeholders_name_their_audio(ckpt):
    """`<|audio_2|> .. <|audio_1|>` takes the second audio first, as vLLM's Phi-4 processor does."""
    path, model, tok, processor = ckpt
    text, (b, a) = CASES[2]
    llm = LLM(path)
    swapped = text.replace("<|audio_1|>", "<|audio_x|>").replace("<|audio_2|>", "<|audio_1|>").replace(
        "<|audio_x|>", "<|audio_2|>")
    outs = llm.generate([prompt_of(text, [b, a]), prompt_of(swapped, [a, b])], GREEDY, use_tqdm=False)
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="must name each of its 2 audio"):
        llm.generate(prompt_of("<|audio_1|><|audio_3|>", [a, b]), GREEDY, use_tqdm=False)


def test_features_embeddings_and_counts_match_transformers(ckpt):
    """Log-mel features exactly, encoder + projector outputs per clip (a 45 s clip is past the encoder's
    500-frame window), and the placeholder count for odd lengths."""
    from hark.audio.fbank import log_fbank
    path, model, tok, processor = ckpt
    llm = LLM(path)
    engine = llm.llm_engine
    audio_id = model.config.audio_config.audio_token_id
    for samples in [401, 559, 560, 561, CLIP_A, CLIP_B, 16000 * 45 + 123]:
        audio = clip(samples, 1_000)
        features = processor.audio_processor(audio, sampling_rate=16000, return_tensors="pt")["audio_input_features"]
        assert torch.equal(log_fbank(audio), features[0]), samples
        expected = int((hf_inputs(processor, "<|audio_1|>", [audio])["input_ids"] == audio_id).sum())
        processed = engine.process_prompt({"prompt": "<|audio_1|>", "multi_modal_data": {"audio": (audio, 16000)}})
        assert [i.num_embeds for i in processed.mm_items] == [expected], samples
        assert EMBEDS.get(samples, expected) == expected
        ours = engine.encode(processed.mm_items)[0]
        torch.testing.assert_close(ours, hf_clip_embeds(model, processor, audio), atol=1e-5, rtol=1e-5)


def test_transformers_padding_reaches_the_shorter_clip(ckpt):
    """Why the two-clip reference encodes clip by clip: transformers' batched features and encoder
    give the shorter clip other embeddings than it has alone."""
    path, model, tok, processor = ckpt
    text, audios = CASES[2]
    inputs = hf_inputs(processor, text, audios)
    embed = model.model.embed_tokens_extend.audio_embed
    with torch.no_grad():
        hidden = embed.up_proj_for_speech(embed.encoder(inputs["audio_input_features"], inputs["audio_attention_mask"]))
        batched = embed.down_proj_for_speech(torch.nn.functional.gelu(hidden))
    short = hf_clip_embeds(model, processor, audios[1])
    torch.testing.assert_close(batched[0], hf_clip_embeds(model, processor, audios[0]), atol=1e-5, rtol=1e-5)
    # measured 2e-4 here (the padded keys get +0 instead of +1); rounding alone stays under 1e-6
    assert (batched[1, :short.shape[0]] - short).abs().max() > 2e-5


def test_logits_close_to_transformers(ckpt):
    path, model, tok, processor = ckpt
    text, audios = CASES[2]
    llm = LLM(path)
    out = llm.generate(prompt_of(text, audios), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                               logprobs=3, prompt_logprobs=1), use_tqdm=False)[0]
    ids, embeds = hf_inputs_embeds(model, processor, text, audios)
    generated = torch.tensor([out.outputs[0].token_ids])
    with torch.no_grad():
        embeds = torch.cat((embeds, model.model.embed_tokens(generated)), dim=1)
        ref = torch.log_softmax(model(inputs_embeds=embeds).logits[0].float(), dim=-1)
    assert worst_logprob_error(out, ref) < 1e-5          # measured 1e-6


def test_chat_and_server_match_transformers(ckpt):
    path, model, tok, processor = ckpt
    audio = clip(CLIP_A, 1234)
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(audio), "format": "wav"}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is said?"}]}]
    llm = LLM(path)
    offline = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert offline.outputs[0].token_ids == reference(model, processor, "<|user|><|audio_1|>\nWhat is said?<|end|>"
                                                                       "<|assistant|>", [audio])
    served_chat_matches_offline(llm, "phi4", messages, offline, MAX_NEW)


def test_encoder_cache_limits_and_refusals(ckpt):
    path, model, tok, processor = ckpt
    llm = LLM(path, limit_mm_per_prompt={"audio": 1})
    audio = (clip(CLIP_B), 16000)
    for question in ("question one", "another question"):
        out = llm.generate(prompt_of(f"<|user|><|audio_1|>{question}<|end|><|assistant|>", [audio[0]]), GREEDY,
                           use_tqdm=False)[0]
        assert out.outputs[0].token_ids == reference(model, processor, out.prompt, [audio[0]])
    runner = llm.llm_engine.executor.runner
    assert runner.encoder_items == 1 and runner.encoder_calls == 1
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate(prompt_of("<|audio_1|><|audio_2|>", [audio[0], audio[0]]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="image placeholder"):
        llm.generate("look: <|image_1|>", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="image token"):
        llm.generate(f"look: {IMAGE_TOKEN}", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": audio}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="at least 25 ms"):
        llm.generate(prompt_of("<|audio_1|>", [clip(399)]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="1 audio placeholder"):
        llm.generate("<|audio_1|> without audio", GREEDY, use_tqdm=False)
    assert llm.llm_engine.max_model_len == ORIGINAL_MAX
    with pytest.raises(ValueError, match=f"exceeds the model's {ORIGINAL_MAX} positions"):
        LLM(path, max_model_len=ORIGINAL_MAX + 1)


@pytest.mark.parametrize("chunk_size,left_chunk", [(-1, 18), (16, 2), (7, 0)])
def test_encoder_matches_transformers_with_streaming_masks(chunk_size, left_chunk):
    """hark's conformer against transformers' Phi4MultimodalAudioModel for full attention and for
    chunked (streaming) masks, which transformers adds to the scores as 1 / 0; clips of 12.34 s and
    45 s (two 500-frame windows, the second zero-padded)."""
    from transformers import Phi4MultimodalAudioConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel
    from hark.audio.fbank import log_fbank
    from hark.models.phi4_multimodal import ConformerEncoder
    from hark.models.weights import WeightLoader
    config = Phi4MultimodalAudioConfig(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=4,
                                       ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                                       chunk_size=chunk_size, left_chunk=left_chunk, kernel_size=5)
    torch.manual_seed(0)
    reference = Phi4MultimodalAudioModel(config).eval()
    randomize(reference, std=0.1, seed=3)
    ours = ConformerEncoder(config).eval()
    loader = WeightLoader(ours)
    for name, tensor in reference.state_dict().items():
        loader.copy(name.removeprefix("encoder_embedding."), tensor, name)
    loader.check_complete()
    for samples in (CLIP_B, 16000 * 45 + 123):
        features = log_fbank(clip(samples, 5_000))
        with torch.no_grad():
            expected = reference(features[None], None)[0]
            got = ours([features])[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_feature_extractor_settings_are_checked(tmp_path):
    """A checkpoint's feature extractor settings (processor_config.json's audio_processor) are read:
    transformers' defaults load, a setting hark's features do not follow is refused."""
    import json
    from transformers import Phi4MultimodalFeatureExtractor
    from hark.multimodal.phi4_multimodal import check_feature_extractor, feature_extractor_settings
    settings = Phi4MultimodalFeatureExtractor().to_dict()
    (tmp_path / "processor_config.json").write_text(json.dumps({"audio_processor": settings}))
    assert feature_extractor_settings(str(tmp_path))["audio_compression_rate"] == 8
    check_feature_extractor(feature_extractor_settings(str(tmp_path)), 80, 8)
    with pytest.raises(ValueError, match="audio_feat_stride"):
        check_feature_extractor(dict(settings, audio_feat_stride=2), 80, 8)
    with pytest.raises(ValueError, match="feature_size"):
        check_feature_extractor(settings, 128, 8)


# the speech LoRA's projections: the LM's fused ones (the audio encoder has o_proj / gate_up_proj / down_proj too)
LM_PROJECTIONS = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def test_speech_lora_matches_peft_merged(ckpt, tmp_path):
    """A speech LoRA (peft, on the LM's fused qkv_proj / o_proj / gate_up_proj / down_proj, as
    Phi-4-multimodal's speech-lora) with the base model in one batch: greedy ids as transformers with
    the adapter merged. Needs hark's multi-LoRA (hark.lora)."""
    import dataclasses
    from hark.config import EngineConfig
    if "enable_lora" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        pytest.skip("this hark has no multi-LoRA yet")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import Phi4MultimodalForCausalLM
    from hark.lora import LoRARequest
    path, model, tok, processor = ckpt
    peft_model = get_peft_model(Phi4MultimodalForCausalLM.from_pretrained(path).eval(),
                                LoraConfig(r=8, lora_alpha=16, target_modules=LM_PROJECTIONS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    adapter = str(tmp_path / "speech-lora")
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()
    cases = CASES[:2]
    llm = LLM(path, enable_lora=True, max_lora_rank=8)
    lora = LoRARequest("speech", 1, adapter)
    outs = llm.generate([prompt_of(t, a) for t, a in cases] * 2, GREEDY, use_tqdm=False,
                        lora_request=[lora, lora, None, None])
    with_lora = [reference(merged, processor, t, a) for t, a in cases]
    assert [o.outputs[0].token_ids for o in outs] == with_lora + [reference(model, processor, t, a) for t, a in cases]
    assert with_lora != [o.outputs[0].token_ids for o in outs[2:]]          # the adapter matters
