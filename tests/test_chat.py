"""WS /api/chat end to end: a real web server, real Celery workers on the golden checkpoints or the
tiny model, a real redis-server, and a WebSocket client speaking the reference's protocol.

Live equals offline: in PCM mode with greedy=1, a conversation fed a golden case's input (as fast
as the server takes it) returns exactly the case's text pieces and its audio within 1e-4. Then the
limits and faults: a full worker's queue position and 1013, the client hanging up (its row freed
within a frame), a killed worker (0x05 and a close within 2 s), the length limit, malformed
messages, and many conversations opening and closing at once leaving nothing behind.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
import soundfile as sf
from chat_client import AUDIO, ChatClient
from fixtures import WorkerProcess, wait_until
from test_golden import CASES, GoldenCase

from personaplex import audio as audio_io
from personaplex.jobs import Keys
from personaplex.params import FRAME_SIZE, SAMPLE_RATE
from worker.control import query_gpu_status

StartWorker = Callable[..., WorkerProcess]
QUERY_OF = {"temp_text": "text_temperature", "topk_text": "text_topk", "temp_audio": "audio_temperature"}
QUERY_OF["topk_audio"] = "audio_topk"

NAMED_VOICE_CASES = [case for case in CASES if not case.spec["voice_prompt"].endswith(".wav")]
"""Cases whose voice is a named one (a caller picks voices by name; a case's own WAV is not one)."""
CHECKPOINTS = sorted({str(case.checkpoint) for case in NAMED_VOICE_CASES})


def case_query(case: GoldenCase) -> dict[str, Any]:
    spec = case.spec
    query: dict[str, Any] = {"codec": "pcm", "greedy": 1, "voice_prompt": spec["voice_prompt"]}
    query["text_prompt"] = spec.get("text_prompt", "")
    for key in ("seed", "temp_text", "topk_text", "temp_audio", "topk_audio"):
        if key in spec:
            query[QUERY_OF.get(key, key)] = spec[key]
    return query


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", CHECKPOINTS, ids=[Path(c).name for c in CHECKPOINTS])
def test_a_conversation_fed_a_golden_case_gives_the_reference_output(
    checkpoint: str, start_worker: StartWorker, start_web: Callable[..., Any]
) -> None:
    start_worker("gpu0", PERSONAPLEX_MODEL=checkpoint)
    server = start_web()
    for case in [c for c in NAMED_VOICE_CASES if str(c.checkpoint) == checkpoint]:
        expected_text = json.loads((case.folder / "expected_text.json").read_text())
        expected_audio, _ = sf.read(case.folder / "expected.wav", dtype="float32")
        samples = audio_io.load(case.input, SAMPLE_RATE)
        frames = -(-len(samples) // FRAME_SIZE)

        client = ChatClient(server.url, **case_query(case)).connect()
        assert client.received.metadata[-1]["worker"] == "gpu0@test"
        client.send_frames(samples)
        client.wait_for_audio(frames)
        client.hang_up()
        client.wait_closed()

        assert client.received.text == [t for t in expected_text if t not in ("PAD", "EPAD")], case.name
        audio = client.received.pcm()
        assert len(audio) == frames * FRAME_SIZE
        assert float(np.abs(audio[: len(expected_audio)] - expected_audio).max()) <= 1e-4, case.name


# ---- limits and faults, on the tiny model -----------------------------------------------------------
def speech_frames(speech: np.ndarray, seconds: float) -> np.ndarray:
    return speech[: int(seconds * SAMPLE_RATE)]


def ended(conversations: Any, session_id: str) -> bool:
    """Whether the conversation's worker wrote its end on the output stream."""
    entries = conversations.read(Keys.live_out(session_id), "0", None)
    return any(fields.get("kind") == b"end" for _, fields in entries)


def live_sessions(worker: WorkerProcess) -> int:
    status = query_gpu_status(worker_app(worker), [worker.hostname], timeout=5.0)[worker.hostname]
    return int(status["live_sessions"])


_apps: dict[str, Any] = {}


def worker_app(worker: WorkerProcess) -> Any:
    from personaplex.settings import Settings
    from worker import create_celery_app

    url = worker.env["REDIS_URL"]
    if url not in _apps:
        _apps[url] = create_celery_app(Settings.from_env({"REDIS_URL": url}))
    return _apps[url]


def live_keys(client: redis.Redis) -> list[bytes]:
    return [key for key in client.keys("personaplex:live:*")]


def test_a_caller_waits_in_line_then_is_refused_with_1013(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray, redis_client: redis.Redis
) -> None:
    start_worker("gpu0", PERSONAPLEX_MAX_LIVE="1")
    server = start_web(live_wait_s=1.5)
    first = ChatClient(server.url, codec="pcm").connect()
    second = ChatClient(server.url, codec="pcm").open()
    second.wait_closed(timeout=10)
    assert second.close_code == 1013 and "PERSONAPLEX_LIVE_WAIT_S" in second.received.errors[0]
    assert [m["queue_position"] for m in second.received.metadata] == [0]
    assert second.received.handshake_at is None
    first.send_frames(speech_frames(speech, 1.0))
    first.wait_for_audio(13)  # the first conversation went on meanwhile
    first.hang_up()
    first.wait_closed()
    wait_until(lambda: not live_keys(redis_client), 5, what="the conversations' keys to go")


def test_a_hang_up_frees_the_row_and_a_waiting_caller_takes_it(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray
) -> None:
    worker = start_worker("gpu0", PERSONAPLEX_MAX_LIVE="1")
    server = start_web(live_wait_s=30)
    first = ChatClient(server.url, codec="pcm").connect()
    first.send_frames(speech_frames(speech, 0.8))
    first.wait_for_audio(10)
    second = ChatClient(server.url, codec="pcm").open()
    wait_until(lambda: second.received.metadata, 5, what="the second caller's place in line")
    assert second.received.metadata[0]["queue_position"] == 0
    hung_up = time.monotonic()
    first.hang_up()
    second.connect(timeout=10)  # it was taken into the freed slot
    assert second.received.handshake_at - hung_up < 1.0
    assert live_sessions(worker) == 1
    fleet = requests.get(server.url + "/api/gpu/status", timeout=5).json()
    assert (fleet["active_connections"], fleet["live_sessions"]) == (1, 1)  # the conversation counts
    assert fleet["workers"][0]["live_slots_free"] == 0
    second.send_frames(speech_frames(speech, 0.4))
    second.wait_for_audio(5)
    second.hang_up()
    wait_until(lambda: live_sessions(worker) == 0, 2, what="the row to leave")


def test_a_killed_worker_ends_the_call_with_an_error_within_2_s(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray
) -> None:
    worker = start_worker("gpu0")
    server = start_web()
    client = ChatClient(server.url, codec="pcm").connect()
    client.send_frames(speech_frames(speech, 0.4))
    client.wait_for_audio(5)
    killed = time.monotonic()
    worker.kill()
    client.wait_closed(timeout=5)
    assert time.monotonic() - killed < 2.0
    assert client.close_code == 1011 and "stopped" in client.received.errors[-1]


def test_a_conversation_that_reaches_its_limit_is_closed_with_the_reason(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray
) -> None:
    start_worker("gpu0", PERSONAPLEX_MAX_LIVE_SECONDS="1")
    server = start_web()
    client = ChatClient(server.url, codec="pcm").connect()
    client.send_frames(speech_frames(speech, 2.0))
    client.wait_closed(timeout=20)
    assert client.close_code == 1000 and "PERSONAPLEX_MAX_LIVE_SECONDS" in client.received.errors[-1]
    assert len(client.received.audio) == 13  # 1 s: 12.5 frames, rounded up


def test_malformed_messages_are_ignored_or_close_with_a_reason(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray
) -> None:
    worker = start_worker("gpu0")
    server = start_web()
    client = ChatClient(server.url, codec="pcm").connect()
    assert client.ws is not None
    client.ws.send("a text frame")  # ignored: the protocol is binary
    client.ws.send(bytes([0x42, 1, 2, 3]))  # an unknown kind: ignored
    client.ws.send(b"")  # empty: ignored
    client.send_frames(speech_frames(speech, 0.4))
    client.wait_for_audio(5)  # still talking
    client.ws.send(bytes([AUDIO, 1, 2, 3]))  # an odd byte count is not 16-bit PCM
    client.wait_closed()
    assert client.close_code == 1007 and "16-bit" in client.received.errors[-1]

    big = ChatClient(server.url, codec="pcm").connect()
    assert big.ws is not None
    big.ws.send(bytes([AUDIO]) + bytes(300 * 1024))  # over the 256 kB message limit
    big.wait_closed()
    assert big.close_code == 1009

    opus = ChatClient(server.url).connect()  # the reference's codec
    assert opus.ws is not None
    opus.ws.send(bytes([AUDIO]) + b"OggS but not really a stream" * 10)
    opus.wait_closed()
    assert opus.close_code == 1007 and "Ogg Opus" in opus.received.errors[-1]

    wait_until(lambda: live_sessions(worker) == 0, 3, what="the rows to leave")
    after = ChatClient(server.url, codec="pcm").connect()  # the web server and the worker serve on
    after.send_frames(speech_frames(speech, 0.4))
    after.wait_for_audio(5)
    after.hang_up()


def test_bad_parameters_are_refused_before_anything_runs(
    start_web: Callable[..., Any], redis_client: redis.Redis
) -> None:
    server = start_web()
    for query, words in (
        ({"voice_prompt": "NOPE.pt"}, "voice"),
        ({"seed": "x"}, "seed"),
        ({"codec": "mp3"}, "codec"),
        ({"text_topk": "0"}, "topk_text"),
    ):
        client = ChatClient(server.url, **query).open()
        client.wait_closed()
        assert client.close_code == 1008 and words in client.received.errors[0], (query, client.received)
    ignored = ChatClient(server.url, pad_mult=0, repetition_penalty=1.1, text_seed=4).open()
    wait_until(lambda: ignored.received.metadata, 5, what="the waiting caller's metadata")
    ignored.hang_up()
    wait_until(lambda: not live_keys(redis_client), 5, what="the waiting conversation's keys to go")


def test_a_web_restart_ends_its_conversations_cleanly(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray, redis_client: redis.Redis
) -> None:
    worker = start_worker("gpu0")
    server = start_web()
    clients = [ChatClient(server.url, codec="pcm").connect() for _ in range(2)]
    for client in clients:
        client.send_frames(speech_frames(speech, 0.4))
    server.stop()
    for client in clients:
        client.wait_closed(timeout=5)
        assert client.close_code == 1012 and "restarting" in client.received.errors[-1]
    wait_until(lambda: live_sessions(worker) == 0, 3, what="the rows to leave")
    wait_until(lambda: not live_keys(redis_client), 5, what="the conversations' keys to go")


def test_many_conversations_opening_and_closing_at_once_leave_nothing_behind(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray, redis_client: redis.Redis
) -> None:
    worker = start_worker("gpu0", PERSONAPLEX_MAX_LIVE="4")
    server = start_web(live_wait_s=60)
    threads_before = threading.active_count()

    def converse(index: int) -> int:
        client = ChatClient(server.url, codec="pcm").connect(timeout=60)
        client.send_frames(speech_frames(speech, 0.16 * (1 + index % 3)))
        client.wait_for_audio(2, timeout=60)
        client.hang_up()
        client.wait_closed()
        return len(client.received.audio)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(12) as pool:
        assert all(n >= 2 for n in pool.map(converse, range(12)))
    wait_until(lambda: live_sessions(worker) == 0, 5, what="every row to leave")
    wait_until(lambda: not live_keys(redis_client), 5, what="every conversation's keys to go")
    wait_until(lambda: threading.active_count() <= threads_before, 5, what="the web's threads to end")


def test_the_reference_codec_ogg_opus_both_ways(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray
) -> None:
    """What the reference's web client does: Ogg Opus pages in (sphn's writer), pages out that
    sphn's reader decodes into the agent's 24 kHz audio."""
    import sphn

    start_worker("gpu0")
    server = start_web()
    client = ChatClient(server.url, voice_prompt="NATM1.pt", text_prompt="You are a tutor.", seed=3).connect()
    assert client.ws is not None
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    samples = speech_frames(speech, 2.0)
    for start in range(0, len(samples) - FRAME_SIZE + 1, FRAME_SIZE):
        page = writer.append_pcm(samples[start : start + FRAME_SIZE])
        if page:
            client.ws.send(bytes([AUDIO]) + page)
    wait_until(lambda: len(client.received.audio) >= 10, 30, what="Opus pages back")
    client.hang_up()
    client.wait_closed()
    reader = sphn.OpusStreamReader(SAMPLE_RATE)
    decoded = sum(len(reader.append_bytes(page)) for page in client.received.audio)
    assert decoded >= 8 * FRAME_SIZE  # the agent's audio, frame after frame
    assert client.received.audio[0][:4] == b"OggS"


def test_an_idle_worker_takes_a_waiting_conversation_within_100_ms(
    start_worker: StartWorker, start_web: Callable[..., Any], speech: np.ndarray, redis_client: redis.Redis
) -> None:
    """No job runs and the loop is idle: the worker still looks for conversations, every 50 ms."""
    from personaplex.conversations import Conversations
    from personaplex.params import GenerationParams

    worker = start_worker("gpu0")
    server = start_web()
    warm = ChatClient(server.url, codec="pcm").connect()  # the model loads once
    warm.hang_up()
    wait_until(lambda: live_sessions(worker) == 0, 5, what="the first conversation to leave")
    conversations = Conversations(redis_client)
    waits = []
    for _ in range(5):
        asked = time.monotonic()
        session_id = conversations.open(GenerationParams())
        wait_until(lambda s=session_id: conversations.position(s) is None, 2, interval=0.002, what="a worker")
        waits.append(time.monotonic() - asked)
        conversations.hang_up(session_id)
        # Its end, not a zero count (read before the row was counted, it let the keys go, the
        # hang-up among them, before the row had read it), as the web tier waits before forgetting.
        wait_until(lambda s=session_id: ended(conversations, s), 5, what="the row to leave")
        conversations.forget(session_id)
    assert sorted(waits)[2] < 0.1 and max(waits) < 0.2, waits
