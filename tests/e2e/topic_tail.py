"""A drill's reader of topics: every record of the given partitions from offset 0, no consumer group.

The drills judge what the pipeline wrote from the broker itself, so they keep a reader running in the
background and hand each record to `on_record`. It keeps going through a broker outage (aiokafka
reconnects; fetch errors are counted and retried).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition


async def stop_quietly(consumer: AIOKafkaConsumer) -> None:
    """Stops a reader at the end of a drill: its errors are not the drill's (a fetch that timed out
    on a loaded broker ends in a CancelledError out of `stop()`), unless we are being cancelled."""
    try:
        await asyncio.wait_for(consumer.stop(), 10)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # the figures are already taken
        pass


class TopicTail:
    """Reads `watched()` from the beginning until the context exits; subclasses keep what they need."""

    task_name = "topic-tail"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.read_errors = 0
        self.position: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    def watched(self) -> list[TopicPartition]:
        raise NotImplementedError

    def on_record(self, tp: TopicPartition, record: Any) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=100)
        await consumer.start()
        partitions = self.watched()
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name=self.task_name)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await stop_quietly(self._consumer)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker is away (a drill stopped it): keep reading once it is back
                self.read_errors += 1
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                for record in records:
                    self.on_record(tp, record)
                    self.position[tp] = record.offset + 1
