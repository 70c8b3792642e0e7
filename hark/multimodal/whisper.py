"""Whisper prompts: one audio clip of at most 30 s for the encoder, decoder prompt tokens for the decoder.

Accepts vLLM's two prompt styles:
  {"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": (array, sr)}}
  {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (array, sr)}},
   "decoder_prompt": "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"}  (or token ids)
"""
import numpy as np
from hark.transcribe.languages import LANGUAGES

from hark.audio import load_audio
from hark.audio.mel import log_mel_spectrogram
from hark.inputs import MultiModalItem, ProcessedPrompt
from hark.media.hashing import hash_audio

SAMPLE_RATE = 16000
HOP_LENGTH = 160


class WhisperPromptError(ValueError):
    pass


class WhisperProcessor:
    def __init__(self, hf_config, tokenizer, model_path: str):
        self.tokenizer = tokenizer
        self.model_id = model_path
        self.n_mels = hf_config.num_mel_bins
        self.n_frames = 2 * hf_config.max_source_positions
        self.max_samples = self.n_frames * HOP_LENGTH  # 30 s
        self.start_token = hf_config.decoder_start_token_id
        # English-only checkpoints were trained on <|startoftranscript|> without language and task tokens;
        # the multilingual prompt makes them end at once, so those tokens are dropped for them.
        self.english_only = hf_config.vocab_size < 51865
        self.implied = _token_ids(tokenizer, ["<|en|>", "<|transcribe|>"])
        self.refused = _token_ids(tokenizer, [f"<|{code}|>" for code in LANGUAGES if code != "en"] + ["<|translate|>"])

    def process(self, prompt: str | dict) -> ProcessedPrompt:
        if not isinstance(prompt, dict):
            raise WhisperPromptError(
                "a Whisper prompt needs audio: pass {'prompt': '<|startoftranscript|>', "
                "'multi_modal_data': {'audio': (samples, sample_rate)}}, or use LLM.transcribe.")
        if "encoder_prompt" in prompt:
            encoder, decoder = prompt["encoder_prompt"], prompt.get("decoder_prompt")
            if not isinstance(encoder, dict):
                raise WhisperPromptError("encoder_prompt must be a dict holding multi_modal_data with the audio.")
            if encoder.get("prompt") or encoder.get("prompt_token_ids"):
                raise WhisperPromptError("Whisper's encoder takes only audio: leave encoder_prompt's 'prompt' "
                                         "empty and put the text in decoder_prompt.")
        else:
            encoder, decoder = prompt, prompt.get("prompt", prompt.get("prompt_token_ids"))
        token_ids, text = self._decoder_tokens(decoder)
        if self.english_only:
            token_ids = self._english_only(token_ids)
        item = self._audio_item(encoder)
        return ProcessedPrompt(prompt_token_ids=token_ids, mm_items=[item], placeholder_offsets=[0], prompt=text)

    def _decoder_tokens(self, decoder) -> tuple[list[int], str | None]:
        if decoder is None or decoder == "" or decoder == []:
            return [self.start_token], None
        if isinstance(decoder, dict):  # {"prompt": ...} or {"prompt_token_ids": ...}
            decoder = decoder.get("prompt_token_ids", decoder.get("prompt"))
            return self._decoder_tokens(decoder)
        if isinstance(decoder, str):
            return self.tokenizer.encode(decoder, add_special_tokens=False), decoder
        ids = [int(t) for t in decoder]
        if any(not 0 <= t < len(self.tokenizer) for t in ids):
            raise WhisperPromptError(f"decoder prompt token ids must lie in [0, {len(self.tokenizer)}).")
        return ids, None

    def _english_only(self, ids: list[int]) -> list[int]:
        if self.start_token not in ids:
            return ids
        start = ids.index(self.start_token) + 1
        end = start
        while end < len(ids) and (ids[end] in self.implied or ids[end] in self.refused):
            if ids[end] in self.refused:
                raise WhisperPromptError("this Whisper model is English-only: it cannot take another language or "
                                         "<|translate|>; use a multilingual checkpoint.")
            end += 1
        return ids[:start] + ids[end:]

    def _audio_item(self, encoder: dict) -> MultiModalItem:
        audio = (encoder.get("multi_modal_data") or {}).get("audio")
        if isinstance(audio, list):
            if len(audio) != 1:
                raise WhisperPromptError(f"a Whisper prompt takes exactly one audio clip, got {len(audio)}.")
            audio = audio[0]
        if audio is None:
            raise WhisperPromptError("a Whisper prompt needs one audio clip in multi_modal_data['audio'].")
        samples = load_audio(audio, target_sr=SAMPLE_RATE)
        if len(samples) > self.max_samples:
            raise WhisperPromptError(
                f"the audio is {len(samples) / SAMPLE_RATE:.1f} s long; a Whisper prompt takes at most "
                f"{self.max_samples / SAMPLE_RATE:.0f} s. Use LLM.transcribe, which splits long audio.")
        features, mask = log_mel_spectrogram([samples], n_mels=self.n_mels, n_frames=self.n_frames)
        return MultiModalItem(features=features[0], num_frames=int(mask[0].sum()), hash=self._hash(encoder, samples),
                         num_embeds=0, duration_s=len(samples) / SAMPLE_RATE)

    def _hash(self, encoder: dict, samples: np.ndarray) -> str:
        uuid = (encoder.get("multi_modal_uuids") or {}).get("audio")
        if isinstance(uuid, list):
            uuid = uuid[0] if uuid else None
        return str(uuid) if uuid is not None else hash_audio(samples, SAMPLE_RATE, self.model_id)


def _token_ids(tokenizer, tokens: list[str]) -> set[int]:
    """The ids of those of `tokens` the tokenizer has (unknown ones map to <|endoftext|>, left out)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    return {i for t, i in ids.items() if i is not None and tokenizer.convert_ids_to_tokens(i) == t}
