"""A window's log-mel floor comes from its whole input (levels.py): the near-silent last window of a
recording is silence, not a confident " you"."""
import glob
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from hark.audio.mel import log_mel_spectrogram
from hark.inputs import MultiModalItem, ProcessedPrompt
from hark.transcribe.levels import peak_level, with_input_floor

DATA = os.path.join(os.path.dirname(__file__), "data")


def speech_then_faint_noise(noise_amplitude: float = 3e-3, noise_s: float = 5.5) -> np.ndarray:
    """26.7 s of read speech (the five clips, 0.4 s apart), then faint white noise: 32 s in all, so the
    last window is the noise alone."""
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(glob.glob(os.path.join(DATA, "*.wav")))]
    speech = np.concatenate([np.concatenate([c, np.zeros(6400, np.float32)]) for c in clips])
    noise = np.random.default_rng(1).normal(0, noise_amplitude, int(noise_s * 16000)).astype(np.float32)
    return np.concatenate([speech, noise])


def prompt_of(samples: np.ndarray) -> ProcessedPrompt:
    features, mask = log_mel_spectrogram([samples])
    item = MultiModalItem(features[0], int(mask[0].sum()), "h", 0, len(samples) / 16000)
    return ProcessedPrompt([1], mm_items=[item], placeholder_offsets=[0])


def test_window_floor_equals_the_whole_input_log_mel():
    audio = speech_then_faint_noise()
    start = 27 * 16000                                   # a window of noise alone
    whole, _ = log_mel_spectrogram([audio], n_frames=None)           # one log-mel, one maximum
    window = prompt_of(audio[start:])
    floored = with_input_floor(window, float(whole.max()))
    frames = (len(audio) - start) // 160
    inner = slice(2, frames - 2)                         # away from the edges, where the STFT sees other samples
    assert torch.allclose(floored.mm_items[0].features[:, inner], whole[0][:, start // 160:][:, inner], atol=1e-5)
    assert floored.mm_items[0].hash != window.mm_items[0].hash
    assert not torch.equal(floored.mm_items[0].features, window.mm_items[0].features)
    loud = prompt_of(audio[:30 * 16000])
    assert with_input_floor(loud, peak_level(loud)) is loud      # the loudest window is unchanged


@pytest.fixture(scope="module")
def llm():
    from hark.llm import LLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM()
    torch.set_num_threads(threads)


def test_near_silent_last_window_gives_no_text(llm):
    """Before: ' you' at 26.4-28.4 s (P(no speech) 0.89, avg logprob -0.95, just above the -1 gate)."""
    result = llm.transcribe(speech_then_faint_noise())
    assert result.text.endswith("amiable himself.")
    assert all(s.end <= 27.0 for s in result.segments)
