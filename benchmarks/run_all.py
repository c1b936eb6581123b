"""Run every benchmark and write BENCHMARKS.md: machine, library versions, every figure, each target
marked met or missed as measured.

    python benchmarks/run_all.py            # the full runs (tens of minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick    # every script end to end in a few minutes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, machine  # noqa: E402

SCRIPTS = ["bench_catalog", "bench_concurrency", "bench_data", "bench_serving", "bench_training",
           "bench_incremental", "bench_templates", "bench_drift_ceiling"]


def _result_name(script: str, quick: bool) -> str:
    if quick and (RESULTS / f"{script}_quick.json").exists():
        return f"{script}_quick"
    return script


def _targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets in the shapes the scripts write them (a list, a dict of verdicts, or flat keys)."""
    summary = data.get("summary")
    raw = data.get("targets") or data.get("verdicts") or (summary.get("targets") if isinstance(summary, dict) else None)
    out: list[dict[str, Any]] = []
    if isinstance(raw, list):
        for t in raw:
            measured = t.get("measured_ms", t.get("value", t.get("measured")))
            if measured is None and t.get("detail"):
                measured = str(t["detail"])[:160]
            out.append({"target": t.get("target") or t.get("name"), "measured": measured,
                        "limit": t.get("limit_ms", t.get("limit")), "met": t.get("met")})
    elif isinstance(raw, dict):
        for name, t in raw.items():
            if isinstance(t, dict):
                out.append({"target": name, "measured": t.get("value", t.get("measured")),
                            "limit": t.get("target", t.get("limit")), "met": t.get("met")})
    if "meets_targets" in data:
        target = f"sync >= {data.get('target_rows_per_s')} rows/s and <= {data.get('target_ratio')}x bare"
        measured = f"{data.get('sync_rows_per_s', 0):,.0f} rows/s, {data.get('ratio_sync_vs_bare', 0):.2f}x"
        out.append({"target": target, "measured": measured, "limit": "", "met": data["meets_targets"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small, fast runs of every script")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SCRIPTS))
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rebuild the report from the results already in benchmarks/results")
    args = parser.parse_args()
    scripts = args.only.split(",") if args.only else SCRIPTS
    runs = []
    for script in scripts:
        if args.collect:
            name = _result_name(script, args.quick)
            ok = (RESULTS / f"{name}.json").exists()
            runs.append({"script": script, "returncode": 0 if ok else 1, "wall_s": 0.0, "collected": True})
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py")] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        runs.append({"script": script, "returncode": proc.returncode, "wall_s": time.perf_counter() - started})
    failed = [r for r in runs if r["returncode"] != 0]
    lines = ["# Benchmarks" + (" (quick mode: tiny models and small data, figures NOT representative)"
                               if args.quick else ""), ""]
    info = machine()
    lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
              "Every figure below was measured side by side within one run of its script; the machines are "
              "shared and noisy, so compare ratios within a table rather than absolute times across tables.", ""]
    summary = []
    for run in runs:
        name = _result_name(run["script"], args.quick)
        json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
        took = "results collected" if run.get("collected") else f"{run['wall_s']:.0f}s"
        lines += [f"## {run['script']} ({'ok' if run['returncode'] == 0 else 'FAILED'}, {took})", ""]
        if md_path.exists():
            body = md_path.read_text().strip().splitlines()
            lines += [ln for ln in body if not ln.startswith("# ")] + [""]
        if json_path.exists():
            for t in _targets(json.loads(json_path.read_text())):
                summary.append({"script": run["script"], **t})
    lines[4:4] = ["## Targets", "", "| script | target | measured | limit | verdict |", "|---|---|---|---|---|"] + [
        f"| {t['script']} | {t['target']} | {_fmt(t['measured'])} | {t['limit'] if t['limit'] is not None else ''} | "
        f"{'met' if t['met'] else 'MISSED'} |" for t in summary] + [""]
    out = ROOT / ("BENCHMARKS_quick.md" if args.quick else "BENCHMARKS.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    for r in failed:
        print(f"FAILED: {r['script']} (exit {r['returncode']})", file=sys.stderr)
    return 1 if failed else 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
