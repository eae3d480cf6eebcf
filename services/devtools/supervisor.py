"""A small supervisor for `watistream dev`: one process tree, prefixed logs, no orphans.

Children are the real `watistream <service>` processes. A child that exits on its own stops the
whole tree with a clear message (nothing is restarted silently); SIGINT/SIGTERM stops every child
(SIGTERM, then SIGKILL after a grace period) and the embedded broker. Each child also gets
PR_SET_PDEATHSIG, so even a SIGKILLed supervisor leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

from services.common.broker import _die_with_parent

COLOURS = {"ingest": 36, "context": 35, "responder": 32, "vision": 33, "broker": 34, "demo": 37}


def render_line(service: str, raw: str, colour: bool) -> str:
    """`context   | 12:00:01 INFO batch_flushed customer=wati:****123 route=responder`."""
    text = raw.rstrip("\n")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "level" in doc:
        ts = str(doc.pop("ts", ""))[11:19]
        level = doc.pop("level", "")
        for drop in ("service", "logger"):
            doc.pop(drop, None)
        head = doc.pop("event", None) or doc.pop("msg", "")
        rest = " ".join(f"{k}={v}" for k, v in doc.items())
        text = f"{ts} {level:<7} {head} {rest}".rstrip()
    name = f"{service:<9}|"
    if colour:
        name = f"\x1b[{COLOURS.get(service, 37)}m{name}\x1b[0m"
    return f"{name} {text}"


@dataclass
class Child:
    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None


@dataclass
class Supervisor:
    """Starts children, prefixes their output, and stops all of them together."""

    env: Mapping[str, str]
    out: TextIO = field(default_factory=lambda: sys.stdout)
    grace_seconds: float = 10.0
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    @property
    def colour(self) -> bool:
        return self.out.isatty() and "NO_COLOR" not in os.environ

    def say(self, text: str) -> None:
        print(render_line("watistream", text, self.colour), file=self.out, flush=True)

    async def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Child:
        """Starts `watistream <args>`; `env` overrides some of the tree's variables for this child."""
        argv = [sys.executable, "-m", "services.cli", *args]
        child = Child(name, argv)
        child.process = await asyncio.create_subprocess_exec(
            *argv, env={**self.env, **(env or {})}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        child.pump = asyncio.create_task(self._pump(child))
        self.children.append(child)
        return child

    async def _pump(self, child: Child) -> None:
        assert child.process is not None and child.process.stdout is not None
        async for raw in child.process.stdout:
            print(render_line(child.name, raw.decode(errors="replace"), self.colour),
                  file=self.out, flush=True)

    async def wait_any_exit(self) -> Child:
        """Returns the first child that exits (a crash, unless we are stopping)."""
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children if c.process}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period, SIGKILL what is left."""
        self.stopping = True
        alive = [c for c in self.children if c.process and c.process.returncode is None]
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for child in alive:
            assert child.process is not None
            try:
                await asyncio.wait_for(child.process.wait(), self.grace_seconds)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        for child in self.children:
            if child.pump is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(child.pump, 2)
