"""Training throughput: ``train_adapter`` against a raw peft loop on the same batches.

    python benchmarks/bench_training.py            # embedded MiniLM, 512 rows x 3 rounds
    python benchmarks/bench_training.py --quick    # tiny random BERT, seconds (CI)

Why: an incremental update is only worth running if it trains fast enough to use whole weeks of
data on 2 CPU cores. The target (issue 14) is ours >= 0.95 x a raw peft loop: the bookkeeping the
tool adds (accelerate, seeded shuffling, schedules, gradient clipping, process sharding, progress)
must cost at most 5%. The raw loop is the shortest honest loop: ``get_peft_model`` with the same
``LoraConfig`` and head, the same seeded batch order, the same tokenizer call per batch, AdamW,
``clip_grad_norm_``, ``zero_grad``. Beside it, the same raw loop with the batches tokenised once up
front, and with LoRA only on the top layers (peft ``layers_to_transform``): what those levers
would buy. Rounds alternate the variants so load from other processes spreads over all of them;
the figures are medians over rounds, the ratio is the median of per-round ratios.

Writes benchmarks/results/bench_training.{json,md} (bench_training_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import machine, write_results  # noqa: E402

TARGET_RATIO = 0.95


def texts(n: int, quick: bool) -> tuple[list[str], list[str], list[int]]:
    """User/item text pairs shaped like the default templates' output (length matters for speed)."""
    occupations = ["writer", "engineer", "student", "artist", "doctor", "programmer", "educator"]
    genres = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Sci-Fi", "Children's", "Animation"]
    if quick:
        users = [f"user {i % 9} age {20 + i % 7} likes jazz" for i in range(n)]
        items = [f"item {i % 13} genre rock song" for i in range(n)]
    else:
        users = [f"User {i}: age {18 + i % 40}, gender {'MF'[i % 2]}, occupation {occupations[i % 7]}. "
                 f"{12 + i % 90} ratings, {40 + i % 50}% liked. Recently liked: Toy Story (1995), Heat (1995), "
                 f"Casino (1995), Sabrina (1995). Favourite genres: {genres[i % 8]}, {genres[(i + 2) % 8]}."
                 for i in range(n)]
        items = [f"{30 + i % 200} ratings, {50 + i % 40}% liked. Example Title {i} ({1950 + i % 50}). "
                 f"Genres: {genres[i % 8]}, {genres[(i + 3) % 8]}." for i in range(n)]
    labels = [int((i * 7919) % 11 < 6) for i in range(n)]
    return users, items, labels


class Bench:
    """Loads the base once per variant (each variant attaches and removes its own LoRA)."""

    def __init__(self, quick: bool, rows: int, batch_size: int, max_length: int) -> None:
        from adapters_mgr.lora.base_model import quiet_transformers

        quiet_transformers()
        self.quick, self.batch_size, self.max_length = quick, batch_size, max_length
        if quick:
            from adapters_mgr.lora.testing import tiny_tokenizer

            self.tokenizer = tiny_tokenizer(Path(tempfile.mkdtemp(prefix="bench-tok-")))
            self.model_name = "tiny random BERT (2 layers, hidden 32)"
        else:
            from adapters_mgr.lora.base_model import embedded_model_path, load_tokenizer

            self.path = str(embedded_model_path())
            self.tokenizer = load_tokenizer(self.path)
            self.model_name = "all-MiniLM-L6-v2 (embedded, 6 layers, hidden 384)"
        self.users, self.items, self.labels = texts(rows, quick)
        self.layers = self.base().config.num_hidden_layers

    def base(self) -> torch.nn.Module:
        from adapters_mgr.lora.base_model import HeadSpec, load_base_model

        if self.quick:
            from adapters_mgr.lora.testing import tiny_base

            return tiny_base("seq_cls")
        return load_base_model(self.path, HeadSpec("seq_cls"))

    def ours(self, top_layers: int | None = None) -> float:
        """samples/s of the tool's trainer, timed by the trainer itself (the loop, not model set-up)."""
        from adapters_mgr.lora.settings import LoraSettings
        from adapters_mgr.lora.trainer import train_adapter

        rows = [{"user_id": str(i), "item_id": str(i), "user_text": u, "item_text": it, "label": y}
                for i, (u, it, y) in enumerate(zip(self.users, self.items, self.labels, strict=True))]
        result = train_adapter(self.base(), self.tokenizer, "ranker", rows, settings=LoraSettings(
                                   r=8, dropout=0.05, layers=LoraSettings.top(top_layers, self.layers)),
                               batch_size=self.batch_size, max_length=self.max_length, seed=0, progress=False)
        result.release()
        return result.samples_per_s

    def raw(self, *, pretokenised: bool = False, top_layers: int | None = None) -> float:
        """samples/s of the shortest honest peft loop over the same seeded batches."""
        from peft import LoraConfig, get_peft_model

        layers = None if top_layers is None else list(range(self.layers - top_layers, self.layers))
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"],
                            task_type="SEQ_CLS", bias="none", layers_to_transform=layers)
        torch.manual_seed(0)
        model = get_peft_model(self.base(), config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=5e-4)
        order = torch.randperm(len(self.users), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

        def tokenise(index: list[int]) -> dict[str, Any]:
            batch = dict(self.tokenizer([self.users[i] for i in index], [self.items[i] for i in index],
                                        truncation=True, max_length=self.max_length, padding=True,
                                        return_tensors="pt"))
            batch["labels"] = torch.as_tensor([self.labels[i] for i in index])
            return batch

        ready = [tokenise(b) for b in batches] if pretokenised else None
        started = time.perf_counter()
        for step, index in enumerate(batches):
            batch = ready[step] if ready is not None else tokenise(index)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        return len(order) / elapsed


def run(bench: Bench, rounds: int) -> dict[str, Any]:
    variants: dict[str, Callable[[], float]] = {
        "ours": bench.ours,
        "raw_peft": bench.raw,
        "raw_peft_pretokenised": lambda: bench.raw(pretokenised=True),
        "raw_peft_top2_layers": lambda: bench.raw(top_layers=2),
        "raw_peft_top1_layer": lambda: bench.raw(top_layers=1),
        "ours_top2_layers": lambda: bench.ours(top_layers=2),
    }
    for fn in variants.values():  # warm-up: first-call costs (imports, allocator) out of the figures
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            samples[name].append(variants[name]())
    ratios = [o / b for o, b in zip(samples["ours"], samples["raw_peft"], strict=True)]
    return {
        "samples_per_s": {name: {"median": statistics.median(v), "runs": [round(x, 2) for x in v]}
                          for name, v in samples.items()},
        "ours_vs_raw_per_round": [round(x, 3) for x in ratios],
        "ours_vs_raw_median": statistics.median(ratios),
    }


def render(payload: dict[str, Any]) -> str:
    res = payload["results"]
    base = res["samples_per_s"]["raw_peft"]["median"]
    lines = [
        "# Training throughput benchmark", "",
        f"{payload['model']}, ranker, {payload['rows']} rows, batch {payload['batch_size']}, max_length "
        f"{payload['max_length']}, LoRA r=8 on query/value, 1 epoch, {payload['machine']['cpus']} CPUs, torch "
        f"{payload['machine'].get('torch')}, peft {payload['machine'].get('peft')}. Medians of {payload['rounds']} "
        "alternating rounds after one warm-up round.", "",
        "| loop | samples/s (median) | vs raw peft | runs |", "|---|---:|---:|---|",
    ]
    for name, v in res["samples_per_s"].items():
        lines.append(f"| {name} | {v['median']:.1f} | {v['median'] / base:.2f}x | {', '.join(map(str, v['runs']))} |")
    t = payload["targets"]["ours_vs_raw"]
    lines += ["", f"ours / raw peft, median of per-round ratios: **{t['value']:.3f}** (target >= {TARGET_RATIO}: "
              f"**{'met' if t['met'] else 'not met'}**); per round: {res['ours_vs_raw_per_round']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random BERT, a few seconds")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 512; 256 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; 2 with --quick)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = args.rows or (256 if args.quick else 512)
    rounds = args.rounds or (2 if args.quick else 3)
    started = time.perf_counter()
    bench = Bench(args.quick, rows, args.batch_size, args.max_length)
    results = run(bench, rounds)
    value = results["ours_vs_raw_median"]
    payload = {
        "quick": args.quick, "model": bench.model_name, "rows": rows, "rounds": rounds,
        "batch_size": args.batch_size, "max_length": args.max_length, "machine": machine(),
        "results": results,
        "targets": {"ours_vs_raw": {"value": value, "target": f">= {TARGET_RATIO}", "met": value >= TARGET_RATIO}},
        "wall_s": time.perf_counter() - started,
    }
    md = render(payload)
    json_path, md_path = write_results("bench_training_quick" if args.quick else "bench_training", payload, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
