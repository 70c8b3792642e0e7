"""Audio given the ways vLLM and transformers write it: content-part shapes, embeddings in
multi_modal_data["audio"]. Each must give what hark's own shape gives."""
import base64
import io

import pytest
import soundfile as sf

from hark import LLM, SamplingParams
from test_qwen2_audio import PLACEHOLDER, make_tiny_qwen2_audio, speech

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_audio"))
    make_tiny_qwen2_audio(path)
    media = tmp_path_factory.mktemp("media")
    clip = speech(4.0)
    wav = media / "clip.wav"
    sf.write(wav, clip, 16000)
    llm = LLM(path, enable_mm_embeds=True, allowed_local_media_path=str(media), max_model_len=1024)
    return llm, clip, str(wav)


def answer(llm, audio_part) -> list[int]:
    messages = [{"role": "user", "content": [audio_part, {"type": "text", "text": "What is said?"}]}]
    return llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_audio_part_shapes_give_the_same_answer(setup):
    llm, clip, wav = setup
    buf = io.BytesIO()
    sf.write(buf, clip, 16000, format="WAV")
    b64 = base64.b64encode(buf.getvalue()).decode()
    data_url = "data:audio/wav;base64," + b64
    want = answer(llm, {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}})
    for part in [
        {"type": "audio_url", "audio_url": {"url": data_url}},
        {"audio_url": data_url},                                # vLLM's short part
        {"audio_url": {"url": "file://" + wav}},
        {"input_audio": {"data": b64, "format": "wav"}},
        {"type": "audio_url", "audio_url": data_url},           # url as a plain string
        {"type": "audio", "audio_url": data_url},               # transformers (Qwen2-Audio docs)
        {"type": "audio", "url": "file://" + wav},
        {"type": "audio", "path": wav},
        {"type": "audio", "audio": clip},                       # samples at 16 kHz
        {"type": "audio", "audio": (clip, 16000)},
    ]:
        assert answer(llm, part) == want, part


def test_unknown_parts_are_named(setup):
    llm, _, _ = setup
    with pytest.raises(ValueError, match="type 'image_url' is not supported"):
        answer(llm, {"type": "image_url", "image_url": {"url": "data:,"}})
    with pytest.raises(ValueError, match=r"keys \['sound'\] and no type"):
        answer(llm, {"sound": "x.wav"})
    with pytest.raises(ValueError, match="needs its 'audio' field"):
        answer(llm, {"type": "audio"})


def test_embeddings_passed_as_audio_the_vllm_way(setup):
    llm, clip, _ = setup
    engine = llm.llm_engine
    prompt = {"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio": (clip, 16000)}}
    want = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    item = engine.process_prompt(prompt).mm_items[0]
    embeds = engine.executor.model.embed_multimodal([item])[0].detach()          # [n, H]
    for audio in (embeds[None], [embeds]):                          # [1, n, H] and a list of [n, H]
        out = llm.generate({"prompt": f"{PLACEHOLDER}q", "multi_modal_data": {"audio": audio}}, GREEDY,
                           use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want
