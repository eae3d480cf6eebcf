"""bench/tenants.py's plain parts: how long each configuration warms up, and each part's timeline."""

from __future__ import annotations

from typing import Any

from bench import tenants as bench_tenants


def test_the_full_size_warms_up_for_its_seconds_at_the_full_rate() -> None:
    full = bench_tenants.size_for("full", {})
    assert full.warmup_seconds == 120.0
    assert bench_tenants.warmup_count(full) == 120 * 70  # more than 4 a tenant
    shorter = bench_tenants.size_for("full", {"BENCH_TENANTS_WARMUP_SECONDS": "2.5",
                                              "BENCH_TENANTS_RATE": "40"})
    assert bench_tenants.warmup_count(shorter) == 200  # 4 a tenant is more than 2.5 s x 40 msg/s
    smoke = bench_tenants.size_for("smoke", {})
    assert smoke.warmup_seconds == 0 and bench_tenants.warmup_count(smoke) == bench_tenants.WARMUP_MIN


def test_a_parts_timeline_cuts_its_results_by_seconds_of_arrival() -> None:
    arrivals = [10_000.0, 12_000.0, 39_999.0, 40_000.0, 100_500.0]  # ms; buckets of 30 s from the first
    overheads = [700.0, 500.0, 600.0, 40.0, 30.0]
    assert bench_tenants.timeline(arrivals, overheads) == [
        {"from_s": 0, "n": 3, "p50": 600.0, "p99": 700.0, "max": 700.0},
        {"from_s": 30, "n": 1, "p50": 40.0, "p99": 40.0, "max": 40.0},
        {"from_s": 90, "n": 1, "p50": 30.0, "p99": 30.0, "max": 30.0},
    ]
    assert bench_tenants.timeline([], []) == []
    first = bench_tenants.timeline(arrivals, overheads)
    plays: list[dict[str, Any]] = [{"timeline": first}, {"timeline": []}]
    assert bench_tenants.timeline_lines("tenants", plays) == [
        "tenants part 1 p99 per 30 s (ms): 700, 40, 30", "tenants part 2 p99 per 30 s (ms): "]
