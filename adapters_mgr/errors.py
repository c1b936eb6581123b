"""One exception hierarchy for the whole package.

Every error carries a message that names the offending value and says what to do about it,
because the CLI prints exactly that one line (no traceback) and maps the class to an exit code.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message (its class name when it has none).

    Why: DuckDB errors carry the failing query and a ``LINE 1: ... ^^^`` caret after the line that
    says what went wrong, and the CLI prints one line.
    """
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


class AdaptersMgrError(Exception):
    """Base class: anything the user can fix or must know about. Exit code 1 unless refined."""

    exit_code = 1


class InvalidInput(AdaptersMgrError, ValueError):
    """An argument is malformed or out of range (bad name, rank <= 0, pickle adapter...)."""

    exit_code = 2


class NotFound(AdaptersMgrError, LookupError):
    """An id, alias, name, batch, folder or base that does not exist."""

    exit_code = 3


class Conflict(AdaptersMgrError):
    """The request contradicts the stored state (delete while an alias needs it, nothing to roll back...)."""

    exit_code = 4


class IntegrityError(AdaptersMgrError):
    """Stored bytes do not match their recorded checksum, or a base's weights differ from the recorded one."""

    exit_code = 5


class Locked(AdaptersMgrError):
    """Another process held the catalog for longer than the lock timeout."""

    exit_code = 6


__all__ = ["AdaptersMgrError", "Conflict", "IntegrityError", "InvalidInput", "Locked", "NotFound"]
