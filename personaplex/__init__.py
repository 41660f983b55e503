"""PersonaPlex Queue: offline PersonaPlex speech-to-speech as a service.

The package is the library: catalog, audio I/O, the inference engine, job records and blob
storage, the REST client, the MCP server and the batch CLI. Heavy imports (torch,
transformers) happen only in the engine modules, so the web tier never loads them.
"""

from personaplex.errors import (
    AudioError,
    CancelledError,
    ModelNotAvailableError,
    PersonaPlexError,
    UnknownVoiceError,
)

__all__ = [
    "AudioError",
    "CancelledError",
    "ModelNotAvailableError",
    "PersonaPlexError",
    "UnknownVoiceError",
]
__version__ = "0.1.0"
