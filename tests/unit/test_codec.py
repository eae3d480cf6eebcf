"""Every schema round-trips; values written by previous schema versions stay readable."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest

from services.common import codec

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
    previous = sorted((codec.schema_dir() / "previous").glob("*.avsc"))
    assert previous, "keep previous schema versions to prove compatibility"
    for path in previous:
        old = fastavro.schema.load_schema(path)
        value = example(fastavro.schema.expand_schema(old))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, old, value)
        fp = codec._fingerprint(old)
        _name, decoded = codec.decode_any(codec.MAGIC + fp + buf.getvalue())
        current = codec.registry().current[old["name"]]
        assert current.fingerprint != fp, f"{path.name} is identical to the current schema"
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
