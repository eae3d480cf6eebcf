"""Topics, the producer every service uses, and the dead-letter helper.

Every topic is created here (unless KAFKA_CREATE_TOPICS=false: then it must exist), with its
configured partition count, before any service subscribes:
a faust worker silently ignores a source topic that did not exist when it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, fields
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from . import codec, metrics
from .config import ConfigError, Settings
from .logs import event
from .timeparse import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """Topic names. All keyed by customer key and co-partitioned (same partition count)."""

    inbound: str
    agent_activity: str
    replies: str
    context_commands: str
    responder_requests: str
    vision_requests: str
    image_classified: str
    audit: str
    dead_letter: str
    responder_state: str
    dead_letter_replays: str  # which dead letters were replayed (services/common/deadletters.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        p = settings.topic_prefix
        return cls(**{f.name: p + f.name.replace("_", "-") for f in fields(cls)})

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


COMPACTED = {"responder_state", "dead_letter_replays"}


async def ensure_topics(settings: Settings, attempts: int = 30) -> Topics:
    """Creates every topic that does not exist yet; safe to call from every process at start."""
    topics = Topics.from_settings(settings)
    wanted = [
        NewTopic(
            name=getattr(topics, f.name),
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication,
            topic_configs={"cleanup.policy": "compact"} if f.name in COMPACTED else {},
        )
        for f in fields(topics)
    ]
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t.name not in existing]
            if missing and not settings.kafka_create_topics:
                raise ConfigError(
                    "missing topics (KAFKA_CREATE_TOPICS=false): " + ", ".join(t.name for t in missing)
                    + f"; create them with {settings.topic_partitions} partitions"
                )
            if missing:
                # another process may create them meanwhile
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(missing)
            return topics
        except KafkaError as exc:
            if attempt == attempts - 1:
                raise
            event(log, "topics_retry", logging.WARNING, error=type(exc).__name__)
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        finally:
            await admin.close()
    return topics


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all and idempotence: a retried send never duplicates; linger lets requests share batches."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        "request_timeout_ms": 10_000,
        "retry_backoff_ms": 100,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def send_record(
    producer: AIOKafkaProducer, topic: str, key: str, schema: str, value: dict[str, Any]
) -> None:
    """Encodes and produces one value, waiting for the broker's ack."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await producer.send_and_wait(topic, codec.encode(schema, value), key=key.encode())
    _produce_latency(topic).observe(loop.time() - start)


_produce_latency = metrics.Children(metrics.produce_latency_seconds)


async def dead_letter(
    producer: AIOKafkaProducer,
    topics: Topics,
    *,
    service: str,
    reason: str,
    error: str,
    source_topic: str | None = None,
    partition: int = -1,
    offset: int = -1,
    key: bytes | None = None,
    payload: bytes | None = None,
    customer_key: str | None = None,
    batch_id: str | None = None,
) -> None:
    """Puts a message the service could not handle on the dead-letter topic, with the reason."""
    record = {
        "service": service, "reason": reason, "error": error[:2000], "source_topic": source_topic,
        "partition": partition, "offset": offset, "key": key, "payload": payload,
        "customer_key": customer_key, "batch_id": batch_id, "failed_at": utcnow(),
    }
    await producer.send_and_wait(
        topics.dead_letter, codec.encode("DeadLetter", record),
        key=(customer_key or (key.decode(errors="replace") if key else "unknown")).encode(),
    )
    metrics.dead_letters_total.labels(service, reason).inc()
    event(log, "dead_lettered", logging.WARNING, service=service, reason=reason,
          customer=customer_key or "-", batch_id=batch_id, source_topic=source_topic)
