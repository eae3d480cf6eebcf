"""Poison messages on every topic a service consumes (issue 7, drill 4).

For each consumed topic — inbound, agent-activity, replies, context-commands (context worker, a real
`watistream context` subprocess); responder-requests (the responder's in-process runner);
vision-requests (vision's in-process runner) — garbage is put straight on the topic: random bytes,
a valid Avro record of the WRONG type, a corrupt Avro body behind a valid header, an empty value, a
null value (tombstone), and a correct record without a Kafka key. Then a good message. Proven:
exactly one DeadLetter (with the service, a reason and the source topic/partition/offset of the
poison record) per poison message, and the good message is still processed. External services are
the project's stand-ins; each service gets topics of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.timeparse import utcnow
from services.responder.main import Responder
from services.standins import StandIns
from services.vision.main import Vision
from tests.conftest import unique_prefix

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 45.0


# -- harness -----------------------------------------------------------------------------------------

async def eventually(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce `settings` in a subprocess."""
    return {f.metadata["env"]: str(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


@dataclass
class ServiceProcess:
    """`watistream <service>` as a subprocess (what operators run), its readiness URL and log file.

    `omit_env`: settings NOT passed as environment variables, so the service uses its own default
    (e.g. the bind addresses, for the loopback-by-default check).
    """

    service: str
    settings: Settings
    log_path: Path
    ready_url: str
    omit_env: frozenset[str] = frozenset()
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        ours = {f.metadata["env"] for f in dataclasses.fields(Settings)}
        env = {k: v for k, v in os.environ.items() if k not in ours}
        env.update({k: v for k, v in settings_env(self.settings).items() if k not in self.omit_env})
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", self.service], cwd=ROOT,
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_ready(self, timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise AssertionError(f"{self.service} exited with {code}:\n{self.log_tail()}")
                try:
                    if (await http.get(self.ready_url)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if loop.time() > deadline:
                    raise AssertionError(f"{self.service} not ready after {timeout:.0f}s:\n{self.log_tail()}")
                await asyncio.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then the exit code (SIGKILL after `timeout`: a hung stop must not hang the tests)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def context_process(settings: Settings, log_path: Path, omit_env: frozenset[str] = frozenset()
                    ) -> ServiceProcess:
    return ServiceProcess("context", settings, log_path,
                          f"http://127.0.0.1:{settings.context_web_port}/readyz", omit_env)


@dataclass
class Out:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    name: str
    value: dict[str, Any]


@dataclass
class Bus:
    """Produces raw records and reads the output topics of one topic set (every partition, from the start)."""

    settings: Settings
    topics: Topics
    outputs: list[str]
    records: list[Out] = field(default_factory=list)
    producer: AIOKafkaProducer | None = None
    consumer: AIOKafkaConsumer | None = None
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                         enable_auto_commit=False, auto_offset_reset="earliest")
        await self.consumer.start()
        parts = [TopicPartition(t, p) for t in self.outputs for p in range(self.settings.topic_partitions)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self.consumer is not None
        while True:
            for tp, batch in (await self.consumer.getmany(timeout_ms=100)).items():
                for r in batch:
                    name, value = codec.decode_any(r.value)  # outputs are always decodable
                    self.records.append(Out(tp.topic, tp.partition, r.offset, r.key, name, value))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def put(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = 0
                  ) -> tuple[str, int, int]:
        """Produces one raw record (partition None: the key's); returns its (topic, partition, offset)."""
        assert self.producer is not None
        meta = await self.producer.send_and_wait(topic, value, key=key, partition=partition)
        return topic, meta.partition, meta.offset

    def dead_letter_for(self, where: tuple[str, int, int]) -> list[dict[str, Any]]:
        """Dead letters whose source is the record at (topic, partition, offset)."""
        return [o.value for o in self.records if o.topic == self.topics.dead_letter
                and (o.value["source_topic"], o.value["partition"], o.value["offset"]) == where]

    def of(self, topic: str, where: Callable[[dict[str, Any]], bool]) -> list[Out]:
        return [o for o in self.records if o.topic == topic and where(o.value)]


@dataclass(frozen=True)
class Poison:
    label: str
    key: bytes | None
    value: bytes | None
    reasons: frozenset[str]  # acceptable dead-letter reasons


def poison_set(customer: str, right: dict[str, Any], right_schema: str, wrong: dict[str, Any],
               wrong_schema: str) -> list[Poison]:
    """The seven kinds of garbage for one topic (`right` is a valid record of the topic's own type).

    A correct record under no key or another customer's key is poison too: every topic is keyed by
    customer, and that key is what keeps one customer's records in order on one partition."""
    key = customer.encode()
    good = codec.encode(right_schema, right)
    undecodable = frozenset({"undecodable"})
    return [
        Poison("random bytes", key, os.urandom(64), undecodable),
        Poison("wrong record type", key, codec.encode(wrong_schema, wrong),
               frozenset({"wrong_record_type", "unexpected_record"})),
        Poison("corrupt body behind a valid header", key, good[:codec.HEADER_LEN] + b"\xff" * 12,
               undecodable),
        Poison("empty value", key, b"", undecodable),
        Poison("null value (tombstone)", key, None, undecodable),
        Poison("null key", None, good, frozenset({"missing_key"})),
        Poison("another customer's key", b"wati:50399999999", good, frozenset({"key_mismatch"})),
    ]


async def put_all(bus: Bus, topic: str, poison: list[Poison]) -> Sent:
    """Puts every poison record on partition 0 of `topic` (one partition: they are consumed in order)."""
    return [(p, await bus.put(topic, p.key, p.value)) for p in poison]


Sent = list[tuple[Poison, tuple[str, int, int]]]


async def assert_dead_lettered(bus: Bus, sent: Sent, service: str) -> None:
    for poison, where in sent:
        await eventually(lambda w=where: bool(bus.dead_letter_for(w)),  # type: ignore[misc]
                         f"a dead letter for '{poison.label}' on {where[0]}")
    for poison, where in sent:
        letters = bus.dead_letter_for(where)
        assert len(letters) == 1, (poison.label, letters)
        [letter] = letters
        assert letter["service"] == service, (poison.label, letter)
        assert letter["reason"] in poison.reasons, (poison.label, letter["reason"], letter["error"])
        assert letter["error"], poison.label
        assert letter["payload"] == poison.value or not (letter["payload"] or poison.value), poison.label


def wati_message(customer: str, text: str) -> dict[str, Any]:
    wa_id = customer.split(":", 1)[1]
    now = utcnow()
    eid = f"wamid.POISON{uuid.uuid4().hex[:12]}"
    return {
        "event_id": eid, "customer_key": customer, "channel": "wati", "provider_id": wa_id,
        "message_type": "text", "text": text, "caption": None, "media_ref": None, "media_mime": None,
        "sender_name": "Cliente", "provider_message_ids": [eid], "provider_time": now - timedelta(seconds=2),
        "received_at": now, "recovered": False, "username": None,
    }


def activity(customer: str) -> dict[str, Any]:
    wa_id = customer.split(":", 1)[1]
    now = utcnow()
    return {
        "event_id": f"wamid.AG{uuid.uuid4().hex[:12]}", "customer_key": customer, "channel": "wati",
        "provider_id": wa_id, "event_type": "sessionMessageSent_v2", "sender_kind": "human_agent",
        "operator_name": "Ana", "operator_email": None, "message_type": "text", "text": "hola",
        "provider_message_ids": [], "local_message_id": None, "provider_time": now, "received_at": now,
    }


def assistant_reply(customer: str) -> dict[str, Any]:
    return {
        "batch_id": f"b-{uuid.uuid4().hex[:8]}", "customer_key": customer, "channel": "wati",
        "provider_id": customer.split(":", 1)[1], "outcome": "answered", "text": "hola", "parts": ["hola"],
        "sent_at": utcnow(), "provider_message_ids": [], "response_id": None, "conversation_id": None,
        "input_tokens": 0, "output_tokens": 0,
    }


def command(customer: str) -> dict[str, Any]:
    return {"kind": "resume", "customer_key": customer, "batch_id": None, "issued_at": utcnow(),
            "history": [], "history_error": None, "history_pages": 0, "actor": "poison-drill"}


def request(customer: str, text: str) -> dict[str, Any]:
    return {
        "batch_id": f"b-{uuid.uuid4().hex[:12]}", "customer_key": customer, "channel": "wati",
        "provider_id": customer.split(":", 1)[1], "messages": [wati_message(customer, text)],
        "prior_last_inbound_at": None, "prior_last_reply_at": None, "gap_seconds": None,
        "missed_check_ran": False, "missed_messages": [], "missed_dropped_oldest": 0, "images": [],
        "created_at": utcnow(),
    }


def new_customer() -> str:
    return f"wati:5037{uuid.uuid4().int % 10**7:07d}"


def own_topics(settings: Settings, name: str, **overrides: Any) -> Settings:
    return dataclasses.replace(settings, topic_prefix=unique_prefix(f"poison-{name}"), **overrides)


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as s:
        yield s


# -- the drills ----------------------------------------------------------------------------------------

async def test_poison_on_every_context_topic(
    settings: Settings, stand_ins: StandIns, tmp_path: Path
) -> None:
    cfg = own_topics(settings, "context", wati_api_url=stand_ins.wati_url,
                     wati_api_token=stand_ins.wati.token, context_web_port=free_port(),
                     data_dir=str(tmp_path), quiet_window_seconds=0.5, flush_scan_interval_seconds=0.2,
                     missed_gap_seconds=3600.0)
    topics = await ensure_topics(cfg)
    bus = Bus(cfg, topics, [topics.dead_letter, topics.responder_requests])
    await bus.start()
    worker = context_process(cfg, tmp_path / "context.log").start()
    try:
        await worker.wait_ready()
        customer = new_customer()
        grid = {
            topics.inbound: poison_set(customer, wati_message(customer, "x"), "InboundMessage",
                                       activity(customer), "AgentActivity"),
            topics.agent_activity: poison_set(customer, activity(customer), "AgentActivity",
                                              wati_message(customer, "x"), "InboundMessage"),
            topics.replies: poison_set(customer, assistant_reply(customer), "AssistantReply",
                                       command(customer), "ContextCommand"),
            topics.context_commands: poison_set(customer, command(customer), "ContextCommand",
                                                assistant_reply(customer), "AssistantReply"),
        }
        sent = [item for topic, poison in grid.items() for item in await put_all(bus, topic, poison)]
        good = wati_message(customer, "hola después del veneno")
        await bus.put(topics.inbound, customer.encode(), codec.encode("InboundMessage", good))
        await assert_dead_lettered(bus, sent, "context")
        await eventually(lambda: bool(bus.of(topics.responder_requests,
                                             lambda v: v["customer_key"] == customer)),
                         "the good message answered (a responder request)")
        [answered] = bus.of(topics.responder_requests, lambda v: v["customer_key"] == customer)
        assert [m["text"] for m in answered.value["messages"]] == ["hola después del veneno"]
        assert len(sent) == 28
        async with httpx.AsyncClient() as http:
            assert (await http.get(worker.ready_url)).status_code == 200, "the agent is still alive"
    finally:
        worker.stop()
        await bus.stop()


async def test_poison_on_responder_requests(settings: Settings, stand_ins: StandIns) -> None:
    s = stand_ins
    cfg = own_topics(settings, "responder", wati_api_url=s.wati_url, wati_api_token=s.wati.token,
                     manychat_api_url=s.manychat_url, manychat_api_token=s.manychat.token,
                     openai_base_url=s.openai_url, openai_api_key=s.openai.api_key, openai_max_attempts=2)
    topics = await ensure_topics(cfg)
    bus = Bus(cfg, topics, [topics.dead_letter, topics.replies])
    await bus.start()
    responder = Responder(cfg, instructions="Prueba.", web_port=0)
    try:
        await responder.start()
        await responder.wait_ready(60)
        customer = new_customer()
        poison = poison_set(customer, request(customer, "x"), "ResponderRequest",
                            wati_message(customer, "x"), "InboundMessage")
        sent = await put_all(bus, topics.responder_requests, poison)
        # responder-state is read as a table, not handled as messages: an unreadable record there is
        # logged (`state_record_unreadable`) and skipped, and the customer is still answered. (A
        # keyless record cannot get there: the broker refuses it on a compacted topic.)
        for value in (os.urandom(48), b"", codec.encode("InboundMessage", wati_message(customer, "x"))):
            await bus.put(topics.responder_state, customer.encode(), value, partition=None)
        good = request(customer, "hola")
        await bus.put(topics.responder_requests, customer.encode(), codec.encode("ResponderRequest", good))
        await assert_dead_lettered(bus, sent, "responder")
        await eventually(lambda: bool(bus.of(topics.replies, lambda v: v["batch_id"] == good["batch_id"])),
                         "the good request answered")
        [reply] = bus.of(topics.replies, lambda v: v["batch_id"] == good["batch_id"])
        assert reply.value["outcome"] == "answered"
        assert responder.ready()[0]
    finally:
        await responder.stop()
        await bus.stop()


async def test_poison_on_vision_requests(settings: Settings, stand_ins: StandIns) -> None:
    s = stand_ins
    cfg = own_topics(settings, "vision", wati_api_url=s.wati_url, wati_api_token=s.wati.token,
                     openai_base_url=s.openai_url, openai_api_key=s.openai.api_key, openai_max_attempts=2)
    topics = await ensure_topics(cfg)
    bus = Bus(cfg, topics, [topics.dead_letter, topics.responder_requests])
    await bus.start()
    vision = Vision(cfg)
    try:
        await vision.start()
        await eventually(lambda: vision.ready()[0], "vision ready")
        customer = new_customer()
        poison = poison_set(customer, {"request": request(customer, "x")}, "VisionRequest",
                            request(customer, "x"), "ResponderRequest")
        sent = await put_all(bus, topics.vision_requests, poison)
        good = request(customer, "hola")
        await bus.put(topics.vision_requests, customer.encode(),
                      codec.encode("VisionRequest", {"request": good}))
        await assert_dead_lettered(bus, sent, "vision")
        await eventually(lambda: bool(bus.of(topics.responder_requests,
                                             lambda v: v["batch_id"] == good["batch_id"])),
                         "the good request forwarded")
        assert vision.ready()[0]
    finally:
        await vision.stop()
        await bus.stop()
