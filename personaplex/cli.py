"""`personaplex`: the batch CLI. It talks only HTTP, to the service at PERSONAPLEX_API_URL.

    personaplex submit FILES_OR_DIRS... --out DIR [--voice V] [--prompt TEXT | --prompt-file F] [--seed N]
    personaplex status ID            a job or a batch
    personaplex voices | prompts | workers
    personaplex voice-add FILE --name NAME --consent    upload a custom voice (1-60 s of one speaker)
    personaplex voice-rm VOICE_ID                       delete a custom voice
    personaplex gpu [--offload] [--worker NAME]

`submit` writes `<stem>.wav` and `<stem>.json` per input into DIR as each job finishes, with a bar for
the batch and one per running file on stderr. Inputs whose two outputs already exist are skipped, so
rerunning a command finishes what an earlier run left. Ctrl-C asks whether to cancel the jobs that
have not finished (without a terminal on stdin it cancels them and says so).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from personaplex.batches import output_stems
from personaplex.client import FINAL_STATUSES, ClientError, PersonaPlexClient
from personaplex.errors import AudioError
from personaplex.settings import ClientSettings

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    everything asked for was done (skipped inputs count as done)
  1    some jobs failed or were cancelled (status: the job or batch has failures)
  2    usage or input error: bad arguments, missing or unreadable input, refused by the service (4xx)
  3    the service is unreachable or unavailable (connection refused, timeout, 502/503/504;
       `workers`: no live worker)
  130  interrupted (Ctrl-C)

environment:
  PERSONAPLEX_API_URL  the service (default http://localhost:8998)
  PERSONAPLEX_API_KEY  its API key, if it has one
"""

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff"})
"""File endings picked up when a directory is given (files named explicitly are sent as they are)."""

CHUNK_FILES = 100
"""Most inputs sent in one POST /api/batches (a larger run is several batches)."""

CHUNK_BYTES = 64 * 1024 * 1024
"""Most bytes of audio sent in one POST /api/batches (below the server's default 200 MB limit)."""

POLL_INTERVAL_S = 0.5
"""Seconds between two reads of the batches' status."""

MAX_RETRY_WAIT_S = 30.0
"""Longest pause (seconds) before sending a batch again after the queue was full (429)."""

_UNAVAILABLE = frozenset({502, 503, 504})


class CliError(Exception):
    """Stop with a message and an exit code: the CLI's boundary adapter (personaplex/errors.py)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(exc: ClientError) -> int:
    if exc.status is None or exc.status in _UNAVAILABLE:
        return EXIT_UNREACHABLE
    return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_JOBS_FAILED


# -- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = PersonaPlexClient(args.url, args.api_key or None, timeout=args.timeout)
    try:
        return args.run(client, args)
    except CliError as exc:
        _say(f"error: {exc}")
        return exc.code
    except ClientError as exc:
        _say(f"error: {exc}")
        return exit_code_for(exc)
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    client = ClientSettings.from_env()
    parser = argparse.ArgumentParser(
        prog="personaplex",
        description="Submit audio to a PersonaPlex Queue service and collect the replies.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=client.api_url,
        help="service base URL (default: $PERSONAPLEX_API_URL or %(default)s)",
    )
    parser.add_argument("--api-key", default=client.api_key, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (%(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="process files and folders, writing <stem>.wav and <stem>.json per input",
        description="Send the inputs as a batch and write <stem>.wav and <stem>.json per input into "
        "--out as each job finishes. Inputs whose outputs exist are skipped (rerun to resume).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("inputs", nargs="+", metavar="FILES_OR_DIRS", help="audio files or folders of them")
    submit.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    submit.add_argument(
        "--voice", help="voice prompt, e.g. NATF2.pt, NATF2 or custom-anna (see `personaplex voices`)"
    )
    prompt = submit.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="persona text prompt")
    prompt.add_argument("--prompt-file", type=Path, help="read the persona text prompt from a file")
    submit.add_argument("--seed", type=int, help="sampling seed (-1: random)")
    submit.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw progress bars (default: when stderr is a terminal)",
    )
    submit.add_argument("--poll-interval", type=float, default=POLL_INTERVAL_S, help=argparse.SUPPRESS)
    submit.set_defaults(run=run_submit)

    status = commands.add_parser("status", help="a job's or a batch's status")
    status.add_argument("id", metavar="ID", help="job id or batch id")
    status.add_argument("--json", action="store_true", help="print the raw record")
    status.set_defaults(run=run_status)

    for name, run, text in (
        ("voices", run_voices, "the voices"),
        ("prompts", run_prompts, "example persona prompts"),
        ("workers", run_workers, "the live workers"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--json", action="store_true", help="print the raw answer")
        sub.set_defaults(run=run)

    add_voice_commands(commands)

    gpu = commands.add_parser("gpu", help="GPU status, or --offload to free GPU memory")
    gpu.add_argument("--offload", action="store_true", help="free GPU memory now (or after the running job)")
    gpu.add_argument("--worker", metavar="NAME", help="only this worker (e.g. gpu0@host)")
    gpu.add_argument("--json", action="store_true", help="print the raw answer")
    gpu.set_defaults(run=run_gpu)
    return parser


def add_voice_commands(commands: argparse._SubParsersAction) -> None:
    """voice-add and voice-rm (`voices` lists them with the catalog)."""
    add = commands.add_parser(
        "voice-add",
        help="upload a recording as a custom voice",
        description="Upload 1-60 s of one speaker as a custom voice; its id (custom-<name>) then "
        "works as --voice. --consent attests that the speaker agreed to this use of their voice.",
    )
    add.add_argument("file", type=Path, metavar="FILE", help="the recording (WAV, FLAC, MP3, ...)")
    add.add_argument(
        "--name", required=True, help="display name; the id is made from it (Anna -> custom-anna)"
    )
    add.add_argument("--consent", action="store_true", help="the speaker agreed to this use of their voice")
    add.add_argument("--json", action="store_true", help="print the raw answer")
    add.set_defaults(run=run_voice_add)

    remove = commands.add_parser("voice-rm", help="delete a custom voice")
    remove.add_argument("voice_id", metavar="VOICE_ID", help="e.g. custom-anna")
    remove.add_argument("--json", action="store_true", help="print the raw answer")
    remove.set_defaults(run=run_voice_rm)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- submit --------------------------------------------------------------------------------------


@dataclass
class Item:
    """One input and where its outputs go."""

    path: Path
    stem: str
    out_dir: Path
    job_id: str | None = None
    status: str | None = None
    error: str | None = None

    @property
    def wav(self) -> Path:
        return self.out_dir / f"{self.stem}.wav"

    @property
    def json(self) -> Path:
        return self.out_dir / f"{self.stem}.json"

    @property
    def done(self) -> bool:
        return self.wav.is_file() and self.json.is_file()

    @property
    def upload_name(self) -> str:
        return self.stem + self.path.suffix.lower()


class SigintLatch:
    """Remembers every SIGINT while a batch runs, so none is lost.

    Python's own handler raises KeyboardInterrupt wherever the main thread happens to be, and some
    places drop it without a trace: the IOBase finalizer that runs as each HTTP response is freed (at
    the end of every request) clears any exception raised inside it, as do __del__ methods and weakref
    callbacks. This handler still raises (to break a sleep or a long request at once) but first counts
    the signal, and `check()` raises again at the batch loop's safe points when the first raise was
    swallowed. While a batch is being sent (`deferred()`), the first SIGINT only counts: raising then
    would lose the batch id of jobs the service has already queued, so they could not be cancelled.
    """

    def __init__(self) -> None:
        self.count = 0
        self._deferring = False
        self._previous: Any = None

    def __enter__(self) -> SigintLatch:
        # signal.signal works only in the main thread; elsewhere SIGINT never raises anyway.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Put back the handler that was there before (Python's: SIGINT raises KeyboardInterrupt)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self._deferring and self.count == 1:
            return  # raised by check() once the batch is recorded; a second Ctrl-C stops at once
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a SIGINT came since the latch was set (even one swallowed)."""
        if self.count:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold the first SIGINT until the block ends, then raise it."""
        self.check()
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.check()


def run_submit(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    with SigintLatch() as latch:
        return _submit(client, args, latch)


def _submit(client: PersonaPlexClient, args: argparse.Namespace, latch: SigintLatch) -> int:
    params = {"voice_prompt": args.voice, "text_prompt": _prompt_text(args), "seed": args.seed}
    paths = find_inputs(args.inputs)
    items = [
        Item(p, stem, args.out) for p, stem in zip(paths, output_stems(p.name for p in paths), strict=True)
    ]
    todo = [item for item in items if not item.done]
    skipped = len(items) - len(todo)
    if skipped:
        _say(f"Skipping {skipped} of {len(items)} inputs: their outputs are already in {args.out}.")
    if not todo:
        _say("Nothing to do.")
        return EXIT_OK
    check_inputs(todo)
    args.out.mkdir(parents=True, exist_ok=True)
    show_bars = sys.stderr.isatty() if args.progress is None else args.progress
    run = BatchRun(client, todo, params, show_bars, args.poll_interval, latch)
    try:
        run.run()
    except KeyboardInterrupt:
        run.close_bars()
        # Python's handler again: a Ctrl-C at the prompt means "leave them running", and a second
        # one while cancelling stops the CLI.
        latch.release()
        run.interrupted(sys.stdin)
        return EXIT_INTERRUPTED
    finally:
        run.close_bars()
    failed = [item for item in todo if item.status != "succeeded"]
    _say(f"{len(todo) - len(failed)} done, {len(failed)} failed, {skipped} skipped; outputs in {args.out}.")
    return EXIT_JOBS_FAILED if failed else EXIT_OK


def _prompt_text(args: argparse.Namespace) -> str | None:
    if args.prompt_file is None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the prompt file {args.prompt_file}: {exc}") from None


def find_inputs(arguments: Sequence[str]) -> list[Path]:
    """The files named and the audio files under the folders named (sorted), each once."""
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith(".")
            )
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"{argument}: no such file or folder")
    unique = list({p.resolve(): p for p in reversed(found)}.values())[::-1]
    if not unique:
        raise CliError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {' '.join(arguments)}")
    return unique


def check_inputs(items: Sequence[Item]) -> None:
    """Read each file's audio header before anything is sent, so a bad file queues nothing."""
    from personaplex.audio import probe

    for item in items:
        try:
            probe(item.path, max_seconds=None)
        except AudioError as exc:
            raise CliError(f"{item.path}: {exc}") from None


def chunks(
    items: Sequence[Item], max_files: int = CHUNK_FILES, max_bytes: int = CHUNK_BYTES
) -> list[list[Item]]:
    """Split the inputs into batches of at most `max_files` files and about `max_bytes` bytes."""
    groups: list[list[Item]] = []
    size = 0
    for item in items:
        length = item.path.stat().st_size
        if not groups or len(groups[-1]) >= max_files or (groups[-1] and size + length > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += length
    return groups


@dataclass
class BatchRun:
    """Sends the batches, follows them, downloads each output as its job succeeds."""

    client: PersonaPlexClient
    items: list[Item]
    params: dict[str, Any]
    show_bars: bool
    poll_interval: float = POLL_INTERVAL_S
    latch: SigintLatch = field(default_factory=SigintLatch)
    batches: list[str] = field(default_factory=list)
    _pending: list[list[Item]] = field(default_factory=list)
    _by_job: dict[str, Item] = field(default_factory=dict)
    _open_batches: set[str] = field(default_factory=set)
    _next_send: float = 0.0
    _bar: Any = None
    _file_bars: dict[str, Any] = field(default_factory=dict)
    _stopping: bool = False

    def run(self) -> None:
        from tqdm import tqdm

        self._pending = chunks(self.items)
        self._bar = tqdm(
            total=len(self.items), desc="batch", unit="file", file=sys.stderr, disable=not self.show_bars
        )
        while True:
            self.latch.check()
            if self._pending and time.monotonic() >= self._next_send:
                with self.latch.deferred():
                    self._send(self._pending[0])
            for batch_id in sorted(self._open_batches):
                self._follow(batch_id)
                self.latch.check()
            if not self._pending and not self._open_batches:
                self.latch.check()  # a SIGINT swallowed during the last look still counts
                return
            time.sleep(self.poll_interval)

    def _send(self, chunk: list[Item]) -> None:
        """POST one chunk and record its job ids (run with SIGINT deferred: see SigintLatch)."""
        try:
            answer = self.client.submit_batch(
                [(item.upload_name, item.path) for item in chunk], **self.params
            )
        except ClientError as exc:
            if exc.status != 429:
                raise
            wait = min(exc.retry_after or 5.0, MAX_RETRY_WAIT_S)
            self._write(f"The queue is full; sending the next {len(chunk)} files in {wait:g} s.")
            self._next_send = time.monotonic() + wait
            return
        self._pending.pop(0)
        batch_id = answer["batch_id"]
        self.batches.append(batch_id)
        self._open_batches.add(batch_id)
        for item, sent in zip(chunk, answer["inputs"], strict=True):
            item.job_id = sent["job_id"]
            self._by_job[item.job_id] = item
        self._write(f"Batch {batch_id}: {len(chunk)} jobs queued.")

    def _follow(self, batch_id: str) -> None:
        view = self.client.get_batch(batch_id)
        items = []
        for entry in view["jobs"]:
            item = self._by_job.get(entry["job_id"])
            if item is not None and item.status not in FINAL_STATUSES:
                self._update(item, entry)
                items.append(item)
        if all(item.status in FINAL_STATUSES for item in items):
            self._open_batches.discard(batch_id)

    def _update(self, item: Item, entry: dict[str, Any]) -> None:
        status = entry["status"]
        if status == "running" and not self._stopping:
            self._show_progress(item, entry.get("progress") or {})
        elif status == "succeeded":
            self._collect(item)
        elif status in FINAL_STATUSES or status == "expired":
            self._finish(item, "failed" if status == "expired" else status, entry.get("error") or status)
        item.status = item.status if item.status in FINAL_STATUSES else status

    def _collect(self, item: Item) -> None:
        assert item.job_id is not None
        try:
            wav = self.client.download_audio(item.job_id)
            text = self.client.download_text(item.job_id)
        except ClientError as exc:
            if exc.status is None or exc.status in _UNAVAILABLE:
                raise
            self._finish(item, "failed", f"download failed: {exc}")
            return
        from personaplex.audio import write_bytes_atomic

        write_bytes_atomic(item.wav, wav)  # type: ignore[arg-type]
        write_bytes_atomic(item.json, json.dumps(text, ensure_ascii=False, indent=1).encode())
        self._finish(item, "succeeded", None)

    def _finish(self, item: Item, status: str, error: str | None) -> None:
        item.status, item.error = status, error
        bar = self._file_bars.pop(item.stem, None)
        if bar is not None:
            bar.close()
        self._bar.update(1)
        if self._stopping and status == "cancelled":
            return
        if error is None:
            self._write(f"done    {item.path} -> {item.wav.name}, {item.json.name}")
        else:
            self._write(f"{status:<8}{item.path}: {error}")

    def _show_progress(self, item: Item, progress: dict[str, Any]) -> None:
        from tqdm import tqdm

        total, done, phase = progress.get("total"), progress.get("done", 0), progress.get("phase", "")
        bar = self._file_bars.get(item.stem)
        if bar is None:
            bar = self._file_bars[item.stem] = tqdm(
                total=total,
                desc=f"{item.stem} {phase}".strip(),
                unit="frame",
                leave=False,
                file=sys.stderr,
                disable=not self.show_bars,
            )
            bar.phase = phase
        if total and (bar.total != total or bar.phase != phase):
            bar.phase = phase
            bar.reset(total=total)
            bar.set_description(f"{item.stem} {phase}")
        bar.update(max(done - bar.n, 0))

    def _write(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    def close_bars(self) -> None:
        for bar in self._file_bars.values():
            bar.close()
        self._file_bars.clear()
        if self._bar is not None:
            self._bar.close()

    # -- Ctrl-C --------------------------------------------------------------------------------

    def remaining(self) -> list[Item]:
        return [item for item in self._by_job.values() if item.status not in FINAL_STATUSES]

    def interrupted(self, stdin: IO[str]) -> None:
        """Ask whether to cancel the unfinished jobs; without a terminal, cancel them."""
        left = self.remaining()
        if not left:
            _say("Interrupted; no job was left unfinished.")
            return
        if stdin.isatty():
            answer = _ask(f"\nInterrupted. Cancel the {len(left)} unfinished jobs? [y/N] ")
            if answer is None or answer.strip().lower() not in ("y", "yes"):
                _say(
                    f"Left {len(left)} jobs running in batch {', '.join(self.batches)}: "
                    "`personaplex status ID` follows it, GET /api/batches/ID/archive collects the outputs."
                )
                return
        else:
            _say(f"Interrupted and stdin is not a terminal: cancelling the {len(left)} unfinished jobs.")
        self.cancel()

    def cancel(self) -> None:
        cancelled = 0
        for batch_id in self.batches:
            try:
                answer = self.client.cancel_batch(batch_id)
            except ClientError as exc:
                if exc.status != 409:  # 409: nothing left to cancel in that batch
                    _say(f"Could not cancel batch {batch_id}: {exc}")
                continue
            cancelled += answer.get("cancelled", 0) + answer.get("cancel_requested", 0)
        collected = self.collect_finished()
        also = f"; wrote the outputs of {collected} that finished meanwhile" if collected else ""
        _say(f"Cancelled {cancelled} jobs{also}. Rerun the same command to process the rest.")

    def collect_finished(self) -> int:
        """Download the outputs of jobs that succeeded since the last look; returns how many."""
        self._stopping = True
        before = sum(item.status == "succeeded" for item in self.items)
        for batch_id in self.batches:
            try:
                self._follow(batch_id)
            except ClientError as exc:
                _say(f"Could not collect the outputs of batch {batch_id}: {exc}")
                break
        return sum(item.status == "succeeded" for item in self.items) - before


def _ask(question: str) -> str | None:
    """The answer, or None on end of input or a second Ctrl-C."""
    try:
        return input(question)
    except (EOFError, KeyboardInterrupt):
        return None


# -- status and the service ----------------------------------------------------------------------


def run_status(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    """0: found and nothing failed; 1: the job, or a job of the batch, failed or was cancelled."""
    try:
        job = client.get_job(args.id)
    except ClientError as exc:
        if exc.status != 404:
            raise
    else:
        _print(args, job, _describe_job)
        return EXIT_JOBS_FAILED if job["status"] in ("failed", "cancelled") else EXIT_OK
    try:
        batch = client.get_batch(args.id)
    except ClientError as exc:
        if exc.status == 404:
            raise CliError(f"no job or batch {args.id!r} (unknown, or expired)") from None
        raise
    _print(args, batch, _describe_batch)
    bad = (
        batch["counts"].get("failed", 0)
        + batch["counts"].get("cancelled", 0)
        + batch["counts"].get("expired", 0)
    )
    return EXIT_JOBS_FAILED if bad else EXIT_OK


def _progress_suffix(job: dict[str, Any]) -> str:
    """'  generate 40/125' for a running job that reports progress, else ''."""
    progress = job.get("progress") or {}
    if job["status"] != "running" or not progress.get("total"):
        return ""
    return f"  {progress.get('phase', '')} {progress.get('done', 0)}/{progress['total']}"


def _describe_job(job: dict[str, Any]) -> str:
    line = f"job {job['id']}  {job['status']}  {job.get('input_name', '')}{_progress_suffix(job)}"
    if job.get("worker"):
        line += f"  on {job['worker']}"
    if job.get("error"):
        line += f"\n  error: {job['error']}"
    return line


def _describe_batch(batch: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in batch["counts"].items() if n)
    lines = [f"batch {batch['batch_id']}  {batch['total']} jobs: {counts}"]
    for entry in batch["jobs"]:
        line = f"  {entry['job_id']}  {entry['status']:<9} {entry['name']}{_progress_suffix(entry)}"
        if entry.get("error"):
            line += f"  ({entry['error']})"
        lines.append(line)
    return "\n".join(lines)


def run_voices(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    voices = client.voices()
    _print(args, voices, _describe_voices)
    return EXIT_OK


def _describe_voices(voices: list[dict[str, Any]]) -> str:
    """One line per voice, the ids in a column as wide as the longest (custom ids run longer)."""
    width = max([10, *(len(v["id"]) for v in voices)])
    return "\n".join(f"{v['id']:<{width}} {_voice_label(v)}" for v in voices)


def _voice_label(voice: dict[str, Any]) -> str:
    """'Natural Female 2 (natural)', or 'Anna (custom, 3.5 s)'."""
    if not voice.get("custom"):
        return f"{voice['name']} ({voice['category']})"
    return f"{voice['name']} (custom, {voice.get('duration_s') or 0:.1f} s)"


def run_voice_add(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    """Checked here first: the service's own refusals speak of form fields, not of options."""
    if not args.consent:
        raise CliError(
            "--consent is required: pass it to attest that the speaker agreed to this use of their "
            "voice (the service records it with the time and your address)"
        )
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise CliError(f"{args.file}: cannot read it ({exc.strerror or exc})") from None
    voice = client.create_voice(data, args.name, consent=True, filename=args.file.name)
    _print(args, voice, lambda v: f"created {v['id']}  {_voice_label(v)}; use it with --voice {v['id']}")
    return EXIT_OK


def run_voice_rm(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    answer = client.delete_voice(args.voice_id.strip())
    _print(args, answer, lambda a: f"deleted {a['voice_id']}")
    return EXIT_OK


def run_prompts(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    prompts = client.prompts()
    _print(args, prompts, lambda ps: "\n\n".join(f"{p['id']} ({p['name']}):\n  {p['text']}" for p in ps))
    return EXIT_OK


def run_workers(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    """The live workers; none is exit 3: jobs would only wait (scripts can check before submitting)."""
    workers = client.gpu_status().get("workers", [])
    if workers or args.json:
        _print(args, workers, lambda ws: "\n".join(_describe_worker(w) for w in ws))
    if workers:
        return EXIT_OK
    print("no live workers: queued jobs wait until one starts", file=sys.stderr)
    return EXIT_UNREACHABLE


def run_gpu(client: PersonaPlexClient, args: argparse.Namespace) -> int:
    """Status (of one worker with --worker), or --offload (all workers, or the one named)."""
    if args.offload:
        result = client.offload(args.worker)
        _print(
            args,
            result,
            lambda r: f"offload: {r.get('status')}, {r.get('memory_allocated', 0):g} MB allocated",
        )
        return EXIT_OK
    status = client.gpu_status()
    if args.worker:
        workers = [w for w in status.get("workers", []) if w.get("worker") == args.worker]
        if not workers:
            raise CliError(f"no live worker named {args.worker!r} (see `personaplex workers`)")
        _print(args, workers[0], _describe_worker)
        return EXIT_OK
    _print(args, status, _describe_fleet)
    return EXIT_OK


def _describe_fleet(status: dict[str, Any]) -> str:
    gpu = status.get("gpu") or {}
    head = (
        f"model loaded: {'yes' if status.get('model_loaded') else 'no'}, "
        f"running jobs: {status.get('active_connections', 0)}, workers: {status.get('worker_count', 0)}, "
        f"GPU: {gpu.get('name') or 'none'} ({gpu.get('memory_allocated', 0):g} of {gpu.get('memory_total', 0):g} MB)"
    )
    return "\n".join([head, *(_describe_worker(w) for w in status.get("workers", []))])


def _describe_worker(worker: dict[str, Any]) -> str:
    gpu = worker.get("gpu") or {}
    running = worker.get("running_job") or "idle"
    loaded = "loaded" if worker.get("model_loaded") else "not loaded"
    return (
        f"{worker.get('worker')}  {worker.get('device') or '?'}  model {loaded}  {running}  "
        f"{gpu.get('memory_allocated', 0):g} MB"
    )


def _print(args: argparse.Namespace, value: Any, describe: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        print(describe(value))


if __name__ == "__main__":
    sys.exit(main())
