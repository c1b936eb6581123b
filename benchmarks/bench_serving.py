"""Serving benchmark on the embedded MiniLM BERT: switch latency, scoring throughput, merge time.

(a) switch latency between ranker adapters WITH a classification head (LoRA r=8 on query/value +
    ``modules_to_save`` classifier): this project's hot swap (``HotSwapModel.activate``: warm = the
    adapter's tensors cached, cold = read + hash + fold, fold only = a prepared node) vs peft
    ``load_adapter`` + ``set_adapter`` vs peft ``hotswap_adapter`` vs reloading base + adapter from disk;
(b) ranker scoring throughput with 1, 4 and 16 stacked adapters (weights mode): unfolded (peft
    multi-adapter, ``ScoringModel``) vs folded (``HotSwapModel``) vs the bare base;
(c) merge time per method (``merge_adapters``) for 2, 8 and 32 adapters;
(d) recompute recommendations for MovieLens users: the lead's part, see ``part_d_recompute``.

    python benchmarks/bench_serving.py            # MiniLM -> results/bench_serving.{json,md,png}
    python benchmarks/bench_serving.py --quick    # tiny random BERT, few repeats (~1 min) -> bench_serving_quick.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import RESULTS, machine, md_table, samples_ms, timeit, write_results  # noqa: E402

TARGETS = {"switch_p50_ms": 2.0, "speedup_vs_load_set": 10.0, "folded_vs_bare": 0.97}
METHOD_ARGS: dict[str, dict[str, Any]] = {
    "cat": {}, "svd": {"target_rank": 8}, "linear": {}, "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
}


# -- setup ---------------------------------------------------------------------------------------------
class Setup:
    """Base factory, tokenizer and N adapter folders (random LoRA factors + random head each)."""

    def __init__(self, quick: bool, workdir: Path, n_adapters: int) -> None:
        from adapters_mgr.lora.base_model import quiet_transformers

        quiet_transformers()
        self.quick = quick
        self.workdir = workdir
        if quick:
            from adapters_mgr.lora.testing import tiny_tokenizer

            self.tokenizer = tiny_tokenizer(workdir / "tok")
            self.model_name = "tiny random BERT (2 layers, hidden 32)"
            self.base_path = None
        else:
            from adapters_mgr.lora.base_model import embedded_model_path, load_tokenizer

            self.base_path = str(embedded_model_path())
            self.tokenizer = load_tokenizer(self.base_path)
            self.model_name = "all-MiniLM-L6-v2 (embedded, 6 layers, hidden 384)"
        self.folders = make_adapters(self.base(), workdir / "adapters", n_adapters, r=8)

    def base(self) -> torch.nn.Module:
        """A freshly loaded frozen 2-label sequence classifier (from disk for MiniLM)."""
        if self.quick:
            from adapters_mgr.lora.testing import tiny_base

            return tiny_base("seq_cls")
        from adapters_mgr.lora.base_model import HeadSpec, load_base_model

        return load_base_model(self.base_path, HeadSpec("seq_cls"))


def make_adapters(base: torch.nn.Module, root: Path, n: int, r: int) -> list[Path]:
    """One peft-saved template, then n folders with seeded random factors and heads (same config)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    template = root / "template"
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], task_type="SEQ_CLS")
    get_peft_model(base, config).save_pretrained(str(template))
    state = load_file(str(template / "adapter_model.safetensors"))
    folders = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        new = {}
        for key, tensor in state.items():
            std = 0.02 if "lora_A" in key else (0.01 if "lora_B" in key else 0.05)
            new[key] = (torch.randn(tensor.shape, generator=g) * std).contiguous()
        folder = root / f"a{i:02d}"
        folder.mkdir(parents=True)
        save_file(new, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(template / "adapter_config.json", folder / "adapter_config.json")
        folders.append(folder)
    return folders


def pair_texts(n: int, quick: bool) -> tuple[list[str], list[str]]:
    if quick:
        return ([f"user {i % 9} age {20 + i % 7} likes jazz" for i in range(n)],
                [f"item {i % 13} genre rock song" for i in range(n)])
    occupations = ["writer", "engineer", "student", "artist", "doctor", "programmer", "educator"]
    genres = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Sci-Fi", "Children's", "Animation"]
    users = [f"user: age {18 + i % 40}, gender {'MF'[i % 2]}, occupation {occupations[i % 7]}; liked recently: "
             f"Toy Story (1995), Heat (1995), Casino (1995), Sabrina (1995)" for i in range(n)]
    items = [f"movie: Example Title {i} ({1950 + i % 50}); genres: {genres[i % 8]}, {genres[(i + 3) % 8]}"
             for i in range(n)]
    return users, items


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": statistics.median(s), "p90_ms": s[min(len(s) - 1, int(0.9 * len(s)))], "min_ms": s[0],
            "mean_ms": statistics.fmean(s), "runs": len(s)}


# -- (a) switch latency ------------------------------------------------------------------------------------
def part_a_switch(setup: Setup, repeat: int) -> dict[str, Any]:
    from peft import PeftModel

    from adapters_mgr.serving.engine import AdapterCache, HotSwapModel

    folders = setup.folders[:8]
    out: dict[str, Any] = {}

    engine = HotSwapModel(setup.base(), setup.tokenizer, "ranker")
    for f in folders:  # warm the tensor cache
        engine.activate([(f, 1.0)], label=str(f))
    k = iter(range(10**9))
    out["hot_swap_warm"] = timeit(lambda: engine.activate([(folders[next(k) % len(folders)], 1.0)]),
                                  repeat=repeat * 5, warmup=3)
    prepared = [engine.prepare([(f, 1.0)], label=i) for i, f in enumerate(folders)]
    k2 = iter(range(10**9))
    out["hot_swap_fold_only"] = timeit(lambda: engine.activate(prepared[next(k2) % len(prepared)]),
                                       repeat=repeat * 5, warmup=3)

    def cold() -> None:
        engine.cache = AdapterCache()
        engine._nodes.clear()  # noqa: SLF001 - measuring the uncached path on purpose
        engine.activate([(folders[next(k) % len(folders)], 1.0)])

    out["hot_swap_cold"] = timeit(cold, repeat=repeat * 2, warmup=2)
    out["read_safetensors_file"] = timeit(lambda: (folders[0] / "adapter_model.safetensors").read_bytes(),
                                          repeat=repeat * 2, warmup=1)
    engine.release()

    model = PeftModel.from_pretrained(setup.base(), str(folders[0]), adapter_name="a0").eval()
    names = ["a0"]
    samples = []
    for i in range(1, repeat + 3):
        name = f"a{i}"
        start = time.perf_counter()
        model.load_adapter(str(folders[i % len(folders)]), adapter_name=name)
        model.set_adapter(name)
        samples.append((time.perf_counter() - start) * 1e3)
        model.delete_adapter(names.pop())
        names.append(name)
    out["peft_load_adapter_set_adapter"] = summary(samples[2:])

    try:
        from peft.utils.hotswap import hotswap_adapter

        hot = PeftModel.from_pretrained(setup.base(), str(folders[0])).eval()
        k3 = iter(range(1, 10**9))
        out["peft_hotswap_adapter"] = timeit(
            lambda: hotswap_adapter(hot, str(folders[next(k3) % len(folders)]), adapter_name="default"),
            repeat=repeat, warmup=1)
    except Exception as exc:  # noqa: BLE001 - recorded honestly (peft#3581: KeyError on the classifier head)
        out["peft_hotswap_adapter"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    def reload() -> None:
        PeftModel.from_pretrained(setup.base(), str(folders[1])).eval()

    out["reload_base_and_adapter"] = timeit(reload, repeat=max(3, repeat // 2), warmup=1)
    return out


# -- (b) throughput -----------------------------------------------------------------------------------------
def part_b_throughput(setup: Setup, n_pairs: int, repeat: int, stacks: tuple[int, ...]) -> list[dict[str, Any]]:
    from adapters_mgr.lora.peft_scoring import ScoringModel
    from adapters_mgr.serving.engine import HotSwapModel

    users, items = pair_texts(n_pairs, setup.quick)
    engine = HotSwapModel(setup.base(), setup.tokenizer, "ranker", batch_size=n_pairs)
    unfolded_base = setup.base()
    rows = []
    for k in stacks:
        pairs = [(f, 1.0 / k) for f in setup.folders[:k]]
        scorer = ScoringModel(unfolded_base, setup.tokenizer, "ranker", pairs, batch_size=n_pairs)
        folded_node = engine.prepare(pairs, label=f"stack{k}")
        engine.activate(folded_node)
        engine.score_pairs(users, items)  # warm-up
        scorer.score_pairs(users, items)
        times: dict[str, list[float]] = {"bare": [], "folded": [], "unfolded": []}
        def engine_score() -> Any:
            return engine.score_pairs(users, items)

        switch = {"bare": lambda: engine.activate(None), "folded": lambda: engine.activate(folded_node),  # noqa: B023
                  "unfolded": lambda: None}
        score = {"bare": engine_score, "folded": engine_score,
                 "unfolded": lambda: scorer.score_pairs(users, items)}  # noqa: B023
        order = list(switch)
        for rep in range(repeat):  # interleaved, rotating order: machine drift hits all three alike
            for name in order[rep % 3:] + order[:rep % 3]:
                switch[name]()  # the switch is not timed here; only the request is
                times[name] += samples_ms(score[name], 1)
        scorer.release()
        bare, folded, unfolded = times["bare"], times["folded"], times["unfolded"]
        # best-of-n: on a shared, oversubscribed CPU the minimum is the least noisy estimate of the
        # intrinsic cost (folded and bare run the very same ops); medians are reported next to it
        best = {name: min(s) for name, s in (("bare", bare), ("folded", folded), ("unfolded", unfolded))}
        med = {name: statistics.median(s) for name, s in (("bare", bare), ("folded", folded), ("unfolded", unfolded))}
        rows.append({
            "adapters": k, "pairs": n_pairs, "runs": repeat,
            "bare_pairs_per_s": n_pairs / best["bare"] * 1e3,
            "folded_pairs_per_s": n_pairs / best["folded"] * 1e3,
            "unfolded_pairs_per_s": n_pairs / best["unfolded"] * 1e3,
            "folded_vs_bare": best["bare"] / best["folded"],
            "unfolded_vs_bare": best["bare"] / best["unfolded"],
            "folded_vs_bare_median": med["bare"] / med["folded"],
            "unfolded_vs_bare_median": med["bare"] / med["unfolded"],
        })
        print(f"  (b) {k:2d} adapters: {rows[-1]}", flush=True)
    engine.release()
    return rows


# -- (c) merge time -------------------------------------------------------------------------------------------
def part_c_merge(setup: Setup, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    from adapters_mgr.lora.merge import merge_adapters

    base = setup.base()
    rows = []
    for n in sizes:
        pairs = [(f, 1.0 / n) for f in setup.folders[:n]]
        row: dict[str, Any] = {"adapters": n}
        for method, kwargs in METHOD_ARGS.items():
            out = setup.workdir / "merged" / f"{method}_{n}"
            start = time.perf_counter()
            result = merge_adapters(pairs, method, base_model=base, out_dir=out, **kwargs)
            row[f"{method}_s"] = time.perf_counter() - start
            row[f"{method}_error"] = result.reconstruction_error
            row[f"{method}_rank"] = result.recipe["rank"]
            shutil.rmtree(out)
        rows.append(row)
        print(f"  (c) {n} adapters: " + ", ".join(f"{m} {row[m + '_s']:.2f}s" for m in METHOD_ARGS), flush=True)
    return rows


# -- (d) the lead's part ----------------------------------------------------------------------------------------
def part_d_recompute(args: argparse.Namespace) -> dict[str, Any] | None:
    """Time to recompute top-10 for all MovieLens-100K users with the retriever, and with retriever +
    ranker reranking the top 50 (see ``benchmarks/_recompute.py``)."""
    from benchmarks._recompute import recompute_timing

    result = recompute_timing(args.quick)
    print(f"  (d) {result['users']} users: retriever {result['retriever_only_s']:.1f}s; retriever + ranker top-50 "
          f"{result['retriever_plus_ranker_top50_s']:.1f}s for {result['two_stage_users_measured']} users "
          f"(~{result['two_stage_all_users_s_extrapolated']:.0f}s for all, extrapolated)", flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------------------
def verdicts(a: dict[str, Any], b: list[dict[str, Any]]) -> dict[str, Any]:
    if not a or not b:
        return {}
    warm = a["hot_swap_warm"]["p50_ms"]
    load_set = a["peft_load_adapter_set_adapter"]["p50_ms"]
    worst_ratio = min(r["folded_vs_bare"] for r in b)
    return {
        "switch_p50_ms": {"value": warm, "target": f"<= {TARGETS['switch_p50_ms']}",
                          "met": warm <= TARGETS["switch_p50_ms"]},
        "speedup_vs_load_set": {"value": load_set / warm, "target": f">= {TARGETS['speedup_vs_load_set']}",
                                "met": load_set / warm >= TARGETS["speedup_vs_load_set"]},
        "folded_vs_bare_min": {"value": worst_ratio, "target": f">= {TARGETS['folded_vs_bare']}",
                               "met": worst_ratio >= TARGETS["folded_vs_bare"]},
    }


def render(payload: dict[str, Any]) -> str:
    a = payload["results"]["a_switch"] or {}
    rows_a = []
    for name, value in a.items():
        if "error" in value:
            rows_a.append({"method": name, "p50_ms": "fails", "p90_ms": "", "note": value["error"]})
        else:
            rows_a.append({"method": name, "p50_ms": value["p50_ms"], "p90_ms": value["p90_ms"],
                           "note": f"{value['runs']} runs"})
    md = [f"# Serving benchmark ({'quick, ' if payload['quick'] else ''}{payload['model']})\n",
          f"Machine: {payload['machine']['cpus']} CPUs, {payload['machine']['platform']}, torch "
          f"{payload['machine'].get('torch')}, peft {payload['machine'].get('peft')}; {payload['machine']['date']}.\n",
          "## (a) Switch latency between ranker adapters with a classification head\n",
          md_table(rows_a, ["method", "p50_ms", "p90_ms", "note"]),
          "\nhot_swap_warm: `HotSwapModel.activate(folder)` with the adapter's tensors cached (stat check, fold);"
          " hot_swap_cold: read + sha256 + parse + fold; hot_swap_fold_only: activating a prepared node.\n",
          "\n## (b) Scoring throughput (pairs/s), weights-mode stacks\n",
          md_table(payload["results"]["b_throughput"],
                   ["adapters", "pairs", "bare_pairs_per_s", "folded_pairs_per_s", "unfolded_pairs_per_s",
                    "folded_vs_bare", "unfolded_vs_bare", "folded_vs_bare_median"]),
          "\nPairs/s from the best of the timed runs (the machine is shared); `*_median` ratios use medians.\n",
          "\n## (c) Merge time (s) per method\n",
          md_table(payload["results"]["c_merge"], ["adapters", *[f"{m}_s" for m in METHOD_ARGS]]),
          "\nReconstruction error (relative Frobenius, all layers):\n\n",
          md_table(payload["results"]["c_merge"], ["adapters", *[f"{m}_error" for m in METHOD_ARGS]]),
          "\n## (d) Recompute recommendations\n",
          ("not run (lead's part, see `part_d_recompute`)\n" if payload["results"].get("d_recompute") is None
           else "```json\n" + json.dumps(payload["results"]["d_recompute"], indent=2) + "\n```\n"),
          "\n## Targets\n",
          md_table([{"target": k, **v} for k, v in payload["targets"].items()], ["target", "value", "target", "met"])]
    return "".join(md)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = {k: v["p50_ms"] for k, v in payload["results"]["a_switch"].items() if "p50_ms" in v}
    b = payload["results"]["b_throughput"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.barh(list(a), list(a.values()), color="tab:blue")
    ax1.set_xscale("log")
    ax1.set_xlabel("switch latency p50 (ms, log)")
    ax1.set_title("(a) switching adapters with a head")
    width = 0.27
    xs = range(len(b))
    for j, (key, label) in enumerate((("bare_pairs_per_s", "bare base"), ("folded_pairs_per_s", "folded"),
                                      ("unfolded_pairs_per_s", "unfolded peft"))):
        ax2.bar([x + (j - 1) * width for x in xs], [r[key] for r in b], width, label=label)
    ax2.set_xticks(list(xs), [f"{r['adapters']} adapters" for r in b])
    ax2.set_ylabel("pairs / s")
    ax2.set_title("(b) scoring throughput, weights-mode stack")
    ax2.legend()
    fig.suptitle(payload["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, few repeats (about a minute)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per scoring request in (b)")
    parser.add_argument("--parts", default="a,b,c", help="comma-separated parts to run (default a,b,c)")
    args = parser.parse_args()
    torch.manual_seed(0)
    repeat = args.repeat or (5 if args.quick else 20)
    n_pairs = args.pairs or (64 if args.quick else 128)
    sizes = (2, 8, 32)
    stacks = (1, 4, 16)
    name = "bench_serving_quick" if args.quick else "bench_serving"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        setup = Setup(args.quick, Path(tmp), max(sizes))
        print(f"model: {setup.model_name}; {len(setup.folders)} adapters written", flush=True)
        parts = set(args.parts.split(","))
        a = part_a_switch(setup, repeat) if "a" in parts else {}
        print("  (a) " + ", ".join(f"{k}: {v.get('p50_ms', v.get('error'))}" for k, v in a.items()), flush=True)
        b = part_b_throughput(setup, n_pairs, max(3, repeat // 3 if not args.quick else repeat), stacks) \
            if "b" in parts else []
        c = part_c_merge(setup, sizes) if "c" in parts else []
        d = part_d_recompute(args)
    payload = {
        "machine": machine(), "quick": args.quick, "model": setup.model_name,
        "settings": {"repeat": repeat, "pairs_per_request": n_pairs, "lora": "r=8 alpha=16 query/value + head",
                     "merge_args": METHOD_ARGS},
        "results": {"a_switch": a, "b_throughput": b, "c_merge": c, "d_recompute": d},
        "targets": verdicts(a, b),
        "wall_s": time.perf_counter() - started,
    }
    json_path, md_path = write_results(name, payload, render(payload))
    plot(payload, RESULTS / f"{name}.png")
    print(f"wrote {json_path}, {md_path}, {RESULTS / (name + '.png')} in {payload['wall_s']:.0f}s")
    for key, verdict in payload["targets"].items():
        print(f"  {key}: {verdict['value']:.3g} (target {verdict['target']}) {'met' if verdict['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
