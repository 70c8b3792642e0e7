"""hallucination_silence_threshold: the anomaly rule on hand-built words, and tiny.en on real speech
with a long silence in it."""
import glob
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from hark.transcribe import InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.hallucination import drop_hallucinations, is_segment_anomaly, word_anomaly_score
from hark.transcribe.result import Segment, Word

DATA = os.path.join(os.path.dirname(__file__), "data")
WAVS = sorted(glob.glob(os.path.join(DATA, "*.wav")))


def segment(start: float, words: list[Word]) -> Segment:
    return Segment(id=0, seek=0, start=start, end=words[-1].end if words else start, text="".join(w.word for w in words),
                   tokens=[], temperature=0.0, avg_logprob=0.0, compression_ratio=1.0, no_speech_prob=0.0, words=words)


def spoken(start: float, n: int = 5) -> Segment:
    """n clear words of 0.3 s each."""
    return segment(start, [Word(f" w{i}", start + 0.3 * i, start + 0.3 * (i + 1), 0.9) for i in range(n)])


def hallucinated(start: float) -> Segment:
    """Three unlikely, too-short words: scores about 1.9 each."""
    return segment(start, [Word(f" h{i}", start + 0.05 * i, start + 0.05 * (i + 1), 0.05) for i in range(3)])


def test_word_anomaly_score():
    assert word_anomaly_score(Word(" a", 0.0, 0.3, 0.9)) == 0.0
    assert word_anomaly_score(Word(" a", 0.0, 0.3, 0.1)) == 1.0
    assert word_anomaly_score(Word(" a", 0.0, 0.033, 0.9)) == pytest.approx(1.5)
    assert word_anomaly_score(Word(" a", 0.0, 3.5, 0.9)) == pytest.approx(1.5)
    assert word_anomaly_score(Word(" a", 0.0, 0.1, 0.1)) == pytest.approx(1 + 0.033 * 15)


def test_segment_anomaly_rule():
    assert not is_segment_anomaly(spoken(0.0))
    assert is_segment_anomaly(hallucinated(0.0))
    assert not is_segment_anomaly(None) and not is_segment_anomaly(segment(0.0, []))
    # one word of score 1 in a segment of one word: score + 0.01 ≥ count
    assert is_segment_anomaly(segment(0.0, [Word(" uh", 0.0, 0.3, 0.1)]))
    # score 1 over two words: not anomalous
    assert not is_segment_anomaly(segment(0.0, [Word(" uh", 0.0, 0.3, 0.1), Word(" yes", 0.3, 0.6, 0.9)]))
    # punctuation is not scored: the same segment with a short unlikely "." stays not anomalous
    assert not is_segment_anomaly(segment(0.0, [Word(" uh", 0.0, 0.3, 0.1), Word(".", 0.6, 0.61, 0.01),
                                                Word(" yes", 0.3, 0.6, 0.9)]))
    # only the first 8 words count: 8 clear words then anomalous ones
    many = spoken(0.0, 8).words + hallucinated(2.4).words * 3
    assert not is_segment_anomaly(segment(0.0, many))
    # a total of 3 is anomalous however many words
    assert is_segment_anomaly(segment(0.0, spoken(0.0, 5).words + [Word(" x", 2.0, 7.0, 0.9), Word(" y", 7.0, 7.3, 0.9)]))


def test_drop_only_anomalies_surrounded_by_silence():
    speech, ghost, after = spoken(0.0), hallucinated(10.0), spoken(20.0)
    assert drop_hallucinations([speech, ghost, after], 2.0, 30.0) == [speech, after]
    assert drop_hallucinations([speech, ghost, after], 15.0, 30.0) == [speech, ghost, after]   # silences too short
    later = spoken(5.0)             # ends at 6.5
    close = hallucinated(6.6)       # right after the speech: no silence before it
    assert drop_hallucinations([later, close, after], 2.0, 30.0) == [later, close, after]
    # at the audio's start (before the threshold) counts as silence before, as in openai-whisper
    assert drop_hallucinations([hallucinated(1.0), after], 2.0, 30.0) == [after]
    assert drop_hallucinations([spoken(0.0), spoken(10.0)], 2.0, 30.0) == [spoken(0.0), spoken(10.0)]
    # two hallucinations in a row in the silence: both go (the next one counts as silence after)
    assert drop_hallucinations([speech, hallucinated(10.0), hallucinated(10.2), after], 2.0, 30.0) == [speech, after]


def test_needs_word_timestamps():
    with pytest.raises(InvalidTranscriptionRequest, match="word_timestamps"):
        TranscriptionOptions(hallucination_silence_threshold=2.0)
    with pytest.raises(InvalidTranscriptionRequest, match="hallucination_silence_threshold"):
        TranscriptionOptions(hallucination_silence_threshold=-1, word_timestamps=True)


@pytest.fixture(scope="module")
def llm():
    from hark.llm import LLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM(dtype="float32")
    torch.set_num_threads(threads)


def speech_silence_speech() -> tuple[np.ndarray, float, float]:
    """A sentence, 8 s of faint noise with 1.2 s of time-reversed speech in its middle (babble tiny.en
    turns into unlikely, short words: an anomalous segment), 8 s more noise, another sentence; and where
    the first sentence ends and the second starts (seconds)."""
    first, second, babble = (sf.read(WAVS[i], dtype="float32")[0] for i in (1, 2, 0))
    noise = np.random.default_rng(0).normal(0, 3e-4, 8 * 16000).astype(np.float32)
    babble = babble[4 * 16000:int(5.2 * 16000)][::-1]
    audio = np.concatenate([first, noise, babble, noise, second])
    return audio, len(first) / 16000, (len(audio) - len(second)) / 16000


def inside(s: Segment, start: float, end: float) -> bool:
    return start + 0.5 < s.start and s.end < end - 0.5


@pytest.mark.parametrize("sequential", [False, True])
def test_real_speech_with_babble_in_a_long_silence(llm, sequential):
    audio, quiet_from, quiet_to = speech_silence_speech()
    options = dict(word_timestamps=True, condition_on_previous_text=sequential)
    plain = llm.transcribe(audio, **options)
    ghosts = [s for s in plain.segments if inside(s, quiet_from, quiet_to)]
    assert len(ghosts) == 1 and is_segment_anomaly(ghosts[0])         # the babble came out as words
    result = llm.transcribe(audio, hallucination_silence_threshold=2.0, **options)
    assert not [s for s in result.segments if inside(s, quiet_from, quiet_to)]
    assert [s.text for s in result.segments] == [s.text for s in plain.segments if s not in ghosts]
    assert [w.word for w in result.words] == [w.word for s in plain.segments if s not in ghosts for w in s.words]
    assert "young man" in result.text and "selfish" in result.text
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    # a threshold longer than the silences keeps everything; off is the output without the option
    assert llm.transcribe(audio, hallucination_silence_threshold=9.0, **options).to_dict() == plain.to_dict()
    assert llm.transcribe(audio, hallucination_silence_threshold=None, **options).to_dict() == plain.to_dict()


def test_cli_flag_turns_on_word_timestamps():
    from hark.cli import build_parser, main
    from hark.transcribe.command import _options
    options = _options(build_parser().parse_args(["transcribe", "--hallucination-silence-threshold", "2", "x.wav"]))
    assert options["hallucination_silence_threshold"] == 2.0
    assert options["word_timestamps"] and options["timestamps"]
    defaults = _options(build_parser().parse_args(["transcribe", "x.wav"]))
    assert defaults["hallucination_silence_threshold"] is None and not defaults["word_timestamps"]
    with pytest.raises(SystemExit) as exit:       # before any model loads
        main(["transcribe", "--hallucination-silence-threshold", "-1", "x.wav"])
    assert exit.value.code == 2
