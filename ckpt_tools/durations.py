"""Durations as people write them ("90s", "15m", "1h", "2d", "1w", or seconds), for options
and policy files alike, so that every place refuses the same values the same way."""

from __future__ import annotations

import math

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadDuration(ValueError):
    """A value that is no duration; ``str()`` says why in one line."""


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '2d', '1w' or plain seconds → seconds: finite and not negative.

    NaN would compare false with every age and timeout (turning ``--min-age`` off, making a
    lock wait forever), and an infinite or overflowing value is no time anyone means."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _UNITS:
            value = float(t[:-1]) * _UNITS[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise BadDuration(f"{text!r} is not a duration like 30m, 1h or 2d") from None
    return finite_seconds(value, text)


def finite_seconds(value: float, shown) -> float:
    if not math.isfinite(value):
        raise BadDuration(f"{shown!r} is not a finite duration")
    if value < 0:
        raise BadDuration(f"{shown!r}: a duration cannot be negative")
    return value
