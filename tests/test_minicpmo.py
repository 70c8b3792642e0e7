"""MiniCPM-o 2.6 (audio path) on hark: greedy parity with a reference composed from transformers'
WhisperFeatureExtractor, WhisperEncoder (its layers under MiniCPM-o's 1 s block-causal mask),
a torch linear-ReLU-linear projector, AvgPool1d and Qwen2ForCausalLM, following MiniCPM-o's
modeling_minicpmo.py / processing_minicpmo.py; on a tiny random checkpoint written the way the
published one is (config.json model_type "minicpmo", remote-code tokenizer class, apm.* /
audio_projection_layer.* / llm.* weights plus vision and TTS weights hark skips)."""
import base64
import io
import json
import math
import os
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import make_byte_tokenizer, randomize
from hark import LLM, SamplingParams
from test_qwen2_audio import speech

MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
TAG = "(<audio>./</audio>)"
SPECIALS = ["<unk>", "<|audio_start|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>", "<|tts_bos|>",
            "<|tts_eos|>"]
POOL, CHUNK_FRAMES = 2, 50          # audio_pool_step; encoder frames in audio_chunk_length = 1 s


def placeholder(num_samples: int) -> str:
    """MiniCPM-o's get_audio_placeholder(audio_lens, chunk_input=True, chunk_length=1)."""
    cnn = (math.ceil(num_samples / 160) - 1) // 2 + 1
    total = (cnn - POOL) // POOL + 1
    per_chunk = ((100 - 1) // 2 + 1 - POOL) // POOL + 1
    text, done = "", 0
    for _ in range((total + per_chunk - 1) // per_chunk):
        n = min(per_chunk, total - done)
        text += "<|audio_start|>" + "<unk>" * n + "<|audio_end|>"
        done += n
    return text


class Projector(nn.Module):
    """MiniCPM-o's MultiModalProjector."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, dim_out)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))


class Reference:
    def __init__(self, encoder, projector, lm, tok):
        self.encoder, self.projector, self.lm, self.tok = encoder, projector, lm, tok
        self.pooler = nn.AvgPool1d(POOL, stride=POOL)

    @torch.no_grad()
    def embed(self, audio: np.ndarray) -> torch.Tensor:
        """processing_minicpmo's audio_feature_extract (30 s pieces, padding="max_length", cut to the
        attention mask) and modeling_minicpmo's get_audio_embedding with chunk_length 1, each piece on its own."""
        from transformers import WhisperFeatureExtractor
        fe = WhisperFeatureExtractor(feature_size=80)
        out = []
        for piece in [audio[i: i + 480000] for i in range(0, len(audio), 480000)]:
            inputs = fe(piece, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                        return_tensors="pt")
            lens = int(inputs.attention_mask.sum())
            feats = inputs.input_features[:, :, :lens]
            enc = self.encoder
            x = nn.functional.gelu(enc.conv2(nn.functional.gelu(enc.conv1(feats)))).permute(0, 2, 1)
            x = x + enc.embed_positions.weight[:x.shape[1]]
            t = x.shape[1]
            rows = torch.arange(t)[:, None]
            allowed = torch.arange(t)[None, :] < torch.clamp((rows // CHUNK_FRAMES + 1) * CHUNK_FRAMES, max=t)
            mask = torch.zeros(1, 1, t, t)
            mask[:, :, ~allowed] = float("-inf")
            for layer in enc.layers:
                x = layer(x, attention_mask=mask)
                x = x[0] if isinstance(x, tuple) else x
            embeds = self.projector(enc.layer_norm(x))
            embeds = self.pooler(embeds.transpose(1, 2)).transpose(1, 2)
            n = ((lens - 1) // 2 + 1 - POOL) // POOL + 1
            out.append(embeds[0, :n])
        return torch.cat(out)

    def prompt_ids(self, text: str, audios) -> list[int]:
        """processing_minicpmo's _convert_omni_to_inputs: each tag replaced by its placeholder, then tokenized."""
        chunks = re.split(r"(\(<audio>\./</audio>\))", text)
        it = iter(audios)
        return self.tok.encode("".join(placeholder(len(next(it))) if c == TAG else c for c in chunks))

    @torch.no_grad()
    def inputs_embeds(self, text: str, audios):
        """modeling_minicpmo's get_omni_embedding (chunk_input): the clips' embeddings one after another
        over the spans between <|audio_start|> and <|audio_end|>."""
        ids = self.prompt_ids(text, audios)
        x = self.lm.get_input_embeddings()(torch.tensor([ids]))
        if audios:
            embeds = torch.cat([self.embed(a) for a in audios])
            start, end = (self.tok.convert_tokens_to_ids(t) for t in ("<|audio_start|>", "<|audio_end|>"))
            starts = [i + 1 for i, t in enumerate(ids) if t == start]
            ends = [i for i, t in enumerate(ids) if t == end]
            pos = 0
            for a, b in zip(starts, ends):
                x[0, a:b] = embeds[pos: pos + b - a]
                pos += b - a
            assert pos == embeds.shape[0]
        return ids, x

    @torch.no_grad()
    def generate(self, text: str, audios) -> list[int]:
        ids, x = self.inputs_embeds(text, audios)
        out = self.lm.generate(inputs_embeds=x, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                               pad_token_id=self.tok.eos_token_id)
        return out[0].tolist()

    @torch.no_grad()
    def logprobs(self, text: str, audios, generated: list[int]) -> torch.Tensor:
        ids, x = self.inputs_embeds(text, audios)
        x = torch.cat([x, self.lm.get_input_embeddings()(torch.tensor([generated]))], dim=1)
        return torch.log_softmax(self.lm(inputs_embeds=x).logits[0].float(), dim=-1), len(ids)


def make_tiny_minicpmo(path: str) -> Reference:
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    tok = make_byte_tokenizer(path, SPECIALS)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    tok_config.update(tokenizer_class="MiniCPMOTokenizerFast", unk_token="<unk>",       # as the hub's
                      auto_map={"AutoTokenizer": ["tokenization_minicpmo_fast.MiniCPMOTokenizerFast", None]})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f)
    audio_config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                 num_mel_bins=80, max_source_positions=1500)
    text_config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                              tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    encoder, lm, projector = WhisperEncoder(audio_config), Qwen2ForCausalLM(text_config), Projector(32, 64)
    for i, module in enumerate([encoder, lm, projector]):
        randomize(module, std=0.1, seed=i)
        module.eval()
    config = {**text_config.to_dict(), "architectures": ["MiniCPMO"], "model_type": "minicpmo",
              "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMOConfig"}, "audio_pool_step": POOL,
              "audio_chunk_length": 1.0, "chunk_input": True, "init_audio": True, "init_vision": True,
              "init_tts": True, "query_num": 64, "vision_config": {"model_type": "siglip_vision_model"},
              "tts_config": {"model_type": "conditional_chattts"}, "audio_config": audio_config.to_dict()}
    weights = {f"apm.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({f"audio_projection_layer.{k}": v for k, v in projector.state_dict().items()})
    weights.update({f"llm.{k}": v for k, v in lm.state_dict().items()})
    weights.update({"vpm.embeddings.patch_embedding.weight": torch.zeros(4, 3), "resampler.query": torch.zeros(2, 4),
                    "tts.emb_text.weight": torch.zeros(3, 2)})
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return Reference(encoder, projector, lm, tok)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("minicpmo"))
    return path, make_tiny_minicpmo(path)


# Lengths whose sample counts are not multiples of 160 (mel frames by ceil, as the feature extractor's mask)
CASES = [
    ("just text, no audio", []),
    (f"{TAG}\nwhat is said?", [2.7913]),
    (f"first {TAG} then {TAG} compare", [12.3407, 2.7913]),
    (f"{TAG}\nthe long one", [31.27]),
]


def test_placeholder_expansion_matches_minicpmo_processor(ckpt):
    path, ref = ckpt
    llm = LLM(path)
    unk, start = (ref.tok.convert_tokens_to_ids(t) for t in ("<unk>", "<|audio_start|>"))
    for text, secs in CASES:
        audios = [speech(s) for s in secs]
        processed = llm.llm_engine.processor.process({"prompt": text, "multi_modal_data": {"audio": audios}})
        assert processed.prompt_token_ids == ref.prompt_ids(text, audios)
    # 2.7913 s: 44660 samples, 280 mel frames, 140 encoder frames, 70 embeddings in 3 one-second chunks
    processed = llm.llm_engine.processor.process({"prompt": TAG, "multi_modal_data": {"audio": speech(2.7913)}})
    assert processed.prompt_token_ids.count(unk) == 70 and processed.prompt_token_ids.count(start) == 3
    assert len(processed.prompt_token_ids) == 76
    # 31.27 s: a 30 s window (750 embeddings) and a 1.27 s one (32); 782 in 32 chunks, as for the whole clip
    processed = llm.llm_engine.processor.process({"prompt": TAG, "multi_modal_data": {"audio": speech(31.27)}})
    assert [i.num_embeds for i in processed.mm_items] == [750 + 60, 32 + 4]
    assert processed.prompt_token_ids.count(unk) == 782


def test_greedy_matches_reference(ckpt):
    path, ref = ckpt
    llm = LLM(path, max_num_batched_tokens=256)   # chunked prefill cuts through audio spans
    prompts = [{"prompt": text, "multi_modal_data": {"audio": [(speech(s), 16000) for s in secs]}}
               if secs else text for text, secs in CASES]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [ref.generate(text, [speech(s) for s in secs]) for text, secs in CASES]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.executor.runner.encoder_items == 4        # 4 distinct windows, each encoded once


def test_logprobs_close_to_reference(ckpt):
    path, ref = ckpt
    text, secs = CASES[2]
    audios = [speech(s) for s in secs]
    out = LLM(path).generate({"prompt": text, "multi_modal_data": {"audio": audios}},
                             SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3),
                             use_tqdm=False)[0].outputs[0]
    expected, n_prompt = ref.logprobs(text, audios, out.token_ids)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(entry[token].logprob - expected[n_prompt - 1 + step, token].item()) < 1e-3


def wav_part(seconds: float) -> dict:
    buf = io.BytesIO()
    sf.write(buf, speech(seconds), 16000, format="WAV", subtype="FLOAT")
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}


def test_chat_template_encoder_and_prefix_cache(ckpt):
    path, ref = ckpt
    llm = LLM(path)
    part = wav_part(5.3)
    first = llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "who speaks?"}]}], GREEDY,
                     use_tqdm=False)[0]
    assert first.prompt == ("<|im_start|>user\n(<audio>./</audio>)\nwho speaks?<|im_end|>\n"
                            "<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>")
    assert first.outputs[0].token_ids == ref.generate(first.prompt, [speech(5.3)])
    second = llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "what about?"}]}], GREEDY,
                      use_tqdm=False)[0]
    assert llm.llm_engine.executor.runner.encoder_items == 1
    assert second.num_cached_tokens >= 128                 # 132 + 12 audio tokens before the question
    text_only = llm.chat([{"role": "user", "content": "hello"}], GREEDY, use_tqdm=False)[0]
    assert "<|spk_bos|>" not in text_only.prompt             # the tokenizer's own template


def test_limits_and_bad_input(ckpt):
    path, _ = ckpt
    llm = LLM(path, limit_mm_per_prompt={"audio": 1})
    two = {"prompt": f"{TAG}{TAG}", "multi_modal_data": {"audio": [speech(1.0), speech(2.0)]}}
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 1"):
        llm.generate(two, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 audio placeholder"):
        llm.generate({"prompt": f"{TAG} and {TAG}", "multi_modal_data": {"audio": [speech(1.0)]}}, GREEDY,
                     use_tqdm=False)


def test_audio_embeds_go_over_the_unk_tokens(ckpt):
    path, ref = ckpt
    llm = LLM(path, enable_mm_embeds=True)
    audio = speech(2.7913)
    embeds = ref.embed(audio)
    from_embeds = llm.generate({"prompt": f"{TAG}\nsay", "multi_modal_data": {"audio_embeds": embeds}}, GREEDY,
                               use_tqdm=False)[0]
    from_audio = llm.generate({"prompt": f"{TAG}\nsay", "multi_modal_data": {"audio": audio}}, GREEDY,
                              use_tqdm=False)[0]
    assert from_embeds.prompt_token_ids == from_audio.prompt_token_ids
    assert from_embeds.outputs[0].token_ids == from_audio.outputs[0].token_ids


def test_config_errors_are_clear(tmp_path):
    from hark.models.minicpmo import read_config
    with pytest.raises(ValueError, match="no audio_config"):
        read_config(str(tmp_path), {"model_type": "minicpmo"})
    with pytest.raises(ValueError, match="init_audio false"):
        read_config(str(tmp_path), {"model_type": "minicpmo", "audio_config": {}, "init_audio": False})


def test_served_chat_matches_offline(ckpt):
    import httpx
    import openai
    from hark.engine.async_engine import AsyncLLMEngine
    from hark.server.app import BackgroundServer, build_app
    from hark.server.metrics import Metrics
    from hark.server.state import ServedModel
    path, _ = ckpt
    llm = LLM(path, max_model_len=1024, num_kv_blocks=256)
    messages = [{"role": "user", "content": [wav_part(3.3), {"type": "text", "text": "What is said?"}]}]
    offline = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    metrics = Metrics()
    app = build_app([ServedModel("minicpmo", AsyncLLMEngine(llm.llm_engine), metrics)], metrics)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="minicpmo", messages=messages, temperature=0, max_tokens=8)
        assert r.choices[0].message.content == offline.outputs[0].text
        assert r.usage.prompt_tokens == len(offline.prompt_token_ids) > 82 + 8   # 82 audio embeddings, 4 chunks
        bad = httpx.post(url + "/v1/chat/completions", json={"model": "minicpmo", "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": base64.b64encode(b"RIFF" + bytes(100)).decode(), "format": "wav"}}]}]})
        assert bad.status_code == 400 and bad.json()["error"]["message"]
