"""Structured outputs and tool calling through hark serve with the real openai client, on a tiny random
LM (garbage unless constrained): response_format, vLLM's structured_outputs / guided_* fields, tools with
tool_choice auto / required / named / none, streamed tool-call deltas, and the 400s for what cannot be
honoured."""
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from hark.engine.async_engine import AsyncLLMEngine
from hark.llm import LLM
from hark.server.app import BackgroundServer, build_app
from hark.server.metrics import Metrics
from hark.server.state import ServedModel

HI = [{"role": "user", "content": "hi"}]
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "now", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS_KW = dict(tools=TOOLS, extra_body={"chat_template": TOOL_TEMPLATE})


@pytest.fixture(scope="module")
def url(qwen2_ckpt):
    llm = LLM(qwen2_ckpt[0], max_model_len=512, max_num_seqs=8, num_kv_blocks=256)
    metrics = Metrics()
    app = build_app([ServedModel("tiny", AsyncLLMEngine(llm.llm_engine), metrics)], metrics)
    with BackgroundServer(app) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def check_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_response_format_json_schema_and_parse(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["ok", "n", "tags"]}
    r = client.chat.completions.create(model="tiny", messages=HI, seed=1, max_tokens=300, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)

    class Answer(BaseModel):
        word: str = Field(max_length=5)
        count: int
    parsed = client.chat.completions.parse(model="tiny", messages=HI, seed=2, max_tokens=300, response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer), parsed.choices[0].message.content


def test_json_object_and_vllm_fields_on_completions(client):
    r = client.completions.create(model="tiny", prompt="x", seed=11, max_tokens=480,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="tiny", prompt="x", n=4, seed=3, max_tokens=20,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert {c.text for c in r.choices} <= {"left", "right"}
    r = client.completions.create(model="tiny", prompt="x", seed=3, max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}})
    assert len(r.choices[0].text) == 5 and r.choices[0].text[2] == ":"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=HI, seed=4, max_tokens=40, stream=True,
        extra_body={"structured_outputs": {"grammar": 'root ::= "<" [a-z]{1,8} ">"'}}) if c.choices)
    assert streamed[0] == "<" and streamed[-1] == ">" and streamed[1:-1].isalpha()


def test_tool_choice_required_gives_valid_calls(client):
    r = client.chat.completions.create(model="tiny", messages=HI, seed=5, max_tokens=300, tool_choice="required",
                                       **TOOLS_KW)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)
    single = client.chat.completions.create(model="tiny", messages=HI, seed=6, max_tokens=300, n=3,
                                            tool_choice="required", parallel_tool_calls=False, **TOOLS_KW)
    for c in single.choices:
        assert len(c.message.tool_calls) == 1
        check_calls(c.message.tool_calls)


def test_named_tool_choice_and_streamed_deltas(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=HI, seed=7, max_tokens=300, tool_choice=named,
                                       **TOOLS_KW)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content is None
    check_calls(r.choices[0].message.tool_calls, {"get_weather"})
    assert len(r.choices[0].message.tool_calls) == 1
    stream = client.chat.completions.create(model="tiny", messages=HI, seed=7, max_tokens=300, tool_choice=named,
                                            stream=True, **TOOLS_KW)
    calls, reasons = {}, []
    for chunk in stream:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    assert [r for r in reasons if r] == ["stop"]
    want = r.choices[0].message.tool_calls[0].function
    assert calls == {0: {"name": want.name, "arguments": want.arguments}}    # seeded: the same call


def test_auto_and_none_and_tool_history(client):
    auto = client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=8, **TOOLS_KW)
    plain = client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=8,
                                           extra_body={"chat_template": TOOL_TEMPLATE})
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens        # the template saw the tools
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"
    none = client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=8, tool_choice="none",
                                          **TOOLS_KW)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    history = HI + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_time", "arguments": '{"zone": "utc"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    r = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=4, **TOOLS_KW)
    assert r.usage.prompt_tokens > auto.usage.prompt_tokens + len('{"zone": "utc"}')


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, None,
     "Unsupported type"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"response_format": {"type": "json_schema"}}, None, "json_schema"),
    ({"guided_regex": "(a"}, None, "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, None, "exactly one"),
    ({"structured_outputs": {"lark": "x"}}, "structured_outputs.lark", ""),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, None, "one field"),
    ({"tools": TOOLS}, "tools", "no tool support"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}},
      "chat_template": TOOL_TEMPLATE}, "tool_choice", "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"},
      "chat_template": TOOL_TEMPLATE}, "tool_choice", "cannot be combined"),
])
def test_requests_that_cannot_be_honoured_are_400(url, body, param, words):
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert "cpp" not in error["message"] and "Traceback" not in error["message"]
    if param:
        assert error["param"] == param


def test_tool_call_parser_whole_and_split_anywhere():
    from hark.server.tools import ToolCallParser, parse_tool_calls
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>'
            '<tool_call>not json</tool_call> <tool')
    content, calls = parse_tool_calls(text)
    assert content == "Let me look.\n\n<tool_call>not json</tool_call> <tool"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": "utc"})]
    for cut in range(len(text) + 1):
        parser = ToolCallParser()
        events = parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()
        assert "".join(e.get("content", "") for e in events).strip() == content
        assert [(e["index"], e["tool_call"]["function"]) for e in events if "tool_call" in e] == [
            (i, c["function"]) for i, c in enumerate(calls)]
    unclosed = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"zone": "cet"}}')
    assert unclosed[0] is None and unclosed[1][0]["function"]["name"] == "get_time"
