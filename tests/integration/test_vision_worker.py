"""The vision worker on the real broker with the WATI / OpenAI stand-ins in-process.

One `Vision` runs for the whole module; every test uses its own customers and batch ids and reads
what the worker produced from the output topics (forwarded ResponderRequests, ImageClassified,
dead letters).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from services.common import codec, metrics
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.records import InboundMessage, ResponderRequest
from services.common.wati import WatiClient
from services.standins import StandIns
from services.standins._base import StandInServer
from services.vision.main import Vision
from services.vision.worker import MediaFetcher
from tests.unit.test_vision_images import GIF_ANIMATED, JPEG, PDF, png_bytes

pytestmark = pytest.mark.broker

MAX_IMAGE = 64 * 1024
T0 = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Out:
    topic: str
    partition: int
    offset: int
    key: str
    name: str
    value: dict[str, Any]


@dataclass
class Collector:
    """Reads every partition of the output topics from the beginning into `records`."""

    settings: Settings
    topics: list[str]
    records: list[Out] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                          enable_auto_commit=False, auto_offset_reset="earliest")
        await self._consumer.start()
        self._consumer.assign([TopicPartition(t, p) for t in self.topics
                               for p in range(self.settings.topic_partitions)])
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for tp, records in batches.items():
                for r in records:
                    name, value = codec.decode_any(r.value)
                    self.records.append(Out(tp.topic, tp.partition, r.offset, (r.key or b"").decode(),
                                            name, value))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def of(self, topic: str, batch_id: str) -> list[Out]:
        return [o for o in self.records if o.topic == topic and o.value.get("batch_id") == batch_id]


@dataclass
class Env:
    settings: Settings
    topics: Topics
    stand_ins: StandIns
    producer: AIOKafkaProducer
    out: Collector
    vision: Vision

    async def submit(self, request: ResponderRequest) -> None:
        await self.producer.send_and_wait(
            self.topics.vision_requests, codec.encode("VisionRequest", {"request": request}),
            key=request["customer_key"].encode())

    async def forwarded(self, batch_id: str, count: int = 1) -> list[Out]:
        await eventually(lambda: len(self.out.of(self.topics.responder_requests, batch_id)) >= count,
                         what=f"forwarded {batch_id}")
        return self.out.of(self.topics.responder_requests, batch_id)

    def classified(self, batch_id: str) -> list[dict[str, Any]]:
        return [o.value for o in self.out.of(self.topics.image_classified, batch_id)]

    def dead(self, batch_id: str) -> list[dict[str, Any]]:
        return [o.value for o in self.out.of(self.topics.dead_letter, batch_id)]


class Cdn(StandInServer):
    """A public image host like Facebook's CDN, for ManyChat attachment URLs (with a redirect)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, tuple[bytes, str]] = {}

    def build_app(self) -> web.Application:
        async def serve(request: web.Request) -> web.StreamResponse:
            await self.record(request, None)
            name = request.match_info["name"]
            if name.startswith("moved-"):
                raise web.HTTPFound(f"/att/{name.removeprefix('moved-')}")
            if name not in self.files:
                return web.Response(status=404)
            data, content_type = self.files[name]
            return web.Response(body=data, content_type=content_type)

        app = web.Application()
        app.router.add_get("/att/{name}", serve)
        return app


@pytest.fixture(scope="module")
async def env(settings: Settings) -> AsyncIterator[Env]:
    async with StandIns.running() as stand_ins:
        cfg = replace(settings, openai_base_url=stand_ins.openai_url, wati_api_url=stand_ins.wati_url,
                      openai_max_attempts=2, image_max_bytes=MAX_IMAGE, vision_model="vision-test-model")
        topics = await ensure_topics(cfg)
        producer = make_producer(cfg)
        await producer.start()
        out = Collector(cfg, [topics.responder_requests, topics.image_classified, topics.dead_letter])
        await out.start()
        vision = Vision(cfg, allow_private_urls=True)
        await vision.start()
        try:
            await eventually(lambda: vision.ready()[0], what="vision ready")
            yield Env(cfg, topics, stand_ins, producer, out, vision)
        finally:
            await vision.stop()
            await out.stop()
            await producer.stop()


@pytest.fixture(autouse=True)
def clean_openai(env: Env) -> None:
    env.stand_ins.openai.json_fn = lambda body, schema: {
        "category": "general_inquiry", "confidence": 0.5, "description": "A photo."}
    env.stand_ins.openai.faults.clear()
    env.stand_ins.openai.clear_latency()


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def msg(customer: str, n: int, **over: Any) -> InboundMessage:
    channel = "wati" if customer.startswith("wati:") else "instagram"
    base: dict[str, Any] = {
        "event_id": f"ev-{customer}-{n}", "customer_key": customer, "channel": channel,
        "provider_id": customer.split(":", 1)[1], "message_type": "text", "text": f"text {n}",
        "caption": None, "media_ref": None, "media_mime": None, "sender_name": "Ana",
        "provider_message_ids": [f"wamid.{n}"], "provider_time": T0, "received_at": T0,
        "recovered": False, "username": None,
    }
    base.update(over)
    return base  # type: ignore[return-value]


def image(customer: str, n: int, ref: str | None, **over: Any) -> InboundMessage:
    return msg(customer, n, message_type="image", text=None, media_ref=ref, media_mime="image/jpeg", **over)


def request(customer: str, batch_id: str, messages: list[InboundMessage]) -> ResponderRequest:
    return {
        "batch_id": batch_id, "customer_key": customer, "channel": messages[0]["channel"],
        "provider_id": messages[0]["provider_id"], "messages": messages,
        "prior_last_inbound_at": T0, "prior_last_reply_at": None, "gap_seconds": 42.5,
        "missed_check_ran": False, "missed_messages": [], "missed_dropped_oldest": 0, "images": [],
        "created_at": T0,
    }


def customer(label: str) -> str:
    return f"wati:5037{uuid.uuid4().int % 10**7:07d}" if label == "wati" else \
        f"manychat:{uuid.uuid4().int % 10**12}"


def responses_with_file(env: Env, file_id: str) -> list[dict[str, Any]]:
    found = []
    for r in env.stand_ins.openai.requests:
        if r.path == "/v1/responses" and isinstance(r.body, dict) and file_id in str(r.body.get("input")):
            found.append(r.body)
    return found


def sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# -- the happy path ------------------------------------------------------------------------------
async def test_image_batch_is_classified_outside_any_conversation_and_forwarded(env: Env) -> None:
    cust, batch = customer("wati"), new_id("img")
    picture = png_bytes(4, 4)
    env.stand_ins.wati.add_media(f"data/images/{batch}.jpg", picture, "image/jpeg")  # bytes say PNG
    env.stand_ins.openai.json_fn = lambda body, schema: {
        "category": "payment_proof", "confidence": 0.93, "description": "Bank transfer receipt, $50."}
    classified = {"category": "payment_proof", "tenant": "default"}
    vision_calls = {"purpose": "vision", "outcome": "ok", "tenant": "default"}
    before = sample("watistream_images_classified_total", classified)
    vision_ok = sample("watistream_openai_requests_total", vision_calls)
    original = request(cust, batch, [
        msg(cust, 1, text="hola, ya pagué"),
        image(cust, 2, f"data/images/{batch}.jpg", caption="mi comprobante"),
    ])
    await env.submit(original)

    [forwarded] = await env.forwarded(batch)
    assert forwarded.key == cust and forwarded.name == "ResponderRequest"
    value = forwarded.value
    [img] = value["images"]
    file_id = img["file_id"]
    assert file_id and file_id.startswith("file-")
    assert img == {"media_ref": f"data/images/{batch}.jpg", "file_id": file_id, "mime": "image/png",
                   "category": "payment_proof", "confidence": 0.93,
                   "description": "Bank transfer receipt, $50."}
    assert {k: v for k, v in value.items() if k != "images"} == \
        {k: v for k, v in original.items() if k != "images"}

    # the image reached OpenAI as an uploaded file; no bytes in Kafka
    stored = env.stand_ins.openai.files[file_id]
    assert stored.data == picture and stored.purpose == "vision"
    assert picture not in b"".join(codec.encode(o.name, o.value) for o in env.out.records)

    # ONE classification call, outside any conversation, with the json_schema format
    [body] = responses_with_file(env, file_id)
    assert "conversation" not in body and "previous_response_id" not in body
    assert body["store"] is False and body["model"] == "vision-test-model"
    fmt = body["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["name"] == "image_class" and fmt["strict"] is True
    assert fmt["schema"]["properties"]["category"]["enum"] == ["payment_proof", "general_inquiry", "other"]
    parts = body["input"][0]["content"]
    assert {"type": "input_image", "file_id": file_id, "detail": "low"} in parts
    assert env.stand_ins.openai.conversations == {}
    assert all(r.conversation_id is None for r in env.stand_ins.openai.responses.values())

    # the WATI download went through getMedia (the stand-in answers 401 without the Bearer token)
    media_calls = [r for r in env.stand_ins.wati.requests if r.path.endswith("/api/v1/getMedia")
                   and r.query.get("fileName") == f"data/images/{batch}.jpg"]
    assert len(media_calls) == 1

    [event] = env.classified(batch)
    assert event["customer_key"] == cust and event["media_ref"] == f"data/images/{batch}.jpg"
    assert event["category"] == "payment_proof" and event["confidence"] == 0.93
    assert event["file_id"] == file_id and event["model"] == "vision-test-model"
    assert env.dead(batch) == []
    assert sample("watistream_images_classified_total", classified) == before + 1
    assert sample("watistream_openai_requests_total", vision_calls) == vision_ok + 1


async def test_wati_media_download_requires_the_bearer_token(env: Env) -> None:
    env.stand_ins.wati.add_media("data/images/token.png", png_bytes(), "image/png")
    for token, ok in (("wrong-token", False), (env.settings.wati_api_token, True)):
        async with WatiClient(env.stand_ins.wati_url, token) as wati, httpx.AsyncClient() as http:
            fetcher = MediaFetcher(env.settings, clients=[wati], http=http, allow_private_urls=False)
            if ok:
                assert await fetcher.fetch("wati", "data/images/token.png") == png_bytes()
            else:
                with pytest.raises(Exception) as caught:
                    await fetcher.fetch("wati", "data/images/token.png")
                assert getattr(caught.value, "reason", None) == "image_download_failed"
                assert "unauthorized" in str(caught.value)


# -- failures: still forwarded, never an error text, always a dead letter ------------------------
async def test_unusable_images_are_forwarded_as_unreadable_with_dead_letters(env: Env) -> None:
    cust, batch = customer("wati"), new_id("bad")
    files_before = len(env.stand_ins.openai.files)
    env.stand_ins.wati.add_media(f"data/images/{batch}-doc.jpg", PDF, "image/jpeg")
    env.stand_ins.wati.add_media(f"data/images/{batch}-big.png", png_bytes(200, 200) + b"\0" * MAX_IMAGE,
                                 "image/png")
    env.stand_ins.wati.add_media(f"data/images/{batch}-anim.gif", GIF_ANIMATED, "image/gif")
    refs = [f"data/images/{batch}-doc.jpg", f"data/images/{batch}-big.png",
            f"data/images/{batch}-anim.gif", f"data/images/{batch}-missing.jpg", None]
    await env.submit(request(cust, batch, [image(cust, n, ref) for n, ref in enumerate(refs)]))

    [forwarded] = await env.forwarded(batch)
    contexts = forwarded.value["images"]
    assert [c["media_ref"] for c in contexts] == [r or "" for r in refs]
    for c in contexts:
        assert c["category"] == "unreadable" and c["file_id"] is None and c["confidence"] == 0.0
        assert c["description"] and c["description"].startswith("The customer sent")
        assert "HTTP" not in c["description"] and "404" not in c["description"]
    await eventually(lambda: len(env.dead(batch)) == 5, what="dead letters")
    reasons = sorted(d["reason"] for d in env.dead(batch))
    assert reasons == sorted(["not_an_image", "image_too_large", "unsupported_image",
                              "image_download_failed", "image_download_failed"])
    assert all(d["service"] == "vision" and d["customer_key"] == cust for d in env.dead(batch))
    assert {d["error"] for d in env.dead(batch) if d["reason"] == "not_an_image"} == {"PDF document"}
    assert [e["category"] for e in env.classified(batch)] == ["unreadable"] * 5
    assert len(env.stand_ins.openai.files) == files_before  # nothing unusable was uploaded


async def test_openai_failures_after_retries_still_forward_the_batch(env: Env) -> None:
    openai = env.stand_ins.openai
    cust = customer("wati")
    env.stand_ins.wati.add_media("data/images/ok.png", png_bytes(), "image/png")

    def counts() -> dict[str, float]:
        return {f"{purpose}:{outcome}": sample("watistream_openai_requests_total",
                                               {"purpose": purpose, "outcome": outcome, "tenant": "default"})
                for purpose in ("vision", "vision_upload")
                for outcome in ("ok", "server_error", "rate_limited", "insufficient_quota")} | {
            f"{purpose}:retried": sample("watistream_openai_retries_total", {"purpose": purpose})
            for purpose in ("vision", "vision_upload")}

    def rises(before: dict[str, float]) -> dict[str, float]:
        """Only what changed: every other counter of the two purposes must stay put."""
        return {k: v - before[k] for k, v in counts().items() if v != before[k]}

    # OPENAI_MAX_ATTEMPTS=2 here: the SDK makes a call twice at most. Each injected fault is either
    # a retried attempt (`openai_retries_total`) or the call's final outcome (`openai_requests_total`).
    # classification: 500 on every attempt -> uploaded but unclassified
    batch = new_id("cls500")
    before = counts()
    openai.fail_next(500, times=2, kind="responses")
    await env.submit(request(cust, batch, [image(cust, 1, "data/images/ok.png")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "unclassified" and img["file_id"] in openai.files
    assert img["description"] == "The customer sent an image that could not be analysed automatically."
    await eventually(lambda: len(env.dead(batch)) == 1, what="dead letter")
    [dead] = env.dead(batch)
    assert dead["reason"] == "classification_failed" and "500" in dead["error"]
    assert openai.faults.pending("responses") == 0  # both attempts were made
    assert rises(before) == {"vision_upload:ok": 1, "vision:retried": 1, "vision:server_error": 1}

    # upload: 500 on every attempt -> unreadable
    batch = new_id("up500")
    before = counts()
    openai.fail_next(500, times=2, kind="files")
    await env.submit(request(cust, batch, [image(cust, 2, "data/images/ok.png")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "unreadable" and img["file_id"] is None and img["mime"] == "image/png"
    await eventually(lambda: len(env.dead(batch)) == 1, what="dead letter")
    assert env.dead(batch)[0]["reason"] == "image_upload_failed"
    assert rises(before) == {"vision_upload:retried": 1, "vision_upload:server_error": 1}

    # one 429 is retried and then succeeds
    batch = new_id("r429")
    before = counts()
    openai.fail_next(429, times=1, kind="responses")
    await env.submit(request(cust, batch, [image(cust, 3, "data/images/ok.png")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "general_inquiry" and img["confidence"] == 0.5
    assert env.dead(batch) == []
    assert rises(before) == {"vision_upload:ok": 1, "vision:retried": 1, "vision:ok": 1}

    # a 429 with `Retry-After` in seconds is retried after that wait (the SDK honours it)
    batch = new_id("r429s")
    before = counts()
    openai.fail_next(429, times=1, kind="responses", headers={"retry-after": "1"})
    started = asyncio.get_running_loop().time()
    await env.submit(request(cust, batch, [image(cust, 4, "data/images/ok.png")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "general_inquiry"
    assert asyncio.get_running_loop().time() - started >= 1.0
    assert rises(before) == {"vision_upload:ok": 1, "vision:retried": 1, "vision:ok": 1}

    # a billing 429 (each body OpenAI sends) is not retried: waiting does not heal it (issue 13, 7)
    for n, (code, type_) in enumerate([("credit_balance_exhausted", None), (None, "insufficient_quota")]):
        batch = new_id(f"quota{n}")
        before = counts()
        openai.fail_next(429, code=code, type_=type_, times=2, kind="responses")
        await env.submit(request(cust, batch, [image(cust, 5 + n, "data/images/ok.png")]))
        [img] = (await env.forwarded(batch))[0].value["images"]
        assert img["category"] == "unclassified" and img["file_id"]
        await eventually(lambda b=batch: len(env.dead(b)) == 1, what="dead letter")
        assert env.dead(batch)[0]["reason"] == "classification_failed"
        assert openai.faults.pending("responses") == 1  # one attempt, the second fault unused
        openai.faults.clear()
        assert rises(before) == {"vision_upload:ok": 1, "vision:insufficient_quota": 1}


async def test_an_invalid_model_answer_becomes_other_with_zero_confidence(env: Env) -> None:
    cust, batch = customer("wati"), new_id("junk")
    env.stand_ins.wati.add_media("data/images/junk.jpg", JPEG, "image/jpeg")
    env.stand_ins.openai.json_fn = lambda body, schema: "Sorry, I cannot classify this."
    await env.submit(request(cust, batch, [image(cust, 1, "data/images/junk.jpg")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "other" and img["confidence"] == 0.0
    assert img["file_id"] and img["mime"] == "image/jpeg"
    assert env.dead(batch) == []

    # an answer cut at max_output_tokens (status "incomplete") is not trusted either
    batch = new_id("cut")
    env.stand_ins.openai.json_fn = lambda body, schema: {
        "category": "payment_proof", "confidence": 0.9, "description": "long " * 2000}
    await env.submit(request(cust, batch, [image(cust, 2, "data/images/junk.jpg")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "other" and img["confidence"] == 0.0 and img["file_id"]


# -- routing and order ------------------------------------------------------------------------------
async def test_a_text_only_batch_is_forwarded_unchanged(env: Env) -> None:
    cust, batch = customer("wati"), new_id("text")
    requests_before = len(env.stand_ins.openai.requests)
    original = request(cust, batch, [msg(cust, 1), msg(cust, 2, message_type="document",
                                                        media_ref="data/documents/x.pdf",
                                                        media_mime="application/pdf")])
    await env.submit(original)
    [forwarded] = await env.forwarded(batch)
    assert forwarded.value == original
    assert env.classified(batch) == [] and env.dead(batch) == []
    assert len(env.stand_ins.openai.requests) == requests_before

    # a redelivered request is forwarded again under the same batch id (the responder dedupes)
    await env.submit(original)
    assert [o.value for o in await env.forwarded(batch, count=2)] == [original, original]


async def test_one_customers_batches_keep_their_order_while_others_pass(env: Env) -> None:
    slow, other = customer("wati"), customer("wati")
    first, second, unrelated = new_id("first"), new_id("second"), new_id("other")
    env.stand_ins.wati.add_media(f"data/images/{first}.png", png_bytes(), "image/png")
    env.stand_ins.openai.latency_for(lambda body: "input" in body and "file-" in str(body["input"]), 1.0)
    await env.submit(request(slow, first, [image(slow, 1, f"data/images/{first}.png")]))
    await env.submit(request(slow, second, [msg(slow, 2, text="¿recibieron?")]))
    await env.submit(request(other, unrelated, [msg(other, 1)]))

    [a] = await env.forwarded(first)
    [b] = await env.forwarded(second)
    await env.forwarded(unrelated)
    assert a.partition == b.partition and a.offset < b.offset  # the customer's order is kept
    assert a.value["images"][0]["category"] == "general_inquiry"
    order = [o.value["batch_id"] for o in env.out.records
             if o.topic == env.topics.responder_requests and o.value["batch_id"] in (first, unrelated)]
    assert order == [unrelated, first]  # a slow image does not hold up another customer


# -- ManyChat attachments ---------------------------------------------------------------------------
async def test_manychat_attachment_url_is_downloaded_with_a_plain_get(env: Env) -> None:
    cdn = Cdn()
    await cdn.start()
    try:
        cdn.files["photo.jpg"] = (JPEG, "image/jpeg")
        cust, batch = customer("manychat"), new_id("mc")
        await env.submit(request(cust, batch, [
            image(cust, 1, f"{cdn.url}/att/moved-photo.jpg"),   # redirected to photo.jpg
            image(cust, 2, f"{cdn.url}/att/gone.jpg"),
        ]))
        [forwarded] = await env.forwarded(batch)
        ok, gone = forwarded.value["images"]
        assert ok["category"] == "general_inquiry" and ok["mime"] == "image/jpeg" and ok["file_id"]
        assert env.stand_ins.openai.files[ok["file_id"]].data == JPEG
        assert gone["category"] == "unreadable"
        await eventually(lambda: len(env.dead(batch)) == 1, what="dead letter")
        [dead] = env.dead(batch)
        assert dead["reason"] == "image_download_failed" and "404" in dead["error"]
        assert [r.path for r in cdn.requests].count("/att/photo.jpg") == 1
    finally:
        await cdn.stop()


async def test_a_record_that_is_not_a_vision_request_is_dead_lettered(env: Env) -> None:
    cust, batch = customer("wati"), new_id("wrong")
    wrong = request(cust, batch, [msg(cust, 1)])
    await env.producer.send_and_wait(
        env.topics.vision_requests, codec.encode("ResponderRequest", dict(wrong)), key=cust.encode())
    await eventually(lambda: len(env.dead(batch)) == 1, what="dead letter")
    [dead] = env.dead(batch)
    assert dead["reason"] == "unexpected_record" and dead["payload"]
    assert env.out.of(env.topics.responder_requests, batch) == []


# -- bugs never leave the customer unanswered ---------------------------------------------------
async def test_unexpected_errors_still_forward_the_batch(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = env.vision.worker
    assert worker is not None
    cust = customer("wati")

    async def broken_fetch(channel: str, media_ref: str, customer_key: str | None = None) -> bytes:
        raise RuntimeError("bug in a download")

    monkeypatch.setattr(worker.fetcher, "fetch", broken_fetch)
    batch = new_id("bug1")
    await env.submit(request(cust, batch, [image(cust, 1, "data/images/any.jpg")]))
    [img] = (await env.forwarded(batch))[0].value["images"]
    assert img["category"] == "unreadable" and "bug" not in (img["description"] or "")
    await eventually(lambda: len(env.dead(batch)) == 1, what="dead letter")
    assert env.dead(batch)[0]["reason"] == "image_failed"
    assert env.dead(batch)[0]["error"] == "unexpected RuntimeError"

    async def broken_publish(*args: Any) -> None:
        raise RuntimeError("bug while publishing")

    monkeypatch.setattr(worker, "_publish_classified", broken_publish)
    batch = new_id("bug2")
    await env.submit(request(cust, batch, [msg(cust, 2), image(cust, 3, "data/images/any.jpg")]))
    [forwarded] = await env.forwarded(batch)
    assert [i["category"] for i in forwarded.value["images"]] == ["unreadable"]
    assert forwarded.value["messages"][0]["text"] == "text 2"
    await eventually(lambda: any(d["reason"] == "vision_failed" for d in env.dead(batch)),
                     what="dead letter")
