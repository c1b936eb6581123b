"""Alias moves that refuse unloadable targets: set, promote and rollback check the target's files.

An alias is what serving loads, so it must never point at weights that are gone or changed. Each move
runs in one catalog transaction: resolve the target, check that its files (for a stack, every
member's) exist and match their sha256, then move. The check and the move are consistent with the
catalog (no other writer can move the alias or change the rows in between); a concurrent ``gc``
removing files meanwhile is not covered (gc only removes folders no active row names, or ones whose
bytes no longer match).

Cost: one sha256 of the adapter's weights and config (~0.3-1 ms for a 300 KB LoRA) and no extra
statement for a plain adapter (the storage row comes from the statement that reads the status).
"""

from __future__ import annotations

import duckdb

from adapters_mgr.catalog import aliases as alias_ops
from adapters_mgr.catalog.nodes import StoredNode, stored_nodes
from adapters_mgr.catalog.records import Ref
from adapters_mgr.errors import IntegrityError
from adapters_mgr.workflows.workspace import Workspace

FIX_HINT = "see `adapters-mgr verify`; `adapters-mgr gc` marks such nodes missing or corrupt"


def check_loadable(ws: Workspace, alias: str, action: str) -> alias_ops.TargetCheck:
    """A :data:`~adapters_mgr.catalog.aliases.TargetCheck` that refuses (``IntegrityError``, one line)
    a target whose files, or a stack member's, are missing or differ from their checksums."""

    def check(con: duckdb.DuckDBPyConnection, node: StoredNode, members: list[StoredNode]) -> None:
        pending = list(members) if node.kind == "stack" else [node]
        seen: set[int] = set()
        while pending:
            item = pending.pop(0)
            if item.id in seen:
                continue
            seen.add(item.id)
            if item.kind == "stack":  # a stack of stacks: its members too
                pending.extend(stored_nodes(con, item.id)[1])
                continue
            whose = "" if item.id == node.id else f"its member adapter {item.id} ({item.ref}) "
            if item.status in ("missing", "corrupt"):
                raise IntegrityError(f"cannot {action} {alias!r} to adapter {node.id} ({node.ref}): {whose}is marked "
                                     f"{item.status}; alias unchanged; {FIX_HINT}")
            if item.store_key is None or item.weights_sha256 is None:
                raise IntegrityError(f"cannot {action} {alias!r} to adapter {node.id} ({node.ref}): {whose}has no "
                                     f"weights recorded; alias unchanged; {FIX_HINT}")
            label = f"adapter {item.id} ({item.ref})"
            try:
                ws.store.verified_path(item.store_key, item.weights_sha256, item.config_sha256, label)
            except IntegrityError as exc:
                detail = str(exc).split("; run `adapters-mgr verify`")[0]
                detail = detail.removeprefix(f"{label}: ") if item.id == node.id else f"its member {detail}"
                raise IntegrityError(f"cannot {action} {alias!r} to adapter {node.id} ({node.ref}): {detail}; alias "
                                     f"unchanged; {FIX_HINT}") from exc

    return check


def set_alias(ws: Workspace, alias: str, ref: Ref, *, action: str = "set", reason: str | None = None) -> int:
    """Point ``alias`` at a node whose files check out (``action``: set or promote); returns its id."""
    with ws.catalog.transaction() as con:
        return alias_ops.point(con, alias, ref, action=action, reason=reason,
                               check=check_loadable(ws, alias, action))


def rollback(ws: Workspace, alias: str, to: Ref | None = None, *, reason: str | None = None) -> int:
    """Move ``alias`` back (to its previous target, or ``to``) if the target's files check out."""
    with ws.catalog.transaction() as con:
        return alias_ops.roll_back(con, alias, to, reason=reason, check=check_loadable(ws, alias, "roll back"))


__all__ = ["check_loadable", "rollback", "set_alias"]
