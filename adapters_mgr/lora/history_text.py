"""The user text of a history ranker: the items the user liked and disliked before, as one string.

A ``history`` ranker (:mod:`ranker_shape`) has no user tower of its own: a user is the mean of the
item-tower vectors of the items they liked minus the mean of those they disliked, strictly before
the scored event. Why it is carried as the *user text* (items' content texts joined by a separator
no text contains) rather than as a new column of ids: every path that moves a ranker's inputs
already moves ``(user_text, item_text)`` pairs -- training rows, evaluation digests, the gate, the
serving engine, ``Scorer.score_texts``, plain peft -- so the history reaches them all unchanged, and
a user of plain peft scores a folder from the texts alone (README, "History rankers").

The format: segments joined by ``SEP``; each is ``+`` (liked) or ``-`` (disliked) followed by the
item's content text, then the *trend*: ``*+`` / ``*-`` segments, the newest ``TREND_K`` likes and,
apart, the newest ``TREND_K`` dislikes of ALL users before the event (the same for every user at one
instant). An empty string is a user with no history (profile 0: the residual is the bias). The data
layer writes it (``data/history.py``), the ranker reads it; both import this module.

Why the trend travels with every user text: a history ranker's only learned terms used to be the
user profile's scale and bias, so nothing in it could follow what is liked *now* (the drift
stream's genre trend moves every period; updating could not matter). The trend profile (mean liked
minus mean disliked vector of the crowd's newest events) gives the item tower a "what is hot"
direction that is as-of like the prior (exploration on frozen MiniLM vectors, 3 seeds of the drift
stream: +0.008..+0.011 AUC over the user profile alone; ML-100K: +0.000).

Content text: the item template with its statistics placeholders removed. The prior already
carries how an item did; the item tower embeds what it is, one vector per item whether it is the
candidate or in a history (so the candidate's text must be rendered the same way).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

HISTORY_K = 50
"""The most recent liked items and, apart, the most recent disliked items a profile averages."""
TREND_K = 100
"""The crowd's most recent likes and, apart, dislikes the trend profile averages (a repeated item
counts each time). 100 per side: on the drift stream 50 kept ~80% of the gain, 200 no more."""
SEP = "\x1e"  # ASCII record separator: never in a rendered title (the data layer replaces any)
LIKED = "+"
DISLIKED = "-"
TREND = "*"  # a trend segment: TREND + LIKED / DISLIKED + the item's content text


class History(NamedTuple):
    """A parsed history user text: the user's liked and disliked item texts, and the trend's."""

    liked: list[str]
    disliked: list[str]
    trend_liked: list[str]
    trend_disliked: list[str]
STAT_FIELDS = ("item_stats", "item_count", "item_mean", "item_events")
_STATS = re.compile(r"\{(?:" + "|".join(STAT_FIELDS) + r")(?:[!:][^{}]*)?\}")


def content_template(item_template: str) -> str:
    """``item_template`` without the item's statistics (``{item_stats}`` and its parts)."""
    return " ".join(_STATS.sub("", item_template).split())


def clean(text: str) -> str:
    """An item text as a history segment holds it: one line, no separator."""
    return " ".join(text.replace(SEP, " ").split())


def format_history(liked: Sequence[str], disliked: Sequence[str], trend_liked: Sequence[str] = (),
                   trend_disliked: Sequence[str] = ()) -> str:
    """The user text for these liked and disliked item texts and the trend's (newest first, as the
    data layer gives)."""
    return SEP.join([LIKED + clean(t) for t in liked] + [DISLIKED + clean(t) for t in disliked]
                    + [TREND + LIKED + clean(t) for t in trend_liked]
                    + [TREND + DISLIKED + clean(t) for t in trend_disliked])


def parse_history(text: str) -> History:
    """The item texts of a history user text; a segment without a sign is liked (a hand-written
    user text of plain titles reads as "liked these")."""
    out = History([], [], [], [])
    for segment in text.split(SEP) if text else ():
        if segment.startswith(TREND + LIKED):
            out.trend_liked.append(segment[2:])
        elif segment.startswith(TREND + DISLIKED):
            out.trend_disliked.append(segment[2:])
        elif segment.startswith(DISLIKED):
            out.disliked.append(segment[1:])
        elif segment.startswith(LIKED):
            out.liked.append(segment[1:])
        elif segment.strip():
            out.liked.append(segment)
    return out


__all__ = ["DISLIKED", "HISTORY_K", "LIKED", "SEP", "STAT_FIELDS", "TREND", "TREND_K", "History", "clean",
           "content_template", "format_history", "parse_history"]
