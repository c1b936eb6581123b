"""Base models in the catalog: one row per checkpoint, identified by the sha256 of its backbone weights.

The model side (loading, hashing) lives in :mod:`adapters_mgr.lora.base_model`; here only rows.
"""

from __future__ import annotations

from typing import Any

import duckdb

from adapters_mgr.catalog.sql import fetch_dicts, log_event, to_json, utcnow
from adapters_mgr.errors import InvalidInput, NotFound


def base_id_for(sha: str) -> str:
    return f"base-{sha[:12]}"


def find_base(con: duckdb.DuckDBPyConnection, *, sha: str | None = None, ref: str | None = None
              ) -> dict[str, Any] | None:
    """The base with this exact weight hash, or the one a reference names (id, name, source, hash
    prefix); ambiguous references are refused."""
    if sha is not None:
        rows = fetch_dicts(con, "SELECT * FROM base_models WHERE weights_sha256 = ?", [sha])
    else:
        rows = fetch_dicts(
            con,
            "SELECT * FROM base_models WHERE id = ? OR name = ? OR source = ? OR weights_sha256 LIKE ? "
            "ORDER BY created_at",
            [ref, ref, ref, f"{ref}%"],
        )
    if len(rows) > 1 and sha is None:
        raise InvalidInput(f"base reference {ref!r} is ambiguous: {[r['id'] for r in rows]}; use a base id")
    return rows[0] if rows else None


def get_base(con: duckdb.DuckDBPyConnection, ref: str) -> dict[str, Any]:
    row = find_base(con, ref=ref)
    if row is None:
        raise NotFound(f"no base model {ref!r}; list them with `adapters-mgr bases`")
    return row


def insert_base(con: duckdb.DuckDBPyConnection, *, sha: str, name: str, source: str, architecture: str,
                config: dict[str, Any], num_parameters: int) -> str:
    """The base's id; the existing one when these weights are registered already (same hash)."""
    row = con.execute("SELECT id FROM base_models WHERE weights_sha256 = ?", [sha]).fetchone()
    if row is not None:
        return str(row[0])
    base_id = base_id_for(sha)
    con.execute(
        "INSERT INTO base_models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [base_id, name, source, sha, architecture, to_json(config), num_parameters, utcnow()],
    )
    log_event(con, "register_base", {"name": name, "source": source}, detail={"id": base_id, "sha256": sha})
    return base_id


def list_bases(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return fetch_dicts(con, "SELECT * EXCLUDE (config) FROM base_models ORDER BY created_at")
