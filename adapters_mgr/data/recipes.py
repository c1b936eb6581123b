"""What the recorded recipes (the as-of prior, the retriever's popularity term) share: the as-of rule,
the checks every recipe read back from the catalog goes through, and reading one from its record.

Why one place: a recipe recorded with an adapter is read back by ``reproduce``, evaluation and the
scorer; a field left out of the reading, or a rule checked one way for the prior and another for
popularity, would make a stored adapter score differently from how it was trained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from adapters_mgr.errors import InvalidInput

AS_OF_RULE = "ts_strictly_before"  # an event counts for times strictly after its own (ties: not yet seen)

R = TypeVar("R")


def check_header(what: str, kind: str, kinds: Sequence[str], as_of: str, version: int, known_version: int) -> None:
    """The kind, as-of rule and version of a ``what`` recipe are ones this code computes."""
    if kind not in kinds:
        raise InvalidInput(f"{what} {kind!r} is unknown; use one of {', '.join(kinds)}")
    if as_of != AS_OF_RULE:
        raise InvalidInput(f"{what} as-of rule {as_of!r} is unknown; this version knows {AS_OF_RULE!r}")
    if version != known_version:
        raise InvalidInput(f"{what} recipe version {version} is unknown; this version computes {known_version}")


def check_positive(what: str, value: Any) -> None:
    """``value`` is a positive finite number (not a bool): ``what`` names it in the one-line error."""
    if isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
        raise InvalidInput(f"{what} must be a positive number, got {value!r}")


def from_record(cls: type[R], data: Mapping[str, Any]) -> R:
    """The recipe ``cls`` from its recorded dict: every field the record has (keys it does not know
    are ignored, fields it lacks take their defaults)."""
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})  # type: ignore[arg-type]


__all__ = ["AS_OF_RULE", "check_header", "check_positive", "from_record"]
