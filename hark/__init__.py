"""hark: inference engine and OpenAI-compatible server for audio-language models."""
from hark.llm import LLM
from hark.outputs import CompletionOutput, Logprob, RequestOutput
from hark.sampling import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
