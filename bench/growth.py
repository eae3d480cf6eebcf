"""Benchmark 9b — what one context worker's message costs as its table grows (10k → 100k customers).

Section 9's full run showed the context worker falling behind in each configuration's last part,
when its table passed ~75,000 customers. This measures the cost per message directly, without
playing 100,000 messages: one stack of section 9 (`watistream ingest` + `watistream context`, one
tenant, RocksDB, quiet window 1 s, each history read from the WATI stand-in), a warm-up part, then
for each table size in turn the worker is stopped, its table's changelog topic is filled up to that
many customers (copies of a real customer's state after one answered message, read back from the
changelog, under new keys), the worker is started again (recovery, index rebuilt) and a fixed probe
load of new customers is played: CPU of the context worker per message (/proc), p50/p99 of the
overhead (webhook accepted → ResponderRequest, minus the quiet window) and, with the GC probe
(`bench/gcprobe`, on the worker's PYTHONPATH), the collections of each generation and their time.

The table sizes' probes run in the same run: the smallest size (the warm-up's customers only) is
the baseline. `python -m bench.run --only growth [--quick] [--profile]` (--profile: py-spy on the
worker during each probe). Sizes and the probe load: `LEVELS`, `PROBE`; `BENCH_GROWTH_LEVELS`
(comma-separated customers), `BENCH_GROWTH_PROBE` (customers per probe) and `BENCH_GROWTH_RATE`
override them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from typing import Any

from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.kafka import make_consumer, make_producer
from services.context.app import SERVICE, TABLE_NAME, customer_partition
from services.standins import StandIns

from .common import BenchEnv, Profiler, figure, git_commit, read_probe, with_probes
from .loadgen import wa_id_of
from .tenants import SINGLE_TENANT, Stack

#: table sizes (customers in the worker's table before each probe), per scale
LEVELS = {"full": (0, 10_000, 50_000, 100_000), "quick": (0, 10_000, 50_000), "smoke": (0, 500)}
#: the probe load: this many new customers, one message each, at this rate (msg/s)
PROBE = {"full": (4_000, 50.0), "quick": (2_000, 50.0), "smoke": (100, 20.0)}
WARMUP = 200
#: the filled customers' numbers start here (the probes' customers are 0, 1, …; the warm-up's after)
FILL_BASE = 50_000_000


def changelog_topic(prefix: str) -> str:
    """faust's name of the context table's changelog: `<app id>-<table>-changelog`."""
    return f"{prefix}{SERVICE}-{TABLE_NAME}-changelog"


def _replace_strings(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _replace_strings(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, old, new) for v in value]
    return value


async def read_template(stack: Stack) -> tuple[str, dict[str, Any]]:
    """(waId, state) of a customer whose one message was answered: the newest changelog value of a
    key without an open or flushing batch."""
    settings = stack.settings
    topic = changelog_topic(settings.topic_prefix)
    consumer = make_consumer(settings, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        latest: dict[bytes, bytes] = {}
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for m in messages:
                    if m.key is not None and m.value is not None:
                        latest[m.key] = m.value
    finally:
        await consumer.stop()
    for key, value in latest.items():
        state = codec.decode("CustomerState", value)
        if state.get("open_batch") is None and state.get("flushing_batch") is None:
            wa_id = key.decode().rpartition(":")[2]
            return wa_id, dict(state)
    raise RuntimeError("no answered customer in the changelog to copy")


async def fill(stack: Stack, template: tuple[str, dict[str, Any]], start: int, stop: int) -> float:
    """Writes customers `start` … `stop - 1` (numbers FILL_BASE + n) into the table's changelog, each
    a copy of the template under its own key; returns seconds taken."""
    settings = stack.settings
    topic = changelog_topic(settings.topic_prefix)
    old_wa, state = template
    old_key = state["customer_key"]
    producer = make_producer(settings)
    await producer.start()
    began = time.monotonic()
    try:
        futures = []
        for n in range(start, stop):
            wa = wa_id_of(FILL_BASE + n)
            key = old_key.replace(old_wa, wa)
            value = codec.encode("CustomerState", _replace_strings(state, old_wa, wa))
            futures.append(await producer.send(
                topic, value, key=key.encode(), partition=customer_partition(key, settings.topic_partitions)))
            if len(futures) >= 5000:
                for f in futures:
                    await f
                futures = []
        for f in futures:
            await f
    finally:
        await producer.stop()
    return time.monotonic() - began


async def run(bench: BenchEnv) -> dict[str, Any]:
    levels = tuple(int(v) for v in os.environ["BENCH_GROWTH_LEVELS"].split(",")) \
        if os.environ.get("BENCH_GROWTH_LEVELS") else LEVELS[bench.scale.name]
    probe_customers, rate = PROBE[bench.scale.name]
    if os.environ.get("BENCH_GROWTH_RATE"):
        rate = float(os.environ["BENCH_GROWTH_RATE"])
    if os.environ.get("BENCH_GROWTH_PROBE"):
        probe_customers = int(os.environ["BENCH_GROWTH_PROBE"])
    commit = git_commit()
    gc_file = bench.workdir / "growth-gc.json"
    probes: list[dict[str, Any]] = []
    async with StandIns.running() as standins:
        stack = Stack(bench, standins, "growth", [SINGLE_TENANT], "request")
        context = stack.procs["context"]
        with_probes(context.env, BENCH_GC_PROBE=str(gc_file))
        try:
            await stack.start()
            warm = [[i / rate, wa_id_of(n), f"{stack.tag} c{n}", 0]
                    for i, n in enumerate(range(FILL_BASE - WARMUP, FILL_BASE))]
            await stack.warm_up(warm)
            template = await read_template(stack)
            filled = 0
            for number, level in enumerate(levels):
                fill_seconds = restart_seconds = 0.0
                if level > filled:
                    context.stop()
                    fill_seconds = await fill(stack, template, filled, level)
                    filled = level
                    context.start()
                    restart_seconds = await context.wait_ready(
                        f"http://127.0.0.1:{stack.settings.context_web_port}/readyz", timeout=900.0)
                first = number * probe_customers
                entries = [[i / rate, wa_id_of(first + i), f"{stack.tag} c{first + i}", 0]
                           for i in range(probe_customers)]
                cpu0, gc0, own0 = dict(stack.cpu), read_probe(gc_file), time.process_time()
                profiler = Profiler(bench, f"growth-context-{level}")
                profiler.start(context.pid, probe_customers / rate)
                play = await stack.play(entries)
                await asyncio.sleep(1.2)  # the probe writes its sums every second
                gc1, own = read_probe(gc_file), time.process_time() - own0
                accepted = max(1, play["accepted"])
                zero = {"collections": [0] * 3, "seconds": [0.0] * 3, "max_seconds": [0.0] * 3}
                before, after = {**zero, **gc0}, {**zero, **gc1}
                gcs = {
                    f"gen{g}": {
                        "collections": after["collections"][g] - before["collections"][g],
                        "ms_per_message": 1000 * (after["seconds"][g] - before["seconds"][g]) / accepted,
                        "max_ms_since_start": 1000 * after["max_seconds"][g],
                    }
                    for g in range(3)
                } if gc1 else {}
                pauses = after.get("gen2_seconds", [])[len(before.get("gen2_seconds", [])):]
                if gcs:
                    gcs["gen2"]["max_ms_in_probe"] = 1000 * max(pauses, default=0.0)
                probe = {
                    "customers_in_table": level + WARMUP,
                    "fill_seconds": round(fill_seconds, 1),
                    "restart_seconds": round(restart_seconds, 1),
                    "context_cpu_ms_per_message": 1000 * (stack.cpu["context"] - cpu0["context"]) / accepted,
                    "ingest_cpu_ms_per_message": 1000 * (stack.cpu["ingest"] - cpu0["ingest"]) / accepted,
                    # the bench process: the WATI stand-in (every history read) and the topic reader
                    "bench_cpu_ms_per_message": 1000 * own / accepted,
                    "broker_cpu_ms_per_message": 1000 * (stack.cpu["broker"] - cpu0["broker"]) / accepted,
                    "overhead_ms": play["overhead_ms"],
                    "results_per_s": round(play["results_per_s"], 1),
                    "load_average_at_start": play["load_average_at_start"],
                    "gc": gcs,
                    "tracked_objects": gc1.get("tracked_objects"),
                    "context_rss_mib": round(context.rss_kib() / 1024, 1),
                    "profile_top": profiler.finish(),
                }
                probes.append(probe)
                print(f"[growth] {json.dumps(probe)}", flush=True)
        finally:
            await stack.stop()
    base, last = probes[0], probes[-1]
    figures = [
        figure(
            f"context CPU per message, {p['customers_in_table']:,} customers in the table",
            p["context_cpu_ms_per_message"], "ms",
            baseline=base["context_cpu_ms_per_message"] if p is not base else None,
            note=f"p50/p99 {p['overhead_ms']['p50']}/{p['overhead_ms']['p99']} ms; gen2 GC "
            f"{p['gc'].get('gen2', {}).get('collections', '-')} collections, "
            f"{p['gc'].get('gen2', {}).get('ms_per_message', math.nan):.2f} ms/message; load "
            f"{p['load_average_at_start']}",
        )
        for p in probes
    ]
    return {
        "name": "growth",
        "title": "9b. Cost per message as the context table grows",
        "figures": figures,
        "notes": [f"probe: {probe_customers:,} new customers at {rate:.0f} msg/s per table size; "
                  f"baseline = the smallest table, same run; commit {commit}"],
        "details": {"commit": commit, "probes": probes,
                    "cpu_growth": last["context_cpu_ms_per_message"]
                    / max(1e-9, base["context_cpu_ms_per_message"])},
    }
