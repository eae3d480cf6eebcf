"""The benchmarks' probes in a service process (loaded only where a bench asks: `bench.common.with_probes`).

With BENCH_GC_PROBE set to a file (`bench.growth`, the context worker): every collection's
generation and duration (gc.callbacks) are summed, and the sums are written to that file every
second as JSON — the bench reads them before and after a part.
With BENCH_STALL_PROBE set to a file (`bench.tenants`, each service), `stalls.py` beside this file:
long GC pauses, loop lag and the loop's stack while it is late, with wall-clock times.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time

_PATH = os.environ.get("BENCH_GC_PROBE")


def _install(path: str) -> None:
    collections = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    max_seconds = [0.0, 0.0, 0.0]
    gen2: list[float] = []  # each gen-2 collection's duration, in order (a part's pauses: its slice)
    totals: dict[str, object] = {"collections": collections, "seconds": seconds, "max_seconds": max_seconds,
                                 "gen2_seconds": gen2}
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        generation = info["generation"]
        took = time.perf_counter() - started[0]
        collections[generation] += 1
        seconds[generation] += took
        max_seconds[generation] = max(max_seconds[generation], took)
        if generation == 2:
            gen2.append(took)

    def writer() -> None:
        ticks = 0
        while True:
            time.sleep(1.0)
            if ticks % 10 == 0:  # a walk of every tracked object holds the GIL: every 10 s only
                totals["tracked_objects"] = len(gc.get_objects())
            ticks += 1
            totals["frozen"] = gc.get_freeze_count()
            tmp = path + ".tmp"
            with open(tmp, "w") as out:
                json.dump(totals, out)
            os.replace(tmp, path)

    gc.callbacks.append(callback)
    threading.Thread(target=writer, name="gc-probe", daemon=True).start()


if _PATH:
    _install(_PATH)
if os.environ.get("BENCH_STALL_PROBE"):  # `stalls.py` beside this file (bench.tenants)
    import stalls  # type: ignore[import-not-found]  # beside this file, on the same PYTHONPATH

    stalls.install(os.environ["BENCH_STALL_PROBE"])
