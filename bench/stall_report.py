"""When a benchmark's tail happened and what each process was doing then.

A benchmark that sees a tail of several seconds in one part (every customer late at once) needs to
know which process stopped: the stall probes (`bench/gcprobe/stalls.py`: long GC pauses, loop lag
and the loop's stack, in the bench process and each service), the CPU every process and the machine
used each second (`bench/cpu_probe.py`, steal time included), the broker's JVM GC log and the
RocksDB LOG of a table store. This module turns the results' per-second timeline into stall windows
and sets beside each the events of every source that overlap it; every event is a list
`[wall time, seconds, ...]`. Plain functions over plain data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# a window: arrivals of these seconds had a late result; events from this many seconds before its
# first arrival (a stall just before the arrivals delays them too) up to its last late result
LEAD_SECONDS = 2.0


@dataclass
class Second:
    """The results of the messages that arrived in one second of the run."""

    results: int = 0
    late: int = 0  # results later than the bench's threshold
    largest_ms: float = 0.0

    def add(self, overhead_ms: float, late_ms: float) -> None:
        self.results += 1
        self.late += overhead_ms > late_ms
        self.largest_ms = max(self.largest_ms, overhead_ms)


def stall_windows(
    by_second: dict[int, Second], *, tail_seconds: float = 0.0, join_gap: int = 2
) -> list[dict[str, Any]]:
    """Consecutive seconds of arrivals (gaps up to `join_gap` joined) that had a late result. A
    window's span, in which the probes' events are looked for, runs from LEAD_SECONDS before its
    first arrival to its last late result: its last arrival + `tail_seconds` (what the pipeline
    waits by design, e.g. the quiet window) + the largest overhead."""
    windows: list[dict[str, Any]] = []
    for second in sorted(s for s, v in by_second.items() if v.late > 0):
        tally = by_second[second]
        if windows and second - windows[-1]["last_second"] <= join_gap:
            window = windows[-1]
            window["last_second"] = second
            window["late"] += tally.late
            window["largest_ms"] = max(window["largest_ms"], tally.largest_ms)
        else:
            windows.append({"first_second": second, "last_second": second, "late": tally.late,
                            "largest_ms": tally.largest_ms})
    for window in windows:
        window["results"] = sum(by_second[s].results
                                for s in range(window["first_second"], window["last_second"] + 1)
                                if s in by_second)
        window["from"] = window["first_second"] - LEAD_SECONDS
        window["to"] = window["last_second"] + 1 + tail_seconds + window["largest_ms"] / 1000.0
    return windows


def events_in(window: dict[str, Any], events: list[list[Any]]) -> list[list[Any]]:
    """The events (`[wall time, seconds, ...]`) that overlap the window's span."""
    return [e for e in events if e[0] <= window["to"] and e[0] + e[1] >= window["from"]]


_JVM_PAUSE = re.compile(r"^\[(?P<time>[^\]]+)\]\[[^\]]+\] GC\(\d+\) (?P<what>Pause .*?) (?P<ms>[\d.]+)ms$")


def jvm_gc_pauses(path: Path, *, at_least_ms: float = 50.0) -> list[list[Any]]:
    """[wall time, seconds, what] of each pause of a JVM GC log (`-Xlog:gc:...:time,uptime`)."""
    pauses: list[list[Any]] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return pauses
    for line in lines:
        match = _JVM_PAUSE.match(line.strip())
        if match is None or float(match["ms"]) < at_least_ms:
            continue
        when = datetime.strptime(match["time"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        pauses.append([when, round(float(match["ms"]) / 1000.0, 4), match["what"]])
    return pauses


_ROCKS_LINE = re.compile(r"^(?P<time>\d{4}/\d\d/\d\d-\d\d:\d\d:\d\d\.\d+) \S+ (?P<text>.*)$")
_ROCKS_STALL = re.compile(r"Stalling writes|Stopping writes|stall", re.IGNORECASE)


def rocksdb_stalls(directory: Path) -> dict[str, Any]:
    """Write stalls RocksDB reported in the LOG files under `directory`: each stall line as
    `[wall time, 0, text]` (RocksDB writes the process's local time), and each store's last
    cumulative-stall summary."""
    events: list[list[Any]] = []
    cumulative: dict[str, str] = {}
    for log in sorted(directory.rglob("LOG")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "Cumulative stall" in line:
                cumulative[str(log.parent.relative_to(directory))] = line.strip()
                continue
            match = _ROCKS_LINE.match(line)
            if match is None or not _ROCKS_STALL.search(match["text"]) or "Stalls(count)" in line:
                continue
            when = datetime.strptime(match["time"], "%Y/%m/%d-%H:%M:%S.%f").timestamp()
            events.append([when, 0, match["text"][:200]])
    return {"events": events, "cumulative": cumulative}


Sources = dict[str, dict[str, list[list[Any]]]]  # source (a process, a log) → kind → events


def describe(windows: list[dict[str, Any]], sources: Sources) -> list[dict[str, Any]]:
    """Each window with, per source (a process or log) and kind (gc_pauses, lags, ...), its events."""
    described = []
    for window in windows:
        seen = {
            source: {kind: events_in(window, events) for kind, events in kinds.items()}
            for source, kinds in sources.items()
        }
        described.append(
            window
            | {
                "seen": {
                    s: {k: e for k, e in kinds.items() if e}
                    for s, kinds in seen.items()
                    if any(kinds.values())
                }
            }
        )
    return described


#: a window's line names the processes whose CPU peaked at this many cores or more, the busiest first
CPU_LINE_FROM_CORES = 0.2
CPU_LINE_TOP = 3


def summary_line(name: str, window: dict[str, Any]) -> str:
    """One line for a report: the window; per source the longest event of each kind of the stall
    probes and logs; the machine's peak busy / iowait / steal cores and the CPU_LINE_TOP processes
    with the highest peaks (`bench/cpu_probe.py`)."""
    start = datetime.fromtimestamp(window["first_second"], UTC).strftime("%H:%M:%S")
    end = datetime.fromtimestamp(window["last_second"], UTC).strftime("%H:%M:%S UTC")
    parts, peaks = [], []
    for source, kinds in window["seen"].items():
        for kind, events in kinds.items():
            if kind == "cpu":  # [wall, seconds, cores] per second
                peaks.append((max(e[2] for e in events), source))
                continue
            if kind == "machine":  # [wall, seconds, busy, iowait, steal] per second
                continue
            longest = max((e[1] for e in events), default=None)  # seconds
            longest_text = f" (longest {longest:.2f} s)" if longest else ""
            parts.append(f"{source} {kind} x{len(events)}{longest_text}")
    found = "; ".join(parts) or "no stall probe saw anything"
    cpu = []
    machine = window["seen"].get("machine", {}).get("machine")
    if machine:
        cpu.append("machine peak busy {:.2f}, iowait {:.2f}, steal {:.2f} cores".format(
            *(max(e[column] for e in machine) for column in (2, 3, 4))))
    busiest = sorted((p for p in peaks if p[0] >= CPU_LINE_FROM_CORES), reverse=True)[:CPU_LINE_TOP]
    cpu += [f"{source} peak {cores:.2f}" for cores, source in busiest]
    cpu_text = f"; CPU: {', '.join(cpu)}" if cpu else ""
    return (
        f"{name}: arrivals {start}-{end}, {window['late']} of {window['results']} results late "
        f"(largest {window['largest_ms'] / 1000:.1f} s): {found}{cpu_text}"
    )
