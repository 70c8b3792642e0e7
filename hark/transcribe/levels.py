"""A window's log-mel floor set by its whole input, as openai-whisper and faster-whisper set it.

Whisper's log-mel keeps 8 decades (log10) below its maximum and clamps the rest. Those decoders take
the maximum over the whole file, so a near-silent stretch after speech is mostly floor, as silence
looks in training. Computed per 30 s window instead, the floor of a quiet window drops to 8 decades
below its own faint noise, which then looks like speech, and Whisper writes a confident " you" there.

The window's features are (max(log, own max - 8) + 4) / 4; since the input's maximum is at least the
window's, max(that, (input max - 8 + 4) / 4) is exactly the features with the input's floor.
"""
from dataclasses import replace

from hark.inputs import ProcessedPrompt

DECADES_KEPT = 8.0 / 4.0      # the clamp range in feature units ((log10 + 4) / 4)


def peak_level(processed: ProcessedPrompt) -> float:
    return float(processed.mm_items[0].features.max())


def with_input_floor(processed: ProcessedPrompt, input_peak: float) -> ProcessedPrompt:
    """`processed` with its window's log-mel clamped at `input_peak` (the input's peak_level) - 8 decades.
    A changed item gets its own hash, so cached encoder outputs of the unclamped window are not reused."""
    item = processed.mm_items[0]
    if peak_level(processed) >= input_peak:
        return processed
    floor = input_peak - DECADES_KEPT
    item = replace(item, features=item.features.clamp(min=floor), hash=f"{item.hash}/floor{floor:.6f}")
    return replace(processed, mm_items=[item])
