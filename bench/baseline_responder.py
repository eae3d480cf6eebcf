"""The responder benchmark's empirical baseline: the least a concurrent Kafka → OpenAI → WATI loop does.

Plain aiokafka + httpx: consume the requests topic (all partitions, no group), one chain per customer
(its batches strictly in order), at most RESPONDER_CONCURRENCY calls in flight, each: one Responses
call (no conversation, no SDK), one WATI send, one AssistantReply produced with the same producer
settings. No state topic, no conversation creation, no retries, no dedupe. Measured in the same
run as the product, it shows how far below the Little's-law limit this machine itself keeps ANY
implementation, and how much of the gap is the product's own work.

Run as `python -m bench.baseline_responder` with the services' environment.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.timeparse import utcnow

from .common import assigned_consumer, serve_until_signal


async def serve(settings: Settings) -> None:
    topics = Topics.from_settings(settings)
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    consumer = await assigned_consumer(settings, topics.responder_requests, offset_reset="earliest")
    limits = httpx.Limits(
        max_connections=settings.responder_concurrency * 2,
        max_keepalive_connections=settings.responder_concurrency * 2,
    )
    openai = httpx.AsyncClient(
        base_url=settings.openai_base_url,
        timeout=60.0,
        limits=limits,
        headers={"Authorization": f"Bearer {settings.openai_api_key}"},
    )
    wati = httpx.AsyncClient(
        base_url=settings.wati_api_url,
        timeout=60.0,
        limits=limits,
        headers={"Authorization": f"Bearer {settings.wati_api_token}"},
    )
    slots = asyncio.Semaphore(settings.responder_concurrency)
    chains: dict[str, asyncio.Task[None]] = {}

    async def answer(request: dict[str, Any], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await previous
        async with slots:
            text = "\n".join(str(m.get("text") or "") for m in request["messages"])
            response = (
                await openai.post(
                    "/responses",
                    json={"model": settings.openai_model, "input": [{"role": "user", "content": text}]},
                )
            ).json()
            reply = response["output"][0]["content"][0]["text"]
            await wati.post(
                f"/api/v1/sendSessionMessage/{request['provider_id']}", params={"messageText": reply}
            )
            await producer.send_and_wait(
                topics.replies,
                codec.encode(
                    "AssistantReply",
                    {
                        "batch_id": request["batch_id"],
                        "customer_key": request["customer_key"],
                        "channel": request["channel"],
                        "provider_id": request["provider_id"],
                        "outcome": "answered",
                        "text": reply,
                        "parts": [reply],
                        "sent_at": utcnow(),
                        "provider_message_ids": [],
                        "response_id": response["id"],
                        "conversation_id": None,
                        "input_tokens": response["usage"]["input_tokens"],
                        "output_tokens": response["usage"]["output_tokens"],
                    },
                ),
                key=request["customer_key"].encode(),
            )

    async def consume() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batches.values():
                for record in records:
                    request = codec.decode("ResponderRequest", record.value)
                    key = request["customer_key"]
                    chains[key] = asyncio.create_task(answer(request, chains.get(key)))

    try:
        await serve_until_signal(settings.responder_web_port, consume())
    finally:
        await consumer.stop()
        await producer.stop()
        await openai.aclose()
        await wati.aclose()


def main() -> None:
    asyncio.run(serve(Settings.from_env()))


if __name__ == "__main__":
    main()
