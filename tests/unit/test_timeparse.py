"""`parse_time`'s fromisoformat fast path returns exactly what the dateutil path returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.timeparse import _parse_slow, parse_time

# every format the module documents, plus the edges of the fast path's shape
KNOWN = [
    "2025-11-27T10:14:13.1234567Z", "2025-11-27T10:14:13.123456Z", "2025-11-27T10:14:13.12Z",
    "2025-11-27T10:14:13Z", "2025-11-27T10:14:13", "2025-11-27T10:14:13.5", "2025-11-27T10:14:13+05:30",
    "2025-11-27T10:14:13.999999999-03:00", "2025-11-27T10:14:13-00:00", "2025-11-27T24:00:00Z",
    "2025-02-30T10:14:13Z", "2025-11-27T10:14:60Z", "2025-11-27T10:14:13+24:00", "2025-11-27T10:14:13+05:60",
    "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "2025-11-27T10:14:13.Z", "2025-11-27T10:14:13,5Z",
    "2025-11-27 10:14:13Z", "2025-11-27T10:14:13z", "2025-11-27T10:14:13+0530", "2025-11-27T10:14:13+05",
    "2025-11-27", "2025-11-27T10:14", "20251127T101413Z", "1764238453", "1764238453123", "1764238453.5",
    "24|11|2022", "31|02|2022", "Thu, 27 Nov 2025 10:14:13 GMT", "garbage",
    "\uff12\uff10\uff12\uff15-11-27T10:14:13Z",
]


def _same(text: str) -> None:
    try:
        slow: object = _parse_slow(text)
    except (OverflowError, ValueError) as exc:  # both paths raise alike at the edge of datetime
        slow = type(exc)
    try:
        fast: object = parse_time(text)
    except (OverflowError, ValueError) as exc:
        fast = type(exc)
    assert fast == slow, text
    if isinstance(fast, datetime):
        assert isinstance(slow, datetime) and fast.tzinfo == slow.tzinfo == UTC


@pytest.mark.parametrize("text", KNOWN)
def test_known_formats_parse_alike_on_both_paths(text: str) -> None:
    _same(text)


def test_wati_created_takes_the_fast_path_and_cuts_extra_digits() -> None:
    expected = datetime(2025, 11, 27, 10, 14, 13, 123456, tzinfo=UTC)
    assert parse_time("2025-11-27T10:14:13.1234567Z") == expected
    assert parse_time("2025-11-27T11:14:13.123456+01:00") == expected


_D2 = st.integers(0, 99).map(lambda n: f"{n:02d}")


@st.composite
def iso_like(draw: st.DrawFn) -> str:
    """Strings of the fast path's shape with any digits in every position (so invalid ones too)."""
    year = f"{draw(st.integers(0, 9999)):04d}"
    month, day, hour, minute, second = (draw(_D2) for _ in range(5))
    if draw(st.booleans()):  # mostly valid values, so the success path is exercised a lot
        moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
        year, month, day = f"{moment.year:04d}", f"{moment.month:02d}", f"{moment.day:02d}"
        hour, minute, second = f"{moment.hour:02d}", f"{moment.minute:02d}", f"{moment.second:02d}"
    text = f"{year}-{month}-{day}T{hour}:{minute}:{second}"
    fraction = draw(st.text(alphabet="0123456789", max_size=10))
    if fraction or draw(st.booleans()):
        text += "." + fraction
    zone = draw(st.sampled_from(["", "Z", "+", "-"]))
    if zone in "+-" and zone:
        zone += f"{draw(_D2)}:{draw(_D2)}"
    return text + zone


@settings(max_examples=1500, deadline=None)
@given(iso_like())
def test_iso_like_strings_parse_alike_on_both_paths(text: str) -> None:
    _same(text)


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)),
       st.integers(-23 * 60 - 59, 23 * 60 + 59), st.integers(0, 6))
def test_isoformat_output_parses_alike(moment: datetime, offset_minutes: int, digits: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    text = aware.isoformat(timespec="microseconds")
    text = text[:20] + text[20:26][:digits] + text[26:] if digits else text[:19] + text[26:]
    _same(text)
