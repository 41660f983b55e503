"""The voices shipped in the model's voices.tgz and example persona prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
"""The hub repo of the model (PERSONAPLEX_MODEL's default)."""
DEFAULT_VOICE = "NATF2.pt"
DEFAULT_SEED = 42424242
VOICE_SUFFIX = ".pt"  # every catalog id ends with it; callers may leave it off


@dataclass(frozen=True)
class Voice:
    """A catalog voice; its id is the legacy server's ("NATF2.pt"), which is also its file in voices.tgz."""

    id: str
    name: str
    category: str

    @property
    def filename(self) -> str:
        # The legacy contract made the id the file name; keeping the property (and the JSON key)
        # spares clients and the tiny checkpoint builder that read `filename` a second spelling.
        return self.id

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
    "NATF": ("Natural Female", range(4)),
    "NATM": ("Natural Male", range(4)),
    "VARF": ("Variety Female", range(5)),
    "VARM": ("Variety Male", range(5)),
}

VOICES: tuple[Voice, ...] = tuple(
    Voice(id=f"{prefix}{i}{VOICE_SUFFIX}", name=f"{label} {i}", category=label.split()[0].lower())
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
    """The catalog ids in order ("NATF0.pt" ... "VARM4.pt"), as the legacy server listed them."""
    return [voice.id for voice in VOICES]


def _stem(name: str) -> str:
    """'natf2.pt', 'NATF2.PT' and ' NATF2 ' all become 'NATF2'."""
    name = name.strip()
    if name.lower().endswith(VOICE_SUFFIX):
        name = name[: -len(VOICE_SUFFIX)]
    return name.upper()


_IDS_BY_STEM = {_stem(voice.id): voice.id for voice in VOICES}


def normalize_voice_name(name: str) -> str | None:
    """Map 'NATF2', 'NATF2.pt' or 'natf2' to the catalog id 'NATF2.pt', or None if unknown.

    The one place that accepts the short and lower-case spellings, so every entry point agrees.
    """
    return _IDS_BY_STEM.get(_stem(name))
