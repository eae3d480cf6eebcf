"""The pipeline benchmark's baseline: the least a quiet-window batcher over Kafka must cost.

One process, plain aiokafka: consume the inbound topic (all partitions, no consumer group, no
state table, no changelog, no dedupe, no history check), keep each customer's messages in a dict,
re-arm an asyncio timer of QUIET_WINDOW_SECONDS on every message, and when it fires produce a
ResponderRequest (Avro, same producer settings) keyed by the customer. The context service does
all of that plus durability (table + changelog), dedupe, gap checks and audit events; the
difference between the two latencies is what those cost, the rest is Kafka and the machine.

Run as `python -m bench.baseline_relay` with the services' environment.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.timeparse import utcnow

from .common import assigned_consumer, plain_request, serve_until_signal


async def serve(settings: Settings) -> None:
    topics = Topics.from_settings(settings)
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    consumer = await assigned_consumer(settings, topics.inbound, offset_reset="latest")
    parts = list(consumer.assignment())
    await consumer.seek_to_end(*parts)
    for tp in parts:
        await consumer.position(tp)  # resolve "latest" now, before the service says it is ready
    pending: dict[str, list[dict[str, Any]]] = {}
    timers: dict[str, asyncio.TimerHandle] = {}
    loop = asyncio.get_running_loop()
    sends: set[asyncio.Task[None]] = set()

    async def flush(key: str) -> None:
        messages = pending.pop(key, [])
        timers.pop(key, None)
        if not messages:
            return
        request = plain_request(f"{key}:{messages[0]['event_id']}", messages, utcnow())
        await producer.send_and_wait(
            topics.responder_requests, codec.encode("ResponderRequest", request), key=key.encode()
        )

    def fire(key: str) -> None:
        task = loop.create_task(flush(key))
        sends.add(task)
        task.add_done_callback(sends.discard)

    async def consume() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batches.values():
                for record in records:
                    value = codec.decode("InboundMessage", record.value)
                    key = value["customer_key"]
                    pending.setdefault(key, []).append(value)
                    old = timers.get(key)
                    if old is not None:
                        old.cancel()
                    timers[key] = loop.call_later(settings.quiet_window_seconds, fire, key)

    try:
        await serve_until_signal(settings.context_web_port, consume())
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> None:
    asyncio.run(serve(Settings.from_env()))


if __name__ == "__main__":
    main()
