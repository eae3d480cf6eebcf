"""The console's consumer on the real broker: fills an empty store from the topics, resumes from
the offsets it stored (nothing counted twice), and rebuilds a deleted store from the beginning."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
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


def second_waits_for_first(consumer: ConsoleConsumer) -> bool:
    """The consumer's loop has the second batch (b2) decoded while the first write is not done."""
    if consumer.task is None or consumer.writing is None or consumer.writing.done():
        return False
    ready = consumer.task.get_stack(limit=1)[0].f_locals.get("ready")
    return ready is not None and [d["batch_id"] for d in ready.decisions] == ["b2"]


async def test_stopping_during_a_store_write_finishes_that_write_with_its_positions(
    settings: Settings, tmp_path: Path
) -> None:
    """The console stopped while a polled batch is being written (and the next batch waits for that
    write): `stop` returns normally once the write, rows and positions together, is committed — the
    cancel neither escapes `stop` nor leaves the write running under a store about to be closed."""
    s = dataclasses.replace(settings, topic_prefix=unique_prefix("console-cancel"))
    topics = await ensure_topics(s)
    await produce(s, [(topics.audit, "BatchDecision", dict(decision(f"b{n}", t(f"10:0{n}:00"))))
                      for n in (1, 2)])
    store = Store(tmp_path / "c.sqlite3")
    entered, release = threading.Event(), threading.Event()
    write_decisions = store.apply_decisions

    def blocked_write(batch: list[Any]) -> None:  # the first write holds until the test releases it
        entered.set()
        release.wait(30)
        write_decisions(batch)

    store.apply_decisions = blocked_write  # type: ignore[method-assign]
    consumer = ConsoleConsumer(s, store, labels_for("es"), max_records=1)  # one record a batch
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            await asyncio.to_thread(entered.wait, 60)
            # wait for the moment a stop hits: the loop holds the second batch decoded (`ready`)
            # while the first write is still under way, so it is waiting for that write to end
            while not second_waits_for_first(consumer):
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(consumer.stop())
            await asyncio.sleep(0)  # `stop` cancels the loop
            release.set()
            await stopping
    finally:
        release.set()
        await consumer.stop()
    # the batch under way was written with its position, and nothing is still writing
    assert consumer.writing is None and consumer.applied == sum(store.offsets().values()) >= 1
    assert store.totals(0)["batches"] == sum(store.offsets().values())
    store.close()
