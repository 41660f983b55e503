"""Live conversations through a real private Redis (personaplex.conversations): admission in order,
and a conversation's frames both ways over its streams, into a row of the engine's loop and back.

Fed a golden case's input as 16-bit PCM over its input stream (as fast as it is taken, greedy), a
conversation's output stream carries exactly the reference's text pieces and tokens, and PCM within
1e-4 of the reference's audio. Cases whose input is 16-bit PCM at 24 kHz (the protocol's own
format) are run, so nothing is resampled or requantized on the way.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import redis
import soundfile as sf
from test_golden import CASES, GoldenCase

from personaplex import audio as audio_io
from personaplex.conversations import LIVE_TTL_S, Conversations, RedisLink, from_pcm16, to_pcm16
from personaplex.engine.batching import BatchRequest
from personaplex.engine.core import Engine
from personaplex.jobs import Keys
from personaplex.params import SAMPLE_RATE, EngineResult, GenerationParams

PCM_CASES = [
    case
    for case in CASES
    if sf.info(case.input).subtype == "PCM_16" and sf.info(case.input).samplerate == SAMPLE_RATE
]


@pytest.fixture
def conversations(redis_client: redis.Redis) -> Conversations:
    return Conversations(redis_client)


def test_conversations_are_admitted_oldest_first(conversations: Conversations) -> None:
    first, second, third = (conversations.open(GenerationParams(seed=i)) for i in range(3))
    assert [conversations.position(s) for s in (first, second, third)] == [0, 1, 2]
    taken = conversations.take("gpu0@host", 2)
    assert [(a.session_id, a.params.seed) for a in taken] == [(first, 0), (second, 1)]
    assert conversations.position(first) is None and conversations.position(third) == 0
    record = conversations.status(first)
    assert (record["status"], record["worker"]) == ("running", "gpu0@host")
    assert GenerationParams.from_dict(json.loads(record["params"])).seed == 0
    assert conversations.take("gpu0@host", 0) == []


def test_a_conversation_whose_record_expired_is_not_taken(
    conversations: Conversations, redis_client: redis.Redis
) -> None:
    gone, waiting = conversations.open(GenerationParams()), conversations.open(GenerationParams())
    redis_client.delete(Keys.live(gone))
    assert [a.session_id for a in conversations.take("gpu0@host", 5)] == [waiting]


def test_a_conversation_out_of_the_line_already_names_its_worker(
    conversations: Conversations, redis_client: redis.Redis
) -> None:
    """Its caller reads the record as soon as it sees it leave the waiting line (web/api_chat.py)."""
    sessions = [conversations.open(GenerationParams()) for _ in range(100)]
    seen_without_worker: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        watcher = Conversations(redis.Redis(connection_pool=redis_client.connection_pool))
        watching.set()
        for session in sessions:
            while conversations.position(session) is not None:
                pass
            if "worker" not in watcher.status(session):
                seen_without_worker.append(session)

    observer = threading.Thread(target=watch)
    observer.start()
    watching.wait()
    while len(conversations.take("gpu0@host", 1)) == 1:
        pass
    observer.join(30)
    assert not observer.is_alive()
    assert seen_without_worker == []


def test_every_key_expires(conversations: Conversations, redis_client: redis.Redis) -> None:
    session = conversations.open(GenerationParams())
    conversations.send_audio(session, np.zeros(1920, dtype=np.float32))
    conversations.send_ready(session)
    conversations.send_frame(session, "PAD", np.zeros(1920, dtype=np.float32), [3] * 9)
    for key in (Keys.live(session), Keys.live_in(session), Keys.live_out(session)):
        assert 0 < redis_client.ttl(key) <= LIVE_TTL_S


def test_pcm16_round_trips_what_it_can_hold() -> None:
    samples = np.array([0.0, 0.5, -0.5, -1.0, 0.99997, 1.5, -2.0], dtype=np.float32)
    back = from_pcm16(to_pcm16(samples))
    assert np.allclose(back[:5], samples[:5], atol=1 / 32768) and back[5] == 32767 / 32768 and back[6] == -1.0


@pytest.mark.parametrize("case", PCM_CASES, ids=[case.name for case in PCM_CASES])
def test_a_golden_case_over_the_streams_gives_the_reference_output(
    case: GoldenCase, conversations: Conversations, torch_single_thread: None
) -> None:
    engine = Engine(case.checkpoint, device="cpu")
    session_id = conversations.open(case.params)
    samples = audio_io.load(case.input, SAMPLE_RATE)
    for start in range(0, len(samples), 1000):
        conversations.send_audio(session_id, samples[start : start + 1000])
    conversations.end_input(session_id)

    [admitted] = conversations.take("gpu0@host", 1)
    link = RedisLink(conversations, session_id, engine.live_session())
    request = BatchRequest(None, admitted.params, live=link, live_frames=len(samples) // 1920 + 8)
    [outcome] = engine.process_batch([request])
    link.finish()
    assert isinstance(outcome, EngineResult), outcome

    entries = conversations.read(Keys.live_out(session_id), "0", None, count=10_000)
    frames = [fields for _, fields in entries if fields["kind"] == b"frame"]
    assert entries[-1][1]["kind"] == b"end"
    expected_tokens = json.loads((case.folder / "expected_tokens.json").read_text())
    expected_text = json.loads((case.folder / "expected_text.json").read_text())
    expected_audio, _ = sf.read(case.folder / "expected.wav", dtype="float32")
    assert [json.loads(f["tokens"]) for f in frames] == expected_tokens
    assert [f["text"].decode() for f in frames] == expected_text
    audio = np.concatenate([from_pcm16(f["pcm"]) for f in frames])[: len(expected_audio)]
    assert float(np.abs(audio - expected_audio).max()) <= 1e-4


def test_taking_a_conversation_renews_its_record(
    conversations: Conversations, redis_client: redis.Redis
) -> None:
    session = conversations.open(GenerationParams())
    redis_client.expire(Keys.live(session), 5)
    conversations.take("gpu0@host", 1)
    assert redis_client.ttl(Keys.live(session)) > 5


def test_a_conversation_whose_caller_went_silent_ends(
    conversations: Conversations, tiny_engine: Engine
) -> None:
    session_id = conversations.open(GenerationParams())
    conversations.send_audio(session_id, np.zeros(3 * 1920, dtype=np.float32))
    [admitted] = conversations.take("gpu0@host", 1)
    link = RedisLink(conversations, session_id, tiny_engine.live_session(), idle_s=0.5)
    [outcome] = tiny_engine.process_batch([BatchRequest(None, admitted.params, live=link, live_frames=100)])
    assert isinstance(outcome, EngineResult) and len(outcome.tokens) == 3  # no end marker: it timed out
