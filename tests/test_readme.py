"""The README's promises that code can check: the configuration table and the Quick start."""

from __future__ import annotations

import re
from pathlib import Path

from personaplex.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def configuration_rows() -> list[tuple[str, str, str]]:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \| (.+?) \|$", section, flags=re.MULTILINE)
    return [(env, default, meaning.strip()) for env, default, meaning in rows]


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    assert configuration_rows() == Settings.describe()


def test_quick_start_has_the_two_commands_and_they_exist() -> None:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(\./scripts/\S+)", section, flags=re.MULTILINE)
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    for command in commands:
        assert (README.parent / command).is_file()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
