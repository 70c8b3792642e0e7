"""POST /v1/chat/completions and /v1/completions: run the request on the engine, answer in OpenAI's
shapes, whole or as server-sent events."""
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from hark.chat import chat_template_text
from hark.lora.request import LoRARequest
from hark.outputs import CompletionOutput, RequestOutput
from hark.sampling import SamplingParams
from hark.server import tools
from hark.server.errors import APIError, error_body, to_api_error
from hark.server.protocol import ChatCompletionRequest, CompletionRequest
from hark.server.state import Admission, ServedModel


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def until_disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable):
    """Awaits `awaitable`; if the client disconnects first, cancels it (which aborts its engine request)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise asyncio.CancelledError()
    return work.result()


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in outputs:
        pass
    return final


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _TokenText:
    """Single-token strings for logprobs, cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int, known: str | None = None) -> str:
        if known is not None:
            return known
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def _ranked(entries: dict, k: int) -> list[tuple[int, object]]:
    return sorted(((t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k),
                  key=lambda item: item[1].rank)[:k]


def chat_logprobs(c: CompletionOutput, start: int, k: int, text: _TokenText) -> dict:
    content = []
    for token_id, entries in zip(c.token_ids[start:], c.logprobs[start:]):
        chosen = entries[token_id]
        token = text(token_id, chosen.decoded_token)
        top = [{"token": (s := text(t, lp.decoded_token)), "logprob": lp.logprob, "bytes": list(s.encode())}
               for t, lp in _ranked(entries, k)]
        content.append({"token": token, "logprob": chosen.logprob, "bytes": list(token.encode()),
                        "top_logprobs": top})
    return {"content": content}


def completion_logprobs(c: CompletionOutput, start: int, k: int, text: _TokenText, offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entries in zip(c.token_ids[start:], c.logprobs[start:]):
        token = text(token_id, entries[token_id].decoded_token)
        tokens.append(token)
        token_logprobs.append(entries[token_id].logprob)
        tops.append({text(t, lp.decoded_token): lp.logprob for t, lp in _ranked(entries, k)})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


class _Delta:
    """What is new in each choice since the last output (outputs carry cumulative text)."""

    def __init__(self, n: int):
        self.chars, self.tokens, self.done = [0] * n, [0] * n, [False] * n

    def new(self, c: CompletionOutput) -> tuple[str, int] | None:
        """(new text, index of the first new token), or None when nothing changed."""
        i = c.index
        text, start = c.text[self.chars[i]:], self.tokens[i]
        if self.done[i] or (not text and c.finish_reason is None):   # e.g. half a UTF-8 character so far
            return None
        self.chars[i], self.tokens[i] = max(self.chars[i], len(c.text)), len(c.token_ids)
        self.done[i] = c.finish_reason is not None
        return text, start


async def _sse_stream(served: ServedModel, ticket: Admission, outputs: AsyncIterator[RequestOutput],
                      first: RequestOutput, chunks, final_chunk) -> AsyncIterator[str]:
    """Turns outputs into SSE events: chunks(out) per output, then final_chunk(last out), then [DONE].
    An error mid-stream becomes an error event; leaving early aborts the request."""
    out = first
    try:
        while True:
            for chunk in chunks(out):
                yield sse(chunk)
            if out.finished:
                break
            out = await outputs.__anext__()
        served.observe_finished(out)
        extra = final_chunk(out)
        if extra is not None:
            yield sse(extra)
    except Exception as e:  # the headers are gone: report in-band, as OpenAI does
        err = to_api_error(e)
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        await outputs.aclose()
        ticket.release()
    yield sse("[DONE]")


async def _compile_grammar(served: ServedModel, params: SamplingParams) -> None:
    """Compiles the request's grammar off the event loop (a 400 if it is not valid; the engine then finds
    it in the compiler's cache)."""
    if params.structured_outputs is not None:
        await served.engine.compile_structured_outputs(params.structured_outputs)


async def _start(served: ServedModel, request: Request, prompt, params, request_id: str, lora: LoRARequest | None):
    """Queues the request and waits for its first output (so errors still get a proper status code)."""
    processed = await served.engine.process_prompt(prompt)
    outputs = served.engine.generate(prompt, params, request_id, processed, lora)
    try:
        first = await unless_disconnected(request, outputs.__anext__())
    except BaseException:
        await outputs.aclose()
        raise
    return outputs, first


def _chat_grammar(body: ChatCompletionRequest):
    output, forced = body.output_grammar(), tools.forced_call_grammar(body)
    if output is not None and forced is not None:
        raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                            "response_format or structured outputs.", "tool_choice")
    return output or forced


def _message(c: CompletionOutput, body: ChatCompletionRequest) -> tuple[dict, str | None]:
    """The assistant message of a choice and its finish_reason."""
    if not tools.uses_tools(body):
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = tools.parse_tool_calls(c.text)
    message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
    return message, _finish_reason(c.finish_reason, bool(calls), body)


def _finish_reason(reason: str | None, called: bool, body: ChatCompletionRequest) -> str | None:
    """"tool_calls" when the model chose to call (OpenAI says "stop" for a function it was told to call)."""
    forced = body.tool_choice not in (None, "auto", "required")
    return "tool_calls" if reason == "stop" and called and not forced else reason


def _tool_delta(event: dict) -> dict:
    if "content" in event:
        return {"content": event["content"]}
    return {"tool_calls": [{"index": event["index"], **event["tool_call"]}]}


async def chat_completions(served: ServedModel, body: ChatCompletionRequest, request: Request,
                           lora: LoRARequest | None = None):
    template = body.chat_template or served.chat_template
    tools.check_tool_request(body, chat_template_text(served.engine, template, tools.template_tools(body)))
    params = body.to_sampling_params(_chat_grammar(body))
    await _compile_grammar(served, params)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if tools.uses_tools(body):
        template_kwargs["tools"] = tools.template_tools(body)
    prompt = await served.chat_prompt(body.conversation(), body.chat_template, body.add_generation_prompt,
                                      template_kwargs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    text = _TokenText(served.tokenizer)
    k = body.top_logprobs or 0
    head = {"id": request_id, "created": created, "model": lora.lora_name if lora else served.name}

    with served.admit() as ticket:
        outputs, first = await _start(served, request, prompt, params, request_id, lora)
        if not body.stream:
            try:
                final = first if first.finished else await unless_disconnected(request, _last(outputs))
            finally:
                await outputs.aclose()
            served.observe_finished(final)
            choices = []
            for c in final.outputs:
                message, reason = _message(c, body)
                choices.append({"index": c.index, "message": message,
                                "logprobs": chat_logprobs(c, 0, k, text) if body.logprobs else None,
                                "finish_reason": reason})
            return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage([final])})
        ticket.keep()

    delta = _Delta(params.n)
    parsers = [tools.ToolCallParser() for _ in range(params.n)] if tools.uses_tools(body) else None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_head = {**head, "object": "chat.completion.chunk"}

    def deltas(c: CompletionOutput, content: str) -> list[dict]:
        if parsers is None:
            return [{"content": content} if content else {}]
        parser = parsers[c.index]
        events = parser.feed(content) + (parser.finish() if c.finish_reason else [])
        return [_tool_delta(e) for e in events] or ([{}] if c.finish_reason or body.logprobs else [])

    def chunks(out: RequestOutput):
        if out is first:
            yield {**chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None} for i in range(params.n)]}
        for c in out.outputs:
            new = delta.new(c)
            if new is None:
                continue
            content, start = new
            found = deltas(c, content)
            reason = c.finish_reason if parsers is None else _finish_reason(
                c.finish_reason, parsers[c.index].num_calls > 0, body)
            for i, d in enumerate(found):
                last = i == len(found) - 1
                yield {**chunk_head, "choices": [{
                    "index": c.index, "delta": d,
                    "logprobs": chat_logprobs(c, start, k, text) if body.logprobs and i == 0 else None,
                    "finish_reason": reason if last else None}]}

    def final_chunk(out: RequestOutput):
        return {**chunk_head, "choices": [], "usage": usage([out])} if include_usage else None

    return StreamingResponse(_sse_stream(served, ticket, outputs, first, chunks, final_chunk),
                             media_type="text/event-stream")


async def completions(served: ServedModel, body: CompletionRequest, request: Request, lora: LoRARequest | None = None):
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise ValueError("stream=true takes a single prompt; send one request per prompt.")
    params = body.to_sampling_params()
    await _compile_grammar(served, params)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": lora.lora_name if lora else served.name}
    text = _TokenText(served.tokenizer)
    k = body.logprobs or 0
    n = params.n

    def choice(c: CompletionOutput, prompt_index: int, start: int, content: str, offset: int) -> dict:
        return {"index": prompt_index * n + c.index, "text": content,
                "logprobs": completion_logprobs(c, start, k, text, offset) if body.logprobs is not None else None,
                "finish_reason": c.finish_reason}

    if not body.stream:
        with served.admit():
            async def run(i: int, prompt) -> RequestOutput:
                outputs, first = await _start(served, request, prompt, params, f"{request_id}-{i}", lora)
                try:
                    return first if first.finished else await unless_disconnected(request, _last(outputs))
                finally:
                    await outputs.aclose()
            finals = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        for final in finals:
            served.observe_finished(final)
        choices = [choice(c, i, 0, c.text, 0) for i, final in enumerate(finals) for c in final.outputs]
        return JSONResponse({**head, "choices": choices, "usage": usage(finals)})

    with served.admit() as ticket:
        outputs, first = await _start(served, request, prompts[0], params, request_id, lora)
        ticket.keep()
    delta = _Delta(n)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunks(out: RequestOutput):
        for c in out.outputs:
            start_chars = delta.chars[c.index]
            new = delta.new(c)
            if new is not None:
                yield {**head, "choices": [choice(c, 0, new[1], new[0], start_chars)]}

    def final_chunk(out: RequestOutput):
        return {**head, "choices": [], "usage": usage([out])} if include_usage else None

    return StreamingResponse(_sse_stream(served, ticket, outputs, first, chunks, final_chunk),
                             media_type="text/event-stream")
