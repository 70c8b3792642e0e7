"""Turns OpenAI-style chat messages into a prompt through the checkpoint's chat template."""
import json
import os

from hark.multimodal.content_parts import normalize_part

NO_CHAT_TEMPLATE = ("this model has no chat template; pass one (chat_template=... in Python, "
                    "--chat-template FILE on the command line).")


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ValueError("message content must be a string or a list of content-part objects.")
    parts = []
    for part in map(normalize_part, content):
        if part.get("type") != "text":
            raise ValueError(f"content part type {part.get('type')!r} is not supported by this model; "
                             f"it takes text only.")
        parts.append(part.get("text", ""))
    return "\n".join(parts)


def _arguments_as_object(call: dict) -> dict:
    """A tool call with its JSON-text arguments parsed (templates render them with `tojson`)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def template_message(message: dict, content: str) -> dict:
    """A message as chat templates take it: role, text, and the tool-calling fields when present."""
    out = {"role": message["role"], "content": content}
    for key in ("name", "tool_call_id"):
        if key in message:
            out[key] = message[key]
    if message.get("tool_calls"):
        out["tool_calls"] = [_arguments_as_object(c) for c in message["tool_calls"]]
    return out


def chat_template_text(engine, chat_template: str | None, tools: list | None) -> str | None:
    """The Jinja text a conversation will be rendered with, or None when the model has none."""
    processor = engine.processor
    if processor is not None and hasattr(processor, "build_chat_prompt"):
        return chat_template or getattr(processor, "chat_template", None)
    tokenizer = engine.tokenizer
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.get_chat_template(chat_template, tools=tools)


def build_chat_prompt(engine, conversation: list[dict], chat_template: str | None,
                      add_generation_prompt: bool, template_kwargs: dict):
    """Returns a prompt for engine.add_request: a string, or a dict with audio for audio models."""
    if not isinstance(conversation, list) or not all(isinstance(m, dict) and "role" in m for m in conversation):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts.")
    processor = engine.processor
    if processor is not None and hasattr(processor, "build_chat_prompt"):
        return processor.build_chat_prompt(conversation, chat_template, add_generation_prompt, template_kwargs)
    tokenizer = engine.tokenizer
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(NO_CHAT_TEMPLATE)
    messages = [template_message(m, _text_of(m.get("content"))) for m in conversation]
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)
    return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False), "prompt": text}


def chat_template_option(value: str | None) -> str | None:
    """A --chat-template option: a Jinja file, or the template text itself."""
    if value is not None and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value
