"""Every schema round-trips; values written by previous schema versions stay readable."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import codec
from tests.unit.test_fuzz_codec import from_schema

NOW = datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=UTC)


def example(schema: object) -> object:
    """A value exercising every field of a (parsed, expanded) schema: non-null branches first."""
    if isinstance(schema, list):
        branch = next((b for b in schema if b != "null"), "null")
        return example(branch)
    if isinstance(schema, str):
        return {"string": "x", "boolean": True, "int": 7, "long": 7, "double": 0.5,
                "bytes": b"\x00\x01", "null": None}[schema]
    assert isinstance(schema, dict)
    kind = schema["type"]
    if schema.get("logicalType") == "timestamp-millis":
        return NOW
    if kind == "record":
        return {f["name"]: example(f["type"]) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][-1]
    if kind == "array":
        return [example(schema["items"])]
    return example(kind)


def project(new: object, old: object) -> object:
    """`new` restricted to the shape of `old`: fields added by a newer schema are left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: project(new.get(k), v) for k, v in old.items()}
    if isinstance(old, list) and isinstance(new, list):
        return [project(n, o) for n, o in zip(new, old, strict=True)]
    return new


@pytest.mark.parametrize(
    "name", sorted(n for n, v in codec.registry().current.items() if v.parsed["type"] == "record"))
def test_every_schema_round_trips(name: str) -> None:
    version = codec.registry().current[name]
    expanded = fastavro.schema.expand_schema(version.parsed)
    value = example(expanded)
    data = codec.encode(name.split(".")[-1], value)  # type: ignore[arg-type]
    assert data[:2] == codec.MAGIC and data[2:10] == version.fingerprint
    got_name, decoded = codec.decode_any(data)
    assert got_name == name.split(".")[-1]
    assert decoded == value


def test_previous_versions_are_readable_by_current() -> None:
    """Every released version that is not the current one (tests/unit/test_schema_ledger.py holds
    the ledger itself and random values of every version)."""
    older = [e for e in codec.registry().released
             if codec.registry().current[e.full_name].fingerprint != e.fingerprint]
    assert older, "keep previous schema versions to prove compatibility"
    for entry in older:
        old = fastavro.schema.load_schema(entry.snapshot)
        value = example(fastavro.schema.expand_schema(old))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, old, value)
        _name, decoded = codec.decode_any(codec.MAGIC + entry.fingerprint + buf.getvalue())
        current = codec.registry().current[old["name"]]
        for field in json.loads(Path(current.source).read_text())["fields"]:
            assert field["name"] in decoded
        assert project(decoded, value) == value, "old fields keep their values (nested too)"


def test_inbound_v1_gets_new_field_defaults() -> None:
    old = fastavro.schema.load_schema(
        codec.schema_dir() / "previous" / "watistream.InboundMessage.v1.avsc")
    value = example(fastavro.schema.expand_schema(old))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, value)
    _, decoded = codec.decode_any(codec.MAGIC + codec._fingerprint(old) + buf.getvalue())
    assert decoded["recovered"] is False and decoded["username"] is None


@pytest.mark.parametrize("data, message", [
    (b"", "header"),
    (b"{\"json\": true}", "header"),
    (codec.MAGIC + b"\x00" * 8 + b"body", "unknown schema fingerprint"),
])
def test_bad_payloads_raise_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_any(data)


def test_corrupt_body_raises_codec_error() -> None:
    good = codec.encode("MissedItem", {"at": NOW, "role": "agent", "agent_name": None, "text": "hi",
                                       "message_type": "text", "source": "history", "item_ids": []})
    with pytest.raises(codec.CodecError, match="corrupt body"):
        codec.decode_any(good[:12])


def test_encode_rejects_values_not_matching_schema() -> None:
    with pytest.raises(codec.CodecError, match="does not match"):
        codec.encode("MissedItem", {"at": NOW, "role": "nobody"})


def test_decode_checks_the_record_name() -> None:
    data = codec.encode("ContextCommand", {"kind": "flush", "customer_key": "wati:1",
                                           "batch_id": None, "issued_at": NOW})
    with pytest.raises(codec.CodecError, match="expected InboundMessage"):
        codec.decode("InboundMessage", data)


def test_trailing_garbage_is_corrupt() -> None:
    good = codec.encode("MissedItem", {"at": NOW, "role": "agent", "agent_name": None, "text": "hi",
                                       "message_type": "text", "source": "history", "item_ids": []})
    with pytest.raises(codec.CodecError, match="trailing bytes"):
        codec.decode_any(good + b"\x00\x00")


# --- the compiled writer writes fastavro's bytes ---------------------------------------------------

def _fastavro_bytes(version: codec.SchemaVersion, value: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, version.parsed, value, strict_allow_default=True)
    return buf.getvalue()


def _compiled_bytes(version: codec.SchemaVersion, value: Any) -> bytes:
    assert version.writer is not None
    out = bytearray()
    version.writer(value, out)
    return bytes(out)


_VERSIONS = sorted(codec.registry().by_fingerprint.values(), key=lambda v: str(v.source))
_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-3))])
_AWARE = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2300, 1, 1), timezones=_ZONES)


def _values(schema: Any) -> st.SearchStrategy[Any]:
    """`from_schema`'s valid values, with datetimes in several zones and with sub-millisecond parts."""
    if isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis":
        return st.one_of(_AWARE, st.integers(-(2**62), 2**62))
    if isinstance(schema, list):
        return st.one_of([_values(branch) for branch in schema])
    if isinstance(schema, dict) and schema.get("type") == "record":
        return st.fixed_dictionaries({f["name"]: _values(f["type"]) for f in schema["fields"]})
    if isinstance(schema, dict) and schema.get("type") == "array":
        return st.lists(_values(schema["items"]), max_size=3)
    return from_schema(schema)


def for_every_schema_version(test: Callable[..., None]) -> Callable[..., None]:
    """Runs `test(version, data)` once per schema version, 80 generated examples each."""
    examples = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    return pytest.mark.parametrize("version", _VERSIONS, ids=lambda v: v.source.name)(
        examples(given(data=st.data())(test)))


def values_of(version: codec.SchemaVersion) -> st.SearchStrategy[Any]:
    """Values of that schema version, timestamps as datetimes."""
    return _values(fastavro.schema.expand_schema(version.parsed))


def test_every_schema_has_a_compiled_writer() -> None:
    """CustomerState (written on every context event) refers to named types more than once: a
    reference once counted as recursion and left it on fastavro's slower path."""
    assert [v.full_name for v in codec.registry().by_fingerprint.values() if v.writer is None] == []


@for_every_schema_version
def test_compiled_writer_bytes_equal_fastavro_bytes(
    version: codec.SchemaVersion, data: st.DataObject
) -> None:
    if version.writer is None:
        return  # a schema with a type the writer does not handle always takes fastavro
    value = data.draw(values_of(version))
    assert _compiled_bytes(version, value) == _fastavro_bytes(version, value)


class _Text(str):
    """A str subclass: not an exact type, so the compiled writer leaves it to fastavro."""


_ODD = st.sampled_from([
    1, -1, 2**70, "x", "", _Text("x"), "\ud800", None, True, False, 1.5, float("nan"), b"x", [], ["x"],
    ("x",), {}, {"x": 1}, datetime(2026, 1, 1), datetime(2026, 1, 1, tzinfo=UTC), "wati", "unknown",
])


@st.composite
def _odd_inbound(draw: st.DrawFn) -> dict[str, Any]:
    """An InboundMessage/AgentActivity-ish dict with a field replaced, removed or added."""
    version = codec.registry().schema(draw(st.sampled_from(["InboundMessage", "AgentActivity"])))
    value: dict[str, Any] = dict(draw(values_of(version)))
    value["_schema"] = version.full_name.rsplit(".", 1)[-1]
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["replace", "remove", "add"]))
        names = [k for k in value if k != "_schema"]
        if how == "replace":
            value[draw(st.sampled_from(names))] = draw(_ODD)
        elif how == "remove":
            del value[draw(st.sampled_from(names))]
        else:
            value["extra_field"] = draw(_ODD)
    return value


def _outcome(encoder: Any, name: str, value: dict[str, Any]) -> object:
    try:
        return encoder(name, value)
    except codec.CodecError as exc:
        return ("CodecError", str(exc))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_odd_inbound())
def test_encode_gives_fastavros_bytes_or_error_for_odd_values(value: dict[str, Any]) -> None:
    """Whatever the compiled writer cannot take exactly, fastavro writes or refuses, as before."""
    name = value.pop("_schema")
    assert _outcome(codec.encode, name, value) == _outcome(codec.encode_with_fastavro, name, value)


def test_encode_of_a_webhook_record_equals_fastavro() -> None:
    value = {"event_id": "wamid.x", "customer_key": "wati:50370000001", "channel": "wati",
             "provider_id": "50370000001", "message_type": "text", "text": "hola " * 40, "caption": None,
             "media_ref": None, "media_mime": None, "sender_name": "Ana", "provider_message_ids": ["a", "b"],
             "provider_time": NOW, "received_at": NOW + timedelta(microseconds=999), "recovered": False,
             "username": None}
    assert codec.encode("InboundMessage", value) == codec.encode_with_fastavro("InboundMessage", value)


# --- the generated reader reads what fastavro reads ------------------------------------------------

def _outcome_of(read: Any) -> object:
    try:
        return read()
    except Exception as exc:  # both readers fail on a timestamp beyond datetime's range
        return ("error", type(exc).__name__)


def test_every_schema_has_a_generated_reader() -> None:
    assert [v.full_name for v in _VERSIONS if codec.compile_reader(v.parsed) is None] == []


@for_every_schema_version
def test_generated_reader_reads_what_fastavro_reads(
    version: codec.SchemaVersion, data: st.DataObject
) -> None:
    """Values of every schema version, timestamps as datetimes; raw, as fastavro's epoch milliseconds."""
    value = data.draw(values_of(version))
    body = _fastavro_bytes(version, value)
    reader, raw_reader = codec.compile_reader(version.parsed), codec.compile_reader(version.parsed,
                                                                                  raw_timestamps=True)
    assert reader is not None and raw_reader is not None
    expected = _outcome_of(lambda: fastavro.schemaless_reader(io.BytesIO(body), version.parsed, None))
    if isinstance(expected, tuple):  # fastavro failed: so does the reader
        assert _outcome_of(lambda: reader(body, 0)) == expected
    else:
        assert reader(body, 0) == (expected, len(body))
        assert raw_reader(body, 0) == (codec._datetimes_to_ms(expected), len(body))


@pytest.mark.parametrize(
    "name", sorted(n for n, v in codec.registry().current.items() if v.parsed["type"] == "record"))
def test_decode_any_fast_equals_decode_any_and_refuses_every_truncation(name: str) -> None:
    short = name.split(".")[-1]
    data = codec.encode(short, example(fastavro.schema.expand_schema(codec.registry().current[name].parsed)))  # type: ignore[arg-type]
    assert codec.decode_any_fast(data) == codec.decode_any(data)
    raw = codec.decode_any_fast(data, raw_timestamps={short})
    assert raw == (short, codec._datetimes_to_ms(codec.decode_any(data)[1]))
    for end in range(codec.HEADER_LEN, len(data)):
        with pytest.raises(codec.CodecError, match="corrupt body"):
            codec.decode_any_fast(data[:end])
    with pytest.raises(codec.CodecError, match="trailing bytes"):
        codec.decode_any_fast(data + b"\x00")


def test_decode_any_fast_resolves_older_versions_like_decode_any() -> None:
    old = fastavro.schema.load_schema(codec.schema_dir() / "previous" / "watistream.InboundMessage.v1.avsc")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, example(fastavro.schema.expand_schema(old)))
    data = codec.MAGIC + codec._fingerprint(old) + buf.getvalue()
    assert codec.decode_any_fast(data) == codec.decode_any(data)
    _, raw = codec.decode_any_fast(data, raw_timestamps={"InboundMessage"})
    assert raw["received_at"] == int(NOW.timestamp() * 1000) and raw["recovered"] is False


@pytest.mark.parametrize("data, message", [
    (b"", "header"),
    (codec.MAGIC + b"\x00" * 8 + b"body", "unknown schema fingerprint"),
])
def test_decode_any_fast_refuses_what_decode_any_refuses(data: bytes, message: str) -> None:
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_any_fast(data)
