"""docs/providers.md followed to the end on the real broker, with the stand-in provider "echo".

The guide's three steps: the module (tests/providers_fixture.py), its registration (here), its
schema symbol (added to a copy of schemas/ and released with `services.devtools.schemas`). Then a
webhook posted to ingest's `/webhooks/echo` is stored on the inbound topic as an `echo` message, and
the batch made of it (the ResponderRequest the context service would build) is answered by the
responder — OpenAI replaced by its stand-in — through the echo provider: the answer reaches the
echo server, split to the provider's 40-character limit, and the AssistantReply says `answered`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from services import providers
from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.records import ResponderRequest
from services.common.timeparse import utcnow
from services.ingest import app as ingest_app
from services.ingest.app import serve
from services.responder.main import Responder
from services.standins import StandIns
from tests.conftest import unique_prefix
from tests.providers_fixture import ECHO_LIMIT, NAME, EchoProvider, EchoServer, echo_server, with_echo_schemas

pytestmark = pytest.mark.broker


@pytest.fixture
def echo_schemas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Step 3 on a copy of schemas/: the codec of this process reads the copy for the test."""
    released = with_echo_schemas(codec.schema_dir(), tmp_path / "schemas")
    monkeypatch.setattr(codec, "schema_dir", lambda: tmp_path / "schemas")
    codec.registry.cache_clear()
    try:
        yield released
    finally:
        monkeypatch.undo()
        codec.registry.cache_clear()


@pytest.fixture
async def echo(echo_schemas: list[str]) -> AsyncIterator[EchoServer]:
    """Steps 1 and 2: the module is tests/providers_fixture.py; registered here, undone after."""
    async with echo_server() as (server, url):
        providers.register(EchoProvider(url))
        try:
            yield server
        finally:
            providers.unregister(NAME)
            ingest_app.NORMALISERS.pop(NAME, None)


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def read_values(settings: Settings, topic: str, count: int, timeout: float = 30.0
                      ) -> list[tuple[bytes | None, str, dict[str, Any]]]:
    """The first `count` records of a topic: (key, schema name, value)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                                metadata_max_age_ms=1000)
    await consumer.start()
    found: list[tuple[bytes | None, str, dict[str, Any]]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend((r.key, *codec.decode_any(r.value)) for r in records)
    finally:
        await consumer.stop()
    return found


def test_the_release_wrote_the_records_that_embed_channel(echo_schemas: list[str]) -> None:
    names = {Path(p).name.split(".v")[0] for p in echo_schemas}
    assert {"watistream.InboundMessage", "watistream.ResponderRequest", "watistream.AgentActivity",
            "watistream.AssistantReply"} <= names
    assert NAME in codec.registry().schema("Channel").parsed["symbols"]


async def test_a_webhook_to_the_new_provider_is_answered_through_it(settings: Settings, echo: EchoServer
                                                                   ) -> None:
    async with StandIns.running() as s:
        cfg = dataclasses.replace(
            settings, topic_prefix=unique_prefix("provider-guide"), openai_base_url=s.openai_url,
            openai_api_key=s.openai.api_key, openai_max_attempts=2, openai_timeout_seconds=20,
            wati_api_url=s.wati_url, wati_api_token=s.wati.token,
            manychat_api_url=s.manychat_url, manychat_api_token=s.manychat.token,
        )
        topics = Topics.from_settings(cfg)
        await ensure_topics(cfg)
        customer = f"u{uuid.uuid4().hex[:8]}"
        text = "Hola, ¿tienen la talla M del abrigo azul?"

        # ingest: the generic route of the registered provider, to the real broker
        async with serve(cfg, port=0) as base, aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {cfg.webhook_token}"}
            for _ in range(200):  # ingest answers 503 until its producer is connected
                response = await http.post(f"{base}/webhooks/{NAME}", headers=auth,
                                           json={"id": "echo-m1", "user": customer, "text": text})
                if response.status != 503:
                    break
                await asyncio.sleep(0.05)
            assert response.status == 200, await response.text()
            assert (await response.json())["kind"] == "message"
        [(key, name, inbound)] = await read_values(cfg, topics.inbound, 1)
        assert (key, name) == (f"{NAME}:{customer}".encode(), "InboundMessage")
        assert inbound["channel"] == NAME and inbound["text"] == text and inbound["provider_id"] == customer

        # responder: the batch of that message, answered through the echo provider
        request: ResponderRequest = {
            "batch_id": f"b-{uuid.uuid4().hex[:12]}", "customer_key": inbound["customer_key"],
            "channel": inbound["channel"], "provider_id": inbound["provider_id"], "messages": [inbound],  # type: ignore[list-item]
            "prior_last_inbound_at": None, "prior_last_reply_at": None, "gap_seconds": None,
            "missed_check_ran": False, "missed_messages": [], "missed_dropped_oldest": 0, "images": [],
            "created_at": utcnow(),
        }
        producer = make_producer(cfg)
        await producer.start()
        responder = Responder(cfg, instructions="Eres el asistente de prueba.", web_port=0, serve_http=False)
        await responder.start()
        try:
            await responder.wait_ready(60)
            await producer.send_and_wait(topics.responder_requests,
                                         codec.encode("ResponderRequest", dict(request)),
                                         key=request["customer_key"].encode())
            [(_, reply_name, reply)] = await read_values(cfg, topics.replies, 1, timeout=60)
        finally:
            await responder.stop()
            await producer.stop()

    assert reply_name == "AssistantReply"
    assert (reply["batch_id"], reply["channel"], reply["outcome"]) == (request["batch_id"], NAME, "answered")
    parts = echo.texts_to(customer)
    assert len(parts) > 1 and all(len(p) <= ECHO_LIMIT for p in parts)
    assert reply["parts"] == parts and " ".join(parts).split() == reply["text"].split()
    assert reply["provider_message_ids"] == [f"echo-{i + 1}" for i in range(len(parts))]
    assert "abrigo azul" in reply["text"]  # the stand-in's answer quotes the customer's text
