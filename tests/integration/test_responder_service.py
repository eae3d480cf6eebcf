"""The responder on the real broker with the OpenAI / WATI / ManyChat stand-ins (issue 4, point 4).

One responder (in-process runner) serves the module; each test uses its own customers. The restart
test runs two responders one after the other on topics of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from openai import AsyncOpenAI

from services.common import codec, metrics
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.records import InboundMessage, MissedItem, ResponderRequest
from services.common.timeparse import utcnow
from services.responder.ai import batch_reference, customer_hash
from services.responder.main import Responder
from services.responder.prompt import LABELS
from services.standins import StandIns
from services.standins.openai import default_reply
from tests.conftest import unique_prefix

pytestmark = pytest.mark.broker

INSTRUCTIONS = "Eres el asistente de prueba de la tienda."


async def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Counts:
    """Prometheus samples read before a fault is injected, so a test can assert exact rises.

    The responder runs in this process, so its counters are read from the registry directly.
    """

    def __init__(self, **samples: tuple[str, dict[str, str]]) -> None:
        self.samples = samples
        self.before = {name: self._value(*sample) for name, sample in samples.items()}

    @staticmethod
    def _value(metric: str, labels: dict[str, str]) -> float:
        return metrics.REGISTRY.get_sample_value(metric, labels) or 0.0

    def deltas(self) -> dict[str, float]:
        return {name: self._value(*sample) - self.before[name] for name, sample in self.samples.items()}

    async def expect(self, expected: dict[str, float], timeout: float = 10.0) -> None:
        """Waits until the rises equal `expected` exactly, then asserts it.

        A counter may lag the Kafka record a test saw by one step of the responder's coroutine
        (records are produced, then counted), hence the poll; a rise beyond `expected` fails.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.deltas() != expected and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert self.deltas() == expected


def openai_calls(outcome: str, purpose: str = "reply") -> tuple[str, dict[str, str]]:
    return "watistream_openai_requests_total", {"purpose": purpose, "outcome": outcome, "tenant": "default"}


def dead_letters(reason: str) -> tuple[str, dict[str, str]]:
    return "watistream_dead_letters_total", {"service": "responder", "reason": reason, "tenant": "default"}


def replies(outcome: str) -> tuple[str, dict[str, str]]:
    return "watistream_replies_total", {"outcome": outcome, "tenant": "default"}


def send_failures(channel: str, reason: str) -> tuple[str, dict[str, str]]:
    return "watistream_send_failures_total", {"channel": channel, "reason": reason, "tenant": "default"}


# ------------------------------------------------------------------------------------------ fixtures


class Outputs:
    """Every AssistantReply and DeadLetter of a topic set, read from the beginning (no group)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.replies: list[dict[str, Any]] = []
        self.reply_times: dict[str, float] = {}
        self.dead: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topics.replies, self.topics.dead_letter,
            bootstrap_servers=self.settings.kafka_bootstrap_servers, auto_offset_reset="earliest",
            enable_auto_commit=False, group_id=None, metadata_max_age_ms=1000,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for tp, records in batches.items():
                for r in records:
                    name, value = codec.decode_any(r.value)
                    if tp.topic == self.topics.replies:
                        assert name == "AssistantReply"
                        self.replies.append(value)
                        self.reply_times.setdefault(value["batch_id"], time.monotonic())
                    else:
                        self.dead.append(value)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    def for_batch(self, batch_id: str) -> list[dict[str, Any]]:
        return [r for r in self.replies if r["batch_id"] == batch_id]

    def dead_for(self, batch_id: str) -> list[dict[str, Any]]:
        return [d for d in self.dead if d["batch_id"] == batch_id]

    async def wait_reply(self, batch_id: str, count: int = 1, timeout: float = 30.0) -> dict[str, Any]:
        await eventually(lambda: len(self.for_batch(batch_id)) >= count, timeout, f"reply to {batch_id}")
        return self.for_batch(batch_id)[0]


class Env:
    """What a test gets: stand-ins, the running responder, a producer, the output collector."""

    def __init__(self, stand_ins: StandIns, settings: Settings, responder: Responder,
                 producer: AIOKafkaProducer, out: Outputs) -> None:
        self.s = stand_ins
        self.settings = settings
        self.responder = responder
        self.producer = producer
        self.out = out
        self.topics = Topics.from_settings(settings)
        self.reply_by_customer: dict[str, Callable[[dict[str, Any]], str]] = {}

    async def send(self, request: ResponderRequest, partition: int | None = None) -> None:
        await self.producer.send_and_wait(
            self.topics.responder_requests, codec.encode("ResponderRequest", dict(request)),
            key=request["customer_key"].encode(), partition=partition,
        )

    def responses_of(self, customer_key: str) -> list[dict[str, Any]]:
        """Request bodies of /v1/responses for one customer (by safety identifier), in order."""
        h = customer_hash(customer_key)
        return [r.body for r in self.s.openai.requests
                if r.path == "/v1/responses" and r.method == "POST" and isinstance(r.body, dict)
                and r.body.get("safety_identifier") == h]

    def completed_for(self, customer_key: str) -> list[Any]:
        h = customer_hash(customer_key)
        return [r for r in self.s.openai.responses.values() if r.request.get("safety_identifier") == h]

    def conversations_created_for(self, customer_key: str) -> int:
        h = customer_hash(customer_key)
        return sum(1 for r in self.s.openai.requests
                   if r.path == "/v1/conversations" and r.method == "POST" and isinstance(r.body, dict)
                   and (r.body.get("metadata") or {}).get("customer") == h)

    def wati_texts(self, contact: str) -> list[str]:
        return [m.text for m in self.s.wati.sent if m.contact_id == contact]


def responder_settings(settings: Settings, s: StandIns, **overrides: Any) -> Settings:
    return dataclasses.replace(
        settings,
        wati_api_url=s.wati_url, wati_api_token=s.wati.token,
        manychat_api_url=s.manychat_url, manychat_api_token=s.manychat.token,
        openai_base_url=s.openai_url, openai_api_key=s.openai.api_key,
        responder_concurrency=8, openai_max_attempts=3, openai_timeout_seconds=20,
        openai_max_output_tokens=4000,
        **overrides,
    )


@pytest.fixture(scope="module")
async def env(settings: Settings) -> AsyncIterator[Env]:
    async with StandIns.running() as s:
        rs = responder_settings(settings, s)
        await ensure_topics(rs)
        producer = make_producer(rs)
        await producer.start()
        out = Outputs(rs)
        await out.start()
        responder = Responder(rs, instructions=INSTRUCTIONS, web_port=0)
        await responder.start()
        e = Env(s, rs, responder, producer, out)

        def reply(body: dict[str, Any]) -> str:
            for key, fn in e.reply_by_customer.items():
                if body.get("safety_identifier") == customer_hash(key):
                    return fn(body)
            return default_reply(body)

        s.openai.reply_fn = reply
        try:
            await responder.wait_ready(60)
            yield e
        finally:
            await responder.stop()
            await out.stop()
            await producer.stop()


@pytest.fixture(autouse=True)
def _clean_faults(env: Env) -> None:
    env.s.openai.faults.clear()
    env.s.openai.clear_latency()
    env.s.openai.missing_file_status = 400
    env.s.wati.faults.clear()
    env.s.manychat.faults.clear()
    assert env.responder.worker is not None
    env.responder.worker.fallback_text = ""


# ------------------------------------------------------------------------------------------ builders

T0 = datetime(2025, 10, 7, 17, 40, tzinfo=UTC)


def new_customer(channel: str = "wati") -> tuple[str, str]:
    ident = str(random.randint(10**10, 10**11 - 1))
    return (f"wati:{ident}" if channel == "wati" else f"manychat:{ident}"), ident


def message(key: str, ident: str, text: str, channel: str = "wati", kind: str = "text") -> InboundMessage:
    now = utcnow()
    return {
        "event_id": f"wamid.{uuid.uuid4().hex}", "customer_key": key, "channel": channel,  # type: ignore[typeddict-item]
        "provider_id": ident, "message_type": kind, "text": text, "caption": None, "media_ref": None,
        "media_mime": None, "sender_name": ident, "provider_message_ids": [], "provider_time": now,
        "received_at": now,
    }


def batch(key: str, ident: str, *texts: str, channel: str = "wati", missed: list[MissedItem] | None = None,
          batch_id: str | None = None) -> ResponderRequest:
    return {
        "batch_id": batch_id or f"{key}:{uuid.uuid4().int % 10**6}", "customer_key": key, "channel": channel,  # type: ignore[typeddict-item]
        "provider_id": ident, "messages": [message(key, ident, t, channel) for t in texts],
        "prior_last_inbound_at": None, "prior_last_reply_at": None, "gap_seconds": None,
        "missed_check_ran": bool(missed), "missed_messages": missed or [], "missed_dropped_oldest": 0,
        "images": [], "created_at": utcnow(),
    }


def input_text(body: dict[str, Any], role: str) -> str | None:
    for item in body["input"]:
        if item["role"] == role:
            return "\n".join(p["text"] for p in item["content"] if p["type"] == "input_text")
    return None


# ------------------------------------------------------------------------------------------ tests


async def test_first_message_creates_exactly_one_conversation_for_queued_batches(env: Env) -> None:
    """Also the bug #7 regression: a customer without a conversation gets one and an answer."""
    key, ident = new_customer()
    batches = [batch(key, ident, f"Hola {i}") for i in range(3)]
    for b in batches:
        await env.send(b)
    for b in batches:
        await env.out.wait_reply(b["batch_id"])
    assert env.conversations_created_for(key) == 1
    completed = env.completed_for(key)
    assert len(completed) == 3
    assert len({r.conversation_id for r in completed}) == 1
    replies = [env.out.for_batch(b["batch_id"])[0] for b in batches]
    assert [r["outcome"] for r in replies] == ["answered"] * 3
    assert {r["conversation_id"] for r in replies} == {completed[0].conversation_id}
    assert env.wati_texts(ident) == [f'Thanks for your message: "Hola {i}". How can I help you further?'
                                     for i in range(3)]
    assert all("error" not in t.lower() for t in env.wati_texts(ident))
    body = env.responses_of(key)[0]
    assert body["instructions"] == INSTRUCTIONS
    assert body["metadata"] == {"batch": batch_reference(batches[0]["batch_id"], key)}
    assert ident not in json.dumps(body) and key not in json.dumps(body)
    reply = replies[0]
    assert reply["response_id"] == completed[0].id
    assert reply["input_tokens"] > 0 and reply["output_tokens"] > 0
    assert reply["provider_message_ids"] and reply["parts"] == [reply["text"]]


async def test_missed_messages_reach_openai_as_a_labelled_block_in_order(env: Env) -> None:
    key, ident = new_customer()
    missed: list[MissedItem] = [
        {"at": T0 + timedelta(minutes=4), "role": "customer", "agent_name": None, "text": "¿Y el envío?",
         "message_type": "text", "source": "history", "item_ids": ["w2"]},
        {"at": T0 + timedelta(minutes=1), "role": "agent", "agent_name": "Ana", "text": "Hola, soy Ana",
         "message_type": "text", "source": "realtime", "item_ids": ["w1"]},
        {"at": T0 + timedelta(minutes=5), "role": "agent", "agent_name": "Ana", "text": "Sale mañana",
         "message_type": "text", "source": "both", "item_ids": ["w3"]},
    ]
    b = batch(key, ident, "Gracias", "¿A qué hora?", missed=missed)
    await env.send(b)
    await env.out.wait_reply(b["batch_id"])
    [body] = env.responses_of(key)
    assert [i["role"] for i in body["input"]] == ["developer", "user"]
    assert input_text(body, "developer") == "\n".join([
        "MENSAJES ENTRE EL CLIENTE Y AGENTES HUMANOS",
        LABELS["es"].missed_intro,
        "[2025-10-07 17:41] Agente (Ana): Hola, soy Ana",
        "[2025-10-07 17:44] Cliente: ¿Y el envío?",
        "[2025-10-07 17:45] Agente (Ana): Sale mañana",
    ])
    assert input_text(body, "user") == "Gracias\n¿A qué hora?"
    # a batch without missed messages has no developer message
    b2 = batch(key, ident, "Ok")
    await env.send(b2)
    await env.out.wait_reply(b2["batch_id"])
    assert [i["role"] for i in env.responses_of(key)[1]["input"]] == ["user"]


async def test_deleted_conversation_is_recreated_and_answered(env: Env) -> None:
    key, ident = new_customer()
    first = batch(key, ident, "Primera")
    await env.send(first)
    old = (await env.out.wait_reply(first["batch_id"]))["conversation_id"]
    client = AsyncOpenAI(api_key=env.s.openai.api_key, base_url=env.s.openai_url)
    await client.conversations.delete(old)
    await client.close()
    second = batch(key, ident, "Segunda")
    await env.send(second)
    reply = await env.out.wait_reply(second["batch_id"])
    assert reply["outcome"] == "answered" and reply["conversation_id"] not in (None, old)
    assert env.conversations_created_for(key) == 2
    third = batch(key, ident, "Tercera")
    await env.send(third)
    assert (await env.out.wait_reply(third["batch_id"]))["conversation_id"] == reply["conversation_id"]
    assert env.conversations_created_for(key) == 2
    assert env.out.dead_for(second["batch_id"]) == []


async def test_rate_limit_then_success(env: Env) -> None:
    key, ident = new_customer()
    counts = Counts(limited=openai_calls("rate_limited"), ok=openai_calls("ok"), answered=replies("answered"),
                    dead=dead_letters("rate_limited"))
    env.s.openai.fail_next(429, times=1)
    b = batch(key, ident, "Hola")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "answered"
    assert len(env.responses_of(key)) == 2  # the 429, then the answer
    assert env.wati_texts(ident) == [reply["text"]]
    await counts.expect({"limited": 1, "ok": 1, "answered": 1, "dead": 0})


async def test_a_429_storm_across_customers_is_absorbed_and_counted_exactly(env: Env) -> None:
    """Drill (issue 7, point 3): every customer answered once, the metrics count every fault."""
    def sample(outcome: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "watistream_openai_requests_total", {"purpose": "reply", "outcome": outcome, "tenant": "default"})
        return value or 0.0

    limited_before, ok_before = sample("rate_limited"), sample("ok")
    customers = [new_customer() for _ in range(12)]
    storm = 24  # two rate-limited answers per customer on average; each call retries ≤ 3 times
    env.s.openai.fail_next(429, code="rate_limit_exceeded", times=storm)
    batches = [batch(key, ident, f"hola {n}") for n, (key, ident) in enumerate(customers)]
    for b in batches:
        await env.send(b)
    replies = [await env.out.wait_reply(b["batch_id"]) for b in batches]
    limited = sample("rate_limited") - limited_before
    answered = [r for r in replies if r["outcome"] == "answered"]
    given_up = [r for r in replies if r["outcome"] != "answered"]
    # Each customer got one reply or a dead letter with the reason, never an error text.
    for (_key, ident), reply in zip(customers, replies, strict=True):
        assert env.wati_texts(ident) == ([reply["text"]] if reply["outcome"] == "answered" else [])
    for reply in given_up:
        await eventually(lambda r=reply: bool(env.out.dead_for(r["batch_id"])), what="dead letter")
        assert env.out.dead_for(reply["batch_id"])[0]["reason"] == "rate_limited"
    assert limited == storm, "every injected 429 is counted once"
    assert sample("ok") - ok_before == len(answered)
    assert len(answered) >= len(customers) - storm // 3  # only a customer hit 3 times gives up


async def test_server_errors_exhausted_dead_letter_and_nothing_sent(env: Env) -> None:
    key, ident = new_customer()
    counts = Counts(server_error=openai_calls("server_error"), ok=openai_calls("ok"),
                    dead=dead_letters("server_error"), nothing_sent=replies("nothing_sent"))
    env.s.openai.fail_next(500, times=3)
    b = batch(key, ident, "Hola")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "nothing_sent" and reply["text"] == "" and reply["parts"] == []
    assert len(env.responses_of(key)) == 3
    assert env.wati_texts(ident) == []
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    [dead] = env.out.dead_for(b["batch_id"])
    assert dead["reason"] == "server_error" and dead["service"] == "responder"
    assert dead["customer_key"] == key and "HTTP 500" in dead["error"]
    assert "Hola" not in dead["error"]
    # OPENAI_MAX_ATTEMPTS = 3: every injected 500 is counted, one dead letter, one reply record
    await counts.expect({"server_error": 3, "ok": 0, "dead": 1, "nothing_sent": 1})
    # the batch is done: a redelivery is not retried
    await env.send(b)
    await env.out.wait_reply(b["batch_id"], count=2)
    assert len(env.responses_of(key)) == 3
    # the conversation created for the failed batch is kept: the next batch uses it
    b2 = batch(key, ident, "¿Hola?")
    await env.send(b2)
    assert (await env.out.wait_reply(b2["batch_id"]))["outcome"] == "answered"
    assert env.conversations_created_for(key) == 1


async def test_server_errors_exhausted_with_fallback_text(env: Env) -> None:
    assert env.responder.worker is not None
    env.responder.worker.fallback_text = "Un agente le responderá en breve."
    key, ident = new_customer()
    counts = Counts(server_error=openai_calls("server_error"), ok=openai_calls("ok"),
                    dead=dead_letters("server_error"), fallback=replies("fallback"))
    env.s.openai.fail_next(503, times=3)
    b = batch(key, ident, "Hola")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "fallback" and reply["text"] == "Un agente le responderá en breve."
    assert reply["response_id"] is None
    assert env.wati_texts(ident) == ["Un agente le responderá en breve."]
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    assert env.out.dead_for(b["batch_id"])[0]["reason"] == "server_error"
    await counts.expect({"server_error": 3, "ok": 0, "dead": 1, "fallback": 1})
    b2 = batch(key, ident, "¿Hola?")
    await env.send(b2)
    assert (await env.out.wait_reply(b2["batch_id"]))["outcome"] == "answered"
    assert env.conversations_created_for(key) == 1


@pytest.mark.parametrize(("status", "code", "type_", "reason"), [
    (429, "insufficient_quota", None, "insufficient_quota"),
    # billing bodies as OpenAI sends them now (issue 13, point 7): before, each was retried as a
    # rate limit (OPENAI_MAX_ATTEMPTS calls, counted `rate_limited`, dead-lettered `rate_limited`)
    (429, "credit_balance_exhausted", None, "insufficient_quota"),
    (429, "organization_spend_limit_exceeded", None, "insufficient_quota"),
    (429, "project_spend_limit_exceeded", None, "insufficient_quota"),
    (429, "organization_usage_limit_exceeded", None, "insufficient_quota"),
    (429, None, "insufficient_quota", "insufficient_quota"),  # older bodies: code null
    (400, None, None, "bad_request"),
    (401, None, None, "unauthorized"),
])
async def test_non_retryable_errors_fail_at_once(
    env: Env, status: int, code: str | None, type_: str | None, reason: str
) -> None:
    key, ident = new_customer()
    counts = Counts(failed=openai_calls(reason), ok=openai_calls("ok"), dead=dead_letters(reason),
                    nothing_sent=replies("nothing_sent"), rate_limited=openai_calls("rate_limited"))
    env.s.openai.fail_next(status, code=code, type_=type_, times=3)
    b = batch(key, ident, "Hola")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "nothing_sent"
    assert len(env.responses_of(key)) == 1
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    assert env.out.dead_for(b["batch_id"])[0]["reason"] == reason
    assert env.wati_texts(ident) == []
    env.s.openai.faults.clear()
    # one call, not retried
    await counts.expect({"failed": 1, "ok": 0, "dead": 1, "nothing_sent": 1, "rate_limited": 0})


async def test_openai_timeouts_fall_back_and_every_attempt_is_counted(env: Env) -> None:
    """Issue 7 point 3: OpenAI answers slower than the client waits, on every attempt."""
    worker = env.responder.worker
    assert worker is not None
    worker.fallback_text = "Un agente le responderá en breve."
    key, ident = new_customer()
    env.s.openai.latency_for(lambda body: body.get("safety_identifier") == customer_hash(key), 0.6)
    locked_before = env.s.openai.locked_count
    counts = Counts(timeout=openai_calls("timeout"), locked=openai_calls("conversation_locked"),
                    ok=openai_calls("ok"), dead=dead_letters("timeout"), fallback=replies("fallback"))
    client = worker.replier.client
    worker.replier.client = client.with_options(timeout=0.25)  # shares the connection pool
    try:
        b = batch(key, ident, "Hola")
        await env.send(b)
        reply = await env.out.wait_reply(b["batch_id"])
    finally:
        worker.replier.client = client
    assert reply["outcome"] == "fallback" and env.wati_texts(ident) == ["Un agente le responderá en breve."]
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    [dead] = env.out.dead_for(b["batch_id"])
    assert dead["reason"] == "timeout" and "after 3 attempts" in dead["error"] and "Hola" not in dead["error"]
    # An abandoned call keeps the stand-in's conversation busy until its latency ends, so the next
    # attempt may meet `conversation_locked` (waited out, not an attempt): how often depends on
    # timing, but each such answer is counted once, and exactly OPENAI_MAX_ATTEMPTS time out.
    locked = env.s.openai.locked_count - locked_before
    assert len(env.responses_of(key)) == 3 + locked
    await counts.expect({"timeout": 3, "locked": locked, "ok": 0, "dead": 1, "fallback": 1})
    await eventually(lambda: env.s.openai.in_flight == 0, what="abandoned calls finished")


@pytest.mark.parametrize(("channel", "status", "reason"), [
    ("wati", 200, "result_false"),  # a 200 whose body says `result: false`
    ("facebook", 400, "rejected"),
    ("instagram", 403, "unauthorized"),
    ("facebook", 404, "client_error"),
])
async def test_a_refused_send_is_dead_lettered_counted_once_and_not_retried(
    env: Env, channel: str, status: int, reason: str
) -> None:
    """Issue 7 point 3: WATI `result: false` and ManyChat 4xx end the send at once."""
    key, ident = new_customer("wati" if channel == "wati" else "manychat")
    counts = Counts(send_failed=send_failures(channel, reason), dead=dead_letters("send_failed"),
                    nothing_sent=replies("nothing_sent"), answered=replies("answered"))
    if channel == "wati":
        env.s.wati.fail_next("send", status)
    else:
        env.s.manychat.fail_next(status)
    # a production batch id (`<customer key>:<seq>`): the send-failure count takes its tenant from it
    b = batch(key, ident, "Hola", channel=channel, batch_id=f"{key}:1")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "nothing_sent" and reply["parts"] == []
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    [dead] = env.out.dead_for(b["batch_id"])
    assert dead["reason"] == "send_failed" and dead["error"] == f"{reason} after 0 part(s) on {channel}"
    if channel == "wati":
        attempts = [r for r in env.s.wati.requests if r.path.endswith(f"/sendSessionMessage/{ident}")]
        assert env.wati_texts(ident) == []
    else:
        attempts = [r for r in env.s.manychat.requests if isinstance(r.body, dict)
                    and str(r.body.get("subscriber_id")) == ident]
        assert env.s.manychat.texts_for(ident) == []
    assert len(attempts) == 1  # not retried: the provider said no
    await counts.expect({"send_failed": 1, "dead": 1, "nothing_sent": 1, "answered": 0})


async def test_empty_model_output_is_a_failure_never_sent(env: Env) -> None:
    key, ident = new_customer()
    env.reply_by_customer[key] = lambda body: ""
    b = batch(key, ident, "Hola")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "nothing_sent"
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    assert env.out.dead_for(b["batch_id"])[0]["reason"] == "empty_output"
    assert env.wati_texts(ident) == []


async def test_truncated_answer_is_a_failure_never_sent(env: Env) -> None:
    key, ident = new_customer()
    env.reply_by_customer[key] = lambda body: "Muy largo. " * 2000  # ~5500 tokens > 4000
    b = batch(key, ident, "Hola")
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "nothing_sent"
    assert env.responses_of(key)[0]["max_output_tokens"] == 4000
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    assert env.out.dead_for(b["batch_id"])[0]["reason"] == "incomplete"
    assert env.wati_texts(ident) == []


async def test_no_conversation_locked_under_load(env: Env) -> None:
    env.s.openai.latency = 0.03
    locked_before = env.s.openai.locked_count
    customers = [new_customer() for _ in range(20)]
    plan = {key: [batch(key, ident, f"mensaje {n}") for n in range(5)] for key, ident in customers}
    sends = [env.producer.send(env.topics.responder_requests, codec.encode("ResponderRequest", dict(b)),
                               key=key.encode())
             for n in range(5) for key, batches in plan.items() for b in [batches[n]]]
    for fut in await asyncio.gather(*sends):
        await fut
    all_ids = [b["batch_id"] for batches in plan.values() for b in batches]
    await eventually(lambda: all(env.out.for_batch(i) for i in all_ids), timeout=60, what="100 replies")
    assert env.s.openai.locked_count == locked_before
    for key, batches in plan.items():
        assert env.conversations_created_for(key) == 1
        assert len({r.conversation_id for r in env.completed_for(key)}) == 1
        ordered = [r["batch_id"] for r in env.out.replies if r["customer_key"] == key]
        assert ordered == [b["batch_id"] for b in batches]  # one reply per batch, in order
        _, ident = key.split(":")
        assert env.wati_texts(ident) == [f'Thanks for your message: "mensaje {n}". How can I help you '
                                         "further?" for n in range(5)]


LONG = "\n\n".join(
    " ".join(f"Frase número {p}-{n} con información útil para el cliente." for n in range(40))
    for p in range(5)
)


@pytest.mark.parametrize("channel", ["wati", "facebook", "instagram"])
async def test_long_answers_are_split_within_channel_limits(env: Env, channel: str) -> None:
    key, ident = new_customer(channel)
    env.reply_by_customer[key] = lambda body: LONG
    b = batch(key, ident, "Cuéntame todo", channel=channel)
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "answered" and reply["text"] == LONG
    if channel == "wati":
        sent = env.wati_texts(ident)
        limit = 4096
    else:
        calls = [c for c in env.s.manychat.sent if c.subscriber_id == ident]
        assert {c.channel for c in calls} == {channel}
        sent = env.s.manychat.texts_for(ident)
        limit = 2000
    assert len(sent) > 1 and all(0 < len(t) <= limit for t in sent)
    assert sent == reply["parts"]
    assert " ".join(" ".join(sent).split()) == " ".join(LONG.split())


async def test_duplicate_batch_is_answered_once(env: Env) -> None:
    key, ident = new_customer()
    b = batch(key, ident, "Hola")
    await env.send(b)
    first = await env.out.wait_reply(b["batch_id"])
    await asyncio.sleep(0.8)  # time passes before the redelivery (not a synchronisation)
    await env.send(b)
    await env.out.wait_reply(b["batch_id"], count=2)
    second = env.out.for_batch(b["batch_id"])[1]
    assert len(env.responses_of(key)) == 1
    assert len(env.wati_texts(ident)) == 1
    for field in ("outcome", "text", "parts", "provider_message_ids", "response_id", "conversation_id"):
        assert second[field] == first[field]
    assert abs((second["sent_at"] - first["sent_at"]).total_seconds()) < 0.5  # the original send time


async def test_redelivered_older_batch_keeps_its_original_send_time(env: Env) -> None:
    """Re-publishing "now" would move the context's cutoff past what humans wrote (bug 6)."""
    key, ident = new_customer()
    older, newer = batch(key, ident, "Hola"), batch(key, ident, "¿Y el precio?")
    await env.send(older)
    first = await env.out.wait_reply(older["batch_id"])
    await env.send(newer)
    await env.out.wait_reply(newer["batch_id"])
    await env.send(older)  # redelivered after a later batch changed the customer's state
    await env.out.wait_reply(older["batch_id"], count=2)
    again = env.out.for_batch(older["batch_id"])[1]
    assert again["sent_at"] == first["sent_at"]
    assert len(env.wati_texts(ident)) == 2


async def test_slow_customer_does_not_delay_another_on_the_same_partition(env: Env) -> None:
    slow_key, slow_ident = new_customer()
    fast_key, fast_ident = new_customer()
    env.s.openai.latency_for(lambda body: body.get("safety_identifier") == customer_hash(slow_key), 2.0)
    slow, fast = batch(slow_key, slow_ident, "lento"), batch(fast_key, fast_ident, "rápido")
    await env.send(slow, partition=0)
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await env.send(fast, partition=0)
    await env.out.wait_reply(fast["batch_id"])
    fast_seconds = time.monotonic() - started
    await env.out.wait_reply(slow["batch_id"])
    assert env.out.reply_times[fast["batch_id"]] < env.out.reply_times[slow["batch_id"]]
    assert fast_seconds < 1.5


async def test_images_from_vision_reach_openai_by_file_id(env: Env) -> None:
    client = AsyncOpenAI(api_key=env.s.openai.api_key, base_url=env.s.openai_url)
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
           b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00"
           b"\x00IEND\xaeB`\x82")
    uploaded = await client.files.create(file=("pago.png", png, "image/png"), purpose="vision")
    await client.close()
    key, ident = new_customer()
    b = batch(key, ident)
    b["messages"] = [{**message(key, ident, "", kind="image"), "caption": "mi pago",
                      "media_ref": "data/images/pago.png", "media_mime": "image/png"}]
    b["images"] = [{"media_ref": "data/images/pago.png", "file_id": uploaded.id, "mime": "image/png",
                    "category": "payment_proof", "confidence": 0.9, "description": None}]
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "answered"
    [body] = env.responses_of(key)
    assert body["input"][-1]["content"] == [
        {"type": "input_text", "text": "[Imagen] mi pago"},
        {"type": "input_text", "text": "Imagen 1: clasificada como comprobante de pago (confianza 90%)."},
        {"type": "input_image", "file_id": uploaded.id, "detail": "low"},
    ]
    assert env.conversations_created_for(key) == 1  # the image's answer lives in the conversation


async def test_a_404_about_a_deleted_image_file_keeps_the_customers_conversation(env: Env) -> None:
    """Issue 13, point 7: vision's file deleted before the answer. OpenAI's 404 names the file; it
    was taken for "conversation gone" and a new conversation dropped the customer's history."""
    client = AsyncOpenAI(api_key=env.s.openai.api_key, base_url=env.s.openai_url)
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
           b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00"
           b"\x00IEND\xaeB`\x82")
    uploaded = await client.files.create(file=("pago.png", png, "image/png"), purpose="vision")
    await client.files.delete(uploaded.id)
    await client.close()
    key, ident = new_customer()
    first = batch(key, ident, "Quiero pagar mi pedido")
    await env.send(first)
    conversation = (await env.out.wait_reply(first["batch_id"]))["conversation_id"]
    env.s.openai.missing_file_status = 404
    counts = Counts(not_found=openai_calls("not_found"), gone=openai_calls("conversation_not_found"),
                    checked=openai_calls("ok", "conversation_check"), dead=dead_letters("not_found"),
                    nothing_sent=replies("nothing_sent"))
    second = batch(key, ident)
    second["messages"] = [{**message(key, ident, "", kind="image"), "caption": "mi pago",
                           "media_ref": "data/images/pago.png", "media_mime": "image/png"}]
    second["images"] = [{"media_ref": "data/images/pago.png", "file_id": uploaded.id, "mime": "image/png",
                         "category": "payment_proof", "confidence": 0.9, "description": None}]
    await env.send(second)
    reply = await env.out.wait_reply(second["batch_id"])
    assert reply["outcome"] == "nothing_sent" and reply["conversation_id"] == conversation
    await eventually(lambda: bool(env.out.dead_for(second["batch_id"])), what="dead letter")
    [dead] = env.out.dead_for(second["batch_id"])
    assert dead["reason"] == "not_found" and "HTTP 404" in dead["error"] and "mi pago" not in dead["error"]
    await counts.expect({"not_found": 1, "gone": 0, "checked": 1, "dead": 1, "nothing_sent": 1})
    assert env.conversations_created_for(key) == 1 and not env.s.openai.is_deleted(conversation)
    # the next batch is answered in the same conversation, with the first batch's history in it
    third = batch(key, ident, "¿Recibieron mi pago?")
    await env.send(third)
    assert (await env.out.wait_reply(third["batch_id"]))["conversation_id"] == conversation
    [*_, record] = env.completed_for(key)
    assert "Quiero pagar mi pedido" in json.dumps(record.effective_input, ensure_ascii=False)


async def test_ops_endpoints(env: Env) -> None:
    port = env.responder.port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True, "reason": "ok"}
        metrics = (await http.get("/metrics")).text
    assert 'watistream_replies_total{outcome="answered",tenant="default"}' in metrics
    assert 'watistream_agent_up{agent="requests",service="responder"} 1.0' in metrics
    assert 'watistream_openai_requests_total{outcome="ok",purpose="reply",tenant="default"}' in metrics


async def test_invalid_request_is_dead_lettered_and_closed(env: Env) -> None:
    key, ident = new_customer()
    b = batch(key, ident, "Hola")
    b["channel"] = "facebook"  # a WATI customer key on a ManyChat channel
    await env.send(b)
    reply = await env.out.wait_reply(b["batch_id"])
    assert reply["outcome"] == "nothing_sent"
    await eventually(lambda: bool(env.out.dead_for(b["batch_id"])), what="dead letter")
    assert env.out.dead_for(b["batch_id"])[0]["reason"] == "invalid_request"
    assert env.responses_of(key) == []


# ------------------------------------------------------------------------------------------ restart


async def test_restart_before_the_send_completes_answers_once(env: Env, kafka: str) -> None:
    """Generated, then stopped while the send is failing over: the restart sends the stored text."""
    rs = dataclasses.replace(env.settings, topic_prefix=unique_prefix("responder-restart"))
    await ensure_topics(rs)
    out = Outputs(rs)
    await out.start()
    producer = make_producer(rs)
    await producer.start()
    key, ident = new_customer()
    b = batch(key, ident, "Hola, ¿siguen abiertos?")
    first = Responder(rs, instructions=INSTRUCTIONS, serve_http=False, drain_timeout=0.1)
    second: Responder | None = None
    try:
        await first.start()
        await first.wait_ready(60)
        env.s.wati.fail_next("send", 503, times=100)
        await producer.send_and_wait(Topics.from_settings(rs).responder_requests,
                                     codec.encode("ResponderRequest", dict(b)), key=key.encode())
        await eventually(lambda: any(ident in r.path and "sendSessionMessage" in r.path
                                     for r in env.s.wati.requests), what="first send attempt")
        await first.stop()  # the sender is backing off: the batch is generated, not sent
        assert out.for_batch(b["batch_id"]) == []
        assert len(env.completed_for(key)) == 1
        env.s.wati.faults.clear()
        second = Responder(rs, instructions=INSTRUCTIONS, serve_http=False)
        await second.start()
        reply = await out.wait_reply(b["batch_id"])
        assert reply["outcome"] == "answered"
        assert len(env.completed_for(key)) == 1  # no second OpenAI call
        assert env.wati_texts(ident) == [reply["text"]]
        assert reply["response_id"] == env.completed_for(key)[0].id
        # the customer's record came along: the next batch uses the same conversation
        b2 = batch(key, ident, "Gracias")
        await producer.send_and_wait(Topics.from_settings(rs).responder_requests,
                                     codec.encode("ResponderRequest", dict(b2)), key=key.encode())
        reply2 = await out.wait_reply(b2["batch_id"])
        assert reply2["conversation_id"] == reply["conversation_id"]
        assert env.conversations_created_for(key) == 1
        assert len(out.for_batch(b["batch_id"])) == 1
    finally:
        if second is not None:
            await second.stop()
        await producer.stop()
        await out.stop()


async def test_cli_worker_answers_and_stops_cleanly_on_sigterm(env: Env, tmp_path: Any) -> None:
    """`watistream responder` as a process: ready, answers, logs no phone number, exits 0 on SIGTERM."""
    import os
    import signal
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prefix = unique_prefix("responder-cli")
    rs = dataclasses.replace(env.settings, topic_prefix=prefix)
    await ensure_topics(rs)
    out = Outputs(rs)
    await out.start()
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("OPENAI", "WATI", "MANYCHAT", "KAFKA"))}
    environ.update(env.s.env())
    environ.update({
        "KAFKA_BOOTSTRAP_SERVERS": rs.kafka_bootstrap_servers, "TOPIC_PREFIX": prefix,
        "TOPIC_PARTITIONS": str(rs.topic_partitions), "RESPONDER_WEB_PORT": str(port),
        "BROKER_SESSION_TIMEOUT_SECONDS": "10", "RESPONDER_CONCURRENCY": "4",
    })
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "responder", cwd=str(tmp_path), env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async def ready() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not await ready():
                assert proc.returncode is None, "worker exited"
                assert loop.time() < deadline, "worker not ready"
                await asyncio.sleep(0.1)
            # the process watches its event loop (observed every 0.25 s)
            while 'watistream_event_loop_lag_seconds_count{service="responder"}' not in (
                await http.get("/metrics")
            ).text:
                assert loop.time() < deadline, "the responder process exports no event loop lag"
                await asyncio.sleep(0.1)
        key, ident = new_customer()
        b = batch(key, ident, "Hola desde el proceso")
        await env.producer.send_and_wait(Topics.from_settings(rs).responder_requests,
                                         codec.encode("ResponderRequest", dict(b)), key=key.encode())
        reply = await out.wait_reply(b["batch_id"])
        assert reply["outcome"] == "answered" and env.wati_texts(ident) == [reply["text"]]
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        log_text = stderr.decode()
        assert '"event": "batch_done"' in log_text and "responder_stopped" in log_text
        assert ident not in log_text and "Hola desde el proceso" not in log_text
        assert env.s.openai.api_key not in log_text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await out.stop()
