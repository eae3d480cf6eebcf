"""`watistream dead-letters` on the real broker: list with filters, show, replay once to the source
topic (recorded; a second replay refused, also from another process), and what cannot be replayed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.config import Settings
from services.common.deadletters import REPLAY_HEADER, Filters, read_entries, read_replays, replay, select
from services.common.kafka import Topics, dead_letter, ensure_topics, make_producer
from services.common.timeparse import utcnow

from ..conftest import unique_prefix

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def cfg(settings: Settings) -> Settings:
    own = dataclasses.replace(settings, topic_prefix=unique_prefix("dead-letters"))
    await ensure_topics(own)
    return own


@pytest.fixture
async def producer(cfg: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = make_producer(cfg)
    await p.start()
    yield p
    await p.stop()


async def put(producer: AIOKafkaProducer, cfg: Settings, *, reason: str, customer: str | None,
              service: str = "responder", payload: bytes | None = b'{"n": 1}', source: bool = True) -> None:
    topics = Topics.from_settings(cfg)
    await dead_letter(producer, topics, service=service, reason=reason, error=f"{reason} happened",
                      source_topic=topics.responder_requests if source else None, partition=1, offset=7,
                      key=(customer or "k").encode(), payload=payload, customer_key=customer)


async def records_on(
    cfg: Settings, topic: str, headers: list[object] | None = None
) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record of `topic`; each record's headers appended to `headers`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=cfg.kafka_bootstrap_servers, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(cfg.topic_partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        out: list[tuple[bytes | None, bytes | None]] = []
        pending = {tp for tp in tps if ends[tp] > 0}  # nothing here is compacted or deleted yet
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=500)).items():
                out += [(r.key, r.value) for r in records]
                if headers is not None:
                    headers += [r.headers for r in records]
                if records and records[-1].offset >= ends[tp] - 1:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


async def test_list_filters_by_reason_customer_service_and_time(
    cfg: Settings, producer: AIOKafkaProducer
) -> None:
    await put(producer, cfg, reason="openai_failed", customer="wati:50370000001")
    await put(producer, cfg, reason="send_failed", customer="wati:50370000002")
    await put(producer, cfg, reason="send_failed", customer="manychat:77", service="vision")
    entries = await read_entries(cfg)
    assert sorted(e.record["reason"] for e in entries) == ["openai_failed", "send_failed", "send_failed"]
    assert [e.failed_at for e in entries] == sorted(e.failed_at for e in entries)  # oldest first
    assert len(select(entries, Filters(reason="send_failed"), {})) == 2
    by_customer = select(entries, Filters(customer="manychat:77"), {})
    assert [e.record["customer_key"] for e in by_customer] == ["manychat:77"]
    assert len(select(entries, Filters(service="responder", reason="send_failed"), {})) == 1
    now = utcnow()
    assert len(select(entries, Filters(since=now - timedelta(minutes=5)), {})) == 3
    assert select(entries, Filters(until=now - timedelta(minutes=5)), {}) == []


async def test_replay_once_to_the_source_topic_recorded(cfg: Settings, producer: AIOKafkaProducer) -> None:
    await put(producer, cfg, reason="openai_failed", customer="wati:50370000009", payload=b"original-bytes")
    topics = Topics.from_settings(cfg)
    [entry] = await read_entries(cfg)
    [outcome] = await replay(cfg, [entry], by="ana")
    assert outcome.replayed is not None and outcome.refused is None
    headers: list[object] = []
    replayed = await records_on(cfg, topics.responder_requests, headers)
    assert replayed == [(b"wati:50370000009", b"original-bytes")]
    assert headers == [((REPLAY_HEADER, entry.id.encode()),)]
    replays = await read_replays(cfg)
    assert replays[entry.id]["replayed_by"] == "ana"
    assert replays[entry.id]["source_topic"] == topics.responder_requests
    # recorded keyed by the dead letter's id
    assert (entry.id.encode(), codec.encode("DeadLetterReplay", dict(replays[entry.id]))) in \
        await records_on(cfg, topics.dead_letter_replays)
    # a second replay (a fresh read of the record, as another process would do) is refused
    [again] = await replay(cfg, [entry], by="bob")
    assert again.replayed is None and again.refused is not None and "already replayed" in again.refused
    assert "by ana" in again.refused
    assert sum(1 for _, v in await records_on(cfg, topics.responder_requests) if v == b"original-bytes") == 1


async def test_what_cannot_be_replayed_is_refused_with_the_reason(
    cfg: Settings, producer: AIOKafkaProducer
) -> None:
    await put(producer, cfg, reason="normaliser_error", customer=None, service="ingest", source=False)
    await put(producer, cfg, reason="too_big", customer="wati:1", payload=None)
    entries = await read_entries(cfg)
    done = await replay(cfg, entries, by="ana")
    outcomes = {e.record["reason"]: o for e, o in zip(entries, done, strict=True)}
    assert [o.replayed for o in outcomes.values()] == [None, None]
    assert "no source topic" in str(outcomes["normaliser_error"].refused)
    assert "no payload" in str(outcomes["too_big"].refused)
    assert await read_replays(cfg) == {}


def cli(cfg: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in Settings.documented()}}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": cfg.kafka_bootstrap_servers, "TOPIC_PREFIX": cfg.topic_prefix,
                "TOPIC_PARTITIONS": str(cfg.topic_partitions)})
    return subprocess.run([sys.executable, "-m", "services.cli", "dead-letters", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


async def test_the_command(cfg: Settings, producer: AIOKafkaProducer) -> None:
    await put(producer, cfg, reason="openai_failed", customer="wati:50370000001")
    await put(producer, cfg, reason="send_failed", customer="wati:50370000002")
    listed = await asyncio.to_thread(cli, cfg, "list", "--reason", "send_failed", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["id", "failed", "at", "(UTC)", "service", "reason", "customer", "replayed"]
    assert len(lines) == 3 and "wati:50370000002" in lines[1] and lines[-1] == "1 dead letter(s)"
    dl_id = lines[1].split()[0]
    shown = await asyncio.to_thread(cli, cfg, "show", dl_id)
    assert shown.returncode == 0 and "send_failed happened" in shown.stdout and '"n": 1' in shown.stdout
    done = await asyncio.to_thread(cli, cfg, "replay", dl_id, "--by", "ops")
    assert done.returncode == 0 and done.stdout.startswith(f"replayed {dl_id} -> ")
    again = await asyncio.to_thread(cli, cfg, "replay", dl_id)
    assert again.returncode == 1 and f"refused  {dl_id}: already replayed" in again.stdout
    # --all replays what is left (the other one), and only that
    rest = await asyncio.to_thread(cli, cfg, "replay", "--all")
    assert rest.returncode == 0 and rest.stdout.splitlines()[-1] == "1 replayed, 0 refused"
    listed = await asyncio.to_thread(cli, cfg, "list", "--replayed", "no")
    assert listed.stdout.strip() == "no dead letters match"
    unknown = await asyncio.to_thread(cli, cfg, "show", "0:999999")
    assert unknown.returncode == 1 and "no dead letter 0:999999" in unknown.stderr
    bad = await asyncio.to_thread(cli, cfg, "replay")
    assert bad.returncode == 2 and "ids" in bad.stderr
