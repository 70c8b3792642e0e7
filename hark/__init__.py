"""hark: inference engine and OpenAI-compatible server for audio-language models."""
from hark.engine_args import EngineArgs
from hark.llm import LLM
from hark.outputs import CompletionOutput, Logprob, RequestOutput
from hark.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
