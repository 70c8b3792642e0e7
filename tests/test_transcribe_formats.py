"""Output formats: srt and vtt parse back to the segments; json shapes follow OpenAI's."""
import json
import re

import pytest

from hark.transcribe import InvalidTranscriptionRequest, Segment, Transcription, Word, format_transcription

CUE_TIME = re.compile(r"^(\d{2}):(\d{2}):(\d{2})[,.](\d{3}) --> (\d{2}):(\d{2}):(\d{2})[,.](\d{3})$")


def seconds(h, m, s, ms):
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_cues(body: str, marker: str) -> list[tuple[float, float, str]]:
    """A strict reader of SRT / WebVTT cue blocks: [index line (srt)], time line, text lines."""
    cues = []
    for block in body.strip().split("\n\n"):
        lines = block.split("\n")
        if marker == ",":
            assert lines[0] == str(len(cues) + 1), block
            lines = lines[1:]
        match = CUE_TIME.match(lines[0])
        assert match and marker in lines[0], lines[0]
        g = match.groups()
        cues.append((seconds(*g[:4]), seconds(*g[4:]), "\n".join(lines[1:])))
    return cues


@pytest.fixture
def transcription():
    words = [Word(" He", 0.0, 0.4, 0.9), Word(" was", 0.4, 0.8, 0.8)]
    segments = [
        Segment(0, 0, 0.0, 2.5, " He was not an ill-disposed young man,", [50363, 679, 50488], 0.0, -0.21, 1.3, 0.01,
                words=words),
        Segment(1, 0, 2.5, 3661.042, " unless --> to be rather cold-hearted.", [679], 0.2, -0.4, 1.1, 0.02, words=[]),
    ]
    return Transcription(text="He was not an ill-disposed young man, unless --> to be rather cold-hearted.",
                         language="en", duration=3662.0, segments=segments, words=words)


def test_srt_parses_back(transcription):
    cues = parse_cues(format_transcription(transcription, "srt"), ",")
    assert cues == [(0.0, 2.5, "He was not an ill-disposed young man,"),
                    (2.5, 3661.042, "unless -> to be rather cold-hearted.")]


def test_vtt_parses_back(transcription):
    body = format_transcription(transcription, "vtt")
    assert body.startswith("WEBVTT\n\n")
    cues = parse_cues(body[len("WEBVTT\n\n"):], ".")
    assert [(a, b) for a, b, _ in cues] == [(0.0, 2.5), (2.5, 3661.042)]


def test_json_and_verbose_json_shapes(transcription):
    assert json.loads(format_transcription(transcription, "json")) == {"text": transcription.text}
    body = json.loads(format_transcription(transcription, "verbose_json"))
    assert set(body) == {"task", "language", "duration", "text", "segments", "words"}
    assert body["task"] == "transcribe" and body["language"] == "english" and body["duration"] == 3662.0
    assert set(body["segments"][0]) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                                        "compression_ratio", "no_speech_prob"}
    assert body["words"] == [{"word": " He", "start": 0.0, "end": 0.4, "probability": 0.9},
                             {"word": " was", "start": 0.4, "end": 0.8, "probability": 0.8}]
    transcription.words = None
    assert "words" not in json.loads(format_transcription(transcription, "verbose_json"))


def test_text_and_unknown_format(transcription):
    assert format_transcription(transcription, "text") == transcription.text + "\n"
    with pytest.raises(InvalidTranscriptionRequest, match="srt"):
        format_transcription(transcription, "docx")
