"""KeyedConsumer on the real broker: per-key order, keys in parallel on one partition, commits of
finished records only, poison records to the dead-letter topic, on_assign gating."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.keyed_consumer import KeyedConsumer
from services.common.timeparse import utcnow

pytestmark = pytest.mark.broker


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Polls `check` until true; fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def command(customer: str, label: str) -> bytes:
    return codec.encode("ContextCommand", {
        "kind": "flush", "customer_key": customer, "batch_id": label, "issued_at": utcnow(),
        "history": [], "history_error": None, "history_pages": 0, "actor": None,
    })


@pytest.fixture(scope="module")
async def topics(settings: Settings) -> Topics:
    return await ensure_topics(settings)


@pytest.fixture
async def producer(settings: Settings, topics: Topics) -> AsyncIterator[AIOKafkaProducer]:
    p = make_producer(settings)
    await p.start()
    yield p
    await p.stop()


class Recorder:
    """A handler whose behaviour per batch label is scripted by the test."""

    def __init__(self, run: str) -> None:
        self.run = run  # records of earlier tests on the shared topic are ignored
        self.started: list[str] = []
        self.finished: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()
        self.inflight = 0
        self.max_inflight = 0

    async def __call__(self, name: str, value: dict[str, Any], record: ConsumerRecord) -> None:
        label = str(value["batch_id"])
        if self.run not in label:
            return
        self.started.append(label)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if label in self.gates:
                await self.gates[label].wait()
            else:
                await asyncio.sleep(0.01)
            if label in self.fail:
                raise RuntimeError("scripted failure")
            self.finished.append(label)
        finally:
            self.inflight -= 1


def make_consumer(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer, handler: Any, group: str,
    concurrency: int = 8, on_assign: Callable[[set[TopicPartition]], Awaitable[None]] | None = None,
    drain_timeout: float = 0.3, **extra: Any,
) -> KeyedConsumer:
    return KeyedConsumer(
        settings, service="test", topics=[topics.responder_requests], group_id=group, handler=handler,
        concurrency=concurrency, producer=producer, on_assign=on_assign, drain_timeout=drain_timeout,
        commit_interval=0.2, **extra,
    )


async def send(producer: AIOKafkaProducer, topics: Topics, customer: str, label: str,
               partition: int = 0) -> None:
    await producer.send_and_wait(topics.responder_requests, command(customer, label),
                                 key=customer.encode(), partition=partition)


async def test_order_per_key_and_slow_key_does_not_block_others_on_same_partition(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    rec = Recorder(run)
    slow = f"slow-{run}-1"
    rec.gates[slow] = asyncio.Event()
    consumer = make_consumer(settings, topics, producer, rec, f"g-order-{run}", concurrency=4)
    await consumer.start()
    try:
        # all on partition 0: the slow customer first, then two fast customers with 5 records each
        await send(producer, topics, f"wati:slow{run}", slow)
        await send(producer, topics, f"wati:slow{run}", f"slow-{run}-2")
        for i in range(5):
            await send(producer, topics, f"wati:a{run}", f"a-{run}-{i}")
            await send(producer, topics, f"wati:b{run}", f"b-{run}-{i}")
        await eventually(lambda: sum(x.startswith(("a-", "b-")) for x in rec.finished) == 10,
                         what="fast keys to finish while the slow key is blocked")
        assert slow in rec.started and slow not in rec.finished
        assert f"slow-{run}-2" not in rec.started  # same key waits behind its predecessor
        for who in ("a", "b"):
            assert [x for x in rec.finished if x.startswith(f"{who}-")] == [
                f"{who}-{run}-{i}" for i in range(5)]
        rec.gates[slow].set()
        await eventually(lambda: f"slow-{run}-2" in rec.finished, what="slow key to continue")
        assert rec.finished.index(slow) < rec.finished.index(f"slow-{run}-2")
        assert consumer.ready() == (True, "ok")
    finally:
        await consumer.stop()
    assert consumer.ready()[0] is False


async def test_concurrency_bound_is_respected(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    rec = Recorder(run)
    for i in range(6):
        rec.gates[f"k{i}-{run}"] = asyncio.Event()
    consumer = make_consumer(settings, topics, producer, rec, f"g-bound-{run}", concurrency=3)
    await consumer.start()
    try:
        for i in range(6):
            await send(producer, topics, f"wati:k{i}{run}", f"k{i}-{run}", partition=i % 2)
        await eventually(lambda: len(rec.started) == 3, what="three keys in flight")
        await asyncio.sleep(0.3)  # give a fourth the chance to (wrongly) start
        assert len(rec.started) == 3 and rec.max_inflight == 3
        for gate in rec.gates.values():
            gate.set()
        await eventually(lambda: len(rec.finished) == 6, what="all keys")
        assert rec.max_inflight == 3
    finally:
        await consumer.stop()


async def test_commits_only_finished_records_and_redelivers_the_rest(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    group = f"g-commit-{run}"
    rec = Recorder(run)
    stuck = f"stuck-{run}"
    rec.gates[stuck] = asyncio.Event()  # never set: the record is still running at stop()
    consumer = make_consumer(settings, topics, producer, rec, group)
    await consumer.start()
    await send(producer, topics, f"wati:x{run}", f"done1-{run}")
    await send(producer, topics, f"wati:x{run}", f"done2-{run}")
    await eventually(lambda: f"done2-{run}" in rec.finished, what="first records")
    await send(producer, topics, f"wati:y{run}", stuck)
    await send(producer, topics, f"wati:x{run}", f"after-{run}")
    await send(producer, topics, f"wati:z{run}", f"other-partition-{run}", partition=1)
    await eventually(lambda: f"after-{run}" in rec.finished and f"other-partition-{run}" in rec.finished
                     and stuck in rec.started, what="records around the stuck one")
    await consumer.stop()  # drain_timeout 0.3 s: the stuck record is cancelled, not finished

    rec2 = Recorder(run)
    consumer2 = make_consumer(settings, topics, producer, rec2, group)
    await consumer2.start()
    try:
        # sentinels after the restart: once they started, everything fetched before them has started
        await send(producer, topics, f"wati:s{run}", f"sentinel0-{run}", partition=0)
        await send(producer, topics, f"wati:s{run}", f"sentinel1-{run}", partition=1)
        await eventually(lambda: {f"sentinel0-{run}", f"sentinel1-{run}"} <= set(rec2.started),
                         what="sentinels")
        # the unfinished record and what follows it on its partition come again; nothing before it,
        # nothing of the fully finished partition
        assert sorted(x for x in rec2.started if "sentinel" not in x) == sorted([stuck, f"after-{run}"])
    finally:
        await consumer2.stop()


async def test_a_tenant_at_its_share_leaves_the_other_slots_to_another_tenant_and_commits_stay_safe(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    """Fair share (services/common/fair_share.py): `slow`'s customers block in the handler; with 4
    slots and 2 per tenant, `fast`'s customers on the same partition are all handled, each in order,
    while `slow` holds only 2 slots; nothing at or after `slow`'s first unfinished record is
    committed (a restarted consumer of the group gets exactly those records again)."""
    run = uuid.uuid4().hex[:6]
    group = f"g-fair-{run}"
    rec = Recorder(run)
    slow_keys = [f"slow/default/wati:{i}{run}" for i in range(4)]
    fast_keys = [f"fast/default/wati:{i}{run}" for i in range(3)]
    slow_labels = [f"slow{i}-{n}-{run}" for n in range(2) for i in range(4)]
    for label in slow_labels:
        rec.gates[label] = asyncio.Event()  # never set: slow's calls hang
    consumer = make_consumer(settings, topics, producer, rec, group, concurrency=4, per_tenant=2)
    await consumer.start()
    try:
        await send(producer, topics, fast_keys[0], f"pre-{run}")
        await eventually(lambda: f"pre-{run}" in rec.finished, what="a first record")
        for n in range(2):
            for i, key in enumerate(slow_keys):
                await send(producer, topics, key, f"slow{i}-{n}-{run}")
        fast_labels = {key: [f"fast{i}-{n}-{run}" for n in range(3)] for i, key in enumerate(fast_keys)}
        for n in range(3):
            for key, labels in fast_labels.items():
                await send(producer, topics, key, labels[n])
        await eventually(lambda: sum(x.startswith("fast") for x in rec.finished) == 9,
                         what="fast's records while slow's hang")
        for labels in fast_labels.values():
            assert [x for x in rec.finished if x in labels] == labels  # each customer in order
        started_slow = [x for x in rec.started if x.startswith("slow")]
        assert len(started_slow) == 2 and not any(x.endswith(f"-1-{run}") for x in started_slow)
        assert rec.max_inflight <= 4
    finally:
        await consumer.stop()  # drain_timeout 0.3 s: slow's running records are cancelled, unfinished

    rec2 = Recorder(run)
    consumer2 = make_consumer(settings, topics, producer, rec2, group, concurrency=16)
    await consumer2.start()
    try:
        await send(producer, topics, f"fast/default/wati:s{run}", f"sentinel-{run}")
        await eventually(lambda: f"sentinel-{run}" in rec2.started and len(rec2.started) >= 18,
                         what="the redelivered records and the sentinel")
        # everything from slow's first record on comes again (slow's all unfinished); `pre` does not
        expected = set(slow_labels) | {x for labels in fast_labels.values() for x in labels}
        assert set(rec2.started) - {f"sentinel-{run}"} == expected
    finally:
        await consumer2.stop()


async def read_dead_letters(settings: Settings, topics: Topics, want: int) -> list[dict[str, Any]]:
    reader = AIOKafkaConsumer(topics.dead_letter, bootstrap_servers=settings.kafka_bootstrap_servers,
                              auto_offset_reset="earliest", enable_auto_commit=False)
    await reader.start()
    found: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(found) < want and loop.time() < deadline:
            batches = await reader.getmany(timeout_ms=200)
            for records in batches.values():
                found.extend(codec.decode("DeadLetter", r.value) for r in records)
    finally:
        await reader.stop()
    return found


async def test_poison_and_handler_errors_go_to_dead_letter_and_consumption_continues(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    rec = Recorder(run)
    rec.fail.add(f"boom-{run}")
    consumer = make_consumer(settings, topics, producer, rec, f"g-poison-{run}")
    await consumer.start()
    try:
        await producer.send_and_wait(topics.responder_requests, b"not avro at all",
                                     key=f"wati:p{run}".encode(), partition=2)
        await send(producer, topics, f"wati:p{run}", f"boom-{run}", partition=2)
        await send(producer, topics, f"wati:p{run}", f"fine-{run}", partition=2)
        await eventually(lambda: f"fine-{run}" in rec.finished, what="record after the poison ones")
        letters = [d for d in await read_dead_letters(settings, topics, 2)
                   if d["key"] == f"wati:p{run}".encode() or d["batch_id"] == f"boom-{run}"]
        reasons = sorted(d["reason"] for d in letters)
        assert reasons == ["handler_error", "undecodable"]
        poison = next(d for d in letters if d["reason"] == "undecodable")
        assert poison["payload"] == b"not avro at all" and poison["partition"] == 2
        assert poison["source_topic"] == topics.responder_requests
        failed = next(d for d in letters if d["reason"] == "handler_error")
        assert failed["customer_key"] == f"wati:p{run}" and "RuntimeError" in failed["error"]
        assert consumer.ready() == (True, "ok")
    finally:
        await consumer.stop()


async def test_failed_dead_letter_is_not_marked_finished(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    group = f"g-dlfail-{run}"
    closed = make_producer(settings)
    await closed.start()
    await closed.stop()  # every produce raises ProducerClosed
    rec = Recorder(run)
    rec.fail.add(f"boom-{run}")
    consumer = make_consumer(settings, topics, closed, rec, group)
    await consumer.start()
    await send(producer, topics, f"wati:d{run}", f"boom-{run}", partition=3)
    await eventually(lambda: f"boom-{run}" in rec.started, what="the failing record")
    await consumer.stop()

    rec2 = Recorder(run)
    consumer2 = make_consumer(settings, topics, producer, rec2, group)
    await consumer2.start()
    try:
        await eventually(lambda: f"boom-{run}" in rec2.finished, what="redelivery of the record")
    finally:
        await consumer2.stop()


async def test_on_assign_gates_dispatch_until_it_returns(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    rec = Recorder(run)
    gate = asyncio.Event()
    assigned: list[set[TopicPartition]] = []

    async def on_assign(tps: set[TopicPartition]) -> None:
        assigned.append(tps)
        await gate.wait()

    consumer = make_consumer(settings, topics, producer, rec, f"g-gate-{run}", on_assign=on_assign)
    await send(producer, topics, f"wati:g{run}", f"gated-{run}")
    await consumer.start()
    try:
        await eventually(lambda: bool(assigned), what="assignment")
        assert len(assigned[0]) == settings.topic_partitions
        await asyncio.sleep(0.5)
        assert rec.started == []
        ok, reason = consumer.ready()
        assert not ok and "catching up" in reason
        gate.set()
        await eventually(lambda: f"gated-{run}" in rec.finished, what="dispatch after on_assign")
        assert consumer.ready() == (True, "ok")
    finally:
        await consumer.stop()


async def test_rebalance_to_a_second_consumer_keeps_keys_serial_and_loses_nothing(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    group = f"g-rebalance-{run}"
    started: dict[str, list[str]] = {}
    running: dict[str, int] = {}
    overlaps: list[str] = []
    by_consumer: dict[str, set[str]] = {"A": set(), "B": set()}

    def handler_for(name: str) -> Any:
        async def handle(_: str, value: dict[str, Any], record: ConsumerRecord) -> None:
            label = str(value["batch_id"])
            if run not in label:
                return
            key = label.rsplit("-", 1)[0]
            if running.get(key):
                overlaps.append(label)
            running[key] = running.get(key, 0) + 1
            started.setdefault(key, []).append(label)
            by_consumer[name].add(label)
            try:
                await asyncio.sleep(0.5)  # long enough that the work outlasts the second consumer's join
            finally:
                running[key] -= 1
        return handle

    a = make_consumer(settings, topics, producer, handler_for("A"), group, concurrency=3)
    b = make_consumer(settings, topics, producer, handler_for("B"), group, concurrency=3)
    keys = [f"k{i}{run}" for i in range(8)]
    labels = {k: [f"{k}-{n:02d}" for n in range(8)] for k in keys}
    await a.start()
    try:
        for n in range(8):
            for k in keys:
                await producer.send(topics.responder_requests, command(f"wati:{k}", labels[k][n]),
                                    key=f"wati:{k}".encode())
        await producer.flush()
        await eventually(lambda: sum(map(len, started.values())) >= 10, what="A to start working")
        await b.start()
        await eventually(lambda: all(set(labels[k]) <= set(started.get(k, [])) for k in keys),
                         timeout=40, what="every record handled")
        await eventually(lambda: bool(b.assignment()) and bool(a.assignment()), what="split assignment")
    finally:
        await a.stop()
        await b.stop()
    assert by_consumer["B"]  # the second consumer took over part of the work
    assert overlaps == []  # one key never ran twice at once, not even across the two consumers
    for k in keys:
        first_seen = list(dict.fromkeys(started[k]))
        assert first_seen == labels[k]  # per-key order of first handling


async def test_a_revoked_record_is_cancelled_when_its_partition_went_elsewhere(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    """Issue 13 point 4: one long record per partition in A; B joins. A's records of the partitions
    B took over are cancelled (B handles them); those of partitions A got back run on, untouched."""
    run = uuid.uuid4().hex[:6]
    release = asyncio.Event()
    started: dict[str, list[str]] = {"A": [], "B": []}
    cancelled: dict[str, list[str]] = {"A": [], "B": []}
    finished: dict[str, list[str]] = {"A": [], "B": []}

    def handler_for(name: str) -> Any:
        async def handle(_: str, value: dict[str, Any], record: ConsumerRecord) -> None:
            label = str(value["batch_id"])
            if run not in label:
                return
            started[name].append(label)
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled[name].append(label)
                raise
            finished[name].append(label)
        return handle

    group = f"g-revoke-cancel-{run}"
    a = make_consumer(settings, topics, producer, handler_for("A"), group, revoke_timeout=0.3)
    b = make_consumer(settings, topics, producer, handler_for("B"), group, revoke_timeout=0.3)
    labels = {p: f"p{p}-{run}" for p in range(settings.topic_partitions)}
    await a.start()
    try:
        for p, label in labels.items():
            await send(producer, topics, f"wati:{label}", label, partition=p)
        await eventually(lambda: len(started["A"]) == len(labels), what="A running every record")
        await b.start()
        await eventually(lambda: bool(b.assignment()) and bool(a.assignment()), what="split assignment")
        moved = {labels[tp.partition] for tp in b.assignment()}
        kept = {labels[tp.partition] for tp in a.assignment()}
        await eventually(lambda: set(started["B"]) == moved, what="B handling the moved records")
        assert sorted(cancelled["A"]) == sorted(moved)
        release.set()
        await eventually(lambda: set(finished["A"]) >= kept and set(finished["B"]) == moved,
                         what="every record finished once by its owner")
    finally:
        release.set()
        await a.stop()
        await b.stop()
    assert not set(finished["A"]) & moved and cancelled["B"] == []


async def test_partition_is_paused_while_too_many_records_are_unfinished(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:6]
    rec = Recorder(run)
    first = f"p-{run}-00"
    rec.gates[first] = asyncio.Event()
    consumer = make_consumer(settings, topics, producer, rec, f"g-pause-{run}", concurrency=2,
                             pause_above=10, resume_below=3)
    await consumer.start()
    try:
        for n in range(40):
            await producer.send(topics.responder_requests, command(f"wati:p{run}", f"p-{run}-{n:02d}"),
                                key=f"wati:p{run}".encode(), partition=3)
        await producer.flush()
        tp3 = TopicPartition(topics.responder_requests, 3)
        await eventually(lambda: tp3 in consumer.paused(), what="partition 3 paused")
        rec.gates[first].set()
        await eventually(lambda: len(rec.finished) == 40, what="all records after resuming")
        assert rec.finished == [f"p-{run}-{n:02d}" for n in range(40)]
        await eventually(lambda: tp3 not in consumer.paused(), what="partition 3 resumed")
    finally:
        await consumer.stop()


async def test_a_crashed_fetch_loop_shows_in_readiness_and_metrics(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    from services.common import metrics

    run = uuid.uuid4().hex[:6]
    consumer = make_consumer(settings, topics, producer, Recorder(run), f"g-crash-{run}")
    consumer.agent = f"crash-{run}"
    await consumer.start()
    try:
        await eventually(lambda: consumer.ready() == (True, "ok"), what="ready")
        gauge = metrics.agent_up.labels("test", consumer.agent)
        assert gauge._value.get() == 1

        async def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("fetch exploded")

        assert consumer._consumer is not None
        consumer._consumer.getmany = broken  # type: ignore[method-assign]
        await eventually(lambda: not consumer.ready()[0], what="readiness to drop")
        assert consumer.ready() == (False, "crashed: RuntimeError")
        assert gauge._value.get() == 0
    finally:
        await consumer.stop()
    assert consumer.ready() == (False, "crashed: RuntimeError")


async def test_customers_of_a_revoked_partition_leave_their_tenants_waiting_line(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    """Fair share + rebalance: A's one slot is held by a hung record of a partition A keeps (the
    vision topic, which only A reads); one customer per requests partition waits in the default
    tenant's line. B joins and takes some requests partitions: their customers must leave A's line
    (and its `waiting` gauge), not linger there as phantom waiters until the tenant gets a slot."""
    from services.common import metrics
    from services.common.fair_share import tenant_of
    from services.common.keys import DEFAULT_TENANT

    run = uuid.uuid4().hex[:6]
    release = asyncio.Event()
    started: dict[str, list[str]] = {"A": [], "B": []}

    def handler_for(name: str) -> Any:
        async def handle(_: str, value: dict[str, Any], record: ConsumerRecord) -> None:
            label = str(value.get("batch_id"))
            if run in label:
                started[name].append(label)
                await release.wait()
        return handle

    group = f"g-fair-revoke-{run}"
    common: dict[str, Any] = dict(group_id=group, producer=producer, drain_timeout=0.3,
                                  commit_interval=0.2, revoke_timeout=0.3)
    a = KeyedConsumer(settings, service=f"fair-a-{run}", handler=handler_for("A"), concurrency=1,
                      topics=[topics.responder_requests, topics.vision_requests], **common)
    b = KeyedConsumer(settings, service=f"fair-b-{run}", handler=handler_for("B"), concurrency=8,
                      topics=[topics.responder_requests], **common)
    label = metrics.tenant_label(DEFAULT_TENANT)

    def waiting_gauge() -> float:
        return metrics.REGISTRY.get_sample_value(
            "watistream_tenant_slots_waiting", {"service": f"fair-a-{run}", "tenant": label}) or 0.0

    def really_waiting() -> int:  # default-tenant customers of A with records queued, not running
        return sum(1 for key, queue in a._queues.items()
                   if queue and key not in a._active and tenant_of(key) == DEFAULT_TENANT)

    await a.start()
    try:
        await producer.send_and_wait(topics.vision_requests, command(f"wati:h{run}", f"hung-{run}"),
                                     key=f"wati:h{run}".encode(), partition=0)
        await eventually(lambda: started["A"] == [f"hung-{run}"], what="A's one slot held")
        waiters = {p: f"w{p}-{run}" for p in range(settings.topic_partitions)}
        for p in reversed(range(settings.topic_partitions)):
            await send(producer, topics, f"wati:w{p}{run}", waiters[p], partition=p)
        await eventually(lambda: really_waiting() >= len(waiters), what="every waiter queued in A")
        assert waiting_gauge() == really_waiting()

        await b.start()
        await eventually(lambda: bool(b.assignment()), what="B taking requests partitions")
        moved = {waiters[tp.partition] for tp in b.assignment()}
        kept = len(waiters) - len(moved)
        await eventually(lambda: set(started["B"]) == moved, what="B handling the moved customers")
        await eventually(lambda: a.ready() == (True, "ok") and really_waiting() >= kept,
                         what="A's kept customers fetched again")
        assert started["A"] == [f"hung-{run}"]  # A's slot is still held: nobody was admitted
        # no phantom customer in A's lines: the default tenant's line holds exactly its queued
        # customers, and every line together exactly the customers queued and not running (records
        # of other tenants left on these topics by earlier tests of the module wait there too)
        assert a._fair.waiting(DEFAULT_TENANT) == really_waiting()
        assert len(a._fair) == sum(1 for key, queue in a._queues.items() if queue and key not in a._active)
        assert waiting_gauge() == really_waiting()
    finally:
        release.set()
        await a.stop()
        await b.stop()


def tenant_by_prefix(key: bytes) -> str:
    """The tenant of this module's test keys `<tenant>|...`."""
    return key.decode("utf-8", errors="replace").split("|")[0]


async def fresh_topics(settings: Settings, run: str) -> tuple[Settings, Topics]:
    """Topics of their own: with a small cap per tenant, the records earlier tests left on the
    module's topics (all of one tenant) would be read past and read again a few at a time."""
    cfg = dataclasses.replace(settings, topic_prefix=f"{settings.topic_prefix}{run}.")
    return cfg, await ensure_topics(cfg)


async def test_a_saturated_tenants_records_are_read_past_and_read_again_in_order(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    """Tenant A's records hang with 3 kept (its cap), the rest read past: B's records behind them
    on the same partition run and the partition is not paused; once A's run, A's records are read
    again from the broker (a seek back) and every one runs once, each customer's in order."""
    run = uuid.uuid4().hex[:6]
    settings, topics = await fresh_topics(settings, run)
    rec = Recorder(run)
    release = asyncio.Event()
    a_labels = [f"A-{run}-k{i}-{n}" for n in range(4) for i in range(4)]  # 4 customers x 4 records
    for label in a_labels:
        rec.gates[label] = release
    consumer = make_consumer(settings, topics, producer, rec, f"g-readpast-{run}", concurrency=8,
                             pause_above=5, resume_below=2, records_per_tenant=3, unfinished_max=100,
                             tenant_of_key=tenant_by_prefix)
    await consumer.start()
    try:
        for label in a_labels:
            customer = label.rsplit("-", 1)[0]
            await producer.send(topics.responder_requests, command(f"A|{run}|{customer}", label),
                                key=f"A|{run}|{customer}".encode(), partition=1)
        b_labels = [f"B-{run}-{n}" for n in range(8)]  # more than pause_above, behind A's
        for label in b_labels:
            await producer.send(topics.responder_requests, command(f"B|{run}|c", label),
                                key=f"B|{run}|c".encode(), partition=1)
        await producer.flush()
        await eventually(lambda: [x for x in rec.finished if x.startswith("B-")] == b_labels,
                         what="B's records run while A's hang")
        tp1 = TopicPartition(topics.responder_requests, 1)
        assert tp1 not in consumer.paused()
        # A at its cap: its first 3 records hang, the other 13 were read past (not in memory)
        assert sorted(x for x in rec.started if x.startswith("A-")) == sorted(a_labels[:3])
        assert consumer._partitions[tp1].backlog.read_past("A") == len(a_labels) - 3
        release.set()
        await eventually(lambda: sorted(x for x in rec.finished if x.startswith("A-")) == sorted(a_labels),
                         what="every record of A read again and run")
        finished_a = [x for x in rec.finished if x.startswith("A-")]
        assert len(finished_a) == len(a_labels)  # each once
        for i in range(4):  # each customer's records in order
            assert [x for x in finished_a if f"-k{i}-" in x] == [f"A-{run}-k{i}-{n}" for n in range(4)]
        await eventually(lambda: consumer.unfinished() == 0, what="nothing unfinished")
    finally:
        release.set()
        await consumer.stop()


async def test_a_partition_is_still_paused_above_the_hard_cap_of_unfinished_records(
    settings: Settings, topics: Topics, producer: AIOKafkaProducer
) -> None:
    """Above `unfinished_max` unfinished records (read past ones included) the partition pauses
    whatever their tenant: the documented limit of the read-past rule."""
    run = uuid.uuid4().hex[:6]
    settings, topics = await fresh_topics(settings, run)
    rec = Recorder(run)
    release = asyncio.Event()
    a_labels = [f"A-{run}-{n:02d}" for n in range(12)]
    for label in a_labels:
        rec.gates[label] = release
    consumer = make_consumer(settings, topics, producer, rec, f"g-hardcap-{run}", concurrency=8,
                             pause_above=5, resume_below=2, records_per_tenant=2, unfinished_max=8,
                             tenant_of_key=tenant_by_prefix)
    await consumer.start()
    try:
        for n, label in enumerate(a_labels):
            await producer.send(topics.responder_requests, command(f"A|{run}|{n}", label),
                                key=f"A|{run}|{n}".encode(), partition=2)
        await producer.flush()
        tp2 = TopicPartition(topics.responder_requests, 2)
        await eventually(lambda: tp2 in consumer.paused(), what="partition 2 paused at the hard cap")
        assert sorted(rec.started) == a_labels[:2]  # A at its cap of 2 in memory, the rest read past
        release.set()
        await eventually(lambda: sorted(rec.finished) == a_labels, what="A's records after the release")
        await eventually(lambda: tp2 not in consumer.paused(), what="partition 2 resumed")
    finally:
        release.set()
        await consumer.stop()
