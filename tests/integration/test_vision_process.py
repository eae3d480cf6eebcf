"""`watistream vision` as a process: configuration check, readiness, forwarding, clean SIGTERM stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from services.common import codec
from services.common.config import Settings
from services.common.kafka import ensure_topics, make_producer
from services.standins import StandIns
from services.standins._base import free_socket

pytestmark = pytest.mark.broker

SCRIPT = Path(sys.executable).with_name("watistream")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def base_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "WATI_", "MANYCHAT_"))}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
                "TOPIC_PREFIX": settings.topic_prefix, "TOPIC_PARTITIONS": str(settings.topic_partitions),
                "BROKER_SESSION_TIMEOUT_SECONDS": "10", "PYTHONUNBUFFERED": "1"})
    return env


async def test_missing_api_key_is_a_configuration_error(settings: Settings, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), "vision", cwd=tmp_path, env=base_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"OPENAI_API_KEY" in err


async def test_process_gets_ready_forwards_and_stops_cleanly_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    topics = await ensure_topics(settings)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    async with StandIns.running() as stand_ins:
        env = base_env(settings) | stand_ins.env() | {"VISION_WEB_PORT": str(port)}
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), "vision", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        stderr = asyncio.create_task(proc.stderr.read())  # drained all along: a full pipe would block it
        consumer = AIOKafkaConsumer(
            topics.responder_requests, bootstrap_servers=settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest", group_id=f"probe-{uuid.uuid4().hex}")
        producer = make_producer(settings)
        try:
            async with httpx.AsyncClient() as http:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while True:
                    assert proc.returncode is None, "vision exited early"
                    try:
                        ready = await http.get(f"http://127.0.0.1:{port}/readyz")
                        if ready.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert loop.time() < deadline, "vision never became ready"
                    await asyncio.sleep(0.1)
                assert ready.json() == {"ready": True, "reason": "ok"}
                assert b"watistream_agent_up" in (await http.get(f"http://127.0.0.1:{port}/metrics")).content
                # the process watches its event loop (observed every 0.25 s)
                while b'watistream_event_loop_lag_seconds_count{service="vision"}' not in (
                    await http.get(f"http://127.0.0.1:{port}/metrics")
                ).content:
                    assert loop.time() < deadline, "vision exports no event loop lag"
                    await asyncio.sleep(0.1)

            batch = f"proc-{uuid.uuid4().hex[:8]}"
            request = {
                "batch_id": batch, "customer_key": "wati:50370000099", "channel": "wati",
                "provider_id": "50370000099",
                "messages": [{
                    "event_id": "e1", "customer_key": "wati:50370000099", "channel": "wati",
                    "provider_id": "50370000099", "message_type": "text", "text": "hola", "caption": None,
                    "media_ref": None, "media_mime": None, "sender_name": None, "provider_message_ids": [],
                    "provider_time": T0, "received_at": T0,
                }],
                "missed_check_ran": False, "created_at": T0,
            }
            await producer.start()
            await producer.send_and_wait(topics.vision_requests,
                                         codec.encode("VisionRequest", {"request": request}),
                                         key=b"wati:50370000099")
            await consumer.start()
            forwarded = None
            async with asyncio.timeout(20):
                while forwarded is None:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        for record in records:
                            _, value = codec.decode_any(record.value)
                            if value["batch_id"] == batch:
                                forwarded = value
            assert forwarded is not None and forwarded["messages"][0]["text"] == "hola"

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            log = (await asyncio.wait_for(stderr, 5)).decode()
            assert '"event": "vision_stopped"' in log
            assert stand_ins.openai.api_key not in log
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await consumer.stop()
            await producer.stop()
