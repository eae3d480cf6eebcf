"""Fixtures shared by the end-to-end drills."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.standins import StandIns


@pytest.fixture
async def standins() -> AsyncIterator[StandIns]:
    """The stand-ins of the SIGKILL drills (tests/e2e/test_chaos.py, test_context_chaos.py)."""
    async with StandIns.running() as running:
        running.openai.latency = 0.15  # a generation takes a moment: kills land mid-call too
        running.wati.latency = 0.05  # so does a send: kills land between WATI's accept and `sent`
        running.openai.json_fn = lambda request, schema: {
            "category": "payment_proof", "confidence": 0.9, "description": "bank transfer receipt"}
        yield running
