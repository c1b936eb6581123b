"""Normalise the caller's training/eval examples into column arrays, validating them up front.

Why: examples arrive as a list of dicts (rows from DuckDB), a dict of columns, or numpy arrays; the
recipes want one shape. Validation here is what lets ``train_adapter`` refuse bad input before any
model work (empty set, a missing column, a label that is not 0/1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from adapters_mgr.errors import InvalidInput

PAIR_COLUMNS = ("user_id", "item_id", "user_text", "item_text")
OFFSET_COLUMN = "prior_logit"
POPULARITY_COLUMN = "item_pop_count"  # a row's item: its interactions strictly before the row (data/popularity.py)


@dataclass(frozen=True)
class Interactions:
    """Columns of (user, item) interactions with texts rendered as of event time; label optional.

    ``offsets``: the as-of prior's logit per row (column ``prior_logit``), when the rows carry one;
    a ranker trained with the prior learns a residual on top of it and scores ``offset + residual``.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_texts: list[str]
    item_texts: list[str]
    labels: np.ndarray | None = None
    offsets: np.ndarray | None = None
    item_counts: np.ndarray | None = None
    """Column ``item_pop_count``: the row's item's as-of popularity count (the retriever's popularity term)."""

    def __len__(self) -> int:
        return len(self.user_texts)

    def subset(self, index: np.ndarray) -> Interactions:
        return Interactions(
            self.user_ids[index],
            self.item_ids[index],
            [self.user_texts[i] for i in index],
            [self.item_texts[i] for i in index],
            None if self.labels is None else self.labels[index],
            None if self.offsets is None else self.offsets[index],
            None if self.item_counts is None else self.item_counts[index],
        )


def _columns(examples: Any, what: str) -> Mapping[str, Sequence[Any]]:
    if isinstance(examples, Mapping):
        return examples
    if isinstance(examples, Iterable) and not isinstance(examples, str | bytes):
        rows = list(examples)
        if not rows:
            raise InvalidInput(f"{what} is empty; give at least one interaction")
        if not isinstance(rows[0], Mapping):
            raise InvalidInput(f"{what} must be rows (dicts) or a dict of columns, got {type(rows[0]).__name__}")
        keys = rows[0].keys()
        try:
            return {k: [row[k] for row in rows] for k in keys}
        except KeyError as exc:
            raise InvalidInput(f"{what}: a row lacks the column {exc.args[0]!r}") from exc
    raise InvalidInput(f"{what} must be rows (dicts) or a dict of columns, got {type(examples).__name__}")


def as_interactions(examples: Any, *, need_labels: bool, what: str = "training examples") -> Interactions:
    """Columns ``user_id, item_id, user_text, item_text`` (+ ``label`` 0/1 when ``need_labels``)."""
    if isinstance(examples, Interactions):
        data = examples
    else:
        cols = _columns(examples, what)
        missing = [c for c in PAIR_COLUMNS if c not in cols]
        if missing:
            raise InvalidInput(f"{what} lack the column(s) {missing}; need {list(PAIR_COLUMNS)} (+ label)")
        labels = None
        if "label" in cols:
            labels = np.asarray(cols["label"], dtype=np.float64).reshape(-1)
        offsets = None
        if OFFSET_COLUMN in cols:
            offsets = np.asarray(cols[OFFSET_COLUMN], dtype=np.float64).reshape(-1)
        item_counts = None
        if POPULARITY_COLUMN in cols:
            item_counts = np.asarray(cols[POPULARITY_COLUMN], dtype=np.float64).reshape(-1)
        data = Interactions(
            np.asarray(cols["user_id"], dtype=object).reshape(-1),
            np.asarray(cols["item_id"], dtype=object).reshape(-1),
            [str(t) for t in cols["user_text"]],
            [str(t) for t in cols["item_text"]],
            labels,
            offsets,
            item_counts,
        )
    n = len(data.user_texts)
    if n == 0:
        raise InvalidInput(f"{what} is empty; give at least one interaction")
    lengths = {len(data.user_ids), len(data.item_ids), len(data.item_texts)}
    if data.labels is not None:
        lengths.add(len(data.labels))
    if data.offsets is not None:
        lengths.add(len(data.offsets))
        if not np.isfinite(data.offsets).all():
            raise InvalidInput(f"{what}: {OFFSET_COLUMN} must be finite numbers")
    if data.item_counts is not None:
        lengths.add(len(data.item_counts))
        if not (np.isfinite(data.item_counts).all() and (data.item_counts >= 0).all()):
            raise InvalidInput(f"{what}: {POPULARITY_COLUMN} must be counts (finite, >= 0)")
    if lengths != {n}:
        raise InvalidInput(f"{what}: columns differ in length ({sorted(lengths | {n})})")
    if need_labels:
        if data.labels is None:
            raise InvalidInput(f"{what} lack the column 'label' (1 = like, 0 = not)")
        if not np.isin(data.labels, (0.0, 1.0)).all():
            bad = data.labels[~np.isin(data.labels, (0.0, 1.0))][:3]
            raise InvalidInput(f"{what}: labels must be 0 or 1, got e.g. {bad.tolist()}")
        data = replace(data, labels=data.labels.astype(np.int64))
    return data


def positives(data: Interactions, what: str = "training examples") -> Interactions:
    """Keep label-1 rows when a label column exists (the retriever trains on positives only)."""
    if data.labels is None:
        return data
    keep = np.flatnonzero(np.asarray(data.labels) > 0)
    if keep.size == 0:
        raise InvalidInput(f"{what} have no positive (label 1) interaction to train the retriever on")
    return data.subset(keep)


@dataclass(frozen=True)
class RetrievalEvalSet:
    """Held-out positives plus the item catalog to rank and each user's already-seen items.

    ``catalog`` maps item_id -> item text (every item that may be recommended); ``seen`` maps
    user_id -> the item_ids the user interacted with before the held-out period (excluded from the
    ranking). Each user's text is taken from their first held-out row (the user as of the period start).
    """

    rows: Interactions
    catalog: Mapping[Any, str]
    seen: Mapping[Any, set[Any]]
    popularity: Mapping[Any, float] | None = None
    """item_id -> its interactions before the period (key ``popularity``; a retriever with the
    popularity term adds ``pop_weight * log(count + smoothing)``; missing items count 0)."""


def as_retrieval_eval(examples: Any, what: str = "eval examples") -> RetrievalEvalSet:
    """Accept a ``RetrievalEvalSet`` or a dict with keys ``rows``, ``catalog`` and optional ``seen``."""
    if isinstance(examples, RetrievalEvalSet):
        return examples
    if not isinstance(examples, Mapping) or "rows" not in examples or "catalog" not in examples:
        raise InvalidInput(
            f"retriever {what} must be a RetrievalEvalSet or a dict with 'rows', 'catalog' (item_id -> text)"
            " and 'seen' (user_id -> set of item_ids)"
        )
    rows = positives(as_interactions(examples["rows"], need_labels=False, what=what), what)
    catalog = dict(examples["catalog"])
    if not catalog:
        raise InvalidInput(f"retriever {what}: the item catalog is empty")
    seen = {k: set(v) for k, v in dict(examples.get("seen") or {}).items()}
    popularity = examples.get("popularity")
    return RetrievalEvalSet(rows, catalog, seen, None if popularity is None else dict(popularity))


__all__ = ["OFFSET_COLUMN", "PAIR_COLUMNS", "POPULARITY_COLUMN",
           "Interactions", "RetrievalEvalSet", "as_interactions", "as_retrieval_eval",
           "positives"]
