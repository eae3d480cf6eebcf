"""Benchmark 3 — responder concurrency against Little's law.

`watistream responder` (a real process, RESPONDER_CONCURRENCY at its default) answers through the
OpenAI stand-in, whose Responses calls take a fixed 1 s (other endpoints — conversation creation —
answer at once), and sends through the WATI stand-in. Once the responder is ready, the bench
queues `batches_per_customer` ResponderRequests for each of N customers at once (produced straight
to the requests topic, as the context service would). Little's law bounds the reply rate at
concurrency ÷ 1 s; the figure is the steady-state rate (replies between the 10th and 90th percentile
of completion, so ramp-up and tail are excluded) divided by that bound.

Checks: every batch answered exactly once, zero `conversation_locked` answers from the stand-in
(two calls on one conversation at once), and per-customer order kept (the replies topic AND the
WATI sends of each customer follow the batch order).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from datetime import timedelta
from typing import Any

from services.common import codec
from services.common.kafka import ensure_topics, make_producer
from services.common.timeparse import utcnow
from services.standins import StandIns

from .common import (
    BenchEnv,
    Profiler,
    ServiceProcess,
    ack_rtt_ms,
    cpu_seconds_of,
    figure,
    plain_request,
    settings_env,
    wati_text_message,
)
from .loadgen import wa_id_of
from .stack import TopicReader

OPENAI_LATENCY = 1.0


def request_of(customer: int, number: int, created: Any) -> dict[str, Any]:
    """The ResponderRequest of a customer's `number`-th batch (one text message)."""
    wa_id = wa_id_of(customer)
    key = f"wati:{wa_id}"
    message = wati_text_message(wa_id, f"wamid.bench{customer:06d}{number:03d}",
                                f"batch {number} of customer {customer}", created, "Bench Customer")
    return plain_request(f"{key}:{number}", [message], created)


async def _measure(bench: BenchEnv, standins: StandIns, kind: str) -> dict[str, Any]:
    """Queues the batches for `kind` ("responder" = the product, "baseline") and measures the replies."""
    scale = bench.scale
    customers, per_customer = scale.responder_customers, scale.responder_batches_per_customer
    total = customers * per_customer
    standins.reset()
    standins.openai.latency_for(lambda body: True, OPENAI_LATENCY)
    settings = bench.settings(
        kind,
        wati_api_url=standins.wati_url,
        wati_api_token=standins.wati.token,
        openai_base_url=standins.openai_url,
        openai_api_key=standins.openai.api_key,
    )
    limit = settings.responder_concurrency / OPENAI_LATENCY
    topics = await ensure_topics(settings)
    reader = await TopicReader(settings, [topics.replies]).start()
    if kind == "responder":
        service = ServiceProcess.watistream(bench, "responder", settings).start()
    else:
        service = ServiceProcess(
            kind,
            [sys.executable, "-m", "bench.baseline_responder"],
            settings_env(settings),
            bench.log_path(kind),
        ).start()
    producer = make_producer(settings)
    await producer.start()
    profile_top = None
    try:
        ready_seconds = await service.wait_ready(f"http://127.0.0.1:{settings.responder_web_port}/readyz")
        ack = await ack_rtt_ms(settings, topics.audit)
        base = utcnow() - timedelta(seconds=5)
        profiler = Profiler(bench, kind)
        if kind == "responder":
            profiler.start(service.pid, min(30.0, total / limit))
        queued_at = time.time() * 1000.0
        cpu0 = (service.cpu_seconds(), _own_cpu(), cpu_seconds_of(bench.broker_pid), time.monotonic())
        futures = []
        for number in range(per_customer):  # batch n of every customer before batch n+1 of any
            for customer in range(customers):
                value = codec.encode("ResponderRequest", request_of(customer, number, base))
                futures.append(
                    await producer.send(
                        topics.responder_requests, value, key=f"wati:{wa_id_of(customer)}".encode()
                    )
                )
        await asyncio.gather(*futures)
        queued_ms = time.time() * 1000.0 - queued_at
        timeout = 3 * total / limit + 60
        done = await reader.wait_until(lambda: len(reader.records[topics.replies]) >= total, timeout)
        wall = time.monotonic() - cpu0[3]
        cpu = {
            kind: round((service.cpu_seconds() - cpu0[0]) / wall, 2),
            "bench_and_standins": round((_own_cpu() - cpu0[1]) / wall, 2),
            "broker": round((cpu_seconds_of(bench.broker_pid) - cpu0[2]) / wall, 2),
        }
        cpu_per_batch_ms = 1000.0 * (service.cpu_seconds() - cpu0[0]) / total
        # a redelivery would show as a second reply: give it a moment to appear
        await asyncio.sleep(1.0)
        profile_top = profiler.finish()
    finally:
        await producer.stop()
        await reader.stop()
        service.stop()
    replies = reader.records[topics.replies]
    calls = [r for r in standins.openai.responses.values()]
    clock_offset = time.time() - time.monotonic()  # stand-in records use this process's monotonic clock
    sends = list(standins.wati.sent)
    finish = sorted(r.timestamp_ms for r in replies)
    openai_ms = [1000.0 * (r.finished - r.started) for r in calls]
    breakdown = _breakdown(replies, calls, clock_offset)
    by_batch: dict[str, int] = {}
    for r in replies:
        by_batch[str(r.value["batch_id"])] = by_batch.get(str(r.value["batch_id"]), 0) + 1
    lo, hi = int(0.1 * (len(finish) - 1)), int(0.9 * (len(finish) - 1))
    steady = (
        (hi - lo) / ((finish[hi] - finish[lo]) / 1000.0)
        if len(finish) > 10 and finish[hi] > finish[lo]
        else None
    )
    slot_ms = 1000.0 * settings.responder_concurrency / steady if steady else None
    after_ms = breakdown["after_openai"]["mean"]
    if slot_ms is not None and openai_ms and after_ms is not None:
        breakdown["before_openai_mean"] = slot_ms - sum(openai_ms) / len(openai_ms) - after_ms
    return {
        "kind": kind,
        "customers": customers,
        "batches": total,
        "replies": len(replies),
        "answered": sum(1 for r in replies if r.value.get("outcome") == "answered"),
        "all_answered_in_time": done,
        "ready_seconds": ready_seconds,
        "queue_ms": queued_ms,
        "concurrency": settings.responder_concurrency,
        "limit_per_second": limit,
        "steady_rate": steady,
        "overall_rate": len(finish) / ((finish[-1] - queued_at) / 1000.0) if finish else None,
        "duplicates": sum(n - 1 for n in by_batch.values() if n > 1),
        "order_violations": _order_violations_replies(replies) + _order_violations_sends(sends),
        "conversation_locked": standins.openai.locked_count,
        "openai_calls": len(calls),
        "openai_reply_calls": sum(1 for r in calls if r.conversation_id),
        "wati_sends": len(sends),
        "cpu_share": cpu,
        "cpu_ms_per_batch": cpu_per_batch_ms,
        "openai_call_ms_mean": sum(openai_ms) / len(openai_ms) if openai_ms else None,
        "slot_ms_per_batch": slot_ms,
        "breakdown_ms": breakdown,
        "kafka_ack_rtt_ms": ack,
        "profile_top": profile_top,
    }


async def run(bench: BenchEnv) -> dict[str, Any]:
    async with StandIns.running() as standins:
        product = await _measure(bench, standins, "responder")
        base = await _measure(bench, standins, "baseline")
    limit = product["limit_per_second"]
    steady, base_steady = product["steady_rate"], base["steady_rate"]
    ratio = steady / limit if steady else None
    b = product["breakdown_ms"]
    figures = [
        figure(
            "replies/s (steady state) vs Little's-law limit",
            steady,
            "replies/s",
            baseline=limit,
            target=">= 0.9x limit",
            met=ratio is not None and ratio >= 0.9,
            note=f"limit = RESPONDER_CONCURRENCY {product['concurrency']} / {OPENAI_LATENCY:g} s; "
            f"{product['answered']}/{product['batches']} answered; slot time per batch "
            f"{product['slot_ms_per_batch'] or 0:.0f} ms = OpenAI {product['openai_call_ms_mean'] or 0:.0f}"
            f" + after the call {b['after_openai']['mean'] or 0:.0f} + before it "
            f"{b.get('before_openai_mean') or 0:.0f} ms",
        ),
        figure(
            "replies/s vs minimal Kafka→OpenAI→WATI loop (same run)",
            steady,
            "replies/s",
            baseline=base_steady,
            note=f"the minimal loop reaches {(base_steady or 0) / limit:.2f}x of the limit on this machine",
        ),
        figure(
            "conversation_locked answers",
            float(product["conversation_locked"]),
            "",
            target="0",
            met=product["conversation_locked"] == 0,
        ),
        figure(
            "per-customer order violations",
            float(product["order_violations"]),
            "",
            target="0",
            met=product["order_violations"] == 0
            and product["duplicates"] == 0
            and product["all_answered_in_time"],
            note=f"duplicate replies {product['duplicates']}; OpenAI reply calls "
            f"{product['openai_reply_calls']} for {product['batches']} batches",
        ),
    ]
    return {
        "name": "responder",
        "title": "3. Responder concurrency",
        "figures": figures,
        "details": {"responder": product, "baseline": base, "profile_top": product["profile_top"]},
    }


def _breakdown(replies: list[Any], calls: list[Any], offset: float) -> dict[str, Any]:
    """Where a batch's slot time goes, from the stand-in's call times and the replies' timestamps.

    `after_openai`: OpenAI answered → AssistantReply on its topic (WATI send, state writes, publish).
    The rest of a slot's time besides the call itself is before it (hand-over of the next queued
    batch, state read and write, conversation creation): slot time - call - after.
    """
    from .common import percentile

    by_response = {r.id: r for r in calls}
    after: list[float] = []
    for reply in replies:
        call = by_response.get(str(reply.value.get("response_id")))
        if call is not None:
            after.append(reply.timestamp_ms - (call.finished + offset) * 1000.0)

    def stats(values: list[float]) -> dict[str, float | None]:
        return {
            "p50": percentile(values, 0.5),
            "p99": percentile(values, 0.99),
            "mean": sum(values) / len(values) if values else None,
        }

    return {"after_openai": stats(after)}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _order_violations_replies(replies: list[Any]) -> int:
    """Replies of one customer (one partition, read in order) must follow the batch numbers."""
    last: dict[str, int] = {}
    bad = 0
    for r in replies:
        key = str(r.value["customer_key"])
        number = int(str(r.value["batch_id"]).rsplit(":", 1)[1])
        if number < last.get(key, -1):
            bad += 1
        last[key] = max(number, last.get(key, -1))
    return bad


def _order_violations_sends(sends: list[Any]) -> int:
    """The WATI sends of one contact must quote the batches in order (the stand-in quotes the text)."""
    last: dict[str, int] = {}
    bad = 0
    for sent in sends:
        text = str(sent.text)
        marker = text.find("batch ")
        if marker < 0:
            continue
        number = int(text[marker + 6 :].split(" ", 1)[0])
        if number < last.get(sent.contact_id, -1):
            bad += 1
        last[sent.contact_id] = max(number, last.get(sent.contact_id, -1))
    return bad
