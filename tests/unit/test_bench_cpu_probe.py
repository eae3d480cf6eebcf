"""bench/cpu_probe.py: the CPU the machine and each process used, second by second, and how a
stall window and a benchmark's part report it (bench/stall_report.py, bench/tenants.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from bench import cpu_probe, stall_report
from bench.cpu_probe import (
    CpuProbe,
    MachineTimes,
    ProcessTimes,
    Sample,
    label_of,
    machine_times,
    process_times,
    usage,
)
from bench.tenants import cpu_lines

from .waiting import until

T = cpu_probe.TICKS

PROC_STAT = """cpu  1000 50 200 5000 30 0 20 7 40 0
cpu0 500 25 100 2500 15 0 10 3 20 0
intr 12345
"""


def test_machine_times_read_the_cpu_line_without_counting_guest_time_twice() -> None:
    # user 1000 + nice 50 + system 200 + irq 0 + softirq 20 = 1270 busy; guest 40 is inside user
    assert machine_times(PROC_STAT) == MachineTimes(busy=1270, iowait=30, steal=7)
    with pytest.raises(ValueError):
        machine_times("intr 1\n")


@pytest.mark.parametrize("name", ["python", "tmux: server", "a) b", "(sd-pam)"])
def test_process_times_count_fields_after_the_last_parenthesis_of_the_name(name: str) -> None:
    rest = "S 1 2 3 4 5 6 7 8 9 10 120 30 0 0 20 0 4 0 98765 200 300"
    assert process_times(f"4242 ({name}) {rest}") == ProcessTimes(name, state="S", ticks=150, started=98765)


def test_unnamed_processes_are_labelled_by_module_or_kafka_or_command() -> None:
    assert label_of("python", ["/venv/bin/python", "-m", "bench.loadgen"]) == "bench.loadgen"
    assert label_of("python3.11", ["python3.11", "-m", "services.cli", "context"]) == "services.cli"
    assert label_of("java", ["java", "-Xmx1G", "-cp", "/x/kafka_2.13.jar", "kafka.Kafka"]) == "kafka"
    assert label_of("java", ["java", "-jar", "app.jar"]) == "java"
    assert label_of("sort", ["sort", "-m", "a", "b"]) == "sort"  # -m of another program
    assert label_of("sshd", []) == "sshd"
    assert label_of("python", ["python", "-m"]) == "python"  # no module after -m


def test_usage_is_cores_per_second_of_each_process_summed_by_name() -> None:
    before = Sample(1000.0, 100.0, MachineTimes(0, 0, 0), {
        (10, 1): ("context", 10 * T), (11, 1): ("broker", 0), (12, 1): ("idle", 5 * T),
        (20, 1): ("loadgen", 4 * T), (21, 1): ("loadgen", T)})
    after = Sample(1002.0, 102.0, MachineTimes(busy=3 * T, iowait=T // 2, steal=T), {
        (10, 1): ("context", 11 * T + T // 2), (11, 1): ("broker", T), (12, 1): ("idle", 5 * T),
        (20, 1): ("loadgen", 5 * T),  # (21, 1) ended in between: its last second is lost, not the other's
        (30, int(101.5 * T)): ("newcomer", T // 2)})  # started in between: all its time is this span's
    machine, by_name = usage(before, after)
    assert machine == [1000.0, 2.0, 1.5, 0.25, 0.5]
    assert by_name == {
        "context": [1000.0, 2.0, 0.75],
        "broker": [1000.0, 2.0, 0.5],
        "loadgen": [1000.0, 2.0, 0.5],
        "newcomer": [1000.0, 2.0, 0.25],
    }  # "idle" used nothing: not kept


def test_usage_is_per_process_so_renames_and_reused_pids_do_not_count_a_lifetime() -> None:
    before = Sample(0.0, 100.0, None, {(10, 1): ("tenants.context", 500 * T), (11, 1): ("old", 800 * T)})
    after = Sample(1.0, 101.0, None, {
        (10, 1): ("tenants-context", 500 * T + T // 2),  # named by the bench since: its own second only
        (11, int(100.5 * T)): ("reused", T // 4),  # pid 11 again, a new process: its time only
        (12, 1): ("unseen", 900 * T)})  # older than the previous sample yet not in it (a failed read)
    assert usage(before, after) == (None, {"tenants-context": [0.0, 1.0, 0.5], "reused": [0.0, 1.0, 0.25]})


def test_usage_keeps_no_tiny_figures_and_needs_time_to_pass() -> None:
    tiny = max(1, int(cpu_probe.KEEP_FROM_CORES * T) - 1)  # just under the threshold in 1 s
    before = Sample(0.0, 100.0, None, {(10, 1): ("tiny", 0)})
    after = Sample(1.0, 101.0, None, {(10, 1): ("tiny", tiny)})
    assert usage(before, after) == (None, {})
    assert usage(after, after) == (None, {})  # no time passed


def test_the_probe_sees_a_busy_child_by_the_name_it_was_given() -> None:
    spin = "import time\nend = time.time() + 5\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    probe = CpuProbe(lambda: {busy.pid: "spinner"}, interval=0.2).start()
    try:
        asyncio.run(until(lambda: len(probe.snapshot()["by_process"].get("spinner", [])) >= 3,
                          timeout=20.0, what="three samples of the spinning child"))
    finally:
        busy.kill()
        busy.wait()
        probe.stop()
    snapshot = probe.snapshot()
    spinner = snapshot["by_process"]["spinner"]
    assert max(event[2] for event in spinner) >= 0.3  # a spinning process is on a core most of the time
    assert all(event[1] > 0 for event in spinner)
    assert snapshot["machine"] and max(event[2] for event in snapshot["machine"]) >= 0.3
    assert snapshot["errors"] == [] and snapshot["cpu_seconds"] > 0
    assert not probe._thread.is_alive()


def test_the_probe_outlives_a_failing_sample_and_notes_it() -> None:
    calls = []

    def names() -> dict[int, str]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("a bench's names broke once")
        return {}

    probe = CpuProbe(names, interval=0.05).start()
    try:
        asyncio.run(until(lambda: len(probe.snapshot()["machine"]) >= 2, timeout=20.0,
                          what="two intervals measured around the failed sample"))
    finally:
        probe.stop()
    snapshot = probe.snapshot()
    assert len(snapshot["errors"]) == 1 and "a bench's names broke once" in snapshot["errors"][0]
    assert any(event[1] >= 0.09 for event in snapshot["machine"])  # the failed sample's interval joined


def test_span_summary_weighs_each_interval_by_its_part_inside_the_span() -> None:
    snapshot = {
        "machine": [
            [99.5, 1.0, 2.0, 0.0, 0.0],  # half inside
            [100.5, 2.0, 1.0, 0.2, 0.0],  # a 2 s interval; then 102.5-103.5 unsampled (a failed sample)
            [103.5, 1.0, 0.0, 0.0, 1.0],  # half inside
            [200.0, 1.0, 2.0, 0.0, 0.0],
        ],
        "by_process": {
            "tenants-context": [[99.5, 1.0, 1.0], [100.5, 2.0, 0.5]],
            "broker": [[103.5, 1.0, 0.8]],
            "single-context": [[150.0, 1.0, 1.0]],  # outside the span
        },
    }
    summary = cpu_probe.span_summary(snapshot, 100.0, 104.0)
    # the machine over the 3 s it was sampled: busy (2 x 0.5 + 1 x 2) / 3, iowait 0.4 / 3, steal 0.5 / 3
    assert summary["machine"] == {"busy": 1.0, "iowait": 0.133, "steal": 0.167}
    # a process over the whole span (its unkept seconds idle): (0.5 + 1.0) / 4 and 0.4 / 4
    assert list(summary["processes"].items()) == [("tenants-context", 0.375), ("broker", 0.1)]
    empty = cpu_probe.span_summary(snapshot, 5.0, 5.0)
    assert empty["processes"] == {} and empty["machine"] == {"busy": 0.0, "iowait": 0.0, "steal": 0.0}


def test_a_stall_window_names_the_machine_and_the_processes_with_the_highest_cpu_peaks() -> None:
    windows = stall_report.stall_windows({100: _late_second()}, tail_seconds=1.0)
    sources: stall_report.Sources = {
        "single-context": {"cpu": [[99.0, 1.0, 0.3], [100.0, 1.0, 0.95]], "lags": []},
        "broker": {"cpu": [[100.0, 1.0, 0.5]], "gc_pauses": []},
        "bench": {"cpu": [[100.0, 1.0, 0.25]]},
        "tenants-context": {"cpu": [[100.0, 1.0, 0.21]]},  # fourth: not named
        "bench.loadgen": {"cpu": [[100.0, 1.0, 0.1]]},  # under CPU_LINE_FROM_CORES
        "machine": {"machine": [[100.0, 1.0, 1.9, 0.05, 0.4]]},
        "kafka": {"cpu": [[500.0, 1.0, 2.0]]},  # long after the window
    }
    [window] = stall_report.describe(windows, sources)
    assert "kafka" not in window["seen"] and "single-context" in window["seen"]
    line = stall_report.summary_line("single", window)
    assert line.endswith(
        "no stall probe saw anything; CPU: machine peak busy 1.90, iowait 0.05, steal 0.40 cores, "
        "single-context peak 0.95, broker peak 0.50, bench peak 0.25"
    )
    sources["single-context"]["lags"] = [[100.5, 0.4, 3]]
    [window] = stall_report.describe(windows, sources)
    assert "): single-context lags x1 (longest 0.40 s); CPU: " in stall_report.summary_line("single", window)


def _late_second() -> stall_report.Second:
    second = stall_report.Second()
    second.add(2500.0, 1500.0)
    return second


def test_each_measured_part_gets_one_cpu_line() -> None:
    part = {"machine": {"busy": 1.62, "iowait": 0.01, "steal": 0.0},
            "processes": {"tenants-context": 0.81, "broker": 0.33, "bench": 0.2, "tenants-ingest": 0.1,
                          "single-context": 0.02}}
    lines = cpu_lines({"tenants": [part], "single": []})
    assert lines == [
        "tenants part 1 CPU (mean cores): machine busy 1.62, iowait 0.01, steal 0.00; "
        "tenants-context 0.81, broker 0.33, bench 0.20, tenants-ingest 0.10"
    ]


def test_a_probe_stopped_at_once_leaves_no_thread() -> None:
    started = time.monotonic()
    probe = CpuProbe(interval=10.0).start()
    probe.stop()
    assert not probe._thread.is_alive() and time.monotonic() - started < 5.0

