"""`benchmarks/run_all.py --quick` runs every benchmark script end to end (so none of them rots)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_run_all_quick_writes_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERS_MGR_CACHE": os.environ.get("ADAPTERS_MGR_CACHE", "")}
    env = {k: v for k, v in env.items() if v != ""}
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (REPO / "BENCHMARKS_quick.md").read_text()
    for script in ("bench_catalog", "bench_concurrency", "bench_data", "bench_serving", "bench_training",
                   "bench_incremental", "bench_templates", "bench_drift_ceiling"):
        assert f"## {script} (ok" in report, script
    assert "## Targets" in report and ("met" in report or "MISSED" in report)
