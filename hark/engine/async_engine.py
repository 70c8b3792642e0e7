"""AsyncLLMEngine: the engine behind asyncio code (the server).

One background thread owns the LLMEngine: it applies the requests added and aborted from the event
loop, runs `engine.step()` while there is work, and hands each output to its request's asyncio
queue. Short jobs that use the model outside the engine's steps (a transcription's dense probe or word
alignment) run in that thread too, between steps, through `run_job`, so they never race a forward pass.
If the engine fails, the thread stops, `dead` is set and every waiting request gets EngineDeadError.
"""
import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from hark.engine.engine import LLMEngine
from hark.inputs import ProcessedPrompt
from hark.lora.request import LoRARequest
from hark.outputs import RequestOutput
from hark.sampling import SamplingParams

logger = logging.getLogger("hark")


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; the server must be restarted."""


def _dead_error() -> EngineDeadError:
    return EngineDeadError("the engine stopped after an internal error; restart the server")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Job:
    fn: Callable
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def done():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)
        self.loop.call_soon_threadsafe(done)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.dead: BaseException | None = None
        self.stats: dict = engine.stats()        # refreshed by the loop after every step
        self.num_steps = 0                       # engine steps run (each decodes one token per running sequence)
        self._streams: dict[str, _Stream] = {}
        self._adds: list[tuple[str, object, SamplingParams, ProcessedPrompt, LoRARequest | None]] = []
        self._aborts: list[str] = []
        self._jobs: list[_Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="hark-engine", daemon=True)
        self._thread.start()

    # --- called from the event loop ---------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        """Requests and jobs accepted and not finished yet."""
        return len(self._streams) + len(self._jobs)

    # What the server reads of the model (fixed once loaded: safe from any thread).
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def processor(self):
        return self.engine.processor

    @property
    def is_encoder_decoder(self) -> bool:
        return self.engine.is_encoder_decoder

    @property
    def model_path(self) -> str:
        return self.engine.model_path

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    @property
    def lora_enabled(self) -> bool:
        return self.engine.lora_enabled

    async def compile_structured_outputs(self, spec) -> None:
        """Compiles a request's grammar off the event loop (ValueError if it is not valid); the engine then
        finds it in the compiler's cache."""
        await asyncio.to_thread(self.engine.structured_outputs.compile, spec)

    async def process_prompt(self, prompt) -> ProcessedPrompt:
        """Tokenizes (and extracts audio features) off the event loop; raises ValueError for bad input."""
        return await asyncio.to_thread(self.engine.process_prompt, prompt)

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None,
                       processed: ProcessedPrompt | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they move (text is cumulative). Leaving the iterator early
        (client gone, task cancelled) aborts the request and frees its KV blocks."""
        self._check_alive()
        params.validate()
        processed = processed or await self.process_prompt(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._wake:
            self._adds.append((request_id, prompt, params, processed, lora_request))
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    async def run_job(self, fn: Callable):
        """Runs fn(engine) in the engine thread, between steps, and returns what it returns. fn must be
        short (it holds up every request) and must not step the engine. A job whose awaiting task is
        cancelled before it starts is skipped."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop)
        with self._wake:
            self._jobs.append(job)
            self._wake.notify()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Reads the adapter in a worker thread (ValueError if it does not fit), then loads it in the engine
        thread between steps: reading a large adapter holds up no request."""
        adapter = await asyncio.to_thread(self.engine.read_lora, lora_request)
        return await self.run_job(lambda engine: engine.add_lora(lora_request, adapter))

    async def remove_lora(self, lora_id: int) -> bool:
        return await self.run_job(lambda engine: engine.remove_lora(lora_id))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise _dead_error()

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._stopping or self._adds or self._aborts or self._jobs
                               or self.engine.has_unfinished_requests()):
                        self._wake.wait()
                    if self._stopping:
                        return
                    job = self._jobs[0] if self._jobs else None
                if job is not None:
                    self._run_job(job)
                else:
                    self._step()
        except BaseException as e:   # the engine is broken: fail everyone, refuse new work
            logger.exception("hark engine loop died")
            self.dead = e
            error = _dead_error()
            for stream in list(self._streams.values()):
                stream.put(error)
            with self._wake:
                jobs, self._jobs = self._jobs, []
            for job in jobs:
                job.resolve(error=error)

    def _run_job(self, job: _Job) -> None:
        try:
            if not job.cancelled:
                result = job.fn(self.engine)
                self.stats = self.engine.stats()       # a job may change them (a LoRA adapter loaded)
                job.resolve(result)
        except Exception as e:
            job.resolve(error=e)
        finally:
            with self._wake:
                self._jobs.remove(job)

    def _step(self) -> None:
        """Applies pending adds and aborts, runs one engine step, delivers outputs to their streams."""
        with self._wake:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            self.engine.abort_request(request_id)
        for request_id, prompt, params, processed, lora_request in adds:
            if request_id not in self._streams:     # aborted before it was added
                continue
            try:
                self.engine.add_request(prompt, params, request_id=request_id, processed=processed,
                                        lora_request=lora_request)
            except ValueError as e:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put(e)
        if self.engine.has_unfinished_requests():
            self.num_steps += 1
        try:
            outputs = self.engine.step()
        except BaseException as e:
            self.dead = e
            raise
        self.stats = self.engine.stats()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
