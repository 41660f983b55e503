"""The voice catalog keeps the legacy server's contract: ids like "NATF2.pt", names like "Natural Female 2"."""

from __future__ import annotations

import pytest

from personaplex.catalog import DEFAULT_VOICE, VOICES, normalize_voice_name, voice_ids

LEGACY_IDS = (
    [f"NATF{i}.pt" for i in range(4)]
    + [f"NATM{i}.pt" for i in range(4)]
    + [f"VARF{i}.pt" for i in range(5)]
    + [f"VARM{i}.pt" for i in range(5)]
)


def test_ids_are_the_legacy_file_names_in_order() -> None:
    assert voice_ids() == LEGACY_IDS
    assert DEFAULT_VOICE == "NATF2.pt" and DEFAULT_VOICE in voice_ids()


def test_names_and_categories_are_title_case_like_the_legacy_server() -> None:
    names = {voice.id: voice.name for voice in VOICES}
    assert names["NATF0.pt"] == "Natural Female 0"
    assert names["NATM3.pt"] == "Natural Male 3"
    assert names["VARF4.pt"] == "Variety Female 4"
    assert names["VARM4.pt"] == "Variety Male 4"
    assert {voice.category for voice in VOICES} == {"natural", "variety"}


def test_filename_is_the_id_and_both_are_in_the_json() -> None:
    for voice in VOICES:
        assert voice.filename == voice.id
        assert voice.to_dict() == {
            "id": voice.id,
            "name": voice.name,
            "category": voice.category,
            "filename": voice.id,
        }


@pytest.mark.parametrize("spelling", ["NATF0", "natf0", "NATF0.pt", "natf0.pt", "NATF0.PT", " NATF0 "])
def test_every_spelling_maps_to_the_legacy_id(spelling: str) -> None:
    assert normalize_voice_name(spelling) == "NATF0.pt"


@pytest.mark.parametrize("name", ["", ".pt", "NATF9", "NATF9.pt", "NATF0.pt.pt", "../NATF0.pt", "NATF0.wav"])
def test_anything_else_is_unknown(name: str) -> None:
    assert normalize_voice_name(name) is None
