"""The chain index behind lineage walks must give exactly what a plain walk over ``lineage`` gives."""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import pytest

from adapters_mgr.catalog import lineage_index
from tests.conftest import lora_model, tiny_bert


def _reference_walk(edges: list[tuple[int, int]], start: int, *, up: bool, max_depth: int) -> dict[int, int]:
    """Breadth-first search over the raw edge list: the definition lineage must match."""
    nxt: dict[int, list[int]] = {}
    for child, parent in edges:
        a, b = (child, parent) if up else (parent, child)
        nxt.setdefault(a, []).append(b)
    seen = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if seen[node] >= max_depth:
            continue
        for other in nxt.get(node, []):
            if other not in seen:
                seen[other] = seen[node] + 1
                queue.append(other)
    seen.pop(start)
    return seen


def _random_dag(mgr, n: int, seed: int) -> list[int]:
    """Warm-start chains that branch, plus merges with several parents; one stored file reused."""
    rng = random.Random(seed)
    model = lora_model(tiny_bert(0), seed=1)
    ids: list[int] = []
    for i in range(n):
        roll = rng.random()
        if not ids or roll < 0.1:
            parents: list = []
        elif roll < 0.75:  # mostly: continue from the newest node, sometimes branch from an older one
            parents = [(ids[-1] if rng.random() < 0.7 else rng.choice(ids), "warm_start")]
        else:
            parents = [(p, "merged_from") for p in rng.sample(ids, min(len(ids), rng.randint(2, 3)))]
        ids.append(mgr.register(model, name=f"n{i}", parents=parents))
    return ids


def _index_rows(mgr) -> tuple[list, list]:
    with mgr.catalog.connect() as con:
        chain = con.execute("SELECT * FROM lineage_chain ORDER BY adapter_id").fetchall()
        hops = con.execute("SELECT * FROM lineage_hops ORDER BY child_id, parent_id").fetchall()
    return chain, hops


@pytest.mark.parametrize("seed", [0, 1])
def test_lineage_matches_a_plain_graph_walk_at_every_depth(mgr, base_id, seed):
    ids = _random_dag(mgr, 40, seed)
    with mgr.catalog.connect() as con:
        edges = [(int(c), int(p)) for c, p in con.execute("SELECT child_id, parent_id FROM lineage").fetchall()]
    assert any(len([e for e in edges if e[0] == c]) > 1 for c in ids)  # the DAG has merges
    for node in ids:
        for depth in (1, 2, 5, None):
            lin = mgr.lineage(node, depth=depth)
            limit = depth if depth is not None else 10**6
            assert lin.ancestors == _reference_walk(edges, node, up=True, max_depth=limit)
            assert lin.descendants == _reference_walk(edges, node, up=False, max_depth=limit)
            inside = {node, *lin.ancestors, *lin.descendants}
            assert set(lin.nodes) == inside
            up, down = {node, *lin.ancestors}, {node, *lin.descendants}
            expected = {(c, p) for c, p in edges if (c in up and p in up) or (c in down and p in down)}
            assert {(e.child_id, e.parent_id) for e in lin.edges} == expected


def test_incremental_index_equals_a_rebuild(mgr, base_id):
    _random_dag(mgr, 30, seed=3)
    before = _index_rows(mgr)
    with mgr.catalog.transaction() as con:
        lineage_index.rebuild(con)
        assert lineage_index.is_current(con)
    assert _index_rows(mgr) == before
    chain, hops = before
    assert len(chain) == 30
    assert len({c for _, c, _ in chain}) < 30  # some nodes really share chains


def test_rows_written_by_plain_sql_are_indexed_on_the_next_lineage_call(mgr, base_id):
    model = lora_model(tiny_bert(0), seed=1)
    a = mgr.register(model, name="a")
    b = mgr.register(model, name="b", parents=[a])
    with mgr.catalog.transaction() as con:  # a user's own SQL: a new child of b, bypassing the API
        con.execute(
            "INSERT INTO adapters (id, name, version, kind, base_id, status, created_at, updated_at) "
            "SELECT nextval('adapter_id_seq'), 'sql', 1, 'imported', base_id, 'active', now(), now() "
            "FROM adapters WHERE id = ?", [b])
        c = int(con.execute("SELECT max(id) FROM adapters").fetchone()[0])
        con.execute("INSERT INTO lineage VALUES (?, ?, 'imported', NULL, 0, NULL)", [c, b])
        assert not lineage_index.is_current(con)
    report = mgr.verify()
    assert [p["kind"] for p in report["problems"]] == ["stale_lineage_index"]
    assert mgr.lineage(a).descendants == {b: 1, c: 2}
    assert mgr.lineage(c).ancestors == {b: 1, a: 2}
    with mgr.catalog.connect() as con:
        assert lineage_index.is_current(con)


def test_gc_rebuilds_a_stale_index(mgr, base_id):
    model = lora_model(tiny_bert(0), seed=1)
    a = mgr.register(model, name="a")
    b = mgr.register(model, name="b", parents=[a])
    with mgr.catalog.transaction() as con:
        con.execute("DELETE FROM lineage_chain WHERE adapter_id = ?", [b])
    assert not mgr.verify()["ok"]
    assert mgr.gc(dry_run=True)["actions"] == [{"action": "rebuild_lineage_index"}]
    assert not mgr.verify()["ok"]  # a dry run changes nothing
    mgr.gc()
    assert mgr.verify()["ok"]
    assert mgr.lineage(b).ancestors == {a: 1}


def test_lineage_root_is_the_full_record_and_nodes_match_get(mgr, base_id):
    """The one-statement lineage query carries the root's full columns and every node's summary."""
    from adapters_mgr.errors import NotFound

    ids = _random_dag(mgr, 12, seed=5)
    mgr.promote(ids[3], "production")
    mgr.register(lora_model(tiny_bert(0), seed=1), name="n3", parents=[(ids[3], "warm_start")],
                 metrics={"auc": 0.7})
    root = ids[3]
    lin = mgr.lineage("production")
    full = mgr.get(root)
    assert lin.root == full and full.peft_config and full.hyperparams is not None
    for node_id, node in lin.nodes.items():
        expected = mgr.get(node_id)
        for name in ("id", "name", "version", "kind", "status", "metrics", "aliases", "created_at",
                     "weights_sha256", "bytes", "lora_rank"):
            assert getattr(node, name) == getattr(expected, name), (node_id, name)
        # summaries are built without the constructor: every field must still be there
        assert set(vars(node)) == {f.name for f in dataclasses.fields(expected)}, node_id
        if node_id != root:  # what a summary leaves out is None, not missing
            assert node.peft_config is None and node.hyperparams is None and node.store_key is None
    assert any(node.metrics == {"auc": 0.7} for node in lin.nodes.values())
    with pytest.raises(NotFound, match="no adapter with id 999999"):
        mgr.lineage(999999)
    with pytest.raises(NotFound):
        mgr.lineage("no-such-alias")
