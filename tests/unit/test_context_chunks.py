"""The agent's chunked handling keeps the delivery rule: no state is written before every effect of
the chunk is acked, and a later event of a customer sees the earlier one's state (not yet written)."""

from __future__ import annotations

import asyncio
import collections.abc
import gc
from dataclasses import dataclass
from typing import Any, cast

from services.common import codec
from services.common.config import Settings
from services.common.records import CustomerState
from services.common.timeparse import utcnow
from services.context import state as sm
from services.context.app import BEHIND_MAX_WAIT_SECONDS, Incoming, build_limits, create_app

from .context_builders import KEY, Customer, command, inbound, ready_recording_commands, secs
from .waiting import until


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


class ChangelogTable(dict[bytes, bytes]):
    """A table whose every write hands back a changelog send the test resolves (the broker's ack)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.changelog_sends: list[asyncio.Future[Any]] = []
        self.sent: list[tuple[bytes, bytes, asyncio.Future[Any]]] = []

    def __setitem__(self, key: bytes, value: bytes) -> None:
        super().__setitem__(key, value)
        sent: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.changelog_sends.append(sent)
        self.sent.append((key, value, sent))


@dataclass
class FakeEvent:
    """Stands for faust's event object (table writes are made in its name: weak-referenceable)."""

    offset: int


class Acks:
    """faust's ack of an input event, recorded by offset."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    async def __call__(self, event: FakeEvent) -> None:
        self.acked.append(event.offset)


async def _until(condition: Any, what: str, timeout: float = 5.0) -> None:
    """Waits for a condition the code under test reaches by itself (a retry backs off for real)."""
    await until(condition, timeout=timeout, what=what, poll=0.001)


def _runtime_with(tmp_path: Any, table: dict[bytes, bytes]) -> tuple[Any, HeldProducer, Acks]:
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ch.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    runtime = create_app(settings).runtime
    runtime.customers = table
    producer = HeldProducer()
    runtime._producer = producer
    acks = Acks()
    runtime.acker = acks
    return runtime, producer, acks


def _inbound_event(runtime: Any, event_id: str, offset: int, key: str = KEY) -> Incoming:
    message = inbound(event_id, utcnow() - secs(5), f"hola {event_id}", key=key)
    return Incoming(key.encode(), codec.encode("InboundMessage", dict(message)), runtime.topics.inbound,
                    0, offset, event=FakeEvent(offset))


async def test_an_input_is_acked_only_once_its_state_is_on_the_broker(tmp_path: Any) -> None:
    """The hole of faust's take_events: offsets committed while the table's changelog record was
    still in faust's producer buffer. Here nothing is acked before the changelog send resolves."""
    from services.context.app import EventPipeline

    table = ChangelogTable()
    runtime, _, acks = _runtime_with(tmp_path, table)
    async with EventPipeline(runtime) as pipeline:
        await pipeline.accept(_inbound_event(runtime, "w1", 10))
        await pipeline.accept(_inbound_event(runtime, "w2", 11, key="wati:50370000001"))
        await _until(lambda: len(table.sent) >= 1, "the first state written")
        for _ in range(50):
            await asyncio.sleep(0)
        assert acks.acked == [], "acked before the changelog record reached the broker"
        table.sent[0][2].set_result(None)
        await _until(lambda: len(table.sent) == 2, "the second state written")
        assert acks.acked[:1] == [10]
        for _ in range(50):
            await asyncio.sleep(0)
        assert acks.acked == [10], "acked before the changelog record reached the broker"
        table.sent[1][2].set_result(None)
        await _until(lambda: acks.acked == [10, 11], "both acked in order")


async def test_a_failed_completion_acks_nothing_more_and_stops_the_agent(tmp_path: Any) -> None:
    from services.context.app import EventPipeline

    table = ChangelogTable()
    runtime, _, acks = _runtime_with(tmp_path, table)
    async with EventPipeline(runtime) as pipeline:
        await pipeline.accept(_inbound_event(runtime, "w1", 10))
        await _until(lambda: len(table.sent) == 1, "state written")
        runtime.begin_stop()  # stopping: a failed send is not retried
        table.sent[0][2].set_exception(RuntimeError("broker gone"))
        await pipeline.accept(_inbound_event(runtime, "w2", 11, key="wati:50370000001"))
        await _until(lambda: pipeline._task is not None and pipeline._task.done(), "completion stopped")
        try:
            await pipeline.accept(_inbound_event(runtime, "w3", 12, key="wati:50370000002"))
        except RuntimeError as exc:
            assert "broker gone" in str(exc)
        else:
            raise AssertionError("accept went on after the completion failed")
    assert acks.acked == [], "an event was acked although its state never reached the broker"


async def test_a_failed_changelog_send_is_repaired_with_the_newest_state(tmp_path: Any) -> None:
    """Two events of one customer in one chunk, the first one's changelog send fails: the repair
    re-sends the CURRENT value (the second's), never the first's older one after it."""
    table = ChangelogTable()
    runtime, _, acks = _runtime_with(tmp_path, table)
    chunk = [_inbound_event(runtime, "w1", 10), _inbound_event(runtime, "w2", 11)]
    handling = asyncio.create_task(runtime.handle_events(chunk))
    await _until(lambda: len(table.sent) == 2, "both states written")
    newest = table.sent[1][1]
    table.sent[0][2].set_exception(RuntimeError("NotLeaderForPartition"))
    await _until(lambda: len(table.sent) == 3, "the repair send")
    assert table.sent[2][1] == newest, "the repair sent an older state after a newer one"
    for _, _, sent in table.sent[1:]:
        sent.set_result(None)
    await asyncio.wait_for(handling, 5)
    assert acks.acked == [10, 11]


async def test_a_history_fetch_starts_when_its_flush_is_decided_before_the_chunk_is_durable(
    tmp_path: Any,
) -> None:
    """MISSED_HISTORY=every_batch: the fetch (a read; its result is a later event) starts as the flush
    is decided, not one ack round trip or more later; the flush's input is still acked only once its
    state is on the broker."""
    table = ChangelogTable()
    runtime, _, acks = _runtime_with(tmp_path, table)
    started: list[sm.HistoryFetchOrder] = []
    runtime.fetcher.start = started.append
    message = _inbound_event(runtime, "w1", 10)
    record = cast(Any, codec.decode("InboundMessage", message.value))
    flush_at = record["received_at"] + secs(runtime.limits.quiet_window_seconds + 1)
    flush = command("flush", flush_at, f"{KEY}:1")
    flush_item = Incoming(KEY.encode(), codec.encode("ContextCommand", dict(flush)),
                          runtime.topics.context_commands, 0, 4, event=FakeEvent(4))
    handling = asyncio.create_task(runtime.handle_events([message, flush_item]))
    await _until(lambda: len(table.sent) == 2, "both states written")
    assert [(o.customer_key, o.batch_id) for o in started] == [(KEY, f"{KEY}:1")], \
        "the fetch waited for the chunk's changelog acks"
    assert acks.acked == []
    for _, _, sent in table.sent:
        sent.set_result(None)
    await asyncio.wait_for(handling, 5)
    assert acks.acked == [10, 4] and len(started) == 1


def test_the_private_faust_parts_the_shell_relies_on_still_exist(tmp_path: Any) -> None:
    """faust-streaming and mode-streaming are pinned (pyproject.toml); this fails loudly on an upgrade
    that removes what the shell uses from their insides."""
    import faust
    import faust.streams as faust_streams

    from services.context.app import ChangelogTrackingTable

    assert hasattr(faust_streams, "_current_event"), "table writes in the name of an event"
    assert callable(getattr(faust.Stream, "noack", None)) and callable(getattr(faust.Stream, "ack", None))
    assert callable(getattr(faust.Table, "send_changelog", None))
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="pf.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    app = create_app(settings)
    assert isinstance(app.runtime.customers, ChangelogTrackingTable), "the app's Table setting"
    consumer = app.consumer
    for name in ("_read_offset", "_committed_offset", "_acked"):  # the lag gauge, stale acks
        assert isinstance(getattr(consumer, name, None), dict | collections.abc.Mapping), name
    assert isinstance(getattr(consumer, "_unacked_messages", None), collections.abc.MutableSet)
    for name in ("callback", "seek", "seek_to_committed", "earliest_offsets", "_new_offset", "ack"):
        assert callable(getattr(consumer, name, None)), name  # AckGuard wraps or calls these
    from services.context.app import _InputReadOffsets

    assert isinstance(consumer._read_offset, _InputReadOffsets), "faust's loop reads the guard's offsets"
    assert hasattr(app.runtime.agent, "_actors"), "the agent's liveness check"


def test_faust_s_acks_of_messages_it_skipped_never_let_a_commit_pass_them(tmp_path: Any) -> None:
    """faust skips (and acks) messages buffered before a rebalance or read while its flow control is
    suspended, to read them again from the committed offset: until then no commit may pass them."""
    from faust.types import TP
    from faust.types.tuples import Message

    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ga.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    app = create_app(settings)
    consumer = app.consumer
    guard = app.runtime.ack_guard
    assert guard is not None
    topic = app.runtime.topics.inbound
    tp = TP(topic, 0)
    app.topics._acking_topics.add(topic)  # as once the agent subscribed (faust acks only these)
    app.consumer_generation_id = 7
    consumer._committed_offset[tp] = 20

    def message(offset: int, generation: int = 7) -> Message:
        m = Message(topic, 0, offset, 0.0, 0, None, b"k", b"v", None, tp=tp, generation_id=generation)
        consumer._unacked_messages.add(m)
        return m

    skipped_stale, skipped_suspended = message(20, generation=6), message(21)
    assert consumer.ack(skipped_stale) is False and consumer.ack(skipped_suspended) is False
    assert skipped_stale.acked and skipped_stale not in consumer._unacked_messages, "faust's wait ends"
    handled = message(22)
    guard.deliver(handled)
    consumer.ack(handled)
    assert consumer._acked[tp] == [22]
    assert consumer._new_offset(tp) is None, "a commit would pass messages 20 and 21, never handled"
    for offset in (20, 21):  # read again after faust's seek, delivered and acked by the pipeline
        again = message(offset)
        guard.deliver(again)
        consumer.ack(again)
    assert consumer._new_offset(tp) == 23


def _guarded_app(tmp_path: Any, prefix: str) -> tuple[Any, Any, Any]:
    from faust.types import TP

    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix=prefix, web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    app = create_app(settings)
    guard = app.runtime.ack_guard
    assert guard is not None
    topic = app.runtime.topics.inbound
    app.topics._acking_topics.add(topic)
    app.consumer_generation_id = 3
    return app, guard, TP(topic, 0)


def _delivered(app: Any, guard: Any, tp: Any, offset: int) -> Any:
    from faust.types.tuples import Message

    m = Message(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp, generation_id=3)
    app.consumer._unacked_messages.add(m)
    guard.deliver(m)
    return m


def test_a_commit_never_passes_the_message_at_the_committed_offset(tmp_path: Any) -> None:
    """faust lets a hole of one message through at the head (committed 20, acked 21 → commits 22)."""
    app, guard, tp = _guarded_app(tmp_path, "hh.")
    app.consumer._committed_offset[tp] = 20
    app.consumer.ack(_delivered(app, guard, tp, 21))
    assert app.consumer._new_offset(tp) is None, "offset 20 was never handled"
    app.consumer.ack(_delivered(app, guard, tp, 20))
    assert app.consumer._new_offset(tp) == 22


async def test_a_partition_never_committed_is_read_from_its_first_offset(tmp_path: Any) -> None:
    """aiokafka's seek to the committed offset does nothing without a commit, so records fetched and
    dropped at a rebalance would never be read again, and faust would commit past them."""
    app, guard, tp = _guarded_app(tmp_path, "fp.")
    changelog = type(tp)("fp.context-customers-changelog", 0)
    seeks: list[tuple[Any, int]] = []

    async def seek_to_committed() -> dict[Any, int | None]:
        return {tp: None, changelog: None}

    async def earliest_offsets(*tps: Any) -> dict[Any, int]:
        return dict.fromkeys(tps, 5)  # retention removed 0..4

    async def seek(partition: Any, offset: int) -> None:
        seeks.append((partition, offset))

    guard._seek_to_committed = seek_to_committed
    app.consumer.earliest_offsets = earliest_offsets
    guard._seek = seek
    await app.consumer.seek_to_committed()
    assert seeks == [(tp, 5)], "the input partition is sought to its first offset, the changelog left alone"
    app.consumer.ack(_delivered(app, guard, tp, 9))  # 5..8 were fetched before a rebalance and dropped
    assert app.consumer._new_offset(tp) is None, "faust would commit 10 with no committed offset"
    for offset in (5, 6, 7, 8):
        app.consumer.ack(_delivered(app, guard, tp, offset))
    assert app.consumer._new_offset(tp) == 10


async def test_the_agent_handles_input_records_strictly_in_order_and_reads_a_hole_again(
    tmp_path: Any,
) -> None:
    """faust delivered records after a hole (its read offset overwritten around a rebalance, records
    of the old generation skipped in the stream) and committed read-offset jumps as gaps: here the
    agent handles nothing after a hole, and the partition is sought back to the hole."""
    from faust.types.tuples import Message

    app, guard, tp = _guarded_app(tmp_path, "gt.")
    seeks: list[tuple[Any, int]] = []

    async def seek(partition: Any, offset: int) -> None:
        seeks.append((partition, offset))

    guard._seek = seek
    now = [0.0]
    guard.clock = lambda: now[0]
    handled: list[int] = []

    async def arrives(offset: int) -> None:
        m = Message(tp.topic, 0, offset, 0.0, 0, None, b"k", b"v", None, tp=tp, generation_id=3)
        app.consumer._unacked_messages.add(m)
        if await guard.admit(m):
            handled.append(offset)
        else:
            assert m.acked and m not in app.consumer._unacked_messages, "faust waits for no ack of it"

    assert app.consumer._read_offset[tp] is None, "faust's loop never drops or gaps an input record"
    await app.consumer.seek(tp, 10)
    for offset in (10, 11, 13, 14):  # 12 went missing (skipped in faust's stream)
        await arrives(offset)
    assert handled == [10, 11], "13 and 14 are not handled before 12"
    assert seeks == [(tp, 10), (tp, 12)], "one seek back to the hole; 14 finds it on its way"
    for offset in (12, 13, 11):  # read again from 12; 11 (queued before the seek) was handled already
        await arrives(offset)
    assert handled == [10, 11, 12, 13]
    now[0] += guard.reread_retry_seconds + 1
    await arrives(15)  # 14 lost again: sought again after the retry delay
    assert seeks[-1] == (tp, 14) and handled[-1] == 13
    app.consumer._committed_offset[tp] = 10
    for offset in (10, 11, 12, 13):
        m = Message(tp.topic, 0, offset, 0.0, 0, None, b"k", b"v", None, tp=tp, generation_id=3)
        guard.deliver(m)
        app.consumer.ack(m)
    assert app.consumer._new_offset(tp) == 14, "the skipped 14 and 15 are not committed"


async def test_a_hole_never_handled_again_makes_the_worker_read_from_its_commit(
    tmp_path: Any,
) -> None:
    app, guard, tp = _guarded_app(tmp_path, "rr.")
    now = [100.0]
    guard.clock = lambda: now[0]
    sought = asyncio.Event()

    async def seek(partition: Any, offset: int) -> None:
        assert (partition, offset) == (tp, 20)
        sought.set()

    guard._seek = seek
    app.loop = asyncio.get_running_loop()
    app.consumer._committed_offset[tp] = 20
    guard.next_offset[tp] = 22  # the agent admitted 20 and 21: 20 is in the pipeline
    app.consumer.ack(_delivered(app, guard, tp, 21))
    assert app.consumer._new_offset(tp) is None
    now[0] += guard.hole_patience_seconds + 1
    assert app.consumer._new_offset(tp) is None
    assert guard.rereads == 0, "the record is on its way: wait for it"
    guard.skipped[tp] = {20}  # skipped by the stream (old generation) and no seek came after
    assert app.consumer._new_offset(tp) is None
    await asyncio.wait_for(sought.wait(), 5)
    assert guard.rereads == 1


async def test_a_record_with_no_seek_since_its_partition_came_back_starts_nothing_out_of_order(
    tmp_path: Any,
) -> None:
    """The drill's last (b): after a revoke (`forget`) a record came to the agent before the new
    assignment's seek, and was handled as if its partition started there (past 90 records of it)."""
    from faust.types.tuples import Message

    app, guard, tp = _guarded_app(tmp_path, "ns.")
    seeks: list[tuple[Any, int]] = []
    full_seeks: list[bool] = []

    async def seek(partition: Any, offset: int) -> None:
        seeks.append((partition, offset))

    async def perform_seek() -> None:
        full_seeks.append(True)

    guard._seek = seek
    app.consumer.perform_seek = perform_seek
    await app.consumer.seek(tp, 164)
    guard.forget([tp])

    def record(offset: int) -> Message:
        return Message(tp.topic, 0, offset, 0.0, 0, None, b"k", b"v", None, tp=tp, generation_id=3)

    assert not await guard.admit(record(258)), "nothing says the partition starts at 258"
    assert full_seeks == [True], "read again from the committed offsets"
    app.consumer._committed_offset[tp] = 164  # the commit is known again (the assignment's seek)
    assert not await guard.admit(record(259))
    assert seeks[-1] == (tp, 164), "sought back to the committed offset"
    assert await guard.admit(record(164))


async def test_a_lagging_agent_gets_one_flush_per_batch_not_one_per_message(tmp_path: Any) -> None:
    """The timer sends a flush for what the table holds; when the agent, behind, then handles a later
    message of the same batch before that command, the timer must not send another one for the batch
    (each copy is one more event for the agent that is behind: an instrumented bench run had ~3.7 flush
    copies per batch and fell further behind with each). Once the command is handled, the timer
    decides afresh: the message it did not see is flushed in the next batch."""
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ch.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path),
                        missed_history="gap", reconcile_interval_seconds=60.0)
    runtime = create_app(settings).runtime
    start = utcnow() - secs(60)  # the burst is long past its quiet window: the agent is behind
    customer = Customer(lim=build_limits(settings))  # known, answered recently: no history check
    customer.message(inbound("w-1", start - secs(120), "¿Tienen habitaciones?"))
    customer.flush(start - secs(90))
    customer.history(start - secs(89), [])
    customer.answer(start - secs(70), ids=["wamid.BOT1"])
    table: dict[bytes, bytes] = {KEY.encode(): codec.encode("CustomerState", dict(customer.state))}
    sent = ready_recording_commands(runtime, table)
    producer = HeldProducer()
    runtime._producer = producer  # type: ignore[assignment]
    topics = runtime.topics

    def message_event(number: int) -> Incoming:
        value = codec.encode("InboundMessage", dict(inbound(f"w{number}", start + secs(number * 0.2))))
        return Incoming(KEY.encode(), value, topics.inbound, 0, number)

    def flushes() -> list[tuple[str, int]]:
        return [(c["batch_id"], c["batch_messages"]) for c in sent if c["kind"] == "flush"]

    await runtime.handle_events([message_event(0)])
    assert await runtime.flush_tick()
    [(first_batch, seen)] = flushes()
    assert seen == 1
    for number in (1, 2):  # the rest of the burst, handled before the flush command
        await runtime.handle_events([message_event(number)])
        assert await runtime.flush_tick()
    assert flushes() == [(first_batch, 1)], "a second flush for a batch whose flush is in flight"

    command_value = codec.encode("ContextCommand", dict(sent[0]))
    handling = asyncio.create_task(runtime.handle_events(
        [Incoming(KEY.encode(), command_value, topics.context_commands, 0, 0)]))
    for _ in range(1000):  # the flush's effects (request, audit) wait for the broker's acks
        if producer.acks or handling.done():
            break
        await asyncio.sleep(0)
    for ack in producer.acks:
        ack.set_result(None)
    await asyncio.wait_for(handling, 5)
    assert await runtime.flush_tick()
    [_, (second_batch, seen)] = flushes()
    assert second_batch != first_batch and seen == 2  # the two messages the first flush did not see


async def test_a_batch_is_not_flushed_before_the_agent_read_past_its_quiet_window(tmp_path: Any) -> None:
    """While the agent is behind on a partition, the timer judges a batch quiet as of the receive time
    up to which the agent has read that partition, not by its clock alone: by the clock, every burst
    the agent reaches late looks quiet after its first message, and the rest of the burst (not read
    yet) is split off into another batch — more batches, history checks and requests per message."""
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ch.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path),
                        missed_history="gap", reconcile_interval_seconds=60.0)
    runtime = create_app(settings).runtime
    start = utcnow() - secs(60)  # the burst is long past its quiet window by the clock
    customer = Customer(lim=build_limits(settings))  # known, answered recently: no history check
    customer.message(inbound("w-1", start - secs(120), "¿Tienen habitaciones?"))
    customer.flush(start - secs(90))
    customer.history(start - secs(89), [])
    customer.answer(start - secs(70), ids=["wamid.BOT1"])
    table: dict[bytes, bytes] = {KEY.encode(): codec.encode("CustomerState", dict(customer.state))}
    sent = ready_recording_commands(runtime, table)
    behind = [True]
    runtime.inbound_behind = lambda partition: behind[0]  # type: ignore[method-assign]
    topics = runtime.topics
    quiet = build_limits(settings).quiet_window_seconds

    def message_event(number: int, at: Any, key: str = KEY) -> Incoming:
        value = codec.encode("InboundMessage", dict(inbound(f"w{number}", at, key=key)))
        return Incoming(key.encode(), value, topics.inbound, 0, number)

    def flushes() -> list[tuple[str, int]]:
        return [(c["batch_id"], c["batch_messages"]) for c in sent if c["kind"] == "flush"]

    await runtime.handle_events([message_event(0, start)])
    assert await runtime.flush_tick()
    assert flushes() == [], "flushed while the rest of the burst was still unread"
    await runtime.handle_events([message_event(1, start + secs(0.2)), message_event(2, start + secs(0.4))])
    runtime.index.defer(KEY, utcnow())  # look now (the agent has read further, not far enough)
    assert await runtime.flush_tick()
    assert flushes() == []  # read up to the burst's last message only: its quiet window has not passed
    other = "wati:50376970000"  # another customer's message of the same partition, read later
    read_up_to = start + secs(0.4 + quiet + 0.1)
    await runtime.handle_events([message_event(3, read_up_to, other)])  # puts the batch back in the index
    assert await runtime.flush_tick()
    [(batch_id, seen)] = [f for f in flushes() if f[0].startswith(KEY)]
    assert seen == 3  # the whole burst, one batch
    command = next(c for c in sent if c["batch_id"] == batch_id)
    # judged as of that message's receive time (as the record carries it: milliseconds)
    assert abs(command["issued_at"] - (read_up_to + secs(0.2))) < secs(0.001)

    behind[0] = False  # caught up: the clock decides, as before
    assert runtime.inbound_watermark(0) is None

    behind[0] = True  # a partition end the agent never reaches holds no batch for ever
    third = "wati:50376971111"
    late = utcnow() - secs(quiet + BEHIND_MAX_WAIT_SECONDS + 1)
    await runtime.handle_events([message_event(4, late, third)])
    runtime.inbound_read_up_to[0] = late - secs(3600)
    runtime.index.defer(third, utcnow())
    assert await runtime.flush_tick()
    assert [seen for batch, seen in flushes() if batch.startswith(third)] == [1]


async def test_a_batch_waiting_for_the_agent_to_read_further_waits_once(tmp_path: Any) -> None:
    """A due batch whose partition the agent has not read far enough waits for the agent's progress.
    Looked at again before then, it must not wait a second time nor be looked at again soon: a worker
    that is behind has a waiting batch per message it is behind, and each look is flush-loop CPU taken
    from the agent (a bench worker 40 s behind spent more on these looks than on its events, and fell
    further behind). The agent's progress releases it, once."""
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ch.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path),
                        missed_history="gap", reconcile_interval_seconds=60.0)
    runtime = create_app(settings).runtime
    start = utcnow() - secs(60)  # the message is long past its quiet window by the clock
    customer = Customer(lim=build_limits(settings))  # known, answered recently: no history check
    customer.message(inbound("w-1", start - secs(120), "¿Tienen habitaciones?"))
    customer.flush(start - secs(90))
    customer.history(start - secs(89), [])
    customer.answer(start - secs(70), ids=["wamid.BOT1"])
    table: dict[bytes, bytes] = {KEY.encode(): codec.encode("CustomerState", dict(customer.state))}
    sent = ready_recording_commands(runtime, table)
    runtime.inbound_behind = lambda partition: True  # type: ignore[method-assign]
    topics = runtime.topics
    quiet = build_limits(settings).quiet_window_seconds

    def message_event(number: int, at: Any, key: str = KEY) -> Incoming:
        value = codec.encode("InboundMessage", dict(inbound(f"w{number}", at, key=key)))
        return Incoming(key.encode(), value, topics.inbound, 0, number)

    await runtime.handle_events([message_event(0, start)])
    assert await runtime.flush_tick()
    runtime.index.defer(KEY, utcnow())  # looked at again while the agent has read nothing more
    assert await runtime.flush_tick()
    assert [c for c in sent if c["kind"] == "flush"] == []
    assert len(runtime._behind[0]) == 1, "the batch waits twice: released twice, looked at twice"
    assert runtime.index.due(utcnow() + secs(0.5)) == [], "looked at again while nothing changed"

    other = "wati:50376970000"  # another customer's message of the same partition, read later
    await runtime.handle_events([message_event(1, start + secs(quiet + 0.1), other)])
    assert await runtime.flush_tick()
    assert [c["batch_messages"] for c in sent if c["kind"] == "flush" and c["customer_key"] == KEY] == [1]
    assert runtime._behind == {} and runtime._parked == {}


async def test_the_rebuilt_index_is_left_out_of_the_cyclic_gcs_walk(tmp_path: Any) -> None:
    """After recovery the index holds an entry per customer of the worker's partitions for as long as
    the worker runs; a gen-2 collection walking them again each time paused the worker longer the
    more customers it had. They are frozen out of the GC's walk once rebuilt."""
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ch.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    runtime = create_app(settings).runtime
    customer = Customer(lim=build_limits(settings))
    customer.message(inbound("w-1", utcnow() - secs(120), "hola"))
    runtime.customers = {  # type: ignore[assignment]
        KEY.encode(): codec.encode("CustomerState", dict(customer.state))}
    runtime.active_partitions = lambda: set(range(settings.topic_partitions))  # type: ignore[method-assign]
    gc.unfreeze()
    try:
        await runtime.rebuild_index()
        entry = runtime.index.entries[KEY]
        assert runtime.index_ready and gc.is_tracked(entry)
        assert not any(o is entry for o in gc.get_objects()), "the index entry is still walked by the GC"
    finally:
        gc.unfreeze()
