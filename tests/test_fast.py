"""The fast loop (personaplex.engine.fast) against the reference loop (FrameLoop), on the CPU in fp32.

The fast loop runs eagerly here (CUDA graph capture needs a GPU; bench/gpu_fast.sh checks it there).
What it must keep (test_golden.py runs the golden vectors through it): the sliding window once it
wraps; each batched row exactly what its job gets alone (different lengths, prompts, voices,
sampling settings); a seed's tokens, identical between the eager FrameLoop and the fast loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import SPEECH_40S

from personaplex import audio as audio_io
from personaplex.engine import codec
from personaplex.engine.batching import reuses_rows
from personaplex.engine.core import Engine
from personaplex.engine.fast import SLOT_ALIGN, FastLoop, JobPlan
from personaplex.params import SAMPLE_RATE, GenerationParams

CONTEXT = 16
PROMPT = "You enjoy having a good conversation."


# ---- a 16-frame context: the sliding window wraps -------------------------------------------------
@pytest.fixture(scope="module")
def short_context(tmp_path_factory: pytest.TempPathFactory, torch_single_thread: None) -> Path:
    from personaplex.engine.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ctx16") / "ckpt", context=CONTEXT)


@pytest.fixture(scope="module")
def engines(short_context: Path) -> tuple[Engine, Engine]:
    eager = Engine(short_context, device="cpu", captured=False)
    eager.load()
    fast = Engine(short_context, device="cpu", captured=True)
    fast.load()
    return eager, fast


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return audio_io.load(SPEECH_40S, SAMPLE_RATE)[3 * SAMPLE_RATE : 7 * SAMPLE_RATE]


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(voice_prompt="NATF2.pt", text_prompt="", greedy=True),
        GenerationParams(voice_prompt="NATM1.pt", text_prompt=PROMPT, seed=7),
        GenerationParams(voice_prompt="VARF1.pt", text_prompt=PROMPT, seed=3, topk_text=5, temp_audio=1.1),
    ],
    ids=["greedy", "seed7", "seed3-topk5"],
)
def test_fast_equals_frame_loop_past_the_window(
    engines: tuple[Engine, Engine], samples: np.ndarray, params: GenerationParams
) -> None:
    eager, fast = engines
    clip = audio_io.encode_wav(samples[: int(2.5 * SAMPLE_RATE)])
    want = eager.process(clip, params)
    got = fast.process(clip, params)
    assert len(got.tokens) == len(want.tokens) == 32
    assert fast._fast is not None and fast._fast.window == CONTEXT - 1  # positions wrapped the ring
    assert got.tokens == want.tokens
    assert np.abs(got.audio - want.audio).max() <= 1e-5


@pytest.mark.parametrize("prefill", [False, True], ids=["stepped", "prefilled"])
def test_text_logits_match_frame_loop_as_the_window_slides(
    engines: tuple[Engine, Engine], samples: np.ndarray, monkeypatch: pytest.MonkeyPatch, prefill: bool
) -> None:
    """Tokens can hide a wrong window on a tiny model; the logits cannot (an off-by-one moves them ~1e-2).

    Stepped, every prompt frame is compared too; prefilled, the generate frames start past the
    window from the state the one-pass prompt left in each loop's own cache layout."""
    from personaplex.engine.frames import FrameLoop

    logits: dict[str, list[torch.Tensor]] = {"eager": [], "fast": []}
    eager_temporal, fast_temporal = FrameLoop.temporal, FastLoop._temporal

    def record_eager(self, embeddings):
        hidden, text_logits = eager_temporal(self, embeddings)
        logits["eager"].append(text_logits.clone())
        return hidden, text_logits

    def record_fast(self, x, run, slots):
        hidden, text_logits = fast_temporal(self, x, run, slots)
        if bool(run[0]):
            logits["fast"].append(text_logits.clone())
        return hidden, text_logits

    monkeypatch.setattr(FrameLoop, "temporal", record_eager)
    monkeypatch.setattr(FastLoop, "_temporal", record_fast)
    eager, fast = engines
    for engine in engines:
        monkeypatch.setattr(engine, "prefill", prefill)
    clip = audio_io.encode_wav(samples[: int(2.5 * SAMPLE_RATE)])
    params = GenerationParams(voice_prompt="NATF2.pt", text_prompt="", greedy=True)
    eager.process(clip, params)
    fast.process(clip, params)
    assert len(logits["fast"]) == len(logits["eager"]) >= (32 if prefill else 2 * CONTEXT)
    for want, got in zip(logits["eager"], logits["fast"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fast_seed_is_reproducible(engines: tuple[Engine, Engine], samples: np.ndarray) -> None:
    _, fast = engines
    clip = audio_io.encode_wav(samples[:SAMPLE_RATE])
    first = fast.process(clip, GenerationParams(seed=5))
    again = fast.process(clip, GenerationParams(seed=5))
    other = fast.process(clip, GenerationParams(seed=6))
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


# ---- batched rows ---------------------------------------------------------------------------------
def _plan(engine: Engine, samples: np.ndarray, params: GenerationParams) -> JobPlan:
    models = engine._models
    assert models is not None
    user_codes = codec.encode(models.mimi, samples)
    return engine._plan(models, user_codes, engine._voice_prompt(models, params.voice_prompt), params)


def _run(engine: Engine, plans: list[JobPlan]) -> list[list[list[int]]]:
    models = engine._models
    assert models is not None and engine._info is not None
    loop = FastLoop(models, plans, engine._info.lm.delays)
    loop.run(loop.frames)
    return [frames.tolist() for frames in loop.results()]


def _jobs(samples: np.ndarray, voice_wav: str, greedy: bool) -> list[tuple[np.ndarray, GenerationParams]]:
    second = SAMPLE_RATE
    return (
        [
            (
                samples[: int(2.5 * second)],
                GenerationParams(voice_prompt="NATF2.pt", text_prompt=PROMPT, seed=1),
            ),
            (
                samples[second : int(2.2 * second)],
                GenerationParams(voice_prompt="NATM1.pt", text_prompt="", seed=2),
            ),
            (
                samples[: int(0.7 * second)],
                GenerationParams(voice_prompt=voice_wav, text_prompt="Hi.", seed=3),
            ),
            (
                samples[2 * second :],
                GenerationParams(
                    voice_prompt="VARM4.pt", text_prompt=PROMPT, seed=4, topk_text=3, topk_audio=9
                ),
            ),
        ]
        if not greedy
        else [
            (s, GenerationParams(**{**p.to_dict(), "greedy": True}))
            for s, p in _jobs(samples, voice_wav, greedy=False)
        ]
    )


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("voice") / "speaker.wav"
    speech = audio_io.load(SPEECH_40S, SAMPLE_RATE)
    path.write_bytes(audio_io.encode_wav(speech[5 * SAMPLE_RATE : int(6.5 * SAMPLE_RATE)]))
    return str(path)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_batched_rows_equal_each_job_alone(
    engines: tuple[Engine, Engine], samples: np.ndarray, voice_wav: str, greedy: bool
) -> None:
    eager, fast = engines
    jobs = _jobs(samples, voice_wav, greedy)
    batched = _run(fast, [_plan(fast, s, p) for s, p in jobs])
    lengths = {len(plan) for plan in [_plan(fast, s, p) for s, p in jobs]}
    assert len(lengths) == len(jobs)  # every row has its own length
    for (job_samples, params), row in zip(jobs, batched, strict=True):
        alone = _run(fast, [_plan(fast, job_samples, params)])[0]
        assert row == alone
    # ... and alone equals the reference loop
    first_samples, first_params = jobs[0]
    assert batched[0] == eager.process(audio_io.encode_wav(first_samples), first_params).tokens
    # Each row's seed decides its tokens whatever it is batched with: the same job in another
    # batch position, beside other jobs, gives the same tokens.
    swapped = _run(fast, [_plan(fast, s, p) for s, p in reversed(jobs[1:])])
    assert swapped[::-1] == batched[1:]


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_a_loop_with_more_rows_than_jobs_leaves_the_rest_idle(
    engines: tuple[Engine, Engine], samples: np.ndarray, voice_wav: str, greedy: bool
) -> None:
    """What lets one captured loop serve every batch size up to its own: rows without a job idle."""
    _, fast = engines
    models = fast._models
    assert models is not None and fast._info is not None
    jobs = _jobs(samples, voice_wav, greedy)
    alone = [_run(fast, [_plan(fast, s, p)])[0] for s, p in jobs]
    plans = [_plan(fast, s, p) for s, p in jobs]
    capacity = {"frames": max(len(p) for p in plans), "replay_frames": max(p.replay_frames for p in plans)}
    loop = FastLoop(models, plans[:1], fast._info.lm.delays, batch=4, **capacity)
    assert loop.batch == 4 and loop.fits(plans) and loop.fits(plans[1:3])
    loop.run(loop.frames)
    assert [r.tolist() for r in loop.results()] == alone[:1]
    for chosen in ([0, 1, 2, 3], [3, 1]):  # a full batch, then fewer jobs than rows again
        loop.load([_plan(fast, *jobs[i]) for i in chosen])
        loop.run(loop.frames)
        assert [r.tolist() for r in loop.results()] == [alone[i] for i in chosen]
    assert not loop.fits(plans + plans[:1])  # more jobs than rows


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_a_job_that_joins_a_running_loop_equals_the_job_alone(
    engines: tuple[Engine, Engine], samples: np.ndarray, voice_wav: str, greedy: bool
) -> None:
    """Continuous batching's guarantee: a row loaded while others run (at another frame of theirs,
    into a row a finished job left, its window wrapped) gets exactly the tokens it gets alone."""
    _, fast = engines
    models = fast._models
    assert models is not None and fast._info is not None
    jobs = _jobs(samples, voice_wav, greedy)
    alone = [_run(fast, [_plan(fast, s, p)])[0] for s, p in jobs]
    plans = [_plan(fast, s, p) for s, p in jobs]
    capacity = {"frames": max(len(p) for p in plans), "replay_frames": max(p.replay_frames for p in plans)}
    loop = FastLoop(models, plans[:1], fast._info.lm.delays, batch=2, sampling=True, **capacity)
    assert loop.free_rows() == [1]
    loop.run(7)
    loop.load_row(1, plans[1])  # joins at frame 7 of row 0
    loop.run(len(plans[1]))
    left = loop.row_result(1)
    assert left.tolist() == alone[1]
    loop.free_row(1)
    loop.load_row(1, plans[2])  # into the row job 1 left, its ring and window used
    assert left.tolist() == alone[1], "a row's result is a copy: the next job in the row leaves it alone"
    loop.run(len(plans[0]) - 7 - len(plans[1]))
    assert loop.row_result(0).tolist() == alone[0]
    loop.free_row(0)
    assert loop.free_rows() == [0]
    loop.run(len(plans[2]))
    assert loop.row_result(1).tolist() == alone[2]
    with pytest.raises(AssertionError):
        loop.load_row(1, plans[0])  # a busy row


def test_a_rows_products_do_not_depend_on_the_batch_size() -> None:
    """Why the CPU fast loop multiplies row by row: F.linear's GEMM blocks rows together, so a row's
    sums change with the batch size (1, 2-3, 4+ rows differ here), and near-ties flip tokens."""
    from personaplex.engine.fast import _row_linear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(192, 64, generator=generator)
    x = torch.randn(8, 1, 64, generator=generator)
    alone = torch.nn.functional.linear(x[:1], weight)  # what the reference's one-row loop computes
    assert all(torch.equal(_row_linear(x[:rows], weight)[:1], alone) for rows in range(1, 9))


@pytest.mark.parametrize(("heads", "head_dim"), [(4, 16), (2, 32), (32, 128)], ids=["tiny", "depth", "real"])
def test_masked_slots_past_an_aligned_boundary_do_not_change_attention(heads: int, head_dim: int) -> None:
    """Why an eager CPU step attends over the KV slots rows have written, not the loop's whole window
    (`FastLoop._written_slots`): attention over any multiple of SLOT_ALIGN slots that holds a query's
    keys, the rest masked, gives the same bits, so a row's sums do not depend on the window."""
    generator = torch.Generator().manual_seed(0)
    rows, slots = 3, 3008
    q = torch.randn(rows, heads, 1, head_dim, generator=generator)
    k = torch.randn(rows, heads, slots, head_dim, generator=generator)
    v = torch.randn(rows, heads, slots, head_dim, generator=generator)
    for written in (1, 5, 16, 17, 100, 192, 511, 513, 1500, 2999):
        spans = range(-(-written // SLOT_ALIGN) * SLOT_ALIGN, slots + 1, 5 * SLOT_ALIGN)
        outputs = []
        for span in [*spans, slots]:
            mask = torch.zeros(rows, 1, 1, span).masked_fill(torch.arange(span) >= written, float("-inf"))
            outputs.append(F.scaled_dot_product_attention(q, k[:, :, :span], v[:, :, :span], attn_mask=mask))
        assert all(torch.equal(outputs[0], other) for other in outputs[1:]), written


def test_rows_attend_over_the_slots_they_wrote(
    tiny_engine: Engine, samples: np.ndarray, voice_wav: str
) -> None:
    """A continuous loop's window is thousands of slots; rows a few seconds in attend over their own
    few, and get exactly what attending over the whole window gives."""
    models = tiny_engine._models
    assert models is not None and tiny_engine._info is not None
    jobs = _jobs(samples, voice_wav, greedy=False)[:3]

    def run(whole_window: bool) -> tuple[list[list[list[int]]], list[int]]:
        plans = [_plan(tiny_engine, s, p) for s, p in jobs]  # each with a fresh generator
        loop = FastLoop(models, plans[:2], tiny_engine._info.lm.delays, frames=3584, batch=4, sampling=True)
        assert loop.slots > 3000
        spans: list[int] = []
        written = loop._written_slots

        def span() -> int:
            spans.append(loop.slots if whole_window else written())
            return spans[-1]

        loop._written_slots = span  # type: ignore[method-assign]
        loop.run(9)
        loop.load_row(2, plans[2])
        loop.run(loop.horizon())
        return [frames.tolist() for frames in loop.results()], spans

    sliced, spans = run(whole_window=False)
    whole, _ = run(whole_window=True)
    assert sliced == whole
    assert max(spans) < 300


@pytest.mark.parametrize(
    ("loop_rows", "jobs", "graphs", "reused"),
    [(8, 8, False, True), (8, 5, True, True), (8, 4, True, False), (8, 5, False, False), (4, 8, True, False)],
)
def test_a_captured_loop_is_reused_for_smaller_batches_down_to_half(
    loop_rows: int, jobs: int, graphs: bool, reused: bool
) -> None:
    assert reuses_rows(loop_rows, jobs, graphs) is reused


def test_plans_start_with_prompt_frames(engines: tuple[Engine, Engine], samples: np.ndarray) -> None:
    _, fast = engines
    plan = _plan(fast, samples[:SAMPLE_RATE], GenerationParams(text_prompt=PROMPT))
    assert plan.generate_frames == 13  # 1 s of audio at 12.5 frames/s
    assert plan.replay_frames > 0 and plan.voice_cache is not None
    assert plan.samples_at(plan.prompt_frames) and not plan.samples_at(plan.prompt_frames - 1)
    with pytest.raises(AssertionError):
        JobPlan(text=plan.text.flip(0), agent=plan.agent, user=plan.user)


def test_frame_loop_after_the_fast_loop_fused_its_weights(short_context: Path, samples: np.ndarray) -> None:
    """The fast loop rebinds each temporal layer's q, k, v to rows of one fused tensor (no copy);
    transformers' modules, which FrameLoop drives on the same engine, give what they gave before."""
    engine = Engine(short_context, device="cpu", captured=False)
    clip = audio_io.encode_wav(samples[:SAMPLE_RATE])
    params = GenerationParams(voice_prompt="NATF2.pt", text_prompt=PROMPT, seed=11)
    before = engine.process(clip, params)
    engine.captured = True
    fast = engine.process(clip, params)
    attn = engine._models.moshi.decoder.model.layers[0].self_attn
    fused = attn._personaplex_qkv
    assert attn.k_proj.linear.weight.data_ptr() == fused[attn.q_proj.linear.weight.shape[0]].data_ptr()
    engine.captured = False
    after = engine.process(clip, params)
    assert before.tokens == fast.tokens == after.tokens
    engine.captured = True
    assert engine.process(clip, params).tokens == fast.tokens  # a second loop reuses the fused weights
    assert attn._personaplex_qkv is fused
