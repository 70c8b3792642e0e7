"""Ultravox on hark: greedy parity with a reference composed from transformers' WhisperEncoder and
LlamaForCausalLM plus fixie-ai's documented projector, on tiny random checkpoints written the way
the published ones are (config.json with model_type "ultravox", no remote code needed)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from conftest import make_byte_tokenizer, randomize
from hark import LLM, SamplingParams
from test_qwen2_audio import speech

MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
STACK = 8


class ReferenceProjector(nn.Module):
    """fixie-ai's UltravoxProjector: stack frames, RMSNorm, linear_1, SwiGLU, [ln_mid], linear_2, [ln_post]."""

    def __init__(self, d_audio: int, hidden: int, d_text: int, ln_mid: bool):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        super().__init__()
        self.ln_pre = LlamaRMSNorm(d_audio * STACK, eps=1e-6)
        self.linear_1 = nn.Linear(d_audio * STACK, hidden, bias=False)
        self.linear_2 = nn.Linear(hidden // 2, d_text, bias=False)
        if ln_mid:
            self.ln_mid = LlamaRMSNorm(hidden // 2, eps=1e-6)
        else:
            self.ln_post = LlamaRMSNorm(d_text, eps=1e-6)

    def forward(self, frames):                      # [T, D] of one clip
        t = math.ceil(frames.shape[0] / STACK) * STACK
        x = F.pad(frames, (0, 0, 0, t - frames.shape[0])).reshape(t // STACK, -1)
        x, gate = self.linear_1(self.ln_pre(x)).chunk(2, dim=-1)
        x = F.silu(gate) * x
        x = self.linear_2(self.ln_mid(x) if hasattr(self, "ln_mid") else x)
        return self.ln_post(x) if hasattr(self, "ln_post") else x


class Reference:
    def __init__(self, encoder, projector, lm, tok, audio_token_id):
        self.encoder, self.projector, self.lm, self.tok, self.audio_token_id = encoder, projector, lm, tok, audio_token_id

    @torch.no_grad()
    def embed(self, audio):
        """fixie-ai's UltravoxProcessor for one audio (at least 2 hops; transformers' feature extractor
        padded to the clip itself, to a whole hop; the frames cut into 3000-frame chunks, a last
        shorter one zero-padded to 3000) and its ModifiedWhisperEncoder (WhisperEncoder without the
        3000-frame requirement, keys past the chunk's valid frames masked), each chunk's
        projector outputs cut to ceil(valid frames / 16)."""
        from transformers import WhisperFeatureExtractor
        enc = self.encoder
        fe = WhisperFeatureExtractor(feature_size=enc.config.num_mel_bins)
        audio = np.pad(audio, (0, max(0, 320 - len(audio))))
        inputs = fe(audio, sampling_rate=16000, padding="longest", pad_to_multiple_of=160, truncation=False,
                    return_attention_mask=True, return_tensors="pt")
        feats, length, embeds = inputs.input_features, int(inputs.attention_mask.sum()), []
        for start in range(0, length, 3000):
            chunk, valid = feats[..., start:start + 3000], min(length - start, 3000)
            if start > 0:
                chunk = F.pad(chunk, (0, 3000 - chunk.shape[-1]))
            x = F.gelu(enc.conv2(F.gelu(enc.conv1(chunk)))).transpose(1, 2)
            x = x + enc.embed_positions.weight[:x.shape[1]]
            keys = torch.arange(x.shape[1]) < (valid - 1) // 2 + 1
            mask = torch.zeros(1, 1, 1, x.shape[1]).masked_fill(~keys, torch.finfo(x.dtype).min)
            for layer in enc.layers:
                x = layer(x, attention_mask=mask)
                x = x[0] if isinstance(x, tuple) else x
            embeds.append(self.projector(enc.layer_norm(x)[0])[:math.ceil(valid / 16)])
        return torch.cat(embeds)

    @torch.no_grad()
    def generate(self, text: str, audios) -> list[int]:
        ids = self.tok.encode(text)
        embeds = [self.embed(a) for a in audios]
        slots = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        for slot, e in reversed(list(zip(slots, embeds))):
            ids[slot:slot + 1] = [self.audio_token_id] * e.shape[0]
        x = self.lm.get_input_embeddings()(torch.tensor([ids]))
        positions = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if embeds:
            x[0, positions] = torch.cat(embeds)
        out = self.lm.generate(inputs_embeds=x, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                               pad_token_id=self.tok.eos_token_id)
        return out[0].tolist()


def make_tiny_ultravox(path: str, ln_mid: bool, separate_lm: bool, max_positions: int = 2048) -> Reference:
    """Writes an Ultravox checkpoint; with separate_lm the LM lives in its own folder named by
    text_model_id (as the published checkpoints name meta-llama's)."""
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    tok = make_byte_tokenizer(path, ["<|audio|>"])
    audio_config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                 num_mel_bins=80, max_source_positions=1500)
    text_config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                              tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                              architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    encoder, lm = WhisperEncoder(audio_config), LlamaForCausalLM(text_config)
    projector = ReferenceProjector(32, 96, 64, ln_mid)
    for i, module in enumerate([encoder, lm, projector]):
        randomize(module, std=0.1, seed=i)
    for module in (encoder, lm, projector):
        module.eval()
    config = {"architectures": ["UltravoxModel"], "model_type": "ultravox", "hidden_size": 96, "stack_factor": STACK,
              "projector_act": "swiglu", "projector_ln_mid": ln_mid, "norm_init": 0.4,
              "auto_map": {"AutoConfig": "ultravox_config.UltravoxConfig"},
              "audio_config": audio_config.to_dict()}
    weights = {f"audio_tower.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    if separate_lm:
        lm_path = os.path.join(path, "llama")
        lm.save_pretrained(lm_path)
        config["text_model_id"] = lm_path
    else:
        config["text_config"] = text_config.to_dict()
        weights.update({f"language_model.{k}": v for k, v in lm.state_dict().items()})
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return Reference(encoder, projector, lm, tok, tok.convert_tokens_to_ids("<|audio|>"))


@pytest.fixture(scope="module", params=[(True, False), (False, True)], ids=["ln_mid", "ln_post+text_model_id"])
def ckpt(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ultravox"))
    ln_mid, separate_lm = request.param
    return path, make_tiny_ultravox(path, ln_mid, separate_lm)


CASES = [
    ("just text, no audio", []),
    ("<|audio|>what is said?", [3.0]),
    ("first <|audio|> then <|audio|> compare", [10.3, 30.0]),
]


def test_greedy_matches_reference(ckpt):
    path, ref = ckpt
    llm = LLM(path)
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [(speech(s), 16000) for s in secs]}}
               if secs else text for text, secs in CASES]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [ref.generate(text, [speech(s) for s in secs]) for text, secs in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    n_audio = [sum(t == ref.audio_token_id for t in o.prompt_token_ids) for o in outs]
    assert n_audio == [0, 19, 65 + 188]                    # ceil(50 frames/s * s / 8)
    assert llm.llm_engine.executor.runner.encoder_calls == 1        # three clips, one batched encoder call


def test_chat_and_prefix_cache(ckpt):
    path, _ = ckpt
    import base64
    import io
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, speech(5.0), 16000, format="WAV")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
    llm = LLM(path)
    first = llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "who speaks?"}]}], GREEDY,
                     use_tqdm=False)[0]
    assert "<|audio|>\nwho speaks?" in first.prompt
    second = llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "what about?"}]}], GREEDY,
                      use_tqdm=False)[0]
    assert llm.llm_engine.executor.runner.encoder_items == 1
    assert second.num_cached_tokens >= 32


def test_config_errors_are_clear(tmp_path):
    from hark.models.ultravox import read_config
    with pytest.raises(ValueError, match="neither text_config nor text_model_id"):
        read_config(str(tmp_path), {"model_type": "ultravox", "audio_config": {}})
    with pytest.raises(ValueError, match="'gemma3_text' language model is not supported"):
        read_config(str(tmp_path), {"model_type": "ultravox", "audio_config": {},
                                    "text_config": {"model_type": "gemma3_text"}})
