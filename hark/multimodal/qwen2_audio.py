"""Qwen2-Audio prompts: each audio is written `<|audio_bos|><|AUDIO|><|audio_eos|>`; its <|AUDIO|>
becomes one token per audio embedding, 25 per second of audio (750 for 30 s).

The encoder takes log-mel features of 128 bins padded to 30 s (3000 frames) with a mask of the
valid ones, ceil(samples / 160) as Qwen2AudioProcessor's feature_attention_mask counts them; hark
keeps only the frames the valid outputs depend on (see hark.models.whisper_encoder).
transformers' processor truncates a clip to 30 s; hark splits a longer one into 30 s chunks, each
featurised as a clip of its own (so a clip up to 30 s, and a longer one's first 30 s, are as in
transformers).
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

    def encoder_inputs(self, samples):
        inputs = []
        for start in range(0, len(samples), self.window_samples):
            chunk = samples[start: start + self.window_samples]
            features, mask = log_mel_spectrogram([chunk], n_mels=self.n_mels, n_frames=self.window_frames)
            frames = int(mask[0].sum())
            inputs.append((features[0, :, :mel_frames_needed(frames, self.window_frames)].clone(), frames))
        return inputs

    def num_embeds(self, mel_frames: int) -> int:
        return max(0, (conv_output_frames(mel_frames) - 2) // 2 + 1)
