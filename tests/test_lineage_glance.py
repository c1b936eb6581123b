"""Lineage at a glance: batch runs, stack members listed once, the demo's section in one screen,
and a Mermaid chart with every parent edge (issue 16, part 1)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from adapters_mgr.catalog import nodes
from adapters_mgr.catalog.lineage import batch_runs, batch_summary
from adapters_mgr.catalog.nodes import ParentSpec
from adapters_mgr.cli.render import lineage_tree
from tests.conftest import lora_model, tiny_bert
from tests.helpers import add_batch
from tests.test_cli import run

WEEKS, INITIAL = 26, 20


def demo_shaped(mgr, updates: int = 4, promoted: tuple[bool, ...] = (True, True, False, True)) -> dict[str, int]:
    """The catalog the demo builds (default settings), by direct registration instead of training:
    an initial ranker on 20 weekly batches, a retriever, then weekly ``stack`` + replay updates,
    each a trained adapter (``stacked_on`` production) and a stack node of production's members
    plus it, promoted or not by the gate."""
    batches = [add_batch(mgr, f"b{i:06d}") for i in range(1, WEEKS + 1)]
    base = tiny_bert(0)
    first = mgr.register(lora_model(base, seed=1), name="ml-ranker", task="ranker", batches=batches[:INITIAL],
                         eval_batches=[batches[INITIAL]], metrics={"auc": 0.65, "primary_metric": "auc"})
    mgr.promote(first, "production")
    retriever = mgr.register(lora_model(tiny_bert(0), seed=2), name="ml-retriever", task="retriever",
                             batches=batches[:INITIAL], eval_batches=[batches[INITIAL]],
                             metrics={"recall@10": 0.1, "primary_metric": "recall@10"})
    mgr.promote(retriever, "retrieval")
    ids = {"first": first, "retriever": retriever}
    for t in range(updates):
        week = INITIAL + t
        prod = mgr.get("production")
        members = ([(e.parent_id, e.weight) for e in mgr.lineage(prod.id, depth=1).parents_of(prod.id)]
                   if prod.kind == "stack" else [(prod.id, 1.0)])
        links = ([(batches[week], "train"), (batches[week + 1], "eval")]
                 + [(b, "replay") for b in batches[:week] if b != "b000004"])  # replay: a sample, one gap
        record = {"auc": 0.66 + t / 100, "primary_metric": "auc", "baseline": {"auc": 0.65}}
        adapter = mgr.register(lora_model(tiny_bert(0), seed=10 + t), name="ml-ranker", task="ranker",
                               parents=[(prod.id, "stacked_on")], batches=[link for link in links if link[1] != "eval"],
                               eval_batches=[batches[week + 1]], metrics={"node_metrics": record})
        weights = [1.0] * (len(members) + 1)
        with mgr.catalog.transaction() as con:
            stack = nodes.insert_node(
                con, name="ml-ranker-stack", kind="stack", task="ranker", base_id=prod.base_id,
                parents=[ParentSpec(m, "stacked_on", w) for (m, _), w in zip([*members, (adapter, 1.0)], weights,
                                                                              strict=True)],
                links=links, stack_mode="weights",
                columns=nodes.stack_columns(0, weights, "weights", metrics=record,
                                            hyperparams={"policy": "stack", "trained_adapter": adapter}))
        ids[f"adapter{t}"], ids[f"stack{t}"] = adapter, stack
        if promoted[t]:
            mgr.promote(stack, "production")
    return ids


def _render(lin, full: bool = False, width: int = 80) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, emoji=False)
    console.print(lineage_tree(lin, full=full))
    return console.export_text().splitlines()


def test_batch_ids_compress_to_runs():
    ids = [f"b{i:06d}" for i in (3, 1, 2, 5, 7, 8, 9)]
    assert batch_runs(ids) == [("b000001", "b000003", 3), ("b000005", "b000005", 1), ("b000007", "b000009", 3)]
    assert batch_runs(["w2", "x", "w1", "w1"]) == [("w1", "w2", 2), ("x", "x", 1)]
    links = ([{"batch_id": f"b{i:06d}", "role": "train"} for i in range(1, 21)]
             + [{"batch_id": "b000021", "role": "eval"}]
             + [{"batch_id": f"b{i:06d}", "role": "replay"} for i in range(1, 24)])
    assert batch_summary(links) == "train b000001–b000020 (20) · eval b000021 · replay b000001–b000023 (23)"
    gappy = [{"batch_id": f"b{i:06d}", "role": "replay"} for i in (1, 2, 4, 6, 8, 9)]
    assert batch_summary(gappy) == "replay 6 batches in b000001–b000009 (4 runs)"
    assert batch_summary(gappy[:3]) == "replay b000001–b000002, b000004 (3)"


@pytest.fixture
def shaped(mgr, base_id):
    return demo_shaped(mgr)


def test_demo_shaped_production_reads_in_one_screen(mgr, shaped):
    lin = mgr.lineage("production")
    lines = _render(lin)
    text = "\n".join(lines)
    assert len(lines) <= 25, text
    assert max(map(len, lines)) <= 80
    # the stack's members once, in order, with weights; no member's own stack history
    members = [e.parent_id for e in lin.parents_of(lin.root.id)]
    assert members == [shaped["first"], shaped["adapter0"], shaped["adapter1"], shaped["adapter3"]]
    member_lines = [line for line in lines if re.search(r"member \d/4 w=1 ←", line)]
    assert [int(re.search(r"#(\d+)", line).group(1)) for line in member_lines] == members
    for node_id in (shaped["stack0"], shaped["stack1"], shaped["stack2"]):
        assert f"#{node_id} " not in text  # earlier stacks are the members' ancestry: hidden
    assert "members' own ancestry: --full, or lineage <member id>" in text
    # batches as runs (read unwrapped)
    wide = "\n".join(_render(lin, width=250))
    assert "train b000001–b000020 (20) · eval b000021" in wide
    assert "train b000024 · eval b000025 · replay b000001–b000003, b000005–b000023 (22)" in wide
    assert "(train)" not in wide and "b000002(replay)" not in wide
    # --full: today's listing, every member's ancestry
    full = "\n".join(_render(lin, full=True, width=250))
    assert "b000001(train), b000002(train)" in full and "b000002(replay)" in full
    assert all(f"#{shaped[f'stack{t}']} " in full for t in range(2))  # stack2 was not promoted
    assert len(full.splitlines()) > 2 * len(wide.splitlines())


def test_a_member_asked_for_shows_its_own_ancestry(mgr, shaped):
    text = "\n".join(_render(mgr.lineage(shaped["adapter3"]), width=250))
    assert f"stacked_on ← ml-ranker-stack@2 #{shaped['stack1']}" in text  # trained on top of production then
    assert f"#{shaped['first']} " in text


def test_demo_lineage_section_fits_40_lines(mgr, shaped, tmp_path):
    from adapters_mgr.demo import Demo, DemoSettings

    console = Console(width=80, file=io.StringIO(), record=True, emoji=False)
    Demo(mgr.root, DemoSettings(), tmp_path / "report", console=console).lineage()
    lines = console.export_text().splitlines()
    assert 5 <= len(lines) <= 40, "\n".join(lines)
    assert max(map(len, lines)) <= 80


def test_mermaid_has_every_parent_edge_and_batch_ranges(mgr, shaped, capsys):
    root = mgr.root
    mgr.rollback("production", to=shaped["stack1"])  # a stack with descendants: a later stack, a merge-like node
    merged = mgr.register(lora_model(tiny_bert(0), seed=99), name="ml-ranker-merged", task="ranker",
                          parents=[(m, "merged_from", 1.0) for m in
                                   (shaped["first"], shaped["adapter0"], shaped["adapter1"], shaped["adapter3"])])
    code, out, err = run(capsys, root, "lineage", "production", "--format", "mermaid")
    assert code == 0, err
    edges = set(re.findall(r"n(\d+) -->\|(\w+)[^|]*\| n(\d+)", out))
    for child, parents in ((shaped["stack3"], ("first", "adapter0", "adapter1", "adapter3")),
                           (merged, ("first", "adapter0", "adapter1", "adapter3")),
                           (shaped["stack1"], ("first", "adapter0", "adapter1"))):
        relation = "merged_from" if child == merged else "stacked_on"
        for p in parents:
            assert (str(shaped[p]), relation, str(child)) in edges, (p, child, out)
    # every drawn node is declared, and every drawn node's parents in the catalog are drawn
    declared = {int(n) for n in re.findall(r"^\s+n(\d+)\[", out, re.M)}
    assert {int(a) for a, _, _ in edges} | {int(c) for _, _, c in edges} <= declared
    for node_id in declared:
        catalog_parents = {e.parent_id for e in mgr.lineage(node_id, depth=1).parents_of(node_id)}
        assert catalog_parents <= {int(a) for a, _, c in edges if int(c) == node_id}, node_id
    # batches as range nodes: a handful, not one per batch link
    assert '[("batches b000001–b000020 (20)")]' in out
    assert f"-.->|train| n{shaped['first']}" in out
    assert len(re.findall(r"-\.->", out)) < 40
    assert len(out.splitlines()) < 80
