"""Which model a ranker adapter is, and the two numbers a two-tower ranker learns outside its folder.

Three shapes (recorded with every ranker adapter under ``hyperparams['ranker_recipe']``):

- ``cross``: the cross-encoder, ``[CLS] user [SEP] item [SEP]`` read by a 2-label sequence
  classifier whose head belongs to the adapter. Every ranker registered before shapes existed is
  one (no record: ``CROSS``).
- ``tower``: user text and item text each encoded by the same LoRA-adapted encoder (mean-pooled,
  unit norm, exactly as the retriever) and

      residual(u, i) = scale * cos(user(u), item(i)) + bias

  added to the prior's logit. ``scale`` and ``bias`` are learned scalars kept OUTSIDE the PEFT
  folder (the folder stays a standard FEATURE_EXTRACTION one; plain peft gives the encoder, hence the
  cosine), recorded here with the values they started from (``reproduce`` trains again from there).
  A fresh tower starts at ``scale = bias = 0``: it scores exactly the prior.
- ``history``: the tower above without a user tower: the user is the mean of the item-tower vectors
  of the items they liked minus the mean of those they disliked, strictly before the scored event
  (the most recent ``history_text.HISTORY_K`` of each; carried as the user text, see
  :mod:`history_text`). The same ``scale * cos + bias`` and the same scalars, plus (``trend``,
  every history ranker since it existed) ``trend_scale * cos(trend(u), item(i))``: the trend profile
  is the same mean over the whole crowd's newest likes and dislikes before the event
  (``history_text.TREND_K`` each, carried in the same user text), the one term that follows what is
  liked now. ``trend_scale`` starts at 0 like the others. History rankers recorded before the trend
  existed have ``trend=False`` and score without it.

Why the tower exists: on the drift stream the residual cross-encoder learned in one seed of two
(its zero-started head and LoRA sit at a saddle: neither gets a gradient while the other is zero,
and MiniLM's pooler, which the head reads, barely varies), while the towers learned in both
(``benchmarks/explore_drift_ranker.py``, README issue-14 section). ``scale`` gets a gradient from
the frozen encoder's cosine at once, and the LoRA as soon as ``scale`` is not zero.

Why ``history``: a profile averaged over every item a user rated says more than a rendered text of
five recent titles, and it follows the user as their history grows, between updates. Measured
(README, "History rankers"): untrained (scalars only) it is the "prior + zero-shot content" baseline;
trained, the first BERT ranker above the as-of prior on ML-100K.

A node (stack, ensemble, merge) scores with its NEWEST member's ``scale`` and ``bias``: a stacked
adapter was trained on top of its parents, so its numbers apply to the whole node's cosine, the rule
the retriever's popularity weights follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from adapters_mgr.errors import InvalidInput

SHAPES = ("cross", "tower", "history")
RECORD_KEY = "ranker_recipe"
VERSION = 1


@dataclass(frozen=True)
class RankerShape:
    """A ranker's model shape and (tower) its learned ``scale``/``bias`` and where they started."""

    shape: str = "cross"
    scale: float = 0.0
    bias: float = 0.0
    start_scale: float = 0.0
    start_bias: float = 0.0
    version: int = VERSION
    trend: bool | None = None
    """Whether the residual has the trend term; None: yes for a new history ranker (``from_dict``
    of a record without it: no, as it was trained)."""
    trend_scale: float = 0.0
    start_trend_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise InvalidInput(f"ranker shape {self.shape!r} is unknown; use one of {', '.join(SHAPES)}")
        if self.version != VERSION:
            raise InvalidInput(f"ranker shape recipe version {self.version} is unknown; this version reads {VERSION}")
        if self.trend is None:
            object.__setattr__(self, "trend", self.shape == "history")
        if self.trend and self.shape != "history":
            raise InvalidInput(f"only history rankers have a trend term, not {self.shape!r} ones")
        for name in ("scale", "bias", "start_scale", "start_bias", "trend_scale", "start_trend_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInput(f"ranker {name} must be a finite number, got {value!r}")

    @property
    def tower(self) -> bool:
        """Two towers scored ``scale * cos + bias`` (``tower`` and ``history``), not a cross-encoder."""
        return self.shape in ("tower", "history")

    @property
    def history(self) -> bool:
        """The user is their history's item vectors (the user text is a history, :mod:`history_text`)."""
        return self.shape == "history"

    def learned(self, scale: float, bias: float, trend_scale: float = 0.0) -> RankerShape:
        """The same shape after training moved its numbers (the start kept)."""
        return replace(self, scale=float(scale), bias=float(bias), trend_scale=float(trend_scale))

    def restart(self) -> RankerShape:
        """The shape as training started (what ``reproduce`` trains from)."""
        return replace(self, scale=self.start_scale, bias=self.start_bias, trend_scale=self.start_trend_scale)

    def continued(self) -> RankerShape:
        """A child trained on top of this one starts from its learned numbers."""
        return replace(self, start_scale=self.scale, start_bias=self.bias, start_trend_scale=self.trend_scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankerShape:
        known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        known.setdefault("trend", False)  # recorded before the trend existed: trained and scored without it
        return cls(**known)


CROSS = RankerShape()


def shape_of(hyperparams: Mapping[str, Any] | None) -> RankerShape:
    """The shape a ranker adapter recorded; rankers from before shapes existed are cross-encoders."""
    recorded = (hyperparams or {}).get(RECORD_KEY)
    return RankerShape.from_dict(recorded) if recorded else CROSS


__all__ = ["CROSS", "RECORD_KEY", "SHAPES", "RankerShape", "shape_of"]
