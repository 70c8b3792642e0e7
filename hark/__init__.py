"""hark: inference engine and OpenAI-compatible server for audio-language models.

Names are imported on first use (PEP 562), so `hark --help`, `hark --version` and argument errors
answer without loading torch. Before torch loads, OpenMP is told to wait passively
(OMP_WAIT_POLICY=PASSIVE) unless the user set a policy: spinning threads stall badly on a busy
machine. OpenMP reads the variable once, when torch first initialises it. torch is also told not to
look for out-of-tree device backends (TORCH_DEVICE_BACKEND_AUTOLOAD=0, unless set): hark runs on CPU or
CUDA, and the scan of installed packages' entry points cost 0.08 s of every start-up.
"""
import os
import sys

__version__ = "0.1.0"
__all__ = ["LLM", "EngineArgs", "SamplingParams", "StructuredOutputsParams", "BeamSearchParams", "RequestOutput",
           "CompletionOutput", "Logprob", "LoRARequest"]

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

_LAZY = {"LLM": "hark.llm", "EngineArgs": "hark.engine_args", "SamplingParams": "hark.sampling", "StructuredOutputsParams": "hark.sampling",
         "BeamSearchParams": "hark.sampling",
         "RequestOutput": "hark.outputs",
         "CompletionOutput": "hark.outputs", "Logprob": "hark.outputs", "LoRARequest": "hark.lora.request"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hark' has no attribute {name!r}")
