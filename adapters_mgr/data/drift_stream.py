"""A seeded synthetic stream where updating a recommender must matter, with known like probabilities.

Why: the incremental benchmark needs data on which a model trained on old periods is measurably
worse than one updated on the latest period, and whose true like probability of every event is
known, so the AUC of label vs p_like (the oracle AUC) can be reported as the ceiling of any model.

The generative model (G = 8 genres, ``synthetic.GENRES``):

- Items have 1-2 genres and a title of 2-3 words drawn from their genres' descriptive words
  (Sci-Fi: Galactic, Robot, Laser...), a number that makes it unique, and a year: the item's text
  carries its genres, so a text model can learn which items a taste or a trend applies to.
- Users (users.csv: age, gender, occupation) have a fixed taste vector over genres (normal, scale
  1) and a bias b_u (normal, 0.5); items a bias b_i (normal, 0.5): the stable part a model learns
  once from history.
- Time is ``init_periods + periods + 1`` consecutive periods of length ``period``. The catalog grows:
  ``items_initial`` items exist from the start and ``new_items_per_period`` are released at the
  start of every later period (never interacted with before), so every period has cold items that
  only their text describes.
- A global genre trend trend_t drifts between periods as a stationary AR(1) process (std ``drift``,
  lag-one correlation ``persistence``), centred across genres: this is what makes updating matter.
  Old periods say little about which genres are hot now; period t's data does, and it persists
  into t + 1. Centred, it moves which genres are liked, not the overall like rate, so a bias-only
  update cannot follow it.
- p_like = sigmoid(mu + b_u + b_i + strength * g_i . (taste_u + trend_t)), with g_i the item's
  0/1 genre vector over sqrt(its genre count) (so one- and two-genre items weigh alike), and mu
  set so that the mean p_like is ``like_rate``. The defaults give an oracle AUC of ~0.82-0.84;
  knowing the previous period's trend instead of the current one gives ~0.79, the last initial
  period's ~0.74-0.77, none ~0.75.
- Each period has ``events_per_period`` events: users drawn with lognormal activity weights (a few
  heavy users, many light ones), items among the released ones with lognormal popularity times a
  recency boost ``1 + recency_boost * 2**-age`` (age in periods since release, no boost for the
  initial catalog), so new, cold items get exposure in every period. Times are uniform within the
  period, at least ``GAP_MS`` apart (unique, strictly increasing, and never within a sync's dedup
  tolerance of each other); label ~ Bernoulli(p_like); rating 4-5 if liked else 1-3, so the sync's
  ``label = rating >= 4`` gives back the label.

Files: users.csv, items.parquet (genres as an 'A|B' list), events.parquet (user_id, item_id, rating,
ts epoch ms, event_id), truth.parquet (event_id, user_id, item_id, ts, p_like, label, period) and
truth.json (parameters with mu, counts, the trend, each item's release period, like rates and
oracle AUC overall and per period).
No duplicates and no bad rows: every event is kept by a sync.

Alignment with batches: a windowed sync starts its windows at midnight UTC of the first event's day
(``sync._windows``). ``start`` must therefore be a midnight UTC and the first event is placed at
``start`` itself, so ``sync(window=stream.truth["window"])`` (the period, e.g. '7d') makes batch i
exactly period i.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from adapters_mgr.data.synthetic import GENRES, OCCUPATIONS, SyntheticData
from adapters_mgr.lora.metrics import auc

GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("Fury", "Strike", "Chase", "Bullet", "Rampage", "Showdown"),
    "Comedy": ("Goofy", "Wacky", "Laughing", "Prank", "Silly", "Jolly"),
    "Drama": ("Silent", "Broken", "Promise", "Letters", "Winter", "Tears"),
    "Horror": ("Haunted", "Blood", "Cursed", "Crypt", "Scream", "Undead"),
    "Romance": ("Love", "Kiss", "Heart", "Wedding", "Sweetheart", "Moonlit"),
    "Sci-Fi": ("Galactic", "Robot", "Laser", "Orbit", "Android", "Nebula"),
    "Thriller": ("Deadly", "Conspiracy", "Hostage", "Alibi", "Witness", "Pursuit"),
    "Documentary": ("True", "Planet", "Inside", "History", "Journey", "Wildlife"),
}
GAP_MS = 2000  # minimum time between two events: above the default 1 s dedup tolerance


def generate_drift(
    folder: str | Path,
    *,
    users: int = 300,
    items_initial: int = 150,
    new_items_per_period: int = 30,
    init_periods: int = 4,
    periods: int = 5,
    events_per_period: int = 1200,
    period: timedelta = timedelta(days=7),
    drift: float = 1.2,
    persistence: float = 0.8,
    strength: float = 1.0,
    recency_boost: float = 2.0,
    like_rate: float = 0.5,
    seed: int = 0,
    start: datetime = datetime(2024, 1, 1, tzinfo=UTC),
) -> SyntheticData:
    """Write the stream into ``folder``; periods 0 .. init_periods + periods (inclusive).

    Meant use: train on the first ``init_periods`` periods, then update on and evaluate each next
    one; the last period is the final evaluation. ``truth["window"]`` is the sync window that makes
    batch i period i. ``drift=0`` gives a stream without the trend (a control).
    """
    folder = Path(folder)
    n_periods = init_periods + periods + 1
    period_ms = int(round(period.total_seconds() * 1000))
    _check(users, items_initial, new_items_per_period, init_periods, periods, events_per_period, period_ms,
           drift, persistence, strength, recency_boost, like_rate, start)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    g = len(GENRES)
    start_ms = int(round(start.timestamp() * 1000))

    # items: release period, genres (1-2), bias, popularity
    n_items = items_initial + new_items_per_period * (n_periods - 1)
    release = np.concatenate([np.zeros(items_initial, dtype=np.int64),
                              np.repeat(np.arange(1, n_periods, dtype=np.int64), new_items_per_period)])
    gmat = np.zeros((n_items, g))
    first = rng.integers(0, g, n_items)
    second = (first + rng.integers(1, g, n_items)) % g  # a different genre
    two = rng.random(n_items) < 0.4
    gmat[np.arange(n_items), first] = 1.0
    gmat[np.arange(n_items)[two], second[two]] = 1.0
    gnorm = gmat / np.sqrt(gmat.sum(axis=1, keepdims=True))
    b_i = rng.normal(0.0, 0.5, n_items)
    pop = rng.lognormal(0.0, 1.0, n_items)
    titles = _titles(rng, gmat)
    release_year = np.array([(start + t * period).year for t in range(n_periods)])
    years = np.where(release == 0, rng.integers(1960, start.year, n_items), release_year[release])

    # users: taste, bias, activity, attributes
    taste = rng.normal(0.0, 1.0, (users, g))
    b_u = rng.normal(0.0, 0.5, users)
    activity = rng.lognormal(0.0, 1.0, users)
    user_attrs = {"age": rng.integers(16, 75, users), "gender": rng.integers(0, 2, users),
                  "occupation": rng.integers(0, len(OCCUPATIONS), users)}

    # the genre trend: stationary AR(1) with std `drift`
    trend = np.zeros((n_periods, g))
    trend[0] = rng.normal(0.0, drift, g)
    step = drift * math.sqrt(1.0 - persistence**2)
    for t in range(1, n_periods):
        trend[t] = persistence * trend[t - 1] + rng.normal(0.0, step, g)
    trend -= trend.mean(axis=1, keepdims=True)  # relative hotness: a bias-only update cannot follow it

    # events, one period at a time
    n = events_per_period
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "ts", "logit", "period")}
    for t in range(n_periods):
        released = np.flatnonzero(release <= t)
        age = t - release[released]
        w = pop[released] * (1.0 + np.where(release[released] > 0, recency_boost * 0.5 ** age, 0.0))
        item = released[rng.choice(released.size, n, p=w / w.sum())]
        user = rng.choice(users, n, p=activity / activity.sum())
        # sorted uniform times pushed GAP_MS apart; the last one ends GAP_MS before the next period
        offset = np.sort(rng.integers(0, period_ms - n * GAP_MS, n)) + np.arange(n, dtype=np.int64) * GAP_MS
        if t == 0:
            offset -= offset[0]  # the first event at `start`: the sync's windows start there
        logit = b_u[user] + b_i[item] + strength * np.einsum("ij,ij->i", gnorm[item], taste[user] + trend[t])
        cols["user"].append(user)
        cols["item"].append(item)
        cols["ts"].append(start_ms + t * period_ms + offset)
        cols["logit"].append(logit)
        cols["period"].append(np.full(n, t, dtype=np.int64))
    ev = {k: np.concatenate(v) for k, v in cols.items()}
    mu = _offset_for(ev["logit"], like_rate)
    ev["p"] = 1.0 / (1.0 + np.exp(-(mu + ev["logit"])))
    m = ev["p"].size
    ev["label"] = (rng.random(m) < ev["p"]).astype(np.int64)
    ev["rating"] = np.where(ev["label"] == 1, rng.integers(4, 6, m), rng.integers(1, 4, m)).astype(np.float64)
    ev["event"] = np.arange(m, dtype=np.int64)

    files = _write(folder, ev, users, user_attrs, titles, years, gmat)
    per = []
    for t in range(n_periods):
        at = ev["period"] == t
        per.append({"period": t, "start_ms": start_ms + t * period_ms, "events": int(at.sum()),
                    "items_released": int((release == t).sum()), "like_rate": float(ev["label"][at].mean()),
                    "oracle_auc": auc(ev["label"][at], ev["p"][at])})
    truth = {
        "params": {"users": users, "items_initial": items_initial, "new_items_per_period": new_items_per_period,
                   "init_periods": init_periods, "periods": periods, "events_per_period": events_per_period,
                   "period_seconds": period.total_seconds(), "drift": drift, "persistence": persistence,
                   "strength": strength, "recency_boost": recency_boost,
                   "like_rate": like_rate, "mu": mu, "seed": seed,
                   "start": start.isoformat()},
        "window": _window_spec(period), "periods_total": n_periods, "events": int(m), "items": int(n_items),
        "like_rate": float(ev["label"].mean()), "oracle_auc": auc(ev["label"], ev["p"]),
        "per_period": per, "genres": list(GENRES), "item_release_period": release.tolist(),
        "trend": [[round(float(x), 6) for x in row] for row in trend],
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=2))
    files["truth_json"] = folder / "truth.json"
    sources = {
        "drift_users": {"uri": str(files["users"]), "kind": "users"},
        "drift_items": {"uri": str(files["items"]), "kind": "items", "list_attrs": {"genres": "|"}},
        "drift_events": {"uri": str(files["events"]), "mapping": {"user_id": "user_id", "item_id": "item_id",
                         "rating": "rating", "ts": "ts", "source_event_id": "event_id"}, "ts_format": "epoch_ms"},
    }
    return SyntheticData(folder, files, sources, truth)


def _offset_for(logits: np.ndarray, rate: float) -> float:
    """The global offset mu with mean(sigmoid(mu + logits)) == rate (bisection; the mean is monotone)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if np.mean(1.0 / (1.0 + np.exp(-(mid + logits)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def true_probabilities(stream: SyntheticData, rows: Any) -> np.ndarray:
    """p_like of each row (``user_id``, ``item_id``, ``ts``) as ``DataAPI.training_rows`` or
    ``interactions`` return them (a list of dicts, or a dict of columns).

    Rows are found by their time (unique in the stream, epoch ms) and checked to be the same user
    and item; a row that is not an event of the stream (a sampled negative, another stream's row)
    raises ``LookupError`` naming it.
    """
    if isinstance(rows, dict):
        users, items, times = rows["user_id"], rows["item_id"], rows["ts"]
    else:
        rows = list(rows)
        users, items, times = ([r[k] for r in rows] for k in ("user_id", "item_id", "ts"))
    ts = _epoch_ms(times)
    if ts.size == 0:
        return np.zeros(0)
    with duckdb.connect() as con:
        t = con.execute("SELECT ts, user_id, item_id, p_like FROM read_parquet(?) ORDER BY ts",
                        [str(stream.files["truth"])]).fetchnumpy()
    truth_ts = np.asarray(t["ts"], dtype=np.int64)
    pos = np.minimum(np.searchsorted(truth_ts, ts), truth_ts.size - 1)
    try:
        u = np.array([int(x) for x in users], dtype=np.int64)
        i = np.array([int(x) for x in items], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise LookupError(f"rows with user or item ids that are not this stream's integer ids: {exc}") from None
    found = (truth_ts[pos] == ts) & (np.asarray(t["user_id"])[pos] == u) & (np.asarray(t["item_id"])[pos] == i)
    if not found.all():
        k = int(np.flatnonzero(~found)[0])
        raise LookupError(f"{int((~found).sum())} of {ts.size} rows are not events of the stream in "
                          f"{stream.folder}; the first: user {users[k]!r}, item {items[k]!r}, ts {times[k]!r} "
                          f"({ts[k]} ms)")
    return np.asarray(t["p_like"], dtype=np.float64)[pos]


def _epoch_ms(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "M":
        return arr.astype("datetime64[ms]").astype(np.int64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    out = np.empty(arr.size, dtype=np.int64)
    for k, v in enumerate(arr.reshape(-1)):
        if isinstance(v, datetime):
            v = v if v.tzinfo else v.replace(tzinfo=UTC)
            out[k] = (v - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        elif isinstance(v, np.datetime64):
            out[k] = v.astype("datetime64[ms]").astype(np.int64)
        else:
            out[k] = int(v)
    return out


def _window_spec(period: timedelta) -> str:
    seconds = int(period.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check(users: int, items_initial: int, new_items: int, init_periods: int, periods: int, events: int,
           period_ms: int, drift: float, persistence: float, strength: float, boost: float, like_rate: float,
           start: datetime) -> None:
    if min(users, items_initial, events) < 1 or min(new_items, init_periods, periods) < 0:
        raise ValueError("users, items_initial and events_per_period must be >= 1; new_items_per_period, "
                         "init_periods and periods >= 0")
    if period_ms % 1000 or period_ms < 1000:
        raise ValueError(f"period must be a whole number of seconds >= 1 s, not {period_ms} ms")
    if events * GAP_MS >= period_ms:
        raise ValueError(f"{events} events per period do not fit {GAP_MS} ms apart in a period of {period_ms} ms")
    if drift < 0 or strength < 0 or boost < 0 or not 0 <= persistence < 1 or not 0 < like_rate < 1:
        raise ValueError("drift, strength and recency_boost must be >= 0, persistence in [0, 1) and "
                         "like_rate in (0, 1)")
    if start.tzinfo is None or start.astimezone(UTC).time() != datetime.min.time():
        raise ValueError(f"start {start!r} must be a timezone-aware midnight UTC: a windowed sync starts its "
                         "windows at midnight UTC of the first event's day, so only then is batch i period i")


def _titles(rng: np.random.Generator, gmat: np.ndarray) -> list[str]:
    """2-3 distinct words drawn from the item's genres' words, then the item number (unique titles)."""
    words = np.array([w for genre in GENRES for w in GENRE_WORDS[genre]])
    per = len(words) // len(GENRES)
    allowed = np.repeat(gmat > 0, per, axis=1)  # (items, words): the word belongs to one of the item's genres
    keys = np.where(allowed, rng.random(allowed.shape), -1.0)
    top = np.argsort(-keys, axis=1)[:, :3]
    count = rng.integers(2, 4, gmat.shape[0])
    return [" ".join([*words[top[i, : count[i]]], str(i)]) for i in range(gmat.shape[0])]


def _write(folder: Path, ev: dict[str, np.ndarray], users: int, user_attrs: dict[str, np.ndarray],
           titles: list[str], years: np.ndarray, gmat: np.ndarray) -> dict[str, Path]:
    paths = {"users": folder / "users.csv", "items": folder / "items.parquet", "events": folder / "events.parquet",
             "truth": folder / "truth.parquet"}
    genre_names = np.array(GENRES, dtype=object)
    genres = np.array(["|".join(genre_names[row > 0]) for row in gmat], dtype=object)
    occ = np.array(OCCUPATIONS, dtype=object)
    u = {"user_id": np.arange(users, dtype=np.int64), "age": user_attrs["age"].astype(np.int64),  # noqa: F841
         "gender": np.where(user_attrs["gender"] == 0, "F", "M").astype(object),
         "occupation": occ[user_attrs["occupation"]]}
    it = {"item_id": np.arange(len(titles), dtype=np.int64), "title": np.array(titles, dtype=object),  # noqa: F841
          "year": np.asarray(years, dtype=np.int64), "genres": genres}
    e = ev  # noqa: F841  (scanned by name by DuckDB)
    q = {k: str(v).replace("'", "''") for k, v in paths.items()}  # quoted for the COPY statements
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"COPY (SELECT * FROM u ORDER BY user_id) TO '{q['users']}' (FORMAT csv, HEADER)")
        con.execute(f"COPY (SELECT * FROM it ORDER BY item_id) TO '{q['items']}' (FORMAT parquet)")
        con.execute("CREATE TABLE ev AS SELECT 'e' || CAST(event AS VARCHAR) AS event_id, user AS user_id, "
                    "item AS item_id, rating, ts, p AS p_like, label, period FROM e")
        con.execute(f"COPY (SELECT user_id, item_id, rating, ts, event_id FROM ev ORDER BY ts) "
                    f"TO '{q['events']}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT event_id, user_id, item_id, ts, p_like, label, period FROM ev ORDER BY ts) "
                    f"TO '{q['truth']}' (FORMAT parquet)")
    return paths
