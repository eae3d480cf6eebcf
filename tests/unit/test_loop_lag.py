"""services/common/loop_lag.py: a late event loop is measured and named, an on-time one is not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from services.common import metrics
from services.common.loop_lag import lag_of, loop_lag_watched, watch_loop_lag


def _count(service: str, le: str | None = None) -> float:
    if le is None:
        name, labels = "watistream_event_loop_lag_seconds_count", {"service": service}
    else:
        name, labels = "watistream_event_loop_lag_seconds_bucket", {"service": service, "le": le}
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def _late(service: str, over: str) -> float:
    """Wake-ups observed later than the bucket bound `over`."""
    return _count(service) - _count(service, over)


def _blocked_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "event_loop_blocked"]


def test_the_lag_is_what_a_wake_up_adds_to_the_interval() -> None:
    assert lag_of(10.0, 10.25, 0.25) == 0.0
    assert lag_of(10.0, 11.75, 0.25) == pytest.approx(1.5)
    assert lag_of(10.0, 10.2, 0.25) == 0.0  # a clock that reads early is no negative lag


def scripted_clock(interval: float, *woke_after: float) -> Callable[[], float]:
    """A clock by which the n-th sleep of `interval` took `woke_after[n]` seconds, later ones on time."""
    readings = [0.0]
    script = list(woke_after)
    began = [True]

    def clock() -> float:
        if began[0]:  # a sleep begins now: read the time
            began[0] = False
            return readings[-1]
        began[0] = True  # a sleep ends now: it took its scripted time
        readings.append(readings[-1] + (script.pop(0) if script else interval))
        return readings[-1]

    return clock


def test_each_wake_up_is_observed_with_its_lag_and_only_a_stall_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = "test-scripted"
    interval = 0.01
    clock = scripted_clock(interval, 0.01, 0.51, 0.01, 1.51, 0.01)  # lags 0, 0.5, 0, 1.5, 0

    async def main() -> None:
        watch = asyncio.create_task(watch_loop_lag(service, interval=interval, log_after=1.0, clock=clock))
        while _count(service) < 5:
            await asyncio.sleep(interval)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="services.common.loop_lag"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert _late(service, "0.25") == 2  # the 0.5 s and the 1.5 s wake-ups
    assert _late(service, "1.0") == 1
    [blocked] = _blocked_logs(caplog)  # the 1.5 s one; 0.5 s is under `log_after`
    assert blocked.fields == {"service": service, "seconds": 1.5}  # type: ignore[attr-defined]


def _block_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # the stall under test: the loop's thread busy, no await


def test_a_really_blocked_loop_is_seen_late(caplog: pytest.LogCaptureFixture) -> None:
    service = "test-blocked"

    async def main() -> None:
        watch = asyncio.create_task(watch_loop_lag(service, interval=0.02, log_after=0.3))
        while _count(service) < 2:  # the watch runs
            await asyncio.sleep(0.01)
        _block_the_loop_for(0.5)
        while _late(service, "0.25") < 1:  # the late wake-up is observed
            await asyncio.sleep(0.01)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="services.common.loop_lag"):
        asyncio.run(asyncio.wait_for(main(), 10))
    # a loaded machine may make other wake-ups late too: at least the blocked one, and one logged
    assert _late(service, "0.25") >= 1
    assert any(r.fields["seconds"] >= 0.45 for r in _blocked_logs(caplog))  # type: ignore[attr-defined]


def test_the_watch_runs_inside_its_block_and_stops_with_it() -> None:
    service = "test-block"

    async def main() -> None:
        async with loop_lag_watched(service):
            while _count(service) < 1:
                await asyncio.sleep(0.05)
            assert [t for t in asyncio.all_tasks() if t.get_name() == f"{service}-loop-lag"]
        assert [t for t in asyncio.all_tasks() if t.get_name() == f"{service}-loop-lag"] == []

    asyncio.run(asyncio.wait_for(main(), 10))
