"""vLLM's offline audio examples run on hark as vLLM ships them, with only the import line and the model
names changed (to tiny checkpoints, and to the built-in Whisper tiny.en):
  examples/offline_inference/audio_language.py        (the qwen2_audio, ultravox and whisper paths)
  examples/offline_inference/encoder_decoder_multimodal.py   (the whisper path)
and the docs' recipe for long audio, vllm.multimodal.audio.split_audio -> hark.multimodal.audio.split_audio.
Below each `# --- example ---` line the code is vLLM's; AudioAsset stands in for vllm.assets.audio's
(the same two names, read from tests/data instead of downloaded)."""
import os
import re
import time
from argparse import Namespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import soundfile as sf
from transformers import AutoTokenizer

import hark
from hark.models.default import default_model_path
from test_qwen2_audio import DATA, make_tiny_qwen2_audio
from test_ultravox import make_tiny_ultravox

ASSETS = {"mary_had_lamb": "sense_and_sensibility_01_austen_64kb-0870", "winning_call":
          "sense_and_sensibility_01_austen_64kb-0880"}
MODELS: dict[str, str] = {}        # model names of the examples -> local checkpoints (filled by the fixture)
OUTPUTS: list = []                 # what each LLM.generate returned


class AudioAsset:
    def __init__(self, name: str):
        self.name = name

    def get_local_path(self) -> str:
        return os.path.join(DATA, ASSETS[self.name] + ".wav")

    @property
    def audio_and_sample_rate(self) -> tuple[np.ndarray, int]:
        return sf.read(self.get_local_path(), dtype="float32")


def reference_words(name: str) -> list[str]:
    with open(os.path.join(DATA, ASSETS[name] + ".txt")) as f:
        return re.findall(r"[a-z']+", f.read().lower())


class LLM(hark.LLM):
    """hark's LLM, keeping what generate returns so the test can look at it."""

    def generate(self, *args, **kwargs):
        out = super().generate(*args, **kwargs)
        OUTPUTS.append(out)
        return out


@pytest.fixture(scope="module", autouse=True)
def checkpoints(tmp_path_factory):
    qwen = str(tmp_path_factory.mktemp("qwen2_audio"))
    make_tiny_qwen2_audio(qwen)                      # 4096 positions: the example's max_model_len
    ultravox = str(tmp_path_factory.mktemp("ultravox"))
    make_tiny_ultravox(ultravox, ln_mid=True, separate_lm=False, max_positions=4096)
    whisper = default_model_path()
    MODELS.update({"Qwen/Qwen2-Audio-7B-Instruct": qwen, "fixie-ai/ultravox-v0_5-llama-3_2-1b": ultravox,
                   "openai/whisper-large-v3-turbo": whisper, "openai/whisper-large-v3": whisper})


# --- example: audio_language.py (import line: `from hark import EngineArgs, SamplingParams`; LLM above) ---
from hark import EngineArgs, SamplingParams  # noqa: E402

audio_assets = [AudioAsset("mary_had_lamb"), AudioAsset("winning_call")]
question_per_audio_count = {
    0: "What is 1+1?",
    1: "What is recited in the audio?",
    2: "What sport and what nursery rhyme are referenced?",
}


class ModelRequestData(NamedTuple):
    engine_args: EngineArgs
    prompt: str | None = None
    prompt_token_ids: dict[str, list[int]] | None = None
    multi_modal_data: dict[str, Any] | None = None
    stop_token_ids: list[int] | None = None
    lora_requests: list | None = None


# Qwen2-Audio
def run_qwen2_audio(question: str, audio_count: int) -> ModelRequestData:
    model_name = MODELS["Qwen/Qwen2-Audio-7B-Instruct"]

    engine_args = EngineArgs(
        model=model_name,
        max_model_len=4096,
        max_num_seqs=5,
        limit_mm_per_prompt={"audio": audio_count},
    )

    audio_in_prompt = "".join(
        [
            f"Audio {idx + 1}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
            for idx in range(audio_count)
        ]
    )

    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        f"{audio_in_prompt}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    return ModelRequestData(
        engine_args=engine_args,
        prompt=prompt,
    )


# Ultravox 0.5-1B
def run_ultravox(question: str, audio_count: int) -> ModelRequestData:
    model_name = MODELS["fixie-ai/ultravox-v0_5-llama-3_2-1b"]

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    messages = [{"role": "user", "content": "<|audio|>\n" * audio_count + question}]
    prompt = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )

    engine_args = EngineArgs(
        model=model_name,
        max_model_len=4096,
        max_num_seqs=5,
        trust_remote_code=True,
        limit_mm_per_prompt={"audio": audio_count},
    )

    return ModelRequestData(
        engine_args=engine_args,
        prompt=prompt,
    )


# Whisper
def run_whisper(question: str, audio_count: int) -> ModelRequestData:
    assert audio_count == 1, "Whisper only support single audio input per prompt"
    model_name = MODELS["openai/whisper-large-v3-turbo"]

    prompt = "<|startoftranscript|>"

    engine_args = EngineArgs(
        model=model_name,
        max_model_len=448,
        max_num_seqs=5,
        limit_mm_per_prompt={"audio": audio_count},
    )

    return ModelRequestData(
        engine_args=engine_args,
        prompt=prompt,
    )


model_example_map = {
    "qwen2_audio": run_qwen2_audio,
    "ultravox": run_ultravox,
    "whisper": run_whisper,
}


def main(args):
    model = args.model_type
    if model not in model_example_map:
        raise ValueError(f"Model type {model} is not supported.")

    if args.tensor_parallel_size is not None and args.tensor_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size must be a positive integer, "
            f"got {args.tensor_parallel_size}"
        )

    audio_count = args.num_audios
    req_data = model_example_map[model](
        question_per_audio_count[audio_count], audio_count
    )

    # Disable other modalities to save memory
    default_limits = {"image": 0, "video": 0, "audio": 0}
    req_data.engine_args.limit_mm_per_prompt = default_limits | dict(
        req_data.engine_args.limit_mm_per_prompt or {}
    )

    engine_args = asdict(req_data.engine_args) | {"seed": args.seed}
    if args.tensor_parallel_size is not None:
        engine_args["tensor_parallel_size"] = args.tensor_parallel_size
    llm = LLM(**engine_args)

    # We set temperature to 0.2 so that outputs can be different
    # even when all prompts are identical when running batch inference.
    sampling_params = SamplingParams(
        temperature=0.2, max_tokens=64, stop_token_ids=req_data.stop_token_ids
    )

    def get_input(start, end):
        mm_data = req_data.multi_modal_data
        if not mm_data:
            mm_data = {}
            if end - start > 0:
                mm_data = {
                    "audio": [
                        asset.audio_and_sample_rate for asset in audio_assets[start:end]
                    ]
                }

        inputs = {"multi_modal_data": mm_data}

        if req_data.prompt:
            inputs["prompt"] = req_data.prompt
        else:
            inputs["prompt_token_ids"] = req_data.prompt_token_ids

        return inputs

    # Batch inference
    assert args.num_prompts > 0
    if audio_count != 1:
        inputs = get_input(0, audio_count)
        inputs = [inputs] * args.num_prompts
    else:
        # For single audio input, we need to vary the audio input
        # to avoid deduplication in vLLM engine.
        inputs = []
        for i in range(args.num_prompts):
            start = i % len(audio_assets)
            inp = get_input(start, start + 1)
            inputs.append(inp)

    # Add LoRA request if applicable
    lora_request = (
        req_data.lora_requests * args.num_prompts if req_data.lora_requests else None
    )

    outputs = llm.generate(
        inputs,
        sampling_params=sampling_params,
        lora_request=lora_request,
    )

    for o in outputs:
        generated_text = o.outputs[0].text
        print(generated_text)


# --- end of example ---
from dataclasses import asdict  # noqa: E402  (the example imports it at its top)


def example_args(model_type: str, num_prompts: int, num_audios: int, seed=None) -> Namespace:
    """What the example's parse_args gives for `-m MODEL_TYPE --num-prompts N --num-audios K`."""
    return Namespace(model_type=model_type, num_prompts=num_prompts, num_audios=num_audios, seed=seed,
                     tensor_parallel_size=None)


@pytest.mark.parametrize("model_type", ["qwen2_audio", "ultravox"])
@pytest.mark.parametrize("num_audios", [0, 1, 2])
def test_audio_language_example(model_type, num_audios, capsys):
    OUTPUTS.clear()
    main(example_args(model_type, num_prompts=3, num_audios=num_audios))
    (outputs,) = OUTPUTS
    assert len(outputs) == 3 and all(o.finished and 1 <= len(o.outputs[0].token_ids) <= 64 for o in outputs)
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outputs)
    # (transformers' AutoTokenizer may first ask about the checkpoint's remote code: only the end is the example's)
    assert capsys.readouterr().out.endswith("".join(o.outputs[0].text + "\n" for o in outputs))
    # Each prompt holds the audio it was given: the placeholder expanded to its clip's embeddings.
    audio_tokens = {"qwen2_audio": "<|AUDIO|>", "ultravox": "<|audio|>"}[model_type]
    tokenizer = AutoTokenizer.from_pretrained(MODELS[{"qwen2_audio": "Qwen/Qwen2-Audio-7B-Instruct",
                                                     "ultravox": "fixie-ai/ultravox-v0_5-llama-3_2-1b"}[model_type]])
    audio_id = tokenizer.convert_tokens_to_ids(audio_tokens)
    counts = [o.prompt_token_ids.count(audio_id) for o in outputs]
    if num_audios == 0:
        assert counts == [0, 0, 0]
    else:
        assert all(c >= 10 * num_audios for c in counts)
    if num_audios == 1:       # the prompts cycle through the two clips: 7.1 s and 8.6 s of audio
        assert counts[0] == counts[2] != counts[1]


def test_audio_language_example_whisper(capsys):
    OUTPUTS.clear()
    main(example_args("whisper", num_prompts=2, num_audios=1, seed=0))
    printed = capsys.readouterr().out.strip().split("\n")
    assert len(printed) == 2
    for line, name in zip(printed, ["mary_had_lamb", "winning_call"]):
        want, got = reference_words(name), re.findall(r"[a-z']+", line.lower())
        assert sum(a == b for a, b in zip(got, want)) >= 0.6 * len(want), (line, want)   # sampled at 0.2


# --- example: encoder_decoder_multimodal.py, the whisper path (import line: LLM above, SamplingParams) ---
def run_whisper_encoder_decoder():
    # Create a Whisper encoder/decoder model instance
    llm = LLM(
        model=MODELS["openai/whisper-large-v3"],
        max_model_len=448,
        max_num_seqs=2,
        limit_mm_per_prompt={"audio": 1},
        dtype="half",
    )

    prompts = [
        # Test implicit prompt
        {
            "prompt": "<|startoftranscript|>",
            "multi_modal_data": {
                "audio": AudioAsset("mary_had_lamb").audio_and_sample_rate,
            },
        },
        # Test explicit encoder/decoder prompt
        {
            "encoder_prompt": {
                "prompt": "",
                "multi_modal_data": {
                    "audio": AudioAsset("winning_call").audio_and_sample_rate,
                },
            },
            "decoder_prompt": "<|startoftranscript|>",
        },
    ]
    return llm, prompts


def encoder_decoder_main():
    llm, prompts = run_whisper_encoder_decoder()

    # Create a sampling params object.
    sampling_params = SamplingParams(
        temperature=0,
        top_p=1.0,
        max_tokens=64,
    )

    start = time.time()

    # Generate output tokens from the prompts. The output is a list of
    # RequestOutput objects that contain the prompt, generated
    # text, and other information.
    outputs = llm.generate(prompts, sampling_params)

    # Print the outputs.
    for output in outputs:
        prompt = output.prompt
        encoder_prompt = output.encoder_prompt
        generated_text = output.outputs[0].text
        print(f"Encoder prompt: {encoder_prompt!r}, "
              f"Decoder prompt: {prompt!r}, "
              f"Generated text: {generated_text!r}")

    duration = time.time() - start

    print("Duration:", duration)
    print("RPS:", len(prompts) / duration)
# --- end of example ---


def test_encoder_decoder_example_whisper(capsys):
    OUTPUTS.clear()
    encoder_decoder_main()
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0].startswith("Encoder prompt: '', Decoder prompt: '<|startoftranscript|>', Generated text: ")
    assert lines[1].startswith("Encoder prompt: '', Decoder prompt: '<|startoftranscript|>', Generated text: ")
    assert lines[2].startswith("Duration: ") and lines[3].startswith("RPS: ")
    for output, name in zip(OUTPUTS[0], ["mary_had_lamb", "winning_call"]):
        want, got = reference_words(name), re.findall(r"[a-z']+", output.outputs[0].text.lower())
        assert sum(a == b for a, b in zip(got, want)) >= 0.6 * len(want), (output.outputs[0].text, want)


def test_readme_explicit_prompt_on_the_english_only_model():
    """<|en|><|transcribe|> are implied for an English-only model: the README's prompt gives the text."""
    llm = hark.LLM()
    audio = AudioAsset("mary_had_lamb").audio_and_sample_rate
    greedy = SamplingParams(temperature=0, max_tokens=64)
    implicit, explicit = llm.generate([
        {"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": audio}},
        {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": audio}},
         "decoder_prompt": "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"}], greedy, use_tqdm=False)
    assert explicit.outputs[0].text and explicit.outputs[0].text.strip() == implicit.outputs[0].text.strip()
    with pytest.raises(ValueError, match="English-only"):
        llm.generate({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": audio}},
                      "decoder_prompt": "<|startoftranscript|><|de|><|transcribe|>"}, greedy, use_tqdm=False)


def test_split_audio_recipe():
    """vLLM's docs: cut long audio with split_audio, transcribe each chunk, join the texts."""
    from hark.multimodal.audio import split_audio
    clips = [AudioAsset(n).audio_and_sample_rate[0] for n in ("mary_had_lamb", "winning_call")]
    pause = np.zeros(16000 // 2, np.float32)
    audio = np.concatenate([clips[0], pause, clips[1], pause] * 3)     # 48 s, pauses between sentences
    chunks = split_audio(audio_data=audio, sample_rate=16000, max_clip_duration_s=30.0, overlap_duration_s=1.0,
                         min_energy_window_size=1600)
    assert len(chunks) == 2 and all(len(c) <= 30 * 16000 for c in chunks)
    assert np.array_equal(np.concatenate(chunks), audio)
    assert np.abs(chunks[1][:1600]).max() == 0        # cut at the start of a silent window
    llm = hark.LLM()
    outputs = llm.generate([{"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": (c, 16000)}}
                            for c in chunks], SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)
    text = " ".join(o.outputs[0].text for o in outputs)
    want = (reference_words("mary_had_lamb") + reference_words("winning_call")) * 3
    got = re.findall(r"[a-z']+", text.lower())
    assert len(got) >= 0.9 * len(want) and len(set(want) - set(got)) <= 3
    stereo = np.stack([audio, audio])           # (channels, time): split along time, as vLLM's
    assert [c.shape for c in split_audio(stereo, 16000, 30.0, 1.0, 1600)] == [(2, len(c)) for c in chunks]
