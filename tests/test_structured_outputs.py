"""Structured outputs on a tiny random LM: unconstrained it writes garbage, so every output that parses
and validates shows the grammar at work. 50 random JSON schemas (fixed seed) are decoded in one batch
with unconstrained requests beside them; regex, choice and EBNF grammars; bad specs raise ValueError."""
import json
import random
import re

import jsonschema
import pytest

from hark.llm import LLM
from hark.sampling import SamplingParams, StructuredOutputsParams


@pytest.fixture(scope="module")
def llm(qwen2_ckpt):
    return LLM(qwen2_ckpt[0], max_model_len=512, max_num_seqs=64, num_kv_blocks=2048)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Objects with nested properties, arrays, enums, numbers, strings and required fields; strings and
    arrays are bounded so a random model finishes them."""
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": rng.choice([1, 10, 1000])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "a b"], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["id", "name", "tags", "score", "meta", "items", "ok", "kind"], rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names)))}


def test_50_random_schemas_parse_and_validate_beside_unconstrained_requests(llm):
    rng = random.Random(1234)
    schemas = [random_object(rng) for _ in range(50)]
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=480,
                                  structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(schemas)]
    free = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, seed=5, max_tokens=24)]
    outs = llm.generate(["{"] * 50 + ["hello", "the cat"], constrained + free, use_tqdm=False)
    for schema, out in zip(schemas, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
    alone = llm.generate(["hello", "the cat"], free, use_tqdm=False)   # the batch did not change them
    assert [o.outputs[0].text for o in outs[50:]] == [o.outputs[0].text for o in alone]
    assert [o.outputs[0].token_ids for o in outs[50:]] == [o.outputs[0].token_ids for o in alone]
    with pytest.raises(ValueError):           # and what they wrote is not JSON by itself
        json.loads(outs[50].outputs[0].text)


def test_regex_choice_grammar_and_json_object(llm):
    S = StructuredOutputsParams
    specs = [
        (S(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (S(choice=["yes", "no", 'say "hi"\n']), lambda t: t in ("yes", "no", 'say "hi"\n')),
        (S(grammar='root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "x" [0-9]'),
         lambda t: re.fullmatch(r"\((?:[a-c]|x[0-9])(?:,(?:[a-c]|x[0-9]))*\)", t)),
        (S(json={"type": "array", "items": {"type": "boolean"}, "maxItems": 4}, disable_any_whitespace=True),
         lambda t: t == json.dumps(json.loads(t)) and all(isinstance(v, bool) for v in json.loads(t))),
    ]
    params = [SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=200, structured_outputs=s) for s, _ in specs]
    outs = llm.generate(["x"] * len(specs), params, use_tqdm=False)
    for (spec, ok), out in zip(specs, outs):
        for c in out.outputs:
            assert c.finish_reason == "stop" and ok(c.text), (spec, c.text)
    # json_object: any object; a seeded sample that finishes, checked for shape
    out = llm.generate("x", SamplingParams(temperature=1.0, seed=11, max_tokens=480,
                                           structured_outputs=S(json_object=True)), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text


def test_the_grammar_ends_the_output_even_with_ignore_eos(llm):
    p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                       structured_outputs=StructuredOutputsParams(choice=["abc"]))
    c = llm.generate("x", p, use_tqdm=False)[0].outputs[0]
    assert c.text == "abc" and c.finish_reason == "stop" and len(c.token_ids) <= 4


@pytest.mark.parametrize("kwargs, message", [
    ({"json": {"type": "nope"}}, "Unsupported type"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "(abc"}, "parenthesis"),
    ({"grammar": "root ::= foo"}, "not defined"),
    ({"structural_tag": "{}"}, "structural_tag"),
    ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ({}, "exactly one"),
    ({"choice": []}, "non-empty list"),
])
def test_bad_specs_raise_value_error(llm, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**kwargs)),
                     use_tqdm=False)
    assert "/project/" not in str(e.value) and "cpp" not in str(e.value)
    assert not llm.llm_engine.has_unfinished_requests()


def test_min_tokens_with_a_grammar_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))


def test_preempted_requests_keep_their_grammar_state(qwen2_ckpt, llm):
    small = LLM(qwen2_ckpt[0], max_model_len=64, max_num_seqs=8, num_kv_blocks=5)
    grammar = StructuredOutputsParams(regex="([a-z]{3} ){20}")
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=grammar) for i in range(4)]
    outs = small.generate(["x"] * 4, params, use_tqdm=False)
    assert small.llm_engine.stats()["num_preemptions"] > 0
    roomy = llm.generate(["x"] * 4, params, use_tqdm=False)
    for out, want in zip(outs, roomy):
        assert re.fullmatch("([a-z]{3} ){20}", out.outputs[0].text) and out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].text == want.outputs[0].text
