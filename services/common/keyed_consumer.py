"""A group consumer that handles many keys at once, one key strictly in order, and commits only
what is finished.

Why not a faust agent: an agent gives one in-flight event per partition (concurrency=1), or loses
per-key order and commit safety (concurrency>1, faust #606 commits past unfinished events). The
responder and vision wait seconds on OpenAI per record, so they need many customers in flight per
partition while one customer's records stay in order (docs/faust.md, "Concurrency and delivery").

Design:
- one FIFO queue per Kafka key; at most `concurrency` keys in flight; a key with more records goes
  back to the end of the waiting line after each record, so a busy key cannot starve the others;
- the waiting line is one line per tenant (the tenant of the key, a customer key): a tenant holds at
  most `per_tenant` of the slots and a free slot goes to the waiting tenant holding the fewest
  (services/common/fair_share.py), so one tenant's slow or rate-limited calls cannot take every slot
  from another tenant's customers, on the same partition or not (issue 17, fair share);
- per partition, `PartitionOffsets` tracks fetched offsets and which are finished; the commit point is
  the lowest unfinished offset (or highest fetched + 1), committed about every second and on revoke;
- on revoke: queued records of those partitions are dropped (they were not committed, the next owner
  gets them), in-flight ones are awaited for a bounded time (`revoke_timeout`), then the finished
  prefix is committed. Records still running are CANCELLED as soon as the new assignment shows their
  partition went to another worker (the rebalance is eager: every partition is revoked, most come
  back; a record of a partition that came back runs on, and its key stays busy, so its redelivered
  copy waits for it). The new owner may start the record milliseconds before that cancellation, and
  a worker that does not learn of its revoke in time (session expired) is not cancelled at all: a
  handler with external effects needs a fence of its own (the responder's is in its worker);
- `on_assign` is awaited (in a task, not in the rebalance callback) before records of newly assigned
  partitions are dispatched: they are held meanwhile;
- backpressure per tenant (services/common/backpressure.py, issue 17): at most `records_per_tenant`
  records of one tenant are kept in memory; its further records are read past (offset kept
  unfinished, so never committed) and read again by seeking back once it has room. A partition is
  paused when too many of its unfinished records belong to tenants under that cap (resumed below a
  low mark), or when too many are unfinished at all (`unfinished_max`, read past ones included), so a
  hung tenant's backlog does not pause the other tenants' records behind it;
- every value is decoded in a guard: undecodable → dead letter; handler exception → dead letter; both
  are then marked finished. A failing dead-letter produce is retried and never marked finished;
- a key stays "in flight" across a revoke until its running record ends, so a redelivered record of
  the same key (partition assigned back) never runs concurrently with the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from . import codec, metrics
from .backpressure import Limits, PartitionBacklog, PartitionOffsets, TenantBuffers, Verdict
from .config import Settings
from .fair_share import FairQueue, tenant_of
from .kafka import Topics, dead_letter, make_consumer
from .keys import mask
from .logs import event

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any], ConsumerRecord], Awaitable[None]]
OnAssign = Callable[[set[TopicPartition]], Awaitable[None]]


@dataclass
class _Partition:
    backlog: PartitionBacklog = field(default_factory=PartitionBacklog)
    gated: bool = True  # records are held until on_assign has finished
    held: list[ConsumerRecord] = field(default_factory=list)
    inflight: int = 0
    paused: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # its records being handled

    @property
    def offsets(self) -> PartitionOffsets:
        return self.backlog.offsets


class _Abandon(Exception):
    """The record must not be marked finished (shutting down before its dead letter was written)."""


class KeyedConsumer:
    """Consumes `topics` in group `group_id`, calling `handler` per record (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        service: str,
        topics: list[str],
        group_id: str,
        handler: Handler,
        concurrency: int,
        producer: AIOKafkaProducer,
        on_assign: OnAssign | None = None,
        agent: str = "keyed_consumer",
        commit_interval: float = 1.0,
        revoke_timeout: float = 10.0,
        drain_timeout: float = 10.0,
        pause_above: int | None = None,
        resume_below: int | None = None,
        cancel_revoked: bool = True,
        per_tenant: int | None = None,
        tenant_of_key: Callable[[bytes], str] = tenant_of,
        records_per_tenant: int | None = None,
        unfinished_max: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if per_tenant is not None and per_tenant < 1:
            raise ValueError("per_tenant must be >= 1")
        self.settings = settings
        self.service = service
        self.topic_names = list(topics)
        self.group_id = group_id
        self.handler = handler
        self.concurrency = concurrency
        #: slots one tenant may hold (None = all of them: no cap, the least served still go first)
        self.per_tenant = concurrency if per_tenant is None else min(per_tenant, concurrency)
        self.tenant_of_key = tenant_of_key
        self.producer = producer
        self.on_assign = on_assign
        self.agent = agent
        self.commit_interval = commit_interval
        self.revoke_timeout = revoke_timeout
        self.drain_timeout = drain_timeout
        pause = settings.partition_pause_above if pause_above is None else pause_above
        #: the backpressure thresholds; `records_per_tenant` None = no cap (one tenant)
        self.limits = Limits(
            pause_above=pause, resume_below=max(1, pause // 2) if resume_below is None else resume_below,
            per_tenant=records_per_tenant,
            unfinished_max=max(pause, settings.partition_unfinished_max if unfinished_max is None
                               else unfinished_max))
        #: False keeps the old behaviour (a revoked record runs on): only the drills that play a
        #: worker unaware of its revoke use it
        self.cancel_revoked = cancel_revoked
        self._topics = Topics.from_settings(settings)
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[TopicPartition, _Partition] = {}
        #: revoked partitions whose records were still running, until the next assignment
        self._lingering: dict[TopicPartition, _Partition] = {}
        self._queues: dict[bytes, deque[ConsumerRecord]] = {}
        #: keys waiting for a slot, one line per tenant; it also counts the slots each tenant holds
        self._fair: FairQueue[bytes] = FairQueue(concurrency, self.per_tenant)
        self._active: set[bytes] = set()
        self._held_gauge = metrics.Children(metrics.tenant_slots_held)  # children kept: a hot path
        self._waiting_gauge = metrics.Children(metrics.tenant_slots_waiting)
        #: records in memory per tenant over the worker (the cap of backpressure.py)
        self._buffers = TenantBuffers(records_per_tenant)
        self._record_labels: set[str] = set()  # tenant labels of the records gauges set so far
        self._buffered_gauge = metrics.Children(metrics.tenant_records_buffered)
        self._read_past_gauge = metrics.Children(metrics.tenant_records_read_past)
        self._tasks: set[asyncio.Task[None]] = set()
        self._gate_tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._state = "not started"
        self._assigned_once = False
        self._stopping = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Joins the group and starts fetching; returns once the consumer is started (not assigned)."""
        session_ms = int(self.settings.broker_session_timeout_seconds * 1000)
        self._consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            rebalance_timeout_ms=max(session_ms, int(self.revoke_timeout * 1000) + 5000),
            max_poll_records=500,
        )
        self._assigned_once = False  # set by the listener, which may run during start()
        self._consumer.subscribe(self.topic_names, listener=_Listener(self))
        await self._consumer.start()
        self._state = "running"
        self._stopping = False
        metrics.agent_up.labels(self.service, self.agent).set(1)
        self._loop_task = asyncio.create_task(self._fetch_loop(), name=f"{self.agent}-fetch")
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"{self.agent}-commit")

    async def stop(self) -> None:
        """Stops fetching, lets in-flight records finish (bounded), commits what finished, leaves."""
        if self._consumer is None:
            return
        self._stopping = True
        for task in (self._loop_task, self._commit_task, *self._gate_tasks):
            if task is not None:
                task.cancel()
        for task in (self._loop_task, self._commit_task, *self._gate_tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # nothing new starts: drop what has not started yet (it is not committed; redelivered later)
        for q in self._queues.values():
            self._forget(q)
        for part in self._partitions.values():
            self._forget(part.held)
            part.held = []
        self._queues = {k: q for k, q in self._queues.items() if k in self._active}
        for q in self._queues.values():
            q.clear()
        waited = self._fair.tenants()
        self._fair.clear()
        for tenant in waited:
            self._report_slots(tenant)
        await self._wait_idle(lambda: bool(self._tasks), self.drain_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._commit(list(self._partitions))
        with contextlib.suppress(Exception):
            await self._consumer.stop()
        self._consumer = None
        self._partitions.clear()
        self._lingering.clear()
        self._report_records()
        if self._state == "running":
            self._state = "stopped"
        metrics.agent_up.labels(self.service, self.agent).set(0)

    def ready(self) -> tuple[bool, str]:
        """(True, "ok") while fetching with an assignment; else False and why."""
        if self._state != "running":
            return False, self._state
        if not self._assigned_once:
            return False, "waiting for a partition assignment"
        gated = [tp for tp, p in self._partitions.items() if p.gated]
        if gated:
            return False, f"catching up {len(gated)} newly assigned partition(s)"
        return True, "ok"

    def assignment(self) -> set[TopicPartition]:
        return set(self._partitions)

    def paused(self) -> set[TopicPartition]:
        """Partitions paused because too many of their records are unfinished (backpressure)."""
        return {tp for tp, p in self._partitions.items() if p.paused}

    def unfinished(self) -> int:
        """Records fetched and not yet finished, over all partitions (queued + in flight)."""
        return sum(p.offsets.unfinished() for p in self._partitions.values())

    # ---------------------------------------------------------------- fetching

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in batches.items():
                    for record in records:
                        self._accept(tp, record)
                self._apply_backpressure()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._state = f"crashed: {type(exc).__name__}"
            metrics.agent_up.labels(self.service, self.agent).set(0)
            event(log, "consumer_crashed", logging.ERROR, service=self.service, agent=self.agent,
                  error=f"{type(exc).__name__}: {exc}")
            raise

    def _accept(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        part = self._partitions.get(tp)
        if part is None:
            return  # not (or no longer) ours
        verdict = part.backlog.accept(record.offset, self.tenant_of_key(self.key_of(record)), self._buffers)
        if verdict is not Verdict.KEEP:
            return  # read past (read again later), or already seen
        if part.gated:
            part.held.append(record)
        else:
            self._enqueue(record)

    def _apply_backpressure(self) -> None:
        """After each fetch: rewinds partitions whose records read past can be read again, then
        pauses or resumes each partition (services/common/backpressure.py)."""
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        for tp, part in self._partitions.items():
            if tp not in assigned:
                continue
            rewind_to = part.backlog.rewind(self._buffers)
            if rewind_to is not None:
                self._consumer.seek(tp, rewind_to)
                event(log, "partition_read_again", logging.DEBUG, service=self.service, agent=self.agent,
                      topic=tp.topic, partition=tp.partition, offset=rewind_to)
            pause = part.backlog.should_pause(part.paused, self._buffers, self.limits)
            if pause and not part.paused:
                self._consumer.pause(tp)
                part.paused = True
            elif part.paused and not pause:
                self._consumer.resume(tp)
                part.paused = False
        self._report_records()

    def _report_records(self) -> None:
        """The records gauges per tenant label (tenants outside the bounded labels share `other`)."""
        buffered: dict[str, int] = {}
        for tenant in self._buffers.tenants():
            label = metrics.tenant_label(tenant)
            buffered[label] = buffered.get(label, 0) + self._buffers.held(tenant)
        read_past: dict[str, int] = {}
        for part in self._partitions.values():
            for tenant in part.backlog.read_past_tenants():
                label = metrics.tenant_label(tenant)
                read_past[label] = read_past.get(label, 0) + part.backlog.read_past(tenant)
        self._record_labels |= buffered.keys() | read_past.keys()
        for label in self._record_labels:
            self._buffered_gauge(self.service, label).set(buffered.get(label, 0))
            self._read_past_gauge(self.service, label).set(read_past.get(label, 0))

    def _forget(self, records: Iterable[ConsumerRecord]) -> None:
        """Records kept in memory dropped unstarted (revoke, stop): their tenants get their room back
        (the records stay uncommitted: the partition's next owner, or this one later, reads them)."""
        for record in records:
            self._buffers.give_back(self.tenant_of_key(self.key_of(record)))

    # ---------------------------------------------------------------- keyed pool

    @staticmethod
    def key_of(record: ConsumerRecord) -> bytes:
        """The ordering key: the Kafka key, or the partition for keyless records."""
        if record.key is not None:
            return bytes(record.key)
        return f"\x00{record.topic}/{record.partition}".encode()

    def _enqueue(self, record: ConsumerRecord) -> None:
        key = self.key_of(record)
        self._queues.setdefault(key, deque()).append(record)
        if key not in self._active and key not in self._fair:  # else it keeps its place
            tenant = self.tenant_of_key(key)
            self._fair.push(tenant, key)
            self._report_slots(tenant)
        self._dispatch()

    def _dispatch(self) -> None:
        while not self._stopping:
            admitted = self._fair.admit()  # takes a slot of the key's tenant
            if admitted is None:
                return  # every slot held, or every waiting tenant at its share
            tenant, key = admitted
            queue = self._queues.get(key)
            if not queue:  # its records were dropped (revoke) while it waited
                self._queues.pop(key, None)
                self._fair.release(tenant)
                self._report_slots(tenant)
                continue
            self._report_slots(tenant)
            record = queue.popleft()
            self._active.add(key)
            part = self._partitions.get(TopicPartition(record.topic, record.partition))
            if part is not None:
                part.inflight += 1
            task = asyncio.create_task(self._run(key, tenant, record, part), name=f"{self.agent}-record")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if part is not None:
                part.tasks.add(task)
                task.add_done_callback(part.tasks.discard)

    async def _run(self, key: bytes, tenant: str, record: ConsumerRecord, part: _Partition | None
                   ) -> None:
        """Handles one record of `key`; `part` is the partition state it was fetched under (a
        revoked partition's state is detached, so a late finish never touches a newer assignment)."""
        finished = False
        try:
            await self._process(record)
            finished = True
        except (_Abandon, asyncio.CancelledError):
            pass
        except Exception as exc:  # _process guards everything; this is a last resort
            event(log, "record_failed", logging.ERROR, service=self.service,
                  error=f"{type(exc).__name__}: {exc}", topic=record.topic, offset=record.offset)
        finally:
            if part is not None:
                part.inflight = max(0, part.inflight - 1)
                part.backlog.finished(record.offset, tenant, done=finished)
            self._buffers.give_back(tenant)
            self._active.discard(key)
            self._fair.release(tenant)
            queue = self._queues.get(key)
            if queue:
                self._fair.push(tenant, key)  # back to the end of its tenant's line
            self._report_slots(tenant)
            if not queue:
                self._queues.pop(key, None)
            self._progress.set()
            self._progress = asyncio.Event()
            self._dispatch()

    def _report_slots(self, tenant: str) -> None:
        """The slot gauges of the tenant's label (tenants outside the bounded labels share `other`)."""
        label = metrics.tenant_label(tenant)
        same = [tenant] if label == tenant else [  # `other`: every tenant it stands for
            t for t in self._fair.tenants() if metrics.tenant_label(t) == label]
        self._held_gauge(self.service, label).set(sum(map(self._fair.held, same)))
        self._waiting_gauge(self.service, label).set(sum(map(self._fair.waiting, same)))

    async def _process(self, record: ConsumerRecord) -> None:
        try:
            name, value = codec.decode_any(record.value)
        except codec.CodecError as exc:
            await self._dead_letter(record, "undecodable", str(exc), None, None)
            return
        try:
            await self.handler(name, value, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("handler_error", exc_info=True, extra={"fields": {
                "service": self.service, "record": name,
                "customer": mask(str(value.get("customer_key", "-"))),
                "batch_id": value.get("batch_id"), "error": type(exc).__name__}})
            await self._dead_letter(
                record, "handler_error", f"{type(exc).__name__}: {exc}",
                _str_or_none(value.get("customer_key")), _str_or_none(value.get("batch_id")),
            )

    async def _dead_letter(
        self, record: ConsumerRecord, reason: str, error: str, customer_key: str | None,
        batch_id: str | None,
    ) -> None:
        delay = 0.2
        while True:
            try:
                await dead_letter(
                    self.producer, self._topics, service=self.service, reason=reason, error=error,
                    source_topic=record.topic, partition=record.partition, offset=record.offset,
                    key=record.key, payload=record.value, customer_key=customer_key, batch_id=batch_id,
                )
                return
            except (KafkaError, OSError) as exc:
                if self._stopping:
                    raise _Abandon() from exc
                event(log, "dead_letter_retry", logging.WARNING, service=self.service,
                      error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---------------------------------------------------------------- commits and rebalances

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            try:
                await self._commit(list(self._partitions))
                self._update_lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a rebalance can make offsets/highwater momentarily unavailable
                event(log, "commit_loop_error", logging.WARNING, service=self.service,
                      error=f"{type(exc).__name__}: {exc}")

    async def _commit(self, tps: Iterable[TopicPartition]) -> None:
        if self._consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for tp in tps:
            part = self._partitions.get(tp)
            point = part.offsets.to_commit() if part is not None else None
            if point is not None:
                offsets[tp] = point
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (KafkaError, AssertionError) as exc:  # rebalance in progress, coordinator moved...
            event(log, "commit_failed", logging.WARNING, service=self.service, error=type(exc).__name__)
            return
        for tp, offset in offsets.items():
            part = self._partitions.get(tp)
            if part is not None:
                part.offsets.mark_committed(offset)

    def _update_lag(self) -> None:
        if self._consumer is None:
            return
        lag = 0
        assigned = self._consumer.assignment()
        for tp, part in self._partitions.items():
            if tp not in assigned:
                continue
            high = self._consumer.highwater(tp)
            point = part.offsets.commit_point()
            if high is not None and point is not None:
                lag += max(0, high - point)
        metrics.consumer_lag.labels(self.service).set(lag)

    async def _wait_idle(self, busy: Callable[[], bool], timeout: float) -> bool:
        """Waits until `busy()` is false or `timeout` passed; True if it became idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while busy():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), remaining)
        return True

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Rebalance: stop dispatching `revoked`, await their in-flight records (bounded), commit
        the finished prefix; what still runs is kept for `assigned` to cancel or let run on."""
        mine = [tp for tp in revoked if tp in self._partitions]
        for tp in mine:
            self._forget(self._partitions[tp].held)
            self._partitions[tp].held.clear()
            self._partitions[tp].gated = True  # nothing of it starts any more
        gone = set(mine)
        for key, queue in list(self._queues.items()):
            self._forget(r for r in queue if TopicPartition(r.topic, r.partition) in gone)
            kept = deque(r for r in queue if TopicPartition(r.topic, r.partition) not in gone)
            if kept:
                self._queues[key] = kept
            else:
                self._queues.pop(key, None)
                tenant = self._fair.discard(key)  # nothing of it waits any more: out of its line
                if tenant is not None:
                    self._report_slots(tenant)
        idle = await self._wait_idle(
            lambda: any(self._partitions[tp].inflight for tp in mine if tp in self._partitions),
            self.revoke_timeout,
        )
        if not idle:
            event(log, "revoke_timeout", logging.WARNING, service=self.service, partitions=len(mine),
                  note="unfinished records will be redelivered")
        for tp in mine:
            part = self._partitions.get(tp)
            if part is not None and part.tasks:
                self._lingering[tp] = part
        await self._commit(mine)
        for tp in mine:
            self._partitions.pop(tp, None)
        event(log, "partitions_revoked", service=self.service, agent=self.agent, count=len(mine))

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """Rebalance: cancel what still runs of partitions now owned by another worker; track the
        new partitions; hold their records until `on_assign` finished."""
        lingering, self._lingering = self._lingering, {}
        cancelled = 0
        for tp, part in lingering.items():
            if tp in assigned or not self.cancel_revoked:
                continue  # came back: its records run on (their keys stay busy meanwhile)
            for task in list(part.tasks):
                task.cancel()
                cancelled += 1
        if cancelled:
            event(log, "revoked_records_cancelled", logging.WARNING, service=self.service,
                  agent=self.agent, records=cancelled, note="their new owner handles them")
        new = {tp for tp in assigned if tp not in self._partitions}
        for tp in new:
            self._partitions[tp] = _Partition(gated=self.on_assign is not None)
        for tp, part in lingering.items():  # came back: a later move of the partition cancels them
            if tp in assigned and tp in self._partitions:
                now_part = self._partitions[tp]
                for task in part.tasks:
                    now_part.tasks.add(task)
                    task.add_done_callback(now_part.tasks.discard)
        self._assigned_once = True
        event(log, "partitions_assigned", service=self.service, agent=self.agent, count=len(assigned))
        if new and self.on_assign is not None:
            task = asyncio.create_task(self._open_gate(new), name=f"{self.agent}-on-assign")
            self._gate_tasks.add(task)
            task.add_done_callback(self._gate_tasks.discard)

    async def _open_gate(self, tps: set[TopicPartition]) -> None:
        assert self.on_assign is not None
        parts = {tp: self._partitions[tp] for tp in tps}
        delay = 0.5
        while True:
            try:
                await self.on_assign(set(tps))
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                event(log, "on_assign_failed", logging.ERROR, service=self.service,
                      error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        for tp, part in parts.items():
            if self._partitions.get(tp) is not part:
                continue  # revoked meanwhile (and maybe assigned again: a newer gate handles it)
            part.gated = False
            held, part.held = part.held, []
            for record in held:
                self._enqueue(record)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: KeyedConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner.assigned(set(assigned))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
