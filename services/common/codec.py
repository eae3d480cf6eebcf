"""Avro single-object encoding of every topic value, with fastavro.

Wire format (Avro spec, "Single object encoding"): 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema's Parsing Canonical Form, then the binary body. A reader therefore
knows which schema wrote a value: it resolves values written by any released version to the
current version of the same record (Avro schema resolution).

Released versions: `schemas/released.json` (the ledger) lists, for each record, every version ever
released: its fingerprint and a self-contained snapshot under `schemas/previous/`. Every value on a
topic (compacted state included) was written by one of them, so every one stays decodable; a
schema changed without a ledger entry fails the tests (`python -m services.devtools.schemas`).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, cast

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class CodecError(ValueError):
    """A value could not be encoded or decoded; the message says why (and is safe to log)."""


@dataclass(frozen=True)
class SchemaVersion:
    full_name: str
    parsed: Any
    fingerprint: bytes
    source: Path
    # the compiled writer of `_compile_writer`, None when the schema uses a type it does not handle
    writer: Writer | None = None


def schema_dir() -> Path:
    """`schemas/` of the repository, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "schemas", here / "_schemas"):
        if candidate.is_dir():
            return candidate
    raise CodecError(f"schema directory not found near {here}")


def _fingerprint(schema: Any) -> bytes:
    canonical = to_parsing_canonical_form(schema)
    return int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")


LEDGER_FILE = "released.json"


@dataclass(frozen=True)
class ReleasedVersion:
    """One ledger entry: version `number` of record `full_name`, its fingerprint and snapshot."""

    full_name: str
    number: int
    fingerprint: bytes
    snapshot: Path


def read_ledger(directory: Path) -> list[ReleasedVersion]:
    """The released versions listed in `directory/released.json`, checked for shape (not content).

    Shape: `{"watistream.X": [{"version": 1, "fingerprint": "<16 hex>", "snapshot":
    "previous/watistream.X.v1.avsc"}, ...], ...}`; the fingerprint is the 8 header bytes in hex.
    """
    path = directory / LEDGER_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CodecError(f"schema ledger {path} unreadable: {exc}") from exc
    if not isinstance(doc, dict):
        raise CodecError(f"schema ledger {path}: expected an object of record names")
    released: list[ReleasedVersion] = []
    for full_name, entries in doc.items():
        if not isinstance(entries, list):
            raise CodecError(f"schema ledger {path}: {full_name} is not a list of versions")
        for entry in entries:
            try:
                released.append(ReleasedVersion(
                    str(full_name), int(entry["version"]), bytes.fromhex(str(entry["fingerprint"])),
                    directory / str(entry["snapshot"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise CodecError(f"schema ledger {path}: bad entry {entry!r} of {full_name}") from exc
    return released


class Registry:
    """Every known schema version: by full name (current) and by fingerprint (current and every
    released version of the ledger)."""

    def __init__(self, directory: Path) -> None:
        self.current: dict[str, SchemaVersion] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for path in sorted(directory.glob("*.avsc")):
            self.current[path.stem] = self._version(path)
        # Released versions are self-contained snapshots, kept so that data written by them stays
        # readable. A snapshot that does not have its ledger fingerprint would make data written
        # by that version unreadable: refused at start rather than discovered on a customer's event.
        self.released = read_ledger(directory)
        for entry in self.released:
            try:
                version = self._version(entry.snapshot)
            except Exception as exc:  # fastavro's parse errors are of several types
                raise CodecError(f"snapshot {entry.snapshot} unreadable: {exc}") from exc
            if (version.full_name, version.fingerprint) != (entry.full_name, entry.fingerprint):
                raise CodecError(
                    f"snapshot {entry.snapshot} is {version.full_name} {version.fingerprint.hex()}, "
                    f"the ledger says {entry.full_name} {entry.fingerprint.hex()}")

    def _version(self, path: Path) -> SchemaVersion:
        parsed: dict[str, Any] = fastavro.schema.load_schema(str(path))  # type: ignore[assignment]
        version = SchemaVersion(str(parsed["name"]), parsed, _fingerprint(parsed), path,
                                compile_writer(parsed))
        self.by_fingerprint.setdefault(version.fingerprint, version)
        return version

    def schema(self, name: str) -> SchemaVersion:
        full_name = name if "." in name else f"watistream.{name}"
        try:
            return self.current[full_name]
        except KeyError:
            raise CodecError(f"unknown schema {name!r}") from None


@cache
def registry() -> Registry:
    return Registry(schema_dir())


def encode(name: str, value: dict[str, Any]) -> bytes:
    """Encodes `value` with the current schema `name` (e.g. "InboundMessage")."""
    version = registry().schema(name)
    if version.writer is not None:
        out = bytearray(MAGIC)
        out += version.fingerprint
        try:
            version.writer(value, out)
        except Exception:  # not the exact types the fast writer handles: fastavro decides (or refuses)
            out.clear()
        else:
            return bytes(out)
    return encode_with_fastavro(name, value)


def encode_with_fastavro(name: str, value: dict[str, Any]) -> bytes:
    """`encode` by fastavro alone: the reference the fast writer is tested against."""
    version = registry().schema(name)
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(version.fingerprint)
    try:
        fastavro.schemaless_writer(buf, version.parsed, value, strict_allow_default=True)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise CodecError(f"{name}: value does not match the schema: {exc}") from exc
    return buf.getvalue()


# --- the fast writer ------------------------------------------------------------------------------
# fastavro's `schemaless_writer` resolves every union by validating the value against each branch
# and checks the record's keys (strict_allow_default): ~15-20 µs for an InboundMessage, paid once
# per webhook. A writer compiled from the schema does the happy path in a third of that. It accepts
# only the exact Python types fastavro writes without conversion (str, int in range, bool, float,
# bytes, list, dict with exactly the schema's fields, aware datetime for timestamp-millis); anything
# else raises `_Unfit` and `encode` hands the value to fastavro, so bytes and errors are fastavro's.
# tests/unit/test_codec.py holds the two writers byte-equal over random values of every schema.

Writer = Callable[[Any, bytearray], None]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class _Unfit(Exception):
    """The value is not of the exact types the compiled writer handles."""


def _write_long(n: int, out: bytearray) -> None:
    n = (n << 1) ^ (n >> 63)  # zig-zag (n is within the 64-bit range)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _long(value: Any, out: bytearray) -> None:
    if type(value) is not int or not _LONG_MIN <= value <= _LONG_MAX:
        raise _Unfit
    _write_long(value, out)


def _int(value: Any, out: bytearray) -> None:
    if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
        raise _Unfit
    _write_long(value, out)


def _string(value: Any, out: bytearray) -> None:
    if type(value) is not str:
        raise _Unfit
    data = value.encode()  # a lone surrogate raises: fastavro then reports it
    size = len(data)
    if size < 64:
        out.append(size << 1)  # the zig-zag varint of a small length is one byte
    else:
        _write_long(size, out)
    out += data


def _bytes(value: Any, out: bytearray) -> None:
    if type(value) is not bytes:
        raise _Unfit
    _write_long(len(value), out)
    out += value


def _boolean(value: Any, out: bytearray) -> None:
    if value is True:
        out.append(1)
    elif value is False:
        out.append(0)
    else:
        raise _Unfit


def _null(value: Any, out: bytearray) -> None:
    if value is not None:
        raise _Unfit


def _double(value: Any, out: bytearray) -> None:
    if type(value) is not float:
        raise _Unfit
    out += struct.pack("<d", value)


def _timestamp_millis(value: Any, out: bytearray) -> None:
    """fastavro's `prepare_timestamp_millis` for aware datetimes (naive ones depend on the host's
    time zone: fastavro's business), plain ints pass as longs."""
    if type(value) is datetime and value.utcoffset() is not None:
        delta = value - _EPOCH
        _long((delta.days * 24 * 3600 + delta.seconds) * 1000 + int(delta.microseconds / 1000), out)
    else:
        _long(value, out)


_PRIMITIVE_WRITERS: dict[str, Writer] = {
    "null": _null, "boolean": _boolean, "int": _int, "long": _long, "double": _double,
    "string": _string, "bytes": _bytes,
}


def compile_writer(schema: Any, named: dict[str, Any] | None = None) -> Writer | None:
    """A writer for a parsed schema, or None when it uses a type the fast writer does not handle
    (float, fixed, map, unions of more than null + one type, other logical types, recursion)."""
    if named is None:
        named = dict(schema.get("__named_schemas", {})) if isinstance(schema, dict) else {}
    return _compile(schema, named, frozenset())


def _compile(schema: Any, named: dict[str, Any], seen: frozenset[str]) -> Writer | None:
    if isinstance(schema, str):
        if schema in _PRIMITIVE_WRITERS:
            return _PRIMITIVE_WRITERS[schema]
        if schema in named:  # a reference to a named type; the record branch guards recursion
            return _compile(named[schema], named, seen)
        return None
    if isinstance(schema, list):
        return _compile_union(schema, named, seen)
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    logical = schema.get("logicalType")
    if logical is not None:
        return _timestamp_millis if (logical, kind) == ("timestamp-millis", "long") else None
    if kind == "record":
        name = str(schema.get("name"))
        if name in seen:
            return None
        return _compile_record(schema, named, seen | {name})
    if kind == "enum":
        index = {symbol: i for i, symbol in enumerate(schema["symbols"])}

        def enum(value: Any, out: bytearray) -> None:
            if type(value) is not str:
                raise _Unfit
            _write_long(index[value], out)  # KeyError: not a symbol, fastavro reports it
        return enum
    if kind == "array":
        item = _compile(schema["items"], named, seen)
        if item is None:
            return None
        return _array_writer(item)
    if isinstance(kind, str | list | dict) and kind not in ("map", "fixed", "float", "error"):
        return _compile(kind, named, seen)
    return None


def _array_writer(item: Writer) -> Writer:
    def array(value: Any, out: bytearray) -> None:
        if type(value) is not list:
            raise _Unfit
        if value:
            _write_long(len(value), out)
            for element in value:
                item(element, out)
        out.append(0)
    return array


def _compile_union(branches: list[Any], named: dict[str, Any], seen: frozenset[str]) -> Writer | None:
    if len(branches) != 2 or "null" not in branches:
        return None
    null_index = branches.index("null")
    other = _compile(branches[1 - null_index], named, seen)
    if other is None:
        return None
    null_tag, other_tag = (0, 2) if null_index == 0 else (2, 0)  # zig-zag of the branch index
    def union(value: Any, out: bytearray) -> None:
        if value is None:
            out.append(null_tag)
        else:
            out.append(other_tag)
            other(value, out)
    return union


def _compile_record(schema: dict[str, Any], named: dict[str, Any], seen: frozenset[str]) -> Writer | None:
    fields: list[tuple[str, Writer]] = []
    for field in schema["fields"]:
        writer = _compile(field["type"], named, seen)
        if writer is None:
            return None
        fields.append((field["name"], writer))
    count = len(fields)

    def record(value: Any, out: bytearray) -> None:
        # exactly the schema's fields: a missing one (default or error) and extra keys are fastavro's
        if type(value) is not dict or len(value) != count:
            raise _Unfit
        for name, writer in fields:
            writer(value[name], out)
    return record


# --- the fast reader ------------------------------------------------------------------------------
# fastavro's `schemaless_reader` costs ~20-30 µs for a BatchDecision (~135 bytes): per-call set-up
# and a datetime built for every timestamp. The console's consumer decodes every record of six
# topics to catch up after a rebuild, so a reader generated as Python source from the writer schema
# (straight-line code, varints inline) does the same work in a fraction of that, and can leave
# timestamp-millis values as the epoch-millisecond integers the console stores. It reads a value as
# written by its own schema (no resolution): `decode_any_fast` uses it for values of a current
# schema and falls back to fastavro's resolution for older versions. Anything malformed raises (an
# IndexError, a ValueError...) and becomes a CodecError; tests/unit/test_codec.py holds it equal to
# fastavro over random values of every schema version.

Reader = Callable[[bytes, int], tuple[Any, int]]


def _varint_rest(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """The rest of a varint whose first byte (`first`, continuation bit set) was at pos - 1."""
    value, shift = first & 0x7F, 7
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


class _ReaderSource:
    """Generates one Python function per record schema; `emit` writes code that leaves the value
    read in the named local variable."""

    def __init__(self, named: dict[str, Any], raw_timestamps: bool) -> None:
        self.named = named
        self.raw_timestamps = raw_timestamps
        self.functions: dict[str, str] = {}  # record full name -> function name
        self.sources: list[str] = []
        self.constants: dict[str, Any] = {}
        self.counter = 0

    def _var(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def _long(self, target: str, ind: str) -> list[str]:
        return [f"{ind}b = d[p]; p += 1",
                f"{ind}if b & 0x80: b, p = _varint_rest(d, p, b)",
                f"{ind}{target} = (b >> 1) ^ -(b & 1)"]

    def record_function(self, schema: dict[str, Any]) -> str:
        name = str(schema["name"])
        if name in self.functions:
            return self.functions[name]
        function = self.functions[name] = f"_read_{len(self.functions)}"
        lines = [f"def {function}(d, p):"]
        fields = []
        for field in schema["fields"]:
            var = self._var("f")
            lines += self.emit(field["type"], var, "    ")
            fields.append(f"{field['name']!r}: {var}")
        lines.append(f"    return {{{', '.join(fields)}}}, p")
        self.sources.append("\n".join(lines))
        return function

    def emit(self, schema: Any, target: str, ind: str) -> list[str]:
        if isinstance(schema, str):
            if schema in self.named:
                return self.emit(self.named[schema], target, ind)
            return self._primitive(schema, target, ind)
        if isinstance(schema, list):
            return self._union(schema, target, ind)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical is not None:
            if (logical, kind) != ("timestamp-millis", "long"):
                raise _Unfit
            lines = self._long(target, ind)
            if not self.raw_timestamps:
                lines.append(f"{ind}{target} = _EPOCH + _timedelta(microseconds={target} * 1000)")
            return lines
        if kind == "record":
            return [f"{ind}{target}, p = {self.record_function(schema)}(d, p)"]
        if kind == "enum":
            symbols = self._var("_symbols")
            self.constants[symbols] = tuple(schema["symbols"])
            return [*self._long("n", ind), f"{ind}if n < 0: raise ValueError('bad enum index')",
                    f"{ind}{target} = {symbols}[n]"]
        if kind == "array":
            return self._array(schema["items"], target, ind)
        if isinstance(kind, str | list | dict):
            return self.emit(kind, target, ind)
        raise _Unfit

    def _array(self, items: Any, target: str, ind: str) -> list[str]:
        """Blocks of items until an empty one; a negative count is followed by the block's size."""
        count, item = self._var("c"), self._var("i")
        inner = ind + "    "
        return [
            f"{ind}{target} = []",
            *self._long(count, ind),
            f"{ind}while {count}:",
            f"{inner}if {count} < 0:",
            f"{inner}    {count} = -{count}",
            *self._long("_size", inner + "    "),
            f"{inner}for _ in range({count}):",
            *self.emit(items, item, inner + "    "),
            f"{inner}    {target}.append({item})",
            *self._long(count, inner),
        ]

    def _string(self, target: str, ind: str) -> list[str]:
        return [*self._long("n", ind),
                f"{ind}if n < 0 or p + n > len(d): raise ValueError('bad length')",
                f"{ind}{target} = d[p:p + n].decode(); p += n"]

    def _primitive(self, kind: str, target: str, ind: str) -> list[str]:
        if kind == "null":
            return [f"{ind}{target} = None"]
        if kind == "boolean":
            return [f"{ind}{target} = d[p] == 1; p += 1"]
        if kind in ("int", "long"):
            return self._long(target, ind)
        if kind == "string":
            return self._string(target, ind)
        if kind == "bytes":
            return [*self._long("n", ind),
                    f"{ind}if n < 0 or p + n > len(d): raise ValueError('bad length')",
                    f"{ind}{target} = d[p:p + n]; p += n"]
        if kind == "double":
            return [f"{ind}{target} = _unpack_double(d, p)[0]; p += 8"]
        raise _Unfit

    def _union(self, branches: list[Any], target: str, ind: str) -> list[str]:
        lines = self._long("n", ind)
        for index, branch in enumerate(branches):
            lines.append(f"{ind}{'if' if index == 0 else 'elif'} n == {index}:")
            lines += self.emit(branch, target, ind + "    ")
        lines.append(f"{ind}else: raise ValueError('union branch out of range')")
        return lines


def compile_reader(schema: Any, *, raw_timestamps: bool = False) -> Reader | None:
    """A reader `(data, pos) -> (value, pos)` of values written by the parsed `schema`, or
    None when it uses a type it does not handle (float, fixed, map, logical types other than
    timestamp-millis: none of ours).
    `raw_timestamps` leaves timestamp-millis values as epoch milliseconds (ints)."""
    named = dict(schema.get("__named_schemas", {})) if isinstance(schema, dict) else {}
    source = _ReaderSource(named, raw_timestamps)
    try:
        source.sources.append("\n".join(["def _read_value(d, p):", *source.emit(schema, "v", "    "),
                                         "    return v, p"]))
    except (_Unfit, KeyError, TypeError):
        return None
    scope: dict[str, Any] = {"_varint_rest": _varint_rest, "_EPOCH": _EPOCH, "_timedelta": timedelta,
                             "_unpack_double": struct.Struct("<d").unpack_from, **source.constants}
    exec("\n\n".join(source.sources), scope)  # noqa: S102 - source generated from our own schemas
    return cast(Reader, scope["_read_value"])


@cache
def _fast_reader(fingerprint: bytes, raw_timestamps: bool) -> Reader | None:
    return compile_reader(registry().by_fingerprint[fingerprint].parsed, raw_timestamps=raw_timestamps)


def _datetimes_to_ms(value: Any) -> Any:
    if isinstance(value, datetime):
        delta = value - _EPOCH
        return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if isinstance(value, dict):
        return {k: _datetimes_to_ms(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_datetimes_to_ms(v) for v in value]
    return value


def decode_any_fast(
    data: bytes | None, *, raw_timestamps: Container[str] = ()
) -> tuple[str, dict[str, Any]]:
    """`decode_any` by the generated reader: the same (name, value) for a value of a current schema
    (older versions: fastavro's resolution, as `decode_any`). `raw_timestamps`: the record names
    (e.g. "BatchDecision") whose timestamp-millis values come as epoch milliseconds (ints) instead
    of aware datetimes."""
    if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise CodecError("not Avro single-object encoding (bad or missing header)")
    fingerprint_ = bytes(data[2:HEADER_LEN])
    writer = registry().by_fingerprint.get(fingerprint_)
    if writer is None or registry().current.get(writer.full_name) is not writer:
        name, value = decode_any(data)  # unknown (its error) or an older version (resolution)
        return name, (_datetimes_to_ms(value) if name in raw_timestamps else value)
    name = writer.full_name.rsplit(".", 1)[-1]
    reader = _fast_reader(fingerprint_, name in raw_timestamps)
    if reader is None:
        name, value = decode_any(data)
        return name, (_datetimes_to_ms(value) if name in raw_timestamps else value)
    try:
        value, end = reader(bytes(data), HEADER_LEN)
    except Exception as exc:  # a corrupt body fails in many ways
        raise CodecError(f"{writer.full_name}: corrupt body ({type(exc).__name__}: {exc})") from exc
    if end != len(data):
        raise CodecError(f"{writer.full_name}: corrupt body ({len(data) - end} trailing bytes)")
    return name, value


def decode_any(data: bytes | None) -> tuple[str, dict[str, Any]]:
    """Decodes a single-object-encoded value; returns (record name, value as current schema)."""
    if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise CodecError("not Avro single-object encoding (bad or missing header)")
    writer = registry().by_fingerprint.get(bytes(data[2:HEADER_LEN]))
    if writer is None:
        raise CodecError(f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()} (not a released "
                         f"version in {LEDGER_FILE}: written by a newer release, or not Avro)")
    reader = registry().current.get(writer.full_name, writer)
    try:
        body = io.BytesIO(data[HEADER_LEN:])
        value = fastavro.schemaless_reader(body, writer.parsed, reader.parsed)
        if body.tell() != len(data) - HEADER_LEN:
            raise ValueError(f"{len(data) - HEADER_LEN - body.tell()} trailing bytes")
    except Exception as exc:  # fastavro raises many types on corrupt bodies
        raise CodecError(f"{writer.full_name}: corrupt body ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise CodecError(f"{writer.full_name}: decoded to {type(value).__name__}, not a record")
    return writer.full_name.rsplit(".", 1)[-1], value


def decode(name: str, data: bytes | None) -> dict[str, Any]:
    """Decodes a value that must be of record `name`."""
    got, value = decode_any(data)
    if got != name:
        raise CodecError(f"expected {name}, got {got}")
    return value


def register_faust_codec() -> None:
    """Registers `avro` as a faust codec: bytes pass through, dicts encode by their `_schema` key.

    The services decode inside a guard (poison messages go to the dead-letter topic), so agents
    consume raw bytes; the codec exists for faust's own `Topic.send(value=...)` convenience.
    """
    from faust.serializers import codecs

    class AvroCodec(codecs.Codec):
        def _dumps(self, obj: Any) -> bytes:
            if isinstance(obj, bytes | bytearray):
                return bytes(obj)
            if isinstance(obj, dict) and "_schema" in obj:
                body = {k: v for k, v in obj.items() if k != "_schema"}
                return encode(str(obj["_schema"]), body)
            raise CodecError("avro codec needs bytes or a dict with a _schema key")

        def _loads(self, data: bytes) -> Any:
            return decode_any(data)[1]

    if "avro" not in codecs.codecs:
        codecs.register("avro", AvroCodec())
