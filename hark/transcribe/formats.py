"""Writing a Transcription as text, json, verbose_json (OpenAI's shapes), srt, vtt or tsv.

Subtitles hold one cue per segment. With word timings and a SubtitleLayout, cues are built from the
words instead (openai-whisper's writer options): lines of at most max_line_width characters, at most
max_line_count lines per cue (then the next cue starts; unless both are given, cues keep to segments), a
new cue after a pause of more than 3 s, each cue timed by its own first and last word; with
highlight_words, a cue per word too, the spoken word underlined.
"""
import json
from dataclasses import asdict, dataclass

from hark.transcribe.languages import LANGUAGES

from hark.transcribe.options import InvalidTranscriptionRequest
from hark.transcribe.result import Transcription, Word

FORMATS = ("text", "json", "verbose_json", "srt", "vtt")        # OpenAI's response formats
CLI_FORMATS = FORMATS + ("tsv",)
EXTENSIONS = {"text": "txt", "json": "json", "verbose_json": "json", "srt": "srt", "vtt": "vtt", "tsv": "tsv"}
LONG_PAUSE_S = 3.0


@dataclass(frozen=True)
class SubtitleLayout:
    max_line_width: int | None = None     # characters per line
    max_line_count: int | None = None     # lines per cue
    highlight_words: bool = False         # underline each word while it is spoken

    def __post_init__(self):
        for name in ("max_line_width", "max_line_count"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidTranscriptionRequest(f"{name} must be an integer ≥ 1, got {value!r}")

    @property
    def uses_words(self) -> bool:
        return self.max_line_width is not None or self.max_line_count is not None or self.highlight_words


def verbose_json(t: Transcription) -> dict:
    segments = [{k: v for k, v in asdict(s).items() if k != "words"} for s in t.segments]
    # OpenAI's shape names the language ("english"), where Transcription.language holds its code.
    body = {"task": t.task, "language": LANGUAGES.get(t.language, t.language), "duration": round(t.duration, 3),
            "text": t.text,
            "segments": segments}
    if t.words is not None:
        body["words"] = [asdict(w) for w in t.words]
    return body


def timestamp(seconds: float, decimal_marker: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    return text.strip().replace("-->", "->")


def _word_lines(groups: list[list[Word]], layout: SubtitleLayout) -> list[list[list[Word]]]:
    """Cues as lists of lines of words: `groups` (segments, or all words) are never joined in a cue."""
    width, count = layout.max_line_width or 1000, layout.max_line_count
    cues = []
    for words in groups:
        lines, line, length, last_end = [], [], 0, None
        for word in words:
            text = word.word.strip() if not line else word.word
            pause = last_end is not None and word.start - last_end > LONG_PAUSE_S
            if line and (length + len(word.word) > width or pause):
                lines.append(line)
                line, length, text = [], 0, word.word.strip()
                if pause or (count is not None and len(lines) == count):
                    cues.append(lines)
                    lines = []
            line.append(word)
            length += len(text)
            last_end = word.end
        if line:
            lines.append(line)
        if lines:
            cues.append(lines)
    return cues


def subtitle_cues(t: Transcription, layout: SubtitleLayout | None = None) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue; text lines are joined by newlines."""
    layout = layout or SubtitleLayout()
    if not layout.uses_words or not any(s.words for s in t.segments):
        return [(s.start, s.end, _cue_text(s.text)) for s in t.segments]
    words = [s.words for s in t.segments if s.words]
    keep_segments = layout.max_line_count is None or layout.max_line_width is None
    groups = words if keep_segments else [[w for ws in words for w in ws]]
    cues = []
    for lines in _word_lines(groups, layout):
        def text(underlined: Word | None = None) -> str:
            rendered = ["".join(f"<u>{w.word.strip()}</u>" if w is underlined else w.word.strip() if i == 0 else w.word
                                for i, w in enumerate(line)) for line in lines]
            return _cue_text("\n".join(rendered))
        flat = [w for line in lines for w in line]
        if not layout.highlight_words:
            cues.append((flat[0].start, flat[-1].end, text()))
            continue
        last = flat[0].start
        for word in flat:
            if word.start > last:
                cues.append((last, word.start, text()))
            cues.append((word.start, word.end, text(word)))
            last = word.end
    return cues


def srt(t: Transcription, layout: SubtitleLayout | None = None) -> str:
    cues = [f"{i}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n"
            for i, (start, end, text) in enumerate(subtitle_cues(t, layout), start=1)]
    return "\n".join(cues)


def vtt(t: Transcription, layout: SubtitleLayout | None = None) -> str:
    cues = [f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n" for start, end, text in subtitle_cues(t, layout)]
    return "WEBVTT\n\n" + "\n".join(cues)


def tsv(t: Transcription) -> str:
    """openai-whisper's tsv: a header, then start and end in integer milliseconds and the text."""
    rows = [f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text.strip().replace(chr(9), ' ')}" for s in t.segments]
    return "\n".join(["start\tend\ttext", *rows]) + "\n"


def format_transcription(t: Transcription, response_format: str, layout: SubtitleLayout | None = None) -> str:
    if response_format == "text":
        return t.text + "\n"
    if response_format == "json":
        return json.dumps({"text": t.text}, ensure_ascii=False)
    if response_format == "verbose_json":
        return json.dumps(verbose_json(t), ensure_ascii=False)
    if response_format == "srt":
        return srt(t, layout)
    if response_format == "vtt":
        return vtt(t, layout)
    if response_format == "tsv":
        return tsv(t)
    raise InvalidTranscriptionRequest(f"unknown format {response_format!r}; use one of {', '.join(CLI_FORMATS)}")
