"""Pieces of a running stack the benchmarks read: a background topic reader, a burst schedule.

The reader consumes whole topics from the start (no group, all partitions assigned), decodes every
value with the project's codec and keeps it with the record's own timestamp (the producer's
CreateTime, epoch ms) and the wall time the bench saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.config import Settings
from services.common.kafka import make_consumer


@dataclass
class Seen:
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    key: str
    name: str
    value: dict[str, Any]
    timestamp_ms: int  # the record's timestamp (CreateTime set by the producing service)
    seen_ms: float  # wall clock of the bench when it read the record


class TopicReader:
    """Reads topics from offset 0 in the background; `records[topic]` in per-partition order."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.settings = settings
        self.partitions = settings.topic_partitions  # every topic of the project has this count
        self.topics = topics
        self.records: dict[str, list[Seen]] = {t: [] for t in topics}
        self.undecodable = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> TopicReader:
        consumer = make_consumer(
            self.settings,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        partitions = [TopicPartition(t, p) for t in self.topics for p in range(self.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now_ms = time.time() * 1000.0
            for tp, messages in batches.items():
                for m in messages:
                    try:
                        name, value = codec.decode_any(m.value)
                    except codec.CodecError:
                        self.undecodable += 1
                        continue
                    self.records[tp.topic].append(
                        Seen(
                            tp.topic,
                            tp.partition,
                            m.offset,
                            (m.key or b"").decode(errors="replace"),
                            name,
                            value,
                            int(m.timestamp),
                            now_ms,
                        )
                    )
            if batches:
                self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Waits until `condition()` holds (checked on every new batch of records) or the timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def burst_schedule(
    *,
    customers: int,
    rate: float,
    seconds: float,
    burst: int,
    spacing: float,
    tag: str,
    seed: int,
    wa_id: Callable[[int], str],
) -> list[list[Any]]:
    """Open-loop schedule `[[t, wa_id, text], ...]` of bursts totalling ~`rate` messages/s.

    Every customer writes bursts of `burst` messages `spacing` s apart, one burst every
    `customers * burst / rate` seconds, at a random phase. Texts carry `tag` (to attribute results).
    """
    rng = random.Random(seed)
    period = customers * burst / rate
    entries: list[list[Any]] = []
    for c in range(customers):
        start = rng.uniform(0, period)
        k = 0
        while start + k * period < seconds:
            t0 = start + k * period
            for m in range(burst):
                t = t0 + m * spacing
                if t < seconds:
                    entries.append([t, wa_id(c), f"{tag} c{c} b{k} m{m}"])
            k += 1
    entries.sort(key=lambda e: e[0])
    return entries
