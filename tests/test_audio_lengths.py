"""Clips of real speech whose lengths are not a whole number of 10 ms hops, given at 16 kHz and at
8, 22.05, 44.1 and 48 kHz, through Qwen2-Audio, Ultravox and Whisper against transformers:
placeholder counts (prompt ids), features, embeddings, greedy ids and their logprobs.

Audio at another rate goes to hark as (samples, rate), resampled by hark as a user's audio is
(load_audio, soxr HQ); the reference is given the 16 kHz samples hark's load_audio produced.
hark runs each model's prompts as one batch; the reference runs one prompt at a time.
"""
import numpy as np
import pytest
import soxr
import torch
from transformers import WhisperFeatureExtractor

from hark import LLM, SamplingParams
from hark.audio import load_audio
from test_qwen2_audio import PLACEHOLDER, make_tiny_qwen2_audio, speech
from test_ultravox import make_tiny_ultravox
from test_whisper_model import EOT, NO_TIMESTAMPS, SOT, checkpoint  # noqa: F401  (checkpoint: a fixture)

MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
SPEECH = speech(75.0)

# name -> (sample rate, samples at that rate): 2.79 s is the 44,580 samples of issue #11
CLIPS = {
    "2.79 s": (16000, 44_580), "12.34 s": (16000, 197_443), "29.99 s": (16000, 479_839),
    "30.01 s": (16000, 480_161), "8 kHz 3.21 s": (8000, 25_683), "22.05 kHz 12.34 s": (22050, 272_099),
    "44.1 kHz 2.79 s": (44100, 123_041), "48 kHz 29.99 s": (48000, 1_439_531),
}
PROMPTS = [[], ["2.79 s"], ["12.34 s", "29.99 s"], ["30.01 s"], ["8 kHz 3.21 s", "44.1 kHz 2.79 s"],
           ["22.05 kHz 12.34 s"], ["48 kHz 29.99 s"]]


def clip(name: str) -> tuple[np.ndarray, int]:
    """(samples, rate) of real speech, starting at a different point for each clip."""
    rate, n = CLIPS[name]
    start = 16000 * list(CLIPS).index(name)
    source = SPEECH[start: start + int(n * 16000 / rate) + 64]
    if rate != 16000:
        source = soxr.resample(source, 16000, rate, quality="HQ")
    assert len(source) >= n
    return source[:n].astype(np.float32), rate


def at_16k(name: str) -> np.ndarray:
    """The 16 kHz samples hark makes of the clip."""
    return load_audio(clip(name), target_sr=16000)


def test_clips_have_odd_lengths():
    lengths = {name: len(at_16k(name)) for name in CLIPS}
    assert all(n % 160 for n in lengths.values())
    assert lengths["2.79 s"] == 44_580 and lengths["8 kHz 3.21 s"] == 51_366


def logprobs(output) -> list[float]:
    return [next(iter(step.values())).logprob for step in output.outputs[0].logprobs]


def reference_logprobs(logits: tuple[torch.Tensor, ...], ids: list[int]) -> list[float]:
    return [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(logits, ids)]


# --- Qwen2-Audio: transformers' own processor and model -------------------------------------------
@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_audio_lengths"))
    model, tok = make_tiny_qwen2_audio(path)
    return path, model, tok


def qwen2_audio_reference(model, tok, text: str, audios: list[np.ndarray]):
    """(prompt ids, greedy ids, their logprobs). The processor truncates audio to 30 s."""
    from transformers import Qwen2AudioProcessor
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tok)
    inputs = processor(text=text, audio=audios or None, return_tensors="pt", sampling_rate=16000)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), ids, reference_logprobs(out.logits, ids)


def test_qwen2_audio_matches_transformers_at_any_length_and_rate(qwen2_audio):
    path, model, tok = qwen2_audio
    texts = [" and ".join(f"Audio {i + 1}: {PLACEHOLDER}" for i in range(len(names))) + " what is said?"
             for names in PROMPTS]
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [clip(n) for n in names]}} if names else text
               for text, names in zip(texts, PROMPTS)]
    outs = LLM(path, max_num_batched_tokens=1024).generate(prompts, GREEDY, use_tqdm=False)
    for out, text, names in zip(outs, texts, PROMPTS):
        prompt_ids, ids, ref_logprobs = qwen2_audio_reference(model, tok, text, [at_16k(n) for n in names])
        assert out.prompt_token_ids == prompt_ids, names          # the same number of audio tokens, in place
        assert list(out.outputs[0].token_ids) == ids, names
        np.testing.assert_allclose(logprobs(out), ref_logprobs, atol=2e-4, rtol=0)
    n_audio = [sum(t == model.config.audio_token_index for t in o.prompt_token_ids) for o in outs]
    assert n_audio[:4] == [0, 70, 309 + 750, 750]                 # 2.79 s: 279 mel frames -> 70 (not 69)


# --- Ultravox: the composed reference of test_ultravox (fixie-ai's processor and encoder) ----------
@pytest.fixture(scope="module")
def ultravox(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ultravox_lengths"))
    return path, make_tiny_ultravox(path, ln_mid=True, separate_lm=False)


def test_ultravox_matches_reference_at_any_length_and_rate(ultravox):
    path, ref = ultravox
    texts = [" and ".join("<|audio|>" for _ in names) + " what is said?" for names in PROMPTS]
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [clip(n) for n in names]}} if names else text
               for text, names in zip(texts, PROMPTS)]
    llm = LLM(path, max_num_batched_tokens=1024)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    for out, text, names in zip(outs, texts, PROMPTS):
        assert list(out.outputs[0].token_ids) == ref.generate(text, [at_16k(n) for n in names]), names
    for name in CLIPS:
        items = engine.process_prompt({"prompt": "<|audio|>", "multi_modal_data": {"audio": clip(name)}}).mm_items
        with torch.no_grad():
            ours, theirs = torch.cat(engine.executor.model.embed_multimodal(items)), ref.embed(at_16k(name))
        assert ours.shape == theirs.shape, name                   # ceil(ceil(samples / 160) / 16) embeddings
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    n_audio = [sum(t == ref.audio_token_id for t in o.prompt_token_ids) for o in outs]
    assert n_audio[:4] == [0, 18, 78 + 188, 189]                  # 30.01 s: 188 + 1 from the last 161 samples


# --- Whisper: transformers' feature extractor and model --------------------------------------------
WHISPER_CLIPS = [n for n in CLIPS if n != "30.01 s"]          # a Whisper prompt takes at most 30 s


def test_whisper_features_and_greedy_ids_match_transformers(checkpoint):  # noqa: F811
    from transformers import GenerationConfig, GenerationMixin
    hf, _, path = checkpoint
    llm = LLM(model=str(path), max_num_seqs=8)
    prefix = [SOT, NO_TIMESTAMPS]
    prompts = [{"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": clip(n)}}, "decoder_prompt": prefix}
               for n in WHISPER_CLIPS]
    extracted = WhisperFeatureExtractor(feature_size=80)([at_16k(n) for n in WHISPER_CLIPS], sampling_rate=16000,
                                                         return_tensors="pt", return_attention_mask=True)
    for prompt, features, mask in zip(prompts, extracted.input_features, extracted.attention_mask):
        (item,) = llm.llm_engine.process_prompt(prompt).mm_items
        assert item.num_frames == int(mask.sum())                # ceil(samples / 160), as the attention mask
        torch.testing.assert_close(item.features, features, atol=1e-3, rtol=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    plain_greedy = GenerationConfig(decoder_start_token_id=SOT, eos_token_id=None, pad_token_id=EOT)
    with torch.inference_mode():
        expected = GenerationMixin.generate(
            hf, input_features=extracted.input_features, decoder_input_ids=torch.tensor([prefix] * len(prompts)),
            generation_config=plain_greedy, max_new_tokens=MAX_NEW, do_sample=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected[:, len(prefix):].tolist()
