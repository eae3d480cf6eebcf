"""Schemas cannot brick customers (issue 13, point 6).

A value carries its writer schema's fingerprint, and compacted topics keep values for months: a
record schema changed in place would leave every stored value with a fingerprint no code knows
(`CodecError` → dead letter, for every event of every existing customer). So:
- every current record schema is in the ledger `schemas/released.json`, with a snapshot;
- every released version decodes (random values) as the current version, and the codec knows all;
- the schema resolution checker of `services.devtools.schemas` agrees with fastavro;
- the release flow: a compatible change is caught, released by one command, old values stay readable;
  an incompatible one is refused;
- the TypedDicts of `services/common/records.py` match the .avsc fields (names, types, optionality).
"""

from __future__ import annotations

import io
import json
import shutil
import types
import typing
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal, NotRequired, get_args, get_origin

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import codec, records
from services.devtools import schemas
from tests.unit.test_codec import project
from tests.unit.test_fuzz_codec import from_schema

SCHEMAS = codec.schema_dir()
REGISTRY = codec.registry()
NOW = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)


# -- the ledger of this repository -----------------------------------------------------------------

def test_every_current_record_schema_is_released() -> None:
    """Fails when a schema changed without a snapshot; the message says what to run."""
    found = schemas.problems(SCHEMAS)
    assert found == [], "\n".join(found)


def test_every_record_has_a_ledger_entry_and_no_snapshot_is_unlisted() -> None:
    names = {e.full_name for e in REGISTRY.released}
    assert names == set(schemas.record_names(REGISTRY))
    assert schemas.unlisted_snapshots(SCHEMAS, REGISTRY) == []
    for name in names:  # versions are numbered 1..n, each with its own snapshot file
        entries = [e for e in REGISTRY.released if e.full_name == name]
        assert [e.number for e in entries] == list(range(1, len(entries) + 1))
        assert [e.snapshot.name for e in entries] == [f"{name}.v{e.number}.avsc" for e in entries]


def test_the_codec_knows_every_released_fingerprint() -> None:
    for entry in REGISTRY.released:
        version = REGISTRY.by_fingerprint[entry.fingerprint]
        assert version.full_name == entry.full_name
        snapshot = fastavro.schema.load_schema(str(entry.snapshot))  # self-contained: loads alone
        assert codec._fingerprint(snapshot) == entry.fingerprint


@cache
def _snapshot(path: Path) -> Any:
    return fastavro.schema.load_schema(str(path))


@pytest.mark.parametrize("entry", REGISTRY.released, ids=lambda e: e.snapshot.name)
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_values_of_every_released_version_decode_as_the_current_version(
    entry: codec.ReleasedVersion, data: st.DataObject
) -> None:
    """Written with the snapshot (writer schema), read through the codec (current reader schema)."""
    old = _snapshot(entry.snapshot)
    value = data.draw(from_schema(fastavro.schema.expand_schema(old)))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, value)
    name, decoded = codec.decode_any(codec.MAGIC + entry.fingerprint + buf.getvalue())
    current = REGISTRY.current[entry.full_name]
    assert name == entry.full_name.rsplit(".", 1)[-1]
    assert set(decoded) == {f["name"] for f in current.parsed["fields"]}
    assert project(decoded, value) == value, "every field the old version wrote keeps its value"


# -- schema resolution: the checker agrees with fastavro -------------------------------------------

def _record(*fields: dict[str, Any], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


_ENUM_XY = {"type": "enum", "name": "E", "symbols": ["x", "y"]}
_ENUM_X = {"type": "enum", "name": "E", "symbols": ["x"]}
_TIME = {"type": "long", "logicalType": "timestamp-millis"}

RESOLUTION_CASES = [
    # (writer, reader, a value of the writer, a phrase of the problem or None)
    (_record({"name": "a", "type": "string"}),
     _record({"name": "a", "type": "string"}, {"name": "b", "type": "long"}), {"a": "x"}, "no default"),
    (_record({"name": "a", "type": "string"}),
     _record({"name": "a", "type": "string"}, {"name": "b", "type": ["null", "long"], "default": None}),
     {"a": "x"}, None),
    (_record({"name": "a", "type": "string"}, {"name": "b", "type": "long"}),
     _record({"name": "a", "type": "string"}), {"a": "x", "b": 1}, None),
    (_record({"name": "e", "type": _ENUM_XY}), _record({"name": "e", "type": _ENUM_X}), {"e": "y"},
     "enum symbols"),
    (_record({"name": "e", "type": _ENUM_XY}), _record({"name": "e", "type": {**_ENUM_X, "default": "x"}}),
     {"e": "y"}, None),
    (_record({"name": "a", "type": "string"}), _record({"name": "a", "type": "long"}), {"a": "1"},
     "cannot be read"),
    (_record({"name": "a", "type": "int"}), _record({"name": "a", "type": "long"}), {"a": 1}, None),
    (_record({"name": "a", "type": ["null", "string"]}), _record({"name": "a", "type": "string"}),
     {"a": None}, "null cannot be read as string"),
    (_record({"name": "a", "type": "string"}), _record({"name": "a", "type": ["null", "string"]}),
     {"a": "x"}, None),
    (_record({"name": "a", "type": "long"}), _record({"name": "a", "type": ["null", "string"]}),
     {"a": 1}, "matches no branch"),
    (_record({"name": "a", "type": {"type": "array", "items": _record({"name": "i", "type": "int"},
                                                                       name="I")}}),
     _record({"name": "a", "type": {"type": "array", "items": _record(
         {"name": "i", "type": "int"}, {"name": "j", "type": "int"}, name="I")}}),
     {"a": [{"i": 1}]}, "a[].j"),
    (_record({"name": "t", "type": _TIME}), _record({"name": "t", "type": _TIME}), {"t": NOW}, None),
    (_record({"name": "r", "type": _record({"name": "i", "type": "int"}, name="A")}),
     _record({"name": "r", "type": _record({"name": "i", "type": "int"}, name="B")}),
     {"r": {"i": 1}}, "cannot be read"),
]


@pytest.mark.parametrize(("writer", "reader", "value", "problem"), RESOLUTION_CASES)
def test_resolution_checker_agrees_with_fastavro(
    writer: dict[str, Any], reader: dict[str, Any], value: dict[str, Any], problem: str | None
) -> None:
    parsed_writer = fastavro.parse_schema(writer)
    parsed_reader = fastavro.parse_schema(reader)
    found = schemas.resolution_problems(fastavro.schema.expand_schema(parsed_writer),
                                        fastavro.schema.expand_schema(parsed_reader))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_writer, value)
    buf.seek(0)
    if problem is None:
        assert found == []
        fastavro.schemaless_reader(buf, parsed_writer, parsed_reader)
    else:
        assert len(found) == 1 and problem in found[0], found
        with pytest.raises(Exception):  # noqa: B017 - fastavro raises several types
            fastavro.schemaless_reader(buf, parsed_writer, parsed_reader)


def test_a_changed_logical_type_is_a_problem() -> None:
    """fastavro would read the long, but the code expects a datetime: flagged."""
    found = schemas.resolution_problems({"type": "long", "logicalType": "timestamp-millis"}, "long")
    assert found and "logical type" in found[0]


# -- the release flow, on a copy of schemas/ -------------------------------------------------------

INBOUND: records.InboundMessage = {
    "event_id": "wamid.1", "customer_key": "wati:50370000001", "channel": "wati",
    "provider_id": "50370000001", "message_type": "text", "text": "hola", "caption": None,
    "media_ref": None, "media_mime": None, "sender_name": "Ana", "provider_message_ids": ["wamid.1"],
    "provider_time": NOW, "received_at": NOW, "recovered": False, "username": None,
}
OPTIONAL_TIME = {"name": "ingested_at", "type": ["null", _TIME], "default": None,
                 "doc": "A compatible change like the ones the lead adds."}


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(SCHEMAS, tmp_path / "schemas")
    return tmp_path / "schemas"


def _add_field(directory: Path, name: str, field: dict[str, Any]) -> None:
    path = directory / f"watistream.{name}.avsc"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["fields"].append(field)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


@pytest.mark.parametrize(("name", "changed"), [
    # a record changes together with every record that embeds it
    ("InboundMessage", ["CustomerState", "InboundMessage", "ResponderRequest", "VisionRequest"]),
    ("AgentActivity", ["AgentActivity"]),
])
def test_a_compatible_change_is_caught_then_released_by_one_command(
    copy: Path, name: str, changed: list[str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _add_field(copy, name, OPTIONAL_TIME)
    found = schemas.problems(copy)
    assert [p.split(" ")[0] for p in found] == [f"schemas/watistream.{n}.avsc" for n in changed]
    assert all("is not released" in p and schemas.RELEASE_COMMAND in p for p in found)
    assert schemas.main(["check", "--dir", str(copy)]) == 1

    assert schemas.main(["release", "--dir", str(copy)]) == 0
    versions = {e.full_name: e.number for e in REGISTRY.released}
    assert capsys.readouterr().out.splitlines()[:-1] == [
        f"released previous/watistream.{n}.v{versions['watistream.' + n] + 1}.avsc" for n in changed]
    assert schemas.problems(copy) == []
    assert schemas.release(copy) == []  # nothing left to release

    registry = codec.Registry(copy)
    assert len(registry.released) == len(REGISTRY.released) + len(changed)
    if name == "InboundMessage":  # a value written before the change reads with the new field's default
        before = codec.encode("InboundMessage", dict(INBOUND))
        monkeypatch.setattr(codec, "registry", lambda: registry)
        assert codec.decode("InboundMessage", before) == {**INBOUND, "ingested_at": None}
        after = codec.encode("InboundMessage", {**INBOUND, "ingested_at": NOW})
        assert after[2:10] != before[2:10]
        assert codec.decode("InboundMessage", after)["ingested_at"] == NOW


def test_an_incompatible_change_is_refused(copy: Path) -> None:
    _add_field(copy, "AgentActivity", {"name": "ingested_at", "type": _TIME})  # no default
    with pytest.raises(codec.CodecError, match="ingested_at: the reader's field has no default"):
        schemas.release(copy)
    assert json.loads((copy / "released.json").read_text()) == json.loads(
        (SCHEMAS / "released.json").read_text()), "nothing written"
    assert any("cannot be read by the current schema" in p for p in schemas.problems(copy))


def test_a_snapshot_that_does_not_match_its_ledger_entry_is_refused_at_start(copy: Path) -> None:
    snapshot = copy / "previous" / "watistream.AgentActivity.v1.avsc"
    doc = json.loads(snapshot.read_text())
    doc["fields"] = doc["fields"][:-1]
    snapshot.write_text(json.dumps(doc))
    with pytest.raises(codec.CodecError, match=r"the ledger says watistream\.AgentActivity"):
        codec.Registry(copy)


def test_an_unlisted_snapshot_is_reported(copy: Path) -> None:
    shutil.copy(copy / "previous" / "watistream.AgentActivity.v1.avsc",
                copy / "previous" / "watistream.AgentActivity.v9.avsc")
    assert schemas.problems(copy) == [
        "schemas/previous/watistream.AgentActivity.v9.avsc is not in schemas/released.json: "
        "list it or delete it."]


# -- records.py against the .avsc ------------------------------------------------------------------

_PRIMITIVE_TYPES: dict[str, object] = {"string": str, "long": int, "int": int, "double": float,
                                       "float": float, "boolean": bool, "bytes": bytes}


def _typed_dicts() -> dict[str, type]:
    return {n: t for n, t in vars(records).items()
            if isinstance(t, type) and typing.is_typeddict(t) and t.__module__ == records.__name__}


def annotation_problems(annotation: Any, schema: Any, where: str, seen: set[str]) -> list[str]:
    """Why a TypedDict field's annotation does not describe the values of an (expanded) schema."""
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        is_union = get_origin(annotation) in (typing.Union, types.UnionType)
        args = set(get_args(annotation)) if is_union else set()
        if "null" in schema:
            if type(None) not in args:
                return [f"{where}: nullable in the schema, not `| None` in records.py"]
            args.discard(type(None))
            inner = next(iter(args)) if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
            if len(branches) == 1:
                return annotation_problems(inner, branches[0], where, seen)
        return [f"{where}: union {schema} not modelled"]
    if get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in get_args(annotation):
        return [f"{where}: `| None` in records.py, not nullable in the schema"]
    if isinstance(schema, str):
        expected = _PRIMITIVE_TYPES.get(schema)
        if schema == "string" and get_origin(annotation) is Literal:
            return []  # a narrower view of a string field
        return [] if annotation is expected else [f"{where}: {annotation} is not Avro {schema}"]
    if schema.get("logicalType") == "timestamp-millis":
        return [] if annotation is datetime else [f"{where}: {annotation} is not a datetime"]
    kind = schema["type"]
    if kind == "enum":
        if get_origin(annotation) is not Literal or set(get_args(annotation)) != set(schema["symbols"]):
            return [f"{where}: {annotation} is not Literal{schema['symbols']}"]
        return []
    if kind == "array":
        if get_origin(annotation) is not list:
            return [f"{where}: {annotation} is not a list"]
        return annotation_problems(get_args(annotation)[0], schema["items"], f"{where}[]", seen)
    if kind == "record":
        short = str(schema["name"]).rsplit(".", 1)[-1]
        if getattr(annotation, "__name__", None) != short or not typing.is_typeddict(annotation):
            return [f"{where}: {annotation} is not the TypedDict {short}"]
        return typed_dict_problems(annotation, schema, seen)
    if isinstance(kind, dict | list | str):
        return annotation_problems(annotation, kind, where, seen)
    return [f"{where}: schema {schema} not modelled"]


def typed_dict_problems(cls: type, schema: dict[str, Any], seen: set[str]) -> list[str]:
    """Field names equal; NotRequired only where the schema has a default; each type matches."""
    if cls.__name__ in seen:
        return []
    seen.add(cls.__name__)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f["name"]: f for f in schema["fields"]}
    out: list[str] = []
    if list(hints) != list(fields):
        out.append(f"{cls.__name__}: fields {list(hints)} != schema {list(fields)} (names and order)")
    for name in hints.keys() & fields.keys():
        annotation = hints[name]
        if get_origin(annotation) is NotRequired:
            if "default" not in fields[name]:
                out.append(f"{cls.__name__}.{name}: NotRequired but the schema has no default")
            annotation = get_args(annotation)[0]
        out += annotation_problems(annotation, fields[name]["type"], f"{cls.__name__}.{name}", seen)
    return out


def test_every_record_schema_has_its_typed_dict_and_they_agree() -> None:
    typed = _typed_dicts()
    seen: set[str] = set()
    found: list[str] = []
    for name in schemas.record_names(REGISTRY):
        short = name.rsplit(".", 1)[-1]
        if short not in typed:
            found.append(f"records.py has no TypedDict {short}")
            continue
        expanded = fastavro.schema.expand_schema(REGISTRY.current[name].parsed)
        found += typed_dict_problems(typed[short], expanded, seen)
    assert found == [], "\n".join(found)
    assert set(typed) == seen, f"TypedDicts of no schema record: {set(typed) - seen}"


def test_the_records_check_sees_a_mismatch() -> None:
    """Guards the check itself: a renamed field, a lost `| None`, a NotRequired without default."""
    schema = fastavro.schema.expand_schema(REGISTRY.current["watistream.ImageClassified"].parsed)

    class ImageClassified(typing.TypedDict):
        batch_id: str
        customer_key: str
        media_ref: str
        category: str
        confidence: float
        model: NotRequired[str]
        file_id: str
        classified: datetime

    found = typed_dict_problems(ImageClassified, schema, set())
    assert any("names and order" in p for p in found)
    assert "ImageClassified.model: NotRequired but the schema has no default" in found
    assert "ImageClassified.file_id: nullable in the schema, not `| None` in records.py" in found
