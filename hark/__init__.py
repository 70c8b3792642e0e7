"""hark: inference engine and OpenAI-compatible server for audio-language models."""
__version__ = "0.1.0"
