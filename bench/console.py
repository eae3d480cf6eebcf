"""Benchmark — the operator console with real volume: page times and the consumer's catch-up rate.

1. Fill: an SQLite store with N customers (100,000 at full scale) and M batch decisions
   (1,000,000), through the store's own `apply_*` functions and the row mapping (`rows.py`): each
   customer has a name, M/N decisions (every 10th held, every 7th with injected human-agent
   messages), and its last two batches a request (with the block) and a reply; 1 % of customers
   are paused and 500 dead letters are spread over the week. Times spread over the last 7 days.
2. Pages: the console's aiohttp app serves that store in-process; a logged-in client asks each page
   R times (random customers, searches and filters) and reads the page's own server time from its
   `Server-Timing` header: p50 / p95 / max per page. Target p95 <= 200 ms.
3. Catch-up: D decisions are produced as Avro to an audit topic on the embedded broker. A bare
   consumer (its own group, getmany, no decoding) reads them all: the baseline rate. Then the
   console's consumer (`ConsoleConsumer`, own group) reads the same topic into the FILLED store:
   decisions/s from its first record to its last. Target >= 0.5x the bare consumer.
4. Floors: consumers that persist less than the console does, to know what any design can reach
   here: in SQLite (`floor_write`) and in RocksDB (`bench.console_rocks`), each after a bare read of
   its own; with each consumer's CPU time a record (BENCHMARKS section 7, "The floor").

    python -m bench.console                         # full scale
    python -m bench.console --customers 10000 --decisions 100000 --catchup 50000   # quick
    python -m bench.console --parts rocks-floor --rocks-rounds 2    # only the RocksDB floors
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from bench import console_rocks
from bench.common import ROOT, figure, machine_info, percentile
from services.common import codec
from services.common.broker import EmbeddedKafka, free_port
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics
from services.common.records import BatchDecision, MissedItem
from services.console import rows
from services.console.app import Console, build_app
from services.console.auth import Sessions, hash_password
from services.console.consumer import (
    RAW_TIMESTAMPS,
    ConsoleConsumer,
    Polled,
    default_decode_workers,
    prepare_records,
    write_prepared,
)
from services.console.store import Store
from services.responder.prompt import labels_for

LABELS = labels_for("es")
RESULTS = ROOT / "bench" / "results"
PAGE_TARGET_MS = 200.0
CATCHUP_TARGET = 0.5
# what a run measures (`--parts`): the pages, the console's consumer, the SQLite floors, the RocksDB floors
PARTS = ("pages", "console", "sqlite-floor", "rocks-floor")


def decision(key: str, batch_id: str, at: datetime, n: int) -> BatchDecision:
    injected: list[MissedItem] = []
    if n % 7 == 0:
        injected = [cast(MissedItem, {
            "at": at - timedelta(minutes=3 - i), "role": "agent" if i % 2 == 0 else "customer",
            "agent_name": "Ana Reservas" if i % 2 == 0 else None, "text": f"mensaje {i} del inbox",
            "message_type": "text", "source": ("history", "realtime", "both")[i % 3],
            "item_ids": [f"i{n}.{i}"]})
            for i in range(3)]
    held = n % 10 == 3
    return cast(BatchDecision, {
        "batch_id": batch_id, "customer_key": key, "channel": "wati", "decided_at": at, "message_count": 2,
        "prior_last_inbound_at": None, "prior_last_reply_at": None,
        "gap_seconds": 400.0 if injected else 12.0,
        "gap_threshold_seconds": 300.0, "missed_check_ran": bool(injected), "cutoff": None,
        "sources": ["history"] if injected else [], "injected": injected,
        "excluded": [{"item_ids": [f"x{n}"], "reason": "before_cutoff", "at": at - timedelta(minutes=9)}],
        "held": held, "hold_reason": "human_active" if held else None, "recovered_event_ids": [],
        "webhooks_missing": 1 if n % 13 == 0 else 0, "history_error": None,
        "routed_to": "" if held else "responder",
    })


def fill(store: Store, customers: int, decisions: int, now: datetime) -> dict[str, float]:
    """Writes the store through its own functions; returns the time it took."""
    per = max(1, decisions // customers)
    week = 7 * 24 * 3600
    rng = random.Random(7)
    start = time.perf_counter()
    written = 0
    pending: list[dict[str, Any]] = []
    for c in range(customers):
        if c % 2000 == 0:
            store.db.execute("BEGIN")
        key = f"wati:5037{c:07d}"
        first = now - timedelta(seconds=rng.uniform(3600, week))
        store.apply_inbound(rows.inbound_row(cast(Any, {
            "event_id": f"e{c}", "customer_key": key, "channel": "wati", "provider_id": key[5:],
            "message_type": "text", "text": "hola", "caption": None, "media_ref": None, "media_mime": None,
            "sender_name": f"Cliente {c}", "provider_message_ids": [f"e{c}"], "provider_time": first,
            "received_at": first, "recovered": False, "username": None}), LABELS))
        span = (now - first).total_seconds()
        for n in range(per if c < customers - 1 else decisions - written):
            at = first + timedelta(seconds=span * (n + 1) / (per + 1))
            batch_id = f"{key}:{n + 1}"
            d = decision(key, batch_id, at, n + c)
            pending.append(rows.decision_row(d))
            if n >= per - 2 and not d["held"]:
                store.apply_request(rows.request_row(cast(Any, {
                    "batch_id": batch_id, "customer_key": key, "channel": "wati", "provider_id": key[5:],
                    "messages": [], "prior_last_inbound_at": None, "prior_last_reply_at": None,
                    "gap_seconds": None, "missed_check_ran": bool(d["injected"]),
                    "missed_messages": d["injected"], "missed_dropped_oldest": 0, "images": [],
                    "created_at": at}), LABELS))
                store.apply_reply({"batch_id": batch_id, "customer_key": key, "outcome": "answered",
                                   "text": "Con gusto le ayudo.", "parts": 1,
                                   "sent_at": rows.ms(at + timedelta(seconds=2))})
            written += 1
        if c % 100 == 0:
            store.apply_command({"customer_key": key, "kind": "pause", "actor": "ana",
                                 "at": rows.ms(now - timedelta(minutes=5))})
        if c % (customers // 500 or 1) == 0:
            store.apply_dead_letter({
                "id": f"0:{c}", "failed_at": rows.ms(first), "service": "context", "reason": "undecodable",
                "error": "bad header", "source_topic": "bench.inbound", "source_partition": 0,
                "source_offset": c, "record_key": key.encode(), "payload": b"garbage", "customer_key": key,
                "batch_id": None})
        if c % 2000 == 1999 or c == customers - 1:
            store.apply_decisions(pending)
            pending = []
            store.db.execute("COMMIT")
    return {"seconds": time.perf_counter() - start, "decisions": written}


async def page_times(store: Store, customers: int, repeats: int, now: datetime) -> dict[str, list[float]]:
    console = Console(store=store, sessions=Sessions("bench", 3600), users={"ana": hash_password("pw")},
                      topics=Topics.from_settings(Settings(topic_prefix="bench.")), producer=None,
                      ready=lambda: (True, "ok"), clock=now.timestamp)
    runner = web.AppRunner(build_app(console), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rng = random.Random(11)
    times: dict[str, list[float]] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            await http.post("/login", data={"user": "ana", "password": "pw"})
            letter = store.dead_letters().rows[0]["id"]
            for _ in range(repeats):
                c = rng.randrange(customers)
                offset = rng.randrange(0, 2000) * 50
                paths = {
                    "overview": "/",
                    "customers": f"/customers?offset={offset}",
                    "customers search": f"/customers?q=5037{c:07d}"[:-2],
                    "customers filtered (held)": "/customers?f=held",
                    "customers filtered (paused, errors)": "/customers?f=paused&f=errors",
                    "timeline": f"/customers/{quote(f'wati:5037{c:07d}', safe='')}",
                    "held and paused": "/waiting",
                    "dead letters": "/dead-letters",
                    "dead letter": f"/dead-letters/{letter}",
                    # the tenant filter (every bench customer is the default tenant's: the most rows)
                    "overview (tenant filter)": "/?tenant=default",
                    "customers (tenant filter)": f"/customers?tenant=default&offset={offset}",
                }
                for name, path in paths.items():
                    answer = await http.get(path)
                    assert answer.status_code == 200, (path, answer.status_code)
                    took = float(answer.headers["Server-Timing"].split("dur=")[1])
                    times.setdefault(name, []).append(took)
    finally:
        await runner.cleanup()
    return times


# -- the floor: consumers that persist what the pages need without decoding the Avro value --------
SUMMARY_HEADER = "console-summary"
_SUMMARY = struct.Struct("<qBBHHHHHB")  # decided_at ms, held, check ran, injected by source x3,
#                                         webhooks missing, recovered, history error; then hold reason


def summary_header(d: BatchDecision) -> bytes:
    """What the overview's hourly figures and the customers page need of a decision, as a header the
    producer (the context worker) could add: ~20 bytes, read with one `struct.unpack`."""
    by_source = dict.fromkeys(rows.SOURCES, 0)
    for item in d["injected"]:
        if item.get("source") in by_source:
            by_source[item["source"]] += 1
    return _SUMMARY.pack(int(d["decided_at"].timestamp() * 1000), int(d["held"]), int(d["missed_check_ran"]),
                         by_source["realtime"], by_source["history"], by_source["both"],
                         d["webhooks_missing"], len(d["recovered_event_ids"]),
                         int(bool(d["history_error"]))) + (d["hold_reason"] or "").encode()


FLOOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_records (customer_key TEXT NOT NULL, at INTEGER NOT NULL,
    part INTEGER NOT NULL, off INTEGER NOT NULL, value BLOB,
    PRIMARY KEY (customer_key, at, part, off)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS floor_records_at ON floor_records (at);
CREATE TABLE IF NOT EXISTS floor_appended (customer_key TEXT, at INTEGER, part INTEGER, off INTEGER,
    value BLOB);
"""
FLOOR_INSERT = "INSERT OR IGNORE INTO floor_records VALUES (?, ?, ?, ?, ?)"
FLOOR_APPEND = "INSERT INTO floor_appended VALUES (?, ?, ?, ?, ?)"
# the customers page's figures of a decision (the upsert as the console's, fewer columns)
FLOOR_CUSTOMER = """
INSERT INTO customers (key, batches, recovered, errors, last_at, held, held_since, hold_reason,
                       last_decision_at, tenant)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?6 THEN ?5 END, ?7, ?5, ?8)
ON CONFLICT (key) DO UPDATE SET batches = batches + ?2, recovered = recovered + ?3,
    errors = errors + ?4, last_at = MAX(last_at, ?5),
    held = CASE WHEN last_decision_at IS NULL OR ?5 >= last_decision_at THEN ?6 ELSE held END,
    hold_reason = CASE WHEN last_decision_at IS NULL OR ?5 >= last_decision_at THEN ?7 ELSE hold_reason END,
    last_decision_at = MAX(COALESCE(last_decision_at, 0), ?5)
"""
FLOOR_HOURLY = ("INSERT INTO hourly (hour, batches, held, gaps, inj_realtime, inj_history, inj_both,"
                " webhooks_missing, recovered, history_failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (hour) DO UPDATE SET batches = batches + excluded.batches,"
                " held = held + excluded.held, gaps = gaps + excluded.gaps,"
                " inj_realtime = inj_realtime + excluded.inj_realtime,"
                " inj_history = inj_history + excluded.inj_history, inj_both = inj_both + excluded.inj_both,"
                " webhooks_missing = webhooks_missing + excluded.webhooks_missing,"
                " recovered = recovered + excluded.recovered,"
                " history_failures = history_failures + excluded.history_failures")


def floor_fill(store: Store, count: int) -> None:
    """The floor's table with `count` rows of other customers, values the size of a decision's."""
    store.db.executescript(FLOOR_SCHEMA)
    value = codec.encode("BatchDecision", dict(decision("wati:50370000001", "wati:50370000001:1",
                                                        datetime.now(UTC), 1)))
    with store.transaction() as db:
        db.executemany(FLOOR_INSERT, ((f"wati:5037{n % 100_000:07d}", 1_700_000_000_000 + n, 0, n, value)
                                      for n in range(count)))


def floor_write(store: Store, polled: list[Any], mode: str) -> None:
    """One polled batch, one transaction with its positions, into the filled store:
    append: the records appended in arrival order to a table with no index (what no page can use:
    the least any SQLite-persisting consumer does);
    raw: key, time, place and the raw value, clustered by customer (no decoding);
    customer: raw + the console's customer upsert per record (batches, last time);
    grouped: raw + one customer upsert per customer of the batch;
    summary: raw + the figures from the summary header: one upsert per customer (held, hold reason,
    recovered, errors) and one per hour of the overview's figures — all the pages' indexed data."""
    positions: dict[tuple[str, int], int] = {}
    with store.transaction() as db:
        db.executemany(FLOOR_APPEND if mode == "append" else FLOOR_INSERT,
                       [(r.key.decode(), r.timestamp, r.partition, r.offset, r.value) for r in polled])
        for r in polled:
            positions[(r.topic, r.partition)] = r.offset + 1
        if mode == "customer":
            db.executemany(FLOOR_CUSTOMER, [(r.key.decode(), 1, 0, 0, r.timestamp, 0, None, "default")
                                            for r in polled])
        elif mode == "grouped":
            grouped: dict[bytes, list[int]] = {}
            for r in polled:
                if (g := grouped.get(r.key)) is None:
                    grouped[r.key] = [1, r.timestamp]
                else:
                    g[0] += 1
                    g[1] = max(g[1], r.timestamp)
            db.executemany(FLOOR_CUSTOMER, [(k.decode(), n, 0, 0, at, 0, None, "default")
                                            for k, (n, at) in grouped.items()])
        elif mode == "summary":
            customers: dict[bytes, list[Any]] = {}
            hours: dict[int, list[int]] = {}
            unpack = _SUMMARY.unpack_from
            size = _SUMMARY.size
            for r in polled:
                raw = r.headers[0][1]
                at, held, ran, rt, hist, both, missing, recovered, failed = unpack(raw)
                if (c := customers.get(r.key)) is None:
                    customers[r.key] = [1, recovered, failed, at, held, raw[size:].decode() or None]
                else:
                    c[0] += 1
                    c[1] += recovered
                    c[2] += failed
                    if at >= c[3]:
                        c[3], c[4], c[5] = at, held, raw[size:].decode() or None
                figures = (1, held, ran, rt, hist, both, missing, recovered, failed)
                if (h := hours.get(at - at % 3_600_000)) is None:
                    hours[at - at % 3_600_000] = list(figures)
                else:
                    for i, n in enumerate(figures):
                        h[i] += n
            db.executemany(FLOOR_CUSTOMER, [(k.decode(), *c, "default") for k, c in customers.items()])
            db.executemany(FLOOR_HOURLY, [(hour, *h) for hour, h in hours.items()])
        store.set_offsets(positions)


def store_ceiling(store: Store, count: int, now: datetime) -> dict[str, float]:
    """No Kafka: decode + map alone (`prepare_records`, one process), and the store's writes alone
    (`write_prepared` of batches mapped beforehand): the two parts of the console's consumer, each
    at its fastest here. Run on a copy of the filled store's state (rows it then keeps)."""
    topics = Topics.from_settings(Settings(topic_prefix="benchc."))
    polled = [Polled(topics.audit, n % 4, 10**9 + n, codec.encode(
        "BatchDecision", dict(decision(f"wati:5038{n % 50000:07d}", f"wati:5038{n % 50000:07d}:w{n}",
                                       now, n)))) for n in range(count)]
    start = time.perf_counter()
    prepared = [prepare_records(polled[i:i + 2000], topics, LABELS) for i in range(0, count, 2000)]
    mapped = time.perf_counter()
    for batch in prepared:
        write_prepared(store, batch)
    written = time.perf_counter()
    return {"map_per_s": count / (mapped - start), "write_per_s": count / (written - mapped)}


async def catch_up(
    store: Store | None, count: int, data_dir: Path, now: datetime, workers: int | None,
    parts: frozenset[str] = frozenset(PARTS), rocks: RocksSetup | None = None,
) -> dict[str, float]:
    broker = EmbeddedKafka(data_dir / "broker", partitions=4)
    bootstrap = await asyncio.to_thread(broker.start)
    try:
        settings = Settings(kafka_bootstrap_servers=bootstrap, topic_prefix="benchc.", topic_partitions=4,
                            broker_session_timeout_seconds=10)
        topics = await ensure_topics(settings)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024)
        await producer.start()
        try:
            futures = []
            for n in range(count):
                key = f"wati:5039{n % 50000:07d}"
                d = decision(key, f"{key}:c{n}", now, n)
                value = codec.encode("BatchDecision", dict(d))
                futures.append(await producer.send(topics.audit, value, key=key.encode(),
                                                   headers=[(SUMMARY_HEADER, summary_header(d))]))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

        async def plain(group: str, decode: Callable[[bytes | None], object] | None) -> float:
            """A consumer of its own group reading every record (decoding each one, or not): rate."""
            bare = AIOKafkaConsumer(topics.audit, bootstrap_servers=bootstrap, group_id=group,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    max_poll_records=2000, fetch_max_bytes=64 * 1024 * 1024,
                                    max_partition_fetch_bytes=8 * 1024 * 1024)
            await bare.start()
            seen, first, cpu_first = 0, None, 0.0
            try:
                while seen < count:
                    for records in (await bare.getmany(timeout_ms=500, max_records=2000)).values():
                        if records and first is None:
                            first = time.perf_counter()
                            cpu_first = time.process_time()
                        if decode is not None:
                            for record in records:
                                decode(record.value)
                        seen += len(records)
                cpu[group] = (time.process_time() - cpu_first) / count * 1e6
                return count / max(time.perf_counter() - (first or time.perf_counter()), 1e-9)
            finally:
                await bare.stop()

        def console_decode(value: bytes | None) -> object:
            return codec.decode_any_fast(value, raw_timestamps=RAW_TIMESTAMPS)

        # the consumer process's CPU (every thread) per record, by group: what each variant costs
        # whatever the machine's load does to the wall time
        cpu: dict[str, float] = {}
        rates: dict[str, float] = {"bare_per_s": await plain("benchc.bare", decode=None)}
        if "console" in parts:
            rates["fastavro_per_s"] = await plain("benchc.decoding", decode=codec.decode_any)
            rates["decoding_per_s"] = await plain("benchc.decoding-console", decode=console_decode)

        async def persisting(
            group: str, write: Callable[[list[Any]], None], max_records: int = 2000
        ) -> float:
            """A consumer of its own group writing each polled batch into the filled store with
            `write` (in a thread, one transaction with the positions, the next poll overlapping it,
            as the console's consumer does): rate."""
            reader = AIOKafkaConsumer(topics.audit, bootstrap_servers=bootstrap, group_id=group,
                                      auto_offset_reset="earliest", enable_auto_commit=False,
                                      max_poll_records=max_records, fetch_max_bytes=64 * 1024 * 1024,
                                      max_partition_fetch_bytes=8 * 1024 * 1024)
            await reader.start()
            seen, first, cpu_first = 0, None, 0.0
            pending: asyncio.Future[None] | None = None
            try:
                while seen < count:
                    polled = [r for records in (await reader.getmany(
                        timeout_ms=500, max_records=max_records)).values() for r in records]
                    if not polled:
                        continue
                    if first is None:
                        first = time.perf_counter()
                        cpu_first = time.process_time()
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(asyncio.to_thread(write, polled))
                    seen += len(polled)
                if pending is not None:
                    await pending
                cpu[group] = (time.process_time() - cpu_first) / count * 1e6
                return count / max(time.perf_counter() - (first or time.perf_counter()), 1e-9)
            finally:
                await reader.stop()

        if "console" in parts:
            assert store is not None
            rates["console_per_s"] = await console_catch_up(store, settings, count, workers)
        adjacent: dict[tuple[str, int], float] = {}
        if "sqlite-floor" in parts:
            assert store is not None
            rates |= await sqlite_floors(store, count, plain, persisting, adjacent)
            rates |= {f"cpu sqlite {group.removeprefix('benchc.')}": us for group, us in cpu.items()
                      if group.startswith("benchc.floor-")}
        if "rocks-floor" in parts:
            assert rocks is not None
            rates |= await rocks_floors(rocks, count, topics.audit, plain, persisting, cpu)
            sample = [ConsumerRecord(topics.audit, n % 4, n, int(now.timestamp() * 1000), 0, key.encode(),
                                     codec.encode("BatchDecision", dict(d)), None, 0, 0,
                                     [(SUMMARY_HEADER, summary_header(d))])
                      for n in range(min(count, 20_000))
                      for key in [f"wati:5040{n % 50000:07d}"]
                      for d in [decision(key, f"{key}:s{n}", now, n)]]
            parts_cpu = console_rocks.cpu_components(rocks.filled, rocks.work, sample, topics.audit)
            rates |= {f"cpu {part}": us for part, us in parts_cpu.items()}
        # the baseline again at the end: how much the machine moved during the run
        rates["bare_again_per_s"] = await plain("benchc.bare-again", decode=None)
        for (mode, max_records), rate in adjacent.items():
            suffix = "_10k" if max_records != 2000 else ""
            rates[f"floor_{mode}{suffix}_bare_per_s"] = rate
        return rates
    finally:
        await asyncio.to_thread(broker.stop)


Plain = Callable[..., Awaitable[float]]
Persisting = Callable[..., Awaitable[float]]


async def console_catch_up(store: Store, settings: Settings, count: int, workers: int | None) -> float:
    """The console's own consumer reading the topic into the filled store: its rate."""
    consumer = ConsoleConsumer(settings, store, LABELS, decode_workers=workers)
    before = sum(store.offsets().values())
    start_applied = None
    await consumer.start()
    try:
        while sum(store.offsets().values()) - before < count:
            if consumer.applied and start_applied is None:
                start_applied = (time.perf_counter(), consumer.applied)
            await asyncio.sleep(0.01)
        done = time.perf_counter()
    finally:
        await consumer.stop()
    t0, first_batch = start_applied or (done, 0)
    return (count - first_batch) / max(done - t0, 1e-9)


async def sqlite_floors(store: Store, count: int, plain: Plain, persisting: Persisting,
                        adjacent: dict[tuple[str, int], float]) -> dict[str, float]:
    """The SQLite floor variants (`floor_write`), each after a bare read of its own."""
    # every floor variant into the same table, pre-filled as the store's decisions are, emptied
    # of the catch-up's customers before each (customers already there, as for the console
    # after its own catch-up)
    floor_fill(store, max(count, store.db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]))

    async def floor(group: str, mode: str, max_records: int = 2000) -> float:
        """The variant's rate; a bare consumer (its own group) reads the topic just before it,
        as its own baseline (`adjacent`): the machine's load moves a lot within one run."""
        with store.transaction() as db:
            db.execute("DELETE FROM floor_records WHERE customer_key >= 'wati:5039'"
                       " AND customer_key < 'wati:503:'")
        adjacent[mode, max_records] = await plain(f"{group}.bare", decode=None)
        return await persisting(group, lambda b: floor_write(store, b, mode), max_records)

    return {
        "floor_append_per_s": await floor("benchc.floor-append", "append"),
        "floor_raw_per_s": await floor("benchc.floor-raw", "raw"),
        "floor_raw_10k_per_s": await floor("benchc.floor-raw-10k", "raw", 10_000),
        "floor_customer_per_s": await floor("benchc.floor-customer", "customer"),
        "floor_grouped_per_s": await floor("benchc.floor-grouped", "grouped"),
        "floor_summary_per_s": await floor("benchc.floor-summary", "summary"),
        "floor_summary_10k_per_s": await floor("benchc.floor-summary-10k", "summary", 10_000),
    }


@dataclass
class RocksSetup:
    """The RocksDB floor's filled store (each variant runs on a checkpoint of it) and its settings."""

    filled: Path
    work: Path
    rounds: int
    modes: tuple[str, ...]


ROCKS_VARIANTS = {
    # name: (mode, WAL, writer in a process of its own)
    "ra": ("ra", False, False),
    "ra-wal": ("ra", True, False),
    "rb": ("rb", False, False),
    "rc-header": ("rc-header", False, False),
    "rc-header-wal": ("rc-header", True, False),
    "rc-decode": ("rc-decode", False, False),
    "rd-blind": ("rd-blind", False, False),
    "rc-header-process": ("rc-header", False, True),
    "rc-decode-process": ("rc-decode", False, True),
}


async def rocks_floors(setup: RocksSetup, count: int, topic: str, plain: Plain,
                       persisting: Persisting, cpu: dict[str, float]) -> dict[str, float]:
    """Each RocksDB variant (`bench.console_rocks`) on a fresh checkpoint of the filled store, a bare
    consumer read just before it (its baseline); `rounds` times, interleaved."""
    out: dict[str, float] = {}
    for round_ in range(setup.rounds):
        for name in setup.modes:
            mode, wal, own_process = ROCKS_VARIANTS[name]
            path = setup.work / f"{name}-{round_}"
            console_rocks.copy_of(setup.filled, path)
            group = f"benchc.rocks-{name}-{round_}"
            bare = await plain(f"{group}.bare", decode=None)
            load = os.getloadavg()[0]
            if own_process:
                pool = console_rocks.writer_process(path, wal, topic, mode)
                try:
                    rate = await persisting(group, lambda b, pool=pool: console_rocks.submit(
                        pool, console_rocks.records_of(b)))
                finally:
                    console_rocks.close_process(pool)
            else:
                db = console_rocks.open_db(path, wal)
                try:
                    rate = await persisting(group, lambda b, db=db, mode=mode: console_rocks.write(
                        db, topic, console_rocks.records_of(b), mode))
                finally:
                    db.close()
            shutil.rmtree(path, ignore_errors=True)
            suffix = "" if round_ == 0 else f"_round{round_ + 1}"
            out[f"rocks_{name}{suffix}_per_s"] = rate
            out[f"rocks_{name}{suffix}_bare_per_s"] = bare
            out[f"cpu rocks {name}{suffix}"] = cpu[group]
            out[f"cpu rocks {name}{suffix} bare"] = cpu[f"{group}.bare"]
            print(f"rocks {name} round {round_ + 1}: {rate:,.0f}/s, bare just before {bare:,.0f}/s "
                  f"({rate / bare:.2f}x), load {load:.1f}; CPU {cpu[group]:.1f} µs a record, bare "
                  f"{cpu[f'{group}.bare']:.1f}", flush=True)
    return out


async def main_async(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        parts = frozenset(args.parts.split(",")) if args.parts else frozenset(PARTS)
        store: Store | None = None
        filled = {"seconds": 0.0, "decisions": args.decisions}
        size_mb = 0.0
        times: dict[str, list[float]] = {}
        if parts & {"pages", "console", "sqlite-floor"}:
            store = Store(Path(tmp) / "console.sqlite3")
            filled = fill(store, args.customers, args.decisions, now)
            size_mb = sum(f.stat().st_size for f in Path(tmp).glob("console.sqlite3*")) / 1e6  # with the WAL
            print(f"filled {filled['decisions']:,} decisions / {args.customers:,} customers in "
                  f"{filled['seconds']:.0f} s ({size_mb:.0f} MB)", flush=True)
        if "pages" in parts:
            assert store is not None
            times = await page_times(store, args.customers, args.repeats, now)
            for page_name, values in times.items():
                print(f"{page_name}: p95 {percentile(values, 0.95):.1f} ms", flush=True)
        rocks = None
        if "rocks-floor" in parts:
            rocks = RocksSetup(Path(tmp) / "rocks-filled", Path(tmp) / "rocks", args.rocks_rounds,
                               tuple(args.rocks_variants.split(",")))
            started = time.perf_counter()
            value = codec.encode("BatchDecision", dict(decision("wati:50370000001", "wati:50370000001:1",
                                                                now, 1)))
            console_rocks.fill(rocks.filled, args.customers, args.decisions, value,
                               int(now.timestamp() * 1000))
            print(f"RocksDB floor store filled in {time.perf_counter() - started:.0f} s", flush=True)
        load = os.getloadavg()
        rates = await catch_up(store, args.catchup, Path(tmp), now, args.decode_workers, parts, rocks)
        ceiling = (store_ceiling(store, min(args.catchup, 100_000), now)
                   if store is not None and "console" in parts else None)
        load_after = os.getloadavg()
        if store is not None:
            store.close()
    results = []
    for name, values in times.items():
        p95 = percentile(values, 0.95)
        results.append(figure(f"page p95: {name}", p95, "ms", target=f"<= {PAGE_TARGET_MS:.0f} ms",
                              met=p95 is not None and p95 <= PAGE_TARGET_MS,
                              note=f"p50 {percentile(values, 0.5):.1f} ms, max {max(values):.1f} ms, "
                                   f"n={len(values)}"))
    if "console_per_s" in rates:
        ratio = rates["console_per_s"] / rates["bare_per_s"]
        workers_used = default_decode_workers() if args.decode_workers is None else args.decode_workers
        results.append(figure("console consumer catch-up", rates["console_per_s"], "decisions/s",
                              baseline=rates["bare_per_s"], ratio=ratio, target=f">= {CATCHUP_TARGET}x bare",
                              met=ratio >= CATCHUP_TARGET,
                              note=f"{args.catchup:,} decisions into the filled store, decode workers: "
                                   f"{workers_used}; baseline = bare consumer of the same topic, same run"))
        results.append(figure("consumer that only decodes, fastavro, for reference",
                              rates["fastavro_per_s"], "decisions/s", baseline=rates["bare_per_s"],
                              note="the same topic read by a consumer that decodes each record with fastavro "
                                   "and stores nothing (the console's decoder before)"))
        results.append(figure("consumer that only decodes, the console's decoder (ceiling)",
                              rates["decoding_per_s"], "decisions/s", baseline=rates["bare_per_s"],
                              note="the same topic, each record decoded as the console does (generated "
                                   "reader, times as epoch ms), in one process, nothing stored"))
    if ceiling is not None:
        results.append(figure("decode + map only, no Kafka, one process", ceiling["map_per_s"], "decisions/s",
                              baseline=rates["bare_per_s"],
                              note="prepare_records over 2,000-record batches: what one core decodes and "
                                   "maps"))
        results.append(figure("store writes only, no Kafka (ceiling)", ceiling["write_per_s"], "decisions/s",
                              baseline=rates["bare_per_s"],
                              note="write_prepared of batches mapped beforehand, into the filled store: the "
                                   "single SQLite writer's rate, the bound on the console's catch-up"))
    for key, label, note in (
        ("floor_append_per_s", "floor (a0): raw records appended, no index at all",
         "key, time, place and raw value appended in arrival order to a table without any index, one "
         "transaction per poll with the positions: nothing a page could find by customer"),
        ("floor_raw_per_s", "floor (a): raw records by customer, no decoding",
         "key, time, place and the raw Avro value into a customer-clustered table + time index, one "
         "transaction per 2,000-record poll with the positions: the least a persisting consumer does"),
        ("floor_raw_10k_per_s", "floor (a)+(d): the same, 10,000-record polls", "fewer, larger transactions"),
        ("floor_customer_per_s", "floor (a) + customer upsert per record",
         "as (a), plus the console's customer upsert (batches, last time) for every record"),
        ("floor_grouped_per_s", "floor (a) + customer upsert grouped per poll (c)",
         "as (a), one customer upsert per customer of the poll"),
        ("floor_summary_per_s", "floor (b)+(c): raw + summary header -> customers and hourly figures",
         "as (a), with the customers' and the overview's figures from a ~20-byte header, grouped per "
         "customer and per hour: everything the pages index, no Avro decoding"),
        ("floor_summary_10k_per_s", "floor (b)+(c)+(d): the same, 10,000-record polls", ""),
        ("bare_again_per_s", "bare consumer again, after the floors", "the machine's drift during the run"),
    ):
        if key not in rates:
            continue
        bare = rates.get(key.replace("_per_s", "_bare_per_s"), rates["bare_per_s"])
        results.append(figure(label, rates[key], "decisions/s", baseline=bare,
                              ratio=rates[key] / bare, target=f">= {CATCHUP_TARGET}x bare",
                              met=rates[key] / bare >= CATCHUP_TARGET,
                              note=f"{note}{'; ' if note else ''}baseline: a bare consumer run just before it"
                              if key != "bare_again_per_s" else note))
    for key, rate in rates.items():
        if key.startswith("cpu "):
            results.append(figure(key, rate, "µs CPU a record", note="the consumer's process, every thread"
                                  if key.startswith(("cpu rocks", "cpu sqlite")) else "no Kafka, one thread"))
        if key.startswith("rocks_") and not key.endswith("_bare_per_s"):
            name = key.removeprefix("rocks_").removesuffix("_per_s")
            bare = rates[key.replace("_per_s", "_bare_per_s")]
            mode, wal, own_process = ROCKS_VARIANTS[name.split("_round")[0]]
            results.append(figure(
                f"RocksDB floor {name}", rate, "decisions/s", baseline=bare, ratio=rate / bare,
                target=f">= {CATCHUP_TARGET}x bare", met=rate / bare >= CATCHUP_TARGET,
                note=f"mode {mode} (bench.console_rocks), WAL {'on' if wal else 'off'}, writer "
                     f"{'in a process of its own' if own_process else 'in a thread'}; baseline: a bare "
                     "consumer run just before it"))
    doc = {"scale": {"customers": args.customers, "decisions": filled["decisions"],
                     "repeats": args.repeats, "catchup": args.catchup},
           "fill_seconds": filled["seconds"], "store_mb": size_mb, "machine": machine_info(),
           "load_average": {"before_catchup": load, "after": load_after},
           "decode_workers": args.decode_workers,
           "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    full = args.customers >= 100_000 and args.decisions >= 1_000_000
    name = "latest-console" if full else "latest-console-quick"
    if parts != frozenset(PARTS):  # a partial run does not replace the full one's results
        name += "-" + "-".join(sorted(parts))
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [f"# console benchmark ({args.customers:,} customers, {filled['decisions']:,} decisions)", "",
             f"store {size_mb:.0f} MB, filled in {filled['seconds']:.0f} s; load average "
             f"{load[0]:.1f} before the catch-up, {load_after[0]:.1f} after (2 cores, shared)", "",
             "| metric | value | baseline | ratio | target | met | note |", "|---|---|---|---|---|---|---|"]
    for r in results:
        baseline = "" if r["baseline"] is None else f"{r['baseline']:.0f}"
        ratio_text = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['metric']} | {r['value']:.1f} {r['unit']} | {baseline} | {ratio_text} | "
                     f"{r['target']} | {'yes' if r['met'] else 'NO'} | {r['note']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=60, help="requests per page")
    parser.add_argument("--catchup", type=int, default=200_000, help="decisions for the catch-up run")
    parser.add_argument("--decode-workers", type=int, default=None,
                        help="the console consumer's decoding processes (default: one per core beyond "
                             "the first)")
    parser.add_argument("--parts", default="", help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--rocks-rounds", type=int, default=1,
                        help="how many times each RocksDB floor variant runs (interleaved with bare reads)")
    parser.add_argument("--rocks-variants", default=",".join(ROCKS_VARIANTS),
                        help=f"comma-separated, of {', '.join(ROCKS_VARIANTS)}")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
