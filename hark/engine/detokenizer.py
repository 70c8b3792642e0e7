"""Incremental detokenization and stop-string handling.

Text is decoded over a short window of recent tokens (prefix_offset..end) and only the part past
read_offset is emitted, so a multi-byte UTF-8 character split across tokens appears once whole,
never as U+FFFD halves.
"""
from hark.engine.request import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        """Positions the window at the end of the prompt (a few tokens back for context)."""
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(seq.num_prompt_tokens - 5, 0)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special,
                                     clean_up_tokenization_spaces=False)

    def step(self, seq: Sequence) -> str:
        """Appends the text of seq's newest tokens to seq.text; returns the new text."""
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix_text = self.decode(ids[seq.prefix_offset: seq.read_offset], skip)
        full_text = self.decode(ids[seq.prefix_offset:], skip)
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""                                   # incomplete character: wait for more bytes
        new_text = full_text[len(prefix_text):]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        seq.text += new_text
        return new_text

    def flush(self, seq: Sequence) -> None:
        """At the end of a sequence: text still held back (bytes of a character that never completed)
        is appended as it decodes, U+FFFD included, as vLLM and transformers end such an output."""
        if seq.read_offset >= len(seq.token_ids):
            return
        skip = seq.params.skip_special_tokens
        prefix_text = self.decode(seq.token_ids[seq.prefix_offset: seq.read_offset], skip)
        full_text = self.decode(seq.token_ids[seq.prefix_offset:], skip)
        seq.text += full_text[len(prefix_text):]
        seq.read_offset = len(seq.token_ids)


def find_stop_string(seq: Sequence, new_text_len: int) -> str | None:
    """If a stop string appears in the newest text, trims seq.text at it and returns it."""
    params = seq.params
    if not params.stop or not new_text_len:
        return None
    longest = max(len(s) for s in params.stop)
    search_from = max(0, len(seq.text) - new_text_len - longest + 1)
    for stop in params.stop:
        at = seq.text.find(stop, search_from)
        if at != -1:
            seq.text = seq.text[: at + len(stop)] if params.include_stop_str_in_output else seq.text[:at]
            return stop
    return None
