"""A small REST client for the PersonaPlex Queue API, used by the MCP server and the batch CLI.

    client = PersonaPlexClient("http://localhost:8998", api_key=None)
    job = client.submit_job("question.wav", voice_prompt="NATM1", seed=7)
    done = client.wait(job["job_id"], timeout=600)
    wav = client.download_audio(done["id"])
    voice = client.create_voice("anna.wav", "Anna", consent=True)  # then voice_prompt=voice["id"]

Every failure raises `ClientError` (a `PersonaPlexError`) carrying the HTTP status and the server's
`error` text; `WaitTimeoutError` says a wait ran out while the job goes on.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests

from personaplex.errors import PersonaPlexError
from personaplex.settings import DEFAULT_API_URL, ClientSettings

DEFAULT_TIMEOUT_S = 30.0
"""Seconds one ordinary request may take."""

UPLOAD_TIMEOUT_S = 600.0
"""Seconds a batch upload or an archive download may take."""

DEFAULT_POLL_INTERVAL_S = 1.0
"""Seconds between two reads of a job record while waiting."""

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

AudioInput = str | os.PathLike | bytes | IO[bytes]
"""A path, the bytes themselves, or a binary file open for reading."""


class ClientError(PersonaPlexError):
    """The server answered with an error, or could not be reached (status None)."""

    def __init__(
        self, message: str, status: int | None = None, payload: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.payload = dict(payload or {})

    @property
    def job_id(self) -> str | None:
        return self.payload.get("job_id")

    @property
    def retry_after(self) -> float | None:
        value = self.payload.get("retry_after")
        return float(value) if value is not None else None


class WaitTimeoutError(ClientError):
    """A wait ran out before the job became final; the job itself goes on."""


@dataclass(frozen=True)
class OfflineResult:
    """What POST /api/offline returns: the WAV bytes, the text pieces and the job id."""

    audio: bytes
    text: list[str]
    job_id: str | None


class PersonaPlexClient:
    """Talks to one PersonaPlex Queue server over HTTP."""

    def __init__(
        self,
        base_url: str = DEFAULT_API_URL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> PersonaPlexClient:
        """Read PERSONAPLEX_API_URL (default http://localhost:8998) and PERSONAPLEX_API_KEY."""
        settings = ClientSettings.from_env(environ)
        return cls(settings.api_url, settings.api_key, **kwargs)

    # -- transport -------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self.session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ClientError(f"Cannot reach the PersonaPlex server at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error_from(method, path, response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- service ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The /health report; an unhealthy server (503) is reported, not raised."""
        try:
            return self._json("GET", "/health")
        except ClientError as exc:
            if exc.status == 503 and exc.payload.get("status"):
                return exc.payload
            raise

    def voices(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/voices")["voices"]

    def get_voice(self, voice_id: str) -> dict[str, Any]:
        """One voice: a catalog one by id ("NATF2.pt", "natf2"), or a custom one with its loudness
        and consent record."""
        return self._json("GET", f"/api/voices/{_quote_id(voice_id)}")

    def create_voice(
        self, audio: AudioInput, name: str, *, consent: bool, filename: str | None = None
    ) -> dict[str, Any]:
        """Upload a 1-60 s recording as a custom voice named `name`; returns it (201), its `id` is
        the voice_prompt for jobs. `consent` attests the speaker agreed: without it nothing is sent
        as consent, so the server refuses with its 400 naming the field."""
        form = {"name": name, "consent": True if consent else None}
        files, data = _upload(audio, filename, form)
        return self._json("POST", "/api/voices", files=files, data=data)

    def delete_voice(self, voice_id: str) -> dict[str, Any]:
        """Delete a custom voice (403 for a catalog voice or one uploaded with another key)."""
        return self._json("DELETE", f"/api/voices/{_quote_id(voice_id)}")

    def prompts(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/prompts")["prompts"]

    def gpu_status(self) -> dict[str, Any]:
        return self._json("GET", "/api/gpu/status")

    def offload(self, worker: str | None = None) -> dict[str, Any]:
        params = {"worker": worker} if worker else None
        return self._json("POST", "/api/gpu/offload", params=params)

    # -- jobs ------------------------------------------------------------------------------------

    def submit_job(self, audio: AudioInput, *, filename: str | None = None, **params: Any) -> dict[str, Any]:
        """Queue a job. `params`: voice_prompt, text_prompt, seed, greedy, temp_audio, temp_text,
        topk_audio, topk_text (None values are left to the server's defaults). Returns the 202 body."""
        files, data = _upload(audio, filename, params)
        return self._json("POST", "/api/jobs", files=files, data=data)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/jobs/{_quote_id(job_id)}")

    def list_jobs(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        query = {k: v for k, v in (("status", status), ("limit", limit)) if v is not None}
        return self._json("GET", "/api/jobs", params=query)["jobs"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job now, or a running one at its next frame (the job record afterwards)."""
        return self._json("DELETE", f"/api/jobs/{_quote_id(job_id)}")

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is final and return its record; WaitTimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job.get("status") in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"Job {job_id} is still {job.get('status')} after {timeout:g} s.",
                    payload={"job_id": job_id, "status": job.get("status")},
                )
            pause = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
            time.sleep(max(pause, 0.0))

    def download_audio(self, job_id: str, dest: str | os.PathLike | None = None) -> bytes | Path:
        """The output WAV's bytes, or the path it was written to when `dest` is given."""
        data = self._request(
            "GET", f"/api/jobs/{_quote_id(job_id)}/audio", timeout=max(self.timeout, 120)
        ).content
        if dest is None:
            return data
        path = Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def download_text(self, job_id: str) -> dict[str, Any]:
        """The output text document: text, per-frame pieces, tokens, duration and timings."""
        return self._json("GET", f"/api/jobs/{_quote_id(job_id)}/text")

    def offline(
        self, audio: AudioInput, *, filename: str | None = None, timeout: float = 660.0, **params: Any
    ) -> OfflineResult:
        """The seed-compatible synchronous call: waits for the WAV (504 raises with the job id)."""
        files, data = _upload(audio, filename, params)
        response = self._request("POST", "/api/offline", files=files, data=data, timeout=timeout)
        text = json.loads(response.headers.get("X-Text-Output") or "[]")
        return OfflineResult(audio=response.content, text=text, job_id=response.headers.get("X-Job-Id"))

    # -- batches ---------------------------------------------------------------------------------

    def submit_batch(
        self,
        files: Sequence[AudioInput | tuple[str, AudioInput]] = (),
        *,
        archive: AudioInput | None = None,
        per_file: Mapping[str, Mapping[str, Any]] | None = None,
        timeout: float = UPLOAD_TIMEOUT_S,
        **params: Any,
    ) -> dict[str, Any]:
        """Queue many inputs as one batch: paths, or (name, path or bytes) pairs, and/or a zip.

        `params` are shared (as for submit_job); `per_file` maps an input name to its own. Returns the
        202 body: batch_id, jobs (name -> job id) and inputs (in the order sent)."""
        upload = [("files", _file_part(item)) for item in files]
        if archive is not None:
            upload.append(
                ("archive", _file_part(("archive.zip", archive) if isinstance(archive, bytes) else archive))
            )
        data = {key: _form_value(value) for key, value in params.items() if value is not None}
        if per_file:
            data["per_file"] = json.dumps(per_file)
        return self._json("POST", "/api/batches", files=upload, data=data, timeout=timeout)

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """Counts by state (`counts`), `finished`, and one entry per input (`jobs`)."""
        return self._json("GET", f"/api/batches/{_quote_id(batch_id)}")

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Cancel every job of the batch that has not finished (the batch afterwards)."""
        return self._json("DELETE", f"/api/batches/{_quote_id(batch_id)}")

    def download_batch_archive(self, batch_id: str, dest: str | os.PathLike | None = None) -> bytes | Path:
        """The zip of the batch's outputs (409 while jobs run), or the path it was written to.

        With `dest` the zip streams to a temporary file beside it that is renamed into place."""
        path = f"/api/batches/{_quote_id(batch_id)}/archive"
        with self._request("GET", path, timeout=UPLOAD_TIMEOUT_S, stream=True) as response:
            if dest is None:
                return response.content
            target = Path(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        handle.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return target


def _error_from(method: str, path: str, response: requests.Response) -> ClientError:
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    message = payload.get("error") or response.text[:200] or response.reason
    if "Retry-After" in response.headers:
        payload.setdefault("retry_after", response.headers["Retry-After"])
    return ClientError(
        f"{method} {path} failed ({response.status_code}): {message}", response.status_code, payload
    )


def _quote_id(job_id: str) -> str:
    return requests.utils.quote(str(job_id), safe="")


def _upload(audio: AudioInput, filename: str | None, params: Mapping[str, Any]) -> tuple[dict, dict]:
    content, name = _read_audio(audio)
    name = filename or name
    data = {key: _form_value(value) for key, value in params.items() if value is not None}
    return {"file": (name, content, "application/octet-stream")}, data


def _read_audio(audio: AudioInput) -> tuple[bytes, str]:
    """The bytes to send and the name they came with ("input.wav" for bare bytes)."""
    if isinstance(audio, bytes):
        return audio, "input.wav"
    if isinstance(audio, str | os.PathLike):
        path = Path(audio)
        return path.read_bytes(), path.name
    # An open file's `name` may be a descriptor number or absent: only a path's last part is used.
    name = getattr(audio, "name", None)
    return audio.read(), Path(name).name if isinstance(name, str) else "input.wav"


def _file_part(item: AudioInput | tuple[str, AudioInput]) -> tuple[str, bytes, str]:
    if isinstance(item, tuple):
        name, audio = item
        content = _read_audio(audio)[0]
    elif isinstance(item, bytes):
        raise TypeError("pass bytes as a (name, bytes) pair so the input has a name")
    else:
        content, name = _read_audio(item)
    return name, content, "application/octet-stream"


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
