"""The tenants benchmark's stall probe and report: a stall is seen, timed and set beside its cause."""

from __future__ import annotations

import asyncio
import gc
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import stall_report
from bench.gcprobe import stalls


def _block_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # the stall under test: the loop's thread busy, no await


def test_the_probe_times_a_blocked_loop_and_samples_what_blocked_it(tmp_path: Path) -> None:
    async def main() -> stalls.Probe:
        probe = stalls.install(str(tmp_path / "probe.json"), asyncio.get_running_loop())
        await asyncio.sleep(0.2)  # a heartbeat or two answered on time first
        before = time.time()
        _block_the_loop_for(0.8)
        await asyncio.sleep(0.3)  # the overdue heartbeat is answered, the watchdog records it
        probe.stop()
        assert probe.lags, "the blocked loop was not seen late"
        posted, late, samples = probe.lags[-1]
        assert before - 0.2 <= posted <= before + 0.1
        assert 0.6 <= late <= 1.5
        assert samples >= 1
        return probe

    probe = asyncio.run(main())
    assert any("_block_the_loop_for" in stack for stack in probe.stacks)


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


def test_late_seconds_close_together_are_one_window_and_far_apart_two() -> None:
    by_second = {
        100: [10, 0, 80.0],
        101: [10, 3, 2_500.0],
        102: [10, 0, 90.0],
        103: [10, 5, 4_000.0],  # one second of on-time results between: the same stall
        104: [10, 0, 70.0],
        110: [10, 1, 1_600.0],  # six seconds on: another
    }
    windows = stall_report.stall_windows(by_second)
    assert [(w["first_second"], w["last_second"], w["late"]) for w in windows] == [
        (101, 103, 8),
        (110, 110, 1),
    ]
    assert windows[0]["results"] == 30
    assert windows[0]["largest_ms"] == 4_000.0
    assert windows[0]["from"] == 101 - stall_report.LEAD_SECONDS
    assert windows[0]["to"] == 104 + 4.0  # the last late arrival's second, plus its lateness


def test_no_late_result_is_no_window() -> None:
    assert stall_report.stall_windows({5: [10, 0, 900.0]}) == []


def test_each_source_s_events_inside_a_window_are_set_beside_it() -> None:
    window = stall_report.stall_windows({200: [5, 2, 3_000.0]})[0]  # spans 198 .. 204
    sources = {
        "context": {"lags": [[197.0, 0.5, 0], [199.5, 3.1, 12]], "gc_pauses": []},
        "broker": {"gc_pauses": [[205.0, 0.2, "Pause Young"]]},
    }
    described = stall_report.describe([window], sources)[0]
    assert described["seen"] == {"context": {"lags": [[199.5, 3.1, 12]]}}
    line = stall_report.summary_line("tenants", described)
    assert "2 of 5 results late" in line and "context lags x1 (longest 3.10 s)" in line


def test_a_jvm_gc_log_s_pauses_are_read_with_their_wall_time(tmp_path: Path) -> None:
    log = tmp_path / "gc.log"
    log.write_text(
        "[2026-12-06T20:28:07.045+0000][0.006s] Using Serial\n"
        "[2026-12-06T20:28:07.608+0000][0.569s] GC(0) Pause Young (Allocation Failure) "
        "8M->2M(30M) 12.280ms\n"
        "[2026-12-06T20:29:00.500+0000][53.4s] GC(7) Pause Full (Allocation Failure) "
        "500M->200M(512M) 2300.5ms\n"
    )
    pauses = stall_report.jvm_gc_pauses(log)
    assert pauses == [
        [
            datetime(2026, 12, 6, 20, 29, 0, 500_000, tzinfo=UTC).timestamp(),
            2.3005,
            "Pause Full (Allocation Failure) 500M->200M(512M)",
        ]
    ]
    assert len(stall_report.jvm_gc_pauses(log, at_least_ms=0)) == 2
    assert stall_report.jvm_gc_pauses(tmp_path / "absent.log") == []


def test_rocksdb_write_stalls_and_the_cumulative_summary_are_read_from_its_logs(tmp_path: Path) -> None:
    store = tmp_path / "tables" / "customers-3.db"
    store.mkdir(parents=True)
    (store / "LOG").write_text(
        "2026/12/06-20:30:01.000001 7f00 [db/db_impl.cc:1000] Flushing memtable\n"
        "2026/12/06-20:30:02.250000 7f00 [WARN] [db/column_family.cc:900] [default] Stalling writes "
        "because we have 4 immutable memtables (waiting for flush)\n"
        "Cumulative stall: 00:00:1.250 H:M:S, 2.1 percent\n"
    )
    found = stall_report.rocksdb_stalls(tmp_path)
    assert len(found["events"]) == 1
    assert found["events"][0][0] == datetime(2026, 12, 6, 20, 30, 2, 250_000).timestamp()
    assert "Stalling writes" in found["events"][0][1]
    assert found["cumulative"] == ["customers-3.db: Cumulative stall: 00:00:1.250 H:M:S, 2.1 percent"]
