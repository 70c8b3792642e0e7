"""Qwen2-Audio prompts: each audio is written `<|audio_bos|><|AUDIO|><|audio_eos|>`; its <|AUDIO|>
becomes one token per audio embedding, 25 per second of audio (750 for 30 s).

The encoder takes log-mel features of 128 bins padded to 30 s (3000 frames) with a mask of the
valid ones; hark keeps only the frames the valid outputs depend on (see hark.models.whisper_encoder).
"""
from hark.audio import log_mel_spectrogram
from hark.models.whisper_encoder import conv_output_frames, mel_frames_needed
from hark.multimodal.audio_inputs import AudioPromptProcessor


class Qwen2AudioProcessor(AudioPromptProcessor):
    placeholder_text = "<|AUDIO|>"

    def __init__(self, hf_config, tokenizer, model_path: str):
        audio = hf_config.audio_config
        super().__init__(tokenizer, model_path, audio_token_id=hf_config.audio_token_index,
                         hidden_size=hf_config.text_config.hidden_size, n_mels=audio.num_mel_bins,
                         window_frames=2 * audio.max_source_positions)

    def chat_placeholder(self, index: int) -> str:
        return f"Audio {index}: <|audio_bos|><|AUDIO|><|audio_eos|>"

    def audio_features(self, samples):
        features, mask = log_mel_spectrogram([samples], n_mels=self.n_mels, n_frames=self.window_frames)
        frames = int(mask[0].sum())
        return features[0, :, :mel_frames_needed(frames, self.window_frames)].clone(), frames

    def num_embeds(self, mel_frames: int) -> int:
        return max(0, (conv_output_frames(mel_frames) - 2) // 2 + 1)
