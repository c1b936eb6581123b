"""Timestamps in any of the forms sources use, turned into UTC ``TIMESTAMPTZ`` by DuckDB SQL.

Why SQL expressions and not Python parsing: a sync parses millions of timestamps and must stay
set-based. Each form maps to one expression; detection looks at a sample once and is recorded.
Every connection that runs these must have ``SET TimeZone='UTC'`` so zone-less ISO strings are
read as UTC.
"""

from __future__ import annotations

import re
from datetime import timedelta

import duckdb

from adapters_mgr.errors import InvalidInput, first_line

TS_FORMATS = ("epoch_s", "epoch_ms", "epoch_us", "iso")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | int | float | timedelta, *, what: str = "duration") -> timedelta:
    """'7d', '12h', '30m', '90s', '2w' (or seconds as a number) -> timedelta."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise InvalidInput(f"{what} {text!r} is not a duration; use a number and a unit, e.g. '7d', '12h', '30m'")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if seconds <= 0:
        raise InvalidInput(f"{what} {text!r} must be positive")
    return timedelta(seconds=seconds)


def check_ts_format(ts_format: str | None) -> str | None:
    """Accept the named forms or a strptime pattern (containing '%') that DuckDB can parse with.

    The pattern is tried once here, on a sample string in a throw-away connection, so a bad one
    ('%Q', a trailing '%') is refused when the source is added rather than failing every sync.
    """
    if ts_format is None or ts_format in TS_FORMATS:
        return ts_format
    if not isinstance(ts_format, str) or "%" not in ts_format:
        raise InvalidInput(
            f"ts_format {ts_format!r} is unknown; use one of {', '.join(TS_FORMATS)}, a strptime pattern "
            "such as '%d/%m/%Y %H:%M', or leave it out to detect it"
        )
    try:
        with duckdb.connect() as con:
            con.execute(f"SELECT try_strptime('2000-01-31 12:00:00', {_quote(ts_format)})").fetchone()
    except duckdb.Error as exc:
        first = first_line(exc)
        marker = f"specifier {ts_format}: "  # "Invalid Input Error: Failed to parse format specifier P: why"
        reason = first.split(marker, 1)[1] if marker in first else re.sub(r"^[A-Za-z ]*Error: ", "", first)
        raise InvalidInput(
            f"ts_format {ts_format!r} is not a valid strptime pattern ({reason}); use directives such as "
            "%Y %m %d %H %M %S %z, e.g. '%d/%m/%Y %H:%M'"
        ) from exc
    return ts_format


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ts_expr(col: str, ts_format: str, *, numeric: bool) -> str:
    """SQL turning column ``col`` into a UTC TIMESTAMPTZ (NULL where it cannot be parsed).

    Out-of-range numbers become NULL rather than errors, so one bad row never fails a sync.
    """
    scale = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}.get(ts_format)
    if scale is not None:
        num = col if numeric else f"TRY_CAST(CAST({col} AS VARCHAR) AS DOUBLE)"  # casts skip blanks
        # The range is tested on the unscaled number, so scaling an integer column cannot overflow
        # (a huge value is a bad timestamp, not a failed sync). make_timestamptz(µs) is the instant
        # itself; make_timestamp(µs)::TIMESTAMPTZ is the same value through a time zone conversion
        # costing ~0.5 CPU s per 6M rows.
        lo, hi = -62_000_000_000_000_000 // scale, 250_000_000_000_000_000 // scale
        return (
            f"CASE WHEN ({num}) BETWEEN {lo} AND {hi} "
            f"THEN make_timestamptz(CAST(round(({num}) * {scale}) AS BIGINT)) END"
        )
    if ts_format == "iso":  # the cast skips surrounding blanks itself; a trim would copy every string
        return f"TRY_CAST(CAST({col} AS VARCHAR) AS TIMESTAMPTZ)"
    text = f"trim(CAST({col} AS VARCHAR))"
    # strptime pattern: with a zone directive DuckDB yields TIMESTAMPTZ, else a naive (UTC) TIMESTAMP
    return f"CAST(TRY_STRPTIME({text}, {_quote(ts_format)}) AS TIMESTAMPTZ)"


_NUMBER = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")


def detect_ts_format(sample: list[object]) -> str:
    """Guess the form from sample values: numbers by magnitude, else ISO.

    Epoch seconds for any date between 1973 and 5138 lie in [1e8, 1e11); milliseconds in [1e11, 1e14);
    microseconds above. The guess is recorded on the source so later syncs read the same way.
    """
    values = [v for v in sample if v is not None and str(v).strip() != ""]
    if not values:
        return "iso"
    numeric = [float(v) for v in values if isinstance(v, int | float) or _NUMBER.match(str(v))]
    if len(numeric) >= 0.8 * len(values):
        numeric.sort()
        median = abs(numeric[len(numeric) // 2])
        if median >= 1e14:
            return "epoch_us"
        if median >= 1e11:
            return "epoch_ms"
        return "epoch_s"
    return "iso"
