"""A replayed input produces the same effects (after a crash the four input topics are replayed
from their own committed positions: later, and possibly in another interleaving).

- The state functions get the time the event carries (ingest's `received_at`, the reply's
  `sent_at`, the command's `issued_at`), never the worker's clock: a batch replayed an hour later
  opens, waits and flushes exactly as it did.
- A flush carries how many of the batch's messages the timer saw: a message handled after the
  timer decided belongs to the next batch, whether the replay puts it before or after the flush;
  a flush replayed before messages it saw waits for them. So a batch id always names the same
  messages, and the responder's dedupe by batch id drops the same batch that was sent.
"""

from __future__ import annotations

from typing import Any, cast

from services.common import codec
from services.common.config import Settings
from services.common.records import ContextCommand, CustomerState, InboundMessage
from services.context.app import Incoming, build_limits, create_app

from .context_builders import KEY, Customer, command, inbound, limits, secs, t

QUIET = 30


def flush(at: Any, batch_id: str, seen: int | None) -> ContextCommand:
    cmd = command("flush", at, batch_id)
    cmd["batch_messages"] = seen
    return cmd


def batches(c: Customer) -> list[tuple[str, list[str]]]:
    return [(r["batch_id"], [m["event_id"] for m in r["messages"]]) for r in c.requests]


def first_contact_done(c: Customer) -> None:
    """Answers the customer's first contact, so later batches need no history check (short gap)."""
    c.message(inbound("w0", t("10:00:00"), "Hola"))
    c.flush(t("10:00:40"))
    c.history(t("10:00:41"), [])
    c.answer(t("10:00:45"))


def test_a_message_handled_after_the_timer_decided_is_in_the_next_batch_in_either_order() -> None:
    m1 = inbound("w1", t("10:01:00"), "¿Tienen habitaciones?")
    m2 = inbound("w2", t("10:01:31"), "¿Con desayuno?")  # arrives just after the quiet window ended
    # The original run: the timer saw [w1] at 10:01:30.5; w2 was handled before the flush command.
    original = Customer(lim=limits(quiet=QUIET))
    first_contact_done(original)
    original.message(m1)
    batch_id = original.due(t("10:01:30.500"))
    assert batch_id is not None
    original.message(m2)
    original.command(flush(t("10:01:30.500"), batch_id, 1))
    # The replay: the flush command comes back before w2.
    replay = Customer(lim=limits(quiet=QUIET))
    first_contact_done(replay)
    replay.message(m1)
    replay.command(flush(t("10:01:30.500"), batch_id, 1))
    replay.message(m2)
    for c in (original, replay):
        next_id = c.due(t("10:02:10"))
        assert next_id is not None
        c.command(flush(t("10:02:10"), next_id, 1))
    assert batches(original) == batches(replay) == [
        (f"{KEY}:1", ["w0"]), (f"{KEY}:2", ["w1"]), (f"{KEY}:3", ["w2"])]
    # the next batch captured its priors as if w2 had come after the flush: w1's time, not w2's own
    assert original.requests[2]["prior_last_inbound_at"] == m1["provider_time"]
    assert original.requests[2] == replay.requests[2]


def test_a_flush_replayed_before_messages_it_saw_waits_for_them() -> None:
    m1 = inbound("w1", t("10:01:00"), "¿Tienen habitaciones?")
    m2 = inbound("w2", t("10:01:10"), "¿Con desayuno?")
    original = Customer(lim=limits(quiet=QUIET))
    first_contact_done(original)
    original.message(m1)
    original.message(m2)
    batch_id = original.due(t("10:01:41"))
    assert batch_id is not None
    original.command(flush(t("10:01:41"), batch_id, 2))

    replay = Customer(lim=limits(quiet=QUIET))
    first_contact_done(replay)
    replay.message(m1)
    effects = replay.command(flush(t("10:01:41"), batch_id, 2))  # before w2 in this interleaving
    assert effects.log == [("flush_waiting", {"batch_id": batch_id, "batch_messages": 2, "handled": 1})]
    assert not effects.responder_requests and replay.state["open_batch"] is not None
    effects = replay.message(m2)  # the last message it counted: decided now, at its own time
    assert [r["batch_id"] for r in effects.responder_requests] == [batch_id]
    assert batches(original) == batches(replay)
    assert batches(replay)[-1] == (batch_id, ["w1", "w2"])
    assert effects.responder_requests == [original.requests[-1]]


def test_a_timer_reading_the_replayed_shorter_batch_cannot_flush_it_differently() -> None:
    """The drill's "emitted twice": after a restart the timer reads a batch the replay has only
    partly rebuilt and sends its own, shorter flush — behind the original one in the commands topic,
    which waits for its messages. The original decides; the batch is the one already emitted."""
    m1 = inbound("w1", t("10:01:00"), "¿Tienen habitaciones?")
    m2 = inbound("w2", t("10:01:10"), "¿Con desayuno?")
    original = Customer(lim=limits(quiet=QUIET))
    first_contact_done(original)
    original.message(m1)
    original.message(m2)
    batch_id = original.due(t("10:01:41"))
    assert batch_id is not None
    original.command(flush(t("10:01:41"), batch_id, 2))

    replay = Customer(lim=limits(quiet=QUIET))
    first_contact_done(replay)
    replay.message(m1)
    replay.command(flush(t("10:01:41"), batch_id, 2))  # the original flush, read before w2
    effects = replay.command(flush(t("10:02:30"), batch_id, 1))  # the new worker's timer saw w1 only
    assert effects.log == [("flush_ignored", {"batch_id": batch_id, "reason": "earlier_flush_waiting"})]
    replay.message(m2)
    assert batches(replay) == batches(original)
    assert batches(replay)[-1] == (batch_id, ["w1", "w2"])


def test_waiting_flushes_are_decided_in_log_order_each_at_its_own_time() -> None:
    """A waiting flush that turns out not due (judged at its own time) gives way to the next."""
    replay = Customer(lim=limits(quiet=QUIET))
    first_contact_done(replay)
    replay.message(inbound("w1", t("10:01:00")))
    batch_id = f"{KEY}:2"
    replay.command(flush(t("10:01:05"), batch_id, 2))  # not due at 10:01:05 once w2 (10:01:02) is in
    replay.command(flush(t("10:01:40"), batch_id, 2))
    effects = replay.message(inbound("w2", t("10:01:02")))
    assert ("flush_ignored", {"batch_id": batch_id, "reason": "not_due"}) in effects.log
    assert [r["batch_id"] for r in effects.responder_requests] == [batch_id]
    assert batches(replay)[-1] == (batch_id, ["w1", "w2"])


def test_a_command_without_a_count_flushes_every_message_as_before() -> None:
    c = Customer(lim=limits(quiet=QUIET))
    first_contact_done(c)
    c.message(inbound("w1", t("10:01:00")))
    c.message(inbound("w2", t("10:01:05")))
    c.flush(t("10:01:40"))
    assert batches(c)[-1] == (f"{KEY}:2", ["w1", "w2"])


async def test_the_shell_uses_the_time_each_event_carries_not_its_own_clock(tmp_path: Any) -> None:
    """A message replayed long after it was received opens its batch at its receive time (the quiet
    window runs from there); with the worker's clock the replay would open it now, and wait again."""
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="rp.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    runtime = create_app(settings).runtime
    table: dict[bytes, bytes] = {}
    runtime.customers = table  # type: ignore[assignment]
    message: InboundMessage = inbound("w1", t("10:01:00"), "Hola")  # received on 2025-10-07
    value = codec.encode("InboundMessage", dict(message))
    await runtime.handle_events([Incoming(KEY.encode(), value, runtime.topics.inbound, 0, 1)])
    state = cast(CustomerState, codec.decode("CustomerState", table[KEY.encode()]))
    batch = state["open_batch"]
    assert batch is not None
    assert batch["opened_at"] == batch["last_message_at"] == message["received_at"]
    assert state["last_activity_at"] == message["received_at"]
    lim = build_limits(settings)
    assert runtime.index.entries[KEY].due_at == message["received_at"] + secs(lim.quiet_window_seconds)


async def test_the_timer_tells_how_many_messages_it_saw(tmp_path: Any) -> None:
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="rp.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    runtime = create_app(settings).runtime
    table: dict[bytes, bytes] = {}
    runtime.customers = table  # type: ignore[assignment]
    sent: list[ContextCommand] = []

    async def send_command(cmd: ContextCommand) -> None:
        sent.append(cmd)

    runtime.send_command = send_command  # type: ignore[method-assign]
    runtime.index_ready = True
    runtime.readiness = lambda: (True, {})  # type: ignore[method-assign]
    messages = [inbound(f"w{i}", t("10:01:00") + secs(i)) for i in range(3)]
    events = [Incoming(KEY.encode(), codec.encode("InboundMessage", dict(m)), runtime.topics.inbound, 0, i)
              for i, m in enumerate(messages)]
    await runtime.handle_events(events)
    assert await runtime.flush_tick()
    assert [(c["kind"], c.get("batch_messages")) for c in sent] == [("flush", 3)]
