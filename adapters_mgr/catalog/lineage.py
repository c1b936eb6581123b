"""Lineage as queries: ancestors and descendants of a node to any depth, with their data batches.

Both directions come from one recursive CTE over the chain index of :mod:`lineage_index` (the
recursion steps once per hop between linear chains, not once per generation), and the walk, the
nodes, their edges and batch links and the index check come back from one statement whatever the
depth: a 1,000-deep chain is neither 1,000 recursion steps nor several round trips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import duckdb

from adapters_mgr.catalog import lineage_index
from adapters_mgr.catalog.records import (
    ALIASES_JOIN,
    SUMMARY_COLUMNS,
    Adapter,
    adapters_from_summaries,
)
from adapters_mgr.catalog.sql import atomic, from_json
from adapters_mgr.errors import NotFound

# Both walks in one recursive CTE over the chain index (see lineage_index): the recursion steps once
# per hop between chains (``dir`` says which way), and each visited chain contributes its members by
# a range on ``pos``. A chain reached twice (a DAG) keeps the smallest depth per node. One recursive
# CTE instead of one per direction halves DuckDB's fixed cost per recursive query (~1.2 ms here).
# ``{root}`` and ``{max_depth}`` are integers.
WALK_SQL = """
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

# Everything else in the same statement, as one row set: ``k`` says what a row is. Why one
# statement: on a 2-core machine each statement costs ~1-3 ms of binding and optimising whatever it
# reads; five statements (root, index check, walk, nodes, edges) cost ~7 ms more than this one
# (measured alternated in one process, 100k catalog). 'n' rows are nodes (the root, dir = 'root',
# also carries the columns that summaries omit, as one JSON text), 'e' rows are candidate edges
# (every edge into a node of the sub-graph; load_lineage keeps those whose other end is on the same
# side), 'b' rows are batch links, and the one 'c' row says whether the chain index is current
# (:data:`lineage_index.IS_CURRENT_SQL`).
# Edge and batch rows reuse node columns of matching SQL types (_EDGE_AT, _BATCH_AT) instead of
# columns of their own: every cell of every row is a value to convert when fetching, and 3,000 rows
# x 34 columns, two thirds of them NULL padding, took ~5 ms of a ~30 ms call.
# No ORDER BY: sorting the ~3,000 mixed rows cost ~4 ms in DuckDB; Python sorts the edge list and
# each node's batch links instead (well under a millisecond).
# the Adapter columns a summary leaves out (the root's node row carries them)
_HEAVY = tuple(f.name for f in fields(Adapter)
               if f.name not in (*SUMMARY_COLUMNS, "created_at", "updated_at", "aliases"))
_NODE_COLUMNS = ("k", "depth", "dir", *SUMMARY_COLUMNS, "created_us", "updated_us", "aliases", "heavy", "weight")
_COL = {name: i for i, name in enumerate(_NODE_COLUMNS)}
# the column each field of an edge / a batch link travels in
_EDGE_AT = {"child_id": "id", "parent_id": "version", "relation": "kind", "weight": "weight", "ord": "lora_rank",
            "params": "metrics"}
_BATCH_AT = {"adapter_id": "id", "batch_id": "name", "role": "kind", "sha256": "weights_sha256", "num_rows": "bytes"}
# positions of those fields in a fetched row, in the order load_lineage unpacks them
_EDGE_POS = [_COL[_EDGE_AT[f]] for f in ("child_id", "parent_id", "relation", "weight", "ord", "params")]
_BATCH_POS = [_COL[_BATCH_AT[f]] for f in ("adapter_id", "batch_id", "role", "sha256", "num_rows")]


def _row(kind: str, values: dict[str, str]) -> str:
    """SELECT list of a non-node row: ``values`` (column -> SQL) in their columns, NULL elsewhere."""
    return ", ".join([f"'{kind}'"] + [values.get(col, "NULL") for col in _NODE_COLUMNS[1:]])


_QUERY = WALK_SQL.replace("\nSELECT m.adapter_id", ",\nwalk AS MATERIALIZED (\nSELECT m.adapter_id", 1) + f"""
    UNION ALL SELECT {{root}}, 0, 'root'
)
SELECT 'n' AS k, w.depth, w.dir, {', '.join('a.' + c for c in SUMMARY_COLUMNS)},
       epoch_us(a.created_at), epoch_us(a.updated_at), coalesce(al.names, []),
       CASE WHEN w.dir = 'root' THEN json_object({', '.join(f"'{c}', a.{c}" for c in _HEAVY)})::VARCHAR END,
       NULL::DOUBLE
FROM walk w JOIN adapters a ON a.id = w.id {ALIASES_JOIN}
UNION ALL
SELECT {_row('e', {_EDGE_AT[f]: f for f in _EDGE_AT})}
FROM lineage WHERE child_id IN (SELECT id FROM walk)
UNION ALL
SELECT {_row('b', {_BATCH_AT["adapter_id"]: "ab.adapter_id", _BATCH_AT["batch_id"]: "ab.batch_id",
                   _BATCH_AT["role"]: "ab.role", _BATCH_AT["sha256"]: "b.sha256", _BATCH_AT["num_rows"]: "b.num_rows"})}
FROM adapter_batches ab LEFT JOIN batches b ON b.id = ab.batch_id
WHERE ab.adapter_id IN (SELECT id FROM walk)
UNION ALL
SELECT {_row('c', {"id": f"({lineage_index.IS_CURRENT_SQL})::INTEGER"})}
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

    _adjacency: tuple[int, dict[int, list[Edge]], dict[int, list[Edge]]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def parents_of(self, node_id: int) -> list[Edge]:
        """The node's parent edges, in merge/stack order."""
        return list(self._edge_index()[1].get(node_id, ()))

    def children_of(self, node_id: int) -> list[Edge]:
        """The node's child edges, by child id."""
        return list(self._edge_index()[2].get(node_id, ()))

    def _edge_index(self) -> tuple[int, dict[int, list[Edge]], dict[int, list[Edge]]]:
        """Edges by child and by parent, built once. Why: a tree walk asks for every node's edges,
        and scanning the edge list each time made printing a 5,000-node lineage take ~0.8 s."""
        if self._adjacency is None or self._adjacency[0] != len(self.edges):  # rebuilt if edges were added
            by_child: dict[int, list[Edge]] = {}
            by_parent: dict[int, list[Edge]] = {}
            for edge in self.edges:
                by_child.setdefault(edge.child_id, []).append(edge)
                by_parent.setdefault(edge.parent_id, []).append(edge)
            for group in by_child.values():
                group.sort(key=lambda e: (e.ord, e.parent_id))
            for group in by_parent.values():
                group.sort(key=lambda e: e.child_id)
            self._adjacency = (len(self.edges), by_child, by_parent)
        return self._adjacency

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


def load_lineage(con: duckdb.DuckDBPyConnection, root_id: int, *, max_depth: int = 1_000_000) -> Lineage:
    """The whole answer from one statement (see :data:`_QUERY`); a second one only when rows reached
    ``lineage`` by plain SQL, after rebuilding the derived chain index they made stale."""
    sql = _QUERY.format(root=int(root_id), max_depth=int(max_depth))
    rows = con.execute(sql).fetchall()
    if not next(r[_COL["id"]] for r in rows if r[0] == "c"):  # stale index: the walk was wrong
        with atomic(con):
            lineage_index.rebuild(con)
        rows = con.execute(sql).fetchall()
    root: Adapter | None = None
    nodes: dict[int, Adapter] = {}
    ancestors: dict[int, int] = {}
    descendants: dict[int, int] = {}
    node_rows = [values for values in rows if values[0] == "n"]
    for values, node in zip(node_rows, adapters_from_summaries(node_rows, 3), strict=True):
        direction = values[2]
        if direction == "root":
            root = _with_heavy_columns(node, values[_COL["heavy"]])
        else:
            (ancestors if direction == "up" else descendants)[node.id] = values[1]
            nodes[node.id] = node
    if root is None:
        raise NotFound(f"no adapter with id {root_id}; list them with `adapters-mgr ls`")
    nodes[root.id] = root  # the root keeps its full record
    edge_rows = []
    batches: dict[int, list[dict[str, Any]]] = {}
    for values in rows:
        kind = values[0]
        if kind == "e":
            edge_rows.append([values[i] for i in _EDGE_POS])
        elif kind == "b":
            a, batch_id, role, sha, num_rows = (values[i] for i in _BATCH_POS)
            batches.setdefault(a, []).append({"batch_id": batch_id, "role": role, "sha256": sha, "num_rows": num_rows})
    up = {root.id, *ancestors}
    down = {root.id, *descendants}
    edge_rows.sort(key=lambda r: (r[0], r[4], r[1], r[2]))  # child, order, parent, relation
    edges = [
        Edge(child_id=a, parent_id=b, relation=c, weight=weight, ord=order, params=from_json(params))
        for a, b, c, weight, order, params in edge_rows
        if (a in up and b in up) or (a in down and b in down)
    ]
    for links in batches.values():
        if len(links) > 1:
            links.sort(key=lambda link: (link["role"] != "train", link["role"], link["batch_id"]))
    return Lineage(root=root, ancestors=ancestors, descendants=descendants, nodes=nodes, edges=edges, batches=batches)


def _with_heavy_columns(node: Adapter, heavy: str) -> Adapter:
    """The root's full record: the summary plus the columns that summaries leave out (one JSON
    object, in which the JSON columns are already values)."""
    for name, value in json.loads(heavy).items():
        setattr(node, name, value)
    return node
