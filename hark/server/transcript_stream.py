"""Streamed transcription, token by token, in OpenAI's events.

A streamed token cannot be taken back, so a streamed run decodes each window once: at the requested
temperature (no temperature fallback) and without timestamp tokens (no seek to a shorter tail). The
window that comes first in time among those not yet sent streams its tokens as the engine samples
them; the windows after it decode at the same time, and their text follows once every window before
them is done. A window the probe finds likely silent (P(no speech) over the threshold) is held until
its decode ends, so the no-speech rule can still drop it.

Events: {"type": "transcript.text.delta", "delta", "logprobs"} per piece of text, then
{"type": "transcript.text.done", "text", "logprobs", "usage"}. Each also carries vLLM's
"choices": [{"delta": {"content"}}], which vLLM's example clients read.
"""
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hark.engine.async_engine import AsyncLLMEngine
from hark.outputs import CompletionOutput
from hark.transcribe.pipeline import TranscriptionRun, Window, WindowRequest



def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Whisper's tokens are written in it): printable Latin-1 bytes are
    their own character, the other bytes are chr(256 + k) in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, k = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + k)], k = b, k + 1
    return alphabet


BYTE_OF = _byte_level_alphabet()


def logprob_entries(tokenizer, pairs: list[tuple[int, float]]) -> list[dict]:
    """OpenAI's logprobs: {"token", "logprob", "bytes"} per token (bytes: the token's own UTF-8 bytes)."""
    entries = []
    for token_id, logprob in pairs:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        raw = bytes(BYTE_OF[c] for c in piece) if all(c in BYTE_OF for c in piece) else piece.encode()
        entries.append({"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)})
    return entries


@dataclass
class Delta:
    text: str
    tokens: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob) of the text


class TextCursor:
    """What of input 0's timeline has been sent: whole windows, then a prefix of the current one."""

    def __init__(self, run: TranscriptionRun):
        self.run, self.index, self.chars, self.tokens, self.started = run, 0, 0, 0, False

    def advance(self, live: dict[Window, CompletionOutput]) -> Delta:
        run, timeline, out = self.run, self.run.timelines[0], Delta("")
        while self.index < len(timeline):
            w = timeline[self.index]
            if w.final:
                text, tokens = "".join(s.text for s in w.segments), run.text_logprobs(w)
            elif w in live and not self._held(w):
                text, tokens = live[w].text, self._live_tokens(live[w])
            else:
                break
            self._take(out, text, tokens)
            if not w.final:
                break
            self.index, self.chars, self.tokens = self.index + 1, 0, 0
        return out

    def _held(self, w: Window) -> bool:
        threshold = self.run.opts.no_speech_threshold
        return threshold is not None and w.no_speech_prob > threshold

    def _live_tokens(self, c: CompletionOutput) -> list[tuple[int, float]]:
        eot = self.run.vocab.eot
        return [(t, lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs or []) if t < eot]

    def _take(self, out: Delta, text: str, tokens: list) -> None:
        piece = text[self.chars:]
        self.chars = len(text)
        out.tokens += tokens[self.tokens:]
        self.tokens = len(tokens)
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        out.text += piece


async def stream_transcript(engine: AsyncLLMEngine, run: TranscriptionRun) -> AsyncIterator[Delta]:
    """Runs the run's decodes on the engine, yielding the text as it is sampled (see the module doc).
    Leaving early (client gone, task cancelled) aborts the decodes still running."""
    live: dict[Window, CompletionOutput] = {}
    changed = asyncio.Event()
    decodes: dict[asyncio.Task, WindowRequest] = {}

    async def follow(d: WindowRequest):
        out = None
        async for out in engine.generate(None, d.params, processed=d.processed):
            live[d.window] = out.outputs[0]
            changed.set()
        return out

    def submit(requests: list[WindowRequest]) -> None:
        for d in requests:
            decodes[asyncio.ensure_future(follow(d))] = d

    cursor = TextCursor(run)
    try:
        submit(await engine.run_job(lambda _: run.start()))
        while decodes:
            waiter = asyncio.ensure_future(changed.wait())
            await asyncio.wait([*decodes, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            changed.clear()
            finished = [task for task in decodes if task.done()]
            if finished:
                done = [(decodes.pop(task), task.result().outputs) for task in finished]
                submit(await engine.run_job(lambda _: run.finish(done)))
                for request, _ in done:
                    live.pop(request.window, None)
            delta = cursor.advance(live)
            if delta.text or delta.tokens:
                yield delta
    finally:
        for task in decodes:
            task.cancel()       # each aborts its engine request
        await asyncio.gather(*decodes, return_exceptions=True)
