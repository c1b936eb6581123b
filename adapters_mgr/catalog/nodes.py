"""Catalog nodes: inserting a node with its edges and batch links, listing, members, delete/restore.

Everything here runs on an open connection inside the caller's transaction, so a workflow can put
several nodes (a trained adapter and its stack node) and their event in one commit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from adapters_mgr.catalog import lineage_index
from adapters_mgr.catalog.lineage import load_lineage
from adapters_mgr.catalog.records import (
    ADAPTER_JSON_ROW,
    ADAPTER_SELECT,
    KINDS,
    RELATIONS,
    STATUSES,
    Adapter,
    Ref,
    fetch_adapter,
    fetch_ref,
    resolve,
)
from adapters_mgr.catalog.sql import fetch_dicts, log_event, to_json, utcnow
from adapters_mgr.errors import Conflict, InvalidInput, NotFound

DEFAULT_RELATION = {"trained": "warm_start", "merged": "merged_from", "stack": "stacked_on", "imported": "imported"}
BATCH_ROLES = ("train", "eval", "replay")


@dataclass(frozen=True)
class ParentSpec:
    """A lineage edge to create: which parent, how related, with what weight and parameters."""

    ref: Ref
    relation: str | None = None
    weight: float | None = None
    params: dict[str, Any] | None = None

    @classmethod
    def coerce(cls, value: Any) -> ParentSpec:
        if isinstance(value, ParentSpec):
            return value
        if isinstance(value, dict):
            ref = value.get("ref", value.get("id"))
            return cls(ref, value.get("relation"), value.get("weight"), value.get("params"))
        if isinstance(value, tuple | list):
            return cls(*value)
        return cls(value)


def batch_links(batches: Any, eval_batches: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``(batch_id, role)`` pairs from batch ids (role ``train``), pairs, or a ``{role: ids}`` dict."""
    links: list[tuple[str, str]] = []
    if isinstance(batches, dict):
        for role, ids in batches.items():
            links += [(str(b), role) for b in ids]
    else:
        for item in batches or ():
            links.append((str(item[0]), str(item[1])) if isinstance(item, tuple | list) else (str(item), "train"))
    links += [(str(b), "eval") for b in eval_batches]
    for _, role in links:
        if role not in BATCH_ROLES:
            raise InvalidInput(f"invalid batch role {role!r}: use one of {', '.join(BATCH_ROLES)}")
    return list(dict.fromkeys(links))


def param_count(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def stack_columns(
    trainable: int, weights: Sequence[float], mode: str, *, metrics: dict[str, Any] | None = None,
    hyperparams: dict[str, Any] | None = None, description: str | None = None,
) -> dict[str, Any]:
    """Catalog columns of a stack node: it has no weights file, only its members and how they combine."""
    return {
        "trainable_params": trainable,
        "hyperparams": to_json({"mode": mode, "weights": list(weights), **(hyperparams or {})}),
        "metrics": to_json(metrics or {}),
        "description": description,
    }


def check_refs(con: duckdb.DuckDBPyConnection, parents: list[ParentSpec], links: list[tuple[str, str]],
               kind: str) -> None:
    """Every parent resolves, every relation is known and every batch exists (before any bytes move)."""
    for spec in parents:
        resolve(con, spec.ref)
        relation = spec.relation or DEFAULT_RELATION[kind]
        if relation not in RELATIONS:
            raise InvalidInput(f"invalid relation {relation!r}: use one of {', '.join(RELATIONS)}")
    for batch_id, _ in links:
        if con.execute("SELECT 1 FROM batches WHERE id = ?", [batch_id]).fetchone() is None:
            raise NotFound(f"no data batch {batch_id!r}; list them with `adapters-mgr data batches`")


def insert_node(
    con: duckdb.DuckDBPyConnection,
    *,
    name: str,
    kind: str,
    task: str | None,
    base_id: str,
    parents: list[ParentSpec],
    links: list[tuple[str, str]],
    columns: dict[str, Any],
    stack_mode: str | None = None,
    event_detail: dict[str, Any] | None = None,
) -> int:
    """The node row with the next version of its name, its edges, batch links and event.

    Same name + same bytes + same base + same parents returns the existing id (logged ``exists``), so
    retries are safe. The same bytes on another base are another node: a node is bytes + base + lineage.
    ``event_detail`` is added to the register event's detail.
    """
    parent_ids = [resolve(con, p.ref) for p in parents]
    existing = _find_identical(con, name, columns.get("weights_sha256"), columns.get("config_sha256"),
                               parent_ids, kind, base_id)
    if existing is not None:
        log_event(con, "register", {"name": name}, outcome="exists", detail={"id": existing})
        return existing
    for pid in parent_ids:
        parent = fetch_adapter(con, pid)
        if parent.status != "active":
            raise Conflict(f"parent adapter {pid} is {parent.status}; restore it or choose another parent")
        if parent.base_id != base_id:
            raise Conflict(
                f"parent adapter {pid} was trained on base {parent.base_id}, not {base_id}; "
                "lineage cannot cross bases"
            )
    version_row = con.execute("SELECT coalesce(max(version), 0) + 1 FROM adapters WHERE name = ?", [name]).fetchone()
    assert version_row is not None
    now = utcnow()
    cols = {
        "name": name,
        "version": int(version_row[0]),
        "kind": kind,
        "task": task,
        "base_id": base_id,
        "stack_mode": stack_mode,
        "status": "active",
        "created_at": now,
        "updated_at": now,
        **columns,
    }
    row = con.execute(
        f"INSERT INTO adapters ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) RETURNING id",
        list(cols.values()),
    ).fetchone()
    assert row is not None
    node_id = int(row[0])
    for order, (spec, pid) in enumerate(zip(parents, parent_ids, strict=True)):
        con.execute(
            "INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?)",
            [node_id, pid, spec.relation or DEFAULT_RELATION[kind], spec.weight, order, to_json(spec.params)],
        )
    lineage_index.index_node(con, node_id, parent_ids)
    for batch_id, role in links:
        con.execute("INSERT INTO adapter_batches VALUES (?, ?, ?)", [node_id, batch_id, role])
    log_event(
        con,
        "register",
        {"name": name, "kind": kind, "parents": parent_ids, "batches": links},
        detail={"id": node_id, "version": cols["version"], "weights_sha256": columns.get("weights_sha256"),
                **(event_detail or {})},
    )
    return node_id


def _find_identical(con: duckdb.DuckDBPyConnection, name: str, weights_sha: str | None, config_sha: str | None,
                    parent_ids: list[int], kind: str, base_id: str) -> int | None:
    """The active node this registration repeats: same name, bytes, kind, base and parents."""
    if weights_sha is None:
        return None
    rows = con.execute(
        "SELECT id FROM adapters WHERE name = ? AND weights_sha256 = ? AND config_sha256 = ? AND kind = ? "
        "AND base_id = ? AND status = 'active' ORDER BY id",
        [name, weights_sha, config_sha, kind, base_id],
    ).fetchall()
    for (candidate,) in rows:
        existing = [r[0] for r in con.execute(
            "SELECT parent_id FROM lineage WHERE child_id = ? ORDER BY ord", [candidate]).fetchall()]
        if existing == parent_ids:
            return int(candidate)
    return None


def list_filter(
    con: duckdb.DuckDBPyConnection, *, name: str | None = None, kind: str | None = None, alias: str | None = None,
    status: str | None = "active", base: str | None = None, task: str | None = None, limit: int | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE / ORDER / LIMIT tail shared by :func:`list_nodes` and :func:`list_nodes_json`."""
    where: list[str] = []
    params: list[Any] = []
    if name is not None:
        where.append("a.name = ?")
        params.append(name)
    if kind is not None:
        if kind not in KINDS:
            raise InvalidInput(f"invalid kind {kind!r}: use one of {', '.join(KINDS)}")
        where.append("a.kind = ?")
        params.append(kind)
    if status not in (None, "all"):
        if status not in STATUSES:
            raise InvalidInput(f"invalid status {status!r}: use one of {', '.join(STATUSES)} or all")
        where.append("a.status = ?")
        params.append(status)
    if task is not None:
        where.append("a.task = ?")
        params.append(task)
    if alias is not None:
        where.append("a.id IN (SELECT adapter_id FROM aliases WHERE name = ?)")
        params.append(alias)
    if base is not None:
        row = con.execute(
            "SELECT id FROM base_models WHERE id = ? OR name = ? OR weights_sha256 LIKE ?",
            [base, base, f"{base}%"],
        ).fetchone()
        if row is None:
            raise NotFound(f"no base model {base!r}; list them with `adapters-mgr bases`")
        where.append("a.base_id = ?")
        params.append(row[0])
    if limit is not None and limit < 0:
        raise InvalidInput(f"limit must be >= 0, got {limit}")
    sql = (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.id DESC"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, params


def list_nodes(con: duckdb.DuckDBPyConnection, **filters: Any) -> list[Adapter]:
    """Catalog nodes, newest first (filters: see :func:`list_filter`)."""
    where, params = list_filter(con, **filters)
    return [Adapter.from_row(r) for r in fetch_dicts(con, ADAPTER_SELECT + where, params)]


def list_nodes_json(con: duckdb.DuckDBPyConnection, **filters: Any) -> str:
    """The same rows as :func:`list_nodes`, as a JSON array rendered by DuckDB (fast for scripts)."""
    where, params = list_filter(con, **filters)
    sql = f"SELECT coalesce(to_json(list(j ORDER BY j.id DESC)), '[]')::VARCHAR FROM ({ADAPTER_JSON_ROW}{where}) j"
    row = con.execute(sql, params).fetchone()
    assert row is not None
    return str(row[0])


def node_members(con: duckdb.DuckDBPyConnection, node: Adapter) -> tuple[list[tuple[Adapter, float]], str]:
    """The adapters a node activates, with weights, and how they combine (for a plain adapter: itself)."""
    if node.kind != "stack":
        return [(node, 1.0)], "weights"
    lin = load_lineage(con, node.id, max_depth=1)
    members = [(lin.nodes[e.parent_id], e.weight if e.weight is not None else 1.0)
               for e in lin.parents_of(node.id) if e.relation == "stacked_on"]
    return members, node.stack_mode or "weights"


@dataclass(frozen=True)
class StoredNode:
    """What it takes to check that a node can be loaded: its status and where its bytes are."""

    id: int
    ref: str
    kind: str
    status: str
    store_key: str | None
    weights_sha256: str | None
    config_sha256: str | None


_STORED_COLUMNS = "a.id, a.name, a.version, a.kind, a.status, a.store_key, a.weights_sha256, a.config_sha256"


def _stored(row: tuple[Any, ...]) -> StoredNode:
    return StoredNode(int(row[0]), f"{row[1]}@{row[2]}", *row[3:])


def stored_nodes(con: duckdb.DuckDBPyConnection, node_id: int) -> tuple[StoredNode, list[StoredNode]]:
    """A node's storage row and, for a stack, its members' (in order).

    A plain adapter costs one primary-key lookup, as cheap as reading its status (~0.7 ms here), because
    rollback, a hot path, calls this; a stack costs a second statement for its members (a single
    UNION ALL over both cost ~3 ms: the lineage join is planned even when it finds nothing).
    """
    row = con.execute(f"SELECT {_STORED_COLUMNS} FROM adapters a WHERE a.id = ?", [node_id]).fetchone()
    if row is None:
        raise NotFound(f"no adapter with id {node_id}; list them with `adapters-mgr ls`")
    node = _stored(row)
    if node.kind != "stack":
        return node, []
    rows = con.execute(
        f"SELECT {_STORED_COLUMNS} FROM lineage l JOIN adapters a ON a.id = l.parent_id "
        "WHERE l.child_id = ? AND l.relation = 'stacked_on' ORDER BY l.ord",
        [node_id],
    ).fetchall()
    return node, [_stored(r) for r in rows]


def newest_templates(con: duckdb.DuckDBPyConnection, adapters: list[Adapter]) -> dict[str, str] | None:
    """The text templates recorded by the newest of ``adapters`` that recorded any (None: none did).

    Why: a model reads text rendered the way it was trained; after ``data set-template`` the catalog
    renders differently, but a node trained before keeps its own templates.
    """
    for adapter in sorted(adapters, key=lambda a: a.id, reverse=True):
        full = adapter if adapter.hyperparams is not None else fetch_adapter(con, adapter.id)
        recorded = (full.hyperparams or {}).get("templates")
        if recorded:
            return dict(recorded)
    return None


def soft_delete(con: duckdb.DuckDBPyConnection, ref: Ref, *, force: bool, reason: str | None) -> int:
    """Mark a node deleted (row and files stay); refused while an alias or an active child needs it."""
    node = fetch_ref(con, ref)
    if node.status == "deleted":
        raise Conflict(f"adapter {node.id} is already deleted")
    blockers = []
    if node.aliases:
        blockers.append(f"alias {', '.join(node.aliases)} points at it")
    children = [r[0] for r in con.execute(
        "SELECT DISTINCT l.child_id FROM lineage l JOIN adapters c ON c.id = l.child_id "
        "WHERE l.parent_id = ? AND c.status = 'active' ORDER BY 1", [node.id]).fetchall()]
    if children:
        blockers.append(f"active descendants {children} need it")
    if blockers and not force:
        raise Conflict(f"cannot delete adapter {node.id}: {'; '.join(blockers)} (use --force to override)")
    con.execute("UPDATE adapters SET status = 'deleted', updated_at = ? WHERE id = ?", [utcnow(), node.id])
    log_event(con, "delete", {"ref": ref, "force": force, "reason": reason},
              outcome="forced" if blockers else "ok", detail={"id": node.id, "blockers": blockers})
    return node.id


def restore(con: duckdb.DuckDBPyConnection, ref: Ref) -> int:
    """Undo a soft delete."""
    node = fetch_ref(con, ref)
    if node.status != "deleted":
        raise Conflict(f"adapter {node.id} is {node.status}, not deleted")
    con.execute("UPDATE adapters SET status = 'active', updated_at = ? WHERE id = ?", [utcnow(), node.id])
    log_event(con, "restore", {"ref": ref}, detail={"id": node.id})
    return node.id


def set_status(con: duckdb.DuckDBPyConnection, adapter_id: int, status: str) -> None:
    """Mark a node ``missing`` / ``corrupt`` (gc) or back; rows are never deleted."""
    con.execute("UPDATE adapters SET status = ?, updated_at = ? WHERE id = ?", [status, utcnow(), adapter_id])
