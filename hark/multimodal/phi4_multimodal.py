"""Phi-4-multimodal prompts (audio and text), as vLLM writes them:
`<|user|><|audio_1|>question<|end|><|assistant|>`; `<|audio_k|>` stands for the k-th audio of the
prompt (in any order, each once) and becomes the audio token (audio_config.audio_token_id,
`<|endoftext11|>` in the published tokenizer) once per audio embedding. The tokenizer's own audio
token text may be written instead, taken in order.

Sizes are transformers' Phi4MultimodalFeatureExtractor's: a clip of L samples (16 kHz) has
T = (L - 400) // 160 + 1 log-mel frames (hark.audio.fbank) and ceil(T / 8) embeddings (2.79 s =
44,580 samples -> 277 frames -> 35). A clip of any length is one item (the encoder windows it
itself); under 25 ms (one frame) is refused. Image placeholders (`<|image_k|>`, the image token)
are refused: hark runs Phi-4-multimodal's speech path only.
"""
import json
import os
import re

from hark.audio import fbank
from hark.audio.fbank import log_fbank, num_frames
from hark.multimodal.audio_inputs import AudioPromptError, AudioPromptProcessor

AUDIO_PLACEHOLDER = re.compile(r"<\|audio_(\d+)\|>")
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")
WHOLE_CLIP_FRAMES = 1 << 40     # no 30 s windows: the encoder takes a clip whole
# feature extractor settings hark's features and counts are fixed to (hark.audio.fbank)
FIXED_SETTINGS = {"sampling_rate": fbank.SAMPLE_RATE, "hop_length": fbank.HOP_LENGTH, "win_length": fbank.WIN_LENGTH,
                  "n_fft": fbank.N_FFT, "preemphasis": fbank.PREEMPHASIS, "mel_min_frequency": 0,
                  "mel_max_frequency": fbank.MEL_MAX_HZ, "audio_downsample_rate": 1, "audio_feat_stride": 1}


def feature_extractor_settings(model_path: str) -> dict:
    """The checkpoint's Phi4MultimodalFeatureExtractor settings: processor_config.json's audio_processor
    (transformers 5) or preprocessor_config.json; {} when neither is there."""
    for name, key in (("processor_config.json", "audio_processor"), ("preprocessor_config.json", None)):
        path = os.path.join(model_path, name)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            settings = data.get(key) if key else data
            if isinstance(settings, dict):
                return settings
    return {}


def check_feature_extractor(settings: dict, n_mels: int, time_reduction: int) -> None:
    expected = dict(FIXED_SETTINGS, feature_size=n_mels, audio_compression_rate=time_reduction)
    wrong = {k: settings[k] for k, v in expected.items() if k in settings and settings[k] != v}
    if wrong:
        raise ValueError(f"the checkpoint's Phi-4 feature extractor settings {wrong} are not supported; hark computes "
                         f"its features and placeholder counts with {expected}.")


class Phi4MultimodalProcessor(AudioPromptProcessor):
    placeholder_text = "<|audio_1|>"

    def __init__(self, hf_config, tokenizer, model_path: str):
        audio = hf_config.audio_config
        self.time_reduction = audio.time_reduction
        vision = getattr(hf_config, "vision_config", None)
        self.image_token_id = getattr(vision, "image_token_id", None)
        check_feature_extractor(feature_extractor_settings(model_path), audio.input_size, audio.time_reduction)
        super().__init__(tokenizer, model_path, audio_token_id=audio.audio_token_id, hidden_size=hf_config.hidden_size,
                         n_mels=audio.input_size, window_frames=WHOLE_CLIP_FRAMES)

    def chat_placeholder(self, index: int) -> str:
        return f"<|audio_{index}|>"

    def encoder_inputs(self, samples):
        features = log_fbank(samples, self.n_mels)
        return [(features, features.shape[0])]

    def chunk_frames(self, num_samples: int) -> list[int]:
        return [num_frames(num_samples)]

    def num_embeds(self, mel_frames: int) -> int:
        return -(-mel_frames // self.time_reduction)

    def token_text(self, text: str) -> str:
        if IMAGE_PLACEHOLDER.search(text):
            raise AudioPromptError("the prompt holds an image placeholder; hark runs Phi-4-multimodal on audio and "
                                   "text only.")
        return AUDIO_PLACEHOLDER.sub(lambda m: self.audio_token_text, text)

    def _audio_groups(self, prompt: dict):
        """The audios in the order the prompt's `<|audio_k|>` placeholders name them."""
        groups = super()._audio_groups(prompt)
        text = prompt.get("prompt")
        numbers = [int(n) for n in AUDIO_PLACEHOLDER.findall(text)] if isinstance(text, str) else []
        if len(numbers) != len(groups):          # no numbered placeholders, or a count _expand refuses
            return groups
        if sorted(numbers) != list(range(1, len(groups) + 1)):
            raise AudioPromptError(f"the prompt's audio placeholders {['<|audio_%d|>' % n for n in numbers]} must "
                                   f"name each of its {len(groups)} audio(s) once, as <|audio_1|> .. "
                                   f"<|audio_{len(groups)}|>.")
        return [groups[n - 1] for n in numbers]

    def _expand(self, ids, groups, text):
        if self.image_token_id is not None and self.image_token_id in ids:
            raise AudioPromptError("the prompt holds an image token; hark runs Phi-4-multimodal on audio and text only.")
        return super()._expand(ids, groups, text)
