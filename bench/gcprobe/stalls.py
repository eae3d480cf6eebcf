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
from typing import Any

BEAT = 0.1
LONG_GC = 0.05
LONG_LAG = 0.2
SAMPLE_AFTER = 0.3
KEEP = 2000  # events kept of each kind (the oldest are dropped past it)


class Probe:
    def __init__(self, path: str) -> None:
        self.path = path
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.gc_pauses: list[list[Any]] = []  # [wall, seconds, generation, collected]
        self.lags: list[list[Any]] = []  # [wall posted, seconds late, samples taken]
        self.stacks: dict[str, int] = {}  # a sampled stack (innermost last) → times seen
        self._gc_started = 0.0
        self._answered = threading.Event()
        self.stopped = threading.Event()

    # -- GC ------------------------------------------------------------------------------------
    def on_gc(self, phase: str, info: dict[str, int]) -> None:
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
        """Heartbeats: post one, wait for it, sample the loop thread's stack while it is overdue."""
        while not self.stopped.wait(BEAT):
            loop = self.loop
            if loop is None or loop.is_closed():
                continue
            self._answered.clear()
            posted_wall, posted = time.time(), time.perf_counter()
            try:
                loop.call_soon_threadsafe(self._answered.set)
            except RuntimeError:  # closed between the check and the call
                continue
            samples = 0
            while not self._answered.wait(BEAT):
                if time.perf_counter() - posted >= SAMPLE_AFTER:
                    samples += self._sample()
                if loop.is_closed():
                    break
            late = time.perf_counter() - posted
            if late >= LONG_LAG:
                self._keep(self.lags, [posted_wall, round(late, 4), samples])

    def _sample(self) -> int:
        frame = sys._current_frames().get(self.loop_thread or -1)
        if frame is None:
            return 0
        stack = traceback.extract_stack(frame)[-10:]
        key = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(stack))
        self.stacks[key] = self.stacks.get(key, 0) + 1
        return 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "gc_pauses": list(self.gc_pauses),
            "lags": list(self.lags),
            "stacks": sorted(([n, s] for s, n in list(self.stacks.items())), reverse=True)[:50],
        }

    def write(self) -> None:
        while not self.stopped.wait(1.0):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as out:
                json.dump(self.snapshot(), out)
            os.replace(tmp, self.path)

    def stop(self) -> None:
        """Ends the threads and the GC callback (a test's probe; a service's runs until it exits)."""
        self.stopped.set()
        if self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)

    @staticmethod
    def _keep(events: list[list[Any]], event: list[Any]) -> None:
        events.append(event)
        if len(events) > KEEP:
            del events[: len(events) - KEEP]


def install(path: str, loop: asyncio.AbstractEventLoop | None = None) -> Probe:
    """Starts the probe in this process, watching `loop` (which runs in this thread), else the first
    loop that runs here."""
    probe = Probe(path)
    gc.callbacks.append(probe.on_gc)
    if loop is not None:
        probe.loop, probe.loop_thread = loop, threading.get_ident()
    else:
        original = asyncio.events._set_running_loop

        def set_running_loop(running: asyncio.AbstractEventLoop | None) -> None:
            if running is not None and probe.loop is None:
                probe.loop, probe.loop_thread = running, threading.get_ident()
            original(running)

        # base_events looks the function up on the module at each run_forever: a wrapper sees it
        asyncio.events._set_running_loop = set_running_loop
    threading.Thread(target=probe.watch, name="stall-probe-watch", daemon=True).start()
    threading.Thread(target=probe.write, name="stall-probe-write", daemon=True).start()
    return probe


def read(path: str) -> dict[str, Any]:
    """The probe's last written state (empty when it never wrote)."""
    try:
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return {}
