"""Merge method names and the checks of their options: no torch, so a bad ``--method`` is refused
before any model or module is loaded (the maths is in :mod:`adapters_mgr.lora.merge`)."""

from __future__ import annotations

from typing import Any

from adapters_mgr.errors import InvalidInput

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
# methods that, given one adapter, return it unchanged (cat) or only scaled (linear): a copy, not a merge
COPYING_METHODS = ("cat", "linear")


def check_method(method: str, target_rank: Any = None, density: Any = None) -> None:
    """``InvalidInput`` for an unknown method, or a rank or density it does not take."""
    if method not in METHODS:
        raise InvalidInput(f"unknown merge method {method!r}; choose one of {list(METHODS)} (or fold to export)")
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
            raise InvalidInput(f"target_rank must be a positive integer, got {target_rank!r}; try 8")
        if method in ("cat", "linear"):
            hint = "cat's rank is the sum of the ranks" if method == "cat" else "linear keeps the sources' rank"
            raise InvalidInput(f"target_rank does not apply to {method} ({hint}); use method='svd' to pick a rank")
    if density is not None:
        if method not in DENSITY_METHODS:
            raise InvalidInput(f"density applies to {list(DENSITY_METHODS)} only, not to {method!r}")
        if isinstance(density, bool) or not isinstance(density, int | float) or not 0.0 < float(density) <= 1.0:
            raise InvalidInput(f"density must be in (0, 1], got {density!r}; try 0.5 (keep half the entries)")


__all__ = ["COPYING_METHODS", "DENSITY_METHODS", "METHODS", "check_method"]
