"""The one exception tree (personaplex/errors.py draws it): every error the project raises on purpose
is a PersonaPlexError, and the drawing lists exactly the classes that exist."""

from __future__ import annotations

import inspect
import re

from personaplex import client, errors, jobs
from personaplex.cli import CliError
from personaplex.mcp_server import ToolError
from web.errors import ApiError

TREE_MODULES = (errors, client, jobs)
ADAPTERS = (ApiError, CliError, ToolError)


def project_exceptions() -> set[type[BaseException]]:
    """Exception classes defined (not imported) in the modules the tree covers."""
    return {
        obj
        for module in TREE_MODULES
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == module.__name__
    }


def test_every_project_error_is_in_the_tree() -> None:
    outside = {cls.__name__ for cls in project_exceptions() if not issubclass(cls, errors.PersonaPlexError)}
    outside -= {
        "LeaseLost"
    }  # jobs' internal signal to stop a row, caught by the worker, never raised to users
    assert outside == set()


def test_the_drawing_matches_the_classes() -> None:
    drawn = set(re.findall(r"[├└]── (\w+)", errors.__doc__ or "")) | {"PersonaPlexError"}
    defined = {cls.__name__ for cls in project_exceptions() if issubclass(cls, errors.PersonaPlexError)}
    assert drawn == defined


def test_errors_exports_what_it_defines() -> None:
    """errors.__all__ is the drawing less the classes other modules define (named in brackets there)."""
    drawing = errors.__doc__ or ""
    drawn = set(re.findall(r"[├└]── (\w+)", drawing)) | {"PersonaPlexError"}
    elsewhere = set(re.findall(r"[├└]── (\w+) +\(personaplex\.", drawing)) | {"WaitTimeoutError"}
    assert set(errors.__all__) == drawn - elsewhere
    assert issubclass(client.WaitTimeoutError, client.ClientError)


def test_boundary_adapters_say_so_and_stand_outside() -> None:
    for adapter in ADAPTERS:
        assert not issubclass(adapter, errors.PersonaPlexError), adapter
        assert "boundary adapter" in (adapter.__doc__ or ""), adapter
        assert adapter.__name__ in (errors.__doc__ or ""), adapter
