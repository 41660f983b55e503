"""The README's promises that code can check: the configuration table and the Quick start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from personaplex.audio import probe
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


@pytest.mark.slow
def test_the_demo_pushes_a_wav_through_the_queue(tmp_path: Path) -> None:
    """Quick start 1 without its install step: `python -m personaplex.demo`, as scripts/demo.sh runs it."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # it starts its own redis-server
    demo = subprocess.run(
        [sys.executable, "-m", "personaplex.demo", "--workdir", str(tmp_path), "--seconds", "2"],
        cwd=README.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "started a private redis-server" in demo.stdout
    (job_line,) = re.findall(r"^job (\w{32}) succeeded in .+ end to end$", demo.stdout, flags=re.MULTILINE)
    output = re.search(r"output audio: (\S+)", demo.stdout)
    assert output and job_line in output.group(1)
    assert probe(Path(output.group(1))).duration_s == pytest.approx(2.0, abs=0.01)
    assert '"rtf"' in demo.stdout and "noise" in demo.stdout
    # The time is accounted for: the cold start on its own line, then the timed job's parts.
    assert re.search(r"^cold start: .+ took \d+\.\d+ s", demo.stdout, flags=re.MULTILINE)
    parts = re.search(
        r"succeeded in (\S+) s end to end\n  = (\S+) s queued \+ (\S+) s inference \+ (\S+) s", demo.stdout
    )
    assert parts, demo.stdout
    total, *split = (float(x) for x in parts.groups())
    assert sum(split) == pytest.approx(total, abs=0.02)
