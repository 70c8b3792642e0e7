"""Qwen2.5-Omni prompts (audio and text): each audio is written `<|audio_bos|><|AUDIO|><|audio_eos|>`
and its <|AUDIO|> becomes one token per audio embedding, 25 per second (750 for 30 s), counted
from the valid mel frames as Qwen2-Audio's.

The valid mel frames are counted as transformers' Qwen2.5-Omni processor does: the Whisper feature
extractor's mask takes every 160th sample of the clip padded to 30 s, so a clip of S samples has
ceil(S / 160) frames (2.79 s = 44,580 samples -> 279 frames -> 70 embeddings). The encoder sees
exactly those frames (it pads its chunks with zeros, not with the 30 s window's log-mel).
Image and video placeholders are refused: hark runs the thinker's audio and text path only.
"""
from hark.inputs import ProcessedPrompt
from hark.models.qwen2_5_omni import thinker_config
from hark.multimodal.audio_inputs import AudioPromptError
from hark.multimodal.qwen2_audio import Qwen2AudioProcessor


class Qwen2_5OmniProcessor(Qwen2AudioProcessor):
    def __init__(self, hf_config, tokenizer, model_path: str):
        config = thinker_config(hf_config)
        super().__init__(config, tokenizer, model_path)
        self.vision_token_ids = {getattr(config, "image_token_index", None), getattr(config, "video_token_index", None)}
        self.vision_token_ids.discard(None)

    def chat_placeholder(self, index: int) -> str:
        return "<|audio_bos|><|AUDIO|><|audio_eos|>"

    def encoder_inputs(self, samples):
        return self.window_inputs(samples)

    def _expand(self, ids: list[int], groups, text: str | None) -> ProcessedPrompt:
        if self.vision_token_ids.intersection(ids):
            raise AudioPromptError("the prompt holds an image or video placeholder; hark runs Qwen2.5-Omni on "
                                   "audio and text only.")
        return super()._expand(ids, groups, text)
