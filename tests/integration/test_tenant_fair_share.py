"""Fair share of the responder's and vision's slots between tenants, on the real broker (issue 17).

Two tenants, `slow` and `fast`, each with its own WATI account on the WATI stand-in, share one
responder and one vision worker with RESPONDER_CONCURRENCY=4 (RESPONDER_CONCURRENCY_PER_TENANT left
at its default: half the slots each with several tenants). `slow`'s WATI hangs (every request held
unanswered) or answers every send 429 with a long Retry-After; more of its customers are waiting
than the worker has slots, all on partition 0, and then one `fast` customer arrives on the same
partition.

- responder: `fast`'s customer is answered (sent through `fast`'s account) while `slow`'s sends still
  hang or wait out their Retry-After; with one shared line it waited until `slow`'s sends timed out
  (the WATI client's 10 s) or gave up (two 10 s Retry-Afters);
- vision: `fast`'s image is downloaded, classified and its batch forwarded while `slow`'s downloads
  still hang (a shared line waited for the 20 s media timeout).

The wait for `fast` is bounded below those client timeouts: while every call of `slow` hangs, nothing
but fair admission can let `fast` through.

- the partition's backpressure: a third tenant, `burst`, hangs with more customers on partition 0
  than PARTITION_PAUSE_ABOVE (made small) before one `fast` customer; `fast` is answered while
  `burst` is at its RECORDS_PER_TENANT and the rest of its records are read past (the partition is
  not paused), and every `burst` customer is answered once its WATI answers again.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from services.common import codec, metrics
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.records import InboundMessage, ResponderRequest
from services.responder.main import Responder
from services.standins import StandIns, WatiStandIn
from services.vision.main import Vision
from tests.integration.test_vision_worker import Collector, eventually
from tests.unit.test_vision_images import png_bytes

pytestmark = pytest.mark.broker

SLOTS = 4  # RESPONDER_CONCURRENCY of the responder and of vision
WAITING = 6  # customers of `slow` waiting: more than the slots
BOUND = 8.0  # seconds `fast` may take: below the WATI send (10 s) and media (20 s) timeouts
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Env:
    settings: Settings
    topics: Topics
    stand_ins: StandIns
    slow: WatiStandIn
    fast: WatiStandIn
    producer: AIOKafkaProducer
    out: Collector
    burst: WatiStandIn  # a third tenant, only for the backpressure test (nothing of it left by others)

    async def submit(self, topic: str, request: ResponderRequest) -> None:
        value = (codec.encode("VisionRequest", {"request": request}) if topic == self.topics.vision_requests
                 else codec.encode("ResponderRequest", dict(request)))
        await self.producer.send_and_wait(topic, value, key=request["customer_key"].encode(), partition=0)

    def outputs(self, topic: str, batch_id: str) -> list[dict[str, Any]]:
        return [o.value for o in self.out.of(topic, batch_id)]


@pytest.fixture(scope="module")
async def env(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    folder = tmp_path_factory.mktemp("fair-share")
    async with StandIns.running() as s:
        slow = s.wati.add_tenant("710001", "token-of-slow-0001")
        fast = s.wati.add_tenant("720002", "token-of-fast-0002")
        burst = s.wati.add_tenant("730003", "token-of-burst-0003")
        tenants = []
        for name, wati in (("slow", slow), ("fast", fast), ("burst", burst)):
            (folder / f"{name}-wati").write_text(wati.token, encoding="utf-8")
            (folder / f"{name}-hook").write_text(f"{name}-webhook-secret", encoding="utf-8")
            tenants.append({"id": name, "webhook_secret": f"file:{folder / f'{name}-hook'}",
                            "wati": {"api_url": wati.url, "token": f"file:{folder / f'{name}-wati'}"}})
        (folder / "tenants.json").write_text(json.dumps({"tenants": tenants}), encoding="utf-8")
        cfg = dataclasses.replace(
            settings, tenants_file=str(folder / "tenants.json"),
            wati_api_url=s.wati_url, wati_api_token=s.wati.token,
            openai_base_url=s.openai_url, openai_api_key=s.openai.api_key,
            openai_max_attempts=2, openai_timeout_seconds=20.0, responder_concurrency=SLOTS,
        )
        s.openai.json_fn = lambda body, schema: {
            "category": "general_inquiry", "confidence": 0.5, "description": "A photo."}
        topics = await ensure_topics(cfg)
        producer = make_producer(cfg)
        await producer.start()
        out = Collector(cfg, [topics.responder_requests, topics.replies, topics.dead_letter])
        await out.start()
        try:
            yield Env(cfg, topics, s, slow, fast, producer, out, burst)
        finally:
            await out.stop()
            await producer.stop()


@pytest.fixture
async def responder(env: Env) -> AsyncIterator[Responder]:
    r = Responder(env.settings, web_port=0, serve_http=False)
    await r.start()
    try:
        await r.wait_ready(60)
        yield r
    finally:
        env.slow.release_requests()
        env.slow.faults.clear()
        await r.stop()


@pytest.fixture
async def vision(env: Env) -> AsyncIterator[Vision]:
    v = Vision(env.settings, allow_private_urls=True)
    await v.start()
    try:
        await eventually(lambda: v.ready()[0], timeout=60, what="vision ready")
        yield v
    finally:
        env.slow.release_requests()
        await v.stop()


def phone() -> str:
    return f"5037{uuid.uuid4().int % 10**8:08d}"


def message(key: str, wa_id: str, media_ref: str | None = None) -> InboundMessage:
    return {
        "event_id": f"wamid.{uuid.uuid4().hex}", "customer_key": key, "channel": "wati",
        "provider_id": wa_id, "message_type": "image" if media_ref else "text",
        "text": None if media_ref else "hola", "caption": None, "media_ref": media_ref,
        "media_mime": "image/jpeg" if media_ref else None, "sender_name": "Ana",
        "provider_message_ids": [f"wamid.{uuid.uuid4().hex[:8]}"], "provider_time": T0,
        "received_at": T0, "recovered": False, "username": None,
    }


def request(tenant: str, media_ref: str | None = None, wa_id: str | None = None) -> ResponderRequest:
    wa_id = wa_id or phone()
    key = f"{tenant}/default/wati:{wa_id}"
    return {
        "batch_id": f"{key}:{uuid.uuid4().int % 10**6}", "customer_key": key, "channel": "wati",
        "provider_id": wa_id, "messages": [message(key, wa_id, media_ref)],
        "prior_last_inbound_at": None, "prior_last_reply_at": None, "gap_seconds": None,
        "missed_check_ran": False, "missed_messages": [], "missed_dropped_oldest": 0, "images": [],
        "created_at": T0,
    }


def slots(state: str, service: str, tenant: str) -> float | None:
    """watistream_tenant_slots_held / _waiting of the worker running in this process."""
    return metrics.REGISTRY.get_sample_value(f"watistream_tenant_slots_{state}",
                                             {"service": service, "tenant": tenant})


async def produced(env: Env, topic: str, batch_id: str, what: str) -> None:
    """Until `topic` holds a record of the batch."""
    await eventually(lambda: bool(env.outputs(topic, batch_id)), timeout=60, what=what)


def requests_of(wati: WatiStandIn, kind: str) -> list[str]:
    return [r.path for r in wati.requests if f"/api/v1/{kind}" in r.path]


def slow_sends_in_flight(env: Env, fault: str, before: int) -> int:
    """`slow`'s sends holding a slot: hanging at the server, or waiting out a 429's Retry-After
    (each made one request so far; `before`: the requests of earlier tests)."""
    return env.slow.held if fault == "hangs" else len(requests_of(env.slow, "sendSessionMessage")) - before


@pytest.mark.parametrize("fault", ["hangs", "rate_limited"])
async def test_a_slow_tenant_does_not_stall_another_tenants_replies_on_the_same_partition(
    env: Env, responder: Responder, fault: str
) -> None:
    """`slow`'s WATI hangs, or answers every send 429 with `Retry-After: 10` (the send waits it out,
    twice, before giving up: 20 s in its slot)."""
    before, sent_before = len(requests_of(env.slow, "sendSessionMessage")), len(env.slow.sent)
    if fault == "hangs":
        env.slow.hold_requests()
    else:
        env.slow.fail_next("send", 429, times=1000, headers={"Retry-After": "10"})
    slow = [request("slow") for _ in range(WAITING)]
    for r in slow:
        await env.submit(env.topics.responder_requests, r)
    await eventually(lambda: slow_sends_in_flight(env, fault, before) >= 1, what="slow's sends in flight")
    fast = request("fast")
    started = time.monotonic()
    await env.submit(env.topics.responder_requests, fast)
    await eventually(lambda: bool(env.outputs(env.topics.replies, fast["batch_id"])), timeout=BOUND,
                     what=f"fast's reply while slow's sends {fault}")
    seconds = time.monotonic() - started
    (reply,) = env.outputs(env.topics.replies, fast["batch_id"])
    assert reply["outcome"] == "answered", reply
    assert [m.text for m in env.fast.sent if m.contact_id == fast["provider_id"]] == [reply["text"]]
    # slow still stuck: at its share of the slots, its other customers waiting their turn
    asked = len(requests_of(env.slow, "sendSessionMessage")) - before
    assert slow_sends_in_flight(env, fault, before) == asked == SLOTS // 2
    assert all(env.outputs(env.topics.replies, r["batch_id"]) == [] for r in slow)
    # what an operator sees: slow at its share, the rest of its customers waiting
    assert slots("held", "responder", "slow") == SLOTS // 2
    assert slots("waiting", "responder", "slow") == WAITING - SLOTS // 2
    print(f"fast tenant answered in {seconds:.2f} s while {SLOTS // 2} sends of the slow one {fault}")
    env.slow.release_requests()
    env.slow.faults.clear()
    for r in slow:  # released: every slow customer is answered in its turn
        await produced(env, env.topics.replies, r["batch_id"], "slow's replies after the release")
        assert env.outputs(env.topics.replies, r["batch_id"])[0]["outcome"] == "answered"
    assert len(env.slow.sent) - sent_before == WAITING


async def test_a_hung_tenant_does_not_stall_another_tenants_images_on_the_same_partition(
    env: Env, vision: Vision
) -> None:
    env.slow.hold_requests()
    slow = []
    for i in range(WAITING):
        ref = f"data/images/slow-{uuid.uuid4().hex[:8]}-{i}.jpg"
        env.slow.add_media(ref, png_bytes(2, 2), "image/jpeg")
        slow.append(request("slow", media_ref=ref))
    for r in slow:
        await env.submit(env.topics.vision_requests, r)
    await eventually(lambda: env.slow.held >= 1, what="slow's downloads hanging")
    ref = f"data/images/fast-{uuid.uuid4().hex[:8]}.jpg"
    env.fast.add_media(ref, png_bytes(3, 3), "image/jpeg")
    fast = request("fast", media_ref=ref)
    started = time.monotonic()
    await env.submit(env.topics.vision_requests, fast)
    await eventually(lambda: bool(env.outputs(env.topics.responder_requests, fast["batch_id"])),
                     timeout=BOUND, what="fast's batch forwarded while slow's downloads hang")
    seconds = time.monotonic() - started
    (forwarded,) = env.outputs(env.topics.responder_requests, fast["batch_id"])
    assert [i["category"] for i in forwarded["images"]] == ["general_inquiry"], forwarded["images"]
    assert env.slow.held == len(requests_of(env.slow, "getMedia")) == SLOTS // 2
    assert slots("held", "vision", "slow") == SLOTS // 2
    assert slots("waiting", "vision", "slow") == WAITING - SLOTS // 2
    assert all(env.outputs(env.topics.responder_requests, r["batch_id"]) == [] for r in slow)
    print(f"fast tenant's image forwarded in {seconds:.2f} s while {env.slow.held} downloads hang")
    env.slow.release_requests()
    for r in slow:
        await produced(env, env.topics.responder_requests, r["batch_id"], "slow's batches after the release")


# ------------------------------------------------------------------ the partition's backpressure

PAUSE = 10  # PARTITION_PAUSE_ABOVE: a partition with more unfinished records is paused
PER_TENANT = 6  # RECORDS_PER_TENANT: records of one tenant a worker keeps in memory
BURST = 30  # customers of the hung tenant `burst` on partition 0: more than PAUSE


def records(state: str, service: str, tenant: str) -> float | None:
    """watistream_tenant_records_buffered / _read_past of the worker running in this process."""
    return metrics.REGISTRY.get_sample_value(f"watistream_tenant_records_{state}",
                                             {"service": service, "tenant": tenant})


async def test_a_hung_tenants_burst_over_the_pause_threshold_does_not_stall_another_tenant(
    env: Env
) -> None:
    """`burst`'s WATI hangs and BURST of its customers (more than PARTITION_PAUSE_ABOVE) are on
    partition 0 beside one `fast` customer fetched after them. With one count of unfinished records
    per partition, the partition was paused and `fast` waited until `burst`'s sends timed out (not
    answered within 120 s); now `burst` keeps RECORDS_PER_TENANT in memory, the rest are read past
    and read again once it has room, so the partition is not paused and `fast` is answered at once.
    (`burst` is a tenant of its own: the other tests leave records of `slow` behind, e.g. the
    batches vision forwarded.)"""
    cfg = dataclasses.replace(env.settings, partition_pause_above=PAUSE, records_per_tenant=PER_TENANT,
                              partition_unfinished_max=200)
    responder = Responder(cfg, web_port=0, serve_http=False)
    await responder.start()
    try:
        await responder.wait_ready(60)
        assert responder.consumer is not None
        consumer = responder.consumer
        sent_before = len(env.burst.sent)
        env.burst.hold_requests()
        hung = [request("burst") for _ in range(BURST)]
        for r in hung:
            await env.submit(env.topics.responder_requests, r)
        # the burst taken in as far as the worker takes it: all fetched, or the partition paused
        await eventually(lambda: env.burst.held == SLOTS // 2
                         and (bool(consumer.paused()) or consumer.unfinished() >= BURST),
                         what="the burst fetched and its sends hanging")
        fast = request("fast")
        started = time.monotonic()
        await env.submit(env.topics.responder_requests, fast)
        await eventually(lambda: bool(env.outputs(env.topics.replies, fast["batch_id"])), timeout=BOUND,
                         what="fast's reply while the burst waits behind its hung sends")
        seconds = time.monotonic() - started
        (reply,) = env.outputs(env.topics.replies, fast["batch_id"])
        assert reply["outcome"] == "answered", reply
        assert consumer.paused() == set()
        assert env.burst.held == SLOTS // 2
        assert all(env.outputs(env.topics.replies, r["batch_id"]) == [] for r in hung)
        # what an operator sees: burst at its cap of records in memory, the rest read past
        await eventually(lambda: records("buffered", "responder", "burst") == PER_TENANT
                         and records("read_past", "responder", "burst") == BURST - PER_TENANT,
                         what="burst's records gauges at its cap and the rest read past")
        print(f"fast tenant answered in {seconds:.2f} s beside {BURST} records of a hung tenant "
              f"(pause above {PAUSE}, {PER_TENANT} kept)")
        env.burst.release_requests()
        released = time.monotonic()
        for r in hung:  # read again once burst has room: every customer of it answered in its turn
            await produced(env, env.topics.replies, r["batch_id"], "burst's replies after the release")
            assert env.outputs(env.topics.replies, r["batch_id"])[0]["outcome"] == "answered"
        print(f"the hung tenant's {BURST} customers answered {time.monotonic() - released:.2f} s after "
              f"its WATI answered again ({BURST - PER_TENANT} of them read again)")
        assert len(env.burst.sent) - sent_before == BURST
        await eventually(lambda: records("buffered", "responder", "burst") == 0
                         and records("read_past", "responder", "burst") == 0, what="gauges back to 0")
    finally:
        env.burst.release_requests()
        await responder.stop()
