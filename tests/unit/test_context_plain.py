"""`copy_plain`, the state functions' copy: the same result as `copy.deepcopy` on decoded values,
and nothing mutable shared with the original."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fastavro
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import codec
from services.context.plain import copy_plain
from tests.unit.test_codec import values_of

from .context_builders import Customer, command, inbound, secs, t

_CURRENT = sorted(codec.registry().current.values(), key=lambda v: v.full_name)
_RECORDS = [v for v in _CURRENT if v.parsed["type"] == "record"]  # what decode_any returns


def _containers(value: Any) -> Iterator[Any]:
    """Every dict and list inside `value` (itself included)."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _containers(item)
    elif isinstance(value, list):
        yield value
        for item in value:
            yield from _containers(item)


def _assert_independent_equal_copy(value: Any) -> None:
    copied = copy_plain(value)
    assert copied == copy.deepcopy(value) == value
    originals = {id(c) for c in _containers(value)}
    assert not originals & {id(c) for c in _containers(copied)}, "a dict or list is shared"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_copy_plain_equals_deepcopy_on_every_record_schema(data: st.DataObject) -> None:
    """Values of every record schema, in the shapes the codec decodes them to."""
    _assert_independent_equal_copy(data.draw(values_of(data.draw(st.sampled_from(_RECORDS)))))


def test_copy_plain_copies_a_customer_state_after_a_few_batches() -> None:
    c = Customer()
    now = t("10:00:00")
    for number in range(3):
        for part in range(3):
            c.message(inbound(f"wamid.{number}.{part}", now + secs(part)))
        batch_id = c.state["open_batch"]["batch_id"]  # type: ignore[index]
        c.command(command("flush", now + secs(40), batch_id))
        now += secs(60)
    state = c.state
    assert state["recent_event_ids"] and state["inbound_log"] and state["flushing_batch"]
    _assert_independent_equal_copy(state)


def test_copy_plain_hands_other_types_to_deepcopy() -> None:
    """Tuples, sets and subclasses are not plain: still copied (deeply), never shared."""

    class Tagged(dict[str, Any]):
        pass

    inner = [1, 2]
    value: dict[str, Any] = {"t": (inner, "x"), "s": {1, 2}, "d": Tagged(a=[3]),
             "at": datetime(2026, 1, 1, tzinfo=UTC), "b": b"\x00", "n": None, "f": 1.5, "ok": True}
    copied = copy_plain(value)
    assert copied == value
    assert copied["t"][0] is not inner and copied["s"] is not value["s"]
    assert type(copied["d"]) is Tagged and copied["d"]["a"] is not value["d"]["a"]
    assert copied["at"] is value["at"]  # immutable leaves are kept, as deepcopy keeps them


def test_the_schemas_have_no_type_copy_plain_would_share() -> None:
    """Every leaf type the codec decodes to is immutable (a new Avro type would need a look here)."""
    primitive = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}

    def leaves(schema: Any) -> Iterator[str]:
        if isinstance(schema, str):
            yield schema
        elif isinstance(schema, list):
            for branch in schema:
                yield from leaves(branch)
        elif schema.get("type") == "record":
            for field in schema["fields"]:
                yield from leaves(field["type"])
        elif schema.get("type") == "array":
            yield from leaves(schema["items"])
        elif schema.get("type") == "enum":
            yield "string"
        else:
            yield from leaves(schema["type"])

    found = {leaf for v in _CURRENT for leaf in leaves(fastavro.schema.expand_schema(v.parsed))}
    assert found <= primitive, found - primitive
