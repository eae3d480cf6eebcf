"""Awaiting what the code under test reaches by itself (a task, a thread, a retry backing off)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], object], *, timeout: float = 10.0, what: str = "the condition",
                poll: float = 0.005) -> None:
    """Returns once `condition()` is true; fails with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(poll)
