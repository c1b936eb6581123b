"""Users and items: attribute versions upserted from entity sources, each with its valid-from time.

Why versions and not overwrite: text for training is rendered as of the event time, so a title or
an occupation that changed later must not leak into earlier events. A first version without a
time of its own is valid from the beginning (0001-01-01), so a catalog loaded today still describes
events from 1997; later changes are valid from the sync that saw them (or the mapped ``valid_from``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from adapters_mgr.data import badlines
from adapters_mgr.data.sources import KEY_FIELD, Source, open_reader, sql_literal
from adapters_mgr.data.stage import NUMERIC_TYPES, not_an_object, q, source_row
from adapters_mgr.data.timeparse import ts_expr

BEGINNING = "0001-01-01 00:00:00+00"
_REJECTS = "_rej_entities"  # the rejects tables of an entity source's read (one source at a time)


def _attr_sql(col: str, sep: str | None) -> str:
    text = f"NULLIF(trim(CAST({q(col)} AS VARCHAR)), '')"
    if sep is None:
        return text
    parts = f"list_transform(string_split({text}, {sql_literal(sep)}), lambda x: trim(x))"
    return f"list_filter({parts}, lambda x: x <> '')"


def sync_entities(
    con: duckdb.DuckDBPyConnection, src: Source, files: list[Path], sync_id: str, now: datetime
) -> dict[str, Any]:
    """Read the entity files (whole snapshots), quarantine rows without a key, add changed versions.

    Lines that cannot be read at all are quarantined too (``malformed_line`` / ``bad_encoding``, see
    :mod:`adapters_mgr.data.badlines`) and counted in ``rows_in`` and ``quarantined``.
    """
    key = KEY_FIELD[src.kind]
    table = src.kind
    m = src.mapping
    list_attrs = src.option("list_attrs") or {}
    attrs = [(name, col) for name, col in m.items() if name not in (key, "valid_from")]
    obj = ", ".join(f"{sql_literal(name)}, {_attr_sql(col, list_attrs.get(name))}" for name, col in attrs)
    reader = open_reader(con, src.format, files, src.option("read"))
    types = reader.columns
    if "valid_from" in m:
        numeric = any(types.get(m["valid_from"], "").startswith(t) for t in NUMERIC_TYPES)
        vf = ts_expr(q(m["valid_from"]), src.effective_ts_format or "iso", numeric=numeric)
    else:
        vf = "CAST(NULL AS TIMESTAMPTZ)"
    badlines.drop(con, _REJECTS)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _ent AS
        SELECT CASE WHEN NOT {not_an_object(reader)} THEN NULLIF(trim(CAST({q(m[key])} AS VARCHAR)), '') END AS k,
               CAST(json_object({obj}) AS JSON) AS attrs, {vf} AS vf, filename AS file,
               CASE WHEN k IS NULL THEN CAST(to_json({source_row(reader)}) AS VARCHAR) END AS raw_row
        FROM {reader.sql(_REJECTS)}
        """
    )
    rows_in = con.execute("SELECT count(*) FROM _ent").fetchone()[0]
    con.execute(
        f"""
        INSERT INTO quarantine (sync_id, batch_id, source, rule, detail, file, row)
        SELECT ?, NULL, ?, 'missing_key', '{key} is empty', file, raw_row FROM _ent WHERE k IS NULL
        """,
        [sync_id, src.name],
    )
    quarantined = con.execute("SELECT count(*) FROM _ent WHERE k IS NULL").fetchone()[0]
    bad = badlines.collect(con, _REJECTS, files)
    if bad:
        con.execute(
            """
            INSERT INTO quarantine (sync_id, batch_id, source, rule, detail, file, row, line_no, line_text)
            SELECT ?, NULL, ?, rule, detail, file, NULL, line_no, text FROM _bad
            """,
            [sync_id, src.name],
        )
    badlines.drop(con, _REJECTS)
    con.execute("DROP TABLE IF EXISTS _bad")
    # one row per key and time: the last file wins (a newer snapshot), ties broken by content
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _ent1 AS
        SELECT k, attrs, vf FROM (
            SELECT *, row_number() OVER (PARTITION BY k, vf ORDER BY file DESC, CAST(attrs AS VARCHAR)) AS rn
            FROM _ent WHERE k IS NOT NULL) WHERE rn = 1
        """
    )
    duplicates = rows_in - quarantined - con.execute("SELECT count(*) FROM _ent1").fetchone()[0]
    before = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    con.execute(
        f"""
        INSERT OR REPLACE INTO {table} ({key}, valid_from, attrs, source, sync_id)
        SELECT n.k, COALESCE(n.vf, CASE WHEN cur.k IS NULL THEN TIMESTAMPTZ '{BEGINNING}' ELSE ?::TIMESTAMPTZ END),
               n.attrs, ?, ?
        FROM _ent1 n
        LEFT JOIN (SELECT {key} AS k, CAST(arg_max(attrs, valid_from) AS VARCHAR) AS attrs FROM {table} GROUP BY 1) cur
               ON cur.k = n.k
        WHERE cur.k IS NULL OR cur.attrs <> CAST(n.attrs AS VARCHAR)
        """,
        [now, src.name, sync_id],
    )
    versions = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] - before
    return {"rows_in": int(rows_in + bad), "quarantined": int(quarantined + bad), "duplicates": int(duplicates),
            "new_versions": int(versions), "unchanged": int(rows_in - quarantined - duplicates - versions)}
