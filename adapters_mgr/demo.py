"""The main job: an end-to-end incremental-update demo on MovieLens-100K (or a synthetic stream).

Every step goes through the public API, so the demo is also the shortest tour of the project:
sync weekly batches -> train the initial adapters -> weekly updates through the promotion gate ->
lineage -> compaction -> rollback followed by a running scorer -> recomputed recommendations ->
a report folder. Each step checks what the catalog already holds and skips it, so Ctrl-C leaves a
consistent root and a rerun continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from adapters_mgr.cli.render import item_titles, json_default, lineage_tree, print_table, prior_lift_text
from adapters_mgr.data import movielens, synthetic
from adapters_mgr.data.sampling import subsample_rows
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.lora.testing import tiny_base_folder
from adapters_mgr.manager import AdapterManager
from adapters_mgr.workflows.evaluation import evaluate_node, rows_label


@dataclass
class DemoSettings:
    """Sizes chosen so the default run fits ~10 minutes on 2 CPU cores (MiniLM ~50 samples/s)."""

    quick: bool = False
    full: bool = False
    initial_weeks: int = 20
    updates: int = 4
    initial_rows: int = 1600
    update_rows: int = 400
    replay_ratio: float = 1.0
    eval_rows: int = 500
    retriever_rows: int = 1500
    max_length: int = 48
    epochs: int = 1
    lr: float = 2e-3
    policy: str = "stack"
    tolerance: float = 0.0
    compact_depth: int = 3
    show_users: int = 3
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, full: bool) -> DemoSettings:
        if quick:
            return cls(quick=True, initial_weeks=1, updates=3, initial_rows=240, update_rows=160, eval_rows=160,
                       retriever_rows=240, max_length=32, compact_depth=2, show_users=2)
        if full:
            return cls(full=True, initial_rows=10**9, update_rows=10**9, eval_rows=10**9, retriever_rows=10**9,
                       updates=10)
        return cls()


@dataclass
class DemoReport:
    data_source: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    weeks: list[dict[str, Any]] = field(default_factory=list)
    compaction: dict[str, Any] = field(default_factory=dict)
    rollback: dict[str, Any] = field(default_factory=dict)
    recommendations: dict[str, Any] = field(default_factory=dict)
    production: int | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, root: Path, settings: DemoSettings, report_dir: Path, console: Console | None = None) -> None:
        self.mgr = AdapterManager(root)
        self.s = settings
        self.report_dir = report_dir
        self.console = console or Console()
        self.report = DemoReport(settings=asdict(settings))
        self.base_id: str | None = None

    def say(self, text: str) -> None:
        self.console.print(text)

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")

    # -- 1. data ----------------------------------------------------------------------------------
    def sync_data(self) -> list[dict[str, Any]]:
        self.step("1. sync the ratings as weekly batches")
        self.mgr.init()
        data = self.mgr.data
        if not data.sources():
            if self.s.quick:
                self._synthetic("--quick runs on the synthetic stream and a tiny random BERT")
            else:
                try:
                    folder = movielens.fetch()
                    movielens.register_movielens(data, folder)
                    self.report.data_source = f"MovieLens-100K ({folder})"
                except Exception as exc:  # noqa: BLE001 - any fetch failure falls back, said plainly
                    self._synthetic(f"MovieLens-100K could not be fetched ({exc}); running on the synthetic stream")
        else:
            names = [s["name"] for s in data.sources()]
            self.report.data_source = "MovieLens-100K" if any("ml100k" in n for n in names) else "synthetic stream"
        window = "15m" if self.report.data_source.startswith("synthetic") else "7d"
        new = data.sync(window=window)
        batches = data.batches()
        self.say(f"data: {self.report.data_source}; {len(new)} new batch(es), {len(batches)} in total "
                 f"(window {window})")
        rows = [{"batch": b["id"], "from": str(b["ts_min"])[:10], "rows_in": b["rows_in"], "kept": b["rows_kept"],
                 "quarantined": b["rows_quarantined"], "duplicates": b["rows_duplicate"]} for b in batches]
        shown = rows if len(rows) <= 12 else rows[:4] + [{"batch": "…"}] + rows[-4:]
        print_table(shown, ["batch", "from", "rows_in", "kept", "quarantined", "duplicates"], title="batches")
        totals = {k: int(sum(r[k] or 0 for r in rows)) for k in ("rows_in", "kept", "quarantined", "duplicates")}
        self.say(f"totals: {totals['rows_in']:,} rows read = {totals['kept']:,} kept + {totals['quarantined']:,} "
                 f"quarantined + {totals['duplicates']:,} duplicates")
        self.report.batches = rows
        return batches

    def _synthetic(self, why: str) -> None:
        self.say(f"[yellow]{why}[/]")
        data = synthetic.generate(self.mgr.root / "synthetic", rows=4000 if self.s.quick else 60_000, users=60,
                                  items=40, seed=self.s.seed)
        data.register(self.mgr.data)
        self.report.data_source = "synthetic stream"
        self.report.notes.append(why)

    # -- 2. base and initial adapters ----------------------------------------------------------------
    def base(self) -> str:
        if self.s.quick:
            folder = self.mgr.root / "tiny-base"
            if not folder.exists():
                tiny_base_folder(folder)
            return self.mgr.register_base(str(folder), name="tiny-random-bert")
        return self.mgr.default_base()

    def _existing(self, name: str, batch: str) -> Any:
        """A node named ``name`` already trained on ``batch`` (so a rerun continues instead of redoing)."""
        rows = self.mgr.catalog.query(
            "SELECT a.id FROM adapters a JOIN adapter_batches ab ON ab.adapter_id = a.id "
            "WHERE a.name = ? AND ab.batch_id = ? AND ab.role = 'train' AND a.status = 'active' ORDER BY a.id DESC",
            [name, batch])
        return rows[0]["id"] if rows else None

    def _knobs(self, rows: int) -> dict[str, Any]:
        return dict(max_train_rows=rows, max_eval_rows=self.s.eval_rows, max_length=self.s.max_length,
                    epochs=self.s.epochs, lr=self.s.lr, seed=self.s.seed, base=self.base_id)

    def _update_knobs(self) -> dict[str, Any]:
        """Weekly updates replay as many earlier rows as they have new ones: in the side-by-side
        benchmark (benchmarks/bench_incremental.py) replay was the best incremental policy."""
        return {**self._knobs(self.s.update_rows), "replay_ratio": self.s.replay_ratio}

    def initial(self, batches: list[dict[str, Any]]) -> None:
        self.step("2. train the initial adapters on the first weeks, promote to production")
        first = [b["id"] for b in batches[: self.s.initial_weeks]]
        for task, alias, rows in (("ranker", "production", self.s.initial_rows),
                                  ("retriever", "retrieval", self.s.retriever_rows)):
            name = f"ml-{task}" if task == "ranker" else "ml-retriever"
            if self._existing(name, first[-1]) is not None and self.mgr.alias_target(alias) is not None:
                self.say(f"{task}: already trained (adapter {self._existing(name, first[-1])}), continuing")
                continue
            result = self.mgr.train_update(first, task=task, name=name, promote="always", alias=alias,
                                           **self._knobs(rows))
            metric = result.metrics["primary_metric"]
            self.say(f"{task}: adapter {result.node_id} on {len(first)} batch(es), {result.extra['train_rows']} rows; "
                     f"next-week {metric} {result.metrics[metric]:.4f}{prior_lift_text(result.metrics)}; "
                     f"promoted to {alias}")

    # -- 3. weekly updates through the gate -------------------------------------------------------------
    def updates(self, batches: list[dict[str, Any]]) -> None:
        self.step(f"3. weekly incremental updates ({self.s.policy} + replay) through the promotion gate")
        initial_id = self.mgr.get("ml-ranker@1").id
        start = self.s.initial_weeks
        for t in range(start, min(start + self.s.updates, len(batches) - 1)):
            batch = batches[t]["id"]
            existing = self._existing("ml-ranker", batch)
            if existing is not None:  # a rerun: report the week from what the catalog recorded
                adapter = self.mgr.get(existing)
                node_id = self._stack_of(existing) or existing
                metrics = self.mgr.get(node_id).metrics or {}
                eval_ids = [b["batch_id"] for b in self.mgr.lineage(node_id, depth=0).batches.get(node_id, [])
                            if b["role"] == "eval"]
                decision, wall, promoted = "recorded", (adapter.hyperparams or {}).get("train_wall_s"), None
                self.say(f"week {t}: already updated (node {node_id}), continuing")
            else:
                result = self.mgr.train_update([batch], task="ranker", name="ml-ranker", policy=self.s.policy,
                                               parent="production", promote="if_better", tolerance=self.s.tolerance,
                                               **self._update_knobs())
                node_id, metrics, eval_ids = result.node_id, result.metrics, result.eval_batches
                decision, wall, promoted = result.decision, result.wall_s, result.promoted
                adapter = self.mgr.get(result.adapter_id)
            stale, label = self._evaluate_node(initial_id, eval_ids)
            metric = metrics["primary_metric"]
            new, cur = metrics[metric], (metrics.get("baseline") or {}).get(metric)
            prior = metrics.get("prior_auc") if metric == "auc" else None  # the as-of prior alone, same rows
            effect = self._following_effect(t, batches, node_id, metrics, promoted)
            if promoted is not None:
                verdict = "[green]promoted[/]" if promoted else "[red]kept production[/]"
                alone = "" if prior is None else f" vs prior alone {prior:.4f}"
                self.say(f"week {t}: node {node_id} {metric} {new:.4f} vs production "
                         f"{'-' if cur is None else f'{cur:.4f}'} vs stale initial {stale:.4f}{alone} on {label} "
                         f"-> {verdict}")
                if effect:
                    self.say(f"  the week after ({effect['label']}): chosen node {effect['chosen']} "
                             f"{effect['chosen_metric']:.4f} vs the other, node {effect['other']}, "
                             f"{effect['other_metric']:.4f} ({effect['gain']:+.4f})")
            self.report.weeks.append({"week": t, "train_batch": batch, "eval_batch": eval_ids[0],
                                      "eval_rows": label, "node_id": node_id, "metric": metric, "new": new,
                                      "production": cur, "stale_initial": stale, "prior_alone": prior,
                                      "decision": decision,
                                      "following": effect, "wall_s": wall, "bytes": adapter.bytes})

    def _following_effect(self, t: int, batches: list[dict[str, Any]], node_id: int, metrics: dict[str, Any],
                          promoted: bool | None) -> dict[str, Any] | None:
        """What the gate's choice was worth on the batch AFTER the one it decided on: the gate picks
        the better node on week t+1, so its figure there flatters the choice; week t+2 does not."""
        baseline = (metrics.get("baseline") or {}).get("node_id")
        if promoted is None or baseline is None or t + 2 >= len(batches):
            return None
        chosen, other = (node_id, baseline) if promoted else (baseline, node_id)
        following = [batches[t + 2]["id"]]
        chosen_metric, label = self._evaluate_node(chosen, following)
        other_metric, _ = self._evaluate_node(other, following)
        return {"batch": following[0], "label": label, "chosen": chosen, "other": other,
                "chosen_metric": chosen_metric, "other_metric": other_metric, "gain": chosen_metric - other_metric}

    def _stack_of(self, adapter_id: int) -> int | None:
        """The stack node an update registered together with its adapter, if any."""
        for edge in self.mgr.lineage(adapter_id, depth=1).children_of(adapter_id):
            child = self.mgr.get(edge.child_id)
            if child.kind == "stack" and (child.hyperparams or {}).get("trained_adapter") == adapter_id:
                return child.id
        return None

    def _evaluate_node(self, node_id: int, eval_batches: list[str]) -> tuple[float, str]:
        """(AUC, the rows it is on): the rows an update with these knobs evaluates on, so a node the
        gate already scored on them is read back from the catalog instead of evaluated again."""
        node = self.mgr.get(node_id)
        rows = subsample_rows(self.mgr.data.training_rows(eval_batches, templates=self.mgr.data.templates()),
                              self.s.eval_rows, self.s.seed + 1)
        base = self.mgr.base_model(node.base_id, HeadSpec("seq_cls", 2))
        # scored as the node was trained: with its as-of prior, if it recorded one
        metrics = evaluate_node(self.mgr.workspace, base, self.mgr.tokenizer(node.base_id), get_task("ranker"), node,
                                rows, max_length=self.s.max_length)
        return float(metrics["auc"]), rows_label(rows)

    # -- 4. lineage --------------------------------------------------------------------------------------
    def lineage(self) -> None:
        self.step("4. the lineage of production")
        self.console.print(lineage_tree(self.mgr.lineage("production", depth=2)))
        self.say("(2 generations each way; `lineage production --full`: every batch and ancestry)")

    # -- 5. compaction and rollback --------------------------------------------------------------------
    def compact_and_rollback(self, batches: list[dict[str, Any]]) -> None:
        self.step("5. compact the stack by a merge, then roll production back")
        eval_batch = [batches[min(self.s.initial_weeks + self.s.updates, len(batches) - 1)]["id"]]
        # the rows and length the updates evaluated on: the stack's figure is the one its gate recorded
        report = self.mgr.compact("production", max_depth=self.s.compact_depth, method="cat", tolerance=0.005,
                                  eval_batches=eval_batch, max_eval_rows=self.s.eval_rows, seed=self.s.seed,
                                  max_length=self.s.max_length)
        self.report.compaction = report
        if report["compacted"]:
            self.say(f"stack {report['stack']} -> merged adapter {report['merged']} (cat, reconstruction error "
                     f"{report['reconstruction_error']:.2e}): {report['metric']} {report['merged_metric']:.4f} vs "
                     f"stack {report['stack_metric']:.4f} on {report['eval_label']}; "
                     f"production {'moved' if report['moved'] else 'kept'}")
        else:
            self.say(f"no compaction: {report['reason']}")
        history = [h for h in self.mgr.alias_history("production") if h["to_id"] is not None]
        if len(history) < 2:
            self.say("production has no earlier target yet; skipping the rollback demonstration")
            return
        current = self.mgr.alias_target("production")
        # roll back past the compaction (whose merged adapter equals the stack): to the node production
        # served before the latest update, so the outputs visibly change
        skip = {current, report.get("stack"), report.get("merged")}
        target = next((h["to_id"] for h in reversed(history) if h["to_id"] not in skip), None)
        if target is None:
            self.say("production has no earlier distinct target; skipping the rollback demonstration")
            return
        pairs = self.mgr.data.training_rows([eval_batch[0]])[:8]
        # by catalog ids: texts and (for rankers trained with it) the as-of prior, both as of now
        users = [r["user_id"] for r in pairs]
        items = [r["item_id"] for r in pairs]
        reference = self.mgr.scorer(target, max_length=self.s.max_length)
        original = reference.score(users, items)
        reference.close()
        scorer = self.mgr.scorer("production", max_length=self.s.max_length)
        before = scorer.score(users, items)
        self.mgr.rollback("production", to=target, reason="demo: roll back")
        moved = scorer.refresh()
        after = scorer.score(users, items)
        scorer.close()
        equal = bool(np.array_equal(after, original))
        self.say(f"rollback: production {current} -> {target}; the running scorer "
                 f"{'followed it' if moved else 'did NOT follow'} on refresh(); its outputs "
                 f"{'equal' if equal else 'DIFFER from'} node {target}'s original outputs "
                 f"(max |diff| {float(np.max(np.abs(after - original))):.1e}; before rollback it differed by "
                 f"{float(np.max(np.abs(before - original))):.1e})")
        self.report.rollback = {"from": current, "to": target, "scorer_followed": moved, "outputs_equal": equal,
                                "max_abs_diff": float(np.max(np.abs(after - original)))}

    # -- 6. recommendations ----------------------------------------------------------------------------
    def recommendations(self, batches: list[dict[str, Any]]) -> None:
        self.step("6. recompute recommendations, before and after a retriever update")
        before = self.mgr.recompute("retrieval", users="all", k=10, progress=True)
        users = sorted({r["user_id"] for r in self.mgr.recommendations(alias="retrieval")})[: self.s.show_users]
        lists_before = {u: self.mgr.recommendations(u, alias="retrieval") for u in users}
        t = min(self.s.initial_weeks + self.s.updates, len(batches) - 2)
        update_id = self._existing("ml-retriever", batches[t]["id"])
        if update_id is None:
            update_id = self.mgr.train_update([batches[t]["id"]], task="retriever", name="ml-retriever",
                                              policy="warm_start", parent="retrieval", promote="always",
                                              alias="retrieval", **self._knobs(self.s.update_rows)).node_id
        else:
            self.say(f"retriever update on week {t}: already trained (adapter {update_id}), continuing")
        after = self.mgr.recompute("retrieval", users="all", k=10, progress=True)
        for user in users:
            now = self.mgr.recommendations(user, alias="retrieval")
            titles = item_titles(self.mgr, [r["item_id"] for r in lists_before[user] + now])
            rows = [{"rank": i + 1,
                     "before": titles.get(b["item_id"], b["item_id"]) if i < len(lists_before[user]) else "",
                     "after": titles.get(a["item_id"], a["item_id"])}
                    for i, (b, a) in enumerate(zip(lists_before[user] + [{}] * 10, now, strict=False))]
            print_table(rows, ["rank", "before", "after"],
                        title=f"user {user}: node {before['node_id']} -> node {after['node_id']}")
        self.report.recommendations = {"before": before, "after": after, "retriever_update": update_id,
                                       "users_shown": users}

    # -- 7. report --------------------------------------------------------------------------------------
    def write_report(self) -> Path:
        self.step("7. report")
        out = self.report_dir
        out.mkdir(parents=True, exist_ok=True)
        self.report.production = self.mgr.alias_target("production")
        (out / "figures.json").write_text(json.dumps(asdict(self.report), indent=2, default=json_default) + "\n")
        (out / "lineage.mmd").write_text(self.mgr.lineage("production").to_mermaid() + "\n")
        self._plot(out / "metrics.png")
        lines = ["# adapters-mgr demo report", "", f"Data: {self.report.data_source}.", "",
                 "Each week's figures are on the same rows (named in the table); the gate decides on them, so "
                 "the last column measures the decision on the week after, which it did not see.", "",
                 "| week | node | next-week metric (new) | production before | stale initial | prior alone | rows "
                 "| decision | the week after: chosen vs other |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for w in self.report.weeks:
            prod = "-" if w["production"] is None else f"{w['production']:.4f}"
            f = w.get("following")
            after = "-" if not f else (f"node {f['chosen']} {f['chosen_metric']:.4f} vs node {f['other']} "
                                       f"{f['other_metric']:.4f} ({f['gain']:+.4f}, {f['label']})")
            alone = "-" if w.get("prior_alone") is None else f"{w['prior_alone']:.4f}"
            lines.append(f"| {w['week']} | {w['node_id']} | {w['metric']} {w['new']:.4f} | {prod} | "
                         f"{w['stale_initial']:.4f} | {alone} | {w['eval_rows']} | {w['decision']} | {after} |")
        if self.report.compaction.get("compacted"):
            c = self.report.compaction
            lines += ["", f"Compaction: stack {c['stack']} -> adapter {c['merged']} ({c['method']}), "
                      f"{c['metric']} {c['merged_metric']:.4f} vs {c['stack_metric']:.4f} on {c['eval_label']}; "
                      f"moved: {c['moved']}."]
        if self.report.rollback:
            r = self.report.rollback
            lines += ["", f"Rollback: production {r['from']} -> {r['to']}; scorer followed: {r['scorer_followed']}; "
                      f"outputs equal to the node's original outputs: {r['outputs_equal']}."]
        lines += ["", "Subsampling (seeded): " + ", ".join(f"{k}={v}" for k, v in self.report.settings.items()), "",
                  "Files: figures.json (every figure), metrics.png, lineage.mmd (Mermaid)."]
        (out / "summary.md").write_text("\n".join(lines) + "\n")
        self.say(f"report written to {out}")
        return out

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        weeks = [w["week"] for w in self.report.weeks]
        if weeks:
            label = f"incremental ({self.s.policy}" + (" + replay)" if self.s.replay_ratio else ")")
            ax.plot(weeks, [w["new"] for w in self.report.weeks], marker="o", label=label)
            ax.set_xticks(weeks)
            ax.plot(weeks, [w["stale_initial"] for w in self.report.weeks], marker="s", label="stale initial adapter")
            prod = [(w["week"], w["production"]) for w in self.report.weeks if w["production"] is not None]
            if prod:
                ax.plot(*zip(*prod, strict=True), marker="^", linestyle="--", label="production before update")
            alone = [(w["week"], w["prior_alone"]) for w in self.report.weeks if w.get("prior_alone") is not None]
            if alone:
                ax.plot(*zip(*alone, strict=True), color="grey", linestyle=":", label="as-of prior alone")
        else:
            ax.text(0.5, 0.5, "no update weeks", ha="center", transform=ax.transAxes)
        ax.set_xlabel("update week (trained on week t, evaluated on week t+1)")
        ax.set_ylabel("next-week AUC")
        ax.set_title("adapters-mgr demo: next-week AUC per strategy")
        if weeks:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def run(self) -> DemoReport:
        started = time.perf_counter()
        batches = self.sync_data()
        if len(batches) < 4:
            raise RuntimeError(f"only {len(batches)} batches; the demo needs at least 4")
        self.base_id = self.base()
        self.initial(batches)
        self.updates(batches)
        self.lineage()
        self.compact_and_rollback(batches)
        self.recommendations(batches)
        self.report.wall_s = time.perf_counter() - started
        self.write_report()
        self.say(f"[bold green]demo finished in {self.report.wall_s:.0f}s[/]; root {self.mgr.root}")
        return self.report


def run_demo(root: Path, *, quick: bool = False, full: bool = False, report_dir: Path | None = None) -> DemoReport:
    settings = DemoSettings.for_mode(quick, full)
    return Demo(root, settings, report_dir or root / "report").run()
