"""The user text of a history ranker: the items the user liked and disliked before, as one string.

A ``history`` ranker (:mod:`ranker_shape`) has no user tower of its own: a user is the mean of the
item-tower vectors of the items they liked minus the mean of those they disliked, strictly before
the scored event. Why it is carried as the *user text* (items' content texts joined by a separator
no text contains) rather than as a new column of ids: every path that moves a ranker's inputs
already moves ``(user_text, item_text)`` pairs -- training rows, evaluation digests, the gate, the
serving engine, ``Scorer.score_texts``, plain peft -- so the history reaches them all unchanged, and
a user of plain peft scores a folder from the texts alone (README, "History rankers").

The format: segments joined by ``SEP``; each is ``+`` (liked) or ``-`` (disliked) followed by the
item's content text. An empty string is a user with no history (profile 0: the residual is the
bias). The data layer writes it (``data/history.py``), the ranker reads it; both import this module.

Content text: the item template with its statistics placeholders removed. The prior already
carries how an item did; the item tower embeds what it is, one vector per item whether it is the
candidate or in a history (so the candidate's text must be rendered the same way).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

HISTORY_K = 50
"""The most recent liked items and, apart, the most recent disliked items a profile averages."""
SEP = "\x1e"  # ASCII record separator: never in a rendered title (the data layer replaces any)
LIKED = "+"
DISLIKED = "-"
STAT_FIELDS = ("item_stats", "item_count", "item_mean", "item_events")
_STATS = re.compile(r"\{(?:" + "|".join(STAT_FIELDS) + r")(?:[!:][^{}]*)?\}")


def content_template(item_template: str) -> str:
    """``item_template`` without the item's statistics (``{item_stats}`` and its parts)."""
    return " ".join(_STATS.sub("", item_template).split())


def clean(text: str) -> str:
    """An item text as a history segment holds it: one line, no separator."""
    return " ".join(text.replace(SEP, " ").split())


def format_history(liked: Sequence[str], disliked: Sequence[str]) -> str:
    """The user text for these liked and disliked item texts (newest first, as the data layer gives)."""
    return SEP.join([LIKED + clean(t) for t in liked] + [DISLIKED + clean(t) for t in disliked])


def parse_history(text: str) -> tuple[list[str], list[str]]:
    """(liked, disliked) item texts of a history user text; a segment without a sign is liked
    (a hand-written user text of plain titles reads as "liked these")."""
    liked: list[str] = []
    disliked: list[str] = []
    for segment in text.split(SEP) if text else ():
        if segment.startswith(DISLIKED):
            disliked.append(segment[1:])
        elif segment.startswith(LIKED):
            liked.append(segment[1:])
        elif segment.strip():
            liked.append(segment)
    return liked, disliked


__all__ = ["DISLIKED", "HISTORY_K", "LIKED", "SEP", "STAT_FIELDS", "clean", "content_template", "format_history",
           "parse_history"]
