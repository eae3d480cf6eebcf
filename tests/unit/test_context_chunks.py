"""The agent's chunked handling keeps the delivery rule: no state is written before every effect of
the chunk is acked, and a later event of a customer sees the earlier one's state (not yet written)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.common import codec
from services.common.config import Settings
from services.common.records import CustomerState
from services.common.timeparse import utcnow
from services.context import state as sm
from services.context.app import Incoming, build_limits, create_app

from .context_builders import KEY, Customer, command, inbound, secs


class HeldProducer:
    """Takes records and hands back futures the test resolves: the broker's acks, held back."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.acks: list[asyncio.Future[None]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[None]:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, value))
        self.acks.append(ack)
        return ack


async def test_a_chunk_writes_its_states_only_after_every_effect_is_acked(tmp_path: Any) -> None:
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ch.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path),
                        missed_history="gap", reconcile_interval_seconds=60.0)  # short gap: no fetch
    runtime = create_app(settings).runtime
    lim = build_limits(settings)
    now = utcnow()
    customer = Customer(lim=lim)  # a known customer the bot answered a minute ago
    customer.message(inbound("w1", now - secs(120), "¿Tienen habitaciones?"))
    customer.flush(now - secs(90))
    customer.history(now - secs(89), [])
    customer.answer(now - secs(60), ids=["wamid.BOT1"])
    before = codec.encode("CustomerState", dict(customer.state))
    table: dict[bytes, bytes] = {KEY.encode(): before}
    runtime.customers = table  # type: ignore[assignment]
    producer = HeldProducer()
    runtime._producer = producer  # type: ignore[assignment]

    message = inbound("w2", now - secs(40), "¿Y con desayuno?")
    customer.message(message, now)
    flush_at = now + secs(lim.quiet_window_seconds + 1)  # the runtime stamps the message with its clock
    batch_id = sm.due_action(customer.state, flush_at, lim)
    assert batch_id is not None
    topics = runtime.topics
    chunk = [
        Incoming(KEY.encode(), codec.encode("InboundMessage", dict(message)), topics.inbound, 0, 7),
        Incoming(KEY.encode(), codec.encode("ContextCommand", dict(command("flush", flush_at, batch_id))),
                 topics.context_commands, 0, 3),
    ]
    handling = asyncio.create_task(runtime.handle_events(chunk))
    for _ in range(1000):  # until the flush's effects were handed to the producer
        if len(producer.acks) >= 2 or handling.done():
            break
        await asyncio.sleep(0)
    assert [topic for topic, _ in producer.sent] == [topics.responder_requests, topics.audit], \
        "the flush saw the message of the same chunk, although its state was not written yet"
    assert table[KEY.encode()] == before and not handling.done(), "nothing is written before the acks"

    for ack in producer.acks:
        ack.set_result(None)
    await asyncio.wait_for(handling, 5)
    after = cast(CustomerState, codec.decode("CustomerState", table[KEY.encode()]))
    assert after["open_batch"] is None and after["flushing_batch"] is None
    request = codec.decode("ResponderRequest", producer.sent[0][1])
    assert [m["event_id"] for m in request["messages"]] == ["w2"]
