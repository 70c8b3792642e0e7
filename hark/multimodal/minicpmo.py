"""MiniCPM-o 2.6 prompts: each audio is written `(<audio>./</audio>)` and becomes, for every second of
audio, `<|audio_start|>`, one `<unk>` per audio embedding (25 a second, fewer in the last second) and
`<|audio_end|>`, as MiniCPM-o's processor writes it with chunk_input=True (what vLLM uses); the
embeddings go over the `<unk>`s, the markers keep their own embeddings.

For n samples: L = ceil(n / 160) mel frames, (L - 1) // 2 + 1 encoder frames, (frames - p) // p + 1
embeddings after the average pool of p = audio_pool_step (2). Audio longer than 30 s is encoded in
consecutive 30 s windows of 750 embeddings (30 whole seconds), so the windows' spans one after
another are the clip's placeholder. Each window's log-mel features are WhisperFeatureExtractor's with
padding="max_length" (30 s), cut to the L valid frames, as MiniCPM-o's processor passes them.

Chat: a conversation with audio uses MiniCPM-o's audio template (the assistant turn opens with
`<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>`), as its own chat() and vLLM's audio example do; a
text-only one uses the tokenizer's template. A prompt's literal `<unk>` text counts as a placeholder.
"""

from hark.models.whisper_encoder import conv_output_frames
from hark.multimodal.audio_inputs import AudioPromptProcessor

PLACEHOLDER = "(<audio>./</audio>)"
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
CHUNK_MEL_FRAMES = 100        # one second: the placeholder's chunk (chunk_length 1 in MiniCPM-o's processor)
AUDIO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>' }}{% endif %}")
AUDIO_PART_TYPES = ("input_audio", "audio_url", "audio_embeds")


class MiniCPMOProcessor(AudioPromptProcessor):
    placeholder_text = PLACEHOLDER

    def __init__(self, hf_config, tokenizer, model_path: str):
        audio = hf_config.audio_config
        self.pool_step = hf_config.audio_pool_step
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<unk>", AUDIO_START, AUDIO_END) if t not in vocab]
        if missing:
            raise ValueError(f"the MiniCPM-o tokenizer lacks {missing}: hark cannot place audio in a prompt.")
        self.audio_start_id, self.audio_end_id = vocab[AUDIO_START], vocab[AUDIO_END]
        super().__init__(tokenizer, model_path, audio_token_id=vocab["<unk>"], hidden_size=hf_config.hidden_size,
                         n_mels=audio.num_mel_bins, window_frames=2 * audio.max_source_positions)
        self.chunk_embeds = self.num_embeds(CHUNK_MEL_FRAMES)

    def chat_placeholder(self, index: int) -> str:
        return PLACEHOLDER

    def encoder_inputs(self, samples):
        return self.window_inputs(samples)

    def num_embeds(self, mel_frames: int) -> int:
        return max(0, (conv_output_frames(mel_frames) - self.pool_step) // self.pool_step + 1)

    def span_token_ids(self, num_embeddings: int) -> list[int]:
        ids = []
        for start in range(0, num_embeddings, self.chunk_embeds):
            n = min(self.chunk_embeds, num_embeddings - start)
            ids += [self.audio_start_id] + [self.audio_token_id] * n + [self.audio_end_id]
        return ids

    def build_chat_prompt(self, conversation: list[dict], chat_template: str | None, add_generation_prompt: bool,
                          template_kwargs: dict) -> dict:
        if chat_template is None and any(isinstance(part, dict) and part.get("type") in AUDIO_PART_TYPES
                                         for m in conversation if isinstance(m.get("content"), list)
                                         for part in m["content"]):
            chat_template = AUDIO_CHAT_TEMPLATE
        return super().build_chat_prompt(conversation, chat_template, add_generation_prompt, template_kwargs)
