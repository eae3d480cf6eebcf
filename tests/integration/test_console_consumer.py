"""The console's consumer on the real broker: fills an empty store from the topics, resumes from
the offsets it stored (nothing counted twice), and rebuilds a deleted store from the beginning."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.console.consumer import ConsoleConsumer
from services.console.store import Store
from services.responder.prompt import labels_for
from tests.conftest import unique_prefix
from tests.unit.console_builders import dead_letter, decision, missed, request
from tests.unit.context_builders import KEY, command, inbound, reply, t

pytestmark = pytest.mark.broker


async def produce(settings: Settings, records: list[tuple[str, str, dict[str, Any]]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for topic, schema, value in records:
            await producer.send_and_wait(topic, codec.encode(schema, value), key=KEY.encode())
    finally:
        await producer.stop()


async def consume_all(settings: Settings, store: Store, expected: int) -> int:
    """Runs the console's consumer until the store's positions account for `expected` records."""
    consumer = ConsoleConsumer(settings, store, labels_for("es"))
    new = expected - sum(store.offsets().values())
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while consumer.applied < new:
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
    assert sum(store.offsets().values()) == expected
    return consumer.applied


def first_day(topics: Topics) -> list[tuple[str, str, dict[str, Any]]]:
    items = [missed(t("09:58:00"), "Hola, soy Ana")]
    return [
        (topics.inbound, "InboundMessage", dict(inbound("e1", t("10:00:00"), "hola"))),
        (topics.audit, "BatchDecision", dict(decision("b1", t("10:00:05"), injected=items, check_ran=True))),
        (topics.responder_requests, "ResponderRequest",
         dict(request("b1", t("10:00:05"), [inbound("e1", t("10:00:00"), "hola")], missed_items=items))),
        (topics.replies, "AssistantReply", dict(reply("b1", t("10:00:08")))),
        (topics.context_commands, "ContextCommand", dict(command("pause", t("10:01:00"), actor="ana"))),
        (topics.dead_letter, "DeadLetter", dict(dead_letter(t("10:02:00"), source_topic=topics.inbound))),
    ]


async def test_fill_resume_and_rebuild(settings: Settings, tmp_path: Path) -> None:
    s = dataclasses.replace(settings, topic_prefix=unique_prefix("console-consumer"))
    topics = await ensure_topics(s)
    await produce(s, first_day(topics))

    store = Store(tmp_path / "a.sqlite3")
    assert await consume_all(s, store, 6) == 6
    figures = store.totals(0)
    assert (figures["batches"], figures["requests"], figures["replies"], figures["messages"],
            figures["pauses"], figures["dead_letters"], figures["inj_history"]) == (1, 1, 1, 1, 1, 1, 1)
    [batch] = store.batches(KEY)
    assert batch["block"] and "Hola, soy Ana" in batch["block"] and batch["outcome"] == "answered"
    assert store.customer(KEY)["paused_by"] == "ana"  # type: ignore[index]

    # a restart resumes after what it stored: the next record only, nothing counted twice
    await produce(s, [(topics.audit, "BatchDecision", dict(decision("b2", t("10:05:00"), held=True,
                                                                     reason="paused")))])
    assert await consume_all(s, store, 7) == 1
    assert store.totals(0)["batches"] == 2 and store.totals(0)["held"] == 1
    store.close()

    # a new, empty store (another host, a deleted file): rebuilt from the topics' beginning
    rebuilt = Store(tmp_path / "b.sqlite3")
    assert await consume_all(s, rebuilt, 7) == 7
    assert rebuilt.totals(0) == Store(tmp_path / "a.sqlite3").totals(0)
