"""Aliases are movable pointers (MLflow-style ``@production``); every move is kept in history.

Rollback is moving the pointer back: nothing is deleted or unmerged. The history is read as a
stack, so repeated rollbacks keep walking back (C -> B -> A) instead of toggling between two nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb

from adapters_mgr.catalog.nodes import StoredNode, stored_nodes
from adapters_mgr.catalog.records import Ref, adapter_status, check_alias, fetch_ref, resolve
from adapters_mgr.catalog.sql import fetch_dicts, log_event, utcnow
from adapters_mgr.errors import Conflict, NotFound


def current_target(con: duckdb.DuckDBPyConnection, alias: str) -> int | None:
    row = con.execute("SELECT adapter_id FROM aliases WHERE name = ?", [alias]).fetchone()
    return None if row is None else int(row[0])


_UNKNOWN = object()


def move(
    con: duckdb.DuckDBPyConnection, alias: str, to_id: int, *, action: str, reason: str | None = None,
    previous: Any = _UNKNOWN,
) -> int | None:
    """Point ``alias`` at ``to_id`` and record the move; returns the previous target.

    ``previous`` saves a query when the caller already read the current target in this transaction.
    """
    if previous is _UNKNOWN:
        previous = current_target(con, alias)
    now = utcnow()
    if previous is None:
        con.execute("INSERT INTO aliases VALUES (?, ?, ?)", [alias, to_id, now])
    else:
        con.execute("UPDATE aliases SET adapter_id = ?, updated_at = ? WHERE name = ?", [to_id, now, alias])
    con.execute(
        "INSERT INTO alias_history (alias, from_id, to_id, action, reason, moved_at) VALUES (?, ?, ?, ?, ?, ?)",
        [alias, previous, to_id, action, reason, now],
    )
    return previous


def remove(con: duckdb.DuckDBPyConnection, alias: str, reason: str | None = None) -> int:
    previous = current_target(con, alias)
    if previous is None:
        raise NotFound(f"no alias {alias!r}; list them with `adapters-mgr alias`")
    con.execute("DELETE FROM aliases WHERE name = ?", [alias])
    con.execute(
        "INSERT INTO alias_history (alias, from_id, to_id, action, reason, moved_at) VALUES (?, ?, NULL, ?, ?, ?)",
        [alias, previous, "remove", reason, utcnow()],
    )
    return previous


def rollback_state(con: duckdb.DuckDBPyConnection, alias: str) -> tuple[int | None, list[int]]:
    """The alias's current target and its target stack, from one statement.

    Why one: rollback is a hot path and each DuckDB statement costs ~1 ms to plan here whatever
    it reads; the two reads as one UNION ALL (moves sorted in Python) saved ~0.7 ms a rollback.
    """
    rows = con.execute(
        "SELECT NULL AS id, adapter_id, NULL AS action FROM aliases WHERE name = $alias "
        "UNION ALL SELECT id, to_id, action FROM alias_history WHERE alias = $alias",
        {"alias": alias},
    ).fetchall()
    current = next((int(r[1]) for r in rows if r[0] is None), None)
    moves = sorted((r for r in rows if r[0] is not None), key=lambda r: r[0])
    return current, _stack([(to_id, action) for _, to_id, action in moves])


def _stack(moves: list[tuple[int | None, str]]) -> list[int]:
    """The alias's targets as a stack: forward moves push, rollbacks pop back to their target."""
    stack: list[int] = []
    for to_id, action in moves:
        if action == "remove" or to_id is None:
            stack = []
        elif action == "rollback" and to_id in stack:
            del stack[stack.index(to_id) + 1 :]
        else:
            stack.append(int(to_id))
    return stack


def rollback_target(alias: str, stack: list[int]) -> int:
    """The target a default rollback goes back to (``stack``: from :func:`rollback_state`)."""
    if len(stack) < 2:
        raise Conflict(
            f"alias {alias!r} has no earlier target to roll back to; use `rollback {alias} --to ID`"
        )
    return stack[-2]


def history(con: duckdb.DuckDBPyConnection, alias: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT id, alias, from_id, to_id, action, reason, moved_at FROM alias_history"
    params: list[Any] = []
    if alias is not None:
        sql += " WHERE alias = ?"
        params.append(alias)
    return fetch_dicts(con, sql + " ORDER BY id", params)


#: checks, in the move's transaction, that a node can be loaded (raises to refuse the move); the
#: store is not the catalog's to read, so :mod:`adapters_mgr.workflows.aliases` supplies it.
TargetCheck = Callable[[duckdb.DuckDBPyConnection, StoredNode, list[StoredNode]], None]


def point(con: duckdb.DuckDBPyConnection, alias: str, ref: Ref, *, action: str = "set",
          reason: str | None = None, check: TargetCheck | None = None) -> int:
    """Point ``alias`` at an active node and log it (``action``: set or promote); returns the node id.

    ``check`` (given the node's storage row and, for a stack, its members') runs before the move.
    """
    check_alias(alias)
    target = fetch_ref(con, ref)
    if target.status != "active":
        raise Conflict(f"adapter {target.id} is {target.status}; an alias can only point at an active one")
    if check is not None:
        check(con, *stored_nodes(con, target.id))
    previous = move(con, alias, target.id, action=action, reason=reason)
    log_event(con, action, {"alias": alias, "ref": ref, "reason": reason}, detail={"from": previous, "to": target.id})
    return target.id


def roll_back(con: duckdb.DuckDBPyConnection, alias: str, to: Ref | None = None, *,
              reason: str | None = None, check: TargetCheck | None = None) -> int:
    """Move ``alias`` back to its previous target (or to ``to``) and log it; returns the new target.

    ``check`` as in :func:`point`; its storage rows come from the statement that reads the status.
    """
    check_alias(alias)
    current, stack = rollback_state(con, alias)
    if current is None:
        raise NotFound(f"no alias {alias!r}; list them with `adapters-mgr alias`")
    target_id = resolve(con, to) if to is not None else rollback_target(alias, stack)
    # not fetch_adapter: rollback is a hot path
    stored = stored_nodes(con, target_id) if check is not None else None
    status = stored[0].status if stored is not None else adapter_status(con, target_id)
    if status != "active":
        raise Conflict(f"cannot roll {alias!r} back to adapter {target_id}: it is {status}")
    if check is not None and stored is not None:
        check(con, *stored)
    move(con, alias, target_id, action="rollback", reason=reason, previous=current)
    log_event(con, "rollback", {"alias": alias, "to": to, "reason": reason}, detail={"from": current, "to": target_id})
    return target_id


def remove_logged(con: duckdb.DuckDBPyConnection, alias: str, reason: str | None = None) -> int:
    """:func:`remove` plus its event row; returns the node the alias pointed at."""
    check_alias(alias)
    previous = remove(con, alias, reason)
    log_event(con, "remove_alias", {"alias": alias, "reason": reason}, detail={"from": previous})
    return previous


def list_aliases(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return fetch_dicts(
        con,
        "SELECT al.name AS alias, al.adapter_id, a.name || '@' || a.version AS ref, a.status, al.updated_at "
        "FROM aliases al JOIN adapters a ON a.id = al.adapter_id ORDER BY al.name",
    )
