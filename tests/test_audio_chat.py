"""LLM.chat with audio content parts on a tiny Qwen2-Audio that carries the published chat template."""
import base64
import io
import json
import os

import pytest
import soundfile as sf
import torch

from hark import LLM, SamplingParams
from test_qwen2_audio import DATA, make_tiny_qwen2_audio, speech

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Qwen2-Audio-7B-Instruct's template (kept in chat_template.json next to the processor config)
QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_audio_chat"))
    _, tok = make_tiny_qwen2_audio(path, chat_template=None)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN2_AUDIO_TEMPLATE}, f)
    return path, tok


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speech(seconds), 16000, format="WAV")
    return buf.getvalue()


def input_audio(seconds: float) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(seconds)).decode(),
                                                   "format": "wav"}}


def test_prompt_is_the_checkpoint_template(ckpt):
    path, tok = ckpt
    llm = LLM(path)
    out = llm.chat([{"role": "user", "content": [input_audio(3.0), {"type": "text", "text": "What is said?"}]}],
                   GREEDY, use_tqdm=False)[0]
    template_text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": "What is said?"}]}],
        chat_template=QWEN2_AUDIO_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert out.prompt == template_text
    assert len(out.outputs[0].token_ids) == 6


def test_voice_chat_multi_turn_reuses_encoder_and_prefix(ckpt):
    path, _ = ckpt
    llm = LLM(path)
    clip = input_audio(8.0)                                          # audio only: voice chat
    turn1 = [{"role": "user", "content": [clip]}]
    first = llm.chat(turn1, GREEDY, use_tqdm=False)[0]
    turn2 = turn1 + [{"role": "assistant", "content": first.outputs[0].text},
                     {"role": "user", "content": [{"type": "text", "text": "say more"}]}]
    second = llm.chat(turn2, GREEDY, use_tqdm=False)[0]
    assert llm.llm_engine.executor.runner.encoder_items == 1
    assert second.num_cached_tokens >= 200                          # the system prompt and 200 audio tokens


def test_audio_url_data_and_file(ckpt):
    path, _ = ckpt
    wav = os.path.join(DATA, sorted(f for f in os.listdir(DATA) if f.endswith(".wav"))[0])
    with open(wav, "rb") as f:
        data_url = "data:audio/wav;base64," + base64.b64encode(f.read()).decode()
    file_part = {"type": "audio_url", "audio_url": {"url": "file://" + wav}}
    data_part = {"type": "audio_url", "audio_url": {"url": data_url}}
    llm = LLM(path, allowed_local_media_path=DATA)
    outs = llm.chat([[{"role": "user", "content": [file_part]}], [{"role": "user", "content": [data_part]}]],
                    GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids      # same audio either way
    assert llm.llm_engine.executor.runner.encoder_items == 1
    closed = LLM(path)
    with pytest.raises(ValueError, match="file: media URLs are disabled"):
        closed.chat([{"role": "user", "content": [file_part]}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError):          # http(s) needs an allowed domain; none is by default
        closed.chat([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}]}],
                    GREEDY, use_tqdm=False)


def test_audio_embeds_part(ckpt):
    path, _ = ckpt
    llm = LLM(path, enable_mm_embeds=True)
    engine = llm.llm_engine
    clip = (speech(4.0), 16000)
    item = engine.process_prompt({"prompt": "<|AUDIO|>", "multi_modal_data": {"audio": clip}}).mm_items[0]
    embeds = engine.executor.model.embed_multimodal([item])[0].detach()
    buf = io.BytesIO()
    torch.save(embeds, buf)
    as_audio = llm.chat([{"role": "user", "content": [input_audio(4.0)]}], GREEDY, use_tqdm=False)[0]
    for value in (embeds, base64.b64encode(buf.getvalue()).decode()):
        out = llm.chat([{"role": "user", "content": [{"type": "audio_embeds", "audio_embeds": value}]}], GREEDY,
                       use_tqdm=False)[0]
        assert out.outputs[0].token_ids == as_audio.outputs[0].token_ids
    with pytest.raises(ValueError, match="base64 of a tensor"):
        llm.chat([{"role": "user", "content": [{"type": "audio_embeds", "audio_embeds": "bm90IGEgdGVuc29y"}]}],
                 GREEDY, use_tqdm=False)


def test_bad_content_raises_value_error(ckpt):
    path, _ = ckpt
    llm = LLM(path)
    with pytest.raises(ValueError, match="1 audio placeholder"):           # placeholder spelt in text
        llm.chat([{"role": "user", "content": "<|audio_bos|><|AUDIO|><|audio_eos|> hi"}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="'image_url' is not supported"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY,
                 use_tqdm=False)
    with pytest.raises(ValueError, match="not valid base64"):
        llm.chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}],
                 GREEDY, use_tqdm=False)
    assert llm.generate("still fine", GREEDY, use_tqdm=False)[0].finished


def test_hark_chat_command_one_question_and_a_conversation_on_stdin(ckpt, tmp_path, capsys, monkeypatch):
    from hark.cli import main
    path, _ = ckpt
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(4.0))
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(),
                                                     "format": "wav"}}
    llm = LLM(path)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=5)   # greedy gives only partial UTF-8 here
    sampling = ["--max-tokens", "5", "--temperature", "1", "--seed", "0"]

    assert main(["chat", path, "What is said?", "--audio", str(clip), *sampling]) == 0
    turn1 = [{"role": "user", "content": [audio, {"type": "text", "text": "What is said?"}]}]
    first = llm.chat(turn1, params, use_tqdm=False)[0].outputs[0].text
    assert first and capsys.readouterr().out == first + "\n"

    monkeypatch.setattr("sys.stdin", io.StringIO("What is said?\n\nAnd then?\n"))
    assert main(["chat", path, "--audio", str(clip), *sampling]) == 0
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": [{"type": "text", "text": "And then?"}]}]
    second = llm.chat(turn2, params, use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == first + "\n" + second + "\n"

    with pytest.raises(SystemExit):      # a missing audio file is a clear error, not a traceback
        main(["chat", path, "hi", "--audio", str(tmp_path / "missing.wav")])
    assert "missing.wav" in capsys.readouterr().err
