"""The special tokens of a Whisper checkpoint and how to decode its text tokens."""
from dataclasses import dataclass, field

from hark.transcribe.languages import LANGUAGES, TO_LANGUAGE_CODE
from hark.transcribe.options import InvalidTranscriptionRequest

TIME_PRECISION = 0.02  # seconds per timestamp token


@dataclass
class WhisperVocab:
    tokenizer: object
    eot: int
    sot: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    transcribe: int
    translate: int
    language_tokens: dict[str, int]      # language code -> token id; empty for English-only checkpoints
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    alignment_heads: list[tuple[int, int]] = field(default_factory=list)   # (decoder layer, head)

    @classmethod
    def from_checkpoint(cls, tokenizer, generation_config: dict) -> "WhisperVocab":
        """`generation_config`: the fields of HF's generation_config.json (the CT2 reader writes them too)."""
        def token(*names: str) -> int:
            for name in names:
                token_id = tokenizer.convert_tokens_to_ids(name)
                if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == name:
                    return token_id
            raise InvalidTranscriptionRequest(f"the model's tokenizer has no {names[0]} token; it is not a Whisper checkpoint")

        no_timestamps = token("<|notimestamps|>")
        languages = {}
        if generation_config.get("is_multilingual", True) and len(tokenizer) >= 51865:
            languages = {code: tokenizer.convert_tokens_to_ids(f"<|{code}|>") for code in LANGUAGES}
            languages = {code: i for code, i in languages.items()
                         if i is not None and tokenizer.convert_ids_to_tokens(i) == f"<|{code}|>"}
        return cls(
            tokenizer=tokenizer,
            eot=token("<|endoftext|>"),
            sot=token("<|startoftranscript|>"),
            sot_prev=token("<|startofprev|>"),
            no_speech=token("<|nospeech|>", "<|nocaptions|>"),
            no_timestamps=no_timestamps,
            timestamp_begin=no_timestamps + 1,
            transcribe=token("<|transcribe|>"),
            translate=token("<|translate|>"),
            language_tokens=languages,
            suppress_tokens=list(generation_config.get("suppress_tokens") or []),
            begin_suppress_tokens=list(generation_config.get("begin_suppress_tokens") or []),
            alignment_heads=[tuple(h) for h in generation_config.get("alignment_heads") or []],
        )

    @property
    def is_multilingual(self) -> bool:
        return bool(self.language_tokens)

    def language_code(self, language: str | None) -> str | None:
        """'en', 'English' or 'english' -> 'en'; None stays None (detect)."""
        if language is None:
            return None
        code = language.lower()
        code = TO_LANGUAGE_CODE.get(code, code)
        if code not in LANGUAGES:
            raise InvalidTranscriptionRequest(
                f"unknown language {language!r}; use an ISO 639-1 code such as 'en', 'de' or 'ja'")
        if not self.is_multilingual and code != "en":
            raise InvalidTranscriptionRequest(
                f"this model is English-only and cannot transcribe language {language!r}; use a multilingual Whisper model")
        if self.is_multilingual and code not in self.language_tokens:
            raise InvalidTranscriptionRequest(f"this model has no token for language {language!r}")
        return code

    def sot_sequence(self, language: str | None, task: str) -> list[int]:
        """<|startoftranscript|> [<|lang|> <|task|>] (English-only checkpoints take neither)."""
        if not self.is_multilingual:
            return [self.sot]
        task_token = self.translate if task == "translate" else self.transcribe
        return [self.sot, self.language_tokens[language or "en"], task_token]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens: list[int]) -> str:
        """Text of the text tokens; special and timestamp tokens are dropped."""
        return self.tokenizer.decode([t for t in tokens if t < self.eot])

    def is_timestamp(self, token: int) -> bool:
        return token >= self.timestamp_begin

    def timestamp_token(self, seconds: float) -> int:
        return self.timestamp_begin + round(seconds / TIME_PRECISION)
