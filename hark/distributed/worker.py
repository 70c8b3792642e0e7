"""A tensor-parallel worker process (ranks 1..N-1): loads its shard of the model from the same
checkpoint, then runs what rank 0 sends over its pipe (a forward, the logits, embeddings, KV block
copies) until told to stop or until rank 0 goes away. Rank 0 schedules and samples; a worker only
joins the collectives of each call."""
import pickle
import traceback

import torch

from hark.distributed import state
from hark.distributed.records import ForwardRecord


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, ForwardRecord):
        return ForwardRecord(**{k: to_device(v, device) for k, v in vars(obj).items()})
    return obj


class Worker:
    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.cross_caches: dict[int, dict] = {}
        self.k_cache = self.v_cache = torch.empty(0)

    def run(self, name: str, args: tuple, kwargs: dict):
        args, kwargs = to_device(args, self.device), to_device(kwargs, self.device)
        with torch.inference_mode():
            if name == "forward":
                return self.forward(*args)
            if name == "copy_blocks":
                return self.copy_blocks(*args)
            return getattr(self.model, name)(*args, **kwargs)

    def forward(self, record: ForwardRecord) -> None:
        if tuple(self.k_cache.shape) != record.cache_shape:
            self.allocate(record.cache_shape)
        meta = record.metadata(self.cross_caches)
        self.model(record.input_ids, record.positions, meta, inputs_embeds=record.inputs_embeds)

    def allocate(self, shape: tuple[int, ...]) -> None:
        dtype = next(self.model.parameters()).dtype
        self.k_cache = torch.empty(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=self.device)
        for i, module in enumerate(self.model.kv_attention_modules()):
            module.k_cache, module.v_cache = self.k_cache[i], self.v_cache[i]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([a for a, _ in pairs], device=self.device)
        dst = torch.tensor([b for _, b in pairs], device=self.device)
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]


def main(rank: int, world: int, init_method: str, config, conn, timeout_s: float, threads: int) -> None:
    """The worker process: messages to rank 0 are ("started",), ("ready",) or ("error", text)."""
    try:
        torch.set_num_threads(threads)
        conn.send(("started",))
        device = config.torch_device()
        if device.type == "cuda":
            device = torch.device("cuda", rank)
        state.init(rank, world, init_method, device, timeout_s)
        from hark.models.loader import load_model
        worker = Worker(load_model(config).model, device)
        conn.send(("ready",))
        while True:
            try:
                name, args, kwargs = pickle.loads(conn.recv_bytes())
            except EOFError:                # rank 0 is gone
                break
            if name == "stop":
                break
            worker.run(name, args, kwargs)
    except BaseException as e:          # noqa: BLE001 — reported to rank 0, which raises it
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        state.destroy()
