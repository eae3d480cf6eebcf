"""The context service end to end on the real broker: `watistream context` as a subprocess, inputs
produced straight to its topics, outputs read from responder-requests / vision-requests / audit /
dead-letter, WATI replaced by the stand-in (reached by the production WatiClient).

One worker (RocksDB store) serves every scenario of this module, each with its own customers; the
last scenarios restart it (SIGTERM, start again: RocksDB + changelog recovery). Timelines use
provider times in the past and short thresholds (quiet window 1 s), never sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, make_producer
from services.common.timeparse import utcnow
from services.standins import StandIns

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 120.0
EVENT_TIMEOUT = 30.0
_numbers = itertools.count(1)


# -- harness ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce `settings` in a subprocess."""
    env: dict[str, str] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        env[f.metadata["env"]] = str(value)
    return env


@dataclass
class ContextWorker:
    """One `watistream context` subprocess, its web port and its log file."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.context_web_port}"

    def start(self) -> ContextWorker:
        env = {k: v for k, v in os.environ.items() if k not in {f.metadata["env"] for f in fields(Settings)}}
        env.update(settings_env(self.settings))
        env["PYTHONUNBUFFERED"] = "1"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "context"], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def readyz(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        try:
            response = await client.get(self.url + "/readyz", timeout=2.0)
        except httpx.HTTPError:
            return None
        doc: dict[str, Any] = response.json()
        return doc if response.status_code == 200 else None

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"context worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            doc = await self.readyz(client)
            if doc is not None:
                return doc
            if loop.time() > deadline:
                raise AssertionError(f"context worker not ready after {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for a clean exit."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"context worker ignored SIGTERM:\n{self.log_tail()}") from None


class Bus:
    """Produces inputs and records every output of the module's topics (decoded, with keys)."""

    def __init__(self, settings: Settings, topics: Topics, also: list[str] | None = None) -> None:
        self.settings = settings
        self.topics = topics
        self.outputs = [topics.responder_requests, topics.vision_requests, topics.audit, topics.dead_letter,
                        *(also or [])]
        self.records: dict[str, list[tuple[str | None, dict[str, Any]]]] = {t: [] for t in self.outputs}
        self.producer: AIOKafkaProducer = make_producer(settings)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                         enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        parts = [TopicPartition(t, p) for t in self.outputs for p in range(self.settings.topic_partitions)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self._task = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            for tp, messages in batch.items():
                for message in messages:
                    key = message.key.decode() if message.key else None
                    self.records[tp.topic].append((key, codec.decode_any(message.value)[1]))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def send(self, topic: str, schema: str, value: dict[str, Any]) -> None:
        await self.producer.send_and_wait(topic, codec.encode(schema, value),
                                          key=value["customer_key"].encode())

    async def inbound(self, value: dict[str, Any]) -> None:
        await self.send(self.topics.inbound, "InboundMessage", value)

    async def reply(self, value: dict[str, Any]) -> None:
        await self.send(self.topics.replies, "AssistantReply", value)

    async def activity(self, value: dict[str, Any]) -> None:
        await self.send(self.topics.agent_activity, "AgentActivity", value)

    async def send_raw(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        await self.producer.send_and_wait(topic, value, key=key)

    def of(self, topic: str, customer: str) -> list[dict[str, Any]]:
        """Decoded outputs of one customer on one topic, in arrival order."""
        found = []
        for key, value in self.records[topic]:
            inner = value.get("request", value)
            if key == customer or inner.get("customer_key") == customer:
                found.append(value)
        return found

    async def wait_for(
        self, topic: str, customer: str, count: int = 1, timeout: float = EVENT_TIMEOUT,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = [v for v in self.of(topic, customer) if where(v)]
            if len(found) >= count:
                return found
            if loop.time() > deadline:
                raise AssertionError(f"waited {timeout}s for {count} record(s) of {customer} on {topic}, "
                                     f"got {len(found)}")
            await asyncio.sleep(0.05)

    async def settle(self, seconds: float) -> None:
        """Lets the worker act for a while before asserting that nothing MORE happened.

        This is the only fixed wait: proving an absence needs a bounded observation window, which
        is taken after a positive event proved the worker is processing this customer's partition.
        """
        await asyncio.sleep(seconds)


def new_customer() -> tuple[str, str]:
    """(customer key, waId) unique to this test run."""
    wa_id = f"5037{uuid.uuid4().int % 10**8:08d}"
    return f"wati:{wa_id}", wa_id


def inbound(customer: str, text: str, at: datetime, *, event_id: str | None = None,
            message_type: str = "text", media_ref: str | None = None) -> dict[str, Any]:
    _, _, wa_id = customer.partition(":")
    eid = event_id or f"wamid.TEST{next(_numbers):06d}{uuid.uuid4().hex[:8]}"
    return {
        "event_id": eid, "customer_key": customer, "channel": "wati", "provider_id": wa_id,
        "message_type": message_type, "text": text, "caption": None, "media_ref": media_ref,
        "media_mime": "image/jpeg" if media_ref else None, "sender_name": "Customer",
        "provider_message_ids": [eid], "provider_time": at, "received_at": utcnow(),
        "recovered": False, "username": None,
    }


def reply(customer: str, batch_id: str, text: str, sent_at: datetime,
          ids: list[str] | None = None) -> dict[str, Any]:
    _, _, wa_id = customer.partition(":")
    return {
        "batch_id": batch_id, "customer_key": customer, "channel": "wati", "provider_id": wa_id,
        "outcome": "answered", "text": text, "parts": [text], "sent_at": sent_at,
        "provider_message_ids": ids or [f"wamid.OWN{uuid.uuid4().hex[:12]}"], "response_id": "resp_1",
        "conversation_id": "conv_1", "input_tokens": 1, "output_tokens": 1,
    }


def activity(customer: str, text: str, at: datetime, *, kind: str = "human_agent",
             operator: str | None = "Ana Agent", ids: list[str] | None = None) -> dict[str, Any]:
    _, _, wa_id = customer.partition(":")
    eid = (ids or [f"wamid.AG{uuid.uuid4().hex[:12]}"])[0]
    return {
        "event_id": eid, "customer_key": customer, "channel": "wati", "provider_id": wa_id,
        "event_type": "sessionMessageSent_v2", "sender_kind": kind, "operator_name": operator,
        "operator_email": "ana@example.com" if operator else None, "message_type": "text", "text": text,
        "provider_message_ids": ids or [eid], "local_message_id": None, "provider_time": at,
        "received_at": utcnow(),
    }


def texts(request: dict[str, Any]) -> list[str]:
    return [m["text"] for m in request["messages"]]


# -- fixtures -----------------------------------------------------------------------------------------

HOLD_CUSTOMER = "wati:50399990001"


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as s:
        yield s


@pytest.fixture(scope="module")
def worker_settings(settings: Settings, stand_ins: StandIns, tmp_path_factory: pytest.TempPathFactory
                    ) -> Settings:
    return dataclasses.replace(
        settings,
        wati_api_url=stand_ins.wati_url,
        wati_api_token=stand_ins.wati.token,
        quiet_window_seconds=1.0,
        max_batch_wait_seconds=10.0,
        flush_scan_interval_seconds=0.2,
        history_timeout_seconds=5.0,
        human_hold_seconds=6.0,
        context_web_port=free_port(),
        context_store="rocksdb",
        data_dir=str(tmp_path_factory.mktemp("context-data")),
        log_level="INFO",
    )


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.web_token}"}


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def clock() -> datetime:
    """Now, to the whole second (provider times in history are often whole seconds)."""
    return utcnow().replace(microsecond=0)


async def customer_doc(
    http: httpx.AsyncClient, worker: ContextWorker, customer: str
) -> dict[str, Any] | None:
    response = await http.get(worker.url + f"/customers/{customer}/", headers=auth(worker.settings))
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def until_doc(http: httpx.AsyncClient, worker: ContextWorker, customer: str,
                    check: Callable[[dict[str, Any]], bool], timeout: float = EVENT_TIMEOUT
                    ) -> dict[str, Any]:
    """Polls the customer's web view until `check` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        doc = await customer_doc(http, worker, customer)
        if doc is not None and check(doc):
            return doc
        if loop.time() > deadline:
            raise AssertionError(f"customer view never matched; last: {doc}")
        await asyncio.sleep(0.02)


async def answered(bus: Bus, http: httpx.AsyncClient, worker: ContextWorker, customer: str, text: str,
                   at: datetime, reply_at: datetime, reply_ids: list[str] | None = None,
                   reply_text: str = "¡Hola! ¿En qué te ayudo?") -> dict[str, Any]:
    """A customer's message (request n) followed by the bot's reply; returns the request.

    Waits until the worker has applied the reply: events of DIFFERENT topics (replies, inbound) have
    no order between them, so the next inbound message could otherwise overtake the reply.
    """
    before = len(bus.of(bus.topics.responder_requests, customer))
    await bus.inbound(inbound(customer, text, at))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=before + 1))[-1]
    await bus.reply(reply(customer, request["batch_id"], reply_text, reply_at, reply_ids))
    await until_doc(http, worker, customer, lambda d: d["state"]["last_reply_at"] == iso(reply_at))
    return request


# -- the worker's counters -------------------------------------------------------------------------

Sample = tuple[str, dict[str, str]]


def history_failures(reason: str) -> Sample:
    return "watistream_history_fetch_failures_total", {"reason": reason, "tenant": "default"}


def history_retries(reason: str) -> Sample:
    return "watistream_history_fetch_retries_total", {"reason": reason}


def history_truncated(reason: str) -> Sample:
    return "watistream_history_truncated_total", {"reason": reason}


def history_fetches(outcome: str) -> Sample:
    return "watistream_history_fetch_total", {"outcome": outcome, "tenant": "default"}


async def worker_sample(http: httpx.AsyncClient, worker: ContextWorker, sample: Sample) -> float:
    """One counter as the worker's /metrics shows it (0 before the label set was first used)."""
    name, labels = sample
    text = (await http.get(worker.url + "/metrics")).text
    prefix = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "} "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


class WorkerCounts:
    """The worker's counters read before a fault is injected, for exact rises afterwards."""

    def __init__(self, http: httpx.AsyncClient, worker: ContextWorker, samples: dict[str, Sample],
                 before: dict[str, float]) -> None:
        self.http, self.worker, self.samples, self.before = http, worker, samples, before

    @classmethod
    async def read(cls, http: httpx.AsyncClient, worker: ContextWorker, **samples: Sample) -> WorkerCounts:
        before = {name: await worker_sample(http, worker, s) for name, s in samples.items()}
        return cls(http, worker, samples, before)

    async def deltas(self) -> dict[str, float]:
        return {name: await worker_sample(self.http, self.worker, s) - self.before[name]
                for name, s in self.samples.items()}


# -- scenarios -----------------------------------------------------------------------------------------

async def test_poison_on_every_input_topic_is_dead_lettered_and_the_worker_goes_on(
    worker: ContextWorker, bus: Bus, http: httpx.AsyncClient
) -> None:
    customer, _ = new_customer()
    t = bus.topics
    good = inbound(customer, "hola", clock())
    command: dict[str, Any] = {
        "kind": "pause", "customer_key": customer, "batch_id": None, "issued_at": utcnow(),
        "history": [], "history_error": None, "history_pages": 0, "actor": None}
    poison: list[tuple[str, bytes | None, bytes | None, str]] = [
        (t.inbound, customer.encode(), b"\x00garbage", "undecodable"),
        (t.agent_activity, customer.encode(),
         codec.encode("AssistantReply", reply(customer, "b", "x", utcnow())), "wrong_record_type"),
        (t.replies, customer.encode(), codec.MAGIC + b"\x00" * 8 + b"body", "undecodable"),
        (t.context_commands, None, codec.encode("ContextCommand", command), "missing_key"),
        (t.inbound, b"wati:someone-else", codec.encode("InboundMessage", good), "key_mismatch"),
    ]
    for topic, key, value, _ in poison:
        await bus.send_raw(topic, key, value)
    letters = await bus.wait_for(t.dead_letter, customer, count=len(poison))
    assert sorted(d["reason"] for d in letters) == sorted(r for *_, r in poison)
    assert {d["source_topic"] for d in letters} == {t.inbound, t.agent_activity, t.replies,
                                                     t.context_commands}
    assert all(d["service"] == "context" and d["offset"] >= 0 for d in letters)
    assert {bytes(d["payload"]) for d in letters} == {v for _, _, v, _ in poison}
    # the agent is alive: a good message after the poison is answered
    await bus.inbound(good)
    request = (await bus.wait_for(t.responder_requests, customer))[0]
    assert texts(request) == ["hola"]
    ready = await worker.readyz(http)
    assert ready is not None and ready["ready"] is True


async def test_views_need_the_token_and_ops_endpoints_answer(
    worker: ContextWorker, worker_settings: Settings, http: httpx.AsyncClient
) -> None:
    customer, _ = new_customer()
    paths = [("GET", "/customers/"), ("GET", f"/customers/{customer}/"),
             ("POST", f"/customers/{customer}/pause/"), ("POST", f"/customers/{customer}/resume/")]
    for method, path in paths:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic xyz"}):
            response = await http.request(method, worker.url + path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json() == {"error": "unauthorized"}
    unknown = await http.get(worker.url + f"/customers/{customer}/", headers=auth(worker_settings))
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    assert (await http.get(worker.url + "/healthz")).status_code == 200
    metrics_response = await http.get(worker.url + "/metrics")
    assert metrics_response.headers["content-type"].startswith("text/plain")
    assert 'watistream_agent_up{agent="context-events",service="context"} 1.0' in metrics_response.text
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    exported = ('watistream_consumer_lag{service="context"}',  # every 5 s
                'watistream_event_loop_lag_seconds_count{service="context"}')  # every 0.25 s
    while not all(name in metrics_response.text for name in exported):
        assert loop.time() < deadline, "consumer lag or event loop lag never exported"
        await asyncio.sleep(0.2)
        metrics_response = await http.get(worker.url + "/metrics")
    for builtin in ("/table/customers/", f"/table/customers/{customer}/", "/router/", "/graph/"):
        assert (await http.get(worker.url + builtin)).status_code == 404, builtin
    bad = await http.post(worker.url + f"/customers/{customer}/pause/", headers=auth(worker_settings),
                          content=b"not json")
    assert bad.status_code == 400
    bad_key = await http.post(worker.url + "/customers/nokey/pause/", headers=auth(worker_settings))
    assert bad_key.status_code == 400


async def test_a_burst_is_one_request_in_order_and_retries_change_nothing(
    bus: Bus, worker: ContextWorker
) -> None:
    customer, _ = new_customer()
    now = clock()
    burst = [inbound(customer, text, now + timedelta(seconds=i))
             for i, text in enumerate(["uno", "dos", "tres"])]
    for message in burst:
        await bus.inbound(message)
    first = (await bus.wait_for(bus.topics.responder_requests, customer))[0]
    assert texts(first) == ["uno", "dos", "tres"]
    assert first["prior_last_inbound_at"] is None and first["prior_last_reply_at"] is None
    for message in burst:  # the producer's retries / WATI's webhook retries
        await bus.inbound(message)
    await bus.inbound(inbound(customer, "cuatro", now + timedelta(seconds=10)))
    requests = await bus.wait_for(bus.topics.responder_requests, customer, count=2)
    assert [texts(r) for r in requests] == [["uno", "dos", "tres"], ["cuatro"]]
    assert requests[1]["prior_last_inbound_at"] == now + timedelta(seconds=2)
    audits = await bus.wait_for(bus.topics.audit, customer, count=2)
    assert [a["batch_id"] for a in audits] == [r["batch_id"] for r in requests]
    assert [a["message_count"] for a in audits] == [3, 1]


async def test_prior_values_are_captured_when_the_batch_opens_even_if_a_reply_arrives_mid_burst(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient
) -> None:
    customer, _ = new_customer()
    now = clock()
    first = inbound(customer, "primero", now - timedelta(seconds=100))
    await bus.inbound(first)
    request1 = (await bus.wait_for(bus.topics.responder_requests, customer))[0]
    reply_at = now - timedelta(seconds=2)
    # the burst opens, THEN the reply to batch 1 arrives (seen by the worker while the batch is
    # open: events of different topics have no order, so the test orders them), then it goes on
    await bus.inbound(inbound(customer, "A", now - timedelta(seconds=3)))
    opened = await until_doc(http, worker, customer, lambda d: d["open_batch"] is not None)
    await bus.reply(reply(customer, request1["batch_id"], "resp", reply_at))
    during = await until_doc(http, worker, customer, lambda d: d["state"]["last_reply_at"] == iso(reply_at))
    assert during["open_batch"] is not None
    assert during["open_batch"]["batch_id"] == opened["open_batch"]["batch_id"]
    await bus.inbound(inbound(customer, "B", now - timedelta(seconds=1)))
    request2 = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    assert texts(request2) == ["A", "B"]
    assert request2["prior_last_inbound_at"] == first["provider_time"]
    assert request2["prior_last_reply_at"] is None  # the reply came after the batch opened
    assert request2["gap_seconds"] == 97.0
    await bus.inbound(inbound(customer, "C", now + timedelta(seconds=1)))
    request3 = (await bus.wait_for(bus.topics.responder_requests, customer, count=3))[2]
    assert request3["prior_last_reply_at"] == reply_at
    assert request3["prior_last_inbound_at"] == now - timedelta(seconds=1)


def add_realistic_history(wati: Any, wa_id: str, now: datetime, reply_at: datetime, own_id: str,
                          own_text: str) -> list[tuple[datetime, str]]:
    """A WATI history around a 30 h gap; returns (time, text) of every item the bot must be given."""
    expected: list[tuple[datetime, str]] = []

    def add(text: str, at: datetime, owner: bool, operator: str | None = None, fmt: str = "iso",
            event_type: str = "message", missed: bool = True, **extra: Any) -> None:
        wati.add_message(wa_id, text=text, owner=owner, operator_name=operator, at=at, ts_format=fmt,
                         event_type=event_type, **extra)
        if missed:
            expected.append((at, text))

    days_ago = now - timedelta(days=3)
    for i in range(20):  # an older conversation: before the cutoff
        add(f"conversación vieja {i}", days_ago + timedelta(minutes=i), owner=bool(i % 2),
            operator="Luis" if i % 2 else None, fmt="iso_no_z", missed=False)
    add(own_text, reply_at + timedelta(seconds=1), owner=True, operator=wati.operator_name,
        missed=False, whatsappMessageId=own_id)  # our reply, echoed in history
    add("Recordatorio automático de tu cita", now - timedelta(hours=20), owner=True,
        operator=wati.operator_name, missed=False)  # another send of ours (API token)
    add("Chat is now assigned to ana@example.com", reply_at + timedelta(minutes=10), owner=False,
        operator="ana@example.com", fmt="iso7", event_type="ticket")
    add("Hola, soy Ana. Reviso tu pedido", reply_at + timedelta(minutes=11), owner=True, operator="Ana",
        fmt="iso7")
    add("Gracias Ana, es el pedido 4411", reply_at + timedelta(minutes=15), owner=False)
    for i in range(110):  # a long human conversation: the history has several pages
        at = reply_at + timedelta(minutes=20 + i)
        if i % 2:
            add(f"Ana: paso {i}", at, owner=True, operator="Ana", fmt="unix" if i % 3 == 0 else "iso")
        else:
            add(f"Cliente: dato {i}", at, owner=False, fmt="iso_no_z" if i % 4 == 0 else "iso")
    add("Promo: 2x1 este fin de semana", now - timedelta(hours=10), owner=True, operator=None,
        event_type="broadcastMessage")
    add("Tu pedido salió hoy", now - timedelta(hours=2), owner=True, operator="Ana", fmt="unix")
    expected.sort()
    return expected


async def test_a_long_gap_gets_exactly_the_missed_history_and_survives_a_429(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient, stand_ins: StandIns
) -> None:
    customer, wa_id = new_customer()
    now = clock()
    first_at = now - timedelta(hours=30)
    reply_at = first_at + timedelta(seconds=60)
    own_id, own_text = "wamid.OWNREPLY" + uuid.uuid4().hex[:10], "¡Hola! ¿En qué te ayudo?"
    await answered(bus, http, worker, customer, "hola, primera vez", first_at, reply_at, [own_id],
                   own_text)
    expected = add_realistic_history(stand_ins.wati, wa_id, now, reply_at, own_id, own_text)
    calls_before = len([r for r in stand_ins.wati.requests if wa_id in r.path])
    counts = await WorkerCounts.read(
        http, worker, retried=history_retries("rate_limited"), failed=history_failures("rate_limited"),
        fetch_ok=history_fetches("ok"), truncated=history_truncated("max_pages"))
    stand_ins.wati.fail_next("getMessages", 429)
    await bus.inbound(inbound(customer, "hola de nuevo", now))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    assert texts(request) == ["hola de nuevo"]
    assert request["missed_check_ran"] is True
    assert request["prior_last_inbound_at"] == first_at and request["prior_last_reply_at"] == reply_at
    assert request["gap_seconds"] == 30 * 3600.0
    got = [(m["at"], m["text"]) for m in request["missed_messages"]]
    assert got == expected  # exactly the window, sorted by parsed time, nothing of ours
    assert request["missed_dropped_oldest"] == 0
    roles = {m["text"]: (m["role"], m["agent_name"]) for m in request["missed_messages"]}
    assert roles["Hola, soy Ana. Reviso tu pedido"] == ("agent", "Ana")
    assert roles["Gracias Ana, es el pedido 4411"] == ("customer", None)
    assert roles["Chat is now assigned to ana@example.com"][0] == "event"
    assert roles["Promo: 2x1 este fin de semana"] == ("agent", "template")
    audit = (await bus.wait_for(bus.topics.audit, customer, count=2))[1]
    assert audit["history_error"] is None and "history" in audit["sources"]
    reasons = {e["reason"] for e in audit["excluded"]}
    assert {"own_id", "own_operator", "before_cutoff"} <= reasons
    pages = [r for r in stand_ins.wati.requests if wa_id in r.path][calls_before:]
    assert [r.query["pageNumber"] for r in pages] == ["1", "1", "2"]  # 429, retried, then page 2
    # the absorbed 429 is counted as a retry, not as a failed fetch
    assert await counts.deltas() == {"retried": 1, "failed": 0, "fetch_ok": 1, "truncated": 0}


@pytest.mark.parametrize(("status", "times", "body", "reason", "retried"), [
    (500, 1, None, "server_error", 0),
    (200, 1, "<html>bad gateway</html>", "bad_response", 0),  # garbage instead of JSON
    (200, 1, '{"result": "success", "messages": {"items": [1, 2]}}', "bad_response", 0),  # wrong shape
    (429, 6, None, "rate_limited", 5),  # the client retries 5 times (Retry-After: 0), then gives up
], ids=["500", "garbage_json", "wrong_shape", "429_exhausted"])
async def test_a_failing_history_still_answers_and_the_audit_says_why(
    bus: Bus, worker: ContextWorker, stand_ins: StandIns, http: httpx.AsyncClient,
    status: int, times: int, body: str | None, reason: str, retried: int,
) -> None:
    """Issue 7 point 3: the batch is answered without history, and /metrics counts the fault."""
    counts = await WorkerCounts.read(
        http, worker, failed=history_failures(reason), retried=history_retries("rate_limited"),
        fetch_error=history_fetches("error"), fetch_ok=history_fetches("ok"))
    customer, wa_id = new_customer()
    stand_ins.wati.add_message(wa_id, text="algo que nunca veremos", owner=True, operator_name="Ana",
                               at=clock() - timedelta(hours=1))
    stand_ins.wati.fail_next("getMessages", status, times=times, body=body)
    await bus.inbound(inbound(customer, "¿hay alguien?", clock()))
    request = (await bus.wait_for(bus.topics.responder_requests, customer))[0]
    assert texts(request) == ["¿hay alguien?"]
    assert request["missed_check_ran"] is True and request["missed_messages"] == []
    audit = (await bus.wait_for(bus.topics.audit, customer))[0]
    assert audit["history_error"] == reason and audit["routed_to"] == "responder"
    assert len([r for r in stand_ins.wati.requests if wa_id in r.path]) == times  # nothing else asked
    # the fetcher counts before it hands the result to the agent: no lag behind the request
    assert await counts.deltas() == {"failed": 1, "retried": retried, "fetch_error": 1, "fetch_ok": 0}


async def test_two_tenants_sharing_a_phone_number_are_two_customers_and_the_default_account_is_not_asked(
    bus: Bus, worker: ContextWorker, stand_ins: StandIns
) -> None:
    """docs/tenants.md: another tenant's customer with the same number has its own state and batch;
    its tenant is not configured here (no TENANTS_FILE: a tenant removed from the file), so it is
    answered without history (`no_account`) rather than from the deployment's WATI account, which
    knows that number as its own customer."""
    ours, wa_id = new_customer()
    theirs = f"hotel-a/centro/{ours}"
    stand_ins.wati.add_message(wa_id, text="the default account's own conversation", owner=True,
                               operator_name="Ana", at=clock() - timedelta(hours=1))
    asked_before = len([r for r in stand_ins.wati.requests if wa_id in r.path])
    await bus.inbound(inbound(theirs, "table for two?", clock()))
    (request,) = await bus.wait_for(bus.topics.responder_requests, theirs)
    assert texts(request) == ["table for two?"] and request["missed_messages"] == []
    assert request["batch_id"] == f"{theirs}:1"
    audit = (await bus.wait_for(bus.topics.audit, theirs))[0]
    assert audit["history_error"] == "no_account"
    assert len([r for r in stand_ins.wati.requests if wa_id in r.path]) == asked_before
    await bus.inbound(inbound(ours, "room for tonight?", clock()))
    (own,) = await bus.wait_for(bus.topics.responder_requests, ours)
    assert texts(own) == ["room for tonight?"] and own["batch_id"] == f"{ours}:1"
    assert [m["text"] for m in own["missed_messages"]] == ["the default account's own conversation"]
    assert len(bus.of(bus.topics.responder_requests, theirs)) == 1  # nothing of ours reached theirs


async def test_a_huge_history_is_cut_at_the_page_cap_and_the_cut_is_counted(
    bus: Bus, worker: ContextWorker, stand_ins: StandIns, http: httpx.AsyncClient
) -> None:
    """Issue 7 point 3: 1,050 agent messages in the window; HISTORY_MAX_PAGES=10 pages of 100 are
    read, the newest MISSED_MAX_ITEMS=200 of them reach the request, and the cut is counted."""
    assert (worker.settings.history_max_pages, worker.settings.missed_max_items) == (10, 200)
    customer, wa_id = new_customer()
    now = clock()
    start = now - timedelta(hours=3)  # the newest ends ~90 min ago: no human hold
    for n in range(1050):
        stand_ins.wati.add_message(wa_id, text=f"agente {n}", owner=True, operator_name="Ana",
                                   at=start + timedelta(seconds=5 * n))
    counts = await WorkerCounts.read(
        http, worker, truncated=history_truncated("max_pages"), fetch_ok=history_fetches("ok"),
        fetch_error=history_fetches("error"))
    await bus.inbound(inbound(customer, "¿me ayudan?", now))
    request = (await bus.wait_for(bus.topics.responder_requests, customer))[0]
    assert texts(request) == ["¿me ayudan?"]
    assert [m["text"] for m in request["missed_messages"]] == [f"agente {n}" for n in range(850, 1050)]
    assert request["missed_dropped_oldest"] == 800  # of the 1,000 read; 50 were never fetched
    pages = [r.query["pageNumber"] for r in stand_ins.wati.requests if wa_id in r.path]
    assert pages == [str(n) for n in range(1, 11)]
    audit = (await bus.wait_for(bus.topics.audit, customer))[0]
    assert audit["history_error"] is None and audit["routed_to"] == "responder"
    assert await counts.deltas() == {"truncated": 1, "fetch_ok": 1, "fetch_error": 0}


async def test_an_agent_message_right_after_the_reply_reaches_the_next_request_but_our_echo_does_not(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient
) -> None:
    customer, _ = new_customer()
    now = clock()
    own_id = "wamid.OWN" + uuid.uuid4().hex[:12]
    reply_at = now - timedelta(seconds=90)
    await answered(bus, http, worker, customer, "quiero cambiar mi cita", now - timedelta(seconds=100),
                   reply_at, [own_id], "Claro, te ayudo con eso.")
    echo = activity(customer, "Claro, te ayudo con eso.", reply_at + timedelta(seconds=1), kind="unknown",
                    operator=None, ids=[own_id])
    human = activity(customer, "Te llamo en 5 minutos", reply_at + timedelta(seconds=20))
    for event in (echo, human):
        await bus.activity(event)
    await until_doc(http, worker, customer, lambda d: len(d["state"]["agent_messages"]) == 1)
    await bus.inbound(inbound(customer, "ok, espero", now - timedelta(seconds=5)))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    # a short gap, but the history is read for every batch by default (MISSED_HISTORY=every_batch)
    assert request["missed_check_ran"] is True and request["gap_seconds"] == 95.0
    assert [(m["text"], m["role"], m["agent_name"], m["source"]) for m in request["missed_messages"]] == [
        ("Te llamo en 5 minutos", "agent", "Ana Agent", "realtime")]


async def test_the_bot_holds_while_a_human_writes_then_answers_everything_in_order(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient, worker_settings: Settings
) -> None:
    customer, _ = new_customer()
    now = clock()
    await answered(bus, http, worker, customer, "hola", now - timedelta(seconds=100),
                   now - timedelta(seconds=95))
    agent_at = utcnow()
    await bus.activity(activity(customer, "Te atiendo yo", agent_at))
    await until_doc(http, worker, customer, lambda d: d["state"]["last_human_at"] is not None)
    await bus.inbound(inbound(customer, "gracias", agent_at + timedelta(seconds=0.5)))
    held = (await bus.wait_for(bus.topics.audit, customer, count=2))[1]
    assert held["held"] is True and held["hold_reason"] == "human_active" and held["routed_to"] == "held"
    assert len(bus.of(bus.topics.responder_requests, customer)) == 1  # nothing to answer while held
    # the hold (HUMAN_HOLD_SECONDS) runs out on the worker's clock: wait for that instant, not a guess
    expires = agent_at + timedelta(seconds=worker_settings.human_hold_seconds)
    while utcnow() < expires - timedelta(seconds=worker_settings.quiet_window_seconds * 0.5):
        await asyncio.sleep(0.05)
    await bus.inbound(inbound(customer, "¿sigues ahí?", utcnow()))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    assert texts(request) == ["gracias", "¿sigues ahí?"]
    assert [m["text"] for m in request["missed_messages"]] == ["Te atiendo yo"]
    assert len(bus.of(bus.topics.responder_requests, customer)) == 2


async def test_when_the_hold_ends_the_bot_answers_held_messages_nobody_answered_by_itself(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient, worker_settings: Settings
) -> None:
    customer, _ = new_customer()
    now = clock()
    await answered(bus, http, worker, customer, "hola", now - timedelta(seconds=100),
                   now - timedelta(seconds=95))
    agent_at = utcnow()
    await bus.activity(activity(customer, "Te atiendo yo", agent_at))
    await until_doc(http, worker, customer, lambda d: d["state"]["last_human_at"] is not None)
    await bus.inbound(inbound(customer, "¿me ayudan con la factura?", agent_at + timedelta(seconds=0.5)))
    held = (await bus.wait_for(bus.topics.audit, customer, count=2))[1]
    assert held["held"] is True and held["hold_reason"] == "human_active"
    # the agent left without answering; the customer writes nothing more: the timer ends the hold
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2,
                                  timeout=EVENT_TIMEOUT + worker_settings.human_hold_seconds))[1]
    assert utcnow() >= agent_at + timedelta(seconds=worker_settings.human_hold_seconds)
    assert texts(request) == ["¿me ayudan con la factura?"]
    assert [m["text"] for m in request["missed_messages"]] == ["Te atiendo yo"]


async def test_held_messages_a_human_answered_are_context_of_the_next_request_not_answered(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient, worker_settings: Settings
) -> None:
    customer, _ = new_customer()
    now = clock()
    await answered(bus, http, worker, customer, "hola", now - timedelta(seconds=100),
                   now - timedelta(seconds=95))
    agent_at = utcnow()
    await bus.activity(activity(customer, "Te atiendo yo", agent_at))
    await until_doc(http, worker, customer, lambda d: d["state"]["last_human_at"] is not None)
    await bus.inbound(inbound(customer, "¿me ayudan con la factura?", agent_at + timedelta(seconds=0.5)))
    await bus.wait_for(bus.topics.audit, customer, count=2)  # held
    answered_at = utcnow()
    await bus.activity(activity(customer, "Ya se la envié por correo", answered_at))
    await until_doc(  # at the hold's end the held message became context (a customer item)
        http, worker, customer,
        lambda d: any(m["role"] == "customer" for m in d["state"]["agent_messages"]),
        timeout=EVENT_TIMEOUT + worker_settings.human_hold_seconds)
    doc = await customer_doc(http, worker, customer)
    assert doc is not None and doc["state"]["held_messages"] == []
    assert utcnow() >= answered_at + timedelta(seconds=worker_settings.human_hold_seconds)
    assert len(bus.of(bus.topics.responder_requests, customer)) == 1  # the human handled it
    await bus.inbound(inbound(customer, "gracias, ya la tengo", utcnow()))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    assert texts(request) == ["gracias, ya la tengo"]
    assert [(m["role"], m["text"]) for m in request["missed_messages"]] == [
        ("agent", "Te atiendo yo"), ("customer", "¿me ayudan con la factura?"),
        ("agent", "Ya se la envié por correo")]


async def test_a_message_only_in_history_is_recovered_once_and_its_late_webhook_changes_nothing(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient, stand_ins: StandIns
) -> None:
    customer, wa_id = new_customer()
    now = clock()
    before = now - timedelta(hours=2)
    await answered(bus, http, worker, customer, "hola", before, before + timedelta(seconds=30))
    stand_ins.wati.add_message(wa_id, text="Hoy cerramos a las 6", owner=True, operator_name="Ana",
                               at=now - timedelta(minutes=12))
    lost = stand_ins.wati.add_message(wa_id, text="¿siguen abiertos?", owner=False,
                                      at=now - timedelta(minutes=10))  # nobody answered it
    await bus.inbound(inbound(customer, "¿me confirman?", now))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    assert texts(request) == ["¿siguen abiertos?", "¿me confirman?"]
    assert [m.get("recovered") for m in request["messages"]] == [True, False]
    assert [m["text"] for m in request["missed_messages"]] == ["Hoy cerramos a las 6"]
    audit = (await bus.wait_for(bus.topics.audit, customer, count=2))[1]
    assert audit["webhooks_missing"] == 1 and audit["recovered_event_ids"] == [lost["whatsappMessageId"]]
    late = inbound(customer, "¿siguen abiertos?", now - timedelta(minutes=10),
                   event_id=lost["whatsappMessageId"])
    await bus.inbound(late)
    await bus.inbound(inbound(customer, "gracias", now + timedelta(seconds=5)))
    requests = await bus.wait_for(bus.topics.responder_requests, customer, count=3)
    assert texts(requests[2]) == ["gracias"]  # the late webhook opened nothing and joined nothing
    assert sum(texts(r).count("¿siguen abiertos?") for r in requests) == 1


PAUSED: dict[str, Any] = {}


async def test_an_operator_pause_holds_the_bot(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient
) -> None:
    customer, _ = new_customer()
    response = await http.post(worker.url + f"/customers/{customer}/pause/", headers=auth(worker.settings),
                               json={"actor": "ops-ana"})
    assert response.status_code == 202 and response.json()["accepted"] is True
    doc = await until_doc(http, worker, customer, lambda d: d["state"]["paused"] is True)
    assert doc["state"]["paused_by"] == "ops-ana"
    await bus.inbound(inbound(customer, "¿me ayudan?", clock()))
    audit = (await bus.wait_for(bus.topics.audit, customer))[0]
    assert audit["held"] is True and audit["hold_reason"] == "paused"
    assert bus.of(bus.topics.responder_requests, customer) == []
    listed = await http.get(worker.url + "/customers/?open=1&page_size=500", headers=auth(worker.settings))
    assert listed.status_code == 200
    entries = {c["customer_key"]: c for c in listed.json()["customers"]}
    assert entries[customer]["held_messages"] == 1 and entries[customer]["paused"] is True
    PAUSED["customer"] = customer


async def test_state_and_pause_survive_a_worker_restart(
    bus: Bus, worker: ContextWorker, http: httpx.AsyncClient
) -> None:
    customer, _ = new_customer()
    now = clock()
    first_at, reply_at = now - timedelta(seconds=50), now - timedelta(seconds=40)
    await answered(bus, http, worker, customer, "antes del reinicio", first_at, reply_at)
    assert worker.stop() == 0
    worker.start()
    await worker.wait_ready(http)
    doc = await customer_doc(http, worker, customer)
    assert doc is not None
    assert doc["state"]["last_inbound_at"] == iso(first_at) and doc["state"]["last_reply_at"] == iso(reply_at)
    await bus.inbound(inbound(customer, "después", now))
    request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
    assert request["prior_last_inbound_at"] == first_at and request["prior_last_reply_at"] == reply_at
    assert len(bus.of(bus.topics.responder_requests, customer)) == 2
    # the operator's pause survived too; resume ends the hold: the flush timer answers the held
    # message by itself (no human wrote after it), nobody has to write again
    paused = PAUSED["customer"]
    doc = await customer_doc(http, worker, paused)
    assert doc is not None and doc["state"]["paused"] is True and doc["status"] == "paused"
    response = await http.post(worker.url + f"/customers/{paused}/resume/", headers=auth(worker.settings))
    assert response.status_code == 202
    answer = (await bus.wait_for(bus.topics.responder_requests, paused))[0]
    assert texts(answer) == ["¿me ayudan?"]
    await until_doc(http, worker, paused, lambda d: d["state"]["held_messages"] == [])
