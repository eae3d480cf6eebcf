"""Benchmark 9c — what a context worker that is behind spends on batches waiting for it.

While the agent has not read a partition far enough, a batch due by the clock waits for it
(`ContextRuntime.flush_tick`: judged as of what the agent has read). A worker that is behind has one
such batch per message it is behind (at 100 msg/s, 10 s behind = 1,000 batches), so whatever the
flush loop spends per waiting batch and second is taken from the agent exactly when it needs it to
catch up. In-process, no broker: the flush loop of a real `ContextRuntime` (memory store) with N
batches waiting and an agent that reads nothing newer, for a few seconds; the figure is the CPU it
used, as a share of one core. `python -m bench.run --only behind`.

Measured before the fix (BENCHMARKS.md section 9): 3 / 23 / 56 % of a core at 250 / 1,000 / 4,000
waiting batches (each looked at 20 times a second, and added to the waiting list again each time).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import timedelta
from typing import Any

from services.common import codec
from services.common.config import Settings
from services.common.records import InboundMessage
from services.common.timeparse import utcnow
from services.context import state as domain
from services.context.app import build_limits, create_app, flush_sleep

from .common import BenchEnv, figure

WAITING = {"full": (250, 1000, 4000), "quick": (250, 1000, 4000), "smoke": (250,)}
WINDOW_SECONDS = 3.0
PARTITIONS = 8
TARGET_SHARE = 0.05  # of one core, at the most batches waiting


def _message(key: str, number: int, at: Any) -> InboundMessage:
    return {
        "event_id": f"e{number}", "customer_key": key, "channel": "wati", "provider_id": key.split(":")[1],
        "message_type": "text", "text": "hola", "caption": None, "media_ref": None, "media_mime": None,
        "sender_name": "Cliente", "provider_message_ids": [f"e{number}"], "provider_time": at,
        "received_at": at, "recovered": False, "username": None,
    }


async def flush_loop_share(waiting: int, window: float = WINDOW_SECONDS) -> dict[str, float]:
    """CPU share of one core the flush loop uses while `waiting` due batches wait for the agent."""
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9", topic_prefix="behind.", web_token="t",
                        context_store="memory", data_dir=tempfile.mkdtemp(prefix="bench-behind-"),
                        missed_history="gap", reconcile_interval_seconds=60.0)
    runtime: Any = create_app(settings).runtime
    table: dict[bytes, bytes] = {}
    runtime.customers = table

    async def send_command(command: Any) -> None:
        return None

    runtime.send_command = send_command
    runtime.index_ready = True
    runtime.readiness = lambda: (True, {})
    runtime.inbound_behind = lambda partition: True  # every partition has more to read
    limits = build_limits(settings)
    start = utcnow() - timedelta(seconds=30)  # every batch's quiet window ended by the clock
    for n in range(waiting):
        key = f"wati:5037{n:07d}"
        state, _ = domain.on_inbound(domain.new_state(key), _message(key, n, start), start, limits)
        table[key.encode()] = codec.encode("CustomerState", dict(state))
        runtime.index.update(key, n % PARTITIONS, state, limits)
    for partition in range(PARTITIONS):  # the agent has read up to before every batch's last message
        runtime.inbound_read_up_to[partition] = start - timedelta(seconds=10)
    cpu0, end = time.process_time(), time.monotonic() + window
    while time.monotonic() < end:  # the flush loop's body, and a completed chunk after each look
        await runtime.flush_tick()
        runtime._release_behind()
        await asyncio.sleep(flush_sleep(runtime.index.next_due_at(), utcnow(), 0.2))
    return {"share": (time.process_time() - cpu0) / window,
            "waiting_entries": float(sum(len(v) for v in runtime._behind.values()))}


async def run(bench: BenchEnv) -> dict[str, Any]:
    results = {n: await flush_loop_share(n) for n in WAITING.get(bench.scale.name, WAITING["quick"])}
    most = max(results)
    return {
        "name": "behind",
        "title": "9c. Flush loop of a worker that is behind",
        "figures": [
            figure(f"flush loop CPU, {n:,} batches waiting for the agent", 100 * r["share"], "% of a core",
                   target=f"<= {100 * TARGET_SHARE:.0f} %" if n == most else "",
                   met=r["share"] <= TARGET_SHARE if n == most else None,
                   note=f"{r['waiting_entries']:.0f} waiting entries after {WINDOW_SECONDS:.0f} s")
            for n, r in results.items()
        ],
        "details": {str(n): r for n, r in results.items()},
    }
