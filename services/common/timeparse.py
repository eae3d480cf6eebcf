"""Every timestamp format WATI and ManyChat send, parsed to timezone-aware UTC.

Formats seen (docs/wati.md): unix seconds as a string or number (`"1764238453"`), unix
milliseconds, ISO 8601 with 0-7 fractional digits, with `Z`, an offset or nothing (then UTC),
and `24|11|2022` dates inside ticket texts. Unparseable input gives None, never a guess.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from dateutil import parser as dateutil_parser

_FRACTION = re.compile(r"(\.\d{6})\d+")
_NUMBER = re.compile(r"\d+(\.\d+)?")
# The shape WATI's `created` has (`2025-11-27T10:14:13.1234567Z`): `datetime.fromisoformat` parses
# it ~10x faster than dateutil. Fractions beyond microseconds are cut, as `_FRACTION` does; whatever
# fromisoformat refuses (hour 24, a bad day) goes the dateutil way, so results never differ.
_ISO_FAST = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?)(?:(?<=\.\d{6})\d+)?(Z|[+-]\d{2}:\d{2})?", re.ASCII)
_PIPE_DATE = re.compile(r"^(\d{1,2})\|(\d{1,2})\|(\d{4})$")
# Unix seconds between 2001 and 2286; larger values are milliseconds.
_MAX_SECONDS = 10_000_000_000


def parse_time(value: object) -> datetime | None:
    """Parses one timestamp to aware UTC; None when absent or not a timestamp."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, int | float):
        return _from_epoch(float(value))
    text = str(value).strip()
    if not text:
        return None
    fast = _ISO_FAST.fullmatch(text)
    if fast is not None:
        try:
            parsed = datetime.fromisoformat(fast.group(1) + (fast.group(2) or ""))
        except ValueError:
            pass
        else:
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return _parse_slow(text)


def _parse_slow(text: str) -> datetime | None:
    """Every other textual format (and the reference the fast ISO path is tested against)."""
    if _NUMBER.fullmatch(text):
        return _from_epoch(float(text))
    pipe = _PIPE_DATE.match(text)
    if pipe:
        day, month, year = (int(g) for g in pipe.groups())
        try:
            return datetime(year, month, day, tzinfo=UTC)
        except ValueError:
            return None
    try:
        parsed = dateutil_parser.isoparse(_FRACTION.sub(r"\1", text))
    except (ValueError, OverflowError):
        try:
            parsed = dateutil_parser.parse(text)
        except (ValueError, OverflowError):
            return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _from_epoch(number: float) -> datetime | None:
    if number <= 0:
        return None
    seconds = number / 1000.0 if number >= _MAX_SECONDS else number
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def first_time(*candidates: object) -> datetime | None:
    """The first candidate that parses (e.g. `created`, then `timestamp`)."""
    for candidate in candidates:
        parsed = parse_time(candidate)
        if parsed is not None:
            return parsed
    return None


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_millis(value: datetime) -> int:
    return int(value.timestamp() * 1000)


# -- comparing times of different resolutions ----------------------------------------------------
# WATI's webhooks carry whole-second `timestamp`s; history's `created` and our own clocks have
# fractions. A time without a fraction may be anywhere in its second, so it stands for the interval
# [t, t + 1 s); a time with a fraction is a point. (A fine time that happens to end in .000000 is
# taken as coarse: the window widens by under a second, and what is in it is told apart by ids.)

_ONE_SECOND = timedelta(seconds=1)


def is_whole_second(at: datetime) -> bool:
    """Whether `at` may come from a whole-second source (no fraction)."""
    return at.microsecond == 0


def latest_possible(at: datetime) -> datetime:
    """The latest moment `at` may stand for: the end of its second when it is a whole second."""
    return at + _ONE_SECOND if is_whole_second(at) else at


def possibly_after(at: datetime, other: datetime) -> bool:
    """`at` may be later than `other` at the resolution each really has."""
    return latest_possible(at) > other


def surely_after(at: datetime, other: datetime) -> bool:
    """`at` is later than `other` whatever the fraction a whole-second time lost."""
    return at >= latest_possible(other) if is_whole_second(other) else at > other
