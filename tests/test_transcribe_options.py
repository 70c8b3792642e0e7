"""prefix, hotwords, clip_timestamps and max_new_tokens (faster-whisper's options) on tiny.en."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from hark.transcribe import InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.options import clip_spans
from hark.transcribe.pipeline import TranscriptionRun

DATA = os.path.join(os.path.dirname(__file__), "data")
CLIP = os.path.join(DATA, "sense_and_sensibility_01_austen_64kb-0930.wav")   # He might even have been made amiable himself.
OTHER = os.path.join(DATA, "sense_and_sensibility_01_austen_64kb-0880.wav")


@pytest.fixture(scope="module")
def llm():
    from hark.llm import LLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM()
    torch.set_num_threads(threads)


def test_clip_spans():
    assert clip_spans("0,30,45") == ((0.0, 30.0), (45.0, float("inf")))
    assert clip_spans([1, 2.5]) == ((1.0, 2.5),)
    for bad in ("", "a,b", "5,2", "0,10,5,20", "-1,2"):
        with pytest.raises(InvalidTranscriptionRequest, match="clip_timestamps"):
            TranscriptionOptions(clip_timestamps=bad)
    with pytest.raises(InvalidTranscriptionRequest, match="max_new_tokens"):
        TranscriptionOptions(max_new_tokens=0)


def test_prefix_and_hotwords_prompts(llm):
    engine = llm.llm_engine
    audio = np.concatenate([sf.read(OTHER, dtype="float32")[0]] * 12)     # 36 s: two windows
    run = TranscriptionRun(engine, [audio], TranscriptionOptions(prefix="He was", hotwords="Dashwood"))
    vocab = run.vocab
    first, second = [d.processed.prompt_token_ids for d in run.start()]
    assert first == [vocab.sot, vocab.timestamp_begin] + vocab.encode(" He was")   # hotwords give way to prefix
    assert second == [vocab.sot]
    run = TranscriptionRun(engine, [audio], TranscriptionOptions(hotwords="Dashwood", initial_prompt="Norland."))
    prompt = run.start()[0].processed.prompt_token_ids
    assert prompt == [vocab.sot_prev] + vocab.encode(" Dashwood") + vocab.encode(" Norland.") + [vocab.sot]


def test_prefix_is_continued_not_repeated(llm):
    result = llm.transcribe(CLIP, prefix="He might")
    assert result.text.startswith("even have been made amiable") and result.segments[0].start == 0.0
    plain = llm.transcribe(CLIP, prefix="He might", timestamps=False)
    assert plain.text.startswith("even have been made amiable")


def test_clip_timestamps_and_max_new_tokens(llm):
    other, clip = sf.read(OTHER, dtype="float32")[0], sf.read(CLIP, dtype="float32")[0]
    audio = np.concatenate([other, np.zeros(16000, np.float32), clip])
    start = (len(other) + 16000) / 16000
    result = llm.transcribe(audio, clip_timestamps=[start - 0.2])
    assert result.text == "He might even have been made amiable himself."
    assert result.segments[0].start >= start - 0.2 and result.duration == pytest.approx(len(audio) / 16000)
    result = llm.transcribe(audio, clip_timestamps=f"0,{start - 0.5}")
    assert "amiable" not in result.text and result.text
    short = llm.transcribe(CLIP, max_new_tokens=3, timestamps=False)
    assert len(short.segments) == 1 and len(short.segments[0].tokens) <= 3
