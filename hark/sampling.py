"""SamplingParams: how to pick the next token and when to stop, as in vLLM; StructuredOutputsParams: the
grammar an output must follow."""
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class StructuredOutputsParams:
    """Exactly one of: a JSON schema (dict or JSON text), a regex, a list of choices, an EBNF grammar
    (xgrammar's GBNF dialect, rule `root`), any JSON object, or an xgrammar structural tag (JSON text)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False     # JSON without whitespace between tokens

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self):
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(self.KINDS)}; got "
                             f"{', '.join(given) or 'none'}.")
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema (an object).")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings.")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string.")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None         # top-k logprobs per generated token
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None
    # Beam search (hark.engine.beam): beam_width > 1 keeps that many beams and returns the best
    # hypotheses, ranked by cumulative logprob / output length ** length_penalty. patience None stops
    # as transformers' generate(num_beams=...) does; a number stops as openai-whisper's beam search does,
    # once round(beam_width * patience) hypotheses finished.
    beam_width: int = 1
    length_penalty: float = 1.0
    patience: float | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name, value, allowed):
            raise ValueError(f"{name} must be {allowed}, got {value!r}.")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            bad("n", self.n, "an integer in [1, 128]")
        if self.temperature < 0:
            bad("temperature", self.temperature, "≥ 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "0 or -1 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "a positive integer (or None for up to max_model_len)")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", self.min_tokens, "in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", self.logprobs, "in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", self.prompt_logprobs, "in [0, 20]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids", self.allowed_token_ids, "a non-empty list")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")
            self.structured_outputs.validate()
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides "
                                 "where the output ends.")
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= 64:
            bad("beam_width", self.beam_width, "an integer in [1, 64]")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool) \
                or not math.isfinite(self.length_penalty):
            bad("length_penalty", self.length_penalty, "a finite number")
        if self.patience is not None and (not isinstance(self.patience, (int, float)) or not 0 < self.patience <= 16):
            bad("patience", self.patience, "a number in (0, 16] (or None)")
        if self.beam_width > 1:
            given = [name for name, off in (("n", self.n == 1), ("stop", not self.stop),
                                            ("structured_outputs", self.structured_outputs is None))
                     if not off]
            if given:
                raise ValueError(f"beam search (beam_width > 1) cannot be combined with {', '.join(given)}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def uses_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclass
class BeamSearchParams:
    """vLLM's LLM.beam_search parameters. Hypotheses are ranked by cumulative logprob / (output tokens
    ** length_penalty), and the search stops as transformers' generate(num_beams=beam_width) does."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0            # > 0: the beams follow the logprobs of logits / temperature
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        self.sampling_params()          # validates

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(beam_width=self.beam_width, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              temperature=self.temperature, length_penalty=self.length_penalty,
                              include_stop_str_in_output=self.include_stop_str_in_output, logprobs=0)
