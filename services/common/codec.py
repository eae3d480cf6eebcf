"""Avro single-object encoding of every topic value, with fastavro.

Wire format (Avro spec, "Single object encoding"): 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema's Parsing Canonical Form, then the binary body. A reader therefore
knows which schema wrote a value: it resolves values written by a previous version (kept in
`schemas/previous/`) to the current version of the same record.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

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


class Registry:
    """Every known schema version, by full name (current) and by fingerprint (all versions)."""

    def __init__(self, directory: Path) -> None:
        self.current: dict[str, SchemaVersion] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for path in sorted(directory.glob("*.avsc")):
            self.current[path.stem] = self._version(path)
        # Previous versions are self-contained files, kept so that old data stays readable.
        for path in sorted((directory / "previous").glob("*.avsc")):
            self._version(path)

    def _version(self, path: Path) -> SchemaVersion:
        parsed: dict[str, Any] = fastavro.schema.load_schema(str(path))  # type: ignore[assignment]
        version = SchemaVersion(str(parsed["name"]), parsed, _fingerprint(parsed), path)
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
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(version.fingerprint)
    try:
        fastavro.schemaless_writer(buf, version.parsed, value, strict_allow_default=True)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise CodecError(f"{name}: value does not match the schema: {exc}") from exc
    return buf.getvalue()


def decode_any(data: bytes | None) -> tuple[str, dict[str, Any]]:
    """Decodes a single-object-encoded value; returns (record name, value as current schema)."""
    if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise CodecError("not Avro single-object encoding (bad or missing header)")
    writer = registry().by_fingerprint.get(bytes(data[2:HEADER_LEN]))
    if writer is None:
        raise CodecError(f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}")
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
