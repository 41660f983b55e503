"""Generation parameters and results: plain data, no torch, shared by web, worker and engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from personaplex.catalog import DEFAULT_PROMPT, DEFAULT_SEED, DEFAULT_VOICE

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per frame at 24 kHz
TEXT_MARKERS = frozenset({"PAD", "EPAD", "BOS", "EOS"})
"""Per-frame text entries that are markers, not words."""
SEED_RANGE = (-1, 2**63)
"""Seeds from -1 (random) up to, not including, 2**63 (torch takes a 64-bit seed)."""
TEMPERATURE_RANGE = (0.0, 10.0)
"""Temperatures allowed, both ends included (0 samples greedily)."""


@dataclass(frozen=True)
class GenerationParams:
    """What a caller chooses for one job. Defaults follow the reference CLI."""

    voice_prompt: str = DEFAULT_VOICE
    text_prompt: str = DEFAULT_PROMPT
    seed: int = DEFAULT_SEED
    greedy: bool = False
    temp_audio: float = 0.8
    temp_text: float = 0.7
    topk_audio: int = 250
    topk_text: int = 25

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be -1 (random) or in [0, 2**63), got {self.seed}")
        low, high = TEMPERATURE_RANGE
        for name in ("temp_audio", "temp_text"):
            value = getattr(self, name)
            if not low <= float(value) <= high:
                raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value}")
        for name in ("topk_audio", "topk_text"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Timings:
    """Seconds spent per phase of one job; rtf is processing time over audio duration."""

    load_s: float = 0.0
    prompt_s: float = 0.0
    encode_s: float = 0.0
    generate_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    rtf: float = 0.0
    prompt_cached: bool = False
    """Whether the job's prompt state (voice and text prompt) came from the worker's cache."""

    def to_dict(self) -> dict[str, float | bool]:
        return {k: v if isinstance(v, bool) else round(v, 6) for k, v in asdict(self).items()}


@dataclass
class EngineResult:
    """One job's output. `audio` is float32 mono at SAMPLE_RATE, as long as the input."""

    audio: Any  # numpy.ndarray [samples]
    text_frames: list[str]
    tokens: list[list[int]]  # per output frame: text token then 8 agent audio codes
    input_duration_s: float
    timings: Timings = field(default_factory=Timings)
    sample_rate: int = SAMPLE_RATE

    @property
    def text(self) -> str:
        """The generated words, without the PAD/EPAD markers."""
        words = [t for t in self.text_frames if t not in TEXT_MARKERS]
        return "".join(words).strip()

    @property
    def frames(self) -> int:
        return len(self.text_frames)

    def text_document(self) -> dict[str, Any]:
        """The JSON written next to the output WAV."""
        return {
            "text": self.text,
            "frames": self.text_frames,
            "tokens": self.tokens,
            "duration_s": self.input_duration_s,
            "sample_rate": self.sample_rate,
            "timings": self.timings.to_dict(),
        }
