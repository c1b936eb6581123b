"""Lineage as queries: ancestors and descendants of a node to any depth, with their data batches.

Both directions are one recursive CTE each over the ``lineage`` edge table, so the answer comes
from the catalog in a single round trip whatever the depth (a 1,000-deep chain is one query).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb

from adapters_mgr.catalog.db import fetch_dicts, from_json
from adapters_mgr.catalog.records import ADAPTER_SUMMARY_SELECT, Adapter, adapter_from_summary

_WALK = """
WITH RECURSIVE walk(id, depth) AS (
    SELECT ?::INTEGER, 0
    UNION
    SELECT l.{next}, w.depth + 1
    FROM lineage l JOIN walk w ON l.{this} = w.id
    WHERE w.depth < ?
)
SELECT id, min(depth) AS depth FROM walk GROUP BY id
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


def walk(con: duckdb.DuckDBPyConnection, node_id: int, *, up: bool, max_depth: int) -> dict[int, int]:
    """Ids reachable from ``node_id`` (excluding itself) upwards or downwards, with min depth."""
    sql = _WALK.format(next="parent_id" if up else "child_id", this="child_id" if up else "parent_id")
    rows = con.execute(sql, [node_id, max_depth]).fetchall()
    return {int(r[0]): int(r[1]) for r in rows if int(r[0]) != node_id}


def load_lineage(con: duckdb.DuckDBPyConnection, root: Adapter, *, max_depth: int = 1_000_000) -> Lineage:
    lin = Lineage(root=root)
    lin.ancestors = walk(con, root.id, up=True, max_depth=max_depth)
    lin.descendants = walk(con, root.id, up=False, max_depth=max_depth)
    ids = sorted({root.id, *lin.ancestors, *lin.descendants})
    for values in con.execute(ADAPTER_SUMMARY_SELECT + " WHERE a.id IN (SELECT unnest(?::INTEGER[]))",
                              [ids]).fetchall():
        node = adapter_from_summary(values)
        lin.nodes[node.id] = node
    lin.nodes[root.id] = root  # the root keeps its full record
    # Edges inside the sub-graph: ancestor edges (child side in {root}∪ancestors) and descendant
    # edges (parent side in {root}∪descendants).
    up_ids = [root.id, *lin.ancestors]
    down_ids = [root.id, *lin.descendants]
    edge_rows = fetch_dicts(
        con,
        "SELECT * FROM lineage WHERE (child_id = ANY(?::INTEGER[]) AND parent_id = ANY(?::INTEGER[])) "
        "OR (parent_id = ANY(?::INTEGER[]) AND child_id = ANY(?::INTEGER[])) ORDER BY child_id, ord",
        [up_ids, up_ids, down_ids, down_ids],
    )
    lin.edges = [
        Edge(
            child_id=int(r["child_id"]),
            parent_id=int(r["parent_id"]),
            relation=r["relation"],
            weight=r["weight"],
            ord=int(r["ord"]),
            params=from_json(r["params"]),
        )
        for r in edge_rows
    ]
    for r in fetch_dicts(
        con,
        "SELECT ab.adapter_id, ab.batch_id, ab.role, b.sha256, b.num_rows FROM adapter_batches ab "
        "LEFT JOIN batches b ON b.id = ab.batch_id WHERE ab.adapter_id IN (SELECT unnest(?::INTEGER[])) "
        "ORDER BY ab.adapter_id, ab.role DESC, ab.batch_id",
        [ids],
    ):
        lin.batches.setdefault(int(r.pop("adapter_id")), []).append(r)
    return lin
