"""Benchmark 5 — state scale: the context table with N customers (100,000 at full scale).

1. Worker A (`watistream context`, RocksDB store, quiet window 1 h so nothing flushes) starts on an
   empty table: its start-to-ready time and RSS are the baseline.
2. The real path: K customers' messages are produced to the inbound topic and handled by worker A
   (fill rate = the worker's inbound throughput); their changelog records show the format.
3. A stops (SIGTERM). The other N - K customers are written straight to the table's changelog topic
   in that same format (key = customer key, value = Avro CustomerState, partition = the customer's
   partition), with states made by the domain functions themselves: first message → flush →
   history → answered reply (an idle customer after one exchange). Pushing 100,000 customers
   through the worker would take minutes on 2 cores (step 2 gives the rate); the recovery reads
   the changelog whatever wrote it.
4. Worker B starts with an EMPTY local store (a new host): full changelog recovery → ready. RSS.
   The worker's own `index_rebuilt` log line must count N customers, and its web view must serve
   a seeded customer.
5. Worker C restarts on B's local RocksDB (the ordinary restart). (Full scale) worker D with
   CONTEXT_STORE=memory recovers the same changelog into memory.
Memory per customer = (RSS after recovery - RSS of the empty worker) / N.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import httpx

from services.common import codec
from services.common.kafka import ensure_topics, make_producer
from services.common.records import AssistantReply, ContextCommand, CustomerState, InboundMessage
from services.common.timeparse import utcnow
from services.context import state as domain
from services.context.app import build_limits, customer_partition

from .common import WEB_TOKEN, BenchEnv, Profiler, ServiceProcess, figure
from .loadgen import wa_id_of
from .responder import request_of
from .stack import TopicReader

PLACEHOLDER = "99999999999"


def settled_state(settings: Any, now: Any) -> CustomerState:
    """An idle customer after one answered exchange, made by the domain functions (placeholder ids)."""
    limits = build_limits(settings)
    key = f"wati:{PLACEHOLDER}"
    message = cast(
        InboundMessage,
        dict(
            request_of(0, 0, now)["messages"][0],
            customer_key=key,
            provider_id=PLACEHOLDER,
            event_id=f"wamid.{PLACEHOLDER}",
            text="Hola, quisiera información",
        ),
    )
    state, _ = domain.on_inbound(domain.new_state(key), message, now, limits)
    batch_id = state["open_batch"]["batch_id"] if state["open_batch"] else ""
    later = now + timedelta(seconds=settings.quiet_window_seconds + 1)
    command: ContextCommand = {
        "kind": "flush",
        "customer_key": key,
        "batch_id": batch_id,
        "issued_at": later,
        "history": [],
        "history_error": None,
        "history_pages": 0,
        "actor": None,
    }
    state, effects = domain.on_command(state, command, later, limits)
    if effects.fetch is not None:  # first contact: the history check ran and found nothing
        fetched: ContextCommand = {**command, "kind": "history_fetched", "history_pages": 1}
        state, effects = domain.on_command(state, fetched, later, limits)
    reply: AssistantReply = {
        "batch_id": batch_id,
        "customer_key": key,
        "channel": "wati",
        "provider_id": PLACEHOLDER,
        "outcome": "answered",
        "text": "¡Hola! Con gusto le ayudo. ¿Para qué fechas busca habitación?",
        "parts": ["¡Hola! Con gusto le ayudo. ¿Para qué fechas busca habitación?"],
        "sent_at": later,
        "provider_message_ids": [f"wamid.reply{PLACEHOLDER}"],
        "response_id": "resp_1",
        "conversation_id": "conv_1",
        "input_tokens": 100,
        "output_tokens": 20,
    }
    state, _ = domain.on_reply(state, reply, later, limits)
    if state["open_batch"] is not None or state["flushing_batch"] is not None:
        raise RuntimeError("the seeded state still has a pending batch")
    return state


def _substitute(value: Any, wa_id: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, wa_id)
    if isinstance(value, list):
        return [_substitute(v, wa_id) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, wa_id) for k, v in value.items()}
    return copy.copy(value)


async def _seed(settings: Any, topic: str, first: int, count: int) -> float:
    """Writes customers first..first+count-1 to the changelog; returns the seconds it took."""
    template = settled_state(settings, utcnow() - timedelta(hours=1))
    producer = make_producer(settings, linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    started = time.monotonic()
    try:
        pending = []
        for c in range(first, first + count):
            wa_id = wa_id_of(c)
            key = f"wati:{wa_id}"
            value = codec.encode("CustomerState", _substitute(template, wa_id))
            pending.append(
                await producer.send(
                    topic,
                    value,
                    key=key.encode(),
                    partition=customer_partition(key, settings.topic_partitions),
                )
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def _start(
    bench: BenchEnv, settings: Any, tag: str, profiler: Profiler | None = None
) -> tuple[ServiceProcess, float, int]:
    """Starts a worker, waits until ready; returns it, seconds to ready, RSS (KiB) once settled.

    With a profiler (only with --profile), py-spy follows the start-up until the worker is stopped."""
    worker = ServiceProcess.watistream(bench, "context", settings, tag=f"-{tag}").start()
    if profiler is not None:
        profiler.start(worker.pid, 600)
    ready = await worker.wait_ready(f"http://127.0.0.1:{settings.context_web_port}/readyz", timeout=600)
    await asyncio.sleep(bench.scale.settle_seconds)
    return worker, ready, worker.rss_kib()


def _indexed(log: Path) -> int | None:
    """Customers counted by the worker's last `index_rebuilt` log line."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if '"index_rebuilt"' in line:
            try:
                found = int(json.loads(line).get("customers"))
            except (ValueError, TypeError):
                continue
    return found


async def run(bench: BenchEnv) -> dict[str, Any]:
    scale = bench.scale
    total = scale.state_customers
    real = max(1, min(1000, total // 20))
    base = bench.settings(
        "state",
        quiet_window_seconds=3600.0,
        max_batch_wait_seconds=7200.0,
        wati_api_url="http://127.0.0.1:9/unused",
        wati_api_token="unused",
    )
    topics = await ensure_topics(base)
    changelog = f"{base.topic_prefix}context-customers-changelog"
    settings_a = dataclasses.replace(base, data_dir=str(Path(base.data_dir) / "a"))
    Path(settings_a.data_dir).mkdir(parents=True, exist_ok=True)
    worker, ready_empty, rss_empty = await _start(bench, settings_a, "a")
    try:
        reader = await TopicReader(base, [changelog]).start()
        producer = make_producer(base)
        await producer.start()
        now = utcnow()
        started = time.monotonic()
        futures = []
        for c in range(real):
            message = request_of(c, 0, now)["messages"][0]
            futures.append(
                await producer.send(
                    topics.inbound,
                    codec.encode("InboundMessage", message),
                    key=message["customer_key"].encode(),
                )
            )
        await asyncio.gather(*futures)
        await producer.stop()
        keys: set[str] = set()

        def filled() -> bool:
            keys.update(r.key for r in reader.records[changelog])
            return len(keys) >= real

        if not await reader.wait_until(filled, 120 + real / 10):
            raise RuntimeError(f"worker A wrote {len(keys)} of {real} customers to the changelog")
        fill_seconds = time.monotonic() - started
        misplaced = sum(
            1
            for r in reader.records[changelog]
            if r.partition != customer_partition(r.key, base.topic_partitions) or r.name != "CustomerState"
        )
        await reader.stop()
        if misplaced:
            raise RuntimeError(f"{misplaced} changelog records are not (customer partition, CustomerState)")
    finally:
        worker.stop()
    seed_seconds = await _seed(base, changelog, real, total - real)

    settings_b = dataclasses.replace(base, data_dir=str(Path(base.data_dir) / "b"))
    Path(settings_b.data_dir).mkdir(parents=True, exist_ok=True)
    recovery_profile = Profiler(bench, "context-recovery")
    worker, ready_recover, rss_recover = await _start(bench, settings_b, "b", recovery_profile)
    try:
        indexed_b = _indexed(worker.log_path)
        probe_key = f"wati:{wa_id_of(total - 1)}"
        async with httpx.AsyncClient(timeout=10.0) as client:
            view = await client.get(
                f"http://127.0.0.1:{base.context_web_port}/customers/{probe_key}/",
                headers={"Authorization": f"Bearer {WEB_TOKEN}"},
            )
        view_ok = view.status_code == 200 and probe_key in view.text
    finally:
        worker.stop()
    profile_recovery = recovery_profile.finish()
    restart_profile = Profiler(bench, "context-restart")
    worker, ready_local, rss_local = await _start(bench, settings_b, "c", restart_profile)
    worker.stop()
    profile_restart = restart_profile.finish()
    memory_store = None
    if scale.name == "full":
        settings_d = dataclasses.replace(
            base, data_dir=str(Path(base.data_dir) / "d"), context_store="memory"
        )
        Path(settings_d.data_dir).mkdir(parents=True, exist_ok=True)
        worker, ready_mem, rss_mem = await _start(bench, settings_d, "d")
        worker.stop()
        memory_store = {
            "ready_seconds": ready_mem,
            "rss_kib": rss_mem,
            "bytes_per_customer": 1024.0 * (rss_mem - rss_empty) / total,
        }
    per_customer = 1024.0 * (rss_recover - rss_empty) / total
    extra = ready_recover - ready_empty
    scaled = (
        ""
        if total >= 100_000
        else (
            f" Measured at {total:,} customers; linear extrapolation to 100,000: "
            f"~{ready_empty + extra * 100_000 / total:.0f} s to ready, "
            f"~{per_customer * 100_000 / 2**20:.0f} MiB."
        )
    )
    figures = [
        figure(
            f"restart to ready, {total:,} customers, empty local store (full changelog recovery)",
            ready_recover,
            "s",
            baseline=ready_empty,
            note=f"baseline = the same worker on an empty table; {total / max(extra, 1e-9):,.0f} customers/s "
            f"recovered beyond the baseline.{scaled}",
        ),
        figure(
            f"restart to ready, {total:,} customers, local RocksDB kept",
            ready_local,
            "s",
            baseline=ready_empty,
        ),
        figure(
            "memory per customer (RocksDB store)",
            per_customer,
            "bytes",
            note=f"RSS {rss_empty / 1024:.0f} MiB empty -> {rss_recover / 1024:.0f} MiB with {total:,}",
        ),
    ]
    if memory_store is not None:
        figures.append(
            figure(
                "restart to ready, memory store (full changelog recovery)",
                memory_store["ready_seconds"],
                "s",
                baseline=ready_empty,
            )
        )
        figures.append(
            figure("memory per customer (memory store)", memory_store["bytes_per_customer"], "bytes")
        )
    figures.append(
        figure(
            "customers the recovered worker indexed",
            float(indexed_b or 0),
            "",
            target=f"= {total:,}",
            met=indexed_b == total and view_ok,
            note=f"web view of a seeded customer served: {view_ok}",
        )
    )
    return {
        "name": "state",
        "title": "5. State scale",
        "figures": figures,
        "details": {
            "customers": total,
            "through_worker": real,
            "fill_seconds": fill_seconds,
            "worker_inbound_rate": real / fill_seconds,
            "seed_seconds": seed_seconds,
            "ready_empty_seconds": ready_empty,
            "rss_empty_kib": rss_empty,
            "ready_recover_seconds": ready_recover,
            "rss_recover_kib": rss_recover,
            "ready_local_seconds": ready_local,
            "rss_local_kib": rss_local,
            "indexed": indexed_b,
            "view_ok": view_ok,
            "memory_store": memory_store,
            "profile_top": (profile_recovery or [])
            and [
                "-- full changelog recovery (worker B) --",
                *(profile_recovery or []),
                "-- restart on local RocksDB (worker C) --",
                *(profile_restart or []),
            ],
        },
    }
