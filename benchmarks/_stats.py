"""Paired comparisons for benchmark verdicts: mean difference with a 95% t-interval.

Why paired: two strategies scored on the same rows with the same seed share most of their noise
(which rows, which init); their per-seed (or per-period) differences vary far less than either
figure, so a difference of a few thousandths can be told from noise with a handful of seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# two-sided 95% quantiles of Student's t by degrees of freedom (no scipy dependency for five numbers)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 97.5% quantile of t with ``df`` degrees of freedom (the next smaller tabled df: conservative)."""
    if df < 1:
        return math.inf
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``a - b`` pair by pair: mean, std, 95% interval, how many pairs, how many with a > b."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return {"mean": mean, "std": sd, "low": mean - half, "high": mean + half, "n": len(diffs),
            "wins": sum(d > 0 for d in diffs)}


def describe(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt_paired(p: dict[str, Any], digits: int = 4) -> str:
    """``+0.0041 [+0.0012, +0.0070] (3/3)``."""
    return (f"{p['mean']:+.{digits}f} [{p['low']:+.{digits}f}, {p['high']:+.{digits}f}] "
            f"({p['wins']}/{p['n']})")


__all__ = ["describe", "fmt_paired", "paired", "t975"]
