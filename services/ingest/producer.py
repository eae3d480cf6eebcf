"""The ingest's Kafka producer, kept usable across broker outages without restarting the service.

`AIOKafkaProducer.start()` fails when the broker is down, and the service must still start and answer
503 until the broker comes: a background task creates the topics and starts the producer, retrying
with backoff, then probes the broker with a metadata request every `probe_interval` seconds so
`/readyz` tells the truth.

Measured with aiokafka 0.14 and the embedded Kafka (SIGKILL, then restart on the same data, ~13 s):
a started idempotent producer reconnects by itself once the broker is back, and sends that timed
out meanwhile do not wedge it (the next sends were acked in ~10 ms). Those timed-out records stay in
the producer's buffer and ARE delivered after the broker returns, although their webhook was
answered 503: if the provider retries, the same event id arrives twice and context's dedupe by
event id drops the copy (at-least-once, docs/design.md "Delivery"). So the producer is never recreated
after a timeout: recreating it would only lose that buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from services.common.config import Settings
from services.common.kafka import ensure_topics, make_producer, send_record
from services.common.logs import event

log = logging.getLogger(__name__)


class KeyHashCache:
    """aiokafka's `DefaultPartitioner` (murmur2 of the key, as Java's) with each key's hash kept.

    The pure-Python murmur2 costs ~4.5 µs per record, and a customer writes many messages. The hash
    does not depend on the partition count, so the partition is still picked from the producer's
    current metadata (`all_partitions`) exactly as `DefaultPartitioner` picks it. At most `size`
    hashes are kept (the map is emptied when full: simple, bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self.size:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


class BrokerUnavailable(Exception):
    """The broker did not acknowledge in time, or is not connected; the reason is safe to return."""


class ProducerSupervisor:
    """Owns the producer: lazy start with retries, health probing, bounded sends, bounded flush."""

    def __init__(
        self,
        settings: Settings,
        *,
        probe_interval: float = 1.0,
        stale_after: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.settings = settings
        self.probe_interval = probe_interval
        self.stale_after = stale_after
        self.max_backoff = max_backoff
        self._producer: AIOKafkaProducer | None = None
        self._topics_ready = False
        self._healthy = False
        self._last_ok: float | None = None
        self._problem = "not connected to Kafka yet"
        self._task: asyncio.Task[None] | None = None
        self._partitioner = KeyHashCache()

    # --- lifecycle ---

    async def start(self) -> None:
        """Returns at once; connecting happens in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ingest-producer-supervisor")

    async def close(self, flush_timeout: float | None = None) -> None:
        """Stops probing and flushes the producer, waiting at most `flush_timeout` for the broker."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        producer, self._producer = self._producer, None
        self._healthy = False
        if producer is not None:
            default = self.settings.produce_timeout_seconds + 5
            await _stop_quietly(producer, flush_timeout if flush_timeout is not None else default)

    async def _run(self) -> None:
        """Connect (with backoff) until connected, then probe; never dies of an unexpected error,
        because a dead supervisor would leave the service answering 503 for ever."""
        backoff = 0.2
        while True:
            try:
                if self._producer is not None:
                    await self._probe()
                    await asyncio.sleep(self.probe_interval)
                    continue
                if await self._connect():
                    backoff = 0.2
                    continue
            except Exception as exc:
                self._healthy = False
                self._problem = f"producer supervisor error ({type(exc).__name__})"
                log.exception("producer supervisor error")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _connect(self) -> bool:
        producer: AIOKafkaProducer | None = None
        try:
            if not self._topics_ready:
                # bounded: an unreachable (not refusing) host would hold the admin client for 40 s
                await asyncio.wait_for(ensure_topics(self.settings, attempts=1), 3 * self._probe_timeout())
                self._topics_ready = True
            producer = make_producer(self.settings, partitioner=self._partitioner)
            await asyncio.wait_for(producer.start(), self._probe_timeout())
        except (KafkaError, OSError, TimeoutError) as exc:
            self._problem = f"cannot connect to Kafka ({type(exc).__name__})"
            event(log, "kafka_connect_failed", logging.WARNING, error=type(exc).__name__)
            if producer is not None:
                await _stop_quietly(producer, 2.0)
            return False
        self._producer = producer
        self._mark_ok()
        event(log, "kafka_connected", bootstrap=self.settings.kafka_bootstrap_servers)
        return True

    async def _probe(self) -> None:
        """One metadata request through the producer's own client (its connection pool)."""
        assert self._producer is not None
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), self._probe_timeout())
        except (KafkaError, OSError, TimeoutError) as exc:
            if self._healthy:
                event(log, "kafka_unreachable", logging.WARNING, error=type(exc).__name__)
            self._healthy = False
            self._problem = f"metadata request failed ({type(exc).__name__})"
            return
        if not self._healthy:
            event(log, "kafka_reachable")
        self._mark_ok()

    def _probe_timeout(self) -> float:
        return max(1.0, min(self.settings.produce_timeout_seconds, 10.0))

    def _mark_ok(self) -> None:
        self._healthy = True
        self._last_ok = asyncio.get_running_loop().time()

    # --- state ---

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The started producer, or None while not connected (for the dead-letter helper)."""
        return self._producer

    def readiness(self) -> str | None:
        """None when ready (producer started, last probe fine and recent), else why not."""
        if self._producer is None or not self._healthy:
            return self._problem
        assert self._last_ok is not None
        age = asyncio.get_running_loop().time() - self._last_ok
        if age > self.stale_after:
            return f"no successful metadata request for {age:.0f} s"
        return None

    # --- producing ---

    async def send(self, topic: str, key: str, schema: str, value: Any) -> None:
        """Produces one record and waits for the ack, at most `produce_timeout_seconds`.

        Raises BrokerUnavailable (never hangs); a CodecError (a value that does not fit its
        schema: a bug, not an outage) propagates.
        """
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable(self._problem)
        timeout = self.settings.produce_timeout_seconds
        try:
            async with asyncio.timeout(timeout):  # no extra task per webhook, unlike wait_for
                await send_record(producer, topic, key, schema, value)
        except TimeoutError:
            self._healthy = False
            self._problem = f"Kafka did not acknowledge within {timeout:g} s"
            raise BrokerUnavailable(self._problem) from None
        except KafkaError as exc:
            self._healthy = False
            self._problem = f"Kafka refused the record ({type(exc).__name__})"
            raise BrokerUnavailable(self._problem) from None
        self._mark_ok()


async def _stop_quietly(producer: AIOKafkaProducer, timeout: float) -> None:
    """`stop()` flushes; with the broker down it would wait for ever, so it is bounded."""
    try:
        await asyncio.wait_for(producer.stop(), timeout)
    except (KafkaError, OSError, TimeoutError) as exc:
        event(log, "producer_stop_incomplete", logging.WARNING, error=type(exc).__name__)
