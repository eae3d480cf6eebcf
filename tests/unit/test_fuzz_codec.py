"""Property-based fuzzing of the Avro decoders (issue 7, drill 4): whatever bytes arrive on a topic,
`codec.decode_any` / `codec.decode` raise `CodecError` and nothing else, and never hang.

Why it matters: every consumer decodes inside a guard that catches `CodecError` and dead-letters the
record; any other exception type would escape that guard (a dead faust agent, a keyed-consumer
"record_failed" without a dead letter). Four families of input, ~4,500 generated values in total:
random bytes; random bytes behind the valid header of every known schema version; valid encodings
of random records of every schema, then flipped / truncated / extended / spliced; and valid encodings
decoded as the wrong record type.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import codec

#: One decode must be this fast; a slower one is treated as a hang (the pytest timeout is the backstop).
MAX_DECODE_SECONDS = 1.0

REGISTRY = codec.registry()
VERSIONS = sorted(REGISTRY.by_fingerprint.values(), key=lambda v: (v.full_name, str(v.source)))
HEADERS = [codec.MAGIC + v.fingerprint for v in VERSIONS]
RECORD_NAMES = sorted(n.rsplit(".", 1)[-1] for n, v in REGISTRY.current.items()
                      if v.parsed["type"] == "record")

# print_blob: a failure prints the `@reproduce_failure(...)` line that replays it exactly
_BASE = settings(deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> settings:
    """No per-example deadline (a loaded CI machine is slow); hangs are caught by MAX_DECODE_SECONDS."""
    return settings(_BASE, max_examples=examples)


def decode_guarded(data: bytes | None) -> tuple[str, dict[str, Any]] | None:
    """decode_any's result, None for a CodecError; any other exception fails the test, so does a hang."""
    started = time.monotonic()
    try:
        return codec.decode_any(data)
    except codec.CodecError:
        return None
    finally:
        elapsed = time.monotonic() - started
        assert elapsed < MAX_DECODE_SECONDS, f"decoding {len(data or b'')} bytes took {elapsed:.2f} s"


# -- values of any schema --------------------------------------------------------------------------

_DATETIMES = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                          timezones=st.just(UTC)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
_PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
    "string": st.text(max_size=40),
    "bytes": st.binary(max_size=40),
}


def from_schema(schema: Any) -> st.SearchStrategy[Any]:
    """Random valid values of an expanded (fastavro.schema.expand_schema) Avro schema."""
    if isinstance(schema, list):
        return st.one_of([from_schema(branch) for branch in schema])
    if isinstance(schema, str):
        return _PRIMITIVES[schema]
    kind = schema["type"]
    if schema.get("logicalType") == "timestamp-millis":
        return _DATETIMES
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: from_schema(f["type"]) for f in schema["fields"]})
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(from_schema(schema["items"]), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=8), from_schema(schema["values"]), max_size=3)
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    return from_schema(kind)


def _encodings() -> st.SearchStrategy[bytes]:
    """Valid single-object encodings of random values, written by every known schema version."""
    def for_version(version: codec.SchemaVersion) -> st.SearchStrategy[bytes]:
        expanded = fastavro.schema.expand_schema(version.parsed)
        header = codec.MAGIC + version.fingerprint

        def write(value: Any) -> bytes:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, version.parsed, value)
            return header + buf.getvalue()

        return from_schema(expanded).map(write)

    return st.one_of([for_version(v) for v in VERSIONS])


ENCODINGS = _encodings()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoding, then one to three byte-level mutations."""
    data = bytearray(draw(ENCODINGS))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "delete"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif how == "truncate":
            del data[position:]
        elif how == "extend":
            data.extend(draw(st.binary(min_size=1, max_size=64)))
        elif how == "splice":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete" and data:
            del data[position:position + draw(st.integers(1, 8))]
    return bytes(data)


# -- the properties --------------------------------------------------------------------------------

@fuzz(1000)
@given(st.one_of(st.none(), st.binary(max_size=512)))
def test_random_bytes_raise_only_codec_error(data: bytes | None) -> None:
    decode_guarded(data)


@fuzz(1500)
@given(header=st.sampled_from(HEADERS), body=st.binary(max_size=512))
def test_a_valid_header_of_every_schema_with_a_random_body_raises_only_codec_error(
    header: bytes, body: bytes
) -> None:
    decode_guarded(header + body)


@fuzz(1500)
@given(mutated())
def test_flipped_truncated_extended_encodings_raise_only_codec_error(data: bytes) -> None:
    result = decode_guarded(data)
    if result is not None:
        name, value = result
        assert isinstance(value, dict) and name in RECORD_NAMES


@fuzz(500)
@given(data=ENCODINGS, expected=st.sampled_from(RECORD_NAMES))
def test_valid_encodings_decode_or_are_refused_as_the_wrong_type(data: bytes, expected: str) -> None:
    """A valid encoding always decodes with decode_any; decode(name) refuses any other record type."""
    written = REGISTRY.by_fingerprint[data[2:codec.HEADER_LEN]].full_name.rsplit(".", 1)[-1]
    if written not in RECORD_NAMES:  # an enum schema (Channel) is not a record: refused
        assert decode_guarded(data) is None
        return
    assert decode_guarded(data) is not None
    try:
        codec.decode(expected, data)
        assert written == expected
    except codec.CodecError as exc:
        assert written != expected and expected in str(exc)


def test_the_fuzzed_headers_cover_every_schema_version() -> None:
    """Guards the drill itself: a schema added later is fuzzed too (HEADERS is built from the registry)."""
    fingerprints = {v.fingerprint for v in REGISTRY.current.values()}
    fingerprints |= {e.fingerprint for e in REGISTRY.released}
    assert {v.fingerprint for v in VERSIONS} == fingerprints
    assert len(HEADERS) == len(fingerprints)


@pytest.mark.parametrize("data", [
    b"", codec.MAGIC, codec.MAGIC + b"\x00" * 7, codec.MAGIC + b"\xff" * 8,
    HEADERS[0] + b"\xff" * 64,  # varints that never end
    HEADERS[0] + b"\x80" * 64,
    HEADERS[0] + b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a huge string length
])
def test_known_edge_cases_raise_codec_error(data: bytes) -> None:
    assert decode_guarded(data) is None


def test_out_of_range_timestamps_raise_codec_error() -> None:
    """A long far outside datetime's range in a timestamp-millis field (fastavro raises ValueError /
    OverflowError converting it) is refused as a CodecError."""
    doc = json.loads((codec.schema_dir() / "watistream.DeadLetter.avsc").read_text(encoding="utf-8"))
    doc["fields"] = [{**f, "type": "long"} if f["name"] == "failed_at" else f for f in doc["fields"]]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(doc),
                               {"service": "s", "reason": "r", "error": "e", "failed_at": 2**62})
    header = codec.MAGIC + REGISTRY.schema("DeadLetter").fingerprint
    assert decode_guarded(header + buf.getvalue()) is None
