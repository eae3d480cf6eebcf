"""End to end through a secured cluster: `watistream dev` pointed at a SASL_SSL (SCRAM-SHA-512)
broker with a test-made CA. Every client of every service (ingest's producer, the context service's
faust app and its producer, the responder's and vision's consumers and producers, the admin client
creating the topics) must authenticate for one customer burst to be answered."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from services.common.config import Settings
from services.common.kafka import Topics, make_consumer
from services.devtools import scenario
from services.devtools.dev import DevStack, _settings_env
from services.standins import StandIns
from tests.conftest import unique_prefix
from tests.e2e.test_dev_and_demo import _copy, _wait_ready, stack_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture
async def standins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as running:
        yield running


async def read_to_end(settings: Settings, topic: str) -> list[bytes]:
    consumer = make_consumer(settings, topic, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        values: list[bytes] = []
        while batch := await consumer.getmany(timeout_ms=1000):
            values.extend(r.value for records in batch.values() for r in records)
        return values
    finally:
        await consumer.stop()


async def test_a_burst_is_answered_through_a_sasl_ssl_cluster(
    secured_kafka: Settings, standins: StandIns, tmp_path: Path
) -> None:
    base = dataclasses.replace(
        secured_kafka, topic_prefix=unique_prefix("secured-dev"), topic_partitions=4,
        webhook_token="test-webhook-token", web_token="test-web-token",
    )
    cfg = stack_settings(base, standins, tmp_path)
    env = {**os.environ, **_settings_env(cfg)}
    assert env["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "dev"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "dev.log"
    pump = asyncio.create_task(asyncio.to_thread(_copy, proc, log))
    try:
        stack = DevStack(cfg)
        await _wait_ready(stack, proc, log)
        standins.openai.reply_fn = scenario.demo_reply
        async with httpx.AsyncClient(timeout=15.0) as client:
            for text in scenario.FIRST_BURST:
                answer = await client.post(
                    f"{stack.ingest_url}/webhooks/wati", json=scenario.wati_webhook(text, datetime.now(UTC)),
                    headers={"Authorization": f"Bearer {cfg.webhook_token}"},
                )
                assert answer.status_code == 200, answer.text
        await scenario.wait_for(lambda: len(standins.wati.sent) >= 1, 120, "the bot's answer")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await pump

    assert "embedded Kafka" not in log.read_text(), "the secured cluster was used, not a new broker"
    calls = scenario.reply_requests(standins)
    assert len(calls) == 1, "one OpenAI call for the burst"
    assert all(text in str(calls[0].request["input"]) for text in scenario.FIRST_BURST)
    assert [s.contact_id for s in standins.wati.sent] == [scenario.CUSTOMER]
    assert standins.wati.sent[0].text == scenario.demo_reply(calls[0].request)
    assert await read_to_end(cfg, Topics.from_settings(cfg).dead_letter) == []
    assert proc.returncode == 0
