"""One exception tree for the whole project.

    PersonaPlexError
    ├── AudioError              input audio is empty, undecodable, too long or silent
    ├── UnknownVoiceError       a voice prompt neither in the catalog, nor a custom voice, nor a readable file
    ├── ModelNotAvailableError  weights missing, gated, or not downloadable (says what to do)
    ├── CheckpointError         a checkpoint whose keys or shapes do not match the config
    ├── CancelledError          a job was cancelled between frames
    ├── ConversationError       a live conversation that cannot run here, or was cut off
    ├── QueueFullError          (personaplex.jobs) the queue had no room: nothing was written
    └── ClientError             (personaplex.client) the service answered an error, or was unreachable
        └── WaitTimeoutError    a wait ran out before the job was final; the job goes on

QueueFullError and the client's errors live beside the code that raises them; this docstring is
where the tree is drawn, and tests/test_errors.py pins it. Three more exceptions are boundary
adapters, not part of the tree: each turns an error into what its boundary speaks, and carries no
meaning of its own: `ApiError` (web/errors.py) into an HTTP status and a JSON body, `CliError`
(personaplex/cli.py) into a message and an exit code, `ToolError` (personaplex/mcp_server.py) into
an MCP tool error.

Each error's message is written for the person who has to fix the problem.
"""

from __future__ import annotations

__all__ = [
    "AudioError",
    "CancelledError",
    "CheckpointError",
    "ConversationError",
    "ModelNotAvailableError",
    "PersonaPlexError",
    "UnknownVoiceError",
]
"""The drawing's classes defined here; QueueFullError and the client's errors are defined where raised."""


class PersonaPlexError(Exception):
    """Base of every error the project raises on purpose."""


class AudioError(PersonaPlexError, ValueError):
    """The input audio cannot be used."""


class UnknownVoiceError(PersonaPlexError, ValueError):
    """The voice prompt is not in the catalog and is not a readable file."""

    def __init__(self, voice: str, valid: list[str] | None = None, reason: str | None = None) -> None:
        self.voice = voice
        self.valid = valid or []
        hint = f" Valid voices: {', '.join(self.valid)}." if self.valid else ""
        because = f": {reason}" if reason else ""
        super().__init__(f"Unknown voice prompt {voice!r}{because}.{hint}")


class ModelNotAvailableError(PersonaPlexError, RuntimeError):
    """The model's files cannot be found or downloaded."""


class CheckpointError(PersonaPlexError, RuntimeError):
    """A checkpoint does not match the layout its config describes."""


class CancelledError(PersonaPlexError):
    """The job was cancelled; raised between frames by the engine."""


class ConversationError(PersonaPlexError):
    """A live conversation cannot run (no batched loop on this engine) or was cut off."""
