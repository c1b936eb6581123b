"""Shared benchmark plumbing: timing with warm-up, machine description, JSON + Markdown output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import duckdb

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "duckdb": duckdb.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for mod in ("torch", "transformers", "peft"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


def samples_ms(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` calls, in call order."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def timeit(fn: Callable[[], Any], *, repeat: int = 20, warmup: int = 2) -> dict[str, float]:
    """Wall-clock milliseconds over ``repeat`` runs after ``warmup`` runs: p50, p90, min, mean."""
    for _ in range(warmup):
        fn()
    samples = sorted(samples_ms(fn, repeat))
    return {
        "p50_ms": statistics.median(samples),
        "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
        "min_ms": samples[0],
        "mean_ms": statistics.fmean(samples),
        "runs": repeat,
    }


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
