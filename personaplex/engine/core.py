"""The inference engine the worker keeps resident: load once, process many jobs, offload.

    engine = Engine("nvidia/personaplex-7b-v1")
    result = engine.process("question.wav", GenerationParams(voice_prompt="NATM1.pt"))
    results = engine.process_batch([BatchRequest(a, p) for a, p in jobs])  # one batched loop

One call at a time per engine (a lock), which is also what a GPU worker runs. `process_batch` steps
several jobs together in the fast loop (personaplex.engine.fast); each job gets exactly what it gets alone.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex.catalog import DEFAULT_REPO
from personaplex.custom_voices import VoiceStore, is_custom_voice
from personaplex.engine import codec
from personaplex.engine.batching import (
    PROGRESS_EVERY,
    BatchRequest,
    BatchRow,
    FeedJoiner,
    JobFeed,
    Outcome,
    Progress,
    ShouldCancel,
    never_cancelled,
    no_progress,
    plan_groups,
    reuses_rows,
    step_rows,
)
from personaplex.engine.checkpoint import CheckpointInfo, extract_voices, resolve_model
from personaplex.engine.fast import FastLoop, JobPlan, plan_job
from personaplex.engine.frames import AUDIO_STREAMS, TEXT_PAD, FrameLoop, Sampling
from personaplex.engine.live import LiveSession
from personaplex.engine.loaders import LoadedModels, load_models
from personaplex.engine.prompt import PromptCache, PromptState, prefill
from personaplex.engine.sampling import make_generator
from personaplex.engine.voices import (
    VoicePrompt,
    VoiceSource,
    codes_key,
    custom_voice_source,
    file_voice_source,
    resolve_voice,
)
from personaplex.errors import CancelledError, ConversationError, UnknownVoiceError
from personaplex.params import FRAME_RATE, SAMPLE_RATE, EngineResult, GenerationParams, Timings
from personaplex.settings import Settings

log = logging.getLogger(__name__)

SILENCE_FRAMES = int(0.5 * FRAME_RATE)
"""Frames of silence after the voice prompt and after the text prompt (the reference's 0.5 s)."""
MARKER_TOKENS = {0: "EPAD", TEXT_PAD: "PAD"}
FAST_FRAMES_BUCKET = 256
"""The fast loop's frame capacity is rounded up to this, so jobs of similar lengths reuse its graphs."""
FAST_REPLAY_BUCKET = 64
DEFAULT_MAX_BATCH = Settings.max_batch
"""Jobs stepped together by `process_batch` (its home: Settings.max_batch, PERSONAPLEX_MAX_BATCH)."""
DEFAULT_MAX_BATCH_FRAMES = Settings.max_batch_frames
"""Rows x the longest row's frames per batch: what the fast loop allocates per row scales with its
frame capacity (Settings.max_batch_frames, PERSONAPLEX_MAX_BATCH_FRAMES). A longer job runs alone."""


def wrap_with_system_tags(text: str) -> str:
    cleaned = text.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine:
    """PersonaPlex on torch + transformers; thread-safe, one job at a time."""

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_REPO,
        device: str | torch.device | None = None,
        cpu_offload: bool = False,
        max_audio_seconds: float | None = audio_io.DEFAULT_MAX_SECONDS,
        voice_prompt_dir: str | os.PathLike | None = None,
        hf_token: str | None = None,
        captured: bool | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_frames: int = DEFAULT_MAX_BATCH_FRAMES,
        prefill: bool = True,
        prompt_cache_mb: float = Settings.prompt_cache_mb,
        live_frames: int = 0,
        custom_voices: VoiceStore | None = None,
    ) -> None:
        self.model_name = str(model)
        self.device = torch.device(device) if device else default_device()
        self.cpu_offload = cpu_offload
        self.max_audio_seconds = max_audio_seconds
        self.voice_prompt_dir = Path(voice_prompt_dir) if voice_prompt_dir else None
        self.hf_token = hf_token
        self.captured = captured
        """The fast loop (personaplex.engine.fast, CUDA graphs on a GPU); None: on CUDA without cpu offload."""
        self.max_batch = max_batch
        self.max_batch_frames = max_batch_frames
        self.prefill = prefill
        """Run each job's prompt phase in one pass (personaplex.engine.prompt); False: step it."""
        self.prompt_cache = PromptCache(int(prompt_cache_mb * 2**20))
        self.live_frames = live_frames
        """Frames a conversation's row takes: every continuous loop keeps room for one, so a
        conversation joins a running loop instead of waiting for it to drain (0: no conversations)."""
        self.custom_voices = custom_voices
        """Where `custom-<slug>` voices are read and their codes kept (None: only catalog and files)."""
        self._codes_key: str | None = None
        self._fast: FastLoop | None = None  # the last one, reused while jobs fit it
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personaplex-finish")
        """Decodes and settles the rows that end while the loop runs on (`_run_batch`)."""
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personaplex-prepare")
        """Prepares the jobs that join a running loop, while it runs on (`FeedJoiner`)."""
        self._lock = threading.RLock()
        self._models: LoadedModels | None = None
        self._info: CheckpointInfo | None = None
        self._voices_dir: Path | None = None
        self.last_used: float | None = None

    @classmethod
    def from_loaded(
        cls, models: LoadedModels, info: CheckpointInfo, voices_dir: Path, captured: bool | None = None
    ) -> Engine:
        """An engine around modules built elsewhere (benchmarks with random weights at real size)."""
        engine = cls(info.root, device=models.device, captured=captured)
        engine._models, engine._info, engine._voices_dir = models, info, voices_dir
        return engine

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        return self._models is not None

    def load(self) -> float:
        """Load the model if needed; returns the seconds spent (0 when already resident)."""
        with self._lock:
            if self._models is not None:
                return 0.0
            started = time.perf_counter()
            self._info = resolve_model(self.model_name, self.hf_token)
            self._models = load_models(self._info, self.device, self.cpu_offload)
            self._voices_dir = self.voice_prompt_dir or extract_voices(self._info.voices_archive)
            elapsed = time.perf_counter() - started
            log.info("loaded %s on %s in %.1f s", self.model_name, self.device, elapsed)
            return elapsed

    def offload(self) -> dict[str, Any]:
        """Drop every reference to the model and return the memory it held to the device."""
        with self._lock:
            before = self._allocated_mb()
            was_loaded = self._models is not None
            self._models = None
            self._codes_key = None
            self._fast = None
            self.prompt_cache.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.ipc_collect()
            after = self._allocated_mb()
            log.info("offloaded: %.0f MB → %.0f MB allocated", before, after)
            return {"offloaded": was_loaded, "memory_before_mb": before, "memory_after_mb": after}

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "loaded": self.is_loaded,
            "model": self.model_name,
            "device": str(self.device),
            "gpu_name": None,
            "memory_total_mb": 0.0,
            "memory_allocated_mb": self._allocated_mb(),
            "memory_reserved_mb": 0.0,
            "last_used": self.last_used,
        }
        if self.device.type == "cuda" and torch.cuda.is_available():
            index = self.device.index or 0
            status["gpu_name"] = torch.cuda.get_device_name(index)
            status["memory_total_mb"] = torch.cuda.get_device_properties(index).total_memory / 2**20
            status["memory_reserved_mb"] = torch.cuda.memory_reserved(index) / 2**20
        return status

    def _allocated_mb(self) -> float:
        if self.device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.memory_allocated(self.device) / 2**20
        return 0.0

    def live_session(self) -> LiveSession:
        """A new conversation's link: pass it as `BatchRequest(None, params, live=..., live_frames=N)`
        to `process_batch`, push its audio, read its frames (personaplex.engine.live)."""
        self.load()
        models = self._models
        assert models is not None
        return LiveSession(models.mimi, lambda token: self._frame_text(models, token))

    # ---- one job -----------------------------------------------------------------------------
    def process(
        self,
        audio: audio_io.AudioSource,
        params: GenerationParams | None = None,
        progress: Progress | None = None,
        should_cancel: ShouldCancel | None = None,
    ) -> EngineResult:
        """Run one recording through PersonaPlex; raises AudioError, UnknownVoiceError, CancelledError."""
        params = params or GenerationParams()
        report = progress or no_progress
        cancelled = should_cancel or never_cancelled
        samples = audio_io.load(audio, SAMPLE_RATE, self.max_audio_seconds)
        with self._lock, torch.inference_mode():
            timings = Timings()
            report("load", 0, 1)
            timings.load_s = self.load()
            report("load", 1, 1)
            models = self._models
            assert models is not None
            result = self._run(models, samples, params, timings, report, cancelled)
            self.last_used = time.time()
            return result

    # ---- several jobs in one batch -----------------------------------------------------------
    def process_batch(self, requests: list[BatchRequest], feed: JobFeed | None = None) -> list[Outcome]:
        """Run several recordings together; each entry is that job's EngineResult or its exception.

        Each job keeps its own voice, prompt, seed, sampling and length, and gets exactly the tokens
        it gets from `process` (on the CPU in fp32; the same up to numerics in bf16). A job that
        cannot start (bad audio, unknown voice) fails alone, before the batch starts; a cancelled
        job's row drops out at its next frame and the others go on. Jobs are split into batches of
        at most `max_batch` rows and `max_batch_frames` (see `plan_groups`), run one after another;
        a row that ends drops out (it is masked: the loop's shapes are static), its job is decoded
        and handed to its `on_done` at once, and the loop stops when its last live row ends.

        With a `feed`, the batch is continuous (`_run_continuous`): rows freed by jobs that ended take
        the feed's jobs at frame boundaries, and the call returns once no row is busy and the feed has
        nothing more. Those jobs' outcomes reach their `on_done` only.
        """
        count = len(requests)
        results: list[Outcome | None] = [None] * count
        joined: dict[int, BatchRequest] = {}
        """The feed's requests by index (from `count` on), each dropped once settled: a loop that
        runs for hours keeps none of its finished jobs."""

        def settle(index: int, outcome: Outcome) -> None:
            if index < count:
                results[index] = outcome
            callback = (requests[index] if index < count else joined.pop(index)).on_done
            if callback is not None:
                try:
                    callback(outcome)
                except Exception:
                    log.exception("on_done of batch job %d failed", index)

        with self._lock, torch.inference_mode():
            if not self._batches():
                for index, request in enumerate(requests):
                    settle(index, self._process_safely(request))
                return results  # type: ignore[return-value]
            for request in requests:
                (request.progress or no_progress)("load", 0, 1)
            load_s = self.load()
            models = self._models
            assert models is not None
            jobs: list[BatchRow] = []
            for index, request in enumerate(requests):
                try:
                    jobs.append(self._prepare(index, request, models, load_s))
                except Exception as exc:
                    settle(index, exc)
            if feed is not None:
                self._run_continuous(models, jobs, count, joined, settle, feed)
                self.last_used = time.time()
                return results  # type: ignore[return-value]
            for group in plan_groups([len(j.plan) for j in jobs], self.max_batch, self.max_batch_frames):
                rows = [jobs[i] for i in group]
                try:
                    self._run_batch(models, self._fast_loop(models, [row.plan for row in rows]), rows, settle)
                except Exception as exc:  # the whole batch failed (out of memory, ...): every live row
                    log.exception("a batch of %d jobs failed", len(rows))
                    for job in rows:
                        if results[job.index] is None:
                            settle(job.index, exc)
            self.last_used = time.time()
        return results  # type: ignore[return-value]

    def _run_continuous(
        self,
        models: LoadedModels,
        jobs: list[BatchRow],
        count: int,
        joined: dict[int, BatchRequest],
        settle: Callable[[int, Outcome], None],
        feed: JobFeed,
    ) -> None:
        """Run `jobs`, then the feed's, in loops whose free rows are refilled as they run.

        A loop is sized for the jobs waiting when it starts (`_continuous_loop`); a later job longer
        than its frame capacity waits until the loop drains, and the next loop is sized for it.
        """
        pending = {row.index: row for row in jobs}
        """The rows not settled yet (a settled one is dropped, with its samples and plan)."""
        indices = itertools.count(count)

        def settle_once(index: int, outcome: Outcome) -> None:
            pending.pop(index, None)
            settle(index, outcome)

        def prepare(request: BatchRequest) -> BatchRow | None:  # on the preparer's thread
            index = next(indices)
            joined[index] = request
            try:
                with torch.inference_mode():
                    row = self._prepare(index, request, models, 0.0)
            except Exception as exc:
                settle(index, exc)
                return None
            pending[index] = row
            return row

        joiner = FeedJoiner(list(jobs), feed, prepare, self._preparer)
        while True:
            joiner.drain()
            if not joiner.queue:
                return
            joiner.held = False
            loop = self._continuous_loop(models, [row.plan for row in joiner.queue])
            first, joiner.queue = joiner.queue[: loop.batch], joiner.queue[loop.batch :]
            loop.load([row.plan for row in first])
            try:
                self._run_batch(models, loop, first, settle_once, joiner)
            except Exception as exc:  # the loop broke (out of memory, ...): every job not settled
                log.exception("a continuous batch failed")
                self._fast = None
                joiner.drain()
                for index in list(pending):
                    settle_once(index, exc)
                return

    def _continuous_loop(self, models: LoadedModels, plans: list[JobPlan]) -> FastLoop:
        """A loop for a continuous batch: frames for the longest of `plans`, a conversation
        (`live_frames`) or `row_room` (the most every row can hold), rounded up, as many rows as
        `max_batch` and `max_batch_frames` allow at that length (one row at least), top-k room for
        the default sampling, so a later job of up to that length can join.

        The last loop is reused when it has those rows and at least those frames (no new capture).
        """
        needed = max(self.live_frames, self.row_room, *(len(p) for p in plans))
        frames = _round_up(needed, FAST_FRAMES_BUCKET)
        rows = max(1, min(self.max_batch, self.max_batch_frames // frames))
        loop = self._fast
        if loop is not None and loop.batch == rows and loop.fits(plans[:rows]):
            return loop
        defaults = GenerationParams()
        return self._new_fast_loop(
            models, plans[:rows], frames, batch=rows, topk=(defaults.topk_text, defaults.topk_audio)
        )

    @property
    def row_room(self) -> int:
        """Frames each of `max_batch` rows can hold within `max_batch_frames` (rounded down to the
        loop's bucket): a continuous loop has at least this much room, so a job that arrives while it
        runs fits unless it is longer (with the defaults, 286 s); a loop sized for its first, short
        job would make every longer one wait for it to drain."""
        share = self.max_batch_frames // self.max_batch
        return share // FAST_FRAMES_BUCKET * FAST_FRAMES_BUCKET

    def _batches(self) -> bool:
        """Whether process_batch steps jobs together (the fast loop), or runs them one by one."""
        return self.captured is not False and not self.cpu_offload

    def _process_safely(self, request: BatchRequest) -> Outcome:
        if request.live is not None:
            return ConversationError(
                "A live conversation needs the batched loop: not captured=False or cpu_offload."
            )
        try:
            return self.process(request.audio, request.params, request.progress, request.should_cancel)
        except Exception as exc:
            return exc

    def _prepare(self, index: int, request: BatchRequest, models: LoadedModels, load_s: float) -> BatchRow:
        """Everything a job needs before the batch starts; raises what would fail it."""
        if request.live is not None:
            return self._prepare_live(index, request, models, load_s)
        report = request.progress or no_progress
        cancelled = request.should_cancel or never_cancelled
        report("load", 1, 1)
        if cancelled():
            raise CancelledError("Cancelled before it started.")
        params = request.params or GenerationParams()
        prepared = time.perf_counter()
        samples = audio_io.load(request.audio, SAMPLE_RATE, self.max_audio_seconds)
        timings = Timings(load_s=load_s)
        prompt = self._prompt_for(models, params, timings)
        clock = time.perf_counter()
        user_codes = codec.encode(models.mimi, samples)
        timings.encode_s = time.perf_counter() - clock
        plan = self._plan(models, user_codes, prompt, params)
        if plan.prompt is not None:
            report("prompt", plan.prompt_frames, plan.prompt_frames)
        job = BatchRow(index, samples, plan, timings, report, cancelled)
        # audio, voice, plan (a prefilled prompt is timed as prompt_s)
        job.prepare_s = time.perf_counter() - prepared - timings.encode_s - timings.prompt_s
        return job

    def _run_batch(
        self,
        models: LoadedModels,
        loop: FastLoop,
        rows: list[BatchRow],
        settle: Callable[[int, Outcome], None],
        joiner: FeedJoiner | None = None,
    ) -> None:
        """Step `rows` (loaded into `loop`) until each has ended or been cancelled; with a `joiner`,
        until it has no more rows either.

        A row that ends is decoded and settled at once, on the engine's finishing thread: the loop
        goes on meanwhile (a conversation's next frame does not wait for a recording's decode). The
        call returns when every row it ended is settled, so the next loop (a new CUDA graph capture)
        never starts while a decode runs, and a loop that breaks settles only the rows not settled."""
        finishing: list[Future[None]] = []

        def finish(row: BatchRow, frames: torch.Tensor) -> None:
            try:
                settle(row.index, self._finish_batched(models, row, frames))
            except Exception as exc:
                settle(row.index, exc)

        def ended(row: BatchRow, frames: torch.Tensor) -> None:
            finishing[:] = [future for future in finishing if not future.done()]
            finishing.append(self._finisher.submit(finish, row, frames))

        try:
            step_rows(loop, rows, ended, lambda row, error: settle(row.index, error), joiner)
        finally:
            for future in finishing:
                future.result()

    def _finish_batched(self, models: LoadedModels, job: BatchRow, frames: torch.Tensor) -> EngineResult:
        if job.live is not None:
            return self._finish_live(models, job, frames)
        result = self._finish(models, job.samples, frames, job.timings, job.report, job.cancelled)
        t = job.timings
        t.total_s = t.load_s + job.prepare_s + t.encode_s + t.prompt_s + t.generate_s + t.decode_s
        t.rtf = (t.total_s - t.load_s) / result.input_duration_s if len(job.samples) else 0.0
        return result

    def _finish_live(self, models: LoadedModels, row: BatchRow, frames: torch.Tensor) -> EngineResult:
        """A conversation's record when it ends: its tokens and text (its audio went out frame by frame)."""
        row.timings.generate_s = time.perf_counter() - row.clock
        row.timings.total_s = row.timings.load_s + row.timings.prompt_s + row.timings.generate_s
        tokens = frames.tolist()
        return EngineResult(
            audio=np.zeros(0, dtype=np.float32),
            text_frames=[self._frame_text(models, frame[0]) for frame in tokens],
            tokens=tokens,
            input_duration_s=len(tokens) / FRAME_RATE,
            timings=row.timings,
        )

    def _prepare_live(
        self, index: int, request: BatchRequest, models: LoadedModels, load_s: float
    ) -> BatchRow:
        """A live conversation's row: its prompt prefilled (a live row is never paused in a prompt),
        then up to `live_frames` frames of user input, fed as they arrive."""
        params = request.params or GenerationParams()
        timings = Timings(load_s=load_s)
        state = self._prompt_state(models, params, timings)
        sampling, generator = self._sampling(models, params)
        no_input = torch.zeros(AUDIO_STREAMS, request.live_frames, dtype=torch.long, device=models.device)
        plan = plan_job(models, no_input, (), 0, sampling=sampling, generator=generator, prompt=state)
        row = BatchRow(index, np.zeros(0, dtype=np.float32), plan, timings)
        row.live = request.live
        return row

    def _run(
        self,
        models: LoadedModels,
        samples: np.ndarray,
        params: GenerationParams,
        timings: Timings,
        report: Progress,
        cancelled: ShouldCancel,
    ) -> EngineResult:
        started = time.perf_counter()
        if cancelled():
            raise CancelledError("Cancelled during the prompt phase.")
        prompt = self._prompt_for(models, params, timings)
        clock = time.perf_counter()
        user_codes = codec.encode(models.mimi, samples)  # [1, 8, F]
        timings.encode_s = time.perf_counter() - clock

        if self._use_fast_loop():
            frames = self._run_fast(models, user_codes, prompt, params, timings, report, cancelled)
        else:
            loop = self._new_loop(models, params)
            if isinstance(prompt, PromptState):
                loop.start_from(prompt)
                report("prompt", prompt.frames, prompt.frames)
            else:
                clock = time.perf_counter()
                self._prompt(
                    loop, prompt, self._text_prompt_tokens(models, params.text_prompt), report, cancelled
                )
                timings.prompt_s = time.perf_counter() - clock

            clock = time.perf_counter()
            frames = self._generate(loop, user_codes, report, cancelled)  # [F, 9]
            timings.generate_s = time.perf_counter() - clock

        result = self._finish(models, samples, frames, timings, report, cancelled)
        timings.total_s = timings.load_s + (time.perf_counter() - started)
        timings.rtf = (timings.total_s - timings.load_s) / result.input_duration_s if len(samples) else 0.0
        return result

    def _finish(
        self,
        models: LoadedModels,
        samples: np.ndarray,
        frames: torch.Tensor,
        timings: Timings,
        report: Progress,
        cancelled: ShouldCancel,
    ) -> EngineResult:
        """Decode a job's frames [F, 9] into its result (timings.decode_s set here).

        A cancel is honoured before each decode chunk and once more at the end, so a DELETE during
        the decode cancels the job rather than letting it succeed.
        """

        def check() -> None:
            if cancelled():
                raise CancelledError("Cancelled during the decode phase.")

        clock = time.perf_counter()
        report("decode", 0, 1)
        agent_audio = codec.decode(models.mimi, frames[:, 1:].T[None], before_chunk=check)[: len(samples)]
        check()
        report("decode", 1, 1)
        timings.decode_s = time.perf_counter() - clock
        duration = len(samples) / SAMPLE_RATE
        tokens = frames.tolist()
        return EngineResult(
            audio=np.ascontiguousarray(agent_audio, dtype=np.float32),
            text_frames=[self._frame_text(models, row[0]) for row in tokens],
            tokens=tokens,
            input_duration_s=duration,
            timings=timings,
        )

    def _new_loop(self, models: LoadedModels, params: GenerationParams) -> FrameLoop:
        assert self._info is not None
        sampling, generator = self._sampling(models, params)
        return FrameLoop(models, self._info.lm.delays, sampling, generator)

    @staticmethod
    def _sampling(models: LoadedModels, params: GenerationParams) -> tuple[Sampling, torch.Generator | None]:
        sampling = Sampling(**{f.name: getattr(params, f.name) for f in fields(Sampling)})
        return sampling, None if params.greedy else make_generator(params.seed, models.device)

    # ---- the fast loop (personaplex.engine.fast) ----------------------------------------------------
    def _use_fast_loop(self) -> bool:
        if self.captured is not None:
            return self.captured
        return self.device.type == "cuda" and not self.cpu_offload

    def _plan(
        self,
        models: LoadedModels,
        user_codes: torch.Tensor,
        prompt: PromptState | VoicePrompt,
        params: GenerationParams,
    ) -> JobPlan:
        """The job's frames: from its prefilled prompt state, or its voice and text prompt stepped."""
        sampling, generator = self._sampling(models, params)
        if isinstance(prompt, PromptState):
            return plan_job(
                models, user_codes[0], (), 0, sampling=sampling, generator=generator, prompt=prompt
            )
        return plan_job(
            models,
            user_codes[0],
            self._text_prompt_tokens(models, params.text_prompt),
            SILENCE_FRAMES,
            voice_embeddings=prompt.embeddings,
            voice_cache=prompt.cache,
            voice_codes=None if prompt.codes is None else prompt.codes[0],
            sampling=sampling,
            generator=generator,
        )

    def _prompt_for(
        self, models: LoadedModels, params: GenerationParams, timings: Timings
    ) -> PromptState | VoicePrompt:
        """The job's prompt phase: its state prefilled in one pass (from the cache when this voice
        file and text prompt were seen; timings.prompt_s and prompt_cached say), or with prefill
        off, the voice its frames are stepped with. Raises UnknownVoiceError, AudioError."""
        if not self.prefill:
            return self._voice_source(models, params.voice_prompt).load(models)
        return self._prompt_state(models, params, timings)

    def _prompt_state(self, models: LoadedModels, params: GenerationParams, timings: Timings) -> PromptState:
        """The job's prompt state, prefilled in one pass or from the cache (see `_prompt_for`)."""
        assert self._info is not None
        source = self._voice_source(models, params.voice_prompt)
        clock = time.perf_counter()
        tokens = tuple(self._text_prompt_tokens(models, params.text_prompt))
        key = (*source.key, tokens)
        state = self.prompt_cache.get(key)
        timings.prompt_cached = state is not None
        if state is None:
            voice = source.load(models)
            no_audio = torch.empty(1, 0, 0, dtype=torch.long, device=models.device)
            state = prefill(models, self._plan(models, no_audio, voice, params), self._info.lm.delays)
            self.prompt_cache.put(key, state)
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        timings.prompt_s = time.perf_counter() - clock
        return state

    def _fast_loop(self, models: LoadedModels, plans: list[JobPlan]) -> FastLoop:
        """A FastLoop holding `plans`: the last one if they fit it, else a new one (capacities rounded up).

        See `reuses_rows` for when a loop with more rows than jobs is reused.
        """
        assert self._info is not None
        loop = self._fast
        graphs = models.device.type == "cuda"
        if loop is not None and loop.fits(plans) and reuses_rows(loop.batch, len(plans), graphs):
            loop.load(plans)
            return loop
        return self._new_fast_loop(models, plans, _round_up(max(len(p) for p in plans), FAST_FRAMES_BUCKET))

    def _new_fast_loop(
        self, models: LoadedModels, plans: list[JobPlan], frames: int, **capacities: Any
    ) -> FastLoop:
        """A new FastLoop for `plans` (captured on CUDA), kept as the engine's loop; it replaces the last."""
        assert self._info is not None
        self._fast = None
        replay = _round_up(max(p.replay_frames for p in plans), FAST_REPLAY_BUCKET)
        self._fast = FastLoop(
            models,
            plans,
            self._info.lm.delays,
            capture=models.device.type == "cuda",
            frames=frames,
            replay_frames=replay,
            sampling=True,
            **capacities,
        )
        return self._fast

    def _run_fast(
        self,
        models: LoadedModels,
        user_codes: torch.Tensor,
        prompt: PromptState | VoicePrompt,
        params: GenerationParams,
        timings: Timings,
        report: Progress,
        cancelled: ShouldCancel,
    ) -> torch.Tensor:
        plan = self._plan(models, user_codes, prompt, params)
        loop = self._fast_loop(models, [plan])
        sync = torch.cuda.synchronize if models.device.type == "cuda" else (lambda: None)

        def before(phase: str, total: int, message: Callable[[int], str]) -> Callable[[int], bool]:
            def check(index: int) -> bool:
                if cancelled():
                    raise CancelledError(message(index))
                if index % PROGRESS_EVERY == 0:
                    report(phase, index, total)
                return False  # one job: nothing to re-plan

            return check

        steps = plan.prompt_frames if plan.prompt is None else 0
        clock = time.perf_counter()
        loop.run(steps, before("prompt", steps, lambda i: "Cancelled during the prompt phase."))
        report("prompt", plan.prompt_frames, plan.prompt_frames)
        if steps:
            sync()
            timings.prompt_s = time.perf_counter() - clock
        clock = time.perf_counter()
        total = plan.generate_frames
        loop.run(total, before("generate", total, lambda i: f"Cancelled at frame {i} of {total}."))
        report("generate", total, total)
        frames = loop.results()[0]
        timings.generate_s = time.perf_counter() - clock
        return frames

    # ---- prompt phases -----------------------------------------------------------------------
    def _prompt(
        self,
        loop: FrameLoop,
        voice: VoicePrompt,
        text_tokens: list[int],
        report: Progress,
        cancelled: ShouldCancel,
    ) -> None:
        steps: list[Callable[[], None]] = []
        if voice.embeddings is not None:
            steps.append(lambda: loop.replay_voice_embeddings(voice.embeddings, voice.cache))
        else:
            steps += [
                lambda f=f: loop.voice_frame(voice.codes[:, :, f]) for f in range(voice.codes.shape[-1])
            ]
        steps += [loop.silence_frame] * SILENCE_FRAMES
        steps += [lambda t=t: loop.text_prompt_frame(t) for t in text_tokens]
        steps += [loop.silence_frame] * SILENCE_FRAMES
        for done, run_step in enumerate(steps):
            if cancelled():
                raise CancelledError("Cancelled during the prompt phase.")
            run_step()
            if done % PROGRESS_EVERY == 0:
                report("prompt", done, len(steps))
        report("prompt", len(steps), len(steps))

    def _text_prompt_tokens(self, models: LoadedModels, text_prompt: str) -> list[int]:
        if not text_prompt.strip():
            return []  # the reference crashes here; an empty prompt simply skips the phase
        return list(models.tokenizer.encode(wrap_with_system_tags(text_prompt)))

    def _voice_prompt(self, models: LoadedModels, name: str) -> VoicePrompt:
        return self._voice_source(models, name).load(models)

    def _voice_source(self, models: LoadedModels, name: str) -> VoiceSource:
        """The voice `name` means: a custom voice's id, a catalog id, or a file; UnknownVoiceError."""
        if is_custom_voice(name):
            if self.custom_voices is None:
                raise UnknownVoiceError(
                    name, reason="custom voices are kept by the service; this engine has no store"
                )
            return custom_voice_source(self.custom_voices, name, self._voice_codes_key(models))
        assert self._voices_dir is not None
        return file_voice_source(resolve_voice(name, self._voices_dir, self.voice_prompt_dir))

    def _voice_codes_key(self, models: LoadedModels) -> str:
        assert self._info is not None
        if self._codes_key is None:
            self._codes_key = codes_key(self._info.mimi_weights, models)
        return self._codes_key

    # ---- user audio --------------------------------------------------------------------------
    def _generate(
        self, loop: FrameLoop, user_codes: torch.Tensor, report: Progress, cancelled: ShouldCancel
    ) -> torch.Tensor:
        total = user_codes.shape[-1]
        frames = []
        for index in range(total):
            if cancelled():
                raise CancelledError(f"Cancelled at frame {index} of {total}.")
            frame = loop.step(user=user_codes[:, :, index])
            assert frame is not None, "the prompt phases leave the loop past its warm-up"
            frames.append(frame[0])
            if index % PROGRESS_EVERY == 0:
                report("generate", index, total)
        report("generate", total, total)
        return torch.stack(frames).cpu()

    @staticmethod
    def _frame_text(models: LoadedModels, token: int) -> str:
        if token in MARKER_TOKENS:
            return MARKER_TOKENS[token]
        if token >= models.tokenizer.vocab_size():  # random benchmark weights only
            return f"<{token}>"
        return models.tokenizer.id_to_piece(token).replace("▁", " ")


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
