"""LLM.transcribe for audio LLMs that transcribe from a prompt (Voxtral): one generate request per
input over the model's transcription prompt (its processor cuts the audio into its own windows), all
inputs in one batch. Plain transcripts: no timestamps, segments or translation."""
import math

from hark.audio import load_audio
from hark.sampling import SamplingParams
from hark.transcribe.pipeline import OFFLINE_LIMITS, SAMPLE_RATE
from hark.transcribe.result import Transcription

WHISPER_ONLY = ("word_timestamps", "initial_prompt", "prefix", "hotwords", "clip_timestamps", "split", "progress")


def transcribe_by_prompt(llm, audio, *, language: str | None = None, task: str = "transcribe",
                         temperature: float | tuple[float, ...] = 0.0, limits=None, timestamps: bool = True,
                         **options) -> Transcription | list[Transcription]:
    """`timestamps` is accepted and ignored (the transcript has none); Whisper's other options are refused."""
    if task != "transcribe":
        raise ValueError(f"this model transcribes but does not {task}; use a Whisper model.")
    refused = sorted(k for k, v in options.items() if k in WHISPER_ONLY and v not in (None, False)) + \
        sorted(k for k in options if k not in WHISPER_ONLY)
    if refused:
        raise ValueError(f"{', '.join(refused)}: not supported when transcribing with this model (Whisper only).")
    if isinstance(temperature, (tuple, list)):
        temperature = temperature[0]
    many = isinstance(audio, list)
    engine = llm.llm_engine
    inputs = [load_audio(a, SAMPLE_RATE, limits=limits or OFFLINE_LIMITS) for a in (audio if many else [audio])]
    prompts = [engine.processor.transcription_prompt(samples, language) for samples in inputs]
    longest = max(len(p.prompt_token_ids) for p in prompts)
    if longest >= engine.max_model_len:
        raise ValueError(f"the audio is too long: its prompt takes {longest} of max_model_len {engine.max_model_len} "
                         f"tokens.")
    ids = [engine.add_request(None, SamplingParams(temperature=temperature, max_tokens=engine.max_model_len -
                                                   len(p.prompt_token_ids)), processed=p) for p in prompts]
    done = {}
    try:
        while len(done) < len(ids):
            done.update((out.request_id, out) for out in engine.step() if out.finished and out.request_id in ids)
    except BaseException:
        for request_id in set(ids) - set(done):
            engine.abort_request(request_id)
        raise
    results = [Transcription(text=done[i].outputs[0].text.strip(), language=language or "",
                             duration=math.ceil(len(s) / SAMPLE_RATE * 1000) / 1000) for i, s in zip(ids, inputs)]
    return results if many else results[0]
