"""Settings: read from a mapping when asked, typed, with one table of every option."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from personaplex.settings import DEFAULT_API_URL, ClientSettings, Settings, parse_bool


def test_defaults_match_the_spec() -> None:
    s = Settings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.model == "nvidia/personaplex-7b-v1"
    assert s.data_dir == Path("./data")
    assert s.blob_store == "fs"
    assert s.gpu_idle_timeout == 300.0
    assert s.visibility_timeout == 21600.0
    assert s.api_key is None and s.device is None and s.hf_token is None
    assert (s.max_upload_mb, s.max_audio_seconds, s.retention_hours) == (200, 600, 24)
    assert (s.cpu_offload, s.max_attempts, s.max_queue) == (False, 3, 1000)
    assert (s.offline_timeout, s.heartbeat_ttl, s.port) == (600, 15, 8998)
    assert s.retention_s == 24 * 3600


def test_environment_is_parsed_by_type() -> None:
    env = {
        "REDIS_URL": "redis://h:1/2",
        "PERSONAPLEX_DATA_DIR": "/srv/pp",
        "PERSONAPLEX_BLOB_STORE": "Redis",
        "GPU_IDLE_TIMEOUT": "2.5",
        "PERSONAPLEX_API_KEY": "k",
        "CPU_OFFLOAD": "on",
        "PERSONAPLEX_MAX_ATTEMPTS": "5",
        "DEVICE": "cuda:1",
        "PORT": "9000",
    }
    s = Settings.from_env(env)
    assert s.redis_url == "redis://h:1/2"
    assert s.data_dir == Path("/srv/pp")
    assert s.blob_store == "redis"
    assert s.gpu_idle_timeout == 2.5
    assert (s.api_key, s.cpu_offload, s.max_attempts, s.device, s.port) == ("k", True, 5, "cuda:1", 9000)


@pytest.mark.parametrize("word", ["1", "true", "YES", "on", " True "])
def test_true_words(word: str) -> None:
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["0", "false", "no", "off", ""])
def test_false_words(word: str) -> None:
    assert parse_bool(word) is False


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("CPU_OFFLOAD", "maybe"),
        ("PERSONAPLEX_MAX_ATTEMPTS", "0"),
        ("PORT", "eighty"),
        ("PERSONAPLEX_BLOB_STORE", "s3"),
        ("PERSONAPLEX_VISIBILITY_TIMEOUT", "-1"),
    ],
)
def test_bad_values_name_the_variable(env: str, value: str) -> None:
    with pytest.raises(ValueError, match=env):
        Settings.from_env({env: value})


def test_empty_optional_strings_mean_unset() -> None:
    assert Settings.from_env({"PERSONAPLEX_API_KEY": "", "DEVICE": " "}).api_key is None


def test_overrides_win_over_environment() -> None:
    s = Settings.from_env({"PORT": "1"}, port=2)
    assert s.port == 2
    with pytest.raises(TypeError, match="nonsense"):
        Settings.from_env({}, nonsense=1)


def test_nothing_is_read_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    assert Settings.from_env().port == 1234
    assert Settings().port == 8998


def test_describe_lists_every_setting_once() -> None:
    rows = Settings.describe()
    assert len(rows) == len(fields(Settings))
    names = [env for env, _, _ in rows]
    assert len(set(names)) == len(names)
    assert rows[names.index("GPU_IDLE_TIMEOUT")][:2] == ("GPU_IDLE_TIMEOUT", "300.0")
    assert rows[names.index("PERSONAPLEX_DATA_DIR")][1] == "./data"
    assert all(meaning for _, _, meaning in rows)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_client_settings_are_read_like_the_services() -> None:
    """One home for the clients' URL and key (REST client, CLI, MCP server), read by the same helper."""
    assert ClientSettings.from_env({}) == ClientSettings(DEFAULT_API_URL, None)
    assert DEFAULT_API_URL == "http://localhost:8998"
    env = {"PERSONAPLEX_API_URL": " http://gpu-box:9000/ ", "PERSONAPLEX_API_KEY": "k"}
    assert ClientSettings.from_env(env) == ClientSettings("http://gpu-box:9000", "k")
    blank = {"PERSONAPLEX_API_URL": "", "PERSONAPLEX_API_KEY": " "}
    assert ClientSettings.from_env(blank) == ClientSettings(DEFAULT_API_URL, None)
    assert [env for env, _, _ in ClientSettings.describe()] == ["PERSONAPLEX_API_URL", "PERSONAPLEX_API_KEY"]
