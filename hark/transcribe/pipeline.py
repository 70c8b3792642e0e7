"""transcribe(llm, audio): Whisper over audio of any length, as openai-whisper does, but batched.

1. Load each input and cut it into windows of at most 30 s, at quiet points or around speech.
2. Run the decoder once over <|startoftranscript|> for every window when the model is multilingual
   (language) or the decode prompt does not end there (no-speech probability).
3. Decode every window as an engine request, with Whisper's timestamp rules as a logits processor (per
   beam with beam_size > 1 at temperature 0: openai-whisper's beam search with patience). A
   decode that fails the quality gates goes back at the next temperature (one that loops is ended as
   soon as it does, fallback.DoomedDecodeGuard); one that stopped early leaves the rest of its window as
   a new, shorter window (a tail), decoded at once. With condition_on_previous_text an input's windows
   decode one after another, each prompted with the text before it.
4. Cut each final window's tokens into segments and shift them by the window's real offset in its input.
5. Optionally time words from the alignment heads' cross-attention (batched dense decoder runs), and
   with hallucination_silence_threshold drop anomalous segments surrounded by silence (hallucination.py).

TranscriptionRun holds steps 2 to 5 and submits nothing itself: it hands out window decodes and takes
back the finished ones. `transcribe` below drives it by stepping the engine itself; hark serve sends the
same decodes to its running engine, where they share batches with every other request.
Encoder outputs come from the engine's encoder cache, so steps 2 and 5 re-run only the decoder.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from hark.audio import AudioLimits, load_audio, split_audio, split_on_speech
from hark.inputs import ProcessedPrompt
from hark.outputs import CompletionOutput
from hark.sampling import SamplingParams
from hark.transcribe.alignment import align_words
from hark.transcribe.levels import peak_level, with_input_floor
from hark.transcribe.hallucination import drop_hallucinations
from hark.transcribe.fallback import DoomedDecodeGuard, WindowDecode, is_silence, needs_fallback
from hark.transcribe.no_speech import NoSpeechProbe
from hark.transcribe.options import DEFAULT_TEMPERATURES, InvalidTranscriptionRequest, TranscriptionOptions
from hark.transcribe.result import Segment, Transcription
from hark.transcribe.rules import NoRepeatNGram, SuppressTokens, TimestampRules
from hark.transcribe.segments import compression_ratio, split_segments
from hark.transcribe.vocab import TIME_PRECISION, WhisperVocab
from hark.transcribe.words import attach_words, trim_silence

SAMPLE_RATE = 16000
WINDOW_S = 30.0
QUIET_SEARCH_S = 5.0  # a window ends at the quietest point of its last 5 s, where a pause between sentences likely is
MAX_PREFIX_TOKENS = 223   # prefix and hotwords: under half the decoder's 448 positions, as faster-whisper cuts them
MIN_TAIL_S = 0.3    # shorter unfinished tails are dropped, not decoded again
DENSE_BATCH = 8     # windows per dense decoder run (cross-attention weights are [B, H, L, 1500] per layer)
# Local files may be long: no duration cap, only sanity caps on memory (the server passes its own limits).
OFFLINE_LIMITS = AudioLimits(max_duration_s=math.inf, max_decoded_bytes=16 * 2**30, max_input_bytes=2**30)

ProgressCallback = Callable[[float, float], None]   # (seconds of audio done, seconds in all)


@dataclass(eq=False)
class Window:
    source: int                 # which input it belongs to
    offset: float               # start within that input, seconds
    duration: float
    samples: np.ndarray
    initial_silence: float = 0.0          # tails: seconds of silence the decode saw at their start
    prefix: list[int] = field(default_factory=list)   # prompt tokens after the task ones, as if decoded already
    index: int = 0                        # order of creation within the run (seeds its sampled decodes)
    processed: ProcessedPrompt | None = None
    no_speech_prob: float = math.nan      # from the dense probe, when one ran
    decode: WindowDecode | None = None
    token_logprobs: list[float] | None = None   # per token of decode.tokens, with opts.logprobs
    final: bool = False                   # decoded for good: segments (and tail) are set
    tail: "Window | None" = None          # the audio after the last finished segment, when the decode stopped early
    segments: list[Segment] = field(default_factory=list)
    failed: list["FailedDecode"] = field(default_factory=list)   # decodes that failed the quality gates


@dataclass
class FailedDecode:
    decode: WindowDecode
    token_logprobs: list[float] | None
    looping: bool               # compresses too well, or the guard ended it in a loop


@dataclass(eq=False)
class WindowRequest:
    """One decode of one window: submit `processed` with `params` to the engine, hand the finished
    completion back to TranscriptionRun.finish."""
    window: Window
    attempt: int                        # index into the temperature schedule
    params: SamplingParams
    probe: NoSpeechProbe | None         # reads P(no speech) off the decode's first step, when it can
    guard: DoomedDecodeGuard | None     # ends its samples early once they cannot pass the gates

    @property
    def processed(self) -> ProcessedPrompt:
        return self.window.processed


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
    many = isinstance(audio, list)
    engine = llm.llm_engine
    run = TranscriptionRun(engine, audio if many else [audio], opts, limits=limits or OFFLINE_LIMITS, progress=progress)
    decodes: dict[str, WindowRequest] = {}     # by engine request id

    def submit(requests: list[WindowRequest]) -> None:
        for d in requests:
            decodes[engine.add_request(None, d.params, processed=d.processed)] = d

    try:
        submit(run.start())
        while decodes:
            done = [(decodes.pop(out.request_id), out.outputs) for out in engine.step()
                    if out.finished and out.request_id in decodes]
            if done:
                submit(run.finish(done))
    except BaseException:
        for request_id in decodes:
            engine.abort_request(request_id)
        raise
    results = run.results()
    return results if many else results[0]


class TranscriptionRun:
    """The windows of some inputs and their decodes, as a state machine a driver moves: start() gives
    the first decodes; the driver runs them on the engine and hands each finished one to finish(), which
    gives the decodes that follow (retries, tails) until none is left; then results().

    The methods run model code (the dense probe, word alignment) and the constructor only prepares audio
    (decoding, splitting, mel features), so a driver calls start, finish and results where the engine's
    forward passes run (hark serve: as jobs in its engine thread) and may build the run anywhere.
    """

    def __init__(self, engine, audio: list, opts: TranscriptionOptions, limits: AudioLimits = OFFLINE_LIMITS,
                 progress: ProgressCallback | None = None):
        if not engine.is_encoder_decoder:
            raise InvalidTranscriptionRequest("transcription needs a Whisper model; this LLM serves a different kind")
        self.engine, self.opts = engine, opts
        self.vocab = vocab = WhisperVocab.from_checkpoint(engine.tokenizer, engine.generation_config)
        self.language_code = vocab.language_code(opts.language)
        if opts.task == "translate" and not vocab.is_multilingual:
            raise InvalidTranscriptionRequest(
                "this model is English-only and cannot translate; use a multilingual Whisper model")

        self.inputs = [load_audio(a, SAMPLE_RATE, limits=limits) for a in audio]
        self.tracker = _Progress(progress, sum(len(s) for s in self.inputs) / SAMPLE_RATE)
        self.windows: list[Window] = []     # every window, tails included, in order of creation
        self.timelines: list[list[Window]] = []     # per input, its windows in time order
        for i, samples in enumerate(self.inputs):
            self.timelines.append([self._add_window(w) for start, end in _clips(samples, opts.clip_timestamps)
                                   for w in _split(i, samples[start:end], opts.split, start / SAMPLE_RATE)])
        # Each window's log-mel floor comes from its whole input's peak, as in openai-whisper (levels.py).
        self.peaks = [max((peak_level(w.processed) for w in timeline), default=0.0) for timeline in self.timelines]
        for w in self.windows:
            w.processed = with_input_floor(w.processed, self.peaks[w.source])
        self.languages = [self.language_code or "en"] * len(self.inputs)
        self.hotwords = None if opts.prefix else opts.hotwords
        # Per input, the earlier text its next window is conditioned on: the initial prompt, then (with
        # condition_on_previous_text) each final window's tokens, reset after a window decoded hot.
        initial = vocab.encode(" " + opts.initial_prompt.strip()) if opts.initial_prompt and opts.initial_prompt.strip() else []
        self.previous_text = [list(initial) for _ in self.inputs]
        self.prefix_tokens = vocab.encode(" " + opts.prefix.strip())[:MAX_PREFIX_TOKENS] if opts.prefix else []
        # When the decode prompt ends with <|startoftranscript|>, the decode's first step sees P(no speech).
        self.ends_at_sot = not vocab.is_multilingual and opts.timestamps and not self.prefix_tokens
        timestamps = [] if opts.timestamps else list(range(vocab.timestamp_begin, engine.vocab_size))
        suppressed = vocab.suppress_tokens + timestamps
        self.suppress = SuppressTokens(suppressed, vocab.begin_suppress_tokens)
        self.text_taken = [0] * len(self.inputs)      # per input, how many windows take_text gave out
        self.text_started = [False] * len(self.inputs)

    def start(self) -> list[WindowRequest]:
        """The first decode of every window, after the dense probe (language, P(no speech)) when one is due."""
        detected = self._probe(self.windows)
        if self.vocab.is_multilingual and self.language_code is None:
            first = {}
            for w, lang in zip(self.windows, detected):
                first.setdefault(w.source, lang)
            self.languages = [first.get(i, "en") for i in range(len(self.inputs))]
        if self.opts.condition_on_previous_text:     # each input's windows one after another
            return self._first_decodes([timeline[0] for timeline in self.timelines if timeline])
        return self._first_decodes(self.windows)

    def finish(self, done: list[tuple[WindowRequest, list[CompletionOutput]]]) -> list[WindowRequest]:
        """Takes finished decodes (each with its samples); returns the decodes they lead to: a window
        that failed the quality gates again at the next temperature, and the tail of a window whose
        decode stopped early. A decode the guard ended early comes back as soon as it is doomed, so its
        window's next temperature starts at once."""
        retries, tails, following = [], [], []
        for request, completions in done:
            w = request.window
            if not self._passes(w, request, completions):
                retries.append(self._decode(w, request.attempt + 1))
                continue
            tails += self._finalize(w)
            if self.opts.condition_on_previous_text:
                following += self._condition_next(w)
        self._probe(tails)
        return retries + self._first_decodes(tails + [w for w in following if w not in tails])

    def _condition_next(self, w: Window) -> list[Window]:
        """condition_on_previous_text: adds the final window's tokens to its input's earlier text (or resets
        that after a hot decode, as openai-whisper does) and gives the window that follows it, if any."""
        previous = self.previous_text[w.source]
        previous += [t for s in w.segments for t in s.tokens]
        if w.decode.temperature > self.opts.prompt_reset_on_temperature:
            previous.clear()
        timeline = self.timelines[w.source]
        i = timeline.index(w) + 1
        return timeline[i:i + 1]

    def _passes(self, w: Window, request: WindowRequest, completions: list[CompletionOutput]) -> bool:
        """Sets the window's decode from the best beam or the likeliest sample; whether it passes the gates
        (the last temperature always does)."""
        opts = self.opts
        # beam search ranked its hypotheses already (sum logprob / length ** length_penalty)
        completion = completions[0] if request.params.uses_beam_search else max(completions, key=_likelihood)
        # The engine's log-probabilities are of the processed logits without the temperature:
        # openai-whisper's sum_logprob.
        w.decode = _window_decode(self.vocab, completion.token_ids, opts.temperature[request.attempt],
                                  completion.cumulative_logprob,
                                  request.probe.prob if request.probe else w.no_speech_prob)
        w.token_logprobs = None if completion.logprobs is None else [
            lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
        # A sample the guard ended (it loops, or its text compresses too well) fails, unless the window
        # is silence.
        doomed = request.guard is not None and request.guard.doomed(completion.token_ids)
        if not (doomed and not is_silence(w.decode, opts)) and not needs_fallback(w.decode, opts):
            return True
        w.failed.append(FailedDecode(w.decode, w.token_logprobs, doomed or _looping(w.decode, opts)))
        if request.attempt + 1 < len(opts.temperature):
            return False
        # Every temperature failed: faster-whisper's choice, the likeliest decode (avg_logprob) of those
        # that do not loop, else of all (openai-whisper keeps the last, hottest one).
        best = max([f for f in w.failed if not f.looping] or w.failed, key=lambda f: f.decode.avg_logprob)
        w.decode, w.token_logprobs = best.decode, best.token_logprobs
        return True

    def _finalize(self, w: Window) -> list[Window]:
        """Segments from the window's decode; returns its tail, if it has one, as a new window."""
        w.tail = _split_off_tail(w, self.vocab, self.opts)
        if w.tail is not None:
            timeline = self.timelines[w.source]
            timeline.insert(timeline.index(w) + 1, self._add_window(w.tail))
            w.tail.processed = with_input_floor(w.tail.processed, self.peaks[w.source])
        w.segments = self._segments(w)
        w.final = True
        self.tracker.advance(w.duration - (w.tail.duration if w.tail else 0.0))
        return [w.tail] if w.tail is not None else []

    @property
    def finished(self) -> bool:
        return all(w.final for w in self.windows)

    def take_text(self, source: int = 0) -> str:
        """Input `source`'s text that became final since the last call. A window's text is final once it
        and every window before it in time are, so the pieces, joined, are the transcription's text."""
        timeline, pieces = self.timelines[source], []
        while self.text_taken[source] < len(timeline) and timeline[self.text_taken[source]].final:
            pieces += [s.text for s in timeline[self.text_taken[source]].segments]
            self.text_taken[source] += 1
        text = "".join(pieces)
        if not self.text_started[source]:
            text = text.lstrip()
            self.text_started[source] = bool(text)
        return text

    def text_logprobs(self, w: Window) -> list[tuple[int, float]]:
        """(token id, log-probability) of each text token of a final window's segments (opts.logprobs)."""
        if not w.segments or w.token_logprobs is None:
            return []
        return [(t, lp) for t, lp in zip(w.decode.tokens, w.token_logprobs) if t < self.vocab.eot]

    def results(self) -> list[Transcription]:
        """One Transcription per input, once every window is final; word timings (dense decoder runs)
        are added here when asked for."""
        assert self.finished, "results() before every window's decode finished"
        opts = self.opts
        if opts.word_timestamps:
            windows = [w for timeline in self.timelines for w in timeline]
            _add_word_timestamps(self.engine, self.vocab, windows, self.languages, opts.task)
        results = []
        for i, samples in enumerate(self.inputs):
            segments = [s for w in self.timelines[i] for s in w.segments]
            if opts.hallucination_silence_threshold is not None:
                segments = drop_hallucinations(segments, opts.hallucination_silence_threshold,
                                               len(samples) / SAMPLE_RATE)
            for n, s in enumerate(segments):
                s.id = n
            results.append(Transcription(
                text="".join(s.text for s in segments).strip(), language=self.languages[i],
                duration=len(samples) / SAMPLE_RATE, task=opts.task, segments=segments,
                words=[word for s in segments for word in s.words] if opts.word_timestamps else None))
        return results

    def _add_window(self, w: Window) -> Window:
        w.index = len(self.windows)
        w.processed = self.engine.process_prompt(_engine_prompt(w, [self.vocab.sot]))
        self.windows.append(w)
        return w

    def _probe(self, windows: list[Window]) -> list[str | None]:
        """The dense probe, unless each decode reads P(no speech) off its own first step."""
        return [] if self.ends_at_sot or not windows else _probe_start_of_transcript(self.engine, self.vocab, windows)

    def _first_decodes(self, windows: list[Window]) -> list[WindowRequest]:
        for w in windows:
            tokens = _previous_text_tokens(self.vocab, self.previous_text[w.source], self.hotwords)
            tokens += self.vocab.sot_sequence(self.languages[w.source], self.opts.task)
            if not self.opts.timestamps:
                tokens.append(self.vocab.no_timestamps)
            if self.prefix_tokens and w is self.timelines[w.source][0]:   # the input's first window
                # faster-whisper's prompt: a segment opened at 0.00 that starts with the prefix
                w.prefix = ([self.vocab.timestamp_begin] if self.opts.timestamps else []) + self.prefix_tokens
                tokens += w.prefix
            w.processed = replace(w.processed, prompt_token_ids=tokens)
        return [self._decode(w, 0) for w in windows]

    def _decode(self, w: Window, attempt: int) -> WindowRequest:
        opts, vocab = self.opts, self.vocab
        probe = NoSpeechProbe(vocab.no_speech) if self.ends_at_sot else None
        processors = ([probe] if probe else []) + [self.suppress]
        if opts.no_repeat_ngram_size:
            processors.append(NoRepeatNGram(opts.no_repeat_ngram_size, w.prefix))
        if opts.timestamps:
            processors.append(TimestampRules(vocab, opts.max_initial_timestamp + w.initial_silence, w.prefix))
        guard = None
        if attempt + 1 < len(opts.temperature) and opts.compression_ratio_threshold is not None:
            guard = DoomedDecodeGuard(vocab, opts.compression_ratio_threshold)    # the last decode runs to its end
            processors.append(guard)
        max_context = self.engine.hf_config.max_target_positions
        prompt_len = len(w.processed.prompt_token_ids)
        temperature = opts.temperature[attempt]
        beams = opts.beam_size if temperature == 0 else 1      # temperature > 0 samples best_of instead
        params = SamplingParams(
            n=opts.best_of if temperature > 0 else 1, temperature=temperature, max_tokens=max(1, min(max_context // 2, max_context - prompt_len, opts.max_new_tokens or max_context)),
            seed=None if opts.seed is None else opts.seed + w.index, logits_processors=processors,
            logprobs=0 if opts.logprobs else None, beam_width=beams, patience=opts.patience if beams > 1 else None,
            length_penalty=opts.length_penalty, repetition_penalty=opts.repetition_penalty)
        return WindowRequest(w, attempt, params, probe, guard)

    def _segments(self, w: Window) -> list[Segment]:
        d = w.decode
        if is_silence(d, self.opts):
            return []
        return [Segment(id=0, seek=round(w.offset * 100), start=round(w.offset + timed.start, 3),
                        end=round(w.offset + timed.end, 3), text=self.vocab.decode(timed.tokens), tokens=timed.tokens,
                        temperature=d.temperature, avg_logprob=d.avg_logprob, compression_ratio=d.compression_ratio,
                        no_speech_prob=d.no_speech_prob)
                for timed in split_segments(d.tokens, self.vocab, w.duration)]


def _looping(d: WindowDecode, opts: TranscriptionOptions) -> bool:
    return opts.compression_ratio_threshold is not None and d.compression_ratio > opts.compression_ratio_threshold


def _likelihood(completion: CompletionOutput) -> float:
    """openai-whisper's ranking of best-of samples: sum of log-probabilities over length."""
    return completion.cumulative_logprob / max(1, len(completion.token_ids))


def _clips(samples: np.ndarray, spans) -> list[tuple[int, int]]:
    """The sample ranges to transcribe: all, or the clip_timestamps spans that hold audio."""
    if spans is None:
        return [(0, len(samples))]
    ranges = [(round(start * SAMPLE_RATE), min(len(samples), round(min(end, 1e9) * SAMPLE_RATE))) for start, end in spans]
    return [(a, b) for a, b in ranges if a < b]


def _split(source: int, samples: np.ndarray, how: str, offset: float = 0.0) -> list[Window]:
    if len(samples) <= WINDOW_S * SAMPLE_RATE:
        chunks = [(samples, 0.0)]
    elif how == "speech":
        chunks = split_on_speech(samples, SAMPLE_RATE, max_clip_duration_s=WINDOW_S)
    else:
        chunks = split_audio(samples, SAMPLE_RATE, max_clip_duration_s=WINDOW_S, overlap_duration_s=QUIET_SEARCH_S)
    return [Window(source, offset + float(start), len(chunk) / SAMPLE_RATE, chunk) for chunk, start in chunks if len(chunk)]


def _engine_prompt(w: Window, decoder_tokens: list[int]) -> dict:
    return {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (w.samples, SAMPLE_RATE)}},
            "decoder_prompt": decoder_tokens}


def _previous_text_tokens(vocab: WhisperVocab, previous: list[int], hotwords: str | None = None) -> list[int]:
    """<|startofprev|>, then hotwords and the last tokens of the earlier text (initial prompt, previous
    windows): what the decode is conditioned on (faster-whisper's order)."""
    words = vocab.encode(" " + hotwords.strip())[:MAX_PREFIX_TOKENS] if hotwords and hotwords.strip() else []
    text = previous[-(224 - 1):]
    return [vocab.sot_prev] + words + text if words or text else []


def _dense_batches(engine, windows: list[Window], tokens: list[list[int]]):
    """Yields (windows, token ids [B, L], encoder outputs [B, S, D]) in batches for `decode_dense`, the
    token lists right-padded with <|endoftext|> (the decoder is causal: padding changes nothing before it).
    Encoder outputs come from the engine's encoder cache when the windows were encoded already."""
    for start in range(0, len(windows), DENSE_BATCH):
        batch = windows[start:start + DENSE_BATCH]
        rows = tokens[start:start + DENSE_BATCH]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [engine.eos_token_ids[0]] * (length - len(r)) for r in rows])
        states = torch.stack(engine.encode([w.processed.mm_items[0] for w in batch]))
        yield batch, ids, states


def _probe_start_of_transcript(engine, vocab: WhisperVocab, windows: list[Window]) -> list[str | None]:
    """Fills each window's no_speech_prob from the logits after <|startoftranscript|>; returns each
    window's most likely language (None for English-only models)."""
    detected = []
    for batch, ids, states in _dense_batches(engine, windows, [[vocab.sot]] * len(windows)):
        logits, _ = engine.decode_dense(states, ids)
        probs = logits[:, 0].float().softmax(dim=-1)
        for w, p in zip(batch, probs):
            w.no_speech_prob = p[vocab.no_speech].item()
            if vocab.is_multilingual:
                codes = list(vocab.language_tokens)
                detected.append(codes[int(p[[vocab.language_tokens[c] for c in codes]].argmax())])
            else:
                detected.append(None)
    return detected


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
    heads = vocab.alignment_heads or _default_alignment_heads(engine.hf_config)
    spoken = [w for w in windows if w.segments]
    prompts = [vocab.sot_sequence(languages[w.source], task) + [vocab.no_timestamps] for w in spoken]
    texts = [[t for s in w.segments for t in s.tokens if t < vocab.eot] for w in spoken]
    rows = [p + t + [vocab.eot] for p, t in zip(prompts, texts)]
    alignments = []
    for batch, ids, states in _dense_batches(engine, spoken, rows):
        logits, cross = engine.decode_dense(states, ids, return_cross_attn=True)
        for b, w in enumerate(batch):
            i = len(alignments)
            length = len(rows[i])
            attention = torch.stack([cross[layer][b, head, :length] for layer, head in heads])
            alignments.append(align_words(vocab, languages[w.source], texts[i], logits[b, :length], attention,
                                          w.processed.mm_items[0].num_frames, len(prompts[i])))
    last_speech = {}
    for w, alignment in zip(spoken, alignments):
        trim_silence(alignment, w.samples)
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
