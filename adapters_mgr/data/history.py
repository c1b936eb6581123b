"""What a history ranker reads: each user's liked and disliked items before a time, as one text.

Why a module of its own: a history ranker (``ranker_shape='history'``) replaces the rendered user
text by the user's history (:mod:`adapters_mgr.lora.history_text` has the format and the reasons)
and the item text by the item's content text. Training, evaluation and serving all take both from
here, so a model is served with the texts it was trained on.

As-of rule: the rule of the prior (:mod:`prior`): an event's history holds the user's kept events
strictly before it (events at the same microsecond are "not yet seen"); a time ``as_of`` takes the
events strictly before it, none: every event synced so far. Of those, the most recent ``HISTORY_K``
liked and, apart, the most recent ``HISTORY_K`` disliked, newest first (ties by item id).

Item content: every item's text from the given item template with its statistics removed, from
the item's newest attributes (the catalog's items do not change attributes in the streams measured
here; an item whose attributes change is described as it is now).

One SQL statement per call: the probes joined to the user's earlier events, ranked per (probe,
label), cut at ``HISTORY_K`` (``QUALIFY``), listed per probe.

The trend (every user's events, the newest ``TREND_K`` likes and dislikes before the probe, same
as-of rule and order): one ordered read of the kept events' (time, item, label), then a binary
search per probe. A range join in SQL (probe x earlier events of everyone) would materialise
probes x events pairs before cutting at ``TREND_K``; the sorted arrays cost O(probes log events).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from adapters_mgr.data.prior import probe_time_sql
from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora.history_text import HISTORY_K, TREND_K, clean, content_template, format_history

if TYPE_CHECKING:
    from adapters_mgr.data.api import DataAPI

_PROBES = "_history_probes"


def item_contents(api: DataAPI, item_template: str, as_of: datetime | None = None) -> dict[str, str]:
    """Every known item's content text (the template without statistics), as the towers embed it."""
    template = content_template(item_template)
    texts = api.item_texts(as_of, templates={"item": template})
    return {item: clean(text) for item, text in texts.items()}


def row_texts(api: DataAPI, rows: Sequence[Mapping[str, Any]], item_template: str) -> tuple[list[str], list[str]]:
    """(user texts, item texts) of the rows as a history ranker reads them: each row's user history
    strictly before the row's ``ts``, and its item's content text."""
    if not rows:
        return [], []
    missing = [c for c in ("user_id", "item_id", "ts") if c not in rows[0]]
    if missing:
        raise InvalidInput(f"rows need {missing} for a history ranker's texts")
    contents = item_contents(api, item_template)
    unknown = sorted({str(r["item_id"]) for r in rows} - contents.keys())
    if unknown:
        raise InvalidInput(f"unknown item {unknown[0]!r}: it has no interactions or attributes in the catalog")
    hist = _histories(api, [str(r["user_id"]) for r in rows], [r["ts"] for r in rows], None)
    return [_text(contents, h) for h in hist], [contents[str(r["item_id"])] for r in rows]


def user_texts(api: DataAPI, users: Sequence[str], item_template: str, as_of: datetime | None = None
               ) -> dict[str, str]:
    """Each user's history text from the events strictly before ``as_of`` (None: all synced so far)."""
    users = list(dict.fromkeys(str(u) for u in users))
    if not users:
        return {}
    contents = item_contents(api, item_template)
    hist = _histories(api, users, None, as_of)
    return {u: _text(contents, h) for u, h in zip(users, hist, strict=True)}


def _text(contents: Mapping[str, str], ids: tuple[list[str], ...]) -> str:
    return format_history(*([contents[i] for i in side] for side in ids))


def _histories(api: DataAPI, users: list[str], times: list[Any] | None, as_of: datetime | None
               ) -> list[tuple[list[str], list[str], list[str], list[str]]]:
    """Per probe: (liked, disliked, trend liked, trend disliked) item ids, newest first, at most
    HISTORY_K of the user's own per side and TREND_K of everyone's."""
    t_sql, params = probe_time_sql(times, as_of)  # the prior's as-of rule, in epoch microseconds
    with api.catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE {_PROBES} AS
                        SELECT unnest(range(?::BIGINT)) AS pid, unnest(?::VARCHAR[]) AS user_id, {t_sql} AS t""",
                    [len(users), users, *params])
        found = con.execute(
            f"""
            WITH ranked AS (
                SELECT p.pid, i.item_id, i.label,
                       row_number() OVER (PARTITION BY p.pid, i.label ORDER BY i.ts DESC, i.item_id DESC) AS k
                FROM {_PROBES} p JOIN interactions i ON i.user_id = p.user_id AND epoch_us(i.ts) < p.t
                QUALIFY k <= {int(HISTORY_K)})
            SELECT pid, list(item_id ORDER BY k) FILTER (WHERE label = 1),
                   list(item_id ORDER BY k) FILTER (WHERE label <> 1)
            FROM ranked GROUP BY pid
            """
        ).fetchall()
        probe_times = con.execute(f"SELECT t FROM {_PROBES} ORDER BY pid").fetchnumpy()["t"].astype(np.int64)
        events = con.execute(_TREND_EVENTS).fetchnumpy()
    trends = _trends(events, probe_times)
    out = [([], [], *trend) for trend in trends]
    for pid, liked, disliked in found:
        out[pid] = (list(liked or []), list(disliked or []), *trends[pid])
    return out


# The events a trend can reach: from the TREND_K-th newest of each side before the earliest probe
# (two top-N scans) up to the latest probe, so one user's request at "now" reads ~2 * TREND_K rows
# and a week of training rows that week, not the whole interaction table.
_TREND_EVENTS = f"""
    WITH first AS (SELECT min(t) AS t FROM {_PROBES}),
    edge AS (
        (SELECT epoch_us(ts) AS t FROM interactions WHERE label = 1 AND epoch_us(ts) < (SELECT t FROM first)
         ORDER BY ts DESC LIMIT {int(TREND_K)})
        UNION ALL
        (SELECT epoch_us(ts) AS t FROM interactions WHERE label <> 1 AND epoch_us(ts) < (SELECT t FROM first)
         ORDER BY ts DESC LIMIT {int(TREND_K)}))
    SELECT epoch_us(ts) AS t, item_id, label = 1 AS liked FROM interactions
    WHERE epoch_us(ts) >= coalesce((SELECT min(t) FROM edge), (SELECT t FROM first))
      AND epoch_us(ts) < (SELECT max(t) FROM {_PROBES})
    ORDER BY ts, item_id"""


def _trends(events: Mapping[str, np.ndarray], probe_times: np.ndarray) -> list[tuple[list[str], list[str]]]:
    """Per probe time: the newest TREND_K liked and disliked item ids of ``events`` (time-ordered:
    t, item_id, liked) strictly before it, newest first (the history's order: time, then item id,
    descending)."""
    sides = []
    for liked in (True, False):
        kept = np.asarray(events["liked"], dtype=bool) == liked
        times = np.asarray(events["t"], dtype=np.int64)[kept]
        items = [str(i) for i in np.asarray(events["item_id"], dtype=object)[kept]]
        ends = np.searchsorted(times, probe_times, side="left")  # events at the probe's instant: unseen
        sides.append([items[max(0, end - TREND_K):end][::-1] for end in ends.tolist()])
    return list(zip(*sides, strict=True)) if len(probe_times) else []


__all__ = ["item_contents", "row_texts", "user_texts"]
