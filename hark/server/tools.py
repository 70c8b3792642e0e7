"""Tool calling on /v1/chat/completions: which tools the chat template sees, the grammar that forces a
call (tool_choice "required" or a named function), and the parser that turns the model's calls, written
in the Hermes / Qwen format, into OpenAI `tool_calls`, whole or as stream deltas:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

"auto" lets the model choose and parses what it wrote; "none" shows it no tools and parses nothing.
"""
import json
import uuid

from hark.engine.structured_output import MAX_WHITESPACE, json_safe_schema
from hark.sampling import StructuredOutputsParams
from hark.server.errors import APIError
from hark.server.protocol import ChatCompletionRequest, NamedToolChoice

START, END = "<tool_call>", "</tool_call>"


def check_tool_request(body: ChatCompletionRequest, template: str | None) -> None:
    """A 400 for tool requests this model or this body cannot honour."""
    choice = body.tool_choice
    named = isinstance(choice, NamedToolChoice)
    if not body.tools:
        if choice == "required" or named:
            raise APIError(400, f"tool_choice {'naming a function' if named else 'required'} needs tools.",
                           "tool_choice")
        return
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique.", "tools")
    if named and choice.function.name not in names:
        raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools.",
                       "tool_choice")
    if choice != "none" and template is not None and "tools" not in template:
        raise APIError(400, "this model's chat template has no tool support; pass a chat_template that "
                            "renders `tools`, or send the request without tools.", "tools")


def uses_tools(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def template_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools as the chat template takes them (transformers' `tools=`), or None."""
    if not uses_tools(body):
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def forced_call_grammar(body: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """For "required" or a named function: an xgrammar structural tag that admits only tool calls in the
    Hermes format, each one's arguments following its function's parameter schema."""
    choice = body.tool_choice
    if not uses_tools(body) or choice in (None, "auto"):
        return None
    tools = body.tools if choice == "required" else [t for t in body.tools if t.function.name == choice.function.name]

    def tag(tool) -> dict:
        schema = json_safe_schema(tool.function.parameters or {"type": "object", "properties": {}})
        return {"type": "tag", "begin": f'{START}\n{{"name": {json.dumps(tool.function.name)}, "arguments": ',
                "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE},
                "end": f"}}\n{END}"}

    if choice == "required":
        form = {"type": "tags_with_separator", "tags": [tag(t) for t in tools], "separator": "\n",
                "at_least_one": True, "stop_after_first": not body.parallel_tool_calls}
    else:
        form = tag(tools[0])
    return StructuredOutputsParams(structural_tag=json.dumps({"type": "structural_tag", "format": form}))


def _call(body: str) -> dict | None:
    """An OpenAI tool call from the JSON between the tags, or None if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _held_back(text: str) -> int:
    """How many trailing characters of text could be the start of a START tag."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Feeds on the output text as it grows; returns events: {"content": text} or {"tool_call": call,
    "index": its place among the output's calls}.
    Text that may begin a tag is held back until it is known; a block that is not a valid call stays
    content."""

    def __init__(self):
        self.text, self.pos, self.inside, self.num_calls = "", 0, False, 0

    def feed(self, new_text: str) -> list[dict]:
        self.text += new_text
        events = []
        while True:
            if self.inside:
                end = self.text.find(END, self.pos)
                if end < 0:
                    return events
                events.append(self._block(self.text[self.pos:end], closed=True))
                self.pos, self.inside = end + len(END), False
                continue
            start = self.text.find(START, self.pos)
            upto = start if start >= 0 else len(self.text) - _held_back(self.text[self.pos:])
            if upto > self.pos:
                events.append({"content": self.text[self.pos:upto]})
            self.pos = upto
            if start < 0:
                return events
            self.pos, self.inside = start + len(START), True

    def finish(self) -> list[dict]:
        """Events for what is left when the output ends (an unclosed call still counts if it parses)."""
        rest, self.pos = self.text[self.pos:], len(self.text)
        if self.inside:
            self.inside = False
            return [self._block(rest, closed=False)]
        return [{"content": rest}] if rest else []

    def _block(self, body: str, closed: bool) -> dict:
        call = _call(body)
        if call is None:
            return {"content": START + body + (END if closed else "")}
        self.num_calls += 1
        return {"tool_call": call, "index": self.num_calls - 1}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole output; content is None when only calls were written."""
    parser = ToolCallParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(e.get("content", "") for e in events).strip()
    return content or None, [e["tool_call"] for e in events if "tool_call" in e]
