import numpy as np

from hark.media import hash_audio


def test_equal_audio_gives_equal_keys():
    samples = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    assert hash_audio(samples, 16000, "whisper") == hash_audio(samples.copy(), 16000, "whisper")
    strided = np.repeat(samples, 2)[::2]  # not contiguous, same values
    assert hash_audio(strided, 16000, "whisper") == hash_audio(samples, 16000, "whisper")
    assert len(hash_audio(samples, 16000)) == 64


def test_any_difference_gives_another_key():
    samples = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    changed = samples.copy()
    changed[1234] += 1e-3
    keys = {
        hash_audio(samples, 16000, "whisper"),
        hash_audio(changed, 16000, "whisper"),
        hash_audio(samples, 8000, "whisper"),
        hash_audio(samples, 16000, "qwen2-audio"),
        hash_audio(samples, 16000),
        hash_audio(samples.astype(np.float64), 16000, "whisper"),
        hash_audio(samples.reshape(2, 8000), 16000, "whisper"),  # same bytes, other shape
        hash_audio(samples.view(np.int32), 16000, "whisper"),  # same bytes, other dtype
    }
    assert len(keys) == 8
