"""API keys for every /api route: `Authorization: Bearer <key>` when any key is configured.

Keys come from three settings, each key with a name that job and batch records store as their owner
(the secret itself is never stored):

- `PERSONAPLEX_API_KEY`: one key, named `admin`, an admin key (the single-key setup of old).
- `PERSONAPLEX_ADMIN_KEYS=name:key,...`: admin keys: they see every job and batch, and may offload.
- `PERSONAPLEX_API_KEYS=name:key,...`: client keys: each sees only the jobs and batches it made;
  another client's id answers 404, as an unknown one does, so ids leak nothing.

With no key at all every request is an admin without a name (jobs get owner None). A presented key
is compared with every configured key, through fixed-length digests and `hmac.compare_digest`, so the
time taken depends neither on how much of a key matched nor on which key it was.

Browsers cannot set headers on a WebSocket, so the events socket also accepts `?access_token=<key>`.
Request lines carry that query string into access logs, so the key is masked in the logs we own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from flask import Flask, current_app, g, request

from personaplex.settings import Settings
from web.errors import ApiError

API_PREFIX = "/api/"
CHAT_PATH = "/api/chat"

LEGACY_KEY_NAME = "admin"
"""The owner name of jobs made with the single PERSONAPLEX_API_KEY."""

EXTENSION = "personaplex.keys"

ACCESS_LOGGERS = ("werkzeug", "gunicorn.access")
"""Loggers that write request lines: the development server's and gunicorn's (with --access-logfile)."""


class MaskAccessToken(logging.Filter):
    """Replaces the value of any `access_token=` query parameter in a log record with `***`.

    The record keeps its shape (message template, then a tuple or, for gunicorn's access log, a
    mapping of arguments), so formatters that read the arguments still find them.
    """

    PATTERN = re.compile(r"(access_token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._mask(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {key: self._mask(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(self._mask(value) for value in record.args)
        return True

    def _mask(self, value: object) -> object:
        if isinstance(value, str) and "access_token=" in value:
            return self.PATTERN.sub(r"\1***", value)
        return value


MASK_ACCESS_TOKEN = MaskAccessToken()


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: its key's name (None without keys) and whether it sees every job."""

    name: str | None
    admin: bool

    def can_see(self, owner: str | None) -> bool:
        """Whether a job or batch of `owner` exists for this caller (if not, it is answered 404)."""
        return self.admin or (self.name is not None and owner == self.name)

    @property
    def owner_filter(self) -> str | None:
        """The owner listings are limited to; None lists everything (admins only)."""
        return None if self.admin else self.name


OPEN = Principal(name=None, admin=True)
"""Every caller when no key is configured: sees all, and its jobs have no owner."""


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, each as the SHA-256 digest of its secret and the principal it stands for."""

    entries: tuple[tuple[bytes, Principal], ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Every key of the three settings; ValueError for a name or a secret given twice.

        A shared secret would make its owner ambiguous; a shared name would merge two clients.
        """
        entries: list[tuple[bytes, Principal]] = []
        for name, key, admin in _named_keys(settings):
            if any(p.name == name for _, p in entries):
                raise ValueError(f"API keys: the name {name!r} is used twice ({_where(settings)})")
            digest = _digest(key)
            if any(hmac.compare_digest(digest, d) for d, _ in entries):
                raise ValueError(f"API keys: {name!r} has the same key as another name; give each its own")
            entries.append((digest, Principal(name=name, admin=admin)))
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def identify(self, presented: str) -> Principal | None:
        """The principal whose key this is, or None; every key is compared, matched or not."""
        digest = _digest(presented)
        found = None
        for stored, principal in self.entries:
            if hmac.compare_digest(digest, stored):
                found = principal
        return found


def _named_keys(settings: Settings) -> Iterator[tuple[str, str, bool]]:
    if settings.api_key:
        yield LEGACY_KEY_NAME, settings.api_key, True
    for name, key in settings.admin_keys or ():
        yield name, key, True
    for name, key in settings.api_keys or ():
        yield name, key, False


def _where(settings: Settings) -> str:
    legacy = f"PERSONAPLEX_API_KEY is named {LEGACY_KEY_NAME!r}; " if settings.api_key else ""
    return f"{legacy}names must differ across PERSONAPLEX_ADMIN_KEYS and PERSONAPLEX_API_KEYS"


def _digest(key: str) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the key's length.
    return hashlib.sha256(key.encode()).digest()


def _presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.path.endswith("/events") or request.path == CHAT_PATH:
        return request.args.get("access_token")  # browsers cannot set headers on a WebSocket
    return None


def _check_api_key() -> None:
    keys: KeyRing = current_app.extensions[EXTENSION]
    if not keys:
        g.principal = OPEN
        return
    if not (request.path + "/").startswith(API_PREFIX):
        return  # /health, /openapi.json, the page: open, and they read no job
    presented = _presented_key()
    if presented is None:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": 'Bearer realm="personaplex"'},
        )
    principal = keys.identify(presented)
    if principal is None:
        raise ApiError(401, "Invalid API key.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    g.principal = principal


def current_principal() -> Principal:
    """The caller of this request; 401 where no key was checked (a route outside /api)."""
    principal = g.get("principal")
    if principal is None:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.")
    return principal


def current_owner() -> str | None:
    """The owner name a job or batch made by this request records (None without keys)."""
    return current_principal().name


def require_admin(what: str) -> None:
    """403 unless the caller holds an admin key: `what` acts on the whole fleet, not on its own jobs."""
    if not current_principal().admin:
        raise ApiError(403, f"{what} needs an admin key (PERSONAPLEX_ADMIN_KEYS or PERSONAPLEX_API_KEY).")


def init_app(app: Flask) -> None:
    """Check the API key before every request to an /api route; keep keys out of access logs.

    The keys are read once, here, so a malformed or ambiguous set stops the app from starting.
    """
    app.extensions[EXTENSION] = KeyRing.from_settings(app.config["PERSONAPLEX_SETTINGS"])
    app.before_request(_check_api_key)
    for name in ACCESS_LOGGERS:
        logging.getLogger(name).addFilter(MASK_ACCESS_TOKEN)  # the same filter is added once
