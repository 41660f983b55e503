"""Live conversations through Redis: admission, and their frames both ways (no Celery involved).

A conversation is admitted through Redis, not through the batch queue, so it never waits behind
jobs: the web tier `open`s it (a record and a place in `Keys.LIVE_WAITING`, oldest first, whose
rank is the client's queue position), and a worker with a free live slot `take`s it into its loop.
Frames then travel over two Redis streams per conversation (DESIGN.md measured 0.55 ms a round
trip): the input stream carries the user's 16-bit PCM frames and an end marker, the output stream
carries each generated frame (text piece, 16-bit PCM, tokens) as it is stepped, then `end` or an
`error`. `RedisLink` is the worker's side: the `LiveLink` (personaplex.engine.batching) of a
conversation's row, fed from its input stream and answering on its output stream. Every key
expires (`LIVE_TTL_S` after its last write), so a conversation whose ends both died leaves nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from personaplex.errors import ConversationError
from personaplex.jobs import Keys, announce_work, new_job_id
from personaplex.params import GenerationParams

if TYPE_CHECKING:
    import torch

    from personaplex.engine.live import LiveSession

log = logging.getLogger(__name__)

LIVE_TTL_S = 300
"""Seconds a conversation's keys live after their last write."""
STREAM_MAX_ENTRIES = 1000
"""Entries a stream keeps (about 80 s of frames): a reader that far behind has lost the conversation."""
LIVE_IDLE_S = 10.0
"""A running conversation whose caller sent nothing for this long has lost its caller (a client streams
its microphone all along, silence included): its row leaves."""
LIVE_ALIVE_TTL_S = 1.5
"""TTL of a conversation's alive key, renewed by its worker every 0.5 s: its caller sees a dead
worker within this (plus one look)."""
LOOK_EVERY_S = 0.04
"""A row's link reads its input stream at least this often, with input queued or not, so a hang-up
behind queued frames ends the row within a frame."""

CLOSE_NORMAL = 1000
CLOSE_SERVER_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
PCM_SCALE = 32768.0
"""16-bit PCM <-> float samples."""


def to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM (clipped)."""
    return (np.clip(samples, -1.0, 32767 / PCM_SCALE) * PCM_SCALE).round().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    """16-bit little-endian PCM as float32 samples."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM_SCALE


_TAKE_LUA = """
-- KEYS[1]: the waiting line. ARGV: count, worker, the records' TTL, the records' key prefix.
-- Returns id, params, id, params, ... of the conversations taken (one whose record expired while
-- it waited is dropped: its caller is gone).
local taken = {}
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
for i = 1, #popped, 2 do
  local record = ARGV[4] .. popped[i]
  local params = redis.call('HGET', record, 'params')
  if params then
    redis.call('HSET', record, 'status', 'running', 'worker', ARGV[2])
    redis.call('EXPIRE', record, ARGV[3])
    taken[#taken + 1] = popped[i]
    taken[#taken + 1] = params
  end
end
return taken
"""


@dataclass(frozen=True)
class Admitted:
    """A conversation a worker took: its id and parameters."""

    session_id: str
    params: GenerationParams


class Conversations:
    """The Redis side of live conversations, for the web tier and the workers alike."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(_TAKE_LUA)

    # ---- admission ------------------------------------------------------------------------------
    def open(self, params: GenerationParams) -> str:
        """Ask for a row: a new conversation, last in the waiting line. Returns its id."""
        session_id = new_job_id()
        record = Keys.live(session_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(record, mapping={"params": json.dumps(params.to_dict()), "status": "waiting"})
            pipe.expire(record, LIVE_TTL_S)
            pipe.zadd(Keys.LIVE_WAITING, {session_id: time.time()})
            announce_work(pipe)
            pipe.execute()
        return session_id

    def waiting(self) -> int:
        """Conversations waiting for a row (one ZCARD)."""
        return int(self.redis.zcard(Keys.LIVE_WAITING))

    def withdraw(self, session_id: str) -> bool:
        """Leave the waiting line; False if a worker took it first (it is running: end it instead)."""
        return bool(self.redis.zrem(Keys.LIVE_WAITING, session_id))

    def forget(self, session_id: str) -> None:
        """Delete every key of an ended conversation (and its place in line, if it still has one)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(Keys.LIVE_WAITING, session_id)
            pipe.delete(*Keys.live_keys(session_id))
            pipe.execute()

    def keep_alive(self, session_ids: list[str]) -> None:
        """The worker still runs these (their alive keys renewed, one round trip)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.set(Keys.live_alive(session_id), b"1", px=int(LIVE_ALIVE_TTL_S * 1000))
            pipe.execute()

    def alive(self, session_id: str) -> bool:
        """Whether its worker renewed its alive key lately (false before a worker took it)."""
        return bool(self.redis.exists(Keys.live_alive(session_id)))

    def position(self, session_id: str) -> int | None:
        """Conversations ahead of it in the waiting line (0: next), or None once a worker took it."""
        rank = self.redis.zrank(Keys.LIVE_WAITING, session_id)
        return None if rank is None else int(rank)

    def take(self, worker: str, count: int) -> list[Admitted]:
        """Up to `count` waiting conversations, oldest first, now `worker`'s (status running).

        One script: a conversation leaves the waiting line and names its worker at once, so its
        caller, which reads the record when it sees it leave the line, always finds the worker."""
        if count <= 0:
            return []
        taken = self._take(keys=[Keys.LIVE_WAITING], args=[count, worker, LIVE_TTL_S, Keys.LIVE_RECORD])
        return [
            Admitted(_text(session_id), GenerationParams.from_dict(json.loads(params)))
            for session_id, params in zip(taken[::2], taken[1::2], strict=True)
        ]

    def status(self, session_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(Keys.live(session_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    # ---- frames -----------------------------------------------------------------------------------
    def send_audio(self, session_id: str, samples: np.ndarray) -> None:
        """The user's next samples (any length), as 16-bit PCM on the input stream."""
        self._append(Keys.live_in(session_id), {"pcm": to_pcm16(samples)})

    def end_input(self, session_id: str) -> None:
        """The user is done: the frames sent so far are still stepped."""
        self._append(Keys.live_in(session_id), {"end": b"1"})

    def hang_up(self, session_id: str) -> None:
        """The caller is gone: the row leaves at once, whatever input it had not stepped."""
        self._append(Keys.live_in(session_id), {"hangup": b"1"})

    def send_ready(self, session_id: str) -> None:
        """The prompt phase is done and the row is in the loop (the reference's handshake)."""
        self._append(Keys.live_out(session_id), {"kind": b"ready"})

    def send_frame(self, session_id: str, text: str, samples: np.ndarray, tokens: list[int]) -> None:
        fields = {
            "kind": b"frame",
            "text": text.encode(),
            "pcm": to_pcm16(samples),
            "tokens": json.dumps(tokens),
        }
        self._append(Keys.live_out(session_id), fields, create=False)

    def send_end(
        self, session_id: str, error: str | None = None, code: int = CLOSE_NORMAL, create: bool = True
    ) -> None:
        """The conversation is over: cleanly (no `error`), or why not, with the WebSocket close code
        its caller should use. `create=False` once its stream exists (after `send_ready`): an end
        that comes after the caller deleted the keys then leaves nothing behind."""
        fields: dict[str, Any] = {"kind": b"end", "code": str(code)}
        if error is not None:
            fields["error"] = error.encode()
        self._append(Keys.live_out(session_id), fields, create=create)

    def read(self, stream: str, after: str, block_ms: int | None, count: int = 64) -> list[tuple[str, dict]]:
        """Entries of `stream` after id `after` ("0": from the start), waiting up to `block_ms`
        (None: not at all); each is (entry id, fields with bytes values)."""
        found = self.redis.xread({stream: after}, count=count, block=block_ms)
        entries = []
        for _, items in found or ():
            for entry_id, fields in items:
                entries.append((_text(entry_id), {_text(k): v for k, v in fields.items()}))
        return entries

    def _append(self, stream: str, fields: dict[str, Any], create: bool = True) -> None:
        """Add an entry; with `create=False` only to a stream that still exists (its caller may have
        deleted it already: a late frame must not bring it back for LIVE_TTL_S)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(stream, fields, maxlen=STREAM_MAX_ENTRIES, approximate=True, nomkstream=not create)
            pipe.expire(stream, LIVE_TTL_S)
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLink:
    """A conversation's row on the worker: a `LiveLink` fed from its input stream, answering on its
    output stream, with the Mimi encode and decode of a `LiveSession` in between."""

    def __init__(
        self,
        conversations: Conversations,
        session_id: str,
        session: LiveSession,
        idle_s: float = LIVE_IDLE_S,
    ) -> None:
        self.conversations = conversations
        self.session_id = session_id
        self.session = session
        self.idle_s = idle_s
        self._inbox = Keys.live_in(session_id)
        self._read_after = "0"
        self._heard = self._looked = time.monotonic()
        self._hung_up = False
        self._stopped: str | None = None
        self._broken: ConversationError | None = None
        self._ready_sent = False

    # ---- LiveLink ---------------------------------------------------------------------------------
    def next_input(self) -> torch.Tensor | None:
        if self._broken is not None:
            raise self._broken
        user = self.session.next_input()
        if user is None and self._pull(block_ms=None):
            user = self.session.next_input()
        return user

    def deliver(self, frame: torch.Tensor) -> None:
        self.session.deliver(frame)
        out = self.session.frames.get_nowait()
        self.conversations.send_frame(self.session_id, out.text, out.audio, out.tokens)

    def closed(self) -> bool:
        """Over when the caller ended it (and its frames are stepped) or hung up, when it sent
        nothing for `idle_s`, or when the worker stops it."""
        if time.monotonic() - self._looked > LOOK_EVERY_S:
            self._pull(block_ms=None)
        return (
            self._hung_up
            or self._stopped is not None
            or self.session.closed()
            or time.monotonic() - self._heard > self.idle_s
        )

    def wait(self, timeout: float) -> None:
        self._pull(block_ms=max(1, int(timeout * 1000)))

    def ready(self) -> None:
        self._heard = self._looked = time.monotonic()  # its silence counts from here, not its prefill
        try:
            self.conversations.send_ready(self.session_id)
            self._ready_sent = True
        except redis.RedisError as exc:  # its caller would wait for a handshake: end the row instead
            self._broken = ConversationError(f"The handshake could not be sent ({exc}).")

    # ---- the worker's side --------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """End the conversation from the worker's side (it is shutting down); any thread."""
        self._stopped = reason

    def ending(self, limit_s: float) -> tuple[str | None, int]:
        """Why its row left the loop without an error: (None, 1000) when its caller ended it, else
        what to tell the caller and the close code."""
        if self._stopped is not None:
            return self._stopped, CLOSE_SERVICE_RESTART
        if self._hung_up or self.session.closed():
            return None, CLOSE_NORMAL
        if time.monotonic() - self._heard > self.idle_s:
            return f"No audio from the caller for {self.idle_s:g} s: the conversation ended.", CLOSE_NORMAL
        return (
            f"The conversation reached its limit of {limit_s:g} s (PERSONAPLEX_MAX_LIVE_SECONDS).",
            CLOSE_NORMAL,
        )

    def finish(self, error: str | None = None, code: int = CLOSE_NORMAL) -> None:
        """Tell the caller the conversation is over (or why it failed)."""
        self.conversations.send_end(self.session_id, error, code, create=not self._ready_sent)

    def _pull(self, block_ms: int | None) -> bool:
        """Move what arrived on the input stream into the session; True if anything did."""
        self._looked = time.monotonic()
        try:
            entries = self.conversations.read(self._inbox, self._read_after, block_ms)
        except redis.RedisError as exc:  # no input this time; silence long enough ends the row
            log.warning("conversation %s: its input is unreadable (%s)", self.session_id, exc)
            return False
        if entries:
            self._heard = time.monotonic()
        for entry_id, fields in entries:
            self._read_after = entry_id
            if "pcm" in fields:
                self.session.push(from_pcm16(fields["pcm"]))
            if "end" in fields:
                self.session.close()
            if "hangup" in fields:
                self._hung_up = True
        return bool(entries)
