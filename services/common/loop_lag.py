"""How late a service's event loop runs.

Every service does its work on one asyncio loop: while something holds that loop (a long
synchronous call, a large garbage collection, a store write that waits for a compaction), the
service serves nobody, yet its queue and lag gauges move only afterwards. So each service measures
the loop itself: a task sleeps `LOOP_LAG_INTERVAL_SECONDS` and records how much later than asked it
woke, into `watistream_event_loop_lag_seconds`, and logs a warning for a wake-up `STALL_LOG_SECONDS`
late or more (alert: WatistreamEventLoopBlocked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from . import logs, metrics

log = logging.getLogger(__name__)

LOOP_LAG_INTERVAL_SECONDS = 0.25  # between two looks; the lag of a wake-up is what it adds to this
STALL_LOG_SECONDS = 1.0  # a wake-up this late is logged


def lag_of(slept_from: float, woke_at: float, interval: float) -> float:
    """How much later than `interval` a sleep begun at `slept_from` ended (never negative)."""
    return max(0.0, woke_at - slept_from - interval)


async def watch_loop_lag(
    service: str,
    *,
    interval: float = LOOP_LAG_INTERVAL_SECONDS,
    log_after: float = STALL_LOG_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Runs until cancelled: observes each wake-up's lag, logs the ones of `log_after` or more."""
    observed = metrics.event_loop_lag_seconds.labels(service)
    while True:
        slept_from = clock()
        await asyncio.sleep(interval)
        lag = lag_of(slept_from, clock(), interval)
        observed.observe(lag)
        if lag >= log_after:
            # one long callback or a backlog of ready ones: work that became ready meanwhile waited
            # up to this long
            logs.event(log, "event_loop_blocked", logging.WARNING, service=service, seconds=round(lag, 3))


@contextlib.asynccontextmanager
async def loop_lag_watched(service: str) -> AsyncIterator[None]:
    """The watch as a task of the running loop for the block's duration."""
    task = asyncio.create_task(watch_loop_lag(service), name=f"{service}-loop-lag")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
