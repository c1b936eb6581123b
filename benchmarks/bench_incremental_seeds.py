"""bench_incremental over several seeds, with paired verdicts: each strategy against the as-of prior
and the per-period bias model, per (seed, period), mean difference with a 95% t-interval.

    python benchmarks/bench_incremental_seeds.py                 # seeds 0,1,2 (3 processes, 1 thread each)
    python benchmarks/bench_incremental_seeds.py --quick         # tiny BERT + synthetic stream (CI)
    python benchmarks/bench_incremental_seeds.py --collect       # aggregate runs already written

Why: one seed moves every LoRA figure by several hundredths, while the targets are differences of a
few thousandths. A seed changes the initial adapters, every update's rows and init, and the eval
rows (so the pairs are (seed, period): all strategies of a pair scored the same rows). Each seed
is a whole ``bench_incremental.py`` run in its own process, written to
``results/incremental_seeds/seed<N>``; this script runs them (``--parallel`` at a time) and writes
``results/bench_incremental_seeds{_quick}.{json,md}``.
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

from benchmarks._common import RESULTS, machine, md_table, write_results  # noqa: E402
from benchmarks._stats import describe, fmt_paired, paired  # noqa: E402
from benchmarks.bench_incremental import INCREMENTAL, RANKER, RETRIEVER, SLICES, TARGETS  # noqa: E402


def run_seeds(seeds: list[int], parallel: int, quick: bool, extra: list[str], out: Path) -> dict[int, float]:
    """One bench_incremental process per seed, ``parallel`` at a time; returns each run's wall seconds."""
    pending = list(seeds)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    walls: dict[int, float] = {}
    while pending or running:
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            folder = out / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_incremental.py"), "--seed", str(seed),
                   "--out", str(folder), "--threads", "1", *(["--quick"] if quick else []), *extra]
            log = (folder / "run.log").open("w")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            running[seed] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                             time.perf_counter())
            print(f"seed {seed}: started ({' '.join(cmd[1:])})", flush=True)
        time.sleep(2)
        for seed, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                walls[seed] = time.perf_counter() - started
                del running[seed]
                print(f"seed {seed}: exit {proc.returncode} after {walls[seed]:.0f} s", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed} failed; see {out / f'seed{seed}' / 'run.log'}")
    return walls


def load(out: Path, seeds: list[int], quick: bool) -> dict[int, dict[str, Any]]:
    """Each seed's run; strategies a later ``--baselines-only`` run of the same seed added (baselines
    written after the BERT run began) are merged in: same seed, same eval rows."""
    stem = "bench_incremental_quick" if quick else "bench_incremental"
    runs = {}
    for seed in seeds:
        path = out / f"seed{seed}" / f"{stem}.json"
        if not path.exists():
            raise SystemExit(f"no result for seed {seed} at {path}; run without --collect")
        runs[seed] = json.loads(path.read_text())
        extra = out / f"seed{seed}" / f"{stem}_baselines.json"
        if extra.exists():
            more = json.loads(extra.read_text())
            for side in ("ranker", "retriever"):
                for key, entries in more["results"][side].items():
                    runs[seed]["results"][side].setdefault(key, entries)
    return runs


def per_pair(runs: dict[int, dict[str, Any]], side: str, key: str, metric: str) -> dict[tuple[int, int], float]:
    """(seed, period) -> the strategy's figure (missing and non-finite figures left out)."""
    out = {}
    for seed, run in runs.items():
        for e in run["results"][side].get(key, []):
            value = e["metrics"].get(metric)
            if isinstance(value, (int, float)) and value == value:
                out[(seed, e["period"])] = float(value)
    return out


def compare(a: dict[tuple[int, int], float], b: dict[tuple[int, int], float]) -> dict[str, Any] | None:
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    return paired([a[k] for k in common], [b[k] for k in common])


def aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ranker: dict[str, Any] = {}
    for key in RANKER:
        auc = per_pair(runs, "ranker", key, "auc")
        if not auc:
            continue
        seed_means = [describe([v for (s, _), v in auc.items() if s == seed])["mean"] for seed in runs
                      if any(s == seed for s, _ in auc)]
        row: dict[str, Any] = {"mean_auc": describe(list(auc.values()))["mean"], "seed_means": seed_means,
                               "seed_std": describe(seed_means)["std"]}
        for ref in ("p_prior", "g_bias", "a_stale"):
            if key != ref:
                row[f"vs_{ref}"] = compare(auc, per_pair(runs, "ranker", ref, "auc"))
        for sl in SLICES:
            mine = per_pair(runs, "ranker", key, f"auc_{sl}")
            row[f"mean_auc_{sl}"] = describe(list(mine.values()))["mean"] if mine else None
            if key != "p_prior":
                row[f"{sl}_vs_p_prior"] = compare(mine, per_pair(runs, "ranker", "p_prior", f"auc_{sl}"))
        ranker[key] = row
    if "o_oracle" in ranker and "p_prior" in ranker:  # drift stream: the share of the prior-to-oracle gap
        prior, oracle = per_pair(runs, "ranker", "p_prior", "auc"), per_pair(runs, "ranker", "o_oracle", "auc")
        for key, row in ranker.items():  # over the pairs the strategy ran in ((e), (f): the last period)
            mine = per_pair(runs, "ranker", key, "auc")
            common = [k for k in mine if k in prior and k in oracle]
            gap = sum(oracle[k] - prior[k] for k in common)
            row["gap_share"] = sum(mine[k] - prior[k] for k in common) / gap if common and gap > 0 else None
    retriever: dict[str, Any] = {}
    for key in RETRIEVER:
        ndcg = per_pair(runs, "retriever", key, "ndcg@10")
        if not ndcg:
            continue
        row = {"mean_ndcg@10": describe(list(ndcg.values()))["mean"]}
        for ref in ("g_popularity", "g_popularity_recent", "g_item_knn"):
            if key != ref:
                row[f"vs_{ref}"] = compare(ndcg, per_pair(runs, "retriever", ref, "ndcg@10"))
        retriever[key] = row
    return {"ranker": ranker, "retriever": retriever}


def verdicts(agg: dict[str, Any]) -> list[dict[str, Any]]:
    rk, rq = agg["ranker"], agg["retriever"]
    out: list[dict[str, Any]] = []
    policies = [k for k in rk if not k.startswith(("p_", "g_"))]  # the BERT policies
    inc = [k for k in INCREMENTAL if k in rk]
    if "p_prior" in rk and policies:
        worst = min(policies, key=lambda k: rk[k]["vs_p_prior"]["mean"])
        out.append({"target": f"floor: no policy below the as-of prior by more than {TARGETS['max_below_prior']} "
                              "mean AUC", "met": rk[worst]["vs_p_prior"]["mean"] >= -TARGETS["max_below_prior"],
                    "detail": f"worst {worst} {fmt_paired(rk[worst]['vs_p_prior'])}"})
    if "g_bias" in rk and policies:
        worst = min(policies, key=lambda k: rk[k]["vs_g_bias"]["mean"])
        out.append({"target": f"floor: every policy above the per-period bias model by >= {TARGETS['above_bias']}",
                    "met": rk[worst]["vs_g_bias"]["mean"] >= TARGETS["above_bias"],
                    "detail": f"worst {worst} {fmt_paired(rk[worst]['vs_g_bias'])}"})
    if "p_prior" in rk and inc:
        best = max(inc, key=lambda k: rk[k]["vs_p_prior"]["mean"])
        p = rk[best]["vs_p_prior"]
        out.append({"target": f"goal: best incremental beats the prior by >= {TARGETS['goal_vs_prior']} mean AUC, "
                              "95% interval above 0", "met": p["mean"] >= TARGETS["goal_vs_prior"] and p["low"] > 0,
                    "detail": f"{best} {fmt_paired(p)}"})
        cold = rk[best].get("cold_items_vs_p_prior")
        if cold:
            out.append({"target": f"goal: ... and by >= {TARGETS['goal_cold_vs_prior']} on cold items",
                        "met": cold["mean"] >= TARGETS["goal_cold_vs_prior"],
                        "detail": f"{best} {fmt_paired(cold)}"})
    if "o_oracle" in rk and inc:
        worst = min(inc, key=lambda k: (rk[k]["vs_a_stale"] or {}).get("wins", 0))
        p = rk[worst]["vs_a_stale"]
        out.append({"target": "floor (drift stream): every incremental policy beats the stale adapter in every "
                              "(seed, period)", "met": bool(p) and p["wins"] == p["n"],
                    "detail": ", ".join(f"{k} {rk[k]['vs_a_stale']['wins']}/{rk[k]['vs_a_stale']['n']}"
                                        for k in inc if rk[k].get("vs_a_stale"))})
        best = max(inc, key=lambda k: rk[k].get("gap_share") or -1e9)
        out.append({"target": "goal (drift stream): the best policy closes >= 50% of the prior-to-oracle gap",
                    "met": (rk[best].get("gap_share") or -1) >= 0.5,
                    "detail": f"prior {rk['p_prior']['mean_auc']:.4f}, oracle {rk['o_oracle']['mean_auc']:.4f}; "
                              + ", ".join(f"{k} {rk[k]['gap_share']:+.1%}" for k in rk
                                          if rk[k].get("gap_share") is not None and k != "o_oracle")})
    bert = [k for k in ("r_stale", "r_fresh", "r_warm_start") if k in rq]
    if bert:
        best = max(bert, key=lambda k: rq[k]["mean_ndcg@10"])
        for ref, kind in (("g_popularity", "floor"), ("g_item_knn", "goal")):
            p = rq[best].get(f"vs_{ref}")
            if p:
                out.append({"target": f"{kind}: best retriever's mean NDCG@10 >= {RETRIEVER[ref]}",
                            "met": p["mean"] >= 0, "detail": f"{best} {fmt_paired(p)}"})
    return out


def _shown(path: Path) -> str:
    """The per-seed folder as the results pages name it (relative to benchmarks/ when inside it)."""
    try:
        return str(Path(path).resolve().relative_to(RESULTS.parent))
    except ValueError:
        return str(path)


def render(payload: dict[str, Any]) -> str:
    agg, runs = payload["aggregate"], payload["runs"]
    md = [f"# Incremental benchmark over {len(payload['seeds'])} seeds"
          + (" (quick: figures meaningless)" if payload["quick"] else "") + "\n",
          f"Seeds {payload['seeds']}, each a whole `bench_incremental.py` run (1 torch thread, {payload['parallel']} "
          f"at a time on {payload['machine'].get('cpus')} CPUs; wall {payload['wall_s']:.0f} s). Pairs are "
          "(seed, period): every strategy of a pair scored the same eval rows. Differences: mean [95% t-interval] "
          f"(pairs where the strategy is higher / pairs). Per-seed runs: `{payload.get('out', 'results')}/seed<N>/`"
          + (f" (each seed's wall: {', '.join(f'{w:.0f} s' for w in payload['seed_wall_s'].values())})"
             if payload.get("seed_wall_s") else "") + ".\n",
          "## Ranker: next-period AUC\n"]
    rows = []
    for key, label in RANKER.items():
        r = agg["ranker"].get(key)
        if r is None:
            continue
        rows.append({"strategy": label, "mean AUC": f"{r['mean_auc']:.4f}", "std of seed means": f"{r['seed_std']:.4f}",
                     "− prior": fmt_paired(r["vs_p_prior"]) if r.get("vs_p_prior") else "–",
                     "− bias model": fmt_paired(r["vs_g_bias"]) if r.get("vs_g_bias") else "–",
                     **{f"AUC {sl.replace('_', ' ')}": (f"{r[f'mean_auc_{sl}']:.4f}" if r.get(f"mean_auc_{sl}")
                                                       is not None else "–") for sl in SLICES},
                     "cold items − prior": fmt_paired(r["cold_items_vs_p_prior"])
                     if r.get("cold_items_vs_p_prior") else "–",
                     **({"gap closed": f"{r['gap_share']:+.1%}" if r.get("gap_share") is not None else "–"}
                        if "o_oracle" in agg["ranker"] else {})})
    md.append(md_table(rows, list(rows[0])))
    md.append("## Retriever: next-period NDCG@10\n")
    rows = [{"strategy": label, "mean NDCG@10": f"{agg['retriever'][key]['mean_ndcg@10']:.4f}",
             "− popularity": fmt_paired(agg["retriever"][key]["vs_g_popularity"], 4)
             if agg["retriever"][key].get("vs_g_popularity") else "–",
             "− item-kNN": fmt_paired(agg["retriever"][key]["vs_g_item_knn"], 4)
             if agg["retriever"][key].get("vs_g_item_knn") else "–",
             "− decayed popularity": fmt_paired(agg["retriever"][key]["vs_g_popularity_recent"], 4)
             if agg["retriever"][key].get("vs_g_popularity_recent") else "–"}
            for key, label in RETRIEVER.items() if key in agg["retriever"]]
    md.append(md_table(rows, list(rows[0])))
    md.append("## Targets (issue 14)\n")
    md += [f"- **{'MET' if t['met'] else 'MISSED'}** — {t['target']}: {t['detail']}" for t in payload["targets"]]
    first = runs[str(payload["seeds"][0])] if str(payload["seeds"][0]) in runs else next(iter(runs.values()))
    md.append(f"\nConfiguration of every seed (besides `--seed`): {json.dumps(first['config'], default=str)}\n")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=3, help="runs at a time (each 1 torch thread)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--collect", action="store_true", help="aggregate existing runs only")
    ap.add_argument("--stream", choices=("movielens", "drift"), default="movielens",
                    help="passed to every run; drift: results under incremental_drift_seeds/, "
                         "bench_incremental_drift_seeds.*")
    ap.add_argument("--out", type=Path, default=None, help="default results/incremental{_drift}_seeds{_TAG}")
    ap.add_argument("--tag", default="", help="a variant's name: results/bench_incremental{_drift}_seeds_TAG.* "
                                              "(e.g. 'history' with --ranker-shape history), beside the default run's")
    args, extra = ap.parse_known_args()
    drift = args.stream == "drift"
    tag = f"_{args.tag}" if args.tag else ""
    args.out = args.out or RESULTS / (("incremental_drift_seeds" if drift else "incremental_seeds") + tag)
    extra = [*extra, "--stream", args.stream]
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    name = f"bench_incremental{'_drift' if drift else ''}_seeds{tag}{'_quick' if args.quick else ''}"
    earlier: dict[str, Any] = {}
    if args.collect and (RESULTS / f"{name}.json").exists():  # keep the walls the runs took, not the collect's
        earlier = json.loads((RESULTS / f"{name}.json").read_text())
    walls = earlier.get("seed_wall_s", {}) if args.collect else run_seeds(seeds, args.parallel, args.quick, extra,
                                                                         args.out)
    runs = load(args.out, seeds, args.quick)
    agg = aggregate(runs)
    targets = verdicts(agg)
    if drift:  # the prior, bias-model, cold-item and retriever targets are the ML-100K stream's; the drift has its own
        targets = [t for t in targets if "(drift stream)" in t["target"]]
    payload = {"machine": machine(), "quick": args.quick, "stream": args.stream, "seeds": seeds,
               "parallel": args.parallel, "out": _shown(args.out),
               "extra_args": extra, "seed_wall_s": walls, "aggregate": agg, "targets": targets,
               "runs": {str(s): {"config": r["config"], "summary": r["summary"]} for s, r in runs.items()},
               "wall_s": earlier.get("wall_s", time.perf_counter() - started)}
    json_path, md_path = write_results(name, payload, render(payload))
    print(Path(md_path).read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
