"""Lineage as queries: ancestors and descendants of a node to any depth, with their data batches.

Both directions come from one recursive CTE over the chain index of :mod:`lineage_index` (the
recursion steps once per hop between linear chains, not once per generation), so the answer comes
from a handful of statements whatever the depth: a 1,000-deep chain is not 1,000 steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb

from adapters_mgr.catalog import lineage_index
from adapters_mgr.catalog.db import atomic, from_json
from adapters_mgr.catalog.records import ADAPTER_SUMMARY_SELECT, Adapter, adapter_from_summary

# Both walks in one recursive CTE over the chain index (see lineage_index): the recursion steps once
# per hop between chains (``dir`` says which way), and each visited chain contributes its members by
# a range on ``pos``. A chain reached twice (a DAG) keeps the smallest depth per node. One recursive
# CTE instead of one per direction halves DuckDB's fixed cost per recursive query (~1.2 ms here).
# ``{root}`` and ``{max_depth}`` are integers.
_WALK = """
WITH RECURSIVE hop(dir, chain_id, pos, depth) AS (
    SELECT d.dir, c.chain_id, c.pos, 0
    FROM lineage_chain c, (VALUES ('up'), ('down')) d(dir) WHERE c.adapter_id = {root}
    UNION
    SELECT h.dir,
           CASE WHEN h.dir = 'up' THEN x.parent_chain ELSE x.child_id END,
           CASE WHEN h.dir = 'up' THEN x.parent_pos ELSE 0 END,
           CASE WHEN h.dir = 'up' THEN h.depth + h.pos + 1 ELSE h.depth + x.parent_pos - h.pos + 1 END
    FROM lineage_hops x JOIN hop h
      ON (h.dir = 'up' AND x.child_id = h.chain_id)
      OR (h.dir = 'down' AND x.parent_chain = h.chain_id AND x.parent_pos >= h.pos)
    WHERE CASE WHEN h.dir = 'up' THEN h.depth + h.pos + 1 ELSE h.depth + x.parent_pos - h.pos + 1 END
          <= {max_depth}
)
SELECT m.adapter_id AS id, min(h.depth + abs(h.pos - m.pos)) AS depth, h.dir AS dir
FROM (SELECT * FROM lineage_chain WHERE chain_id IN (SELECT chain_id FROM hop)) m
JOIN hop h ON m.chain_id = h.chain_id AND ((h.dir = 'up' AND m.pos <= h.pos) OR (h.dir = 'down' AND m.pos >= h.pos))
WHERE h.depth + abs(h.pos - m.pos) <= {max_depth} AND m.adapter_id <> {root}
GROUP BY m.adapter_id, h.dir
"""

# Candidate edges (every edge into a node of the sub-graph; load_lineage keeps those whose other end
# is on the same side) and the nodes' batch links, in one statement: on a 2-core machine each
# statement costs ~1-3 ms of planning and scheduling whatever it reads.
_EDGES_AND_BATCHES = """
SELECT 'e' AS k, child_id AS a, parent_id AS b, relation AS c, weight, ord, params::VARCHAR AS extra,
       NULL AS sha256, NULL AS num_rows
FROM lineage WHERE child_id IN (SELECT id FROM _walk UNION ALL SELECT $root)
UNION ALL
SELECT 'b', ab.adapter_id, NULL, ab.batch_id, NULL, NULL, ab.role, b.sha256, b.num_rows
FROM adapter_batches ab LEFT JOIN batches b ON b.id = ab.batch_id
WHERE ab.adapter_id IN (SELECT id FROM _walk UNION ALL SELECT $root)
ORDER BY k DESC, a, ord, extra DESC, c
"""


@dataclass
class Edge:
    child_id: int
    parent_id: int
    relation: str
    weight: float | None
    ord: int
    params: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Lineage:
    """A node with everything upstream (what it came from) and downstream (what came from it).

    ``nodes`` hold summaries (no ``peft_config`` / ``hyperparams``; ``get(id)`` has them), except the root.
    """

    root: Adapter
    ancestors: dict[int, int] = field(default_factory=dict)  # id -> depth (1 = parent)
    descendants: dict[int, int] = field(default_factory=dict)  # id -> depth (1 = child)
    nodes: dict[int, Adapter] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    batches: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # adapter id -> batch links

    def parents_of(self, node_id: int) -> list[Edge]:
        return sorted((e for e in self.edges if e.child_id == node_id), key=lambda e: (e.ord, e.parent_id))

    def children_of(self, node_id: int) -> list[Edge]:
        return sorted((e for e in self.edges if e.parent_id == node_id), key=lambda e: e.child_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root.id,
            "ancestors": [{"id": k, "depth": v} for k, v in sorted(self.ancestors.items(), key=lambda x: x[1])],
            "descendants": [
                {"id": k, "depth": v} for k, v in sorted(self.descendants.items(), key=lambda x: x[1])
            ],
            "nodes": {str(k): v.to_dict() for k, v in sorted(self.nodes.items())},
            "edges": [e.to_dict() for e in self.edges],
            "batches": {str(k): v for k, v in sorted(self.batches.items())},
        }

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: parents point to children, edges labelled with relation and weight."""
        lines = ["graph TD"]
        for node_id, node in sorted(self.nodes.items()):
            label = f"{node.name}@{node.version}<br/>#{node.id} {node.kind}"
            if node.aliases:
                label += "<br/>[" + ", ".join(node.aliases) + "]"
            primary = (node.metrics or {}).get("primary")
            if isinstance(primary, int | float):
                label += f"<br/>metric {primary:.4f}"
            lines.append(f'    n{node_id}["{label}"]')
        for edge in self.edges:
            text = edge.relation + (f" w={edge.weight:g}" if edge.weight is not None else "")
            lines.append(f"    n{edge.parent_id} -->|{text}| n{edge.child_id}")
        for node_id, links in sorted(self.batches.items()):
            for link in links:
                bid = f"b_{link['batch_id']}".replace("-", "_")
                lines.append(f"    {bid}[(\"batch {link['batch_id']}\")] -.->|{link['role']}| n{node_id}")
        lines.append(f"    style n{self.root.id} stroke-width:3px")
        return "\n".join(lines)


def _ensure_index(con: duckdb.DuckDBPyConnection) -> None:
    """Rebuild the derived chain index when rows reached ``lineage`` without the API (plain SQL)."""
    if not lineage_index.is_current(con):
        with atomic(con):
            lineage_index.rebuild(con)


def load_lineage(con: duckdb.DuckDBPyConnection, root: Adapter, *, max_depth: int = 1_000_000) -> Lineage:
    """The whole answer in four statements: an index check, both walks into a temp table, the nodes
    with their depth, and the edges with the batch links."""
    walks = _WALK.format(root=int(root.id), max_depth=int(max_depth))
    _ensure_index(con)
    lin = Lineage(root=root)
    # a temp table belongs to this short-lived cursor and goes with it; OR REPLACE covers re-use
    con.execute("CREATE OR REPLACE TEMP TABLE _walk AS " + walks)
    for values in con.execute(_NODES).fetchall():
        node = adapter_from_summary(values[2:])
        (lin.ancestors if values[1] == "up" else lin.descendants)[node.id] = int(values[0])
        lin.nodes[node.id] = node
    lin.nodes[root.id] = root  # the root keeps its full record
    up = {root.id, *lin.ancestors}
    down = {root.id, *lin.descendants}
    for kind, a, b, c, weight, order, extra, sha, num_rows in con.execute(
        _EDGES_AND_BATCHES, {"root": root.id}
    ).fetchall():
        if kind == "b":
            lin.batches.setdefault(a, []).append({"batch_id": c, "role": extra, "sha256": sha, "num_rows": num_rows})
        elif (a in up and b in up) or (a in down and b in down):
            lin.edges.append(Edge(child_id=a, parent_id=b, relation=c, weight=weight, ord=order,
                                  params=from_json(extra)))
    return lin


_NODES = ADAPTER_SUMMARY_SELECT.replace("FROM adapters a", "FROM _walk w JOIN adapters a ON a.id = w.id", 1).replace(
    "SELECT ", "SELECT w.depth, w.dir, ", 1)
