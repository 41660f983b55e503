"""The voices shipped in the model's voices.tgz and example persona prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_VOICE = "NATF2.pt"
DEFAULT_SEED = 42424242


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    category: str

    @property
    def filename(self) -> str:
        return f"{self.id}.pt"

    def to_dict(self) -> dict[str, str]:
        return {**asdict(self), "filename": self.filename}


@dataclass(frozen=True)
class PromptExample:
    id: str
    name: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_CATEGORIES = {
    "NATF": ("Natural female", range(4)),
    "NATM": ("Natural male", range(4)),
    "VARF": ("Variety female", range(5)),
    "VARM": ("Variety male", range(5)),
}

VOICES: tuple[Voice, ...] = tuple(
    Voice(id=f"{prefix}{i}", name=f"{label} {i}", category=label.split()[0].lower())
    for prefix, (label, numbers) in _CATEGORIES.items()
    for i in numbers
)

ASSISTANT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
)

PROMPTS: tuple[PromptExample, ...] = (
    PromptExample("assistant", "Assistant (teacher)", ASSISTANT_PROMPT),
    PromptExample(
        "customer_service",
        "Customer service",
        "You work for SwiftPlex Appliances which is a appliance repair company and your name is "
        "Farhod Toshmatov. Information: The dishwasher model is out of stock for replacement parts; "
        "we can use an alternative part with a 3-day delay. Labor cost remains $60 per hour.",
    ),
    PromptExample(
        "casual",
        "Casual chat",
        "You enjoy having a good conversation. Have a relaxed chat about weekend plans and favourite foods.",
    ),
    PromptExample(
        "astronaut",
        "Astronaut in trouble",
        "You enjoy having a good conversation. You are an astronaut named Alex on a mission to Mars. "
        "The reactor core is overheating and several ship systems are failing. Explain calmly what is "
        "happening and ask for help working out how to stabilise the reactor.",
    ),
)

DEFAULT_PROMPT = ASSISTANT_PROMPT


def voice_ids() -> list[str]:
    return [voice.id for voice in VOICES]


def voice_filenames() -> list[str]:
    return [voice.filename for voice in VOICES]


def normalize_voice_name(name: str) -> str | None:
    """Map 'NATF2', 'NATF2.pt' or 'natf2' to the catalog file name, or None if unknown."""
    stem = name.strip().removesuffix(".pt").upper()
    return f"{stem}.pt" if stem in voice_ids() else None
