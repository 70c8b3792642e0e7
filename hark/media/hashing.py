"""hash_audio: a key for decoded audio, used by the encoder cache."""
import hashlib

import numpy as np


def hash_audio(samples: np.ndarray, sample_rate: int, model_id: str = "") -> str:
    """Hex blake2b digest of the samples' dtype, shape, sample rate and bytes, and the model id:
    equal audio under the same model gives the same key, anything else a different one."""
    samples = np.ascontiguousarray(samples)
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{model_id}\0{samples.dtype.str}\0{samples.shape}\0{int(sample_rate)}\0".encode())
    digest.update(samples.data)
    return digest.hexdigest()
