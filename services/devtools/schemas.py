"""`python -m services.devtools.schemas [check|release]`: the ledger of released schema versions.

Every value on a topic carries its writer schema's fingerprint, and compacted topics (customer
state, responder state) keep values written months ago. A record whose schema changes in place
leaves those values with a fingerprint no code knows: every event of every existing customer would
be dead-lettered. So each version of each record that reaches `main` is *released*: a self-contained
snapshot in `schemas/previous/<name>.v<N>.avsc` and an entry in `schemas/released.json`; the codec
reads every released version and resolves it to the current one (Avro schema resolution).

- `check` (default): lists what is wrong — a current schema not in the ledger, a snapshot that is
  not listed, a released version the current schema cannot read; exit status 1 when anything is.
- `release`: for every current record whose fingerprint is not in the ledger, writes its snapshot
  and appends its ledger entry — after checking that the current schema reads every released
  version of that record (an incompatible change is refused: add a default, keep the field...).

A schema that embeds another (ResponderRequest holds InboundMessage) changes with it: `release`
snapshots each record whose own fingerprint changed, so embedding records are released too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastavro

from services.common import codec

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED_KINDS = frozenset({"record", "error", "enum", "fixed"})
#: writer primitive → reader primitives it may be read as (Avro spec, "Schema Resolution")
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"int", "long", "float", "double"}),
    "long": frozenset({"long", "float", "double"}),
    "float": frozenset({"float", "double"}),
    "string": frozenset({"string", "bytes"}),
    "bytes": frozenset({"bytes", "string"}),
}
RELEASE_COMMAND = "python -m services.devtools.schemas release"


# -- snapshots -------------------------------------------------------------------------------------

def _full_name(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def snapshot_of(full_name: str, directory: Path) -> dict[str, Any]:
    """The schema file `directory/<full_name>.avsc` with every named type it refers to (in other
    files) defined inline at its first use, as Avro requires: a file readable on its own, docs kept."""
    defined: set[str] = set()

    def inline(node: Any, namespace: str | None) -> Any:
        if isinstance(node, str):
            if node in PRIMITIVES:
                return node
            name = _full_name(node, namespace)
            if name in defined:
                return name
            path = directory / f"{name}.avsc"
            if not path.is_file():
                raise codec.CodecError(f"{full_name}: unknown type {node!r} (no {path.name})")
            return inline(json.loads(path.read_text(encoding="utf-8")), namespace)
        if isinstance(node, list):
            return [inline(branch, namespace) for branch in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        out = dict(node)
        if kind in NAMED_KINDS:
            name = _full_name(str(node["name"]), node.get("namespace", namespace))
            namespace = name.rsplit(".", 1)[0] if "." in name else None
            defined.add(name)  # before the fields: a reference inside refers to this definition
            if kind in ("record", "error"):
                out["fields"] = [{**f, "type": inline(f["type"], namespace)} for f in node["fields"]]
        elif kind == "array":
            out["items"] = inline(node["items"], namespace)
        elif kind == "map":
            out["values"] = inline(node["values"], namespace)
        else:
            out["type"] = inline(kind, namespace)
        return out

    return inline(full_name, None)


# -- schema resolution (writer → reader) -----------------------------------------------------------

def _kind(schema: Any) -> str:
    """The type of an expanded schema node: a primitive, a named kind, array, map or union."""
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    kind = schema["type"]
    return kind if isinstance(kind, str) else _kind(kind)


def _unwrap(schema: Any) -> Any:
    """`{"type": "long", "logicalType": ...}` → "long"; `{"type": {...}}` → the inner schema."""
    while isinstance(schema, dict) and not isinstance(schema["type"], str):
        schema = schema["type"]
    if isinstance(schema, dict) and schema["type"] in PRIMITIVES:
        return schema["type"]
    return schema


def _short(schema: Any) -> str:
    return str(schema["name"]).rsplit(".", 1)[-1]


def _matches(writer: Any, reader: Any) -> bool:
    """Avro's shallow match: same kind (and name for named types), or a primitive promotion."""
    w, r = _kind(writer), _kind(reader)
    if w in PROMOTIONS and r in PROMOTIONS[w]:
        return True
    if w != r:
        return False
    if w in NAMED_KINDS:
        return _short(_unwrap(writer)) == _short(_unwrap(reader))
    return True


def resolution_problems(writer: Any, reader: Any, where: str = "") -> list[str]:
    """Pure: why a value written with `writer` cannot be read as `reader` (expanded schemas, see
    fastavro.schema.expand_schema); [] when every value can. Avro's rules: fields the reader adds
    need a default, writer enum symbols must exist in the reader (or it has a default), unions
    resolve branch by branch, primitives only promote (int → long → float → double, string ↔ bytes)."""
    here = where or "(record)"
    if isinstance(writer, list):
        return [p for branch in writer for p in resolution_problems(branch, reader, where)]
    if isinstance(reader, list):
        branch = next((b for b in reader if _matches(writer, b)), None)
        if branch is None:
            return [f"{here}: the writer's {_kind(writer)} matches no branch of the reader's union"]
        return resolution_problems(writer, branch, where)
    if not _matches(writer, reader):
        return [f"{here}: the writer's {_kind(writer)} cannot be read as {_kind(reader)}"]
    w, r = _unwrap(writer), _unwrap(reader)
    if isinstance(w, str) or isinstance(r, str):
        w_logical = writer.get("logicalType") if isinstance(writer, dict) else None
        r_logical = reader.get("logicalType") if isinstance(reader, dict) else None
        if w_logical != r_logical:
            return [f"{here}: logical type {w_logical} is read as {r_logical}"]
        return []
    kind = _kind(w)
    if kind in ("record", "error"):
        written = {f["name"]: f for f in w["fields"]}
        problems: list[str] = []
        for field in r["fields"]:
            path = f"{where}.{field['name']}" if where else field["name"]
            if field["name"] in written:
                problems += resolution_problems(written[field["name"]]["type"], field["type"], path)
            elif "default" not in field:
                problems.append(f"{path}: the reader's field has no default and the writer has none")
        return problems
    if kind == "enum":
        missing = [s for s in w["symbols"] if s not in r["symbols"]]
        if missing and "default" not in r:
            return [f"{here}: enum symbols {missing} unknown to the reader (and no enum default)"]
        return []
    if kind == "array":
        return resolution_problems(w["items"], r["items"], f"{where}[]")
    if kind == "map":
        return resolution_problems(w["values"], r["values"], f"{where}{{}}")
    if kind == "fixed" and w["size"] != r["size"]:
        return [f"{here}: fixed size {w['size']} is read as {r['size']}"]
    return []


# -- the ledger ------------------------------------------------------------------------------------

def _expanded(version: codec.SchemaVersion) -> Any:
    return fastavro.schema.expand_schema(version.parsed)


def record_names(registry: codec.Registry) -> list[str]:
    """The current schemas that are records (values on topics); enums only live inside them."""
    return sorted(n for n, v in registry.current.items() if v.parsed["type"] == "record")


def unreleased(registry: codec.Registry) -> list[str]:
    """Current records whose fingerprint is not in the ledger."""
    released = {(e.full_name, e.fingerprint) for e in registry.released}
    return [n for n in record_names(registry) if (n, registry.current[n].fingerprint) not in released]


def unreadable(registry: codec.Registry) -> dict[str, list[str]]:
    """For each released version the current schema cannot read: why (resolution problems)."""
    out: dict[str, list[str]] = {}
    for entry in registry.released:
        current = registry.current.get(entry.full_name)
        if current is None:
            out[entry.snapshot.name] = [f"no current schema {entry.full_name} reads it"]
            continue
        problems = resolution_problems(_expanded(registry.by_fingerprint[entry.fingerprint]),
                                       _expanded(current))
        if problems:
            out[entry.snapshot.name] = problems
    return out


def unlisted_snapshots(directory: Path, registry: codec.Registry) -> list[str]:
    """Snapshot files under previous/ that the ledger does not list (so the codec never loads them)."""
    listed = {e.snapshot.resolve() for e in registry.released}
    return sorted(p.name for p in (directory / "previous").glob("*.avsc") if p.resolve() not in listed)


def problems(directory: Path) -> list[str]:
    """Everything wrong with the ledger of `directory`, each a sentence that says what to do."""
    registry = codec.Registry(directory)
    out = [f"schemas/{name}.avsc is not released (fingerprint {registry.current[name].fingerprint.hex()}"
           f" is not in schemas/{codec.LEDGER_FILE}): it changed without a snapshot. Run "
           f"`{RELEASE_COMMAND}` and commit schemas/previous/ and schemas/{codec.LEDGER_FILE}."
           for name in unreleased(registry)]
    out += [f"schemas/previous/{name} is not in schemas/{codec.LEDGER_FILE}: list it or delete it."
            for name in unlisted_snapshots(directory, registry)]
    out += [f"released version {name} cannot be read by the current schema: {'; '.join(why)}. "
            "Restore compatibility (a new field needs a default; keep enum symbols)."
            for name, why in unreadable(registry).items()]
    return out


def release(directory: Path) -> list[str]:
    """Snapshots every unreleased current record and appends its ledger entry; returns what it
    wrote. Refuses (CodecError) when the current schema cannot read a released version."""
    registry = codec.Registry(directory)
    names = unreleased(registry)
    if not names:
        return []
    broken = unreadable(registry)
    if broken:
        raise codec.CodecError("not released, the change is incompatible: " + "; ".join(
            f"{n}: {', '.join(why)}" for n, why in broken.items()))
    ledger_path = directory / codec.LEDGER_FILE
    ledger: dict[str, list[dict[str, Any]]] = json.loads(ledger_path.read_text(encoding="utf-8"))
    written: list[str] = []
    for name in names:
        entries = ledger.setdefault(name, [])
        number = max((int(e["version"]) for e in entries), default=0) + 1
        relative = f"previous/{name}.v{number}.avsc"
        snapshot = snapshot_of(name, directory)
        (directory / relative).write_text(json.dumps(snapshot, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        entries.append({"version": number, "fingerprint": registry.current[name].fingerprint.hex(),
                        "snapshot": relative})
        written.append(relative)
    ledger_path.write_text(json.dumps(dict(sorted(ledger.items())), indent=2) + "\n", encoding="utf-8")
    codec.Registry(directory)  # the snapshots just written load and carry their ledger fingerprints
    return written


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.devtools.schemas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("check", "release"), default="check")
    parser.add_argument("--dir", type=Path, default=None, help="schema directory (default: schemas/)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    directory = args.dir or codec.schema_dir()
    try:
        if args.command == "release":
            for relative in release(directory):
                print(f"released {relative}")
        found = problems(directory)
    except codec.CodecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for problem in found:
        print(problem, file=sys.stderr)
    if not found:
        print(f"ok: every current schema is released and reads every released version "
              f"({len(codec.Registry(directory).released)} in schemas/{codec.LEDGER_FILE})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
