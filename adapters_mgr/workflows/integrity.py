"""verify and gc: the catalog and the store checked against each other, and the mess of crashes tidied.

verify changes nothing. gc removes orphan folders and staging leftovers and marks rows whose files
are gone ``missing`` or whose bytes changed ``corrupt``; rows are never deleted (lineage keeps its
nodes), and folders younger than ``grace`` may be a registration in flight in another process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from adapters_mgr.catalog import lineage_index, nodes
from adapters_mgr.catalog.sql import log_event
from adapters_mgr.errors import IntegrityError, InvalidInput
from adapters_mgr.store import GC_GRACE_SECONDS, age_seconds
from adapters_mgr.workflows.workspace import Workspace


def verify(ws: Workspace) -> dict[str, Any]:
    """Check every stored file against the catalog; report orphans both ways. Changes nothing."""
    problems: list[dict[str, Any]] = []
    rows = ws.catalog.query(
        "SELECT id, name, version, store_key, weights_sha256, config_sha256, status FROM adapters "
        "WHERE store_key IS NOT NULL ORDER BY id"
    )
    referenced: set[str] = set()
    checked: dict[str, str | None] = {}
    for row in rows:
        key = row["store_key"]
        referenced.add(key)
        if row["status"] in ("missing", "corrupt"):
            continue
        if key not in checked:
            try:
                ws.store.verified_path(key, row["weights_sha256"], row["config_sha256"], f"adapter {row['id']}")
                checked[key] = None
            except IntegrityError as exc:
                checked[key] = "missing" if not ws.store.path(key).exists() else "checksum_mismatch"
                problems.append({"kind": checked[key], "adapter_id": row["id"], "store_key": key,
                                 "detail": str(exc)})
                continue
        elif checked[key] is not None:
            problems.append({"kind": checked[key], "adapter_id": row["id"], "store_key": key,
                             "detail": "shares a damaged folder"})
    for key in ws.store.keys():  # noqa: SIM118 - a method, not a dict
        if key not in referenced:
            problems.append({"kind": "orphan_folder", "store_key": key,
                             "detail": f"{ws.store.path(key)} has no catalog row"})
    for tmp in ws.store.tmp_dirs():
        problems.append({"kind": "staging_leftover", "path": str(tmp), "detail": "left by an interrupted write"})
    dangling = ws.catalog.query(
        "SELECT l.child_id, l.parent_id FROM lineage l LEFT JOIN adapters p ON p.id = l.parent_id "
        "LEFT JOIN adapters c ON c.id = l.child_id WHERE p.id IS NULL OR c.id IS NULL"
    )
    problems += [{"kind": "dangling_edge", **d, "detail": "lineage edge to an unknown node"} for d in dangling]
    alias_bad = ws.catalog.query(
        "SELECT al.name, al.adapter_id FROM aliases al LEFT JOIN adapters a ON a.id = al.adapter_id "
        "WHERE a.id IS NULL OR a.status <> 'active'"
    )
    problems += [{"kind": "alias_to_inactive", **a, "detail": "alias points at a node that is not active"}
                 for a in alias_bad]
    with ws.catalog.connect() as con:
        if not lineage_index.is_current(con):
            problems.append({"kind": "stale_lineage_index",
                             "detail": "lineage rows were written without the API; gc (or the next lineage "
                                       "call) rebuilds lineage_chain / lineage_hops"})
    return {"ok": not problems, "adapters_checked": len(rows), "folders": len(ws.store.keys()),
            "problems": problems}


def gc(ws: Workspace, *, dry_run: bool = False, grace: float = GC_GRACE_SECONDS) -> dict[str, Any]:
    """Tidy what :func:`verify` finds (see :meth:`adapters_mgr.AdapterManager.gc` for ``grace``)."""
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise InvalidInput(f"grace must be a number of seconds >= 0, got {grace!r}")
    report = verify(ws)
    actions: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    marks: list[tuple[int, str]] = []
    quarantined: set[str] = set()

    def young(kind: str, path: Path, where: dict[str, Any]) -> bool:
        if grace <= 0:
            return False
        age = age_seconds(path)
        if age is None or age >= grace:
            return False
        entry = {"action": "skip", "kind": kind, **where, "age_s": round(age, 1),
                 "reason": "skipped (younger than grace)"}
        actions.append(entry)
        skipped.append(entry)
        return True

    for problem in report["problems"]:
        kind = problem["kind"]
        if kind == "orphan_folder":
            key = problem["store_key"]
            if young(kind, ws.store.path(key), {"store_key": key}):
                continue
            actions.append({"action": "remove_folder", "store_key": key})
            if not dry_run:
                ws.store.remove(key)
        elif kind == "staging_leftover":
            if young(kind, Path(problem["path"]), {"path": problem["path"]}):
                continue
            actions.append({"action": "remove_staging", "path": problem["path"]})
            if not dry_run:
                shutil.rmtree(problem["path"], ignore_errors=True)
        elif kind == "stale_lineage_index":
            actions.append({"action": "rebuild_lineage_index"})
        elif kind in ("missing", "checksum_mismatch"):
            status = "missing" if kind == "missing" else "corrupt"
            marks.append((problem["adapter_id"], status))
            actions.append({"action": f"mark_{status}", "adapter_id": problem["adapter_id"]})
            key = problem["store_key"]
            if kind == "checksum_mismatch" and key not in quarantined:
                quarantined.add(key)
                actions.append({"action": "quarantine_folder", "store_key": key})
                if not dry_run:
                    ws.store.quarantine(key)
    if not dry_run:
        with ws.catalog.transaction() as con:
            if any(a["action"] == "rebuild_lineage_index" for a in actions):
                lineage_index.rebuild(con)
            for adapter_id, status in marks:
                nodes.set_status(con, adapter_id, status)
            log_event(con, "gc", {"dry_run": dry_run, "grace": grace}, detail={"actions": actions})
    return {"dry_run": dry_run, "grace": grace, "actions": actions, "skipped": skipped,
            "problems_before": len(report["problems"])}
