"""Structured outputs with xgrammar: grammars compiled once per spec, one matcher per sequence.

One `StructuredOutputs` per engine holds xgrammar's tokenizer info (built once, with the engine's
vocab size and stop tokens) and its GrammarCompiler, whose cache keeps every compiled grammar (up to
CACHE_BYTES). Each constrained sequence gets its own GrammarMatcher: before sampling, `bitmask` asks
the matchers of a batch which tokens may come next; the sampler masks the other logits; the engine
then advances the matcher with the sampled token and ends the sequence when its grammar terminates.
JSON whitespace runs are capped at MAX_WHITESPACE characters so that a model cannot loop on blanks.

xgrammar 0.2 compiles a string's minLength / maxLength to a class that lets raw control characters
through (invalid JSON; mlc-ai/xgrammar#800), so such strings are given to it as the same bounds
written as a `pattern` over the code points a JSON string holds unescaped (no escapes, as before).
Spelled as explicit ranges it also keeps out UTF-8-encoded surrogates and overlong forms, which
xgrammar's byte-level strings otherwise admit (each decodes to several U+FFFD).
"""
import json
import os
import re
from hark.sampling import StructuredOutputsParams
from hark.step import GrammarMask

MAX_WHITESPACE = 20
CACHE_BYTES = 256 * 2**20
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _clean(error: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(error).strip().split("\n")[0]
    return _XGRAMMAR_PREFIX.sub("", text)


# one character a JSON string holds unescaped: no control character, quote, backslash or surrogate
# (the range ends are the characters themselves: xgrammar's regex reads no \U escape)
_JSON_CHAR = "^[ !#-\\[\\]-\ud7ff\ue000-\U0010ffff]"
_DATA_KEYS = {"enum", "const", "default", "examples"}     # values, not subschemas


def json_safe_schema(schema):
    """schema with the length bounds of its strings written as patterns (see the module doc)."""
    if isinstance(schema, list):
        return [json_safe_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else json_safe_schema(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = _JSON_CHAR + f"{{{low},{high}}}$"
    return out


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)     # JSON string escapes are xgrammar's literal escapes


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ValueError("structured outputs need xgrammar, which is not installed: "
                             "pip install 'hark[structured]'.") from None
        self.xgr = xgr
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                                 stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=min(8, os.cpu_count() or 1),
                                            cache_limit_bytes=CACHE_BYTES)

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of spec (cached by xgrammar); ValueError if the spec is not a valid one."""
        kind, value = spec.kind, getattr(spec, spec.kind)
        try:
            if kind in ("json", "json_object"):
                schema = json_safe_schema(value) if kind == "json" else {"type": "object"}
                return self.compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=not spec.disable_any_whitespace,
                    max_whitespace_cnt=None if spec.disable_any_whitespace else MAX_WHITESPACE,
                    strict_mode=kind == "json")
            if kind == "regex":
                return self.compiler.compile_regex(value)
            if kind == "choice":
                return self.compiler.compile_grammar("root ::= " + " | ".join(_ebnf_literal(c) for c in value))
            if kind == "grammar":
                return self.compiler.compile_grammar(value)
            return self.compiler.compile_structural_tag(value)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{kind} cannot be compiled: {_clean(e)}") from None

    def matcher(self, spec: StructuredOutputsParams):
        return self.xgr.GrammarMatcher(self.compile(spec))

    def bitmask(self, matchers: list) -> "GrammarMask | None":
        """What the matchers of a batch allow next (None entries: unconstrained rows), or None when no
        row is constrained."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        mask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab_size)   # all allowed
        for i in rows:
            matchers[i].fill_next_token_bitmask(mask, i)
        return GrammarMask(mask, rows)
