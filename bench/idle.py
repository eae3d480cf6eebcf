"""Benchmark 6 — idle cost: CPU an idle context worker burns, next to an idle bare consumer.

An idle worker must cost next to nothing: a deployment runs one per partition group around the
clock. The worker (`watistream context`, RocksDB, its four input topics empty) starts, becomes
ready, settles, and its CPU time is read from /proc over a window. The baseline, in the same run:
a bare aiokafka group consumer of the same four topics (`python -m bench.idle consumer ...`),
measured over the same window. Figure: % of one core, worker vs baseline.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer

from services.common.broker import free_port
from services.common.kafka import Topics, ensure_topics

from .common import BenchEnv, ServiceProcess, figure, serve_until_signal, settings_env

#: The idle window (seconds) per scale name; longer windows smooth the timer ticks out.
WINDOW_SECONDS = {"full": 60.0, "quick": 20.0, "smoke": 5.0}


async def _idle_percent(process: ServiceProcess, window: float) -> float:
    before, started = process.cpu_seconds(), time.monotonic()
    await asyncio.sleep(window)  # the measurement itself: CPU used over a wall-clock window
    return 100.0 * (process.cpu_seconds() - before) / (time.monotonic() - started)


async def run(bench: BenchEnv) -> dict[str, Any]:
    # no history fetch happens while idle: the WATI settings only satisfy the start-up check
    settings = bench.settings("idle", wati_api_url="http://127.0.0.1:9/unused", wati_api_token="unused")
    await ensure_topics(settings)
    topics = Topics.from_settings(settings)
    window = WINDOW_SECONDS.get(bench.scale.name, 20.0)
    port = free_port()
    baseline = ServiceProcess(
        "idle-consumer",
        [sys.executable, "-m", "bench.idle", "consumer", settings.kafka_bootstrap_servers, str(port),
         topics.inbound, topics.agent_activity, topics.replies, topics.context_commands],
        settings_env(settings), bench.log_path("idle-consumer"),
    ).start()
    worker = ServiceProcess.watistream(bench, "context", settings).start()
    try:
        await baseline.wait_ready(f"http://127.0.0.1:{port}/readyz")
        await worker.wait_ready(f"http://127.0.0.1:{settings.context_web_port}/readyz")
        await asyncio.sleep(bench.scale.settle_seconds)  # let start-up work (recovery, index) end
        worker_pct, baseline_pct = await asyncio.gather(
            _idle_percent(worker, window), _idle_percent(baseline, window))
    finally:
        worker.stop()
        baseline.stop()
    return {
        "name": "idle",
        "title": "Idle cost of a context worker",
        "figures": [
            figure("idle context worker CPU", worker_pct, "% of a core", baseline=baseline_pct,
                   target="≈ 1 %", met=worker_pct <= 1.5,
                   note=f"bare group consumer of the same topics = baseline; {window:.0f} s window"),
        ],
        "details": {"window_seconds": window, "worker_percent": worker_pct,
                    "baseline_percent": baseline_pct},
    }


async def _consume(bootstrap: str, port: int, topics: list[str]) -> None:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=f"idle-{port}",
                                enable_auto_commit=True)
    await consumer.start()

    async def drain() -> None:
        async for _ in consumer:
            pass

    try:
        await serve_until_signal(port, drain())
    finally:
        await consumer.stop()


if __name__ == "__main__" and len(sys.argv) > 4 and sys.argv[1] == "consumer":
    asyncio.run(_consume(sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
