"""The lineage tree stays readable (and renders at all) for deep chains and DAGs."""

from __future__ import annotations

import json
import re

from adapters_mgr.catalog import lineage_index
from adapters_mgr.catalog.sql import utcnow
from adapters_mgr.cli.render import RUN_HEAD, RUN_TAIL
from tests.conftest import lora_model, tiny_bert
from tests.test_cli import run


def _deep_chain(mgr, depth: int) -> None:
    """``depth`` warm-started generations written by plain SQL (registering 1,000 adapters is slow)."""
    now = utcnow()
    with mgr.catalog.transaction() as con:
        con.execute("INSERT INTO base_models VALUES ('b', 'b', '/x', 'f00d', 'BertModel', '{}', 1, ?)", [now])
        con.execute(
            f"""
            INSERT INTO adapters (id, name, version, kind, task, base_id, status, created_at, updated_at)
            SELECT i, 'deep', i, 'trained', 'ranker', 'b', 'active', ?::TIMESTAMPTZ, ?::TIMESTAMPTZ
            FROM range(1, {depth} + 1) t(i)
            """,
            [now, now],
        )
        con.execute(f"INSERT INTO lineage SELECT i, i - 1, 'warm_start', NULL, 0, NULL FROM range(2, {depth} + 1) t(i)")
        lineage_index.rebuild(con)


def _ids(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"#(\d+) trained", text)}


def test_a_1000_deep_chain_renders_flat_with_its_middle_elided(capsys, root, mgr):
    _deep_chain(mgr, 1000)
    code, out, err = run(capsys, root, "lineage", "1000")
    assert code == 0, err
    hidden = 999 - RUN_HEAD - RUN_TAIL
    assert f"… {hidden} more generations" in out
    shown = _ids(out)
    assert shown == {1000, *range(1000 - RUN_HEAD, 1000), *range(1, RUN_TAIL + 1)}
    # flat: no line is indented deeper than the section's children
    assert max(len(line) - len(line.lstrip("│ ├└─")) for line in out.splitlines()) <= 8

    code, out, err = run(capsys, root, "lineage", "1000", "--full")
    assert code == 0, err
    assert _ids(out) == set(range(1, 1001)) and "more generations" not in out

    code, out, err = run(capsys, root, "lineage", "500")  # both directions
    assert code == 0, err
    assert "ancestors (499;" in out and "descendants (500;" in out


def test_branch_points_nest_and_a_shared_ancestor_is_expanded_once(capsys, root, mgr, base_id):
    model = lora_model(tiny_bert(0), seed=1)
    a = mgr.register(model, name="a")
    b = mgr.register(model, name="b", parents=[(a, "warm_start")])
    c = mgr.register(model, name="c", parents=[(a, "warm_start")])
    m = mgr.register(model, name="m", parents=[(b, "merged_from"), (c, "merged_from")])
    code, out, err = run(capsys, root, "lineage", str(m))
    assert code == 0, err
    lines = out.splitlines()
    b_line = next(i for i, line in enumerate(lines) if f"#{b} " in line)
    c_line = next(i for i, line in enumerate(lines) if f"#{c} " in line)
    a_lines = [i for i, line in enumerate(lines) if f"#{a} " in line]
    assert len(a_lines) == 2 and "(shown above)" in lines[a_lines[1]]  # expanded under b, referenced under c
    indent = {i: len(lines[i]) - len(lines[i].lstrip("│ ├└─")) for i in (b_line, c_line, *a_lines)}
    assert indent[b_line] == indent[c_line] < indent[a_lines[0]]  # the merge's parents are siblings; a nests
    code, out, err = run(capsys, root, "lineage", str(a))
    assert code == 0, err
    assert "descendants (3;" in out and "(shown above)" in out  # m is reached through b and through c


def _ls_ids(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"^│ (\d+)\s", text, re.M)}


def test_ls_table_is_capped_json_and_all_are_not(capsys, root, mgr):
    from adapters_mgr.cli.render import TABLE_ROWS

    _deep_chain(mgr, TABLE_ROWS + 10)
    code, out, err = run(capsys, root, "ls")
    assert code == 0, err
    assert f"{TABLE_ROWS} adapter(s) (first {TABLE_ROWS} shown; more exist" in out
    assert _ls_ids(out) == set(range(11, TABLE_ROWS + 11))  # the newest
    code, out, _ = run(capsys, root, "ls", "--all")
    assert _ls_ids(out) == set(range(1, TABLE_ROWS + 11)) and "more exist" not in out
    code, out, _ = run(capsys, root, "ls", "--json")
    assert len(json.loads(out)) == TABLE_ROWS + 10
    code, out, _ = run(capsys, root, "ls", "--limit", "3")
    assert _ls_ids(out) == {TABLE_ROWS + 8, TABLE_ROWS + 9, TABLE_ROWS + 10} and "more exist" not in out


def test_edge_lookups_keep_their_order_and_follow_added_edges():
    from datetime import UTC, datetime

    from adapters_mgr.catalog.lineage import Edge, Lineage
    from adapters_mgr.catalog.records import Adapter

    now = datetime.now(UTC)
    nodes = {i: Adapter(id=i, name="n", version=i, kind="merged", task=None, base_id="b", status="active",
                        created_at=now, updated_at=now) for i in range(1, 6)}
    lin = Lineage(root=nodes[5], ancestors={1: 2, 2: 2, 3: 1, 4: 1}, nodes=nodes, edges=[
        Edge(child_id=5, parent_id=4, relation="merged_from", weight=0.5, ord=1),
        Edge(child_id=5, parent_id=3, relation="merged_from", weight=0.5, ord=0),
        Edge(child_id=4, parent_id=1, relation="warm_start", weight=None, ord=0),
        Edge(child_id=3, parent_id=1, relation="warm_start", weight=None, ord=0),
    ])
    assert [e.parent_id for e in lin.parents_of(5)] == [3, 4]  # merge order, not insertion order
    assert [e.child_id for e in lin.children_of(1)] == [3, 4]
    assert lin.parents_of(1) == [] and lin.children_of(5) == []
    lin.parents_of(5).clear()  # a caller's list: the lineage is not changed through it
    assert len(lin.parents_of(5)) == 2
    lin.edges.append(Edge(child_id=3, parent_id=2, relation="warm_start", weight=None, ord=1))
    assert [e.parent_id for e in lin.parents_of(3)] == [1, 2]
    assert [e.child_id for e in lin.children_of(2)] == [3]
