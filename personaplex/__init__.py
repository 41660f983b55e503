"""PersonaPlex Queue: offline PersonaPlex speech-to-speech as a service.

The package is the library, in three layers (docs/architecture.md draws them):

- `personaplex.engine`: the inference engine; every torch and transformers import is there, so
  the web tier and the clients never load them.
- the service's data model: catalog, params, settings, audio I/O, jobs, batches, storage, errors.
- the clients: client (REST), cli, mcp_server, offline, demo, devstack.

The service and client modules stay flat at the top: each layer is a handful of small modules
that import only the data model, and their names are commands (`python -m personaplex.offline`,
`personaplex.demo`) and entry points users already type.
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
