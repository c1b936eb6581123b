"""Benchmark: data sync throughput vs a bare DuckDB load + DISTINCT of the same files.

    python benchmarks/bench_data.py --quick          # 200k rows
    python benchmarks/bench_data.py --rows 10000000  # the target: >= 1M rows/s, within 3x of bare DuckDB
    python benchmarks/bench_data.py --same-rows 0    # skip the identical-rows memory run

Two synthetic sources (Parquet with epoch ms, CSV with ISO times in three zone styles), 1% duplicates
(exact and cross-source) and 1% bad rows of every kind, plus user and item entity sources. Both
runs read the same files in one process, one after the other; DuckDB threads are limited to
--threads (default 2, the target machine). Peak memory is the process's max RSS.
--repeat N alternates N bare runs and N syncs (each into a fresh catalog) and reports the median
of each, with every run listed: on a shared machine one pair can be off by 25% either way.
--same-rows N (default 13,100,000; 1,000,000 with --quick) then syncs a gzip of N identical rows
in a child process and reports its peak RSS (target <= 2 GB) and time: one kept row, every other
one an exact duplicate.
Writes benchmarks/results/bench_data.json and bench_data.md (bench_data_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_mgr.catalog.db import Catalog  # noqa: E402
from adapters_mgr.data import synthetic  # noqa: E402
from adapters_mgr.data.api import DataAPI  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process so far: on a shared machine a steadier measure than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bare_duckdb(files: dict[str, Path], threads: int) -> tuple[float, int]:
    """The baseline: load both event files and DISTINCT their rows in a fresh DuckDB file."""
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect(str(Path(tmp) / "bare.duckdb"))
        con.execute(f"SET threads = {threads}")
        t0 = time.perf_counter()
        con.execute(
            f"""
            CREATE TABLE t AS SELECT DISTINCT * FROM (
                SELECT CAST(user_id AS VARCHAR) AS u, CAST(item_id AS VARCHAR) AS i, CAST(rating AS VARCHAR) AS r,
                       CAST(ts AS VARCHAR) AS ts, event_id AS e FROM read_parquet('{files['a']}')
                UNION ALL
                SELECT uid, mid, stars, time, event_ref FROM read_csv('{files['b']}', all_varchar = true))
            """
        )
        con.execute("CHECKPOINT")
        elapsed = time.perf_counter() - t0
        n = con.execute("SELECT count(*) FROM t").fetchone()[0]
        con.close()
    return elapsed, int(n)


SAME_ROWS_TARGET_MB = 2048
_SAME_ROWS_CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data.api import DataAPI
root, path, threads = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
api = DataAPI(Catalog(root / "catalog.duckdb"), root)
with api.catalog.connect() as con:
    con.execute(f"SET threads = {threads}")
api.add_source("same", path, ts_format="epoch_s")
t0 = time.perf_counter()
[bid] = api.sync()
sync_s = time.perf_counter() - t0
b = api.batch(bid)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (the benchmark, ~2 GB)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"sync_s": round(sync_s, 2), "rows_in": b["rows_in"], "kept": b["rows_kept"],
                  "duplicates": b["rows_duplicate"], "quarantined": b["rows_quarantined"],
                  "peak_rss_mb": round(hwm / 1024, 1)}))
"""


def same_rows_run(rows: int, work: Path, threads: int) -> dict:
    """Sync a gzip of ``rows`` identical rows in a child process (its own peak RSS, nothing else's)."""
    path = work / "same.csv.gz"
    line, block = b"u1,i1,4,1700000000\n", 1_000_000
    with gzip.open(path, "wb") as fh:
        fh.write(b"user_id,item_id,rating,ts\n")
        for start in range(0, rows, block):
            fh.write(line * min(block, rows - start))
    out = subprocess.run([sys.executable, "-c", _SAME_ROWS_CHILD, str(Path(__file__).resolve().parents[1]),
                          str(work / "same_root"), str(path), str(threads)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(rows=rows, gzip_bytes=path.stat().st_size, target_peak_rss_mb=SAME_ROWS_TARGET_MB,
                  accounted=result["rows_in"] == rows == result["kept"] + result["duplicates"] + result["quarantined"]
                  and result["kept"] == 1,
                  meets_memory_target=result["peak_rss_mb"] <= SAME_ROWS_TARGET_MB)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--quick", action="store_true", help="200k rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="alternate N bare runs and N syncs; report medians")
    ap.add_argument("--same-rows", type=int, default=None,
                    help="identical rows in the memory run (default 13.1M, 1M with --quick; 0: skip it)")
    args = ap.parse_args()
    rows = 200_000 if args.quick else args.rows
    same_rows = args.same_rows if args.same_rows is not None else (1_000_000 if args.quick else 13_100_000)
    os.environ.setdefault("DUCKDB_THREADS", str(args.threads))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        syn = synthetic.generate(work / "files", rows=rows, users=max(1000, rows // 1000), items=max(500, rows // 5000),
                                 seed=0)
        gen_s = time.perf_counter() - t0
        runs, bare_rss = [], 0.0
        for k in range(max(1, args.repeat)):
            c0 = cpu_s()
            bare_s, bare_rows = bare_duckdb(syn.files, args.threads)
            bare_cpu = cpu_s() - c0
            if k == 0:
                bare_rss = peak_rss_mb()
            root = work / f"root{k}"
            api = DataAPI(Catalog(root / "catalog.duckdb"), root)
            with api.catalog.connect() as con:  # create the schema outside the timed region; same threads as bare
                con.execute(f"SET threads = {args.threads}")
            syn.register(api)
            c0 = cpu_s()
            t0 = time.perf_counter()
            ids = api.sync()
            sync_s = time.perf_counter() - t0
            sync_cpu = cpu_s() - c0
            runs.append({"sync_s": round(sync_s, 3), "sync_cpu_s": round(sync_cpu, 2), "bare_s": round(bare_s, 3),
                         "bare_cpu_s": round(bare_cpu, 2), "load_avg_1m": round(os.getloadavg()[0], 2)})
            if k + 1 < args.repeat:
                shutil.rmtree(root, ignore_errors=True)
        sync_s, sync_cpu, bare_s, bare_cpu = (statistics.median(r[key] for r in runs)
                                              for key in ("sync_s", "sync_cpu_s", "bare_s", "bare_cpu_s"))
        t0 = time.perf_counter()
        again = api.sync()
        resync_s = time.perf_counter() - t0
        same = same_rows_run(same_rows, work, args.threads) if same_rows > 0 else None
        b = api.batch(ids[0])
        ok = (b["rows_in"] == b["rows_kept"] + b["rows_quarantined"] + b["rows_duplicate"] == rows
              and b["duplicates_by_kind"] == syn.truth["duplicates_by_kind"]
              and b["quarantined_by_rule"] == syn.truth["bad_by_rule"] and again == [])
        result = {
            "rows": rows, "threads": args.threads, "generate_s": round(gen_s, 3),
            "sync_s": round(sync_s, 3), "sync_rows_per_s": round(rows / sync_s),
            "bare_duckdb_s": round(bare_s, 3), "bare_rows_per_s": round(rows / bare_s), "bare_distinct_rows": bare_rows,
            "ratio_sync_vs_bare": round(sync_s / bare_s, 2), "resync_noop_s": round(resync_s, 3),
            "sync_cpu_s": round(sync_cpu, 2), "bare_cpu_s": round(bare_cpu, 2),
            "cpu_ratio_sync_vs_bare": round(sync_cpu / bare_cpu, 2), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "kept": b["rows_kept"], "quarantined": b["rows_quarantined"], "duplicates": b["rows_duplicate"],
            "quarantined_by_rule": b["quarantined_by_rule"], "duplicates_by_kind": b["duplicates_by_kind"],
            "accounting_matches_truth": ok, "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_mb_after_bare": round(bare_rss, 1),
            "target_rows_per_s": 1_000_000, "target_ratio": 3.0,
            "meets_throughput_target": rows / sync_s >= 1_000_000, "meets_ratio_target": sync_s / bare_s <= 3.0,
            "meets_targets": rows / sync_s >= 1_000_000 and sync_s / bare_s <= 3.0,
            "repeat": len(runs), "runs": runs, "same_rows": same,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()} {platform.release()}",
            "python": platform.python_version(), "duckdb": duckdb.__version__,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_data_quick" if args.quick else "bench_data"  # a quick run never overwrites the full figures
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Data sync benchmark", "",
        f"{rows:,} synthetic rows from two sources (1% duplicates, 1% bad rows), DuckDB threads={args.threads}, "
        f"{result['machine']}, DuckDB {duckdb.__version__}.", "",
        "| run | seconds | rows/s | CPU seconds |", "|---|---:|---:|---:|",
        f"| adapters-mgr `sync` (clean, dedup, quarantine, batch, digest) | {sync_s:.2f} | {rows / sync_s:,.0f} "
        f"| {sync_cpu:.2f} |",
        f"| bare DuckDB load + DISTINCT | {bare_s:.2f} | {rows / bare_s:,.0f} | {bare_cpu:.2f} |",
        f"| re-sync, nothing new | {resync_s:.3f} | - | - |", "",
        *([f"Figures above are medians of {len(runs)} alternating runs; each run (sync s / CPU s, "
           "bare s / CPU s, 1-minute load): "
           + "; ".join(f"{r['sync_s']:.2f} / {r['sync_cpu_s']:.2f}, {r['bare_s']:.2f} / {r['bare_cpu_s']:.2f}, "
                       f"{r['load_avg_1m']}" for r in runs) + ".", ""] if len(runs) > 1 else []),
        f"Ratio sync / bare: **{sync_s / bare_s:.2f}x** (target <= 3x: "
        f"**{'met' if result['meets_ratio_target'] else 'not met'}**); throughput target >= 1,000,000 rows/s: "
        f"**{'met' if result['meets_throughput_target'] else 'not met'}** (the bare run itself: "
        f"{rows / bare_s:,.0f} rows/s). CPU-time ratio {result['cpu_ratio_sync_vs_bare']}x "
        f"(1-minute load average at the end: {result['load_avg_1m_at_end']}; the machine is shared). "
        f"Peak RSS {result['peak_rss_mb']:.0f} MB (after the bare run: {bare_rss:.0f} MB). "
        f"Accounting matches the injected truth: {ok}.", "",
        *([f"Identical rows: a {same['gzip_bytes'] / 1024:,.0f} KB gzip of {same['rows']:,} identical rows synced "
           f"in {same['sync_s']:.1f} s with a peak RSS of **{same['peak_rss_mb']:,.0f} MB** (target <= "
           f"{SAME_ROWS_TARGET_MB} MB: **{'met' if same['meets_memory_target'] else 'not met'}**); "
           f"{same['kept']} row kept, {same['duplicates']:,} duplicates, accounting exact: {same['accounted']}.", ""]
          if same else []),
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
