"""The webhook service in-process against the session's real Kafka: what arrives where, and what not."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord

from services.common import codec
from services.common.broker import free_port
from services.common.config import ConfigError, Settings
from services.common.kafka import Topics
from services.common.logs import JsonFormatter
from services.ingest import app as ingest_app
from services.ingest.app import serve
from services.ingest.main import main as ingest_main
from services.ingest.manychat import normalise_manychat
from services.ingest.outcomes import BusinessSend, CustomerMessage
from services.ingest.wati import classify_wati

pytestmark = pytest.mark.broker

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
WATI_MESSAGES = [
    "text", "image", "document", "location", "voice", "audio", "button", "interactive", "interactive_button",
    "reaction", "video", "sticker", "contacts", "order", "catalog", "media_placeholder", "new_contact",
    "no_event_type", "message_bsuid",
]
WATI_SENDS = {
    "session_message_sent_v2": "human_agent",
    "session_message_sent_v2_bsuid": "wati_bot",
    "template_message_sent_v2": "template",
    "template_message_sent_v2_bsuid": "own_send",
    "owner_message": "own_send",
}
MANYCHAT = ["full_subscriber", "instagram_full", "wrapped_image", "flat"]


def load(provider: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / provider / f"{name}.json").read_text(encoding="utf-8"))
    return doc


class Reader:
    """Reads a whole topic (every partition, from the beginning to the current end)."""

    def __init__(self, settings: Settings) -> None:
        self.partitions = settings.topic_partitions
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False,
            auto_offset_reset="earliest")

    async def read(self, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        self.consumer.assign(tps)
        end = await self.consumer.end_offsets(tps)
        for tp, first in (await self.consumer.beginning_offsets(tps)).items():
            self.consumer.seek(tp, first)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while any([await self.consumer.position(tp) < end[tp] for tp in tps]):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for batch in (await self.consumer.getmany(*tps, timeout_ms=500)).values():
                records.extend(r for r in batch if r.offset < end[TopicPartition(r.topic, r.partition)])
        return records

    async def end_offsets(self, *topics: str) -> dict[TopicPartition, int]:
        tps = [TopicPartition(t, p) for t in topics for p in range(self.partitions)]
        return dict(await self.consumer.end_offsets(tps))


@pytest.fixture(scope="module")
async def base_url(settings: Settings) -> AsyncIterator[str]:
    async with serve(settings, port=0) as url:
        await wait_until_ready(url)
        yield url


async def wait_until_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    return
            assert time.monotonic() < deadline, "ingest did not become ready"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def http(settings: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {settings.webhook_token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield session


@pytest.fixture(scope="module")
async def reader(settings: Settings) -> AsyncIterator[Reader]:
    r = Reader(settings)
    await r.consumer.start()
    yield r
    await r.consumer.stop()


@pytest.fixture(scope="module")
def topics(settings: Settings) -> Topics:
    return Topics.from_settings(settings)


async def post(http: aiohttp.ClientSession, url: str, body: object, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body, **kw) as resp:
        return resp.status, await resp.json()


def by_event_id(
    records: list[ConsumerRecord[bytes, bytes]], schema: str
) -> dict[str, tuple[Any, dict[str, Any]]]:
    out = {}
    for r in records:
        value = codec.decode(schema, r.value)
        out[value["event_id"]] = (r, value)
    return out


def expected_partition(key: str, partitions: int) -> int:
    """What the Java client's and aiokafka's default partitioner pick for a key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def millis(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def assert_same_record(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for field, value in expected.items():
        if isinstance(value, datetime):
            assert got[field] == millis(value), field
            assert got[field].tzinfo is not None and got[field].utcoffset() == timedelta(0), field
        else:
            assert got[field] == value, field


# --- accepted messages ---


async def test_every_wati_message_type_arrives_on_inbound_in_its_key_partition(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics, settings: Settings
) -> None:
    before = datetime.now(UTC)
    answers = {}
    for name in WATI_MESSAGES:
        status, body = await post(http, f"{base_url}/webhooks/wati", load("wati", name))
        assert status == 200 and body["status"] == "accepted" and body["kind"] == "message", (name, body)
        answers[name] = body["event_id"]
    found = by_event_id(await reader.read(topics.inbound), "InboundMessage")
    for name in WATI_MESSAGES:
        record, value = found[answers[name]]
        outcome = classify_wati(load("wati", name), value["received_at"])
        assert isinstance(outcome, CustomerMessage)
        assert_same_record(value, dict(outcome.record))
        assert record.key == value["customer_key"].encode()
        assert record.partition == expected_partition(value["customer_key"], settings.topic_partitions)
        assert before - timedelta(seconds=1) <= value["received_at"] <= datetime.now(UTC)
    assert found[answers["message_bsuid"]][1]["customer_key"] == "wati:US.1231241415120001"
    assert found[answers["image"]][1]["media_ref"] == "data/images/3AF5B54BC1F6E79D5D65.jpg"
    # nothing a customer wrote went to the agent-activity topic
    activity = by_event_id(await reader.read(topics.agent_activity), "AgentActivity")
    assert not set(answers.values()) & set(activity)


async def test_business_side_sends_arrive_on_agent_activity(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics, settings: Settings
) -> None:
    answers = {}
    for name in WATI_SENDS:
        status, body = await post(http, f"{base_url}/webhooks/wati", load("wati", name))
        assert status == 200 and body["kind"] == "agent_activity", (name, body)
        answers[name] = body["event_id"]
    found = by_event_id(await reader.read(topics.agent_activity), "AgentActivity")
    for name, kind in WATI_SENDS.items():
        record, value = found[answers[name]]
        assert value["sender_kind"] == kind, name
        outcome = classify_wati(load("wati", name), value["received_at"])
        assert isinstance(outcome, BusinessSend)
        assert_same_record(value, dict(outcome.record))
        assert record.partition == expected_partition(value["customer_key"], settings.topic_partitions)
    assert found[answers["session_message_sent_v2_bsuid"]][1]["customer_key"] == "wati:SV.5559876543210"
    inbound = by_event_id(await reader.read(topics.inbound), "InboundMessage")
    assert not set(answers.values()) & set(inbound)


async def test_manychat_shapes_arrive_on_inbound(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics, settings: Settings
) -> None:
    answers = {}
    for name in MANYCHAT:
        status, body = await post(http, f"{base_url}/webhooks/manychat", load("manychat", name))
        assert status == 200 and body["kind"] == "message", (name, body)
        answers[name] = body["event_id"]
    found = by_event_id(await reader.read(topics.inbound), "InboundMessage")
    channels = {}
    for name in MANYCHAT:
        record, value = found[answers[name]]
        expected = normalise_manychat(load("manychat", name), value["received_at"])
        assert isinstance(expected, dict)
        assert_same_record(value, dict(expected))
        assert record.partition == expected_partition(value["customer_key"], settings.topic_partitions)
        channels[name] = value["channel"]
    assert channels == {"full_subscriber": "facebook", "instagram_full": "instagram",
                        "wrapped_image": "facebook", "flat": "facebook"}
    assert found[answers["wrapped_image"]][1]["message_type"] == "image"


async def test_query_token_and_json_with_charset_are_accepted(
    base_url: str, settings: Settings, reader: Reader, topics: Topics
) -> None:
    payload = load("wati", "text")
    payload["whatsappMessageId"] = "wamid.query-token-1"
    async with aiohttp.ClientSession() as anonymous, anonymous.post(
        f"{base_url}/webhooks/wati?token={settings.webhook_token}", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert "wamid.query-token-1" in by_event_id(await reader.read(topics.inbound), "InboundMessage")


async def test_concurrent_webhooks_are_all_acked_and_stored(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics
) -> None:
    async def one(n: int) -> str:
        payload = load("wati", "text")
        payload.update(whatsappMessageId=f"wamid.burst-{n}", waId=f"5037555{n:04d}")
        status, body = await post(http, f"{base_url}/webhooks/wati", payload)
        assert status == 200, body
        return str(body["event_id"])

    ids = await asyncio.gather(*(one(n) for n in range(60)))
    found = by_event_id(await reader.read(topics.inbound), "InboundMessage")
    assert set(ids) <= set(found)


# --- ignored and rejected: nothing is produced ---


async def test_status_and_unhandled_events_are_acknowledged_and_ignored(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics
) -> None:
    before = await reader.end_offsets(topics.inbound, topics.agent_activity, topics.dead_letter)
    for payload in (load("wati", "status_delivered"), load("wati", "template_failed"),
                    {"eventType": "ticketAssigned", "waId": "50370000001"}):
        status, body = await post(http, f"{base_url}/webhooks/wati", payload)
        assert status == 200 and body["status"] == "ignored" and body["reason"], body
    assert await reader.end_offsets(topics.inbound, topics.agent_activity, topics.dead_letter) == before


def _rejections(token: str, limit: int) -> list[tuple[str, dict[str, Any], int, str]]:
    good = json.dumps(load("wati", "text")).encode()
    auth = {"Authorization": f"Bearer {token}"}
    as_json = {**auth, "Content-Type": "application/json"}
    plain_json = {"Content-Type": "application/json"}
    big = b'{"pad": "' + b"x" * limit + b'"}'
    return [
        ("missing secret", {"data": good, "headers": plain_json}, 401, "unauthorized"),
        ("wrong secret", {"data": good, "headers": {**plain_json, "Authorization": "Bearer nope"}},
         401, "unauthorized"),
        ("wrong query secret", {"data": good, "params": {"token": "nope"}, "headers": plain_json},
         401, "unauthorized"),
        ("wrong secret beats everything", {"data": big, "headers": {"Content-Type": "text/plain"}},
         401, "unauthorized"),
        ("oversized", {"data": big, "headers": as_json}, 413, "payload_too_large"),
        ("oversized beats content type", {"data": big, "headers": {**auth, "Content-Type": "text/plain"}},
         413, "payload_too_large"),
        ("wrong content type", {"data": good, "headers": {**auth, "Content-Type": "text/plain"}},
         415, "unsupported_media_type"),
        ("form content type", {"data": {"a": "b"}, "headers": auth}, 415, "unsupported_media_type"),
        ("content type beats bad json", {"data": b"{nope", "headers": {**auth, "Content-Type": "text/plain"}},
         415, "unsupported_media_type"),
        ("bad json", {"data": b"{nope", "headers": as_json}, 400, "bad_json"),
        ("empty body", {"data": b"", "headers": as_json}, 400, "bad_json"),
        ("not an object", {"data": b"[1, 2, 3]", "headers": as_json}, 400, "not_an_object"),
        ("no customer", {"data": json.dumps({**load("wati", "text"), "waId": None}).encode(),
                         "headers": as_json}, 400, "missing_customer"),
        ("no event id", {"data": json.dumps({**load("wati", "text"), "whatsappMessageId": None, "id": None})
                         .encode(), "headers": as_json}, 400, "missing_event_id"),
        ("text is a list", {"data": json.dumps({**load("wati", "text"), "text": ["a"]}).encode(),
                            "headers": as_json}, 400, "bad_field"),
    ]


@pytest.mark.parametrize("case", range(15))
async def test_bad_requests_get_a_json_reason_and_produce_nothing(
    case: int, base_url: str, reader: Reader, topics: Topics, settings: Settings
) -> None:
    name, kwargs, status, code = _rejections(settings.webhook_token, settings.max_body_bytes)[case]
    before = await reader.end_offsets(topics.inbound, topics.agent_activity, topics.dead_letter)
    async with aiohttp.ClientSession() as plain, plain.post(f"{base_url}/webhooks/wati", **kwargs) as resp:
        assert resp.status == status, (name, await resp.text())
        assert resp.content_type == "application/json", name
        body = await resp.json()
    assert body["error"] == code and body["reason"], (name, body)
    if status == 401:
        assert settings.webhook_token not in json.dumps(body)
    assert await reader.end_offsets(topics.inbound, topics.agent_activity, topics.dead_letter) == before


def test_rejection_cases_are_all_parametrized(settings: Settings) -> None:
    assert len(_rejections(settings.webhook_token, settings.max_body_bytes)) == 15


async def test_oversized_chunked_body_without_content_length(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics, settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        for _ in range(settings.max_body_bytes // 8192 + 2):
            yield b"x" * 8192
        yield b'"}'

    before = await reader.end_offsets(topics.inbound, topics.agent_activity)
    async with http.post(f"{base_url}/webhooks/manychat", data=chunks(),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "payload_too_large"
    assert await reader.end_offsets(topics.inbound, topics.agent_activity) == before


async def test_a_body_that_stops_arriving_is_cut_off_with_408(
    base_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body-read timer is skipped only when the whole body is already buffered; a sender that
    declares 100 bytes and sends 10 still holds a handler for at most the timeout."""
    monkeypatch.setattr(ingest_app, "BODY_READ_TIMEOUT_SECONDS", 0.3)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write((f"POST /webhooks/wati HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {settings.webhook_token}\r\nContent-Length: 100\r\n\r\n"
                      '{"waId": "5').encode())
        await writer.drain()
        started = time.monotonic()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.split()[1] == b"408", status_line
        assert time.monotonic() - started < 5
    finally:
        writer.close()


async def test_manychat_rejection(base_url: str, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, f"{base_url}/webhooks/manychat", {"first_name": "Ana"})
    assert status == 400 and body["error"] == "missing_subscriber"
    status, body = await post(http, f"{base_url}/webhooks/manychat", {"subscriber_id": "1"})
    assert status == 400 and body["error"] == "no_content"


async def test_a_normaliser_bug_is_a_400_and_the_payload_is_dead_lettered(
    base_url: str, http: aiohttp.ClientSession, reader: Reader, topics: Topics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(payload: object, received_at: datetime) -> Any:
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(ingest_app.NORMALISERS, "wati", broken)
    before = await reader.end_offsets(topics.inbound, topics.agent_activity)
    payload = load("wati", "text")
    payload["whatsappMessageId"] = "wamid.normaliser-bug"
    status, body = await post(http, f"{base_url}/webhooks/wati", payload)
    assert status == 400 and body["error"] == "unprocessable"
    assert await reader.end_offsets(topics.inbound, topics.agent_activity) == before
    letters = [codec.decode("DeadLetter", r.value) for r in await reader.read(topics.dead_letter)]
    mine = [d for d in letters if d["payload"] and b"wamid.normaliser-bug" in d["payload"]]
    assert len(mine) == 1 and mine[0]["service"] == "ingest" and mine[0]["reason"] == "normaliser_error"
    assert "ZeroDivisionError" in mine[0]["error"]


# --- probes, metrics, logs, configuration ---


async def test_probes_and_unknown_routes(base_url: str) -> None:
    async with aiohttp.ClientSession() as plain:
        async with plain.get(f"{base_url}/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with plain.get(f"{base_url}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"
        async with plain.get(f"{base_url}/nope") as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found"
        async with plain.get(f"{base_url}/webhooks/wati") as resp:
            assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"


async def test_metrics_count_requests_rejects_and_produce_latency(
    base_url: str, http: aiohttp.ClientSession, topics: Topics
) -> None:
    await post(http, f"{base_url}/webhooks/wati", [1])
    await post(http, f"{base_url}/webhooks/wati", load("wati", "text"))
    async with http.get(f"{base_url}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    assert 'watistream_http_requests_total{route="/webhooks/wati",status="200"}' in text
    assert 'watistream_http_requests_total{route="/webhooks/wati",status="400"}' in text
    assert 'watistream_webhook_rejects_total{reason="not_an_object",tenant="default"}' in text
    assert f'watistream_produce_latency_seconds_count{{topic="{topics.inbound}"}}' in text
    assert 'watistream_webhook_events_total{kind="message",provider="wati",tenant="default"}' in text


async def test_one_log_line_per_webhook_masks_the_customer_and_omits_the_text(
    base_url: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    payload = load("wati", "text")
    payload.update(whatsappMessageId="wamid.log-line-check", text="my secret address is 1 Main St")
    with caplog.at_level(logging.INFO, logger="services.ingest.app"):
        status, _ = await post(http, f"{base_url}/webhooks/wati", payload)
    assert status == 200
    lines = [r for r in caplog.records if r.getMessage() == "webhook"]
    assert len(lines) == 1
    rendered = JsonFormatter("ingest").format(lines[0])
    doc = json.loads(rendered)
    assert doc["status"] == 200 and doc["outcome"] == "accepted" and doc["provider"] == "wati"
    assert doc["customer"].startswith("wati:") and doc["customer"].endswith("001")
    assert "50370000001" not in rendered and "Main St" not in rendered


async def test_an_empty_webhook_token_refuses_to_start(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_TOKEN"):
        async with serve(replace(settings, webhook_token=""), port=0):
            pass
    with pytest.raises(ConfigError, match="WEBHOOK_TOKEN"):
        ingest_main(None, replace(settings, webhook_token=""))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        ingest_main(None, replace(settings, kafka_bootstrap_servers=""))  # type: ignore[arg-type]


@pytest.fixture
def ingest_process(settings: Settings) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "TOPIC_PREFIX": settings.topic_prefix, "TOPIC_PARTITIONS": str(settings.topic_partitions),
           "WEBHOOK_TOKEN": settings.webhook_token, "INGEST_PORT": str(port), "INGEST_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_cli_serves_and_stops_cleanly_on_sigterm(
    ingest_process: tuple[subprocess.Popen[bytes], str], settings: Settings, reader: Reader, topics: Topics
) -> None:
    proc, url = ingest_process
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {settings.webhook_token}"}) as http:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "the ingest process did not become ready"
            await asyncio.sleep(0.1)
        payload = load("wati", "text")
        payload["whatsappMessageId"] = "wamid.cli-process"
        status, _ = await post(http, f"{url}/webhooks/wati", payload)
        assert status == 200
        while True:  # the process watches its event loop (observed every 0.25 s)
            async with http.get(f"{url}/metrics") as resp:
                if 'watistream_event_loop_lag_seconds_count{service="ingest"}' in await resp.text():
                    break
            assert time.monotonic() < deadline, "the ingest process exports no event loop lag"
            await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "ingest_stopped" in stderr and settings.webhook_token not in stderr
    assert "wamid.cli-process" in by_event_id(await reader.read(topics.inbound), "InboundMessage")
