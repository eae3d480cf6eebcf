"""Benchmark 1 — ingest throughput and accept latency, against a minimal produce-the-body handler.

Three servers, each its own process on loopback, the same broker:
- `watistream ingest` (the product, default settings, INFO logs to a file as in production);
- the baseline (`bench.baseline_ingest`): raw body → same producer settings → 200 after the ack;
- the null server (`bench.baseline_ingest --null`): 200 without Kafka — the harness ceiling.
The load generator is another process (`bench.loadgen`). Throughput: closed loop, 64 connections,
repeated `scale.repeats` times alternating ingest and baseline (noise hits both alike). Latency:
open loop at 50 % and 90 % of each server's own median throughput.
"""

from __future__ import annotations

import sys
from typing import Any

from services.common.kafka import ensure_topics

from .common import WEBHOOK_TOKEN, BenchEnv, Profiler, ServiceProcess, figure, settings_env, spread

CONCURRENCY = 64


async def run(bench: BenchEnv) -> dict[str, Any]:
    scale = bench.scale
    s_ingest = bench.settings("ingest")
    s_base = bench.settings("baseline")
    s_null = bench.settings("null")
    await ensure_topics(s_ingest)
    await ensure_topics(s_base)
    servers = {
        "ingest": ServiceProcess.watistream(bench, "ingest", s_ingest),
        "baseline": ServiceProcess(
            "baseline",
            [sys.executable, "-m", "bench.baseline_ingest"],
            settings_env(s_base),
            bench.log_path("baseline"),
        ),
        "null": ServiceProcess(
            "null",
            [sys.executable, "-m", "bench.baseline_ingest", "--null"],
            settings_env(s_null),
            bench.log_path("null"),
        ),
    }
    ports = {"ingest": s_ingest.ingest_port, "baseline": s_base.ingest_port, "null": s_null.ingest_port}
    for server in servers.values():
        server.start()
    try:
        for name, server in servers.items():
            await server.wait_ready(f"http://127.0.0.1:{ports[name]}/readyz", timeout=120)
        return await _measure(bench, servers, ports, scale.repeats)
    finally:
        for server in servers.values():
            server.stop()


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/webhooks/wati"


async def _closed(bench: BenchEnv, server: ServiceProcess, port: int, seconds: float) -> dict[str, Any]:
    from .common import run_loadgen

    cpu0 = server.cpu_seconds()
    result = await run_loadgen(
        {
            "url": _url(port),
            "token": WEBHOOK_TOKEN,
            "mode": "closed",
            "concurrency": CONCURRENCY,
            "duration": seconds,
            "warmup": min(1.0, seconds / 4),
            "max_requests": 400_000,
            "customers": 1000,
        }
    )
    cpu = server.cpu_seconds() - cpu0
    answered = sum(result["statuses"].values()) or 1
    result["server_cpu_us_per_request"] = 1e6 * cpu / answered
    result["server_cpu_share"] = cpu / result["elapsed_seconds"]
    return result


async def _open(port: int, rate: float, seconds: float) -> dict[str, Any]:
    from .common import run_loadgen

    return await run_loadgen(
        {
            "url": _url(port),
            "token": WEBHOOK_TOKEN,
            "mode": "open",
            "rate": rate,
            "duration": seconds,
            "warmup": min(1.0, seconds / 5),
            "max_requests": int(rate * seconds) + 1,
            "customers": 1000,
            "connections": CONCURRENCY,
        }
    )


async def _measure(
    bench: BenchEnv, servers: dict[str, ServiceProcess], ports: dict[str, int], repeats: int
) -> dict[str, Any]:
    scale = bench.scale
    runs: dict[str, list[dict[str, Any]]] = {"ingest": [], "baseline": []}
    for _ in range(repeats):
        for name in ("ingest", "baseline"):
            runs[name].append(await _closed(bench, servers[name], ports[name], scale.ingest_closed_seconds))
    null_run = await _closed(bench, servers["null"], ports["null"], scale.ingest_null_seconds)
    rates = {name: spread([r["rate"] for r in rs]) for name, rs in runs.items()}
    non_2xx = {name: sum(_failures(r) for r in rs) for name, rs in runs.items()}
    latency: dict[str, dict[str, Any]] = {}
    p99_runs: dict[str, list[float]] = {"ingest": [], "baseline": []}
    for repeat in range(scale.repeats):  # the 50 % point (the target) repeated, alternating servers
        for name in ("ingest", "baseline"):
            rate = max(1.0, 0.5 * rates[name]["median"])
            run = await _open(ports[name], rate, scale.ingest_open_seconds)
            p99_runs[name].append(run["latency_ms"]["p99"])
            if repeat == 0:
                latency[f"{name}@50%"] = run
    for name in ("ingest", "baseline"):
        latency[f"{name}@50%"]["p99_repeats"] = p99_runs[name]
        latency[f"{name}@90%"] = await _open(
            ports[name], max(1.0, 0.9 * rates[name]["median"]), scale.ingest_open_seconds
        )
    profile_lines = None
    if bench.profile:
        profiler = Profiler(bench, "ingest")
        profiler.start(servers["ingest"].pid, scale.ingest_closed_seconds)
        await _closed(bench, servers["ingest"], ports["ingest"], scale.ingest_closed_seconds)
        profile_lines = profiler.finish()

    ratio = rates["ingest"]["median"] / rates["baseline"]["median"]
    ratios = [a["rate"] / b["rate"] for a, b in zip(runs["ingest"], runs["baseline"], strict=True)]
    p99_50 = spread(p99_runs["ingest"])["median"]
    base_p99_50 = spread(p99_runs["baseline"])["median"]
    figures = [
        figure(
            "webhooks accepted/s (closed loop, 64 conns)",
            rates["ingest"]["median"],
            "msg/s",
            baseline=rates["baseline"]["median"],
            target=">= 0.8x baseline",
            met=ratio >= 0.8,
            note=f"ratio per repeat {', '.join(f'{x:.2f}' for x in ratios)}; "
            f"ingest spread {rates['ingest']['range_pct']:.0f}%",
        ),
        figure(
            "accept latency p50 @50% load",
            latency["ingest@50%"]["latency_ms"]["p50"],
            "ms",
            baseline=latency["baseline@50%"]["latency_ms"]["p50"],
        ),
        figure(
            "accept latency p99 @50% load",
            p99_50,
            "ms",
            baseline=base_p99_50,
            target="<= 20 ms",
            met=p99_50 is not None and p99_50 <= 20.0,
            note=f"median of {len(p99_runs['ingest'])} runs: ingest "
            + ", ".join(f"{v:.0f}" for v in p99_runs["ingest"])
            + " ms; baseline "
            + ", ".join(f"{v:.0f}" for v in p99_runs["baseline"])
            + f" ms; achieved {latency['ingest@50%']['rate']:.0f} and "
            f"{latency['baseline@50%']['rate']:.0f} msg/s",
        ),
        figure(
            "accept latency p50 @90% load",
            latency["ingest@90%"]["latency_ms"]["p50"],
            "ms",
            baseline=latency["baseline@90%"]["latency_ms"]["p50"],
        ),
        figure(
            "accept latency p99 @90% load",
            latency["ingest@90%"]["latency_ms"]["p99"],
            "ms",
            baseline=latency["baseline@90%"]["latency_ms"]["p99"],
            note=f"achieved {latency['ingest@90%']['rate']:.0f} and "
            f"{latency['baseline@90%']['rate']:.0f} msg/s",
        ),
        figure(
            "server CPU per webhook",
            _median([r["server_cpu_us_per_request"] for r in runs["ingest"]]),
            "us",
            baseline=_median([r["server_cpu_us_per_request"] for r in runs["baseline"]]),
        ),
        figure(
            "harness ceiling (null server, no Kafka)",
            null_run["rate"],
            "msg/s",
            note="load generator + aiohttp on this machine; baseline/ceiling "
            f"{rates['baseline']['median'] / null_run['rate']:.2f}",
        ),
    ]
    return {
        "name": "ingest",
        "title": "1. Ingest throughput and accept latency",
        "figures": figures,
        "details": {
            "throughput_runs": runs,
            "null_run": null_run,
            "throughput_spread": rates,
            "latency_runs": latency,
            "non_2xx_or_errors": non_2xx,
            "concurrency": CONCURRENCY,
            "profile_top": profile_lines,
        },
    }


def _failures(result: dict[str, Any]) -> int:
    """Answers that were not 2xx, plus transport errors."""
    bad = sum(n for status, n in result["statuses"].items() if not status.startswith("2"))
    return bad + sum(result["errors"].values())


def _median(values: list[float]) -> float:
    return spread(values)["median"]
