"""The RocksDB floor of the console benchmark (bench/console_rocks.py) does the work it is measured
for: its index is what the customers page and the overview would read. A floor that skipped part of
it would look faster than a real store could be."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from rocksdict import Rdict

from bench import console_rocks as cr

SUMMARY = cr.SUMMARY
HOUR_MS = 3_600_000
BASE = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


def record(n: int, customer: int, at: int, held: bool, recovered: int = 0) -> cr.Record:
    """A polled decision (its Kafka time is its decided time here: rb, which has no header, uses it)."""
    header = SUMMARY.pack(at, int(held), 0, 0, 0, 0, 0, recovered, 0) + (b"human_active" if held else b"")
    return (f"wati:5039{customer:07d}".encode(), n % 2, n, at, b"avro-%d" % n, header)


def keys(db: Rdict, prefix: bytes) -> list[bytes]:
    return [k for k in db.keys(from_key=prefix) if isinstance(k, bytes) and k.startswith(prefix)]


def value(db: Rdict, key: bytes) -> bytes:
    found = db.get(key)
    assert isinstance(found, bytes), key
    return found


def count(db: Rdict, key: bytes) -> int:
    return struct.unpack("<q", value(db, key))[0] if db.get(key) is not None else 0


@pytest.fixture
def polls() -> list[list[cr.Record]]:
    """Three customers over three polls: 0 held then answered, 1 answered then held, 2 recovered
    once; 1's second decision arrives before its first one's later time (late, out of order)."""
    return [
        [record(0, 0, BASE + 1_000, True), record(1, 1, BASE + 2_000, False)],
        [record(2, 0, BASE + 5_000, False), record(3, 2, BASE + HOUR_MS + 10, False, recovered=1)],
        [record(4, 1, BASE + 7_000, True), record(5, 1, BASE + 6_000, False)],
    ]


@pytest.mark.parametrize("mode", ["rb", "rc-header"])
def test_floor_keeps_one_order_key_per_customer_newest_first(
    tmp_path: Path, polls: list[list[cr.Record]], mode: str
) -> None:
    db = cr.open_db(tmp_path / mode, wal=False)
    for poll in polls:
        cr.write(db, "audit", poll, mode)
    latest = {b"wati:50390000000": BASE + 5_000, b"wati:50390000001": BASE + 7_000,
              b"wati:50390000002": BASE + HOUR_MS + 10}
    order = [k[9:] for k in keys(db, b"G")]
    assert order == sorted(latest, key=lambda k: -latest[k])
    assert [k[len(b"Ldefault\0") + 8:] for k in keys(db, b"Ldefault\0")] == order
    assert count(db, b"N*default") == 3
    assert len(keys(db, b"D")) == 6 and len(keys(db, b"T")) == 6
    hours = {struct.unpack(">q", k[1:9])[0]: cr.HOUR.unpack(value(db, k)) for k in keys(db, b"H")}
    assert sum(h[0] for h in hours.values()) == 6
    positions = {struct.unpack(">q", k[-8:])[0]: struct.unpack(">q", value(db, k))[0] for k in keys(db, b"O")}
    assert positions == {0: 5, 1: 6}  # the next offsets, by partition, in the same batches
    db.close()


def test_floor_filters_follow_the_latest_decision(tmp_path: Path, polls: list[list[cr.Record]]) -> None:
    db = cr.open_db(tmp_path / "rc", wal=False)
    for poll in polls:
        cr.write(db, "audit", poll, "rc-header")
    held = [k[-16:] for k in keys(db, b"Fhdefault\0")]
    assert held == [b"wati:50390000001"]  # 0 answered after its hold; 1's latest (7,000) is held
    assert count(db, b"Nhdefault") == 1
    assert [k[-16:] for k in keys(db, b"Frdefault\0")] == [b"wati:50390000002"]
    assert count(db, b"Nrdefault") == 1
    row = value(db, b"Cwati:50390000001")
    # last time, last decision, batches, held, held since, recovered, errors
    assert cr.CUSTOMER.unpack_from(row) == (BASE + 7_000, BASE + 7_000, 3, 1, BASE + 7_000, 0, 0)
    assert row[cr.CUSTOMER.size:] == b"human_active"
    hours = {struct.unpack(">q", k[1:9])[0]: cr.HOUR.unpack(value(db, k)) for k in keys(db, b"H")}
    assert hours[BASE][:2] == (5, 2) and hours[BASE + HOUR_MS][0] == 1 and hours[BASE + HOUR_MS][7] == 1
    db.close()


def test_floor_decoding_the_value_gives_the_header_figures(tmp_path: Path) -> None:
    """rc-decode reads the same figures from the Avro value as rc-header from the header."""
    from datetime import UTC, datetime

    from bench.console import decision, summary_header
    from services.common import codec

    at = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    for n in (3, 7, 13, 14):
        d = decision("wati:50390000009", f"wati:50390000009:{n}", at, n)
        assert cr._figures_from_value(codec.encode("BatchDecision", dict(d))) == \
            cr._figures_from_header(summary_header(d))
