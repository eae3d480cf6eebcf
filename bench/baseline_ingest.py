"""The ingest benchmark's baseline: a minimal aiohttp handler producing the raw body to Kafka.

Same broker, same producer settings (`make_producer(settings)`: acks=all, idempotent, linger 2 ms),
same topic partitioning, no validation, no normalisation, no Avro, no logging: what any webhook
receiver must at least pay to answer only after the broker's ack. `--null` answers 200 without
Kafka at all: the ceiling of the load generator + HTTP stack on this machine.

Run as its own process: `python -m bench.baseline_ingest [--null]` with the services' environment
(KAFKA_BOOTSTRAP_SERVERS, TOPIC_PREFIX, INGEST_PORT, ...).
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer

from .common import serve_until_signal


async def serve(settings: Settings, null: bool) -> None:
    topic = Topics.from_settings(settings).inbound
    producer = None
    if not null:
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        if producer is not None:
            await producer.send_and_wait(topic, body)
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/webhooks/wati", webhook)
    try:
        await serve_until_signal(settings.ingest_port, app=app)
    finally:
        if producer is not None:
            await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--null", action="store_true", help="answer 200 without producing")
    args = parser.parse_args()
    asyncio.run(serve(Settings.from_env(), args.null))


if __name__ == "__main__":
    main()
