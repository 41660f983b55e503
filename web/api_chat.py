"""WS /api/chat: a live full-duplex conversation, in the reference's protocol (DESIGN.md §7).

Every message is binary, its first byte its kind: 0x00 handshake (server to client, once the
prompt phase is done), 0x01 audio (Ogg Opus pages at 24 kHz both ways, as sphn reads and writes
them; with `codec=pcm`, 16-bit little-endian mono PCM at 24 kHz of any length), 0x02 text (the
piece of each generated text token that is not padding), 0x04 metadata (JSON: the session id, its
queue position while it waits, then its worker), 0x05 error (UTF-8, then a close).

The conversation runs on a GPU worker, not here (worker.loop): this process opens it in Redis
(personaplex.conversations), tells the client its place in line until a worker with a free live slot
takes it, then moves audio both ways over the conversation's streams: a reader thread decodes what
the client sends onto the input stream, and this handler relays each generated frame as it comes.
It ends when the client leaves (its row leaves the loop within a frame), when the worker ends it
(its limit, its shutdown, an error), or when the worker's alive key lapses (it died).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Flask, current_app, request
from flask_sock import Sock
from redis.exceptions import RedisError
from simple_websocket import ConnectionClosed, Server
from werkzeug.datastructures import MultiDict
from wsproto.utilities import LocalProtocolError

from personaplex.conversations import (
    CLOSE_NORMAL,
    CLOSE_SERVER_ERROR,
    CLOSE_SERVICE_RESTART,
    Conversations,
    from_pcm16,
)
from personaplex.jobs import Keys
from personaplex.params import SAMPLE_RATE, GenerationParams
from personaplex.settings import Settings
from web.api_events import finish_close, require_websocket_upgrade
from web.errors import ApiError
from web.services import services
from web.validation import parse_params

log = logging.getLogger(__name__)

bp = Blueprint("chat", __name__, url_prefix="/api")
bp.before_request(require_websocket_upgrade)
sock = Sock()

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)
"""The kinds of message, as their first byte says."""

QUERY_NAMES = {
    "voice_prompt": "voice_prompt",
    "text_prompt": "text_prompt",
    "seed": "seed",
    "greedy": "greedy",
    "text_temperature": "temp_text",
    "text_topk": "topk_text",
    "audio_temperature": "temp_audio",
    "audio_topk": "topk_audio",
}
"""Query parameter -> generation parameter; validated and defaulted as a job's are."""

CODECS = ("opus", "pcm")
PADDING_TOKENS = (0, 3)
"""EPAD and PAD: text tokens that carry no text."""

CLOSE_POLICY_VIOLATION = 1008
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TRY_AGAIN_LATER = 1013

WAIT_LOOK_S = 0.1
"""How often a waiting client's place in line is looked at (its metadata is sent when it moves)."""
READ_BLOCK_MS = 100
"""Longest wait on the output stream before the handler looks at the client and the worker again."""
ALIVE_LOOK_S = 0.25
"""How often a running conversation's alive key is checked (a dead worker's lapses in 1.5 s)."""
ALIVE_GRACE_S = 1.0
"""Time a worker has, after taking a conversation, to renew its alive key the first time."""
HANGUP_WAIT_S = 1.0
"""How long a leaving client's handler waits for the worker to confirm the row left, before it
deletes the conversation's keys (a later write by the worker would otherwise outlive it)."""
READER_STOP_S = 1.5
"""Longest wait for the reader thread to stop (its receive times out every second)."""
WORKER_GONE = "The worker running this conversation stopped (it no longer renews it): call again."
RESTARTING = "The server is restarting: call again."
CALLS_EXTENSION = "personaplex.calls"


class OpenCalls:
    """The conversations a web app holds open, so a restart can end them cleanly (`end_all`)."""

    def __init__(self) -> None:
        self._calls: set[Call] = set()
        self._lock = threading.Lock()

    @staticmethod
    def of(app: Flask) -> OpenCalls:
        return app.extensions.setdefault(CALLS_EXTENSION, OpenCalls())

    def add(self, call: Call) -> None:
        with self._lock:
            self._calls.add(call)

    def discard(self, call: Call) -> None:
        with self._lock:
            self._calls.discard(call)

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)

    def end_all(self, reason: str = RESTARTING) -> None:
        """Ask every open conversation to end: each tells its client why (0x05, close 1012) and
        hangs up its row within READ_BLOCK_MS. Safe from a signal handler (it only sets flags)."""
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.end(Ended(reason, CLOSE_SERVICE_RESTART))


@dataclass(frozen=True)
class Ended(Exception):
    """The conversation is over: what to tell the client (None: a clean end) and the close code."""

    error: str | None = None
    code: int = CLOSE_NORMAL


def chat_params(args: MultiDict[str, str]) -> GenerationParams:
    """The conversation's GenerationParams from the query, as a job's form is read (ApiError 400)."""
    renamed = MultiDict(
        [(QUERY_NAMES[name], value) for name, value in args.items(multi=True) if name in QUERY_NAMES]
    )
    return parse_params(renamed)


@sock.route("/chat", bp=bp)
def chat(ws: Server) -> None:
    try:
        _serve(ws)
    finally:
        finish_close(ws)


def _serve(ws: Server) -> None:
    svc = services()
    codec = request.args.get("codec", "opus").strip().lower()
    try:
        if codec not in CODECS:
            raise ApiError(400, f"codec must be one of {', '.join(CODECS)}, not {codec[:32]!r}.")
        params = chat_params(request.args)
    except ApiError as exc:
        _close(ws, exc.message, CLOSE_POLICY_VIOLATION)
        return
    conversations = Conversations(svc.live_redis)
    try:
        session_id = conversations.open(params)
    except RedisError as exc:
        _close(ws, f"Redis is unreachable ({exc}).", CLOSE_SERVER_ERROR)
        return
    call = Call(ws, conversations, session_id, codec, svc.settings)
    calls = OpenCalls.of(current_app)
    calls.add(call)
    try:
        call.run()
    finally:
        calls.discard(call)


class Call:
    """One client's conversation, from its place in line to its close."""

    def __init__(
        self, ws: Server, conversations: Conversations, session_id: str, codec: str, settings: Settings
    ) -> None:
        self.ws = ws
        self.conversations = conversations
        self.session_id = session_id
        self.settings = settings
        self.codec = codec
        self.taken = False
        self.taken_at = 0.0
        self.next_alive_look = 0.0
        self.confirmed = False
        """The worker's end entry was read: the row has left the loop."""
        self.hung_up = False
        """The hang-up went onto the input stream."""
        self.reader: threading.Thread | None = None
        self.gone = threading.Event()
        """The client left (or sent what ends the call)."""
        self.refusal: Ended | None = None
        """What the client sent that ends the call, and how to close."""
        self._after = "0"

    def run(self) -> None:
        try:
            self._wait_for_worker()
            self._wait_for_prompt()
            self._send(bytes([HANDSHAKE]))
            self.reader = threading.Thread(
                target=self._read_client, name=f"chat-in-{self.session_id[:8]}", daemon=True
            )
            self.reader.start()
            self._relay()
        except Ended as end:
            if end.error is not None:
                log.info("conversation %s: %s", self.session_id, end.error)
            _close(self.ws, end.error, end.code)
        except ConnectionClosed:
            pass
        except RedisError as exc:
            log.warning("conversation %s lost Redis: %s", self.session_id, exc)
            _close(self.ws, f"Redis is unreachable ({exc}).", CLOSE_SERVER_ERROR)
        except Exception as exc:  # a bug must still end the call as a failure, and say so
            log.exception("conversation %s failed", self.session_id)
            _close(self.ws, f"Internal error: {type(exc).__name__}: {exc}", CLOSE_SERVER_ERROR)
        finally:
            self._leave()

    # ---- waiting for a worker ---------------------------------------------------------------------
    def _wait_for_worker(self) -> None:
        """Tell the client its place in line as it moves, until a worker takes the conversation;
        past PERSONAPLEX_LIVE_WAIT_S it is refused (1013: try again later)."""
        deadline = time.monotonic() + self.settings.live_wait_s
        told: int | None = -1
        while True:
            self._check_client()
            position = self.conversations.position(self.session_id)
            if position is None:
                self.taken, self.taken_at = True, time.monotonic()
                worker = self.conversations.status(self.session_id).get("worker")
                self._metadata({"queue_position": None, "worker": worker})
                return
            if position != told:
                self._metadata({"queue_position": position})
                told = position
            if time.monotonic() > deadline and self.conversations.withdraw(self.session_id):
                message = (
                    f"No free live slot for {self.settings.live_wait_s:g} s "
                    "(PERSONAPLEX_LIVE_WAIT_S): every worker's PERSONAPLEX_MAX_LIVE are busy. Try again later."
                )
                raise Ended(message, CLOSE_TRY_AGAIN_LATER)
            self.gone.wait(WAIT_LOOK_S)

    def _wait_for_prompt(self) -> None:
        """Until the worker says the prompt phase is done and the row is in the loop."""
        while True:
            for kind, fields in self._read_worker():
                if kind == "ready":
                    return
                self._handle(kind, fields)

    # ---- the conversation -------------------------------------------------------------------------
    def _relay(self) -> None:
        """Each generated frame to the client as it comes, until the conversation ends."""
        writer = _opus_writer() if self.codec == "opus" else None
        while True:
            for kind, fields in self._read_worker():
                if kind == "frame":
                    self._send_frame(fields, writer)
                else:
                    self._handle(kind, fields)

    def _send_frame(self, fields: dict[str, bytes], writer: Any) -> None:
        tokens = json.loads(fields["tokens"])
        if tokens[0] not in PADDING_TOKENS:
            self._send(bytes([TEXT]) + fields["text"])
        if writer is None:
            self._send(bytes([AUDIO]) + fields["pcm"])
            return
        page = writer.append_pcm(from_pcm16(fields["pcm"]))
        if page:
            self._send(bytes([AUDIO]) + page)

    def _read_worker(self) -> list[tuple[str, dict[str, bytes]]]:
        """The worker's next entries (waits up to READ_BLOCK_MS); raises Ended when the client
        left or the worker is gone."""
        self._check_client()
        entries = self.conversations.read(Keys.live_out(self.session_id), self._after, READ_BLOCK_MS)
        if entries:
            self._after = entries[-1][0]
            return [(fields.get("kind", b"").decode(), fields) for _, fields in entries]
        self._check_worker()
        return []

    def _handle(self, kind: str, fields: dict[str, bytes]) -> None:
        if kind == "end":
            self.confirmed = True
            error = fields.get("error")
            raise Ended(error.decode() if error is not None else None, int(fields.get("code", CLOSE_NORMAL)))

    def _check_client(self) -> None:
        if self.refusal is not None:
            raise self.refusal
        if self.gone.is_set() or not self.ws.connected:
            raise ConnectionClosed()

    def _check_worker(self) -> None:
        """Ended if the worker that took the conversation stopped renewing its alive key (it
        renews every 0.5 s from the moment it takes it; the first renewal is given ALIVE_GRACE_S)."""
        now = time.monotonic()
        if now < self.next_alive_look or now < self.taken_at + ALIVE_GRACE_S:
            return
        self.next_alive_look = now + ALIVE_LOOK_S
        if not self.conversations.alive(self.session_id):
            raise Ended(WORKER_GONE, CLOSE_SERVER_ERROR)

    # ---- the client's side ------------------------------------------------------------------------
    def _read_client(self) -> None:
        """The client's messages onto the input stream (its own thread), until it leaves."""
        reader = _opus_reader() if self.codec == "opus" else None
        try:
            while not self.gone.is_set():
                message = self.ws.receive(timeout=1.0)
                if message is not None:
                    self._take(message, reader)
        except ConnectionClosed:
            self._hang_up()  # at once: the row leaves within a frame
        except Ended as end:
            self.refusal = end
        except RedisError as exc:
            log.warning("conversation %s: input lost Redis (%s)", self.session_id, exc)
            self.refusal = Ended(f"Redis is unreachable ({exc}).", CLOSE_SERVER_ERROR)
        finally:
            self.gone.set()

    def _hang_up(self) -> None:
        if self.taken and not self.hung_up and not self.confirmed:
            self.hung_up = True
            try:
                self.conversations.hang_up(self.session_id)
            except RedisError as exc:  # the worker ends it when its caller stays silent
                log.warning("conversation %s: hang-up not sent (%s)", self.session_id, exc)

    def end(self, why: Ended) -> None:
        """End the call from this server's side (any thread): the handler closes within a look."""
        self.refusal = why
        self.gone.set()

    def _take(self, message: bytes | str, reader: Any) -> None:
        if isinstance(message, str):
            log.info("conversation %s: a text message ignored (the protocol is binary)", self.session_id)
            return
        if not message or message[0] != AUDIO:
            kind = message[0] if message else None
            log.info("conversation %s: a message of kind %r ignored", self.session_id, kind)
            return
        payload = message[1:]
        if reader is None:
            if len(payload) % 2:
                raise Ended(
                    "PCM audio must be 16-bit samples: a message had an odd byte count.",
                    CLOSE_INVALID_PAYLOAD,
                )
            samples = from_pcm16(payload)
        else:
            try:
                samples = reader.append_bytes(payload)
            except Exception as exc:
                raise Ended(f"The audio is not an Ogg Opus stream ({exc}).", CLOSE_INVALID_PAYLOAD) from exc
        if len(samples):
            self.conversations.send_audio(self.session_id, np.asarray(samples, dtype=np.float32))

    # ---- the end -----------------------------------------------------------------------------------
    def _leave(self) -> None:
        """The row leaves (hang-up, or out of line), then every key of the conversation goes."""
        self.gone.set()
        try:
            if not self.taken and self.conversations.withdraw(self.session_id):
                pass  # never taken: nothing runs it
            elif not self.confirmed:
                self.taken = True
                self._hang_up()
                self._await_end()
            if self.reader is not None:  # it may still write input: it stops within its receive timeout
                self.reader.join(READER_STOP_S)
            self.conversations.forget(self.session_id)
        except RedisError as exc:  # the keys expire on their own
            log.warning("conversation %s: not cleaned up (%s)", self.session_id, exc)

    def _await_end(self) -> None:
        deadline = time.monotonic() + HANGUP_WAIT_S
        while time.monotonic() < deadline:
            entries = self.conversations.read(Keys.live_out(self.session_id), self._after, READ_BLOCK_MS)
            for entry_id, fields in entries:
                self._after = entry_id
                if fields.get("kind") == b"end":
                    return
            if not entries and not self.conversations.alive(self.session_id):
                return

    def _metadata(self, extra: dict[str, Any]) -> None:
        self._send(bytes([METADATA]) + json.dumps({"session_id": self.session_id, **extra}).encode())

    def _send(self, message: bytes) -> None:
        try:
            self.ws.send(message)
        except LocalProtocolError as exc:
            # The client's close arrived between simple-websocket's check and the send (its reader
            # thread answers it): the client left, as a ConnectionClosed says.
            raise ConnectionClosed() from exc


def _close(ws: Server, error: str | None, code: int) -> None:
    """0x05 with the error, if any, then the close (its reason cut to what a close frame holds)."""
    try:
        if error is not None:
            ws.send(bytes([ERROR]) + error.encode())
        ws.close(reason=code, message=(error or "")[:120])
    except (ConnectionClosed, LocalProtocolError):  # the client closed first
        pass


def _opus_writer() -> Any:
    import sphn

    return sphn.OpusStreamWriter(SAMPLE_RATE)


def _opus_reader() -> Any:
    import sphn

    return sphn.OpusStreamReader(SAMPLE_RATE)
