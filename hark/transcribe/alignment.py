"""Word timing from cross-attention: the alignment heads' attention over audio frames, smoothed
with a median filter and aligned to the text tokens by dynamic time warping (openai-whisper's timing.py)."""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hark.transcribe.vocab import WhisperVocab
from hark.transcribe.words import split_to_word_tokens

FRAMES_PER_SECOND = 50     # encoder positions per second of audio (20 ms each)


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float        # seconds from the start of the window
    end: float
    probability: float


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of odd `width` along the last dimension, reflect-padded."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    padded = F.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect")
    return padded.unfold(-1, width, 1).sort(dim=-1).values[..., pad].reshape(shape)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through `cost` [N, M] from (0, 0) to (N-1, M-1), moving down, right
    or diagonally. Returns the path's (row indices, column indices).

    The accumulated cost is filled one anti-diagonal at a time: every cell of a diagonal depends only
    on the two diagonals before it, so each is one vectorized step.
    """
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    move = np.zeros((n + 1, m + 1), dtype=np.int8)   # 0 diagonal, 1 from above, 2 from the left
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        diagonal, above, left = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((diagonal < above) & (diagonal < left), 0, np.where((above < diagonal) & (above < left), 1, 2))
        total[i, j] = cost[i - 1, j - 1] + np.choose(step, [diagonal, above, left])
        move[i, j] = step
    move[0, :], move[:, 0] = 2, 1

    path = []
    i, j = n, m
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = move[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def align_words(
    vocab: WhisperVocab,
    language: str,
    text_tokens: list[int],
    logits: torch.Tensor,
    attention: torch.Tensor,
    num_frames: int,
    prompt_length: int,
    medfilt_width: int = 7,
) -> list[WordTiming]:
    """Time each word of `text_tokens`.

    The decoder was run on `prompt_length` prompt tokens (the SOT sequence and <|notimestamps|>),
    then `text_tokens`, then <|endoftext|>. logits: its [L, V] output; attention: the alignment
    heads' cross-attention probabilities [heads, L, 1500]; num_frames: valid mel frames of the window.
    """
    if not text_tokens:
        return []
    text_logits = logits[prompt_length - 1: prompt_length - 1 + len(text_tokens), : vocab.eot].float()
    token_probs = text_logits.softmax(dim=-1)[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()

    weights = attention[:, :, : max(num_frames // 2, 1)].float()
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # renormalize over real audio
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std.clamp_min(1e-12), medfilt_width)
    matrix = weights.mean(dim=0)[prompt_length - 1: prompt_length + len(text_tokens)]
    text_indices, time_indices = dtw(-matrix.double().numpy())

    words, word_tokens = split_to_word_tokens(vocab, language, text_tokens + [vocab.eot])
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / FRAMES_PER_SECOND
    return [
        WordTiming(word, tokens, float(jump_times[i]), float(jump_times[j]), float(np.mean(token_probs[i:j])))
        for word, tokens, i, j in zip(words, word_tokens, boundaries[:-1], boundaries[1:])
    ]
