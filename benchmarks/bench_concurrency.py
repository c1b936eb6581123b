"""Fair waiting under concurrent writers: N processes registering and promoting one alias at once.

Every writer loops: build a LoRA on a tiny BERT (not timed), ``register`` it, ``promote`` it to
``production`` (each call timed). The same worker processes run every phase, side by side in one
run: the catalog's kernel queue (``<catalog>.lock``, the default) against the back-off-only waiting
of before (``ADAPTERS_MGR_LOCK_QUEUE=0``, the code path of git HEAD before the queue), with 4 and 8
writers, phases interleaved. After each phase the catalog is checked: every registration present
once (versions 1..N), every promotion in the alias history with no broken link, ``verify`` clean.

Each process's first calls are cold (lazy imports of the workflow modules, peft's first save, the
base hash): they run together in a phase of their own and are reported apart, with the start-up.

    python benchmarks/bench_concurrency.py            # 4 and 8 writers, 60 s a phase
    python benchmarks/bench_concurrency.py --quick    # 4 writers, 3 s a phase (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, md_table, write_results  # noqa: E402

TARGETS = {"p99_ms": 1000.0, "max_ms": 3000.0}
MODES = {"back-off (before)": False, "queue (after)": True}


# -- the worker process --------------------------------------------------------------------------
def _lora(base: Any, seed: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    from adapters_mgr.lora.quiet import known_warnings_silenced

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                        init_lora_weights=False)
    with known_warnings_silenced():
        return get_peft_model(base, config).eval()


def _write_loop(base: Any, worker: int, cmd: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Register + promote until the deadline; each call's latency, the errors, the base for next time."""
    from adapters_mgr import AdapterManager

    mgr = AdapterManager(cmd["root"], lock_timeout=120)
    mgr.catalog.queue = cmd["queue"]
    samples: list[tuple[str, float]] = []
    errors: list[str] = []
    registered = promoted = 0
    time.sleep(max(0.0, cmd["start"] - time.time()))
    seed = 1_000_000 * (cmd["phase"] + 1) + 1_000 * worker
    while True:
        model = _lora(base, seed)
        seed += 1
        try:
            started = time.perf_counter()
            node = mgr.register(model, name="shared", metrics={"worker": worker})
            samples.append(("register", time.perf_counter() - started))
            registered += 1
            started = time.perf_counter()
            mgr.promote(node, "production")
            samples.append(("promote", time.perf_counter() - started))
            promoted += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported: a lost write
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
        base = model.unload()
        if cmd.get("once") or time.time() >= cmd["deadline"]:
            break
    return base, {"samples": samples, "errors": errors, "registered": registered, "promoted": promoted}


def worker_main(worker: int, launched: float) -> None:
    """Start up (timed), say ready, then run the phases the parent sends as JSON lines on stdin."""
    started = time.perf_counter()
    import adapters_mgr  # noqa: F401 - timed: the catalog-only import the CLI pays
    imported = time.perf_counter()
    import torch

    from adapters_mgr.lora.testing import tiny_base

    torch.set_num_threads(1)
    base = tiny_base(seed=0)
    ready = time.perf_counter()
    print(json.dumps({"ready": worker, "interpreter_s": max(0.0, time.time() - launched - (ready - started)),
                      "import_adapters_mgr_s": imported - started, "import_torch_model_s": ready - imported}),
          flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            return
        base, result = _write_loop(base, worker, cmd)
        print(json.dumps(result), flush=True)


# -- the parent ---------------------------------------------------------------------------------
class Workers:
    """Worker processes kept for the whole run (start-up paid once, reported apart)."""

    def __init__(self, n: int, log_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        env.pop("ADAPTERS_MGR_LOCK_QUEUE", None)
        self.logs = [log_dir / f"worker{i}.log" for i in range(n)]
        self.procs = [
            subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--launched", repr(time.time())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logs[i].open("w"),
                             text=True, cwd=ROOT, env=env)
            for i in range(n)
        ]
        self.startup = [self._reply(i) for i in range(n)]

    def _reply(self, i: int) -> dict[str, Any]:
        line = self.procs[i].stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"worker {i} died: {self.logs[i].read_text()[-2000:]}")
        return json.loads(line)

    def run(self, n: int, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for proc in self.procs[:n]:
            proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        return [self._reply(i) for i in range(n)]

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(json.dumps({"quit": True}) + "\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _fresh_catalog(scratch: Path, name: str) -> Path:
    from adapters_mgr import AdapterManager
    from adapters_mgr.lora.testing import tiny_base

    root = scratch / name
    mgr = AdapterManager(root)
    mgr.init()
    mgr.register_base(tiny_base(seed=0), name="tiny-bert")
    return root


def check_catalog(root: Path, replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Nothing lost: every write the workers saw succeed is in the catalog, in an unbroken history."""
    from adapters_mgr import AdapterManager

    mgr = AdapterManager(root)
    registered = sum(r["registered"] for r in replies)
    promoted = sum(r["promoted"] for r in replies)
    adapters = mgr.list(name="shared")
    history = mgr.alias_history("production")
    moves = [h for h in history if h["action"] == "promote"]
    broken = sum(cur["from_id"] != prev["to_id"] for prev, cur in zip(history, history[1:], strict=False))
    versions_ok = sorted(a.version for a in adapters) == list(range(1, registered + 1))
    current_ok = not history or mgr.get("production").id == history[-1]["to_id"]
    verify_ok = bool(mgr.verify()["ok"])
    errors = [e for r in replies for e in r["errors"]]
    lost = (registered - len(adapters)) + (promoted - len(moves)) + len(errors)
    return {"registered": registered, "promoted": promoted, "in_catalog": len(adapters),
            "promotions_in_history": len(moves), "broken_links": broken, "versions_1_to_n": versions_ok,
            "alias_current": current_ok, "verify_ok": verify_ok, "errors": errors[:5], "lost": lost,
            "ok": lost == 0 and broken == 0 and versions_ok and current_ok and verify_ok}


def _pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))] if sorted_ms else float("nan")


def latency_stats(replies: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    ms = sorted(s * 1e3 for r in replies for _, s in r["samples"])
    per_worker = [sorted(s * 1e3 for _, s in r["samples"]) for r in replies]
    return {
        "writes": len(ms), "writes_per_s": len(ms) / seconds if seconds else 0.0,
        "p50_ms": _pct(ms, 0.5), "p90_ms": _pct(ms, 0.9), "p99_ms": _pct(ms, 0.99), "max_ms": ms[-1] if ms else 0.0,
        "register_p99_ms": _pct(sorted(s * 1e3 for r in replies for op, s in r["samples"] if op == "register"), 0.99),
        "promote_p99_ms": _pct(sorted(s * 1e3 for r in replies for op, s in r["samples"] if op == "promote"), 0.99),
        "per_worker_writes": [len(w) for w in per_worker],
        "per_worker_p99_ms": [_pct(w, 0.99) for w in per_worker],
        "per_worker_max_ms": [w[-1] if w else 0.0 for w in per_worker],
    }


def run_phases(workers: Workers, scratch: Path, writer_counts: list[int], seconds: float,
               rounds: int) -> list[dict[str, Any]]:
    """Every (writers, mode) phase ``rounds`` times, the mode order alternating round by round."""
    rows = []
    phase = 0
    for r in range(rounds):
        for n in writer_counts:
            modes = list(MODES.items()) if r % 2 == 0 else list(MODES.items())[::-1]
            for label, queue in modes:
                phase += 1
                root = _fresh_catalog(scratch, f"phase{phase}")
                start = time.time() + 0.5
                replies = workers.run(n, {"phase": phase, "root": str(root), "queue": queue, "start": start,
                                          "deadline": start + seconds})
                stats = latency_stats(replies, seconds)
                check = check_catalog(root, replies)
                rows.append({"round": r + 1, "writers": n, "mode": label, "queue": queue, "seconds": seconds,
                             **stats, "check": check})
                print(f"  round {r + 1}, {n} writers, {label}: {stats['writes']} writes, p50 {stats['p50_ms']:.0f} "
                      f"ms, p99 {stats['p99_ms']:.0f} ms, max {stats['max_ms']:.0f} ms, "
                      f"{'nothing lost' if check['ok'] else 'CHECK FAILED ' + json.dumps(check)}", flush=True)
    return rows


def cold_phase(workers: Workers, scratch: Path) -> list[dict[str, Any]]:
    """Every worker's first register + promote, all at once (queue on): lazy imports, first save, base hash."""
    root = _fresh_catalog(scratch, "cold")
    replies = workers.run(len(workers.procs), {"phase": 0, "root": str(root), "queue": True,
                                                "start": time.time() + 0.2, "deadline": 0, "once": True})
    check = check_catalog(root, replies)
    out = []
    for i, (boot, reply) in enumerate(zip(workers.startup, replies, strict=True)):
        calls = dict(reply["samples"])
        out.append({"worker": i, **{k: v for k, v in boot.items() if k != "ready"},
                    "first_register_ms": calls.get("register", float("nan")) * 1e3,
                    "first_promote_ms": calls.get("promote", float("nan")) * 1e3, "check_ok": check["ok"]})
    return out


def _summary(rows: list[dict[str, Any]], key: str) -> dict[tuple[int, str], list[float]]:
    out: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        out.setdefault((row["writers"], row["mode"]), []).append(row[key])
    return out


def _spread(values: list[float]) -> str:
    return f"{min(values):.0f}–{max(values):.0f}" if values else ""


def report(rows: list[dict[str, Any]], cold: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict, str]:
    targets = []
    after4 = [r for r in rows if r["writers"] == 4 and r["queue"]]
    if after4:
        worst_p99 = max(r["p99_ms"] for r in after4)
        worst_max = max(r["max_ms"] for r in after4)
        targets += [
            {"target": "4 writers, queue: p99 write latency (worst round)", "limit_ms": TARGETS["p99_ms"],
             "measured_ms": worst_p99, "met": worst_p99 <= TARGETS["p99_ms"]},
            {"target": "4 writers, queue: max write latency (worst round)", "limit_ms": TARGETS["max_ms"],
             "measured_ms": worst_max, "met": worst_max <= TARGETS["max_ms"]},
        ]
    lost = sum(r["check"]["lost"] for r in rows)
    all_ok = all(r["check"]["ok"] for r in rows) and all(c["check_ok"] for c in cold)
    targets.append({"target": "none lost, history unbroken, verify clean (every phase)", "limit": 0,
                    "measured": lost, "met": all_ok})
    payload = {"machine": machine(), "quick": args.quick, "seconds": args.seconds, "rounds": args.rounds,
               "phases": rows, "cold": cold, "targets": targets}

    table = []
    for row in rows:
        table.append({
            "round": row["round"], "writers": row["writers"], "waiting": row["mode"], "writes": row["writes"],
            "writes/s": row["writes_per_s"], "p50 ms": row["p50_ms"], "p90 ms": row["p90_ms"],
            "p99 ms": row["p99_ms"], "max ms": row["max_ms"],
            "writes per worker": _spread(row["per_worker_writes"]),
            "p99 per worker ms": _spread(row["per_worker_p99_ms"]),
            "lost": row["check"]["lost"], "verify": "clean" if row["check"]["verify_ok"] else "PROBLEMS",
        })
    ratios = []
    p99s, maxes = _summary(rows, "p99_ms"), _summary(rows, "max_ms")
    for n in sorted({r["writers"] for r in rows}):
        before, after = p99s.get((n, "back-off (before)")), p99s.get((n, "queue (after)"))
        if before and after:
            ratios.append({"writers": n, "p99 before / after": statistics.median(before) / statistics.median(after),
                           "max before / after": statistics.median(maxes[(n, "back-off (before)")])
                           / statistics.median(maxes[(n, "queue (after)")]),
                           "p99 ms before (rounds)": ", ".join(f"{v:.0f}" for v in before),
                           "p99 ms after (rounds)": ", ".join(f"{v:.0f}" for v in after)})
    md = "# Concurrent writers: fair waiting\n\n"
    md += (f"{len(cold)} worker processes on {payload['machine']['cpus']} CPUs; each phase {args.seconds:g} s of "
           "register + promote on one alias per writer, into a fresh catalog; phases interleaved, the mode order "
           "alternating by round. A write is one `register` or one `promote` call; each worker's first (cold) "
           "calls are in their own phase below.\n\n")
    md += md_table(table, list(table[0]))
    if ratios:
        md += "\n" + md_table(ratios, list(ratios[0]))
    md += "\n" + md_table([{**t, "met": "met" if t["met"] else "MISSED"} for t in targets],
                          ["target", "limit_ms", "measured_ms", "limit", "measured", "met"])
    md += ("\n## Cold start, all workers at once\n\n"
           "Start-up before the first call (interpreter, `import adapters_mgr`, then torch + transformers + peft "
           "and the tiny base), then the first `register` and `promote`, all workers together (queue on).\n\n")
    md += md_table([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in c.items()} for c in cold],
                   ["worker", "interpreter_s", "import_adapters_mgr_s", "import_torch_model_s",
                    "first_register_ms", "first_promote_ms"])
    return payload, md


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 writers, 3 s a phase, one round")
    parser.add_argument("--seconds", type=float, default=None, help="length of a phase (default 60; quick 3)")
    parser.add_argument("--writers", default=None, help="comma-separated writer counts (default 4,8; quick 4)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every phase, mode order alternating")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args.worker, args.launched)
        return 0
    args.seconds = args.seconds or (3.0 if args.quick else 60.0)
    counts = [int(n) for n in (args.writers or ("4" if args.quick else "4,8")).split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        scratch = Path(tmp)
        print(f"starting {max(counts)} workers ...", flush=True)
        workers = Workers(max(counts), scratch)
        try:
            cold = cold_phase(workers, scratch)
            print("  cold first calls (ms): " + ", ".join(f"{c['first_register_ms']:.0f}+{c['first_promote_ms']:.0f}"
                                                         for c in cold), flush=True)
            rows = run_phases(workers, scratch, counts, args.seconds, args.rounds)
        finally:
            workers.close()
    payload, md = report(rows, cold, args)
    json_path, md_path = write_results("bench_concurrency_quick" if args.quick else "bench_concurrency", payload, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(t["met"] for t in payload["targets"][-1:]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
