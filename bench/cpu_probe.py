"""Who used the machine's CPU, second by second, during a benchmark.

A tail that no process's loop lag or GC pause explains can still be CPU taken away from the
measured processes: by another process of the run (a RocksDB compaction or the broker's log cleaner
on background threads, the idle configuration's services), by something else on the machine, or by
the hypervisor (steal time). A thread of the bench process reads /proc once a second — the
machine's busy, iowait and steal time (`/proc/stat`) and every process's CPU time
(`/proc/<pid>/stat`, threads included) — and keeps, per second, what each process used. It costs
the bench process ~2 ms of CPU a second (`cpu_seconds` in the snapshot says how much).

Every event is a list `[wall time, seconds, ...]` (the stall probes' shape, so
`bench/stall_report.py` sets them beside a stall window). The parsers and the arithmetic are plain
functions; the thread only reads files.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INTERVAL = 1.0
#: a process's second is kept from this many cores up (an idle process's second is noise)
KEEP_FROM_CORES = 0.05
TICKS = os.sysconf("SC_CLK_TCK")
KEEP_ERRORS = 20


@dataclass(frozen=True)
class MachineTimes:
    """Cumulative CPU time of all cores, in clock ticks (/proc/stat's first line)."""

    busy: int
    iowait: int
    steal: int


def machine_times(proc_stat: str) -> MachineTimes:
    """The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal [guest ...].
    Guest time is already inside user and nice, so it is not added again."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, _idle, iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
            return MachineTimes(user + nice + system + irq + softirq, iowait, steal)
    raise ValueError("no 'cpu' line in /proc/stat")


@dataclass(frozen=True)
class ProcessTimes:
    """One process from its /proc/<pid>/stat: command name, state (`R`, `S`, … `Z` a zombie), CPU
    ticks used (user + system, all its threads) and its start (ticks after boot: with the pid, who
    it is — pids are reused)."""

    command: str
    state: str
    ticks: int
    started: int

    @property
    def cpu_seconds(self) -> float:
        return self.ticks / TICKS


def process_times(pid_stat: str) -> ProcessTimes:
    """Parses a /proc/<pid>/stat. The name is in parentheses and may itself hold spaces or
    parentheses, so the fields are counted from its last ')'."""
    command = pid_stat[pid_stat.index("(") + 1 : pid_stat.rindex(")")]
    after = pid_stat[pid_stat.rindex(")") + 2 :].split()
    # after the name: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19)
    return ProcessTimes(command, after[0], int(after[11]) + int(after[12]), int(after[19]))


def label_of(command: str, cmdline: list[str]) -> str:
    """A readable name for a process nobody named: `python -m bench.loadgen` → `bench.loadgen`,
    a JVM running Kafka → `kafka`, else its command name."""
    if command.startswith("python") and "-m" in cmdline[:-1]:
        return cmdline[cmdline.index("-m") + 1]
    if command == "java" and any("kafka" in arg.lower() for arg in cmdline):
        return "kafka"
    return command


@dataclass(frozen=True)
class Sample:
    """CPU times at one moment: the machine's (None if unreadable), seconds since boot, and each
    process's (pid, start) → (name, ticks)."""

    wall: float
    uptime: float
    machine: MachineTimes | None
    processes: dict[tuple[int, int], tuple[str, int]]


def usage(previous: Sample, current: Sample) -> tuple[list[Any] | None, dict[str, list[Any]]]:
    """What was used between two samples, as events `[wall, seconds, ...]`: the machine's
    `[.., busy, iowait, steal]` cores, and per name `[.., cores]` (from KEEP_FROM_CORES up) — each
    process's own difference, summed by name. A process that started in between counts all its
    time; one that ended in between is lost for that second (its last ticks cannot be read); one
    seen now but not before although older (a read that failed) is left out."""
    wall, seconds = previous.wall, current.uptime - previous.uptime
    if seconds <= 0:
        return None, {}

    def cores(ticks: float) -> float:
        return round(ticks / TICKS / seconds, 3)

    machine = None
    if previous.machine is not None and current.machine is not None:
        before, after = previous.machine, current.machine
        machine = [wall, round(seconds, 3), cores(after.busy - before.busy),
                   cores(after.iowait - before.iowait), cores(after.steal - before.steal)]
    used: dict[str, int] = {}
    for key, (name, ticks) in current.processes.items():
        if key in previous.processes:
            ticks -= previous.processes[key][1]
        elif key[1] / TICKS < previous.uptime:  # older than the previous sample, yet not in it
            continue
        used[name] = used.get(name, 0) + ticks
    by_name = {name: [wall, round(seconds, 3), cores(ticks)] for name, ticks in used.items()
               if ticks / TICKS / seconds >= KEEP_FROM_CORES}
    return machine, by_name


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # the process ended between the listing and the read
        return None


class CpuProbe:
    """Samples /proc every `interval` on its own thread (`start`, `stop`). `names` gives the
    run's own processes their names (pid → name, asked each second: services start and stop);
    any other process is named by `label_of`. `machine`: [wall, seconds, busy cores, iowait
    cores, steal cores] per interval; `by_process`: name → [wall, seconds, cores] per interval."""

    def __init__(
        self, names: Callable[[], dict[int, str]] | None = None, *, interval: float = INTERVAL,
        proc: str = "/proc",
    ) -> None:
        self.names = names or dict
        self.interval = interval
        self.proc = proc
        self.machine: list[list[Any]] = []
        self.by_process: dict[str, list[list[Any]]] = {}
        self.errors: list[str] = []  # the first KEEP_ERRORS failures of a sample, the probe going on
        self.cpu_seconds = 0.0  # the probe thread's own CPU
        self._labels: dict[tuple[int, int], str] = {}  # (pid, start) → label, read once
        self._lock = threading.Lock()  # `snapshot` copies while the thread adds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-probe", daemon=True)

    def start(self) -> CpuProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        """One sample per interval; a sample that fails is noted and the next is compared with the
        last good one (a longer interval), so the probe outlives anything /proc or `names` does."""
        previous: Sample | None = None
        while True:
            try:
                current = self._sample()
                if previous is not None:
                    self._add(previous, current)
                previous = current
            except Exception:  # a diagnostic must not end the run it watches
                if len(self.errors) < KEEP_ERRORS:
                    self.errors.append(traceback.format_exc(limit=3)[-500:])
            self.cpu_seconds = time.thread_time()
            if self._stopped.wait(self.interval):
                return

    def _sample(self) -> Sample:
        wall = time.time()
        uptime_text = _read(f"{self.proc}/uptime")
        if uptime_text is None:
            raise OSError(f"{self.proc}/uptime cannot be read")
        machine_text = _read(f"{self.proc}/stat")
        named = self.names()
        processes: dict[tuple[int, int], tuple[str, int]] = {}
        for entry in os.scandir(self.proc):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            text = _read(f"{self.proc}/{pid}/stat")
            try:
                times = process_times(text) if text else None
            except (ValueError, IndexError):  # one odd line costs that process's second only
                times = None
            if times is None:
                continue
            key = (pid, times.started)
            processes[key] = (named.get(pid) or self._label(key, times.command), times.ticks)
        return Sample(wall, float(uptime_text.split()[0]),
                      machine_times(machine_text) if machine_text else None, processes)

    def _label(self, key: tuple[int, int], command: str) -> str:
        label = self._labels.get(key)
        if label is None:
            cmdline = (_read(f"{self.proc}/{key[0]}/cmdline") or "").split("\0")
            label = self._labels[key] = label_of(command, [a for a in cmdline if a])
        return label

    def _add(self, previous: Sample, current: Sample) -> None:
        machine, by_name = usage(previous, current)
        with self._lock:
            if machine is not None:
                self.machine.append(machine)
            for name, event in by_name.items():
                self.by_process.setdefault(name, []).append(event)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"machine": list(self.machine),
                    "by_process": {name: list(events) for name, events in self.by_process.items()},
                    "errors": list(self.errors), "cpu_seconds": round(self.cpu_seconds, 3)}


def _overlap(event: list[Any], start: float, end: float) -> float:
    return max(0.0, min(end, event[0] + event[1]) - max(start, event[0]))


def mean_cores(events: list[list[Any]], start: float, end: float, column: int = 2) -> float:
    """Mean cores of `column` over [start, end), each event weighed by the part of it inside the
    span; time no event covers counts as 0 (a process's seconds under KEEP_FROM_CORES)."""
    if end <= start:
        return 0.0
    return round(sum(e[column] * _overlap(e, start, end) for e in events) / (end - start), 3)


def span_summary(snapshot: dict[str, Any], start: float, end: float, *, top: int = 8) -> dict[str, Any]:
    """What the machine and its busiest processes used, on average, from `start` to `end` (wall):
    the machine's busy / iowait / steal cores (over the seconds it was sampled) and the `top`
    processes' cores."""
    machine = snapshot["machine"]
    covered = sum(_overlap(e, start, end) for e in machine)
    processes = {name: mean_cores(events, start, end) for name, events in snapshot["by_process"].items()}
    busiest = sorted(((c, n) for n, c in processes.items() if c > 0), reverse=True)[:top]
    return {
        "machine": {
            what: round(sum(e[column] * _overlap(e, start, end) for e in machine) / covered, 3)
            if covered else 0.0
            for what, column in (("busy", 2), ("iowait", 3), ("steal", 4))
        },
        "processes": {name: cores for cores, name in busiest},
    }
