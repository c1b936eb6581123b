"""Lineage as queries: ancestors and descendants of a node to any depth, with their data batches.

Both directions come from one recursive CTE over the chain index of :mod:`lineage_index` (the
recursion steps once per hop between linear chains, not once per generation), and the walk, the
nodes, their edges and batch links and the index check come back from one statement whatever the
depth: a 1,000-deep chain is neither 1,000 recursion steps nor several round trips.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
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
    # parent edges of descendants from nodes on the other side or outside the walk (a merged or
    # stack descendant's other sources); not part of ``edges`` (nor of to_dict), drawn by to_mermaid
    cross_edges: list[Edge] = field(default_factory=list)

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
        """A Mermaid flowchart: parents point to children, edges labelled with relation and weight.

        Every parent edge of a node in the graph is drawn, also those :attr:`edges` leaves out
        (a merged or stack descendant's other sources, :attr:`cross_edges`), so a merged node shows
        all its ``merged_from`` sources and a stack all its members. Batches are range nodes
        (``b000001–b000020 (20)``), one per run of consecutive ids, linked to each node with its role.
        """
        lines = ["graph TD"]
        for node_id, node in sorted(self.nodes.items()):
            label = f"{node.name}@{node.version}<br/>#{node.id} {node.kind}"
            if node.aliases:
                label += "<br/>[" + ", ".join(node.aliases) + "]"
            metrics = node.metrics or {}
            if "node_metrics" in metrics:
                metrics = metrics["node_metrics"] or {}
            primary = metrics.get(str(metrics.get("primary_metric")), metrics.get("primary"))
            if isinstance(primary, int | float) and not isinstance(primary, bool):
                label += f"<br/>{metrics.get('primary_metric', 'metric')} {primary:.4f}"
            lines.append(f'    n{node_id}["{_mermaid_text(label)}"]')
        outside = sorted({e.parent_id for e in self.cross_edges} - set(self.nodes))
        for node_id in outside:  # a source of a descendant that is not in this lineage itself
            lines.append(f'    n{node_id}["#{node_id}<br/>(not in this lineage)"]')
            lines.append(f"    style n{node_id} stroke-dasharray: 4 4")
        all_edges = sorted([*self.edges, *self.cross_edges], key=lambda e: (e.child_id, e.ord, e.parent_id))
        for edge in all_edges:
            text = edge.relation + (f" w={edge.weight:g}" if edge.weight is not None else "")
            lines.append(f"    n{edge.parent_id} -->|{text}| n{edge.child_id}")
        declared: set[str] = set()
        for node_id, links in sorted(self.batches.items()):
            for role, runs, _count in batch_groups(links):
                for run in runs:
                    key = "r_" + re.sub(r"[^A-Za-z0-9]", "_", f"{run[0]}_{run[1]}")
                    if key not in declared:
                        declared.add(key)
                        lines.append(f'    {key}[("{_mermaid_text(run_text(run, prefix=True))}")]')
                    lines.append(f"    {key} -.->|{_mermaid_text(role)}| n{node_id}")
        lines.append(f"    style n{self.root.id} stroke-width:3px")
        return "\n".join(lines)


# -- batch runs: what a node trained, replayed and was evaluated on, in a few words ---------------------

_NUMBERED = re.compile(r"^(.*?)(\d+)$")
# A role whose batches fall into more runs than this is summarised as a count over a span.
MAX_RUNS = 3
ROLE_ORDER = ("train", "eval", "replay")


def batch_runs(batch_ids: Iterable[str]) -> list[tuple[str, str, int]]:
    """Runs of consecutive batch ids as ``(first, last, count)``, in order.

    Consecutive means the same text before a trailing number and that number one higher
    (``b000007`` follows ``b000006``); an id without a trailing number is a run of its own.
    """
    def key(batch_id: str) -> tuple[str, int, str]:
        m = _NUMBERED.match(batch_id)
        return (m.group(1), int(m.group(2)), batch_id) if m else (batch_id, -1, batch_id)

    runs: list[list[Any]] = []  # [first, last, count, prefix, number]
    for prefix, number, batch_id in sorted({key(str(b)) for b in batch_ids}):
        last = runs[-1] if runs else None
        if last is not None and number >= 0 and last[3] == prefix and last[4] == number - 1:
            last[1], last[2], last[4] = batch_id, last[2] + 1, number
        else:
            runs.append([batch_id, batch_id, 1, prefix, number])
    return [(r[0], r[1], r[2]) for r in runs]


def run_text(run: tuple[str, str, int], *, prefix: bool = False) -> str:
    """``b000001–b000020 (20)``, or ``b000021`` for a run of one (``batch(es) ...`` with ``prefix``);
    a summarised run (negative count, see :func:`batch_groups`) reads ``b000001–b000030 (9 runs)``."""
    first, last, count = run
    if count < 0:
        return ("batches " if prefix else "") + f"{first}–{last} ({-count} runs)"
    if count == 1:
        return f"batch {first}" if prefix else first
    return ("batches " if prefix else "") + f"{first}–{last} ({count})"


def batch_groups(links: Iterable[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str, int]], int]]:
    """A node's batch links as ``(role, runs, count)``: train, eval, replay first, then other roles.

    A role spread over more than :data:`MAX_RUNS` runs comes back as ONE run spanning them all whose
    count (the batches in it) is less than the span holds; :func:`batch_summary` says so in words.
    """
    by_role: dict[str, list[str]] = {}
    for link in links:
        by_role.setdefault(str(link["role"]), []).append(str(link["batch_id"]))
    groups = []
    for role in sorted(by_role, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r)):
        runs = batch_runs(by_role[role])
        count = sum(r[2] for r in runs)
        if len(runs) > MAX_RUNS:
            runs = [(runs[0][0], runs[-1][1], -len(runs))]  # a negative count: this many runs, summarised
        groups.append((role, runs, count))
    return groups


def batch_summary(links: Iterable[dict[str, Any]]) -> str:
    """``train b000001–b000020 (20) · eval b000021 · replay 23 batches in b000001–b000030 (9 runs)``."""
    parts = []
    for role, runs, count in batch_groups(links):
        if runs[0][2] < 0:  # summarised
            parts.append(f"{role} {count} batches in {runs[0][0]}–{runs[0][1]} ({-runs[0][2]} runs)")
        elif len(runs) == 1:
            parts.append(f"{role} {run_text(runs[0])}")
        else:
            parts.append(f"{role} " + ", ".join(a if n == 1 else f"{a}–{b}" for a, b, n in runs) + f" ({count})")
    return " · ".join(parts)


def _mermaid_text(text: str) -> str:
    """Text inside a Mermaid label: its quote and pipe characters as entity codes."""
    return text.replace('"', "#quot;").replace("|", "#124;")


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
    edges: list[Edge] = []
    cross_edges: list[Edge] = []
    for a, b, c, weight, order, params in edge_rows:
        if (a in up and b in up) or (a in down and b in down):
            edges.append(Edge(child_id=a, parent_id=b, relation=c, weight=weight, ord=order, params=from_json(params)))
        elif a in descendants:  # a descendant's other source: on the ancestors' side or outside the walk
            cross_edges.append(Edge(child_id=a, parent_id=b, relation=c, weight=weight, ord=order,
                                    params=from_json(params)))
    for links in batches.values():
        if len(links) > 1:
            links.sort(key=lambda link: (link["role"] != "train", link["role"], link["batch_id"]))
    return Lineage(root=root, ancestors=ancestors, descendants=descendants, nodes=nodes, edges=edges, batches=batches,
                   cross_edges=cross_edges)


def _with_heavy_columns(node: Adapter, heavy: str) -> Adapter:
    """The root's full record: the summary plus the columns that summaries leave out (one JSON
    object, in which the JSON columns are already values)."""
    for name, value in json.loads(heavy).items():
        setattr(node, name, value)
    return node
