"""A CTranslate2 Whisper directory's tokenizer on the `tokenizers` library alone.

tokenizer.json holds the byte-level BPE and the control tokens; vocabulary.txt adds the timestamp
tokens <|0.00|> .. <|30.00|> after them. This class answers the calls hark makes of a tokenizer
(encode, decode, token <-> id, len) the way transformers' WhisperTokenizerFast does, without
importing transformers (about a second of start-up). `to_transformers()` gives the full
WhisperTokenizerFast where its other methods are wanted (saving a checkpoint, tests).
"""
import json
import os
import re

from tokenizers import AddedToken, Tokenizer

TIMESTAMP_TOKEN = re.compile(r"<\|\d+\.\d+\|>")


class WhisperTokenizer:
    def __init__(self, path: str, vocabulary: list[str]):
        self.path, self.vocabulary = path, vocabulary
        self.backend = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        known = self.backend.get_vocab_size(with_added_tokens=True)
        extra = vocabulary[known:]
        # As on the HF hub: control tokens are special, timestamps are plain added tokens after them.
        self.backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in extra if not TIMESTAMP_TOKEN.fullmatch(t)])
        self.backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t in extra if TIMESTAMP_TOKEN.fullmatch(t)])
        for token_id in (known - 1, len(vocabulary) - 1):
            if self.backend.id_to_token(token_id) != vocabulary[token_id]:
                raise ValueError(f"{path}: tokenizer.json and vocabulary.txt disagree at id {token_id}")
        self.eos_token = "<|endoftext|>"
        self.eos_token_id = self.backend.token_to_id(self.eos_token)
        self._sot_prev = self.backend.token_to_id("<|startofprev|>")
        self._sot = self.backend.token_to_id("<|startoftranscript|>")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        """Text of token_ids; timestamp tokens never show. skip_special_tokens also drops the
        <|startofprev|> prompt before <|startoftranscript|>, as WhisperTokenizerFast does."""
        ids = [int(t) for t in token_ids]
        if skip_special_tokens and self._sot_prev in ids:
            start = ids.index(self._sot_prev)
            end = ids.index(self._sot, start) if self._sot in ids[start:] else len(ids)
            ids = ids[:start] + ids[end:]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return TIMESTAMP_TOKEN.sub("", text)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def to_transformers(self):
        """The same vocabulary as transformers' WhisperTokenizerFast (imports transformers)."""
        from transformers import WhisperTokenizerFast
        with open(os.path.join(self.path, "tokenizer.json"), encoding="utf-8") as f:
            bpe = json.load(f)["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
        tokenizer = WhisperTokenizerFast(vocab=bpe["vocab"], merges=merges)
        extra = self.vocabulary[len(bpe["vocab"]):]
        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, special=True, normalized=False) for t in extra if not TIMESTAMP_TOKEN.fullmatch(t)]})
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra if TIMESTAMP_TOKEN.fullmatch(t)])
        tokenizer.set_prefix_tokens()
        return tokenizer
