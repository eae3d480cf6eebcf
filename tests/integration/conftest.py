"""Fixtures shared by the modules that drive one `watistream context` subprocess.

A module using them defines its own module-scoped `worker_settings` (its topics, thresholds and
stand-ins); `bus` and `worker` are then started once for that module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.common.config import Settings
from services.common.kafka import ensure_topics
from tests.integration.test_context_service import Bus, ContextWorker


@pytest.fixture(scope="module")
def bus_records_replies() -> bool:
    """Whether `bus` records the replies topic too: a module whose responder runs in the test
    process overrides this with True. Off by default: some modules put poison on that topic."""
    return False


@pytest.fixture(scope="module")
async def bus(worker_settings: Settings, bus_records_replies: bool) -> AsyncIterator[Bus]:
    """Produces the module's inputs and records the worker's outputs."""
    topics = await ensure_topics(worker_settings)
    b = Bus(worker_settings, topics, also=[topics.replies] if bus_records_replies else [])
    await b.start()
    yield b
    await b.stop()


@pytest.fixture(scope="module")
async def worker(worker_settings: Settings, bus: Bus, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[ContextWorker]:
    """The module's context worker, ready (after `bus`, so nothing it writes is missed)."""
    w = ContextWorker(worker_settings, tmp_path_factory.mktemp("logs") / "context.log").start()
    try:
        async with httpx.AsyncClient() as http:
            await w.wait_ready(http)
        yield w
    finally:
        w.stop()
