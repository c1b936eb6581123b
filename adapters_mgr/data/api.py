"""DataAPI: the data side's façade, which ``AdapterManager.data`` exposes and delegates to.

>>> data = DataAPI(Catalog(root / "catalog.duckdb"), root)                     # doctest: +SKIP
>>> data.add_source("ratings", "logs/*.csv", mapping={"user_id": "uid", "item_id": "movie",
...                 "rating": "stars", "ts": "time"}, ts_format="epoch_s")    # doctest: +SKIP
>>> data.sync(window="7d")                                                    # doctest: +SKIP
['b000001', 'b000002', ...]
"""

from __future__ import annotations

import operator
import re
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.sql import fetch_dicts, from_json
from adapters_mgr.data import digest, history, popularity, prior, registry, sampling, texts
from adapters_mgr.data.classify import RULES
from adapters_mgr.data.sources import list_files
from adapters_mgr.data.sync import run_sync
from adapters_mgr.errors import IntegrityError, InvalidInput, NotFound


class NoFilesMatched(UserWarning):
    """A source's path or glob matches no file (yet): accepted, since a folder may fill later, but
    said, so a typo in a glob does not pass for an empty source. The CLI says it in its own words."""

_BATCH_JSON = ("sources", "quarantined_by_rule", "duplicates_by_kind")
BATCH_COLUMNS = (
    "id", "seq", "kind", "sync_id", "sources", "window_start", "window_end", "ts_min", "ts_max", "rows_in",
    "rows_kept", "rows_quarantined", "rows_duplicate", "quarantined_by_rule", "duplicates_by_kind", "num_users",
    "num_items", "num_rows", "sha256", "digest_method", "created_at",
)


def check_limit(limit: Any, what: str = "limit") -> int | None:
    """None (no limit) or a whole number >= 0."""
    if limit is None:
        return None
    try:
        n = None if isinstance(limit, bool) else operator.index(limit)
    except TypeError:
        n = None
    if n is None or n < 0:
        raise InvalidInput(f"{what} {limit!r} must be a whole number >= 0 (or left out for every row)")
    return n


def _batch_dict(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row.get(c) for c in BATCH_COLUMNS}
    for c in _BATCH_JSON:
        out[c] = from_json(out[c]) if out[c] is not None else ({} if c != "sources" else [])
    return out


class DataAPI:
    """Sources, sync, batches, quarantine, replay and model text, all on the one catalog."""

    def __init__(self, catalog: Catalog, root: Path) -> None:
        self.catalog = catalog
        self.root = Path(root)

    # -- sources ---------------------------------------------------------------------------------
    def add_source(
        self,
        name: str,
        uri: str | Path,
        *,
        format: str | None = None,
        mapping: dict[str, str] | None = None,
        ts_format: str | None = None,
        kind: str = "interactions",
        priority: int | None = None,
        replace: bool = False,
        read: dict[str, Any] | None = None,
        label_threshold: float | None = None,
        rating_range: tuple[float, float] | list[float] | None = None,
        max_events_per_minute: int | None = None,
        future_skew: str | None = None,
        list_attrs: dict[str, str] | None = None,
        check_unknown: bool | None = None,
    ) -> dict[str, Any]:
        """Register a file or glob as a source of interactions, users or items.

        ``mapping`` maps canonical fields (user_id, item_id, rating, label, ts, source_event_id, or
        entity attributes) to source columns; unmapped canonical fields fall back to same-named
        columns. ``ts_format`` is epoch_s | epoch_ms | epoch_us | iso | a strptime pattern, or None
        to detect it at the first sync (the detection is recorded on the source); a strptime pattern
        is tried once here, so a bad one is refused now. A plain path must exist; a glob may match
        nothing yet (a folder filled later).
        Registering the same definition twice is a no-op; a different one needs ``replace=True``.
        """
        options = {
            "read": read, "label_threshold": label_threshold,
            "rating_range": list(rating_range) if rating_range is not None else None,
            "max_events_per_minute": max_events_per_minute, "future_skew": future_skew,
            "list_attrs": list_attrs, "check_unknown": check_unknown,
        }
        with self.catalog.transaction() as con:
            src = registry.add_source(
                con, name, str(uri), format=format, mapping=mapping, ts_format=ts_format, kind=kind,
                priority=priority, replace=replace, options=options,
            )
        out = src.to_dict()
        out["files_matched"] = len(list_files(out["uri"]))
        if not out["files_matched"]:
            warnings.warn(f"source {name!r}: no file matches {out['uri']!r} yet; a sync reads the files that "
                          "appear there later", NoFilesMatched, stacklevel=2)
        return out

    def remove_source(self, name: str) -> None:
        with self.catalog.transaction() as con:
            registry.remove_source(con, name)

    def sources(self) -> list[dict[str, Any]]:
        """Registered sources with their watermark and how many files have been read."""
        with self.catalog.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            srcs = registry.load_sources(con)
            wms = {r[0]: r[1] for r in con.execute("SELECT source, ts_max FROM data_watermarks").fetchall()}
            nfiles = dict(con.execute("SELECT source, count(*) FROM data_source_files GROUP BY 1").fetchall())
        out = []
        for s in srcs.values():
            d = s.to_dict()
            d.update(watermark=wms.get(s.name), files_read=int(nfiles.get(s.name, 0)))
            out.append(d)
        return out

    # -- sync and batches ------------------------------------------------------------------------
    def sync(
        self,
        *,
        sources: list[str] | str | None = None,
        window: str | None = None,
        dedup_tolerance: str | float = "1s",
        progress: Any = None,
    ) -> list[str]:
        """Take in what is new since each source's watermark; return the new batch ids (maybe none)."""
        if isinstance(sources, str):
            sources = [sources]
        ids = run_sync(self.catalog, sources=sources, window=window, dedup_tolerance=dedup_tolerance,
                       progress=progress)
        for src in self.sources_without_files(sources):
            warnings.warn(f"source {src['name']!r}: 0 files matched {src['uri']!r}", NoFilesMatched, stacklevel=2)
        return ids

    def sources_without_files(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """The sources (of ``names``; None: all) whose path or glob matches no file now."""
        return [src for src in self.sources() if (not names or src["name"] in names) and not list_files(src["uri"])]

    def batches(self) -> list[dict[str, Any]]:
        with self.catalog.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            rows = fetch_dicts(con, "SELECT * FROM batches WHERE kind = 'interactions' ORDER BY seq")
        return [_batch_dict(r) for r in rows]

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self.catalog.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            rows = fetch_dicts(con, "SELECT * FROM batches WHERE id = ?", [batch_id])
        if not rows:
            raise NotFound(f"batch {batch_id!r} does not exist; list batches with `adapters-mgr data batches`")
        return _batch_dict(rows[0])

    def resolve_batches(self, batch_ids: str | list[str] | None) -> list[str]:
        """Batch ids as given (checked to exist), or every batch for None/'all'."""
        known = [b["id"] for b in self.batches()]
        if batch_ids is None or batch_ids == "all":
            return known
        ids = [batch_ids] if isinstance(batch_ids, str) else list(batch_ids)
        missing = [b for b in ids if b not in set(known)]
        if missing:
            raise NotFound(f"batch {missing[0]!r} does not exist; list batches with `adapters-mgr data batches`")
        return ids

    def verify(self, batch_id: str) -> dict[str, Any]:
        """Recompute a batch's digest and row count from the catalog; IntegrityError if they differ."""
        info = self.batch(batch_id)
        with self.catalog.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            actual = digest.stored_digest(con, batch_id)
            n = con.execute("SELECT count(*) FROM interactions WHERE batch_id = ?", [batch_id]).fetchone()[0]
        if n == info["num_rows"] and actual != info["sha256"] and info["digest_method"] != digest.METHOD:
            raise IntegrityError(  # DuckDB's hash() is only stable within a version: say so, not "altered"
                f"batch {batch_id}: its digest was made with [{info['digest_method']}] and this is "
                f"[{digest.METHOD}]; the row hash may differ between DuckDB versions, so the digest cannot be "
                f"checked here (the row count, {n}, matches)"
            )
        if actual != info["sha256"] or n != info["num_rows"]:
            raise IntegrityError(
                f"batch {batch_id}: stored rows give sha256 {actual[:12]}… / {n} rows, recorded "
                f"{info['sha256'][:12]}… / {info['num_rows']} rows ({info['digest_method']}); the catalog was altered"
            )
        return {"id": batch_id, "sha256": actual, "num_rows": int(n), "ok": True}

    def quarantine(
        self, batch: str | None = None, rule: str | None = None, *, source: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Quarantined rows (rule, detail, source, file, the source row), filtered as asked.

        A line that could not be read at all (``malformed_line``, ``bad_encoding``) has no ``row``;
        ``line_no`` and ``line_text`` hold its number in the file and its text instead (``\\xNN``
        for the bytes of a ``bad_encoding`` line that are not UTF-8).
        ``rule`` must be one of :data:`adapters_mgr.data.classify.RULES`; ``limit`` a whole number >= 0.
        """
        if rule is not None and rule not in RULES:
            raise InvalidInput(f"rule {rule!r} is unknown; use one of {', '.join(RULES)}")
        limit = check_limit(limit)
        if batch is not None:
            self.batch(batch)
        where, params = [], []
        for col, val in (("batch_id", batch), ("rule", rule), ("source", source)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = "SELECT batch_id, sync_id, source, rule, detail, file, row, line_no, line_text FROM quarantine"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY sync_id, batch_id, rule, file, line_no"
        if limit is not None:
            sql += f" LIMIT {limit}"
        rows = self.catalog.query(sql, params)
        for r in rows:
            r["row"] = from_json(r["row"])
        return rows

    def last_sync(self) -> dict[str, Any] | None:
        """The newest sync's report: its id, times, sources, rows read, batches and ``detail``.

        ``detail`` holds ``late_rows`` (rows appended to an already-read file with a time before
        that file's watermark: skipped, not taken in, counted here; ``late_rows_by_file`` names the
        files), ``empty_files`` (left unread until they are filled) and per entity source its counts.
        """
        with self.catalog.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            rows = fetch_dicts(con, "SELECT * FROM data_syncs ORDER BY started_at DESC, id DESC LIMIT 1")
        if not rows:
            return None
        row = rows[0]
        for key in ("sources", "batch_ids", "detail"):
            row[key] = from_json(row[key]) if row[key] is not None else None
        return row

    def duplicates(self, batch: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        where, params = [], []
        for col, val in (("batch_id", batch), ("kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = "SELECT * FROM duplicates" + (" WHERE " + " AND ".join(where) if where else "")
        return self.catalog.query(sql + " ORDER BY batch_id, kind", params)

    # -- rows for training -------------------------------------------------------------------------
    def interactions(self, batch_ids: str | list[str] | None = None, *, columns: bool = False) -> Any:
        """Kept rows of the given batches, in (ts, user_id, item_id) order."""
        ids = self.resolve_batches(batch_ids)
        return sampling.fetch_rows(self.catalog, "batch_id IN (SELECT unnest(?))", [ids], columns=columns)

    def replay_sample(
        self,
        batch_ids_or_before: str | list[str],
        *,
        ratio: float,
        recency: str | int | None = None,
        seed: int,
        max_rows: int | None = None,
        columns: bool = False,
        with_text: bool = False,
        templates: dict[str, str] | None = None,
    ) -> Any:
        """A seeded sample of kept rows for replay, reproducible from (seed, batch ids).

        ``batch_ids_or_before``: a list of batch ids to sample from, or one batch id meaning "every
        batch before it". ``ratio`` is the fraction of that pool to draw (0 < ratio <= 1);
        ``recency`` keeps only the last N batches (int) or the last duration of event time ('28d')
        before the newest pooled row; ``max_rows`` caps the sample.
        """
        pool = sampling.replay_pool(self, batch_ids_or_before, recency)
        rows = sampling.replay_sample(self.catalog, pool, ratio=ratio, seed=seed, max_rows=max_rows,
                                      columns=columns and not with_text)
        if with_text:
            return texts.attach_texts(self, rows, columns=columns, templates=templates)
        return rows

    def negative_samples(
        self, batch_ids: str | list[str] | None = None, *, per_positive: int = 1, seed: int, columns: bool = False
    ) -> Any:
        """Seeded negatives for implicit data: per positive, items the user has never rated positively."""
        ids = self.resolve_batches(batch_ids)
        return sampling.negative_samples(self.catalog, ids, per_positive=per_positive, seed=seed, columns=columns)

    def training_rows(
        self,
        batch_ids: str | list[str] | None,
        *,
        with_text: bool = True,
        columns: bool = False,
        negatives: int = 0,
        seed: int = 0,
        templates: dict[str, str] | None = None,
    ) -> Any:
        """Per kept interaction: user_id, item_id, ts, rating, label, and user/item text AS OF the event.

        ``negatives`` > 0 adds seeded sampled negatives (label 0) per positive, for implicit data.
        """
        ids = self.resolve_batches(batch_ids)
        if not with_text:
            rows = sampling.fetch_rows(self.catalog, "batch_id IN (SELECT unnest(?))", [ids], columns=False)
            if negatives:
                rows = rows + sampling.negative_samples(self.catalog, ids, per_positive=negatives, seed=seed)
                rows.sort(key=lambda r: (r["ts"], r["user_id"], r["item_id"]))
            return sampling.to_columns(rows) if columns else rows
        return texts.training_rows(self, ids, columns=columns, negatives=negatives, seed=seed, templates=templates)

    # -- the as-of prior ---------------------------------------------------------------------------
    def prior_features(self, batch_ids: str | list[str] | None = None, *,
                       recipe: prior.PriorRecipe | None = None) -> list[dict[str, Any]]:
        """Per kept interaction of the batches: counts, like counts and rates of its user and item and
        of everything, and the prior (offsets, probability, logit), all as of the event itself.

        See :mod:`adapters_mgr.data.prior` for the formula and the as-of rule (``recipe``: the default
        ``PriorRecipe()``, kind 'bias', shrinkage 10).
        """
        return prior.interaction_features(self.catalog, self.resolve_batches(batch_ids), recipe or prior.PriorRecipe())

    def prior_logits(self, rows: Any, recipe: prior.PriorRecipe | None = None) -> np.ndarray | None:
        """The prior logit of each row (``user_id``, ``item_id``, ``ts``) as of its own time, as
        training and evaluation add it; None when the recipe is 'none'."""
        return prior.row_logits(self.catalog, sampling.to_rows(rows), recipe or prior.PriorRecipe())

    def pair_prior_logits(self, users: list[Any], items: list[Any], as_of: datetime | str | None = None, *,
                          recipe: prior.PriorRecipe | None = None) -> np.ndarray | None:
        """The prior logit of each (user, item) pair from the events strictly before ``as_of`` (None:
        everything synced so far), as the scorer adds it; None when the recipe is 'none'."""
        return prior.pair_logits(self.catalog, list(users), list(items), _as_time(as_of),
                                 recipe or prior.PriorRecipe())

    # -- as-of item popularity (the retriever's popularity term) ----------------------------------
    def item_popularity(self, items: list[Any], as_of: datetime | str | None = None, *,
                        recipe: popularity.PopularityRecipe | None = None) -> np.ndarray:
        """Each item's interactions strictly before ``as_of`` (None: everything synced so far), as the
        scorer and evaluation count them (:mod:`adapters_mgr.data.popularity`)."""
        return popularity.item_counts(self.catalog, list(items), _as_time(as_of),
                                      recipe or popularity.PopularityRecipe())

    def row_popularity(self, rows: Any, recipe: popularity.PopularityRecipe | None = None) -> np.ndarray:
        """Each row's item's interactions strictly before the row's own ``ts``, as training counts them."""
        return popularity.row_counts(self.catalog, sampling.to_rows(rows), recipe or popularity.PopularityRecipe())

    # -- text --------------------------------------------------------------------------------------
    def set_template(self, kind: str, template: str) -> None:
        """Store a user or item text template (Python format syntax; see texts.FIELDS)."""
        texts.set_template(self.catalog, kind, template)

    def reset_template(self, kind: str) -> None:
        """Go back to the default template of ``kind`` ('user' or 'item')."""
        texts.reset_template(self.catalog, kind)

    def templates(self) -> dict[str, str]:
        """The templates texts are rendered with now: the stored ones, else the defaults."""
        return texts.load_templates(self.catalog)

    def item_texts(
        self, as_of: datetime | str | None = None, *, templates: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Every item's text from attributes and stats of events strictly before ``as_of`` (None = all)."""
        return texts.item_texts(self, _as_time(as_of), templates=templates)

    def user_text(self, user_id: str, as_of: datetime | str | None = None, *,
                  templates: dict[str, str] | None = None) -> str:
        """One user's text from attributes and events strictly before ``as_of`` (None = all)."""
        return texts.user_texts(self, [str(user_id)], _as_time(as_of), templates=templates)[str(user_id)]

    def user_texts(self, user_ids: list[str] | None = None, as_of: datetime | str | None = None, *,
                   templates: dict[str, str] | None = None) -> dict[str, str]:
        return texts.user_texts(self, None if user_ids is None else [str(u) for u in user_ids], _as_time(as_of),
                                templates=templates)

    # -- what a history ranker reads (ranker_shape 'history') --------------------------------------
    def history_texts(self, rows: Any, item_template: str) -> tuple[list[str], list[str]]:
        """(user texts, item texts) per row (``user_id``, ``item_id``, ``ts``) as a history ranker
        reads them: the user's liked/disliked items strictly before the row, the item's content text
        (``item_template`` without statistics). See :mod:`adapters_mgr.data.history`."""
        return history.row_texts(self, sampling.to_rows(rows), item_template)

    def user_history_texts(self, user_ids: list[str], as_of: datetime | str | None = None, *,
                           item_template: str) -> dict[str, str]:
        """Each user's history text from the events strictly before ``as_of`` (None: all synced)."""
        return history.user_texts(self, [str(u) for u in user_ids], item_template, _as_time(as_of))

    def item_content_texts(self, as_of: datetime | str | None = None, *, item_template: str) -> dict[str, str]:
        """Every item's content text (``item_template`` without statistics), as history rankers embed it."""
        return history.item_contents(self, item_template, _as_time(as_of))


_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _as_time(value: datetime | str | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO.match(value):
        from datetime import UTC

        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise InvalidInput(f"as_of {value!r} is not a time; pass a datetime or an ISO string like 2024-01-31T00:00:00Z")
