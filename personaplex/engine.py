"""The inference engine the worker keeps resident: load once, process many jobs, offload.

    engine = Engine("nvidia/personaplex-7b-v1")
    result = engine.process("question.wav", GenerationParams(voice_prompt="NATM1.pt"))

One job at a time per engine (a lock), which is also what a GPU worker runs.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex import codec
from personaplex.catalog import normalize_voice_name, voice_filenames
from personaplex.checkpoint import CheckpointInfo, extract_voices, resolve_model
from personaplex.errors import AudioError, CancelledError, UnknownVoiceError
from personaplex.frames import TEXT_PAD, FrameLoop, Sampling
from personaplex.loaders import LoadedModels, load_models
from personaplex.params import FRAME_RATE, SAMPLE_RATE, EngineResult, GenerationParams, Timings
from personaplex.sampling import make_generator

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
ShouldCancel = Callable[[], bool]

SILENCE_FRAMES = int(0.5 * FRAME_RATE)
"""Frames of silence after the voice prompt and after the text prompt (the reference's 0.5 s)."""
PROGRESS_EVERY = 5
"""Frames between progress callbacks."""
VOICE_LOUDNESS_LUFS = -24.0
TEXT_MARKERS = {0: "EPAD", TEXT_PAD: "PAD"}
FAST_FRAMES_BUCKET = 256
"""The fast loop's frame capacity is rounded up to this, so jobs of similar lengths reuse its graphs."""
FAST_REPLAY_BUCKET = 64


def wrap_with_system_tags(text: str) -> str:
    cleaned = text.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _VoicePrompt:
    embeddings: torch.Tensor | None = None  # [N, 1, 1, D] from a catalog .pt
    cache: torch.Tensor | None = None  # [1, 17, 4]
    codes: torch.Tensor | None = None  # [1, 8, F] from a .wav


class Engine:
    """PersonaPlex on torch + transformers; thread-safe, one job at a time."""

    def __init__(
        self,
        model: str | os.PathLike = "nvidia/personaplex-7b-v1",
        device: str | torch.device | None = None,
        cpu_offload: bool = False,
        max_audio_seconds: float | None = audio_io.DEFAULT_MAX_SECONDS,
        voice_prompt_dir: str | os.PathLike | None = None,
        hf_token: str | None = None,
        captured: bool | None = None,
    ) -> None:
        self.model_name = str(model)
        self.device = torch.device(device) if device else default_device()
        self.cpu_offload = cpu_offload
        self.max_audio_seconds = max_audio_seconds
        self.voice_prompt_dir = Path(voice_prompt_dir) if voice_prompt_dir else None
        self.hf_token = hf_token
        self.captured = captured
        """The fast loop (personaplex.fast, CUDA graphs on a GPU); None: on CUDA without cpu offload."""
        self._fast = None  # the last FastLoop, reused while jobs fit it
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
            self._fast = None
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
        report = progress or (lambda phase, done, total: None)
        cancelled = should_cancel or (lambda: False)
        samples = audio_io.load(audio, SAMPLE_RATE, self.max_audio_seconds)
        with self._lock, torch.inference_mode():
            timings = Timings()
            report("load", 0, 1)
            timings.load_s = self.load()
            report("load", 1, 1)
            models = self._models
            assert models is not None
            voice = self._voice_prompt(models, params.voice_prompt)
            result = self._run(models, samples, voice, params, timings, report, cancelled)
            self.last_used = time.time()
            return result

    def _run(
        self,
        models: LoadedModels,
        samples: np.ndarray,
        voice: _VoicePrompt,
        params: GenerationParams,
        timings: Timings,
        report: Progress,
        cancelled: ShouldCancel,
    ) -> EngineResult:
        started = time.perf_counter()
        clock = time.perf_counter()
        user_codes = codec.encode(models.mimi, samples)  # [1, 8, F]
        timings.encode_s = time.perf_counter() - clock

        if self._use_fast_loop():
            frames = self._run_fast(models, user_codes, voice, params, timings, report, cancelled)
        else:
            loop = self._new_loop(models, params)
            clock = time.perf_counter()
            self._prompt(loop, voice, self._text_prompt_tokens(models, params.text_prompt), report, cancelled)
            timings.prompt_s = time.perf_counter() - clock

            clock = time.perf_counter()
            frames = self._generate(loop, user_codes, report, cancelled)  # [F, 9]
            timings.generate_s = time.perf_counter() - clock

        clock = time.perf_counter()
        report("decode", 0, 1)
        agent_audio = codec.decode(models.mimi, frames[:, 1:].T[None])[: len(samples)]
        report("decode", 1, 1)
        timings.decode_s = time.perf_counter() - clock

        duration = len(samples) / SAMPLE_RATE
        timings.total_s = timings.load_s + (time.perf_counter() - started)
        timings.rtf = (timings.total_s - timings.load_s) / duration if duration else 0.0
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

    # ---- the fast loop (personaplex.fast) ----------------------------------------------------
    def _use_fast_loop(self) -> bool:
        if self.captured is not None:
            return self.captured
        return self.device.type == "cuda" and not self.cpu_offload

    def _plan(
        self, models: LoadedModels, user_codes: torch.Tensor, voice: _VoicePrompt, params: GenerationParams
    ):
        from personaplex.fast import plan_job

        sampling, generator = self._sampling(models, params)
        return plan_job(
            models,
            user_codes[0],
            self._text_prompt_tokens(models, params.text_prompt),
            SILENCE_FRAMES,
            voice_embeddings=voice.embeddings,
            voice_cache=voice.cache,
            voice_codes=None if voice.codes is None else voice.codes[0],
            sampling=sampling,
            generator=generator,
        )

    def _fast_loop(self, models: LoadedModels, plans: list):
        """A FastLoop holding `plans`: the last one if they fit it, else a new one (capacities rounded up)."""
        from personaplex.fast import FastLoop

        assert self._info is not None
        if self._fast is not None and self._fast.fits(plans):
            self._fast.load(plans)
            return self._fast
        self._fast = None
        frames = -(-max(len(p) for p in plans) // FAST_FRAMES_BUCKET) * FAST_FRAMES_BUCKET
        replay = -(-max(p.replay_frames for p in plans) // FAST_REPLAY_BUCKET) * FAST_REPLAY_BUCKET
        self._fast = FastLoop(
            models,
            plans,
            self._info.lm.delays,
            capture=models.device.type == "cuda",
            frames=frames,
            replay_frames=replay,
            sampling=True,
        )
        return self._fast

    def _run_fast(
        self,
        models: LoadedModels,
        user_codes: torch.Tensor,
        voice: _VoicePrompt,
        params: GenerationParams,
        timings: Timings,
        report: Progress,
        cancelled: ShouldCancel,
    ) -> torch.Tensor:
        plan = self._plan(models, user_codes, voice, params)
        loop = self._fast_loop(models, [plan])
        sync = torch.cuda.synchronize if models.device.type == "cuda" else (lambda: None)

        def before(phase: str, total: int, message: Callable[[int], str]) -> Callable[[int], None]:
            def check(index: int) -> None:
                if cancelled():
                    raise CancelledError(message(index))
                if index % PROGRESS_EVERY == 0:
                    report(phase, index, total)

            return check

        clock = time.perf_counter()
        prompt = plan.prompt_frames
        loop.run(prompt, before("prompt", prompt, lambda i: "Cancelled during the prompt phase."))
        report("prompt", prompt, prompt)
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
        voice: _VoicePrompt,
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

    def _voice_prompt(self, models: LoadedModels, name: str) -> _VoicePrompt:
        path = self._resolve_voice(name)
        if path.suffix == ".pt":
            state = torch.load(path, map_location=models.device, weights_only=True)
            return _VoicePrompt(embeddings=state["embeddings"].to(models.dtype), cache=state["cache"])
        return _VoicePrompt(codes=codec.encode(models.mimi, self._normalized_voice_audio(path)))

    def _resolve_voice(self, name: str) -> Path:
        assert self._voices_dir is not None
        catalog_name = normalize_voice_name(name)
        if catalog_name is not None:
            path = self._voices_dir / catalog_name
            if path.is_file():
                return path
        # Files outside the catalog are for local callers (the CLI); the web tier sends catalog names only.
        candidates = [Path(name)]
        if self.voice_prompt_dir is not None:
            candidates.insert(0, self.voice_prompt_dir / name)
        for path in candidates:
            if path.suffix in (".pt", ".wav") and path.is_file():
                return path
        raise UnknownVoiceError(name, voice_filenames())

    @staticmethod
    def _normalized_voice_audio(path: Path) -> np.ndarray:
        """Voice WAV normalised to -24 LUFS with pyloudnorm, as the reference conditions it."""
        import pyloudnorm

        samples = audio_io.load(path, SAMPLE_RATE, max_seconds=None)
        try:
            loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(samples)
        except ValueError as exc:
            raise AudioError(f"The voice prompt {path.name} is too short to measure its loudness.") from exc
        if not np.isfinite(loudness):
            raise AudioError(f"The voice prompt {path.name} is silent: it has no loudness to normalise.")
        normalized = pyloudnorm.normalize.loudness(samples, loudness, VOICE_LOUDNESS_LUFS)
        return np.asarray(normalized, dtype=np.float32)

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
        if token in TEXT_MARKERS:
            return TEXT_MARKERS[token]
        if token >= models.tokenizer.vocab_size():  # random benchmark weights only
            return f"<{token}>"
        return models.tokenizer.id_to_piece(token).replace("▁", " ")
