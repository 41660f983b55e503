"""Mimi frame by frame (personaplex.engine.streaming) against one-shot encode and decode, on the CPU.

Live conversations encode each 80 ms input frame and decode each output frame as they come. The
encoder must give exactly the one-shot codes; the decoder keeps the convolution state
transformers' does not, so its samples agree with one shot to float rounding, past the decoder
transformer's window too, and a golden case's tokens decode to its expected audio.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import GOLDEN_DIR, SPEECH_40S

from personaplex import audio as audio_io
from personaplex.engine import codec
from personaplex.engine.core import Engine
from personaplex.engine.streaming import StreamingDecoder, StreamingEncoder
from personaplex.params import FRAME_SIZE, SAMPLE_RATE

ROUNDING = 1e-6
"""Streaming sums each transposed convolution's overlap in two parts: samples differ by ~1e-7."""


@pytest.fixture(scope="module")
def mimi(tiny_engine: Engine):
    return tiny_engine._models.mimi


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return audio_io.load(SPEECH_40S, SAMPLE_RATE)[: 30 * SAMPLE_RATE]


def _frames(samples: np.ndarray) -> torch.Tensor:
    """Whole frames [F, 1920], the last zero-padded as one-shot encode pads it."""
    return torch.from_numpy(codec.pad_to_frames(samples)).view(-1, FRAME_SIZE)


@pytest.mark.parametrize("per_call", [1, 3])
def test_streaming_encode_gives_the_one_shot_codes(mimi, speech: np.ndarray, per_call: int) -> None:
    clip = speech[3 * SAMPLE_RATE : 7 * SAMPLE_RATE + 700]  # not a whole number of frames
    frames = _frames(clip)
    encoder = StreamingEncoder(mimi)
    codes = [encoder.encode(frames[i : i + per_call].reshape(1, -1)) for i in range(0, len(frames), per_call)]
    assert torch.equal(torch.cat(codes, dim=-1), codec.encode(mimi, clip))


@pytest.mark.parametrize("per_call", [1, 4])
def test_streaming_decode_gives_the_one_shot_samples_past_the_window(
    mimi, speech: np.ndarray, per_call: int
) -> None:
    codes = codec.encode(mimi, speech)  # 375 frames: 750 decoder steps, past its 250-step window
    assert 2 * codes.shape[-1] > mimi.config.sliding_window
    decoder = StreamingDecoder(mimi)
    pieces = [decoder.decode(codes[..., i : i + per_call]) for i in range(0, codes.shape[-1], per_call)]
    for piece, i in zip(pieces, range(0, codes.shape[-1], per_call), strict=True):
        assert piece.shape == (1, min(per_call, codes.shape[-1] - i) * FRAME_SIZE)
    streamed = torch.cat(pieces, dim=-1)[0].numpy()
    one_shot = codec.decode(mimi, codes)
    assert streamed.shape == one_shot.shape
    assert float(np.abs(streamed - one_shot).max()) <= ROUNDING


def test_rows_of_a_batch_stream_independently(mimi, speech: np.ndarray) -> None:
    first = codec.encode(mimi, speech[3 * SAMPLE_RATE : 6 * SAMPLE_RATE])
    second = codec.encode(mimi, speech[21 * SAMPLE_RATE : 24 * SAMPLE_RATE])
    both = StreamingDecoder(mimi, batch=2)
    streamed = torch.cat(
        [both.decode(torch.cat([first, second])[..., i : i + 1]) for i in range(first.shape[-1])], -1
    )
    for row, codes in enumerate((first, second)):
        assert float(np.abs(streamed[row].numpy() - codec.decode(mimi, codes)).max()) <= ROUNDING


def test_a_golden_case_decodes_frame_by_frame_to_its_expected_audio() -> None:
    """The reference's tokens, decoded as a live session decodes them, give the reference's audio."""
    case = GOLDEN_DIR / "cases" / "service"
    engine = Engine(GOLDEN_DIR / "checkpoint", device="cpu")
    engine.load()
    tokens = torch.tensor(json.loads((case / "expected_tokens.json").read_text()))  # [F, 9]
    expected, rate = sf.read(case / "expected.wav", dtype="float32")
    decoder = StreamingDecoder(engine._models.mimi)
    codes = tokens[:, 1:].T[None]
    streamed = torch.cat([decoder.decode(codes[..., i : i + 1]) for i in range(codes.shape[-1])], -1)[0]
    assert rate == SAMPLE_RATE
    assert float(np.abs(streamed.numpy()[: len(expected)] - expected).max()) <= 1e-4
