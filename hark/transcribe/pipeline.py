"""transcribe(llm, audio): Whisper over audio of any length, as openai-whisper does, but batched.

1. Load each input and cut it into windows of at most 30 s, at quiet points or around speech.
2. Run the decoder once over <|startoftranscript|> for every window when the model is multilingual
   (language) or the decode prompt does not end there (no-speech probability).
3. Decode every window of every input in one engine batch, with Whisper's timestamp rules as a
   logits processor; re-decode only the windows that fail the quality gates, again all together,
   at the next temperature.
4. Cut each window's tokens into segments and shift them by the window's real offset in its input.
5. Optionally time words from the alignment heads' cross-attention (batched dense decoder runs).

Encoder outputs come from the engine's encoder cache, so steps 2 and 5 re-run only the decoder.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from hark.audio import AudioLimits, load_audio, split_audio, split_on_speech
from hark.inputs import ProcessedPrompt
from hark.sampling import SamplingParams
from hark.transcribe.alignment import align_words
from hark.transcribe.fallback import WindowDecode, is_silence, needs_fallback
from hark.transcribe.no_speech import NoSpeechProbe
from hark.transcribe.options import DEFAULT_TEMPERATURES, InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.result import Segment, Transcription
from hark.transcribe.rules import SuppressTokens, TimestampRules
from hark.transcribe.segments import compression_ratio, split_segments
from hark.transcribe.vocab import TIME_PRECISION, WhisperVocab
from hark.transcribe.words import attach_words

SAMPLE_RATE = 16000
WINDOW_S = 30.0
QUIET_SEARCH_S = 5.0  # a window ends at the quietest point of its last 5 s, where a pause between sentences likely is
MIN_TAIL_S = 0.3    # shorter unfinished tails are dropped, not decoded again
DENSE_BATCH = 8     # windows per dense decoder run (cross-attention weights are [B, H, L, 1500] per layer)
# Local files may be long: no duration cap, only sanity caps on memory (the server passes its own limits).
OFFLINE_LIMITS = AudioLimits(max_duration_s=math.inf, max_decoded_bytes=16 * 2**30, max_input_bytes=2**30)

ProgressCallback = Callable[[float, float], None]   # (seconds of audio done, seconds in all)


@dataclass
class Window:
    source: int                 # which input it belongs to
    offset: float               # start within that input, seconds
    duration: float
    samples: np.ndarray
    initial_silence: float = 0.0          # tails: seconds of silence the decode saw at their start
    processed: ProcessedPrompt | None = None
    no_speech_prob: float = math.nan      # from the dense probe, when one ran
    decode: WindowDecode | None = None
    tail: "Window | None" = None          # the audio after the last finished segment, when the decode stopped early
    segments: list[Segment] = field(default_factory=list)


def transcribe(
    llm,
    audio,
    *,
    language: str | None = None,
    task: str = "transcribe",
    timestamps: bool = True,
    word_timestamps: bool = False,
    temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
    initial_prompt: str | None = None,
    limits: AudioLimits | None = None,
    progress: ProgressCallback | None = None,
    **options,
) -> Transcription | list[Transcription]:
    """Transcribe (or translate to English) one input or a list of them.

    An input is a path, encoded bytes, a file object, a float array at 16 kHz or an (array, rate)
    tuple. A list gives a list of Transcriptions; all inputs are decoded in the same batches.
    Further `options`: the fields of TranscriptionOptions (thresholds, split="quiet"|"speech", seed).
    """
    opts = TranscriptionOptions(language=language, task=task, timestamps=timestamps, word_timestamps=word_timestamps,
                                temperature=temperature, initial_prompt=initial_prompt, **options)
    engine = llm.llm_engine
    if not getattr(engine.model, "is_encoder_decoder", False):
        raise InvalidTranscriptionRequest("transcription needs a Whisper model; this LLM serves a different kind")
    vocab = WhisperVocab.from_checkpoint(engine.tokenizer, engine.loaded.generation_config)
    language_code = vocab.language_code(opts.language)
    if opts.task == "translate" and not vocab.is_multilingual:
        raise InvalidTranscriptionRequest("this model is English-only and cannot translate; use a multilingual Whisper model")

    many = isinstance(audio, list)
    inputs = [load_audio(a, SAMPLE_RATE, limits=limits or OFFLINE_LIMITS) for a in (audio if many else [audio])]
    windows = [w for i, samples in enumerate(inputs) for w in _split(i, samples, opts.split)]
    tracker = _Progress(progress, sum(len(s) for s in inputs) / SAMPLE_RATE)

    prompt_prefix = _previous_text_tokens(vocab, opts.initial_prompt)
    ends_at_sot = not vocab.is_multilingual and opts.timestamps   # the decode's first step then sees P(no speech)
    languages = [language_code or "en"] * len(inputs)
    pending = windows
    while pending:   # the windows, then the tails that decodes left unfinished, then theirs
        for w in pending:
            w.processed = engine.process_prompt(_engine_prompt(w, [vocab.sot]))
        if not ends_at_sot:
            detected = _probe_start_of_transcript(engine, vocab, pending)
            if vocab.is_multilingual and language_code is None and pending is windows:
                first = {}
                for w, lang in zip(windows, detected):
                    first.setdefault(w.source, lang)
                languages = [first.get(i, "en") for i in range(len(inputs))]
        for w in pending:
            tokens = prompt_prefix + vocab.sot_sequence(languages[w.source], opts.task)
            if not opts.timestamps:
                tokens.append(vocab.no_timestamps)
            w.processed = replace(w.processed, prompt_token_ids=tokens)
        _decode_with_fallback(engine, vocab, opts, pending, ends_at_sot, tracker)
        pending = [w.tail for w in pending if w.tail is not None]
        windows = windows + pending
    windows.sort(key=lambda w: (w.source, w.offset))

    for w in windows:
        if is_silence(w.decode, opts):
            continue
        d = w.decode
        for timed in split_segments(d.tokens, vocab, w.duration):
            w.segments.append(Segment(
                id=0, seek=round(w.offset * 100), start=round(w.offset + timed.start, 3),
                end=round(w.offset + timed.end, 3), text=vocab.decode(timed.tokens), tokens=timed.tokens,
                temperature=d.temperature, avg_logprob=d.avg_logprob, compression_ratio=d.compression_ratio,
                no_speech_prob=d.no_speech_prob))
    if opts.word_timestamps:
        _add_word_timestamps(engine, vocab, windows, languages, opts.task)

    results = []
    for i, samples in enumerate(inputs):
        segments = [s for w in windows if w.source == i for s in w.segments]
        for n, s in enumerate(segments):
            s.id = n
        results.append(Transcription(
            text="".join(s.text for s in segments).strip(), language=languages[i],
            duration=len(samples) / SAMPLE_RATE, task=opts.task, segments=segments,
            words=[word for s in segments for word in s.words] if opts.word_timestamps else None))
    return results if many else results[0]


def _split(source: int, samples: np.ndarray, how: str) -> list[Window]:
    if len(samples) <= WINDOW_S * SAMPLE_RATE:
        chunks = [(samples, 0.0)]
    elif how == "speech":
        chunks = split_on_speech(samples, SAMPLE_RATE, max_clip_duration_s=WINDOW_S)
    else:
        chunks = split_audio(samples, SAMPLE_RATE, max_clip_duration_s=WINDOW_S, overlap_duration_s=QUIET_SEARCH_S)
    return [Window(source, float(start), len(chunk) / SAMPLE_RATE, chunk) for chunk, start in chunks if len(chunk)]


def _engine_prompt(w: Window, decoder_tokens: list[int]) -> dict:
    return {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (w.samples, SAMPLE_RATE)}},
            "decoder_prompt": decoder_tokens}


def _previous_text_tokens(vocab: WhisperVocab, initial_prompt: str | None) -> list[int]:
    """<|startofprev|> and the prompt's last tokens, which condition the decode on earlier text."""
    if not initial_prompt or not initial_prompt.strip():
        return []
    return [vocab.sot_prev] + vocab.encode(" " + initial_prompt.strip())[-(224 - 1):]


def _dense_batches(engine, windows: list[Window], tokens: list[list[int]]):
    """Yields (windows, token ids [B, L], encoder outputs [B, S, D]) in batches for `decode_dense`, the
    token lists right-padded with <|endoftext|> (the decoder is causal: padding changes nothing before it).
    Encoder outputs come from the engine's encoder cache when the windows were encoded already."""
    for start in range(0, len(windows), DENSE_BATCH):
        batch = windows[start:start + DENSE_BATCH]
        rows = tokens[start:start + DENSE_BATCH]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [engine.eos_token_ids[0]] * (length - len(r)) for r in rows])
        states = torch.stack(engine.runner.encode_audio([w.processed.audio_items[0] for w in batch]))
        yield batch, ids, states


def _probe_start_of_transcript(engine, vocab: WhisperVocab, windows: list[Window]) -> list[str | None]:
    """Fills each window's no_speech_prob from the logits after <|startoftranscript|>; returns each
    window's most likely language (None for English-only models)."""
    detected = []
    for batch, ids, states in _dense_batches(engine, windows, [[vocab.sot]] * len(windows)):
        logits, _ = engine.model.decode_dense(states, ids.to(states.device))
        probs = logits[:, 0].float().softmax(dim=-1)
        for w, p in zip(batch, probs):
            w.no_speech_prob = p[vocab.no_speech].item()
            if vocab.is_multilingual:
                codes = list(vocab.language_tokens)
                detected.append(codes[int(p[[vocab.language_tokens[c] for c in codes]].argmax())])
            else:
                detected.append(None)
    return detected


def _decode_with_fallback(engine, vocab, opts: TranscriptionOptions, windows: list[Window], ends_at_sot: bool,
                          tracker: "_Progress") -> None:
    """Decodes all windows at the first temperature, then the failing ones at the next, and so on."""
    suppressed = vocab.suppress_tokens + ([] if opts.timestamps else list(range(vocab.timestamp_begin, engine.vocab_size)))
    suppress = SuppressTokens(suppressed, vocab.begin_suppress_tokens)
    max_context = engine.loaded.hf_config.max_target_positions
    pending = windows
    for attempt, temperature in enumerate(opts.temperature):
        last = attempt == len(opts.temperature) - 1
        requests = {}
        for n, w in enumerate(pending):
            probe = NoSpeechProbe(vocab.no_speech)
            processors = ([probe] if ends_at_sot else []) + [suppress]
            if opts.timestamps:
                processors.append(TimestampRules(vocab, opts.max_initial_timestamp + w.initial_silence))
            prompt_len = len(w.processed.prompt_token_ids)
            params = SamplingParams(
                temperature=temperature, max_tokens=max(1, min(max_context // 2, max_context - prompt_len)),
                seed=None if opts.seed is None else opts.seed + n, logits_processors=processors)
            rid = engine.add_request(None, params, processed=w.processed)
            requests[rid] = (w, probe)
        failed = []
        try:
            with torch.inference_mode():   # the processors edit the engine's logits rows in place
                while requests:
                    for out in engine.step():
                        if not out.finished or out.request_id not in requests:
                            continue
                        w, probe = requests.pop(out.request_id)
                        # The engine's log-probabilities are of the processed logits without the
                        # temperature: openai-whisper's sum_logprob.
                        completion = out.outputs[0]
                        w.decode = _window_decode(vocab, completion.token_ids, temperature,
                                                  completion.cumulative_logprob,
                                                  probe.prob if ends_at_sot else w.no_speech_prob)
                        if not last and needs_fallback(w.decode, opts):
                            failed.append(w)
                        else:
                            w.tail = _split_off_tail(w, vocab, opts)
                            tracker.advance(w.duration - (w.tail.duration if w.tail else 0.0))
        except BaseException:
            for rid in requests:
                engine.abort_request(rid)
            raise
        pending = failed
        if not pending:
            return


def _split_off_tail(w: Window, vocab: WhisperVocab, opts: TranscriptionOptions) -> Window | None:
    """openai-whisper's seek rule, batched: a decode that ends with a timestamp pair (the next segment
    opened, not finished) consumed its window only up to its last finished segment. Its tokens are cut
    there and the rest of the window becomes a new, shorter window. Whisper does this when speech runs
    into the window's end: it leaves the cut-off sentence to the next window."""
    tokens = w.decode.tokens
    if not opts.timestamps or is_silence(w.decode, opts) or len(tokens) < 2:
        return None
    if vocab.is_timestamp(tokens[-1]) and not vocab.is_timestamp(tokens[-2]):
        return None                          # a single timestamp ends: the window is done
    pairs = [i for i in range(1, len(tokens)) if vocab.is_timestamp(tokens[i - 1]) and vocab.is_timestamp(tokens[i])]
    if not pairs:
        return None
    cut = pairs[-1]           # tokens[cut - 1] closes the last finished segment, tokens[cut] opens the next
    consumed = (tokens[cut - 1] - vocab.timestamp_begin) * TIME_PRECISION
    if not 0 < consumed <= w.duration - MIN_TAIL_S:
        return None
    w.decode.tokens = tokens[:cut]
    start = round(consumed * SAMPLE_RATE)
    # The tail may open with silence up to where the decode placed the unfinished segment: its first
    # timestamp may come that much later than max_initial_timestamp.
    silence = max(0.0, (tokens[cut] - tokens[cut - 1]) * TIME_PRECISION)
    return Window(w.source, w.offset + consumed, (len(w.samples) - start) / SAMPLE_RATE, w.samples[start:],
                  initial_silence=silence)


def _window_decode(vocab: WhisperVocab, token_ids: list[int], temperature: float, sum_logprob: float,
                   no_speech_prob: float) -> WindowDecode:
    tokens = list(token_ids)
    if tokens and tokens[-1] == vocab.eot:
        tokens.pop()
    text = vocab.decode(tokens)
    return WindowDecode(tokens=tokens, text=text, temperature=temperature,
                        avg_logprob=sum_logprob / (len(tokens) + 1), compression_ratio=compression_ratio(text),
                        no_speech_prob=no_speech_prob)


def _add_word_timestamps(engine, vocab: WhisperVocab, windows: list[Window], languages: list[str], task: str) -> None:
    """Word timing per window from one dense decoder run over its text (openai-whisper's timing.py)."""
    heads = vocab.alignment_heads or _default_alignment_heads(engine.loaded.hf_config)
    spoken = [w for w in windows if w.segments]
    prompts = [vocab.sot_sequence(languages[w.source], task) + [vocab.no_timestamps] for w in spoken]
    texts = [[t for s in w.segments for t in s.tokens if t < vocab.eot] for w in spoken]
    rows = [p + t + [vocab.eot] for p, t in zip(prompts, texts)]
    alignments = []
    for batch, ids, states in _dense_batches(engine, spoken, rows):
        logits, cross = engine.model.decode_dense(states, ids.to(states.device), return_cross_attn=True)
        for b, w in enumerate(batch):
            i = len(alignments)
            length = len(rows[i])
            attention = torch.stack([cross[layer][b, head, :length] for layer, head in heads])
            alignments.append(align_words(vocab, languages[w.source], texts[i], logits[b, :length], attention,
                                          w.processed.audio_items[0].num_frames, len(prompts[i])))
    last_speech = {}
    for w, alignment in zip(spoken, alignments):
        last_speech[w.source] = attach_words(w.segments, alignment, vocab, w.offset, last_speech.get(w.source, 0.0))
    for w in windows:
        for s in w.segments:
            if s.words is None:
                s.words = []


def _default_alignment_heads(hf_config) -> list[tuple[int, int]]:
    """openai-whisper's default when a checkpoint names none: every head of the upper half of the decoder."""
    layers, heads = hf_config.decoder_layers, hf_config.decoder_attention_heads
    return [(layer, head) for layer in range(layers // 2, layers) for head in range(heads)]


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: float):
        self.callback, self.total, self.done = callback, total, 0.0
        if callback:
            callback(0.0, total)

    def advance(self, seconds: float) -> None:
        self.done += seconds
        if self.callback:
            self.callback(min(self.done, self.total), self.total)
