"""A derived index that makes lineage walks cost a few recursive steps instead of one per generation.

Why: a recursive CTE over the ``lineage`` edge table pays ~20-30 µs per step and a fixed ~7 ms for
joining the whole edge table inside the recursion; a 1,000-deep warm-start chain in a 100k-adapter
catalog took ~37 ms for the two walks alone, most of the 50 ms lineage budget.

Incremental updates mostly produce *linear chains* (each warm-start version has one parent, and the
parent has one such child). So every node gets a place ``(chain_id, pos)`` on a chain, and edges split
in two kinds:

* a **continuation** edge P -> N, where N has exactly one parent P and N is the first such child of P:
  N sits at ``(P.chain_id, P.pos + 1)``. These edges are implied by the positions and never walked.
* every other edge (into a node with several parents, or a second branch out of P) is a **hop**, and
  its child starts a new chain at ``(child_id, 0)`` (so a chain's id is the id of its head).

Ancestors of N are then the members of N's chain up to ``N.pos`` plus, via the hops into the chain's
head, the same for each parent chain: the recursive CTE runs once per *hop*, and the members come
from range scans over ``lineage_chain``. Descendants mirror it. ``lineage_hops`` keeps the parent's
position denormalised so the recursion touches one small table only.

Both tables are derived from ``lineage`` and rebuilt from it by :func:`rebuild` (migration, ``gc``,
and any time the lineage query finds a node without a place, e.g. rows inserted by plain SQL).
"""

from __future__ import annotations

import duckdb

DDL = """
CREATE TABLE IF NOT EXISTS lineage_chain (
    adapter_id  INTEGER PRIMARY KEY,
    chain_id    INTEGER NOT NULL,   -- id of the chain's head node
    pos         INTEGER NOT NULL    -- 0 for the head
);
CREATE TABLE IF NOT EXISTS lineage_hops (
    child_id      INTEGER NOT NULL,  -- always a chain head
    parent_id     INTEGER NOT NULL,
    parent_chain  INTEGER NOT NULL,
    parent_pos    INTEGER NOT NULL
);
"""

# The same rule as index_node, for the whole graph at once: parents always have smaller ids than
# their children, so "the first single-parent child of P" is the one with the smallest id.
_REBUILD = """
DELETE FROM lineage_hops;
DELETE FROM lineage_chain;
INSERT INTO lineage_chain
WITH single AS (SELECT child_id FROM lineage GROUP BY child_id HAVING count(*) = 1),
     cont AS (SELECT l.parent_id, min(l.child_id) AS child_id
              FROM lineage l JOIN single s USING (child_id) GROUP BY l.parent_id),
     heads AS (SELECT a.id FROM adapters a ANTI JOIN cont c ON c.child_id = a.id)
SELECT * FROM (
    WITH RECURSIVE ch(adapter_id, chain_id, pos) AS (
        SELECT id, id, 0 FROM heads
        UNION ALL
        SELECT c.child_id, ch.chain_id, ch.pos + 1 FROM ch JOIN cont c ON c.parent_id = ch.adapter_id
    )
    SELECT * FROM ch
) ORDER BY chain_id, pos;
INSERT INTO lineage_hops
SELECT l.child_id, l.parent_id, p.chain_id, p.pos
FROM lineage l JOIN lineage_chain c ON c.adapter_id = l.child_id JOIN lineage_chain p ON p.adapter_id = l.parent_id
WHERE c.pos = 0
ORDER BY l.child_id, l.ord;
"""


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(DDL)


def rebuild(con: duckdb.DuckDBPyConnection) -> int:
    """Recompute both tables from ``lineage`` inside the caller's transaction; returns nodes placed."""
    con.execute(_REBUILD)
    row = con.execute("SELECT count(*) FROM lineage_chain").fetchone()
    return int(row[0]) if row else 0


def index_node(con: duckdb.DuckDBPyConnection, node_id: int, parent_ids: list[int]) -> None:
    """Place a newly inserted node (its edges already written), in the caller's transaction."""
    if len(parent_ids) == 1:
        row = con.execute(
            "SELECT p.chain_id, p.pos, NOT EXISTS (SELECT 1 FROM lineage_chain m "
            "WHERE m.chain_id = p.chain_id AND m.pos > p.pos) FROM lineage_chain p WHERE p.adapter_id = ?",
            [parent_ids[0]],
        ).fetchone()
        if row is not None and row[2]:  # the parent is its chain's tail: continue the chain
            con.execute("INSERT INTO lineage_chain VALUES (?, ?, ?)", [node_id, row[0], row[1] + 1])
            return
    con.execute("INSERT INTO lineage_chain VALUES (?, ?, 0)", [node_id, node_id])
    for pid in parent_ids:
        con.execute(
            "INSERT INTO lineage_hops SELECT ?, adapter_id, chain_id, pos FROM lineage_chain WHERE adapter_id = ?",
            [node_id, pid],
        )


# Whole-table counts come from DuckDB's metadata, so this costs about a millisecond even at 100k
# adapters; heads (``pos = 0``) equal nodes minus continuation edges. One boolean, so lineage
# queries can carry it as a column instead of paying a statement for it.
IS_CURRENT_SQL = """
SELECT adapters = placed AND edges = placed - heads + hops FROM (
    SELECT (SELECT count(*) FROM adapters) AS adapters, count(*) AS placed, count(*) FILTER (WHERE pos = 0) AS heads,
           (SELECT count(*) FROM lineage) AS edges, (SELECT count(*) FROM lineage_hops) AS hops
    FROM lineage_chain)
"""


def is_current(con: duckdb.DuckDBPyConnection) -> bool:
    """True when every node has a place and every edge is a continuation or a hop."""
    row = con.execute(IS_CURRENT_SQL).fetchone()
    return bool(row and row[0])
