"""Live conversations in the engine's loop (personaplex.engine.live), on the CPU.

A conversation is a row that steps only when its next 80 ms input frame has arrived, beside the
batch jobs of the same loop. Fed a golden case's input as fast as it is taken, greedy, it gives
exactly the reference's text pieces, and its audio, decoded frame by frame, is the reference's
within 1e-4; a job beside a slow conversation gets what it gets alone.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from test_golden import CASES, GoldenCase

from personaplex import audio as audio_io
from personaplex.engine.batching import BatchRequest
from personaplex.engine.core import Engine
from personaplex.engine.live import LiveFrame, LiveSession
from personaplex.errors import CancelledError, ConversationError
from personaplex.params import FRAME_SIZE, SAMPLE_RATE, EngineResult, GenerationParams

ROOM = 400
"""Frames a test conversation's row has room for."""


@pytest.fixture(scope="module")
def engines(torch_single_thread: None) -> dict:
    return {}


def _engine(engines: dict, case: GoldenCase) -> Engine:
    if case.checkpoint not in engines:
        engines[case.checkpoint] = Engine(case.checkpoint, device="cpu")
    return engines[case.checkpoint]


def _drain(session: LiveSession) -> list[LiveFrame]:
    frames = []
    while not session.frames.empty():
        frames.append(session.frames.get())
    return frames


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_conversation_fed_a_golden_case_gives_the_reference_output(case: GoldenCase, engines: dict) -> None:
    engine = _engine(engines, case)
    session = engine.live_session()
    samples = audio_io.load(case.input, SAMPLE_RATE)
    for start in range(0, len(samples), 1000):  # pieces that are not whole frames
        session.push(samples[start : start + 1000])
    session.close()
    [outcome] = engine.process_batch([BatchRequest(None, case.params, live=session, live_frames=ROOM)])
    assert isinstance(outcome, EngineResult), outcome
    frames = _drain(session)

    expected_tokens = json.loads((case.folder / "expected_tokens.json").read_text())
    expected_text = json.loads((case.folder / "expected_text.json").read_text())
    expected_audio, _ = sf.read(case.folder / "expected.wav", dtype="float32")
    assert [frame.tokens for frame in frames] == expected_tokens == outcome.tokens
    assert [frame.text for frame in frames] == expected_text
    audio = np.concatenate([frame.audio for frame in frames])[: len(expected_audio)]
    assert audio.shape == expected_audio.shape
    assert float(np.abs(audio - expected_audio).max()) <= 1e-4


def test_a_job_beside_a_slow_conversation_gets_what_it_gets_alone(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    """The conversation's input arrives at real time (one frame per 80 ms): its row pauses between
    frames while the job's row runs on; both get what they get alone."""
    job_audio = audio_io.encode_wav(speech[: 3 * SAMPLE_RATE])
    job_params = GenerationParams(seed=21)
    talk = speech[5 * SAMPLE_RATE : 6 * SAMPLE_RATE]
    talk_params = GenerationParams(seed=22, voice_prompt="VARM2.pt")
    session = tiny_engine.live_session()

    def speak() -> None:
        for start in range(0, len(talk), FRAME_SIZE):
            session.push(talk[start : start + FRAME_SIZE])
            time.sleep(FRAME_SIZE / SAMPLE_RATE)
        session.close()

    speaker = threading.Thread(target=speak)
    speaker.start()
    requests = [
        BatchRequest(None, talk_params, live=session, live_frames=ROOM),
        BatchRequest(job_audio, job_params),
    ]
    started = time.perf_counter()
    talked, job = tiny_engine.process_batch(requests)
    elapsed = time.perf_counter() - started
    speaker.join()
    assert isinstance(job, EngineResult) and isinstance(talked, EngineResult), (job, talked)
    assert elapsed >= len(talk) / SAMPLE_RATE * 0.9, "the conversation's row did not wait for its input"

    [alone] = tiny_engine.process_batch([BatchRequest(job_audio, job_params)])
    assert job.tokens == alone.tokens and job.audio.tobytes() == alone.audio.tobytes()
    again = tiny_engine.live_session()
    again.push(talk)
    again.close()
    [fast] = tiny_engine.process_batch([BatchRequest(None, talk_params, live=again, live_frames=ROOM)])
    assert talked.tokens == fast.tokens and len(talked.tokens) == len(talk) // FRAME_SIZE + 1
    assert [f.tokens for f in _drain(session)] == [f.tokens for f in _drain(again)]


def test_a_conversation_leaves_when_its_row_is_full(tiny_engine: Engine, speech: np.ndarray) -> None:
    session = tiny_engine.live_session()
    session.push(speech[: 2 * SAMPLE_RATE])  # 25 frames, never closed
    [outcome] = tiny_engine.process_batch(
        [BatchRequest(None, GenerationParams(seed=3), live=session, live_frames=10)]
    )
    assert isinstance(outcome, EngineResult) and len(outcome.tokens) == 10
    assert len(_drain(session)) == 10


def test_a_conversation_needs_the_batched_loop(tiny_checkpoint) -> None:
    engine = Engine(tiny_checkpoint, device="cpu", captured=False)
    session = engine.live_session()
    session.close()
    [outcome] = engine.process_batch([BatchRequest(None, GenerationParams(), live=session, live_frames=10)])
    assert isinstance(outcome, ConversationError)


class BreakingSession(LiveSession):
    """A conversation whose link fails at its sixth input frame (a codec or Redis error)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0

    def next_input(self):
        self.taken += 1
        if self.taken == 6:
            raise RuntimeError("the link broke")
        return super().next_input()


def test_a_conversation_whose_link_fails_ends_alone(tiny_engine: Engine, speech: np.ndarray) -> None:
    models = tiny_engine._models
    session = BreakingSession(models.mimi, lambda token: tiny_engine._frame_text(models, token))
    session.push(speech[: 2 * SAMPLE_RATE])
    session.close()
    job_audio, job_params = (
        audio_io.encode_wav(speech[SAMPLE_RATE : 3 * SAMPLE_RATE]),
        GenerationParams(seed=5),
    )
    requests = [
        BatchRequest(None, GenerationParams(), live=session, live_frames=ROOM),
        BatchRequest(job_audio, job_params),
    ]
    talked, job = tiny_engine.process_batch(requests)
    assert isinstance(talked, ConversationError) and "the link broke" in str(talked)
    [alone] = tiny_engine.process_batch([BatchRequest(job_audio, job_params)])
    assert isinstance(job, EngineResult) and job.tokens == alone.tokens


def test_a_frame_that_does_not_run_keeps_the_conversations_input(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    """A job cancelled right before a frame ends that frame's run before it steps: the conversation's
    input taken for it is fed again, not lost (no 80 ms skipped)."""
    talk = speech[5 * SAMPLE_RATE : 6 * SAMPLE_RATE]
    params = GenerationParams(seed=8)
    sessions = [tiny_engine.live_session() for _ in range(2)]
    for session in sessions:
        session.push(talk)
        session.close()
    checks = {"n": 0}

    def cancel_soon() -> bool:
        checks["n"] += 1
        return checks["n"] > 4

    job = BatchRequest(
        audio_io.encode_wav(speech[: 2 * SAMPLE_RATE]), GenerationParams(seed=9), should_cancel=cancel_soon
    )
    beside, cancelled = tiny_engine.process_batch(
        [BatchRequest(None, params, live=sessions[0], live_frames=ROOM), job]
    )
    [alone] = tiny_engine.process_batch([BatchRequest(None, params, live=sessions[1], live_frames=ROOM)])
    assert isinstance(cancelled, CancelledError)
    assert isinstance(beside, EngineResult) and beside.tokens == alone.tokens
    assert len(beside.tokens) == len(talk) // FRAME_SIZE + 1
