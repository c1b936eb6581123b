"""The data side's tables in the catalog, and the helper that keeps their source ids.

The data side lives in the one catalog file so adapters can link to batches in the same
transaction-consistent store; the catalog owns the DDL (migrations ``d001_...`` to ``d003_...`` in
:mod:`adapters_mgr.catalog.migrations`), and :mod:`adapters_mgr.data` reads and writes the rows.

Tables (all queryable by users directly):

- ``batches`` (core table, extended by ``d001``): one immutable row per batch with its sources,
  time range, window, rows in / kept / quarantined / duplicates, counts per rule and per duplicate
  kind, and a sha256 over its canonical sorted kept rows.
- ``interactions``: every kept row with the batch and source it arrived from. A view (since
  ``d002``) over ``interaction_rows``, which stores the batch as its ``seq`` number and the source as
  a small id (``data_source_ids``); see ``d002_interaction_rows`` for why.
- ``quarantine``: every row a cleaning rule rejected, with the rule and the source row; for a line
  that could not be read at all (``malformed_line``, ``bad_encoding``; since ``d003``) its number
  and text in ``line_no`` / ``line_text`` instead of a row.
- ``duplicates``: every row dropped as a duplicate, with the kind of duplicate.
- ``users`` / ``items``: entity attribute versions, each with the time it became valid.
- ``data_sources``, ``data_source_files`` (each file read, with, since ``d003``, the watermark it
  was last read against and how many of its rows lay before it: what late rows are counted from),
  ``data_watermarks``, ``data_syncs`` (the sync report: ``detail`` holds ``late_rows``,
  ``empty_files`` and the entity counts), ``data_templates``.
"""

from __future__ import annotations

import duckdb


def source_ids(con: duckdb.DuckDBPyConnection, names: list[str]) -> list[int]:
    """The ``data_source_ids`` id of each name, adding names not seen before (in the caller's transaction)."""
    con.execute(
        "INSERT INTO data_source_ids SELECT (SELECT coalesce(max(id), -1) FROM data_source_ids) + row_number() "
        "OVER (ORDER BY name), name FROM (SELECT DISTINCT unnest(?::VARCHAR[]) AS name) "
        "WHERE name NOT IN (SELECT name FROM data_source_ids)",
        [names],
    )
    ids = dict(con.execute("SELECT name, id FROM data_source_ids WHERE name IN (SELECT unnest(?::VARCHAR[]))",
                           [names]).fetchall())
    return [int(ids[n]) for n in names]
