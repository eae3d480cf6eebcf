"""The tenants benchmark's stall probe and report: a stall is seen, timed and set beside its cause."""

from __future__ import annotations

import asyncio
import gc
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import stall_report
from bench.gcprobe import stalls

from .waiting import until


def _block_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # the stall under test: the loop's thread busy, no await


def test_the_probe_times_a_blocked_loop_and_samples_what_blocked_it(tmp_path: Path) -> None:
    async def main() -> stalls.Probe:
        probe = stalls.install(str(tmp_path / "probe.json"), asyncio.get_running_loop())
        before = time.time()
        _block_the_loop_for(0.8)
        await until(lambda: probe.lags, timeout=5, what="the watchdog records the late heartbeat")
        probe.stop()
        posted, late, samples = probe.lags[-1]
        assert before <= posted <= before + 0.3  # its first heartbeat, posted during the block
        assert 0.45 <= late <= 1.5
        assert samples >= 1
        return probe

    probe = asyncio.run(main())
    assert any(stack.startswith("test_bench_stalls.py") and "_block_the_loop_for" in stack
               for stack in probe.stacks)  # innermost frame first


def test_without_a_loop_given_the_probe_watches_the_one_that_runs_and_not_the_gaps_between(
    tmp_path: Path,
) -> None:
    original = asyncio.events._set_running_loop
    probe = stalls.install(str(tmp_path / "probe.json"))
    try:
        async def started() -> None:
            assert probe.loop is asyncio.get_running_loop()

        asyncio.run(started())  # a start-up step; then no loop runs for a while
        time.sleep(0.6)  # the gap a service's start-up leaves between its steps: no loop, no stall

        async def serving() -> None:
            assert probe.loop is asyncio.get_running_loop()  # the first one closed: this one now
            await asyncio.sleep(0.3)  # heartbeats answered on time
            _block_the_loop_for(0.6)
            await until(lambda: probe.lags, timeout=5, what='a late heartbeat recorded')

        asyncio.run(serving())
    finally:
        probe.stop()
    assert asyncio.events._set_running_loop is original  # stop() put the lookup back
    assert len(probe.lags) == 1 and probe.lags[0][1] >= 0.45  # the block; the gap was not counted


def test_the_probe_records_a_long_gc_with_its_time(tmp_path: Path) -> None:
    probe = stalls.Probe(str(tmp_path / "probe.json"))
    gc.callbacks.append(probe.on_gc)
    try:
        garbage = [[i] for i in range(300_000)]
        for item in garbage:
            item.append(item)  # cycles: the collection has them all to walk
        del garbage, item
        before = time.time()
        stalls.LONG_GC, long_gc = 0.0, stalls.LONG_GC
        try:
            gc.collect()
        finally:
            stalls.LONG_GC = long_gc
    finally:
        gc.callbacks.remove(probe.on_gc)
    assert probe.gc_pauses, "the collection was not recorded"
    started, seconds, generation, collected = probe.gc_pauses[-1]
    assert generation == 2
    assert collected >= 300_000
    assert before - 0.05 <= started <= time.time()
    assert seconds > 0


def test_a_short_collection_is_not_kept(tmp_path: Path) -> None:
    probe = stalls.Probe(str(tmp_path / "probe.json"))
    gc.callbacks.append(probe.on_gc)
    try:
        gc.collect(0)  # the youngest generation: microseconds, under LONG_GC
    finally:
        gc.callbacks.remove(probe.on_gc)
    assert probe.gc_pauses == []


def _seconds(**by: tuple[int, int, float]) -> dict[int, stall_report.Second]:
    return {int(k[1:]): stall_report.Second(*v) for k, v in by.items()}


def test_late_seconds_close_together_are_one_window_and_far_apart_two() -> None:
    by_second = _seconds(
        s100=(10, 0, 80.0),
        s101=(10, 3, 2_500.0),
        s102=(10, 0, 90.0),
        s103=(10, 5, 4_000.0),  # one second of on-time results between: the same stall
        s104=(10, 0, 70.0),
        s110=(10, 1, 1_600.0),  # six seconds on: another
    )
    windows = stall_report.stall_windows(by_second, tail_seconds=1.0)
    assert [(w["first_second"], w["last_second"], w["late"]) for w in windows] == [
        (101, 103, 8),
        (110, 110, 1),
    ]
    assert windows[0]["results"] == 30
    assert windows[0]["largest_ms"] == 4_000.0
    assert windows[0]["from"] == 101 - stall_report.LEAD_SECONDS
    # the last late arrival's second, the quiet window the pipeline waits by design, the lateness
    assert windows[0]["to"] == 104 + 1.0 + 4.0


def test_a_second_counts_its_results_and_the_late_ones() -> None:
    second = stall_report.Second()
    for overhead_ms in (80.0, 1_600.0, 1_500.0, 3_000.0):
        second.add(overhead_ms, late_ms=1_500.0)
    assert second == stall_report.Second(results=4, late=2, largest_ms=3_000.0)


def test_no_late_result_is_no_window() -> None:
    assert stall_report.stall_windows(_seconds(s5=(10, 0, 900.0))) == []


def test_each_source_s_events_overlapping_a_window_are_set_beside_it() -> None:
    window = stall_report.stall_windows(_seconds(s200=(5, 2, 3_000.0)))[0]  # spans 198 .. 204
    sources = {
        "context": {"lags": [[197.0, 0.5, 0], [199.5, 3.1, 12]], "gc_pauses": []},
        "bench": {"gc_pauses": [[196.5, 1.8, 2, 10_000]]},  # began before the span, ran into it
        "broker": {"gc_pauses": [[205.0, 0.2, "Pause Young"]]},  # after it
    }
    described = stall_report.describe([window], sources)[0]
    assert described["seen"] == {
        "context": {"lags": [[199.5, 3.1, 12]]},
        "bench": {"gc_pauses": [[196.5, 1.8, 2, 10_000]]},
    }
    line = stall_report.summary_line("tenants", described)
    assert "2 of 5 results late" in line and "context lags x1 (longest 3.10 s)" in line
    assert "00:03:20 UTC" in line  # second 200 of the epoch, in UTC whatever the machine's zone


def test_a_jvm_gc_log_s_pauses_are_read_with_their_wall_time(tmp_path: Path) -> None:
    log = tmp_path / "gc.log"
    log.write_text(
        "[2026-12-06T20:28:07.045+0000][0.006s] Using Serial\n"
        "[2026-12-06T20:28:07.608+0000][0.569s] GC(0) Pause Young (Allocation Failure) "
        "8M->2M(30M) 12.280ms\n"
        "[2026-12-06T20:29:00.500+0000][53.4s] GC(7) Pause Full (Allocation Failure) "
        "500M->200M(512M) 2300.5ms\n"
        "[2026-12-06T22:29:01.000+0200][54.4s] GC(8) Pause Young (Allocation Failure) "
        "300M->200M(512M) 60.0ms\n"
    )
    pauses = stall_report.jvm_gc_pauses(log)
    assert pauses == [
        [
            datetime(2026, 12, 6, 20, 29, 0, 500_000, tzinfo=UTC).timestamp(),
            2.3005,
            "Pause Full (Allocation Failure) 500M->200M(512M)",
        ],
        [  # 22:29:01 at +02:00 is 20:29:01 UTC
            datetime(2026, 12, 6, 20, 29, 1, tzinfo=UTC).timestamp(),
            0.06,
            "Pause Young (Allocation Failure) 300M->200M(512M)",
        ],
    ]
    assert len(stall_report.jvm_gc_pauses(log, at_least_ms=0)) == 3
    assert stall_report.jvm_gc_pauses(tmp_path / "absent.log") == []


def test_rocksdb_write_stalls_and_each_store_s_last_summary_are_read_from_its_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Europe/Madrid")  # RocksDB writes the process's local time: UTC+1 here
    time.tzset()
    try:
        for partition in (3, 4):
            store = tmp_path / "tables" / f"customers-{partition}.db"
            store.mkdir(parents=True)
            stall = (
                "2026/12/06-21:30:02.250000 7f00 [WARN] [db/column_family.cc:900] [default] Stalling "
                "writes because we have 4 immutable memtables (waiting for flush)\n"
            )
            (store / "LOG").write_text(
                "2026/12/06-20:30:01.000001 7f00 [db/db_impl.cc:1000] Flushing memtable\n"
                + (stall if partition == 3 else "")
                + "Cumulative stall: 00:00:0.000 H:M:S, 0.0 percent\n"
                + f"Cumulative stall: 00:00:1.25{partition} H:M:S, 2.1 percent\n"
            )
        found = stall_report.rocksdb_stalls(tmp_path)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    [event] = found["events"]
    assert event[0] == datetime(2026, 12, 6, 20, 30, 2, 250_000, tzinfo=UTC).timestamp()
    assert event[1] == 0 and "Stalling writes" in event[2]
    assert found["cumulative"] == {
        "tables/customers-3.db": "Cumulative stall: 00:00:1.253 H:M:S, 2.1 percent",
        "tables/customers-4.db": "Cumulative stall: 00:00:1.254 H:M:S, 2.1 percent",
    }
