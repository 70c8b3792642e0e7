"""The random-weight audio chat models benchmarks/audio_chat.py can run, each with its transformers side.

A model registers a `BenchModel`: its prompt placeholder for one audio (and what follows the
question, for prompt formats that close the user turn) and a `build(path, size)`
that writes a checkpoint hark loads from `path` and returns the transformers side as a `Reference`
(generate greedy ids for a batch of (audio, question) requests). To add a model:

    def build_voxtral(path: str, size: Size) -> Reference: ...
    register(BenchModel("voxtral", "<placeholder>", build_voxtral, "what the transformers side is"))

All models share one shape so their rates compare: a whisper-tiny-sized encoder (4 layers,
d_model 384, 6 heads, FFN 1536, 30 s window) and an LM of Qwen2-0.5B's width (hidden 896, 14
heads, 2 KV heads, FFN 4864; `--lm-hidden 512`: FFN 2048, 8 heads) with `--lm-layers` layers and a
byte-level vocabulary (~260 tokens).
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Size:
    lm_layers: int = 4
    lm_hidden: int = 896

    @property
    def lm(self) -> dict:
        """Keyword arguments for a Qwen2Config / LlamaConfig."""
        return dict(hidden_size=self.lm_hidden, intermediate_size=4864 if self.lm_hidden == 896 else 4 * self.lm_hidden,
                    num_hidden_layers=self.lm_layers, num_attention_heads=self.lm_hidden // 64, num_key_value_heads=2,
                    max_position_embeddings=4096)


ENCODER = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
               max_source_positions=1500)


class Reference:
    """The transformers side of a benchmark model."""
    model: nn.Module          # everything with weights (for its parameter count and dtype)

    def generate(self, requests: list[tuple[np.ndarray, str]], max_new: int, dtype: torch.dtype) -> list[list[int]]:
        """Greedy new token ids (exactly max_new each) for a left-padded batch of (16 kHz audio, prompt text)."""
        raise NotImplementedError


@dataclass
class BenchModel:
    name: str
    placeholder: str                                  # what a prompt writes for one audio
    build: Callable[[str, Size], Reference]
    reference: str                                    # what the transformers side is, for the report
    suffix: str = ""                                  # what a prompt writes after the question


MODELS: dict[str, BenchModel] = {}


def register(model: BenchModel) -> BenchModel:
    MODELS[model.name] = model
    return model


def byte_tokenizer(path: str, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=special_tokens)
    tok.padding_side = "left"
    tok.save_pretrained(path)
    return tok


# --- Qwen2-Audio: transformers' Qwen2AudioProcessor + Qwen2AudioForConditionalGeneration ----------
class Qwen2AudioReference(Reference):
    def __init__(self, model, tok):
        from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
        self.model, self.tok = model, tok
        self.processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tok)

    @torch.no_grad()
    def generate(self, requests, max_new, dtype):
        inputs = self.processor(text=[q for _, q in requests], audio=[a for a, _ in requests], sampling_rate=16000,
                                return_tensors="pt", padding=True)
        inputs["input_features"] = inputs["input_features"].to(dtype)
        out = self.model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                  pad_token_id=self.tok.eos_token_id)
        return out[:, inputs["input_ids"].shape[1]:].tolist()


def build_qwen2_audio(path: str, size: Size) -> Reference:
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    tok = byte_tokenizer(path, ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"])
    config = Qwen2AudioConfig(
        audio_config=dict(ENCODER, num_mel_bins=128),
        text_config=dict(size.lm, model_type="qwen2", vocab_size=len(tok), eos_token_id=tok.eos_token_id),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"), architectures=["Qwen2AudioForConditionalGeneration"])
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return Qwen2AudioReference(model, tok)


register(BenchModel("qwen2_audio", "<|audio_bos|><|AUDIO|><|audio_eos|>", build_qwen2_audio,
                    "transformers Qwen2AudioProcessor + Qwen2AudioForConditionalGeneration.generate"))


# --- Ultravox: fixie-ai's model is remote code; its parts in transformers ----------------------------
STACK = 8


class UltravoxProjector(nn.Module):
    """fixie-ai's projector (v0.5+: ln_mid): stack 8 frames, RMSNorm, linear, SwiGLU, RMSNorm, linear."""

    def __init__(self, d_audio: int, hidden: int, d_text: int):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        super().__init__()
        self.ln_pre = LlamaRMSNorm(d_audio * STACK, eps=1e-6)
        self.linear_1 = nn.Linear(d_audio * STACK, hidden, bias=False)
        self.ln_mid = LlamaRMSNorm(hidden // 2, eps=1e-6)
        self.linear_2 = nn.Linear(hidden // 2, d_text, bias=False)

    def forward(self, frames):                        # [T, D] of one clip
        t = math.ceil(frames.shape[0] / STACK) * STACK
        x = F.pad(frames, (0, 0, 0, t - frames.shape[0])).reshape(t // STACK, -1)
        x, gate = self.linear_1(self.ln_pre(x)).chunk(2, dim=-1)
        return self.linear_2(self.ln_mid(F.silu(gate) * x))


class UltravoxReference(Reference):
    """transformers' WhisperFeatureExtractor (each clip at its own length, padded to a hop) and
    WhisperEncoder layers (ModifiedWhisperEncoder: no 30 s padding), the projector above, and
    LlamaForCausalLM.generate over the merged embeddings (clips of at most 30 s)."""

    def __init__(self, encoder, projector, lm, tok, audio_token_id: int):
        from transformers import WhisperFeatureExtractor
        self.encoder, self.projector, self.lm, self.tok = encoder, projector, lm, tok
        self.model = nn.ModuleList([encoder, projector, lm])
        self.audio_token_id = audio_token_id
        self.extractor = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)

    def embed(self, audio: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        enc = self.encoder
        feats = self.extractor(audio, sampling_rate=16000, padding="longest", pad_to_multiple_of=160,
                               return_tensors="pt").input_features.to(dtype)
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(feats)))).transpose(1, 2)
        x = x + enc.embed_positions.weight[:x.shape[1]]
        for layer in enc.layers:
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x
        return self.projector(enc.layer_norm(x)[0])

    @torch.no_grad()
    def generate(self, requests, max_new, dtype):
        rows = []
        for audio, text in requests:
            ids = self.tok.encode(text)
            slot = ids.index(self.audio_token_id)
            audio_embeds = self.embed(audio, dtype)
            text_embeds = self.lm.get_input_embeddings()(torch.tensor(ids))
            rows.append(torch.cat([text_embeds[:slot], audio_embeds, text_embeds[slot + 1:]]))
        width = max(r.shape[0] for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, width - r.shape[0], 0)) for r in rows])
        mask = torch.stack([torch.arange(width) >= width - r.shape[0] for r in rows]).long()
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new,
                               min_new_tokens=max_new, do_sample=False, pad_token_id=self.tok.eos_token_id)
        return out.tolist()


def build_ultravox(path: str, size: Size) -> Reference:
    import json
    import os
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    tok = byte_tokenizer(path, ["<|audio|>"])
    audio_config = WhisperConfig(**ENCODER, num_mel_bins=80)
    text_config = LlamaConfig(**size.lm, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                              architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    encoder, lm = WhisperEncoder(audio_config).eval(), LlamaForCausalLM(text_config).eval()
    projector = UltravoxProjector(audio_config.d_model, 2 * size.lm_hidden, size.lm_hidden).eval()
    config = {"architectures": ["UltravoxModel"], "model_type": "ultravox", "hidden_size": 2 * size.lm_hidden,
              "stack_factor": STACK, "projector_act": "swiglu", "projector_ln_mid": True,
              "audio_config": audio_config.to_dict(), "text_config": text_config.to_dict()}
    weights = {f"audio_tower.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    weights.update({f"language_model.{k}": v for k, v in lm.state_dict().items()})
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return UltravoxReference(encoder, projector, lm, tok, tok.convert_tokens_to_ids("<|audio|>"))


register(BenchModel("ultravox", "<|audio|>", build_ultravox,
                    "transformers WhisperFeatureExtractor + WhisperEncoder layers + fixie-ai's projector + "
                    "LlamaForCausalLM.generate (fixie-ai's model is remote code)"))


def left_pad(rows: list[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n_i, ...] -> (stacked [B, max n, ...] padded on the left, attention mask [B, max n])."""
    width = max(r.shape[0] for r in rows)
    pads = [width - r.shape[0] for r in rows]
    stacked = torch.stack([torch.cat([torch.full((p, *r.shape[1:]), value, dtype=r.dtype), r]) for r, p in zip(rows, pads)])
    mask = torch.stack([torch.arange(width) >= p for p in pads]).long()
    return stacked, mask


# --- Voxtral: transformers' VoxtralProcessor features + VoxtralForConditionalGeneration --------------
VOXTRAL_WINDOW = 480_000          # samples in one 30 s window; 375 audio tokens each


class VoxtralReference(Reference):
    """Prompts as mistral_common writes them (<s>[INST][BEGIN_AUDIO] + [AUDIO] x 375 per padded 30 s
    window + question + [/INST]; transformers' VoxtralProcessor needs mistral_common's tokenizer, so
    the ids are built here), features by VoxtralProcessor's own _retrieve_input_features."""

    def __init__(self, model, tok):
        from transformers import WhisperFeatureExtractor
        self.model, self.tok = model, tok
        self.extractor = WhisperFeatureExtractor(feature_size=128)
        self.audio_id = tok.convert_tokens_to_ids("[AUDIO]")

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        from types import SimpleNamespace
        from transformers import VoxtralProcessor
        return VoxtralProcessor._retrieve_input_features(
            SimpleNamespace(feature_extractor=self.extractor), audios, 3000, sampling_rate=16000, padding=True,
            truncation=False, pad_to_multiple_of=VOXTRAL_WINDOW, return_tensors="pt")

    @torch.no_grad()
    def generate(self, requests, max_new, dtype):
        rows = []
        for audio, text in requests:
            ids = self.tok.encode(text, add_special_tokens=False)
            slot = ids.index(self.audio_id)
            n = 375 * math.ceil(len(audio) / VOXTRAL_WINDOW)
            rows.append(torch.tensor(ids[:slot] + [self.audio_id] * n + ids[slot + 1:]))
        input_ids, mask = left_pad(rows, self.tok.pad_token_id)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                  input_features=self.features([a for a, _ in requests]).to(dtype),
                                  max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id)
        return out[:, input_ids.shape[1]:].tolist()


def build_voxtral(path: str, size: Size) -> Reference:
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration
    tok = byte_tokenizer(path, ["<s>", "[INST]", "[/INST]", "[AUDIO]", "[BEGIN_AUDIO]", "[TRANSCRIBE]"])
    encoder = dict(hidden_size=ENCODER["d_model"], num_hidden_layers=ENCODER["encoder_layers"],
                   num_attention_heads=ENCODER["encoder_attention_heads"], intermediate_size=ENCODER["encoder_ffn_dim"],
                   max_source_positions=ENCODER["max_source_positions"], num_mel_bins=128)   # FFN = 4 x d: stack 4
    config = VoxtralConfig(audio_config=encoder,
                           text_config=dict(size.lm, vocab_size=len(tok), head_dim=64, rope_theta=1e8,
                                            eos_token_id=tok.eos_token_id),
                           audio_token_id=tok.convert_tokens_to_ids("[AUDIO]"),
                           architectures=["VoxtralForConditionalGeneration"])
    torch.manual_seed(0)
    model = VoxtralForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return VoxtralReference(model, tok)


register(BenchModel("voxtral", "<s>[INST][BEGIN_AUDIO][AUDIO]", build_voxtral,
                    "transformers VoxtralProcessor features + VoxtralForConditionalGeneration.generate "
                    "(prompt ids as mistral_common writes them)", suffix="[/INST]"))


# --- Qwen2.5-Omni thinker: transformers' Qwen2_5OmniProcessor + Qwen2_5OmniThinkerForConditionalGeneration -
OMNI_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
               "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
               "vision_eos_token": "<|vision_eos|>"}


class OmniReference(Reference):
    def __init__(self, model, tok):
        from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

        class AudioOnlyProcessor(Qwen2_5OmniProcessor):      # no image / video processors (PIL, torchvision)
            def check_argument_for_proper_class(self, name, argument):
                return type(argument)

        self.model, self.tok = model, tok
        for attribute, token in OMNI_TOKENS.items():
            setattr(tok, attribute, token)
            setattr(tok, attribute + "_id", tok.convert_tokens_to_ids(token))
        self.processor = AudioOnlyProcessor(image_processor=None, video_processor=None,
                                            feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)

    @torch.no_grad()
    def generate(self, requests, max_new, dtype):
        inputs = self.processor(text=[q for _, q in requests], audio=[a for a, _ in requests], sampling_rate=16000,
                                return_tensors="pt", padding=True)
        inputs["input_features"] = inputs["input_features"].to(dtype)
# --- Phi-4-multimodal: transformers' Phi4MultimodalProcessor + Phi4MultimodalForCausalLM ------------
PHI4_AUDIO_TOKEN = "<|endoftext11|>"


class Phi4MultimodalReference(Reference):
    """transformers' Phi-4 feature extractor and processor (its image processor left out: it needs
    torchvision), Phi4MultimodalForCausalLM.generate; prompts write vLLM's <|audio_1|>, given to
    transformers as the audio token its processor expands."""

    def __init__(self, model, tok):
        from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalProcessor

        class AudioOnlyProcessor(Phi4MultimodalProcessor):
            def check_argument_for_proper_class(self, name, argument):
                return type(argument)

        tok.audio_token, tok.audio_token_id = PHI4_AUDIO_TOKEN, tok.convert_tokens_to_ids(PHI4_AUDIO_TOKEN)
        tok.image_token, tok.image_token_id = "<|endoftext10|>", tok.convert_tokens_to_ids("<|endoftext10|>")
        self.model, self.tok = model, tok
        self.processor = AudioOnlyProcessor(image_processor=None, audio_processor=Phi4MultimodalFeatureExtractor(),
                                            tokenizer=tok)

    @torch.no_grad()
    def generate(self, requests, max_new, dtype):
        texts = [q.replace("<|audio_1|>", PHI4_AUDIO_TOKEN) for _, q in requests]
        inputs = self.processor(text=texts, audio=[a for a, _ in requests], sampling_rate=16000, return_tensors="pt",
                                padding=True)
        inputs["audio_input_features"] = inputs["audio_input_features"].to(dtype)
        out = self.model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                  pad_token_id=self.tok.eos_token_id)
        return out[:, inputs["input_ids"].shape[1]:].tolist()


def build_qwen2_5_omni(path: str, size: Size) -> Reference:
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
    tok = byte_tokenizer(path, list(OMNI_TOKENS.values()))
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in OMNI_TOKENS.items()}
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(ENCODER, num_mel_bins=128, n_window=100, output_dim=size.lm_hidden),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=size.lm_hidden,
                           fullatt_block_indexes=[0]),
        text_config=dict(size.lm, vocab_size=len(tok), rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
        eos_token_id=tok.eos_token_id, architectures=["Qwen2_5OmniThinkerForConditionalGeneration"])
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return OmniReference(model, tok)


register(BenchModel("qwen2_5_omni", "<|audio_bos|><|AUDIO|><|audio_eos|>", build_qwen2_5_omni,
                    "transformers Qwen2_5OmniProcessor + Qwen2_5OmniThinkerForConditionalGeneration.generate"))


# --- MiniCPM-o 2.6: openbmb's model is remote code; its audio path from transformers parts -----------
MINICPMO_POOL, MINICPMO_CHUNK = 2, 50            # audio_pool_step; encoder frames in audio_chunk_length (1 s)


class MiniCPMOProjector(nn.Module):
    """MiniCPM-o's MultiModalProjector: linear, ReLU, linear."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim_in, dim_out), nn.Linear(dim_out, dim_out)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


class MiniCPMOReference(Reference):
    """openbmb's processing_minicpmo (30 s pieces, padding="max_length" features cut to the mask, the
    chunked `<|audio_start|><unk>...<|audio_end|>` placeholder) and modeling_minicpmo's
    get_audio_embedding (WhisperEncoder layers under the 1 s block-causal mask, projector, AvgPool1d)
    over transformers' WhisperFeatureExtractor, WhisperEncoder and Qwen2ForCausalLM.generate."""

    def __init__(self, encoder, projector, lm, tok):
        from transformers import WhisperFeatureExtractor
        self.encoder, self.projector, self.lm, self.tok = encoder, projector, lm, tok
        self.model = nn.ModuleList([encoder, projector, lm])
        self.extractor = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
        self.start, self.end, self.unk = (tok.convert_tokens_to_ids(t) for t in ("<|audio_start|>", "<|audio_end|>",
                                                                                 "<unk>"))

    def placeholder_ids(self, num_samples: int) -> list[int]:
        cnn = (math.ceil(num_samples / 160) - 1) // 2 + 1
        total = (cnn - MINICPMO_POOL) // MINICPMO_POOL + 1
        per_chunk = ((100 - 1) // 2 + 1 - MINICPMO_POOL) // MINICPMO_POOL + 1
        ids = []
        for done in range(0, total, per_chunk):
            ids += [self.start] + [self.unk] * min(per_chunk, total - done) + [self.end]
        return ids

    def embed(self, audio: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        enc, out = self.encoder, []
        for piece in [audio[i: i + 480000] for i in range(0, len(audio), 480000)]:
            inputs = self.extractor(piece, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                                    return_tensors="pt")
            lens = int(inputs.attention_mask.sum())
            x = F.gelu(enc.conv2(F.gelu(enc.conv1(inputs.input_features[:, :, :lens].to(dtype))))).transpose(1, 2)
            x = x + enc.embed_positions.weight[:x.shape[1]]
            t = x.shape[1]
            rows = torch.arange(t)[:, None]
            allowed = torch.arange(t)[None, :] < torch.clamp((rows // MINICPMO_CHUNK + 1) * MINICPMO_CHUNK, max=t)
            mask = torch.zeros(1, 1, t, t, dtype=dtype).masked_fill(~allowed, float("-inf"))
            for layer in enc.layers:
                x = layer(x, attention_mask=mask)
                x = x[0] if isinstance(x, tuple) else x
            embeds = F.avg_pool1d(self.projector(enc.layer_norm(x)).transpose(1, 2), MINICPMO_POOL).transpose(1, 2)
            out.append(embeds[0, :((lens - 1) // 2 + 1 - MINICPMO_POOL) // MINICPMO_POOL + 1])
        return torch.cat(out)

    @torch.no_grad()
    def generate(self, requests, max_new, dtype):
        rows = []
        for audio, text in requests:
            before, after = text.split("(<audio>./</audio>)")
            ids = self.tok.encode(before) + self.placeholder_ids(len(audio)) + self.tok.encode(after)
            x = self.lm.get_input_embeddings()(torch.tensor(ids))
            x[torch.tensor(ids) == self.unk] = self.embed(audio, dtype)
            rows.append(x)
        embeds, mask = left_pad(rows)
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new,
                               min_new_tokens=max_new, do_sample=False, pad_token_id=self.tok.eos_token_id)
        return out.tolist()


def build_minicpmo(path: str, size: Size) -> Reference:
    import json
    import os
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    tok = byte_tokenizer(path, ["<unk>", "<|audio_start|>", "<|audio_end|>"])
    audio_config = WhisperConfig(**ENCODER, num_mel_bins=80)
    text_config = Qwen2Config(**size.lm, vocab_size=len(tok), tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    encoder, lm = WhisperEncoder(audio_config).eval(), Qwen2ForCausalLM(text_config).eval()
    projector = MiniCPMOProjector(ENCODER["encoder_ffn_dim"] // 4, size.lm_hidden).eval()
    config = {**text_config.to_dict(), "architectures": ["MiniCPMO"], "model_type": "minicpmo",
              "audio_pool_step": MINICPMO_POOL, "audio_chunk_length": 1.0, "init_audio": True,
              "audio_config": audio_config.to_dict()}
    weights = {f"apm.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({f"audio_projection_layer.{k}": v for k, v in projector.state_dict().items()})
    weights.update({f"llm.{k}": v for k, v in lm.state_dict().items()})
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return MiniCPMOReference(encoder, projector, lm, tok)


register(BenchModel("minicpmo", "(<audio>./</audio>)", build_minicpmo,
                    "transformers WhisperFeatureExtractor + WhisperEncoder layers (1 s block-causal mask) + "
                    "MiniCPM-o's projector and pooling + Qwen2ForCausalLM.generate (openbmb's model is remote code)"))
def build_phi4_multimodal(path: str, size: Size) -> Reference:
    """The conformer at the shared encoder's size (4 blocks, 384 wide, 6 heads, FFN 1536, 384 subsampling
    channels); the LM with Phi-4's partial rotary factor (0.75)."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM
    tok = byte_tokenizer(path, ["<|endoftext10|>", PHI4_AUDIO_TOKEN])
    d = ENCODER["d_model"]
    config = Phi4MultimodalConfig(
        **size.lm, vocab_size=len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.75},
        audio_config=dict(hidden_size=d, intermediate_size=ENCODER["encoder_ffn_dim"],
                          num_blocks=ENCODER["encoder_layers"], num_attention_heads=ENCODER["encoder_attention_heads"],
                          ext_pw_out_channel=d, depthwise_separable_out_channel=d, nemo_conv_channels=d,
                          audio_token_id=tok.convert_tokens_to_ids(PHI4_AUDIO_TOKEN)),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28,
                           image_token_id=tok.convert_tokens_to_ids("<|endoftext10|>")),
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        architectures=["Phi4MultimodalForCausalLM"])
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(config).eval()
    model.save_pretrained(path)
    return Phi4MultimodalReference(model, tok)


register(BenchModel("phi4_multimodal", "<|audio_1|>", build_phi4_multimodal,
                    "transformers Phi4MultimodalProcessor + Phi4MultimodalForCausalLM.generate"))
