"""The console's catch-up floor with RocksDB (rocksdict) instead of SQLite: how fast can a consumer
persist what the pages need into an LSM store here? (BENCHMARKS section 7, "The floor with RocksDB".)

One polled batch = one `WriteBatch` with the next positions in it (so rows and positions are applied
together, WAL or not: without the WAL a crash loses the last batches *and* their positions, and the
consumer reads those records again). Keys, all in the default column family, ordered as the pages
read them:

    D <customer> 0x00 <time><partition><offset>  -> the raw Avro value (the timeline; decoded when shown)
    T <time><partition><offset> <customer>       -> ''   (the prune's order)
    C <customer>                                 -> the customers page's row (`CUSTOMER`, + hold reason)
    G <NEVER - last_at> <customer>               -> ''   (the customers page, newest first)
    L <tenant> 0x00 <NEVER - last_at> <customer> -> ''   (the same within a tenant)
    F <flag><tenant> 0x00 <NEVER - last_at> <customer> -> '' (filters: h held, r recovered, e errors)
    N <flag><tenant>                             -> count (a filter's or all customers' total, '*')
    H <hour><tenant>                             -> the overview's hourly figures (`HOUR`)
    O <topic> 0x00 <partition>                   -> next offset

Modes: `ra` raw records only (D + T); `rb` + the customers' rows and order indexes (one multi-get of
the poll's customers, then delete the old order keys and put the new ones) and hourly batch counts;
`rc-header` + everything the pages index (hold state, recovered, errors, filter indexes and counts,
every hourly figure) from the summary header the context worker would add (no Avro decoding);
`rc-decode` the same figures from the console's decoder (`codec.decode_any_fast`) instead.
"""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

from rocksdict import (
    BlockBasedOptions,
    Cache,
    Checkpoint,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from services.common import codec
from services.console import rows
from services.console.consumer import RAW_TIMESTAMPS

NEVER = 2**62
PLACE = struct.Struct(">qHq")  # time, partition, offset (big-endian: the keys sort by them)
WHEN = struct.Struct(">q")
# last_at, last decision at, batches, held, held since, recovered, errors; then the hold reason
CUSTOMER = struct.Struct("<qqIBqII")
HOUR = struct.Struct("<9q")  # rows.DECISION_FIGURES
COUNT = struct.Struct("<q")
# the bench's summary header (bench.console.summary_header): decided_at ms, held, check ran, injected by
# source x3, webhooks missing, recovered, history error; then the hold reason
SUMMARY = struct.Struct("<qBBHHHHHB")
FLAGS = (b"h", b"r", b"e")
NO_FLAGS = (False, False, False)
MODES = ("ra", "rb", "rc-header", "rc-decode", "rd-blind")


def open_db(path: Path, wal: bool) -> Rdict:
    """Options for bulk writes: large memtables, no compression (the values are small Avro records),
    two background jobs (the machine has two cores)."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(64 << 20)
    options.set_max_write_buffer_number(4)
    options.set_compression_type(DBCompressionType.none())
    options.set_max_background_jobs(2)
    # the poll's multi-get of its customers: most are absent in a rebuild (a bloom filter answers
    # without a data block) or in a fixed 64 MiB block cache
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(Cache(64 << 20))
    options.set_block_based_table_factory(table)
    db = Rdict(str(path), options)
    write = WriteOptions()
    write.disable_wal = not wal  # type: ignore[assignment,method-assign]  # a property at run time
    db.set_write_options(write)
    return db


def _tenant(key: bytes) -> bytes:
    return (rows.tenant_of(key) or "").encode()


def _figures_from_header(raw: bytes) -> tuple[int, tuple[int, ...], bytes]:
    at, held, ran, rt, hist, both, missing, recovered, failed = SUMMARY.unpack_from(raw)
    return at, (1, held, ran, rt, hist, both, missing, recovered, failed), raw[SUMMARY.size:]


def _figures_from_value(value: bytes) -> tuple[int, tuple[int, ...], bytes]:
    _, d = codec.decode_any_fast(value, raw_timestamps=RAW_TIMESTAMPS)
    rt = hist = both = 0
    for item in d["injected"]:
        source = item.get("source")
        if source == "realtime":
            rt += 1
        elif source == "history":
            hist += 1
        elif source == "both":
            both += 1
    held = 1 if d["held"] else 0
    return d["decided_at"], (1, held, 1 if d["missed_check_ran"] else 0, rt, hist, both,
                             d["webhooks_missing"] or 0, len(d["recovered_event_ids"] or ()),
                             1 if d["history_error"] else 0), (d["hold_reason"] or "").encode()


# a polled record as the writer needs it: key, partition, offset, Kafka time, value, summary header
Record = tuple[bytes, int, int, int, bytes, bytes]


def records_of(polled: Iterable[Any]) -> list[Record]:
    return [(r.key, r.partition, r.offset, r.timestamp, r.value, r.headers[0][1]) for r in polled]


def write(db: Rdict, topic: str, batch: Sequence[Record], mode: str) -> None:
    """One polled batch into the store, one WriteBatch with its positions (see the module doc)."""
    db.write(batch_for(db, topic, batch, mode))


def batch_for(db: Rdict, topic: str, batch: Sequence[Record], mode: str) -> WriteBatch:
    """The WriteBatch of one polled batch (the Python side of `write`; the write itself is RocksDB's,
    without the GIL)."""
    wb = WriteBatch(raw_mode=True)
    put, delete = wb.put, wb.delete
    pack_place = PLACE.pack
    positions: dict[int, int] = {}
    if mode == "ra":
        for key, partition, offset, at, value, _ in batch:
            place = pack_place(at, partition, offset)
            put(b"D" + key + b"\0" + place, value)
            put(b"T" + place + key, b"")
            positions[partition] = offset + 1
        _positions(put, topic, positions)
        return wb
    if mode == "rd-blind":
        return _blind(db, topic, batch)
    figures_of: Callable[[bytes], tuple[int, tuple[int, ...], bytes]] | None = (
        _figures_from_header if mode == "rc-header" else _figures_from_value if mode == "rc-decode" else None)
    # per customer of the poll: [decisions, latest time, recovered, errors, held, hold reason]
    customers: dict[bytes, list[Any]] = {}
    hours: dict[int, list[int]] = {}
    for key, partition, offset, at, value, header in batch:
        if figures_of is None:
            figures: tuple[int, ...] = (1, 0, 0, 0, 0, 0, 0, 0, 0)
            reason = b""
        else:
            at, figures, reason = figures_of(header if mode == "rc-header" else value)
        place = pack_place(at, partition, offset)
        put(b"D" + key + b"\0" + place, value)
        put(b"T" + place + key, b"")
        positions[partition] = offset + 1
        if (c := customers.get(key)) is None:
            customers[key] = [1, at, figures[7], figures[8], figures[1], reason]
        else:
            c[0] += 1
            c[2] += figures[7]
            c[3] += figures[8]
            if at >= c[1]:
                c[1], c[4], c[5] = at, figures[1], reason
        hour = at - at % 3_600_000
        if (h := hours.get(hour)) is None:
            hours[hour] = list(figures)
        else:
            for i, n in enumerate(figures):
                h[i] += n
    counts: dict[bytes, int] = {}
    keys = list(customers)
    olds = _get_many(db, [b"C" + k for k in keys])
    for key, old in zip(keys, olds, strict=True):
        n, at, recovered, errors, held, reason = customers[key]
        tenant = _tenant(key)
        if old is None:
            last_at, last_decision, batches, was_held, since, rec0, err0 = at, 0, 0, 0, 0, 0, 0
            old_flags: tuple[bool, ...] = (False, False, False)
            counts[b"*" + tenant] = counts.get(b"*" + tenant, 0) + 1
            old_order = None
        else:
            last_at, last_decision, batches, was_held, since, rec0, err0 = CUSTOMER.unpack_from(old)
            old_flags = (bool(was_held), rec0 > 0, err0 > 0)
            old_order = WHEN.pack(NEVER - last_at)
        new_last = max(last_at, at)
        if at >= last_decision:
            now_held, last_decision = held, at
            since = (since or at) if held else 0
        else:
            now_held, reason = was_held, (old or b"")[CUSTOMER.size:]
        rec, err = rec0 + recovered, err0 + errors
        flags = (bool(now_held), rec > 0, err > 0)
        order = WHEN.pack(NEVER - new_last)
        if order != old_order:
            if old_order is not None:
                delete(b"G" + old_order + key)
                delete(b"L" + tenant + b"\0" + old_order + key)
            put(b"G" + order + key, b"")
            put(b"L" + tenant + b"\0" + order + key, b"")
        for flag, was, now in zip(FLAGS, old_flags, flags, strict=True) if (
                old_flags != NO_FLAGS or flags != NO_FLAGS) else ():
            if was and (not now or order != old_order):
                delete(b"F" + flag + tenant + b"\0" + old_order + key)  # type: ignore[operator]
            if now and (not was or order != old_order):
                put(b"F" + flag + tenant + b"\0" + order + key, b"")
            if was != now:
                counts[flag + tenant] = counts.get(flag + tenant, 0) + (1 if now else -1)
        row = CUSTOMER.pack(new_last, last_decision, batches + n, now_held, since, rec, err)
        put(b"C" + key, row + reason)
    if counts:
        count_keys = [b"N" + k for k in counts]
        for k, old_count, delta in zip(count_keys, _get_many(db, count_keys), counts.values(), strict=True):
            put(k, COUNT.pack((COUNT.unpack(old_count)[0] if old_count else 0) + delta))
    hour_keys = [b"H" + WHEN.pack(hour) + b"default" for hour in hours]  # every bench key: one tenant
    for k, old_hour, figures_sum in zip(hour_keys, _get_many(db, hour_keys), hours.values(), strict=True):
        if old_hour is not None:
            figures_sum = [a + b for a, b in zip(HOUR.unpack(old_hour), figures_sum, strict=True)]
        put(k, HOUR.pack(*figures_sum))
    _positions(put, topic, positions)
    return wb


def _blind(db: Rdict, topic: str, batch: Sequence[Record]) -> WriteBatch:
    """rd-blind: the least Python a customers index can cost. The header would carry the customer's
    previous order time and hold state and its running totals (the producer knows them), so the
    consumer writes without reading: per record its rows, the customer's row, the old order keys
    deleted and the new ones put; one multi-get a poll for the counts and the hours. (The bench's
    header has no previous time: one minute before is used; a delete costs the same whether its key
    exists or not: RocksDB writes a tombstone either way.)"""
    wb = WriteBatch(raw_mode=True)
    put, delete = wb.put, wb.delete
    pack_place, pack_when, unpack = PLACE.pack, WHEN.pack, SUMMARY.unpack_from
    size = SUMMARY.size
    positions: dict[int, int] = {}
    hours: dict[int, list[int]] = {}
    held_delta = 0
    for key, partition, offset, _, value, header in batch:
        at, held, ran, rt, hist, both, missing, recovered, failed = unpack(header)
        place = pack_place(at, partition, offset)
        put(b"D" + key + b"\0" + place, value)
        put(b"T" + place + key, b"")
        positions[partition] = offset + 1
        tenant = _tenant(key)
        old, new = pack_when(NEVER - at + 60_000), pack_when(NEVER - at)
        delete(b"G" + old + key)
        put(b"G" + new + key, b"")
        delete(b"L" + tenant + b"\0" + old + key)
        put(b"L" + tenant + b"\0" + new + key, b"")
        if held:
            put(b"Fh" + tenant + b"\0" + new + key, b"")
            held_delta += 1
        put(b"C" + key, CUSTOMER.pack(at, at, 1, held, at if held else 0, recovered, failed) + header[size:])
        hour = at - at % 3_600_000
        if (h := hours.get(hour)) is None:
            hours[hour] = [1, held, ran, rt, hist, both, missing, recovered, failed]
        else:
            h[0] += 1
            h[1] += held
            h[2] += ran
            h[3] += rt
            h[4] += hist
            h[5] += both
            h[6] += missing
            h[7] += recovered
            h[8] += failed
    count_key = b"Nhdefault"
    old_count = _get_many(db, [count_key])[0]
    put(count_key, COUNT.pack((COUNT.unpack(old_count)[0] if old_count else 0) + held_delta))
    hour_keys = [b"H" + WHEN.pack(hour) + b"default" for hour in hours]
    for k, old_hour, figures_sum in zip(hour_keys, _get_many(db, hour_keys), hours.values(), strict=True):
        if old_hour is not None:
            figures_sum = [a + b for a, b in zip(HOUR.unpack(old_hour), figures_sum, strict=True)]
        put(k, HOUR.pack(*figures_sum))
    _positions(put, topic, positions)
    return wb


def _get_many(db: Rdict, keys: list[bytes]) -> list[bytes | None]:
    """One multi-get (one call into RocksDB for the poll's keys)."""
    return cast(list[bytes | None], db.get(cast(Any, keys)))


def _positions(put: Callable[[bytes, bytes], None], topic: str, positions: dict[int, int]) -> None:
    for partition, next_offset in positions.items():
        put(b"O" + topic.encode() + b"\0" + WHEN.pack(partition), WHEN.pack(next_offset))


def fill(path: Path, customers: int, decisions: int, value: bytes, now_ms: int) -> None:
    """A store as the SQLite one is filled (`customers` customers, `decisions` decisions spread over
    the last week), written through `write` in rc-header mode, then flushed to disk."""
    db = open_db(path, wal=False)
    per = max(1, decisions // customers)
    week = 7 * 24 * 3600 * 1000
    header_of = [SUMMARY.pack(0, int(n % 10 == 3), 0, 0, 0, 0, 0, 0, 0)
                 + (b"human_active" if n % 10 == 3 else b"") for n in range(10)]
    batch: list[Record] = []
    written = 0
    for c in range(customers):
        key = f"wati:5037{c:07d}".encode()
        first = now_ms - week + (c * 7919) % week
        for n in range(per if c < customers - 1 else decisions - written):
            at = first + (now_ms - first) * (n + 1) // (per + 1)
            header = bytearray(header_of[(n + c) % 10])
            SUMMARY.pack_into(header, 0, at, *SUMMARY.unpack_from(header)[1:])
            batch.append((key, 0, written, at, value, bytes(header)))
            written += 1
        if len(batch) >= 5000 or c == customers - 1:
            write(db, "fill", batch, "rc-header")
            batch = []
    db.flush()
    db.close()


def copy_of(filled: Path, to: Path) -> None:
    """A checkpoint of the filled store (hard links: fast), for one variant."""
    shutil.rmtree(to, ignore_errors=True)
    to.parent.mkdir(parents=True, exist_ok=True)
    db = Rdict(str(filled), Options(raw_mode=True))
    Checkpoint(db).create_checkpoint(str(to))
    db.close()


# -- the writer in a process of its own (the consumer's process only hands the records over) -------
_proc: tuple[Rdict, str, str] | None = None


def _init_process(path: str, wal: bool, topic: str, mode: str) -> None:
    global _proc
    _proc = (open_db(Path(path), wal), topic, mode)


def _write_in_process(batch: list[Record]) -> None:
    assert _proc is not None
    db, topic, mode = _proc
    write(db, topic, batch, mode)


def _close_process() -> None:
    global _proc
    if _proc is not None:
        _proc[0].close()
        _proc = None


def writer_process(path: Path, wal: bool, topic: str, mode: str) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_process, initargs=(str(path), wal, topic, mode))


def submit(pool: ProcessPoolExecutor, batch: list[Record]) -> None:
    pool.submit(_write_in_process, batch).result()


def close_process(pool: ProcessPoolExecutor) -> None:
    pool.submit(_close_process).result()
    pool.shutdown()


def cpu_components(filled: Path, work: Path, polled: list[Any], topic: str) -> dict[str, float]:
    """CPU µs a record of each part of the variants, no Kafka, this thread only (`time.thread_time`:
    what the consumer's process spends, whatever the machine's load does to the wall time): the
    hand-over (`records_of`), the console's decoder alone, each mode's WriteBatch built in Python
    (with its multi-gets) and RocksDB's write of it (which runs without the GIL)."""
    out: dict[str, float] = {}
    n = len(polled)
    clock = time.thread_time
    polls = [polled[i:i + 2000] for i in range(0, n, 2000)]
    started = clock()
    batches = [records_of(p) for p in polls]
    out["hand-over (records_of)"] = (clock() - started) / n * 1e6
    started = clock()
    for p in polled:
        codec.decode_any_fast(p.value, raw_timestamps=RAW_TIMESTAMPS)
    out["decode (codec.decode_any_fast)"] = (clock() - started) / n * 1e6
    for mode in MODES:
        path = work / f"cpu-{mode}"
        copy_of(filled, path)
        db = open_db(path, wal=False)
        built = wrote = 0.0
        for batch in batches:
            started = clock()
            wb = batch_for(db, topic, batch, mode)
            middle = clock()
            db.write(wb)
            built += middle - started
            wrote += clock() - middle
        db.close()
        shutil.rmtree(path, ignore_errors=True)
        out[f"{mode}: WriteBatch built (Python)"] = built / n * 1e6
        out[f"{mode}: RocksDB write"] = wrote / n * 1e6
    return out
