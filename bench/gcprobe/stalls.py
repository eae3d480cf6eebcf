"""A stall probe for a benchmark's processes: when did a process stop serving, and why.

Records, with wall-clock times (`time.time()`, comparable across the run's processes):

- every cyclic-GC collection of at least `LONG_GC` seconds (generation, duration, objects collected);
- every time the process's asyncio loop answered a heartbeat at least `LONG_LAG` seconds late
  (a watchdog thread posts one every `BEAT` seconds with `call_soon_threadsafe`);
- while a heartbeat is overdue by `SAMPLE_AFTER` or more, the loop thread's stack, sampled by the
  watchdog each `BEAT` (if the watchdog cannot run during a stall, the loop thread holds the GIL
  in one native call — a GC, or a C extension that does not release it — which is itself the answer).

Every event is a list `[wall time, seconds, ...]`. Written as JSON to the given path every second.
Loaded in a service by `sitecustomize` (this directory on its PYTHONPATH, `BENCH_STALL_PROBE=<file>`),
in the bench process by `install`.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

BEAT = 0.1
LONG_GC = 0.05
LONG_LAG = 0.2
SAMPLE_AFTER = 0.3
KEEP = 2000  # events kept of each kind (the oldest are dropped past it)


class Probe:
    """What one process's stall probe has seen so far; `watch` and `write` run on their own threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.gc_pauses: list[list[Any]] = []  # [wall, seconds, generation, collected]
        self.lags: list[list[Any]] = []  # [wall posted, seconds late, samples taken]
        self.stacks: dict[str, int] = {}  # a sampled stack (innermost frame first) → times seen
        self._gc_started = 0.0
        self._answered = threading.Event()
        self.stopped = threading.Event()
        self._restore: Callable[[], None] | None = None

    # -- GC ------------------------------------------------------------------------------------
    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """gc.callbacks: keeps each collection of LONG_GC or more, with its wall-clock start."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        if took >= LONG_GC:
            self._keep(
                self.gc_pauses,
                [time.time() - took, round(took, 4), info["generation"], info.get("collected", 0)],
            )

    # -- the loop ------------------------------------------------------------------------------
    def watch(self) -> None:
        """Heartbeats: post one, wait for it, sample the loop thread's stack while it is overdue.
        Only while the loop runs: a heartbeat posted to a stopped loop (a service's start-up runs
        steps with `run_until_complete` between which it stands) would time the gap, not a stall."""
        while not self.stopped.wait(BEAT):
            loop = self.loop
            if loop is None or not loop.is_running():
                continue
            self._answered.clear()
            posted_wall, posted = time.time(), time.perf_counter()
            try:
                loop.call_soon_threadsafe(self._answered.set)
            except RuntimeError:  # closed between the check and the call
                continue
            samples, answered = 0, True
            while not self._answered.wait(BEAT):
                if not loop.is_running():
                    answered = False
                    break
                if time.perf_counter() - posted >= SAMPLE_AFTER:
                    samples += self._sample()
            late = time.perf_counter() - posted
            if answered and late >= LONG_LAG:
                self._keep(self.lags, [posted_wall, round(late, 4), samples])

    def _sample(self) -> int:
        frame = sys._current_frames().get(self.loop_thread or -1)
        if frame is None:
            return 0
        # innermost first, without reading source lines (the walk is done while the loop is late)
        stack = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=10, lookup_lines=False)
        key = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in stack)
        self.stacks[key] = self.stacks.get(key, 0) + 1
        return 1

    def snapshot(self) -> dict[str, Any]:
        """The events so far and the 50 stacks sampled most often, as plain JSON-able data."""
        return {
            "pid": os.getpid(),
            "gc_pauses": list(self.gc_pauses),
            "lags": list(self.lags),
            "stacks": sorted(([n, s] for s, n in list(self.stacks.items())), reverse=True)[:50],
        }

    def write(self) -> None:
        """Writes the snapshot to `path` every second (a failed write is tried again next second)."""
        while not self.stopped.wait(1.0):
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "w") as out:
                    json.dump(self.snapshot(), out)
                os.replace(tmp, self.path)
            except OSError:
                continue

    def stop(self) -> None:
        """Ends the threads, the GC callback and the loop lookup (a service's probe runs until it exits)."""
        self.stopped.set()
        if self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)
        if self._restore is not None:
            self._restore()

    @staticmethod
    def _keep(events: list[list[Any]], event: list[Any]) -> None:
        events.append(event)
        if len(events) > KEEP:
            del events[: len(events) - KEEP]


def install(path: str, loop: asyncio.AbstractEventLoop | None = None) -> Probe:
    """Starts the probe in this process, watching `loop` (which runs in this thread), else the loop
    that runs here (the latest one started once the one watched has closed)."""
    probe = Probe(path)
    gc.callbacks.append(probe.on_gc)
    if loop is not None:
        probe.loop, probe.loop_thread = loop, threading.get_ident()
    else:
        original = asyncio.events._set_running_loop

        def set_running_loop(running: asyncio.AbstractEventLoop | None) -> None:
            if running is not None and (probe.loop is None or probe.loop.is_closed()):
                probe.loop, probe.loop_thread = running, threading.get_ident()
            original(running)

        def restore() -> None:
            asyncio.events._set_running_loop = original

        # base_events looks the function up on the module at each run_forever: a wrapper sees it
        asyncio.events._set_running_loop = set_running_loop
        probe._restore = restore
    threading.Thread(target=probe.watch, name="stall-probe-watch", daemon=True).start()
    threading.Thread(target=probe.write, name="stall-probe-write", daemon=True).start()
    return probe
