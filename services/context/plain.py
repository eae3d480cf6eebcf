"""A deep copy of plain data (the decoded Avro values the state functions work on), without
`copy.deepcopy`'s machinery.

The state functions copy the customer's state before changing it, once or more per event; the
state is dicts and lists of strings, numbers, booleans, None, bytes and datetimes (what the codec
decodes), and `copy.deepcopy` spent most of its time on its memo and dispatch per value (~3x the
time of this copy on a bench customer's state). Equal to `copy.deepcopy` on such data, except that
two references to one container become two containers: the table stores states as bytes, so a
decoded state never shares one either (tests/unit/test_context_plain.py).
"""

from __future__ import annotations

import copy
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar, cast

T = TypeVar("T")

#: Immutable leaf types: the copy keeps the object itself (as `copy.deepcopy` does).
_ATOMS = frozenset({str, int, float, bool, type(None), bytes, datetime, date, time, timedelta, Decimal})


def copy_plain(value: T) -> T:
    """A deep copy of `value`: new dicts and lists all the way down, leaves shared (immutable).

    Anything other than a plain dict, list or immutable leaf (a tuple, a set, a subclass) is
    copied by `copy.deepcopy`, so the result is always independent of `value`."""
    return cast(T, _copy(value))


def _copy(value: Any) -> Any:
    cls = value.__class__
    if cls is dict:
        return {k: v if v.__class__ in _ATOMS else _copy(v) for k, v in value.items()}
    if cls is list:
        return [v if v.__class__ in _ATOMS else _copy(v) for v in value]
    if cls in _ATOMS:
        return value
    return copy.deepcopy(value)
