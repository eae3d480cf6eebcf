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

import copy
from dataclasses import dataclass
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def two_messages_flushed_and_a_replay_of_the_first() -> tuple[Customer, Customer, str, InboundMessage]:
    """w1 and w2 batched and flushed (counting 2) on the original; the replay has read w1 only.
    Returns (original, replay, the batch id, w2)."""
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
    return original, replay, batch_id, m2


def test_a_flush_replayed_before_messages_it_saw_waits_for_them() -> None:
    original, replay, batch_id, m2 = two_messages_flushed_and_a_replay_of_the_first()
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
    original, replay, batch_id, m2 = two_messages_flushed_and_a_replay_of_the_first()
    replay.command(flush(t("10:01:41"), batch_id, 2))  # the original flush, read before w2
    effects = replay.command(flush(t("10:02:30"), batch_id, 1))  # the new worker's timer saw w1 only
    assert effects.log == [("flush_waiting", {"batch_id": batch_id, "batch_messages": 1, "handled": 1})]
    assert not effects.responder_requests, "it waits its turn behind the original flush"
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


def test_a_flush_of_a_batch_the_replay_has_not_opened_yet_waits_for_it() -> None:
    """The drill's case: the replay reads the original flush of batch N before any of N's messages
    (the batch is not even open); then the new worker's timer, reading the rebuilt batch, sends a
    flush with more messages. The original one decides."""
    original = Customer(lim=limits(quiet=QUIET))
    first_contact_done(original)
    replay = Customer(lim=limits(quiet=QUIET))
    replay.state = copy.deepcopy(original.state)
    burst = [inbound(f"w{i}", t(f"10:01:0{i}")) for i in range(1, 4)]
    late = [inbound(f"w{i}", t(f"10:01:5{i}")) for i in range(4, 7)]
    for m in burst:
        original.message(m)
    batch_id = original.due(t("10:01:40"))
    assert batch_id is not None
    original.command(flush(t("10:01:40"), batch_id, 3))
    effects = replay.command(flush(t("10:01:40"), batch_id, 3))  # no message of the batch yet
    assert effects.log == [("flush_waiting", {"batch_id": batch_id, "batch_messages": 3, "handled": 0})]
    for m in [*burst, *late]:
        replay.message(m)
    replay.command(flush(t("10:02:40"), batch_id, 6))  # the new timer saw all six in "its" batch
    for m in late:
        original.message(m)
    for c in (original, replay):
        next_id = c.due(t("10:02:40"))
        assert next_id is not None
        c.command(flush(t("10:02:40"), next_id, 3))
    assert batches(replay) == batches(original)[-2:] == [
        (batch_id, ["w1", "w2", "w3"]), (next_id, ["w4", "w5", "w6"])]


def test_flushes_of_batches_to_come_are_decided_in_log_order_whatever_they_count() -> None:
    """The drill's case: the replay reads batch 3's original flush (2 messages) and batch 4's before
    either batch opens, then a new timer's flush of batch 3 counting 1: batch 3 is still the two
    messages of the first run, batch 4 the next ones."""
    original = Customer(lim=limits(quiet=QUIET))
    first_contact_done(original)
    replay = Customer(lim=limits(quiet=QUIET))
    replay.state = copy.deepcopy(original.state)
    m = [inbound(f"w{i}", t(f"10:01:{i:02d}")) for i in range(1, 4)]
    for message in m[:2]:
        original.message(message, message["received_at"])
    third = original.due(t("10:01:40"))
    assert third is not None
    original.command(flush(t("10:01:40"), third, 2))
    original.message(m[2], m[2]["received_at"])
    fourth = original.due(t("10:02:40"))
    assert fourth is not None
    original.command(flush(t("10:02:40"), fourth, 1))
    for cmd in (flush(t("10:01:40"), third, 2), flush(t("10:02:40"), fourth, 1),
                flush(t("10:30:00"), third, 1)):  # the last: a new timer, batch 3 rebuilt with w1 only
        replay.command(cmd)
    replay.message(m[0], m[0]["received_at"])
    replay.command(flush(t("10:30:05"), third, 1))  # the new timer again, batch 3 open with w1
    for message in m[1:]:
        replay.message(message, message["received_at"])
    assert batches(replay) == batches(original)[-2:] == [(third, ["w1", "w2"]), (fourth, ["w3"])]


def test_a_timer_re_sending_while_a_replay_waits_never_crowds_out_a_later_batch_s_flush() -> None:
    """The drill's case: while the replay waited, new timers re-sent batch N's flush every few
    seconds; the bound then dropped the original flush of batch N+1, and N+1 was cut elsewhere."""
    c = Customer(lim=limits(quiet=QUIET))
    first_contact_done(c)
    n, later = f"{KEY}:2", f"{KEY}:3"
    c.command(flush(t("10:01:40"), n, 2))
    for i in range(20):  # a new timer's re-sends, read before the batch's messages
        c.command(flush(t("10:30:00") + secs(5 * i), n, 1))
    effects = c.command(flush(t("10:02:40"), later, 1))
    assert effects.log == [("flush_waiting", {"batch_id": later, "batch_messages": 1, "handled": 0})]
    assert len(c.state["early_flushes"]) == 4, "of one count, the first and the latest"
    for i, at in enumerate(("10:01:00", "10:01:05", "10:02:00"), start=1):
        message = inbound(f"w{i}", t(at))
        c.message(message, message["received_at"])
    assert batches(c)[-2:] == [(n, ["w1", "w2"]), (later, ["w3"])]


@dataclass
class Recorded:
    """One run's input topics: the inbound topic and the commands topic, each in its own order."""

    inbound: list[InboundMessage]
    commands: list[ContextCommand]


def record_a_run(gaps: list[int], timer_every: int) -> tuple[Customer, Recorded]:
    """A first run: messages `gaps` seconds apart; the timer looks every `timer_every` seconds and
    flushes what is due with the count it sees (as `flush_tick` does)."""
    c = Customer(lim=limits(quiet=QUIET))
    first_contact_done(c)
    recorded = Recorded([], [])
    now = t("10:01:00")
    clock = now
    for n, gap in enumerate(gaps):
        now = now + secs(gap)
        while clock + secs(timer_every) <= now:
            clock = clock + secs(timer_every)
            timer_flush(c, clock, recorded)
        message = inbound(f"m{n}", now)
        c.message(message, message["received_at"])  # the shell's event time
        recorded.inbound.append(message)
    for _ in range(3 * QUIET // timer_every + 1):
        clock = clock + secs(timer_every)
        timer_flush(c, clock, recorded)
    return c, recorded


def timer_command(c: Customer, at: Any) -> ContextCommand | None:
    """The flush the timer sends at `at` on `c`'s state, if any (not handled yet)."""
    batch_id = c.due(at)
    if batch_id is None:
        return None
    batch = c.state["open_batch"]
    seen = len(batch["messages"]) if batch is not None and batch["batch_id"] == batch_id else None
    return flush(at, batch_id, seen)


def timer_flush(c: Customer, at: Any, recorded: Recorded) -> None:
    cmd = timer_command(c, at)
    if cmd is not None:
        c.command(cmd)
        recorded.commands.append(cmd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=70), min_size=1, max_size=12),
    timer_every=st.integers(min_value=1, max_value=20),
    order=st.lists(st.booleans(), max_size=40),
    new_timer_at=st.sets(st.integers(min_value=0, max_value=40), max_size=4),
)
def test_any_replay_interleaving_emits_the_same_batches(
    gaps: list[int], timer_every: int, order: list[bool], new_timer_at: set[int],
) -> None:
    """The two topics replayed in any interleaving (each in its own order), with a new worker's
    timer flushing what it sees at some points of the replay: the same batch ids with the same
    messages as the first run."""
    original, recorded = record_a_run(gaps, timer_every)
    replay = Customer(lim=limits(quiet=QUIET))
    first_contact_done(replay)
    inbound_left, commands_left = list(recorded.inbound), list(recorded.commands)
    choices = iter(order)
    step = 0
    while inbound_left or commands_left:
        take_inbound = commands_left == [] or (inbound_left != [] and next(choices, True))
        if take_inbound:
            message = inbound_left.pop(0)
            replay.message(message, message["received_at"])
        else:
            replay.command(commands_left.pop(0))
        step += 1
        if step in new_timer_at:  # the new worker's timer, on the partly rebuilt state, much later
            cmd = timer_command(replay, t("10:30:00") + secs(step))
            if cmd is not None:
                commands_left.append(cmd)  # behind the replayed commands in the log
    for minutes in (31, 32):  # the new worker's timer flushes whatever is still open
        timer_flush(replay, t(f"10:{minutes}:00"), Recorded([], []))
    emitted = {b: ids for b, ids in batches(original)}
    for batch_id, ids in batches(replay):
        assert emitted.get(batch_id, ids) == ids, f"{batch_id}: first {emitted.get(batch_id)}, replay {ids}"
