"""services/common/loop_lag.py: a blocked event loop is measured and named, a free one is not."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.common import metrics
from services.common.loop_lag import lag_of, loop_lag_watched, watch_loop_lag


def _count(service: str, le: str | None = None) -> float:
    if le is None:
        name, labels = "watistream_event_loop_lag_seconds_count", {"service": service}
    else:
        name, labels = "watistream_event_loop_lag_seconds_bucket", {"service": service, "le": le}
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_lag_is_what_a_wake_up_adds_to_the_interval() -> None:
    assert lag_of(10.0, 10.25, 0.25) == 0.0
    assert lag_of(10.0, 11.75, 0.25) == pytest.approx(1.5)
    assert lag_of(10.0, 10.2, 0.25) == 0.0  # a clock that reads early is no negative lag


def _block_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # the stall under test: the loop's thread busy, no await


def test_a_blocked_loop_is_observed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    service = "test-blocked"

    async def main() -> None:
        watch = asyncio.create_task(watch_loop_lag(service, interval=0.02, log_after=0.3))
        while _count(service) < 2:  # the watch runs: some on-time wake-ups first
            await asyncio.sleep(0.01)
        _block_the_loop_for(0.5)
        while _count(service) - _count(service, "0.25") < 1:  # the late wake-up is observed
            await asyncio.sleep(0.01)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="services.common.loop_lag"):
        asyncio.run(asyncio.wait_for(main(), 10))
    late = _count(service) - _count(service, "0.25")
    assert late == 1  # the one blocked wake-up, not the others
    assert _count(service, "1.0") == _count(service)  # it was under a second
    blocked = [r for r in caplog.records if r.getMessage() == "event_loop_blocked"]
    assert len(blocked) == 1
    fields = blocked[0].fields  # type: ignore[attr-defined]
    assert fields["service"] == service
    assert 0.4 <= fields["seconds"] <= 1.0


def test_a_free_loop_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    service = "test-free"

    async def main() -> None:
        async with loop_lag_watched(service):
            while _count(service) < 1:
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="services.common.loop_lag"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert _count(service) >= 1
    assert [r for r in caplog.records if r.getMessage() == "event_loop_blocked"] == []
