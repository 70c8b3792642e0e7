"""Ultravox prompts: each audio is written `<|audio|>` and becomes one token per projector output,
ceil(encoder frames / stack_factor): 6.25 per second of audio with stack_factor 8.

The Whisper encoder sees each clip at its own length, as fixie-ai's processor featurises one
audio: at least 2 hops (320 samples, zero-padded), padded to a whole hop (pad_to_multiple_of=160),
so ceil(samples / 160) valid mel frames and ceil(frames / 16) embeddings. A clip longer than 30 s
is featurised whole (one log-mel, normalised over the whole clip) and its frames cut into 3000-
frame chunks; a last, shorter chunk is zero-padded to 3000 frames there, and its encoder frames
past the valid ones (keys masked) fill its last stack: hark passes the zero frames those reach
(see hark.models.ultravox). The token that carries the audio in the
prompt is the config's audio_token_index if set, else `<|audio|>` if the tokenizer has it, else
`<|reserved_special_token_0|>` (as vLLM uses for Llama 3 tokenizers).
"""
import math

import numpy as np
import torch.nn.functional as F

from hark.audio import log_mel_spectrogram
from hark.models.whisper_encoder import conv_output_frames
from hark.multimodal.audio_inputs import AudioPromptError, AudioPromptProcessor

PLACEHOLDER = "<|audio|>"
MIN_SAMPLES = 320           # fixie-ai's processor pads shorter audio to 2 hops


class UltravoxProcessor(AudioPromptProcessor):
    placeholder_text = PLACEHOLDER

    def __init__(self, hf_config, tokenizer, model_path: str):
        audio = hf_config.audio_config
        self.stack_factor = hf_config.stack_factor
        super().__init__(tokenizer, model_path, audio_token_id=audio_token_id(hf_config, tokenizer),
                         hidden_size=hf_config.text_config.hidden_size, n_mels=audio.num_mel_bins,
                         window_frames=2 * audio.max_source_positions)

    def chat_placeholder(self, index: int) -> str:
        return PLACEHOLDER

    def encoder_inputs(self, samples):
        if len(samples) < MIN_SAMPLES:
            samples = np.pad(samples, (0, MIN_SAMPLES - len(samples)))
        features = log_mel_spectrogram([samples], n_mels=self.n_mels, n_frames=None)[0][0]
        inputs = []
        for start, frames in zip(range(0, features.shape[1], self.window_frames), self.chunk_frames(len(samples))):
            chunk = features[:, start: start + frames]
            if start > 0 and frames < self.window_frames:
                chunk = F.pad(chunk, (0, self.padded_frames(frames) - frames))
            inputs.append((chunk.clone(), frames))
        return inputs

    def padded_frames(self, mel_frames: int) -> int:
        """Mel frames (valid, then zeros) the encoder frames of a padded chunk's stacks reach."""
        stacked = self.num_embeds(mel_frames) * self.stack_factor
        return min(2 * stacked + 1, self.window_frames)

    def num_embeds(self, mel_frames: int) -> int:
        return math.ceil(conv_output_frames(mel_frames) / self.stack_factor) if mel_frames > 0 else 0


def audio_token_id(hf_config, tokenizer) -> int:
    token_id = getattr(hf_config, "audio_token_index", None)
    if token_id is not None:
        return token_id
    vocab = tokenizer.get_vocab()
    for token in (PLACEHOLDER, "<|reserved_special_token_0|>"):
        if token in vocab:
            return vocab[token]
    raise AudioPromptError("the Ultravox tokenizer has neither <|audio|> nor <|reserved_special_token_0|>, and "
                           "config.json sets no audio_token_index: hark cannot place audio in a prompt.")
