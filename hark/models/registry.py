"""Maps config.json `architectures` to hark model classes and their prompt processors."""
import importlib

_OMNI = ("hark.models.qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration", "hark.multimodal.qwen2_5_omni",
         "Qwen2_5OmniProcessor")

_QWEN2_VL = ("hark.models.qwen2_vl", "Qwen2VLForConditionalGeneration", "hark.multimodal.qwen2_vl", "Qwen2VLProcessor")

# architecture: (model module, model class, processor module or None, processor class or None)
_MODELS = {
    "LlamaForCausalLM": ("hark.models.llama", "LlamaForCausalLM", None, None),
    "Qwen2ForCausalLM": ("hark.models.llama", "Qwen2ForCausalLM", None, None),
    "WhisperForConditionalGeneration": ("hark.models.whisper", "WhisperForConditionalGeneration",
                                        "hark.multimodal.whisper", "WhisperProcessor"),
    "Qwen2AudioForConditionalGeneration": ("hark.models.qwen2_audio", "Qwen2AudioForConditionalGeneration",
                                           "hark.multimodal.qwen2_audio", "Qwen2AudioProcessor"),
    "Qwen2_5OmniThinkerForConditionalGeneration": _OMNI,
    "Qwen2_5OmniModel": _OMNI,                              # the whole model (thinker + speech output):
    "Qwen2_5OmniForConditionalGeneration": _OMNI,           # its thinker runs
    "UltravoxModel": ("hark.models.ultravox", "UltravoxModel", "hark.multimodal.ultravox", "UltravoxProcessor"),
    "LlavaForConditionalGeneration": ("hark.models.llava", "LlavaForConditionalGeneration", "hark.multimodal.llava",
                                      "LlavaProcessor"),
    "MllamaForConditionalGeneration": ("hark.models.mllama", "MllamaForConditionalGeneration",
                                       "hark.multimodal.mllama", "MllamaProcessor"),
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,             # the same model; its vision tower differs
    "Phi4MultimodalForCausalLM": ("hark.models.phi4_multimodal", "Phi4MultimodalForCausalLM",
                                  "hark.multimodal.phi4_multimodal", "Phi4MultimodalProcessor"),
    "Phi3VForCausalLM": ("hark.models.phi3_vision", "Phi3VForCausalLM", "hark.multimodal.phi3_vision",
                         "Phi3VisionProcessor"),
    "MiniCPMO": ("hark.models.minicpmo", "MiniCPMO", "hark.multimodal.minicpmo", "MiniCPMOProcessor"),
    "VoxtralForConditionalGeneration": ("hark.models.voxtral", "VoxtralForConditionalGeneration",
                                        "hark.multimodal.voxtral", "VoxtralProcessor"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve(architecture: str):
    """Returns (model class, processor class or None)."""
    if architecture not in _MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; hark supports {', '.join(supported_architectures())}.")
    mod, cls, pmod, pcls = _MODELS[architecture]
    model_cls = getattr(importlib.import_module(mod), cls)
    proc_cls = getattr(importlib.import_module(pmod), pcls) if pmod else None
    return model_cls, proc_cls
