"""Benchmark 6 — the price of reading WATI's history for every batch (issue "Exact context").

The same seeded day as the cost benchmark (ingest, context and responder as real processes, WATI
and OpenAI stand-ins in the bench process, compressed clock) is played twice on the same run's
broker: first with `MISSED_HISTORY=gap` (the rule before: history only after a gap, on first
contact and after a hold — the baseline), then with `MISSED_HISTORY=every_batch` (the default now).
The WATI stand-in answers every call after `WATI_LATENCY_SECONDS` (an assumed round trip; the real
one depends on the tenant), so what a fetch adds to an answer is visible.

Measured: getMessages calls per batch (the stand-in's requests / bursts sent), and the answer
latency — from a burst's last message to the bot's first send to that customer after it (the
stand-in's send records), which includes the quiet window and the OpenAI stand-in's time.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import aiohttp

from services.common.kafka import ensure_topics
from services.standins import StandIns

from . import cost
from .common import WEBHOOK_TOKEN, BenchEnv, ServiceProcess, figure
from .loadgen import wa_id_of

WATI_LATENCY_SECONDS = 0.25
#: The gap mode requires the reconciliation sweep (a blind spot otherwise); so long an interval
#: that it never runs during the day keeps the baseline the rule as it was (no sweep).
NEVER_SECONDS = 10**9


async def _play(bench: BenchEnv, mode: str) -> dict[str, Any]:
    """One day with MISSED_HISTORY=`mode`: getMessages calls, bursts, answer latencies."""
    scale = bench.scale
    gap_seconds = scale.cost_gap_seconds
    rng = random.Random(20251004)  # the same traffic in both modes
    day = cost.Day()
    async with StandIns.running() as standins:
        standins.wati.latency = WATI_LATENCY_SECONDS
        settings = bench.settings(
            f"history-{mode}",
            quiet_window_seconds=cost.QUIET,
            flush_scan_interval_seconds=0.25,
            missed_gap_seconds=gap_seconds,
            human_hold_seconds=cost.HOLD,
            max_batch_wait_seconds=30.0,
            missed_history=mode,
            reconcile_interval_seconds=float(NEVER_SECONDS) if mode == "gap" else 0.0,
            wati_api_url=standins.wati_url,
            wati_api_token=standins.wati.token,
            openai_base_url=standins.openai_url,
            openai_api_key=standins.openai.api_key,
        )
        await ensure_topics(settings)
        services = [ServiceProcess.watistream(bench, name, settings, tag=f"-history-{mode}")
                    for name in ("ingest", "context", "responder")]
        for service in services:
            service.start()
        try:
            ports = {"ingest": settings.ingest_port, "context": settings.context_web_port,
                     "responder": settings.responder_web_port}
            for service in services:
                name = service.name.removesuffix(f"-history-{mode}")
                await service.wait_ready(f"http://127.0.0.1:{ports[name]}/readyz")
            started = time.monotonic()
            url = f"http://127.0.0.1:{settings.ingest_port}/webhooks/wati"
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"}) as session:
                await asyncio.gather(*(
                    cost._customer(c, random.Random(rng.random()), standins, session, url, day,
                                   rng.uniform(0, 2.0), gap_seconds, scale.cost_max_sessions)
                    for c in range(scale.cost_customers)
                ))
            day_seconds = time.monotonic() - started
        finally:
            for service in services:
                service.stop()
        getmessages = sum(1 for r in standins.wati.requests if "/getMessages/" in r.path)
        sends = list(standins.wati.sent)
    latencies: list[float] = []
    short_gap: list[float] = []  # the bursts the gap rule answered without reading the history
    for burst in day.bursts:  # the customer waits for the answer before the next burst
        wa_id = wa_id_of(burst.customer)
        after = [s.at for s in sends if s.contact_id == wa_id and s.at > burst.last_at]
        if after:
            latency = (min(after) - burst.last_at).total_seconds()
            latencies.append(latency)
            if burst.gap_seconds is not None and burst.gap_seconds <= gap_seconds:
                short_gap.append(latency)
    return {"bursts": len(day.bursts), "answered": sum(1 for b in day.bursts if b.answered),
            "getmessages": getmessages, "latencies": latencies, "short_gap_latencies": short_gap,
            "day_seconds": day_seconds}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    return {k: v for k, v in result.items() if not k.endswith("latencies")} | {
        "latency_mean": mean(result["latencies"]),
        "short_gap_latency_mean": mean(result["short_gap_latencies"]),
        "short_gap_bursts": len(result["short_gap_latencies"])}


async def run(bench: BenchEnv) -> dict[str, Any]:
    before = await _play(bench, "gap")
    after = await _play(bench, "every_batch")

    def per_batch(result: dict[str, Any]) -> float | None:
        return result["getmessages"] / result["bursts"] if result["bursts"] else None

    figures = [
        figure("getMessages calls per batch", per_batch(after), "", baseline=per_batch(before),
               note=f"every_batch {after['getmessages']} calls / {after['bursts']} bursts; gap mode "
               f"{before['getmessages']} / {before['bursts']}"),
        figure("answer latency after a burst, p50", _quantile(after["latencies"], 0.5), "s",
               baseline=_quantile(before["latencies"], 0.5),
               note=f"incl. the {cost.QUIET:.0f} s quiet window; WATI stand-in latency "
               f"{WATI_LATENCY_SECONDS} s per call"),
        figure("answer latency after a burst, p95", _quantile(after["latencies"], 0.95), "s",
               baseline=_quantile(before["latencies"], 0.95)),
        figure("answer latency after a short-gap burst, p50", _quantile(after["short_gap_latencies"], 0.5),
               "s", baseline=_quantile(before["short_gap_latencies"], 0.5),
               note=f"the bursts the gap rule answered without history: {len(after['short_gap_latencies'])}"),
    ]
    return {
        "name": "history",
        "title": "6. History on every batch: the price",
        "figures": figures,
        "details": {
            "wati_latency_seconds": WATI_LATENCY_SECONDS,
            "gap_mode": _summary(before),
            "every_batch": _summary(after),
        },
    }
