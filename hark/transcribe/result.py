"""What a transcription returns (the fields of OpenAI's verbose_json)."""
from dataclasses import asdict, dataclass, field


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass
class Segment:
    id: int
    seek: int                   # start of the decoded window, in 10 ms frames
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None


@dataclass
class Transcription:
    text: str
    language: str
    duration: float
    task: str = "transcribe"
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] | None = None     # all segments' words, when word timestamps were asked for

    def to_dict(self) -> dict:
        return asdict(self)
