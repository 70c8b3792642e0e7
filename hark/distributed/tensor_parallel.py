"""Rank 0 of a tensor-parallel engine: spawns ranks 1..N-1 (torch.multiprocessing 'spawn'), joins
their process group (gloo on CPU, NCCL on CUDA, over a free localhost TCP port) and stands in for
the model: each call that runs collectives (forward, logits, token embeddings, Whisper's dense
decoder) is sent to the workers, pickled, over one pipe each, then run here on rank 0's shard.

    group = WorkerGroup.start(config)      # before the model is built: layers read the rank
    loaded = load_model(config)            # rank 0's shard
    model = group.attach(loaded.model)     # waits for the workers' shards; the engine's model

Rank 0 alone runs the audio encoders (whole on every rank, not split) and ships their outputs.
A worker that dies, fails to load or raises makes the next call raise RuntimeError naming it; a
collective with a dead peer fails or times out (TIMEOUT_S) rather than hang. A new group (a second
LLM in one process) shuts the previous one down first.
"""
import atexit
import logging
import pickle
import time
import weakref

import torch
import torch.multiprocessing as mp

from hark.distributed import state
from hark.distributed.records import RecordWriter
from hark.distributed.worker import main as worker_main

logger = logging.getLogger("hark")

TIMEOUT_S = 300.0           # a collective waiting this long on a peer fails
START_TIMEOUT_S = 600.0     # import, rendezvous and loading of a worker
COLLECTIVE_CALLS = ("get_input_embeddings", "compute_logits", "decode_dense")

_active: "weakref.ref[WorkerGroup] | None" = None


class WorkerGroup:
    def __init__(self, world: int, procs, conns, threads_before: int):
        self.world, self.procs, self.conns = world, procs, conns
        self.threads_before = threads_before       # rank 0's torch threads, given back on shutdown
        self.error: str | None = None
        self.closed = False

    @classmethod
    def start(cls, config) -> "WorkerGroup":
        global _active
        previous = _active() if _active is not None else None
        if previous is not None:
            previous.shutdown()
        world = config.tensor_parallel_size
        device = config.torch_device()
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs; {torch.cuda.device_count()} are visible.")
        threads, threads_before = state.threads_per_rank(world), torch.get_num_threads()
        torch.set_num_threads(threads)
        init_method = f"tcp://127.0.0.1:{state.free_port()}"
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for rank in range(1, world):
            here, there = ctx.Pipe()
            p = ctx.Process(target=worker_main, name=f"hark-tp-rank{rank}", daemon=True,
                            args=(rank, world, init_method, config, there, TIMEOUT_S, threads))
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
        group = cls(world, procs, conns, threads_before)
        _active = weakref.ref(group)
        atexit.register(group.shutdown)
        try:
            group._expect("started")
            state.init(0, world, init_method, torch.device("cuda", 0) if device.type == "cuda" else device, TIMEOUT_S)
        except BaseException:
            group.shutdown()
            raise
        return group

    def attach(self, model) -> "ShardedModel":
        try:
            self._expect("ready")
        except BaseException:
            self.shutdown()
            raise
        sharded = ShardedModel(model, self)
        weakref.finalize(sharded, self.shutdown)
        return sharded

    def _expect(self, what: str) -> None:
        """Waits for every worker's `what` message; RuntimeError when one dies or reports an error."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (p, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.05):
                if not p.is_alive():
                    self._fail(rank)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel rank {rank} did not start within {START_TIMEOUT_S:.0f} s.")
            message = conn.recv()
            if message[0] == "error":
                self.error = f"tensor-parallel rank {rank} failed: {message[1]}"
                raise RuntimeError(self.error)
            assert message[0] == what, message

    def _fail(self, rank: int) -> None:
        conn, p = self.conns[rank - 1], self.procs[rank - 1]
        detail = ""
        try:
            if conn.poll(0):
                message = conn.recv()
                if message[0] == "error":
                    detail = f": {message[1]}"
        except (EOFError, OSError):
            pass
        p.join(1.0)
        self.error = f"tensor-parallel rank {rank} exited (exit code {p.exitcode}){detail}"
        raise RuntimeError(self.error)

    def check(self) -> None:
        """RuntimeError if the group is unusable: shut down, or a worker has died."""
        if self.error is not None:
            raise RuntimeError(f"the tensor-parallel engine is unusable: {self.error}")
        if self.closed:
            raise RuntimeError("the tensor-parallel engine was shut down (another LLM started its own ranks?).")
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                self._fail(rank)

    def send(self, name: str, args: tuple, kwargs: dict | None = None) -> None:
        self.check()
        data = pickle.dumps((name, to_cpu(args), to_cpu(kwargs or {})), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError:
                self._fail(rank)

    def collective_failed(self, error: BaseException) -> None:
        """A collective on rank 0 raised: name the worker that died, else report the error."""
        time.sleep(0.2)                 # a dying worker's exit (and its message) lands
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive() or self.conns[rank - 1].poll(0):
                try:
                    self._fail(rank)
                except RuntimeError as e:
                    raise e from error
        self.error = f"a tensor-parallel collective failed: {error}"
        raise RuntimeError(self.error) from error

    def shutdown(self) -> None:
        """Stops the workers (a stop message, then a kill for those that do not exit in 30 s)."""
        if self.closed:
            return
        self.closed = True
        stop = pickle.dumps(("stop", (), {}))
        for conn in self.conns:
            try:
                conn.send_bytes(stop)
            except OSError:
                pass
        for p in self.procs:
            p.join(30.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for conn in self.conns:
            conn.close()
        state.destroy()
        torch.set_num_threads(self.threads_before)


def to_cpu(obj):
    """Tensors moved to the CPU for pickling (workers move them to their own device)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{k: to_cpu(v) for k, v in vars(obj).items()})
    return obj


class ShardedModel:
    """Rank 0's model as the runner and the transcription pipeline see it: calls that run
    collectives go to every rank first; everything else is rank 0's own model."""

    def __init__(self, model, group: WorkerGroup):
        self.model, self.group = model, group
        self.records = RecordWriter()

    def __getattr__(self, name):
        attr = getattr(self.model, name)
        if name in COLLECTIVE_CALLS:
            def call(*args, **kwargs):
                self.group.send(name, args, kwargs)
                return self._run(attr, *args, **kwargs)
            return call
        return attr

    def __call__(self, input_ids, positions, meta, inputs_embeds=None):
        shape = self.model.kv_attention_modules()[0].k_cache.shape
        record = self.records.forward(input_ids, positions, meta, inputs_embeds,
                                      (self.model.num_kv_layers, *shape))
        self.group.send("forward", (record,))
        return self._run(self.model, input_ids, positions, meta, inputs_embeds=inputs_embeds)

    def _run(self, fn, *args, **kwargs):
        """fn on rank 0, the workers running the same call. When it raises, the ranks may be at different
        collectives: the group is unusable from then on."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            text = str(e).lower()
            if "gloo" in text or "nccl" in text or not all(p.is_alive() for p in self.group.procs):
                self.group.collective_failed(e)
            self.group.error = f"rank 0 raised {type(e).__name__} in a call the workers ran too"
            raise

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Beam-search KV copy-on-write on the workers' caches (the runner copies rank 0's)."""
        if pairs:
            self.group.send("copy_blocks", (pairs,))

    def shutdown(self) -> None:
        self.group.shutdown()


def copy_blocks_on_every_rank(copy_here, model: ShardedModel):
    """The runner's KV block copy (beam search forks), done on the workers' caches too."""
    def copy_blocks(pairs: list[tuple[int, int]]) -> None:
        model.copy_blocks(pairs)
        copy_here(pairs)
    return copy_blocks
