"""Model text for users and items, rendered from templates with statistics AS OF the event time.

Why it matters: the text is a BERT ranker's only window on collaborative signal (on ML-100K,
adding the item's count and mean rating as of the event lifted next-week AUC from 0.586 to 0.692).
Why "as of": a statistic that includes later events leaks the future into training and inflates
offline metrics. Every statistic here covers events strictly before the event's timestamp; the
heavy lifting is DuckDB window functions over the catalog (one pass per partitioning), and only
the final string formatting happens in Python.

Template fields (Python ``str.format`` syntax; missing values render as 'unknown'):

- item: ``item_id``, every item attribute (MovieLens: title, year, genres), ``item_count`` (ratings
  before), ``item_mean``, ``item_events`` (interactions before), ``item_stats`` (a ready phrase);
- user: ``user_id``, every user attribute (age, gender, occupation, zip_code), ``user_count``,
  ``user_mean``, ``user_events``, ``user_stats``, ``recent_items`` (titles of the last 5 items the
  user rated positively), ``recent_disliked`` (the last 5 rated negatively), ``genre_affinity``
  (top 3 genres by count, with mean rating).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import duckdb

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.sql import log_event, utcnow
from adapters_mgr.data import sampling
from adapters_mgr.errors import InvalidInput

if TYPE_CHECKING:
    from adapters_mgr.data.api import DataAPI

# The item's statistics come FIRST. Measured side by side (benchmarks/bench_templates.py: fresh
# MiniLM ranker on rows of ML-100K weeks 0-19, week-20 AUC, same rows and seeds per pair) stats-first
# won 4 of 4 seeds at 1,500 rows (mean +0.039 AUC) and 3 of 6 at 1,000 rows (mean +0.013); 7 of 10
# pairs in all, the largest loss 0.020. Two reasons we can point to: with 64 tokens for "user text
# [SEP] item text" truncation cut the item's mean rating off ~6% of pairs (items with long genre
# lists), and right after [SEP] the numbers sit at a steady position. The user's statistics already
# fall inside the first ~30 tokens of the user text, the part truncation keeps.
DEFAULT_TEMPLATES = {
    "item": "{item_stats} {title} ({year}). Genres: {genres}.",
    "user": "User {user_id}: age {age}, gender {gender}, occupation {occupation}. {user_stats} "
            "Recently liked: {recent_items}. Favourite genres: {genre_affinity}.",
}
RECENT_K = 5
TOP_GENRES = 3
MAX_GENRES = 24
GENRE_ATTR = "genres"
TITLE_ATTR = "title"
FRAME = "RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING"  # strictly earlier microseconds: no look-ahead


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return "unknown"


def _phrase_item(n: int, mean: float | None, events: int) -> str:
    if n:
        return f"Rated {n} times before, mean rating {mean:.2f}."
    if events:
        return f"{events} interactions before."
    return "Not rated before."


def _phrase_user(n: int, mean: float | None, events: int) -> str:
    if n:
        return f"Has rated {n} items before, mean rating {mean:.2f}."
    if events:
        return f"{events} interactions before."
    return "No ratings yet."


def _value(v: Any) -> Any:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) if v else "none"
    return "unknown" if v is None else v


def render(template: str, fields: dict[str, Any]) -> str:
    # str.format_map is the C implementation of the same syntax; string.Formatter().vformat, its pure
    # Python twin, was most of training_rows' time (two renders per row)
    return template.format_map(_Fields({k: _value(v) for k, v in fields.items()})).strip()


class _AttrCache(dict):
    """JSON attribute text -> its fields ready for a template (parsed once per distinct version)."""

    def __missing__(self, text: str | None) -> dict[str, Any]:
        value = {k: _value(v) for k, v in json.loads(text).items()} if text else {}
        self[text] = value
        return value


def check_template(kind: str, template: str) -> str:
    if kind not in ("user", "item"):
        raise InvalidInput(f"template kind {kind!r} is unknown; use 'user' or 'item'")
    try:
        render(template, {})
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidInput(f"{kind} template {template!r} is not a valid format string: {exc}") from exc
    return template


def set_template(catalog: Catalog, kind: str, template: str) -> None:
    check_template(kind, template)
    with catalog.transaction() as con:
        con.execute("INSERT OR REPLACE INTO data_templates VALUES (?, ?, ?)", [kind, template, utcnow()])
        log_event(con, "data.set_template", {"kind": kind, "template": template})


def reset_template(catalog: Catalog, kind: str) -> None:
    """Drop a stored template so the default applies again (adapters keep the ones they recorded)."""
    check_template(kind, DEFAULT_TEMPLATES.get(kind, ""))
    with catalog.transaction() as con:
        con.execute("DELETE FROM data_templates WHERE kind = ?", [kind])
        log_event(con, "data.reset_template", {"kind": kind})


def load_templates(catalog: Catalog, override: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(DEFAULT_TEMPLATES)
    out.update({r["kind"]: r["template"] for r in catalog.query("SELECT kind, template FROM data_templates")})
    for kind, template in (override or {}).items():
        out[kind] = check_template(kind, template)
    return out


def _genres_expr(attrs: str) -> str:
    g = f"(({attrs})->'{GENRE_ATTR}')"
    return (f"CASE WHEN json_type({g}) = 'ARRAY' THEN from_json({g}, '[\"VARCHAR\"]') "
            f"WHEN {g} IS NOT NULL THEN [({attrs})->>'{GENRE_ATTR}'] ELSE []::VARCHAR[] END")


def affinity_sql(list_expr: str) -> str:
    """Top genres from a list of struct(c count, g genre, m mean) -- shared by both code paths."""
    return (
        f"array_to_string(list_transform(list_slice(list_reverse_sort(list_filter({list_expr}, lambda x: x.c > 0)), 1, "
        f"{TOP_GENRES}), lambda x: x.g || ' (' || x.c || CASE WHEN x.m IS NULL THEN '' "
        "ELSE ', avg ' || printf('%.1f', x.m) END || ')'), ', ')"
    )


def _top_genres(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        f"SELECT g, count(*) AS n FROM (SELECT unnest({_genres_expr('attrs')}) AS g FROM items) "
        f"WHERE g IS NOT NULL GROUP BY g ORDER BY n DESC, g LIMIT {MAX_GENRES}"
    ).fetchall()
    return [r[0] for r in rows]


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _title(attrs: str, item: str) -> str:
    return f"coalesce(({attrs})->>'{TITLE_ATTR}', {item})"


def training_rows(
    api: DataAPI,
    batch_ids: list[str],
    *,
    columns: bool,
    negatives: int,
    seed: int,
    templates: dict[str, str] | None,
) -> Any:
    """Kept rows of the batches (plus sampled negatives) with user and item text as of each event."""
    tpl = load_templates(api.catalog, templates)
    negs = (sampling.negative_samples(api.catalog, batch_ids, per_positive=negatives, seed=seed)
            if negatives else [])
    with api.catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("CREATE OR REPLACE TEMP TABLE _neg (batch_id VARCHAR, user_id VARCHAR, item_id VARCHAR, "
                    "ts TIMESTAMPTZ, source VARCHAR)")
        if negs:
            con.executemany("INSERT INTO _neg VALUES (?, ?, ?, ?, ?)",
                            [[r["batch_id"], r["user_id"], r["item_id"], r["ts"], r["source"]] for r in negs])
        rows = _window_stats(con, batch_ids)
    out = []
    attrs = _AttrCache()
    user_tpl, item_tpl = tpl["user"], tpl["item"]
    for r in rows:
        item_fields = _Fields(attrs[r["item_attrs"]])
        item_fields.update(item_id=r["item_id"], item_count=_value(r["item_n"]), item_mean=_value(r["item_mean"]),
                           item_events=_value(r["item_events"]),
                           item_stats=_phrase_item(r["item_n"], r["item_mean"], r["item_events"]))
        user_fields = _Fields(attrs[r["user_attrs"]])
        user_fields.update(user_id=r["user_id"], user_count=_value(r["user_n"]), user_mean=_value(r["user_mean"]),
                           user_events=_value(r["user_events"]),
                           user_stats=_phrase_user(r["user_n"], r["user_mean"], r["user_events"]),
                           recent_items=r["recent_items"] or "none yet",
                           recent_disliked=r["recent_disliked"] or "none yet",
                           genre_affinity=r["affinity"] or "none yet")
        out.append({"batch_id": r["batch_id"], "user_id": r["user_id"], "item_id": r["item_id"], "ts": r["ts"],
                    "rating": r["rating"], "label": int(r["label"]), "source": r["source"],
                    "user_text": user_tpl.format_map(user_fields).strip(),
                    "item_text": item_tpl.format_map(item_fields).strip()})
    return sampling.to_columns(out) if columns else out


def _window_stats(con: duckdb.DuckDBPyConnection, batch_ids: list[str]) -> list[dict[str, Any]]:
    genres = _top_genres(con)
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _probe_keys AS
        SELECT user_id, item_id FROM interactions WHERE batch_id IN (SELECT unnest(?))
        UNION ALL SELECT user_id, item_id FROM _neg
        """,
        [batch_ids],
    )
    # History: every kept row touching a probe user or item, plus negatives as non-counting probe rows.
    # The item's genres among the top ones become one bit each (``gmask``), so the per-genre
    # statistics below test a bit instead of searching a list of strings dozens of times per row.
    bits = " ".join(f"WHEN {_sql_str(g)} THEN {1 << k}" for k, g in enumerate(genres))
    gmask = (f"coalesce(list_sum(list_transform(list_distinct({_genres_expr('ia.attrs')}), "
             f"lambda x: CASE x {bits} ELSE 0 END)), 0)::BIGINT") if genres else "0::BIGINT"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _h AS
        WITH base AS (
            SELECT batch_id, user_id, item_id, ts, rating, label, source, true AS real,
                   batch_id IN (SELECT unnest(?)) AS probe
            FROM interactions
            WHERE user_id IN (SELECT user_id FROM _probe_keys) OR item_id IN (SELECT item_id FROM _probe_keys)
            UNION ALL
            SELECT batch_id, user_id, item_id, ts, NULL, 0, source, false, true FROM _neg
        )
        SELECT row_number() OVER () AS rid, b.*, epoch_us(b.ts) AS t,
               ia.attrs AS item_attrs, ua.attrs AS user_attrs, {gmask} AS gmask
        FROM base b
        ASOF LEFT JOIN items ia ON b.item_id = ia.item_id AND b.ts >= ia.valid_from
        ASOF LEFT JOIN users ua ON b.user_id = ua.user_id AND b.ts >= ua.valid_from
        """,
        [batch_ids],
    )
    # Statistics strictly before each event: aggregate the history per (user, time) and per (item,
    # time) once, then running sums over those groups minus the group itself. Why not framed window
    # aggregates (RANGE ... 1 PRECEDING) per row: 50-odd of them cost seconds on ML-100K, while
    # running sums are one cheap pass; the sums are the same numbers, so the means are too.
    has = [f"(real AND (gmask & {1 << k}) <> 0)" for k in range(len(genres))]
    g_agg = "".join(
        f", count(*) FILTER (WHERE {h}) AS gc{k}, count(rating) FILTER (WHERE {h}) AS gn{k}, "
        f"coalesce(sum(rating) FILTER (WHERE {h}), 0) AS gs{k}" for k, h in enumerate(has))

    def before(col: str, w: str) -> str:  # running total over earlier groups only
        return f"CAST(sum({col}) OVER {w} - {col} AS {'DOUBLE' if col.startswith(('s', 'gs')) else 'BIGINT'})"

    g_cum = "".join(f", {before(f'gc{k}', 'wu')} AS gc{k}, {before(f'gn{k}', 'wu')} AS gn{k}, "
                    f"{before(f'gs{k}', 'wu')} AS gs{k}" for k in range(len(genres)))
    g_out = "".join(f", u.gc{k}, CASE WHEN u.gn{k} > 0 THEN u.gs{k} / u.gn{k} END AS gm{k}" for k in range(len(genres)))
    stats = ("count(rating) FILTER (WHERE real) AS n, coalesce(sum(rating) FILTER (WHERE real), 0) AS s, "
             "count(*) FILTER (WHERE real) AS e")
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _w AS
        WITH ug AS (
            SELECT user_id, t, {stats}, count(*) FILTER (WHERE real AND label = 1) AS pos,
                   count(*) FILTER (WHERE real AND label = 0) AS neg{g_agg}
            FROM _h GROUP BY user_id, t),
        uc AS (
            SELECT user_id, t, {before('n', 'wu')} AS n, {before('s', 'wu')} AS s, {before('e', 'wu')} AS e,
                   {before('pos', 'wu')} AS pos, {before('neg', 'wu')} AS neg{g_cum}
            FROM ug WINDOW wu AS (PARTITION BY user_id ORDER BY t)),
        ig AS (SELECT item_id, t, {stats} FROM _h GROUP BY item_id, t),
        ic AS (
            SELECT item_id, t, {before('n', 'wi')} AS n, {before('s', 'wi')} AS s, {before('e', 'wi')} AS e
            FROM ig WINDOW wi AS (PARTITION BY item_id ORDER BY t))
        SELECT h.rid, h.probe,
            i.n AS item_n, CASE WHEN i.n > 0 THEN i.s / i.n END AS item_mean, i.e AS item_events,
            u.n AS user_n, CASE WHEN u.n > 0 THEN u.s / u.n END AS user_mean, u.e AS user_events,
            u.pos AS user_pos, u.neg AS user_neg{g_out}
        FROM _h h JOIN uc u ON u.user_id = h.user_id AND u.t = h.t JOIN ic i ON i.item_id = h.item_id AND i.t = h.t
        """
    )
    structs = ", ".join(f"struct_pack(c := gc{k}, g := {_sql_str(g)}, m := gm{k})" for k, g in enumerate(genres))
    affinity = affinity_sql(f"[{structs}]") if genres else "NULL"
    for table, index, label in (("_pos", "pidx", 1), ("_negs", "nidx", 0)):  # liked / disliked, numbered
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {table} AS
            SELECT user_id, {_title('item_attrs', 'item_id')} AS title,
                   row_number() OVER (PARTITION BY user_id ORDER BY t, item_id) AS {index}
            FROM _h WHERE real AND label = {label}
            """
        )
    cur = con.execute(
        f"""
        WITH p AS (SELECT h.*, w.* EXCLUDE (rid, probe), {affinity} AS affinity
                   FROM _h h JOIN _w w USING (rid) WHERE w.probe),
        recent AS (
            SELECT p.rid, string_agg(pos.title, '; ' ORDER BY pos.pidx DESC) AS recent_items
            FROM p JOIN _pos pos ON pos.user_id = p.user_id
                 AND pos.pidx BETWEEN p.user_pos - {RECENT_K - 1} AND p.user_pos
            GROUP BY p.rid),
        recent_neg AS (
            SELECT p.rid, string_agg(n.title, '; ' ORDER BY n.nidx DESC) AS recent_disliked
            FROM p JOIN _negs n ON n.user_id = p.user_id
                 AND n.nidx BETWEEN p.user_neg - {RECENT_K - 1} AND p.user_neg
            GROUP BY p.rid)
        SELECT p.batch_id, p.user_id, p.item_id, p.ts, p.rating, p.label, p.source,
               CAST(p.item_attrs AS VARCHAR) AS item_attrs, CAST(p.user_attrs AS VARCHAR) AS user_attrs,
               p.item_n, p.item_mean, p.item_events, p.user_n, p.user_mean, p.user_events,
               recent.recent_items, recent_neg.recent_disliked, p.affinity
        FROM p LEFT JOIN recent USING (rid) LEFT JOIN recent_neg USING (rid)
        ORDER BY p.ts, p.user_id, p.item_id, p.real DESC, p.source
        """
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _before(as_of: datetime | None) -> tuple[str, list[Any]]:
    return ("ts < ?", [as_of]) if as_of is not None else ("true", [])


def item_texts(api: DataAPI, as_of: datetime | None, *, templates: dict[str, str] | None = None) -> dict[str, str]:
    """Text for every known item from attributes valid at ``as_of`` and events strictly before it."""
    tpl = load_templates(api.catalog, templates)
    cond, params = _before(as_of)
    vf = "valid_from <= ?" if as_of is not None else "true"
    with api.catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        rows = con.execute(
            f"""
            WITH ids AS (SELECT item_id FROM items UNION SELECT item_id FROM interactions),
            attrs AS (SELECT item_id, CAST(arg_max(attrs, valid_from) AS VARCHAR) AS attrs FROM items
                      WHERE {vf} GROUP BY 1),
            st AS (SELECT item_id, count(rating) AS n, avg(rating) AS mean, count(*) AS events
                   FROM interactions WHERE {cond} GROUP BY 1)
            SELECT ids.item_id, attrs.attrs, coalesce(st.n, 0), st.mean, coalesce(st.events, 0)
            FROM ids LEFT JOIN attrs USING (item_id) LEFT JOIN st USING (item_id) ORDER BY 1
            """,
            ([as_of] if as_of is not None else []) + params,
        ).fetchall()
    out = {}
    for item_id, attrs, n, mean, events in rows:
        fields = {**(json.loads(attrs) if attrs else {}), "item_id": item_id, "item_count": int(n),
                  "item_mean": mean, "item_events": int(events), "item_stats": _phrase_item(int(n), mean, int(events))}
        out[item_id] = render(tpl["item"], fields)
    return out


def user_texts(
    api: DataAPI, user_ids: list[str] | None, as_of: datetime | None, *, templates: dict[str, str] | None = None
) -> dict[str, str]:
    """Text for the given users (all when None) from events strictly before ``as_of``."""
    tpl = load_templates(api.catalog, templates)
    cond, params = _before(as_of)
    vf = "valid_from <= ?" if as_of is not None else "true"
    with api.catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        genres = _top_genres(con)
        con.execute("CREATE OR REPLACE TEMP TABLE _uids (user_id VARCHAR)")
        if user_ids is None:
            con.execute("INSERT INTO _uids SELECT user_id FROM users UNION SELECT user_id FROM interactions")
        else:
            con.executemany("INSERT INTO _uids VALUES (?)", [[u] for u in user_ids])
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _uh AS
            SELECT i.user_id, i.item_id, i.ts, epoch_us(i.ts) AS t, i.rating, i.label, ia.attrs AS item_attrs
            FROM interactions i
            ASOF LEFT JOIN items ia ON i.item_id = ia.item_id AND i.ts >= ia.valid_from
            WHERE i.user_id IN (SELECT user_id FROM _uids) AND {cond.replace('ts', 'i.ts')}
            """,
            params,
        )
        genre_list = "[" + ", ".join(_sql_str(g) for g in genres) + "]::VARCHAR[]"
        rows = con.execute(
            f"""
            WITH attrs AS (SELECT user_id, CAST(arg_max(attrs, valid_from) AS VARCHAR) AS attrs FROM users
                           WHERE {vf} GROUP BY 1),
            st AS (SELECT user_id, count(rating) AS n, avg(rating) AS mean, count(*) AS events,
                          list({_title('item_attrs', 'item_id')} ORDER BY t DESC, item_id DESC)
                              FILTER (WHERE label = 1) AS liked,
                          list({_title('item_attrs', 'item_id')} ORDER BY t DESC, item_id DESC)
                              FILTER (WHERE label = 0) AS disliked
                   FROM _uh GROUP BY 1),
            gx AS (SELECT user_id, g, CAST(count(*) AS BIGINT) AS c, avg(rating) AS m
                   FROM (SELECT user_id, rating, unnest({_genres_expr('item_attrs')}) AS g FROM _uh)
                   WHERE list_contains({genre_list}, g) GROUP BY ALL),
            aff AS (SELECT user_id, {affinity_sql('list(struct_pack(c := c, g := g, m := m))')} AS affinity
                    FROM gx GROUP BY 1)
            SELECT u.user_id, attrs.attrs, coalesce(st.n, 0), st.mean, coalesce(st.events, 0),
                   array_to_string(list_slice(st.liked, 1, {RECENT_K}), '; '),
                   array_to_string(list_slice(st.disliked, 1, {RECENT_K}), '; '), aff.affinity
            FROM _uids u LEFT JOIN attrs USING (user_id) LEFT JOIN st USING (user_id) LEFT JOIN aff USING (user_id)
            """,
            [as_of] if as_of is not None else [],
        ).fetchall()
    out = {}
    for user_id, attrs, n, mean, events, recent, disliked, affinity in rows:
        fields = {**(json.loads(attrs) if attrs else {}), "user_id": user_id, "user_count": int(n), "user_mean": mean,
                  "user_events": int(events), "user_stats": _phrase_user(int(n), mean, int(events)),
                  "recent_items": recent or "none yet", "recent_disliked": disliked or "none yet",
                  "genre_affinity": affinity or "none yet"}
        out[user_id] = render(tpl["user"], fields)
    return out


def attach_texts(api: DataAPI, rows: Any, *, columns: bool, templates: dict[str, str] | None = None) -> Any:
    """Texts for replayed rows: the same as-of rendering training_rows gives those events."""
    rows = sampling.to_rows(rows)
    wanted = {(r["batch_id"], r["user_id"], r["item_id"], r["ts"], r["source"]) for r in rows}
    full = training_rows(api, sorted({r["batch_id"] for r in rows}), columns=False, negatives=0, seed=0,
                         templates=templates)
    picked = [r for r in full if (r["batch_id"], r["user_id"], r["item_id"], r["ts"], r["source"]) in wanted]
    return sampling.to_columns(picked) if columns else picked
