"""Voxtral prompts, as mistral_common's tekken instruct tokenizer writes them (what transformers and vLLM use).

Each audio is written `[BEGIN_AUDIO][AUDIO]`; its [AUDIO] becomes 375 audio tokens per 30 s window
of the clip padded to whole windows (mistral_common pads to a multiple of chunk_length_s = 30 s and
gives one token per 8 hops of 160 samples), so any clip of up to 30 s takes 375 and 30.01 s takes 750.
Features are transformers' VoxtralProcessor's: WhisperFeatureExtractor's log-mel of the clip zero-
padded to whole windows (one spectrogram, its floor at the whole clip's max - 8), cut into 3000-
frame windows, each encoded on its own.

Chat (no chat template needed): `<s>`, then per message `[INST]content[/INST]` (user),
`content</s>` (assistant), `[SYSTEM_PROMPT]content[/SYSTEM_PROMPT]` (system); a message's parts
follow one another with nothing between them. A checkpoint's own chat template is used if it has one.
Transcription (vLLM's Voxtral prompt): `<s>[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:xx[TRANSCRIBE]`,
without `lang:xx` when the language is not given.
"""
import math

import numpy as np

from hark.audio import log_mel_spectrogram
from hark.inputs import ProcessedPrompt
from hark.multimodal.audio_inputs import AudioPromptError, AudioPromptProcessor

AUDIO, BEGIN_AUDIO, TRANSCRIBE = "[AUDIO]", "[BEGIN_AUDIO]", "[TRANSCRIBE]"
BOS, EOS, INST, END_INST = "<s>", "</s>", "[INST]", "[/INST]"
CHAT_TEMPLATE = (
    "{{ '<s>' }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + '</s>' }}"
    "{% elif m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% else %}{{ raise_exception('Voxtral takes system, user and assistant messages, not ' + m['role']) }}"
    "{% endif %}{% endfor %}")


class VoxtralProcessor(AudioPromptProcessor):
    placeholder_text = AUDIO
    part_separator = ""

    def __init__(self, hf_config, tokenizer, model_path: str):
        audio = hf_config.audio_config
        vocab = tokenizer.get_vocab()
        missing = [t for t in (BEGIN_AUDIO, BOS, INST, END_INST) if t not in vocab]
        if missing:
            raise ValueError(f"the Voxtral tokenizer lacks {missing}: hark cannot place audio in a prompt.")
        self.ids = {t: vocab[t] for t in (BEGIN_AUDIO, BOS, INST, END_INST, TRANSCRIBE) if t in vocab}
        self.stack = audio.intermediate_size // audio.d_model
        super().__init__(tokenizer, model_path, audio_token_id=hf_config.audio_token_id,
                         hidden_size=hf_config.text_config.hidden_size, n_mels=audio.num_mel_bins,
                         window_frames=2 * audio.max_source_positions)
        self.chat_template = self.chat_template or CHAT_TEMPLATE

    def chat_placeholder(self, index: int) -> str:
        return BEGIN_AUDIO + AUDIO

    # --- sizes --------------------------------------------------------------------------------
    def chunk_frames(self, num_samples: int) -> list[int]:
        """Every window is encoded whole: 3000 frames each, for the clip padded to whole windows."""
        return [self.window_frames] * max(1, math.ceil(num_samples / self.window_samples))

    def num_embeds(self, mel_frames: int) -> int:
        return mel_frames // 2 // self.stack

    def encoder_inputs(self, samples):
        windows = max(1, math.ceil(len(samples) / self.window_samples))
        padded = np.pad(samples, (0, windows * self.window_samples - len(samples)))
        features = log_mel_spectrogram([padded], n_mels=self.n_mels, n_frames=windows * self.window_frames)[0][0]
        return [(features[:, start: start + self.window_frames].clone(), self.window_frames)
                for start in range(0, windows * self.window_frames, self.window_frames)]

    # --- transcription ------------------------------------------------------------------------
    def transcription_prompt(self, audio, language: str | None = None) -> ProcessedPrompt:
        """The prompt that asks Voxtral for a transcript of `audio` (any length), in `language`
        (ISO 639-1, e.g. "en") or detected when None."""
        if TRANSCRIBE not in self.ids:
            raise AudioPromptError("this Voxtral tokenizer has no [TRANSCRIBE] token: the checkpoint cannot transcribe.")
        if language is not None and (not language.isascii() or not language.isalpha() or len(language) > 3):
            raise AudioPromptError(f"language must be an ISO 639-1 code such as 'en', got {language!r}.")
        ids = [self.ids[BOS], self.ids[INST], self.ids[BEGIN_AUDIO], self.audio_token_id, self.ids[END_INST]]
        if language:
            ids += self.tokenizer.encode(f"lang:{language.lower()}", add_special_tokens=False)
        ids.append(self.ids[TRANSCRIBE])
        return self._expand(ids, [self._audio_group(audio, None)], None)
