"""The context service's faust shell: one table, one stateful agent, a flush timer, web views.

Everything the service decides lives in `services/context/state.py` (pure functions). This module
only moves bytes: it decodes each event inside a guard, calls ONE state function with the
customer's state from the table, produces the returned effects, writes the new state back, and
starts history fetches in the background.

Delivery rule (at-least-once, made effectively-once by the state's dedupe memory):
  1. produce the effects (responder/vision requests, audit decisions) and await the broker's acks;
  2. THEN write the new state (which holds the dedupe record) to the table.
A crash between 1 and 2 replays the event after restart: the state still lacks the dedupe record,
so the effects are produced a second time and downstream dedupes them by batch id. The other order
could lose an effect for good (state says "done", effect never reached the broker). The agent
takes events from a NO-ACK stream: faust commits nothing on its own. An event's offset is acked
(and so can be committed) only once its effects are acked AND its state's changelog record is on the
broker (3.); a failure acks nothing more, so the event is replayed after a restart. Deciding and
completing are pipelined: the agent runs the state function of the next events while a completion
task awaits the acks of the earlier ones, in chunks of whatever is queued (no polling).
  3. THEN ack the input event, in arrival order.

faust pitfalls handled here (docs/faust.md, docs/broker.md):
- values are consumed RAW and decoded in a guard; anything that fails goes to the dead-letter topic
  with its reason and the agent carries on — an agent that raises dies while the process lives on,
  so readiness also reports a crashed agent;
- the table is written only inside the agent (stream iteration); timers and views only read it and
  ask for changes by producing `ContextCommand`s keyed by the customer (the timer → command → agent
  pattern), so every change happens in-stream and survives restarts and rebalances;
- the flush timer never scans the table: an in-memory index (customer → next due time) is updated
  by the agent after each write and rebuilt from the worker's own partitions after each recovery;
  the timer sleeps until the earliest due time (the agent wakes it for an earlier one).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import faust
import faust.streams as faust_streams
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.partitioner import murmur2
from faust.types import TP
from prometheus_client import Counter, Gauge, Histogram

from services import providers
from services.common import codec, kafka, logs, metrics
from services.common.config import ConfigError, Settings
from services.common.kafka import Topics
from services.common.keys import KeyError_, parse_key
from services.common.loop_lag import watch_loop_lag
from services.common.records import (
    AgentActivity,
    AssistantReply,
    ContextCommand,
    CustomerState,
    InboundMessage,
)
from services.common.tenants import Tenants
from services.common.timeparse import utcnow
from services.context import state as domain
from services.context.fetcher import HistoryFetcher, ReconcileSweep, SweepTarget
from services.context.state import Effects, Limits
from services.providers.accounts import load_served_tenants

log = logging.getLogger(__name__)

SERVICE = "context"
AGENT_NAME = "context-events"
TABLE_NAME = "customers"
#: After this long without any change to the customer's state, a flush command the agent has
#: handled is sent again (the batch is still due: the command changed nothing).
FLUSH_RESEND_SECONDS = 5.0
#: A flush command the agent has not handled yet is sent again only after this long (a safety net:
#: a produced command is handled by whoever owns its partition). Sending it again sooner only adds
#: work to an agent that is behind: each copy is one more event for it.
FLUSH_UNHANDLED_RESEND_SECONDS = 60.0
#: Flush commands sent per timer tick at most (the rest wait for the next tick).
FLUSH_MAX_PER_TICK = 2000
#: The flush loop never sleeps less than this between looks (more flushes due than one look sends).
FLUSH_MIN_SLEEP_SECONDS = 0.002
#: When `due_action` says "not yet" although our estimate said "due", look again this much later.
RECHECK_SECONDS = 1.0
#: A batch due by the clock whose customer messages the agent has not all read yet (see
#: `ContextRuntime.inbound_watermark`) is looked at again as soon as the agent has read far enough
#: (or caught up), and at the latest this much later (no state is read until then). Only a safety
#: net: the agent's progress releases it. Every look costs the flush loop CPU, and a worker that is
#: behind has many such batches (each second behind at 100 msg/s adds 100): at 0.05 s they were
#: looked at 20 times a second each, and the loop took the CPU the agent needed to catch up.
BEHIND_RECHECK_SECONDS = 1.0
#: ... but never longer than this past the batch's due time by the clock: a partition end the agent
#: never reaches (whatever the cause) must not hold a batch for ever.
BEHIND_MAX_WAIT_SECONDS = 60.0
#: How often `consumer_lag{service="context"}` is refreshed.
# A hole at the head of an input partition not filled within this long: the partition is read again
# from its committed offset (`AckGuard`).
HOLE_PATIENCE_SECONDS = 60.0
LAG_INTERVAL_SECONDS = 5.0
#: Events decided by the agent and not yet completed (effects acked, state durable, input acked) at
#: most: the agent waits for the completion task beyond this. The completion task takes whatever is
#: queued (up to this many) as one chunk: one wait for the acks of all of them.
AGENT_INFLIGHT_MAX = 500
#: Longest pause between retries of a produce that failed (broker unavailable).
PRODUCE_BACKOFF_MAX_SECONDS = 5.0


# -- pure helpers ---------------------------------------------------------------------------------

def build_limits(settings: Settings) -> Limits:
    """The state machine's thresholds from the process settings.

    MISSED_HISTORY=gap without the reconciliation sweep is refused: a customer message WATI never
    delivered within a short gap would then never be seen (a blind spot nobody chose knowingly).
    """
    mode = settings.missed_history.strip().lower()
    if mode not in ("every_batch", "gap"):
        raise ConfigError(f"MISSED_HISTORY must be every_batch or gap, got {settings.missed_history!r}")
    if mode == "gap" and settings.reconcile_interval_seconds <= 0:
        raise ConfigError("MISSED_HISTORY=gap needs RECONCILE_INTERVAL_SECONDS > 0: without the sweep, "
                          "customer messages WATI never delivered within a short gap are never seen")
    return Limits(
        quiet_window_seconds=settings.quiet_window_seconds,
        max_batch_wait_seconds=settings.max_batch_wait_seconds,
        missed_lookback_seconds=settings.missed_lookback_seconds,
        missed_max_items=settings.missed_max_items,
        history_timeout_seconds=settings.history_timeout_seconds,
        policy=settings.gap_policy,
        history_every_batch=mode == "every_batch",
    )


@dataclass(frozen=True)
class TenantLimits:
    """Each tenant's thresholds (quiet window, max wait, lookback, gap, hold and overrides) over the
    deployment's `base` limits; a customer's are its key's tenant's (docs/tenants.md).

    A key of no configured tenant (a tenant removed from TENANTS_FILE whose customers still have
    events in flight) gets the deployment's limits: its state is kept, and it is answered as before.
    """

    base: Limits
    by_tenant: dict[str, Limits] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, tenants: Tenants) -> TenantLimits:
        base = build_limits(settings)
        return cls(base, {
            tenant.id: replace(
                base,
                quiet_window_seconds=tenant.thresholds.quiet_window_seconds,
                max_batch_wait_seconds=tenant.thresholds.max_batch_wait_seconds,
                missed_lookback_seconds=tenant.thresholds.missed_lookback_seconds,
                policy=tenant.thresholds.policy,
            )
            for tenant in tenants.by_id.values()
        })

    def __call__(self, customer_key: str) -> Limits:
        try:
            tenant = parse_key(customer_key).tenant
        except KeyError_:
            return self.base
        return self.by_tenant.get(tenant, self.base)


def next_due(state: CustomerState, limits: Limits) -> datetime | None:
    """When the timer should next ask `due_action` about this customer; None = nothing pending.

    An estimate from the batch fields (the quiet window runs from the last message, the max wait
    from the first, a running history fetch times out after `history_timeout_seconds`); the
    authoritative answer is always `state.due_action`, so an early estimate costs one extra look.
    """
    candidates: list[datetime] = []
    batch = state.get("open_batch")
    if batch is not None:
        candidates.append(min(
            batch["last_message_at"] + timedelta(seconds=limits.quiet_window_seconds),
            batch["opened_at"] + timedelta(seconds=limits.max_batch_wait_seconds),
        ))
    flushing = state.get("flushing_batch")
    if flushing is not None:
        started = flushing.get("fetch_started_at")
        if started is not None:
            candidates.append(started + timedelta(seconds=limits.history_timeout_seconds))
        else:
            candidates.append(flushing["last_message_at"])
    if batch is None and flushing is None:
        hold_end = domain.hold_ends_at(state, limits)  # held messages are answered when it ends
        if hold_end is not None:
            candidates.append(hold_end)
    return min(candidates) if candidates else None


def flush_sleep(next_due_at: datetime | None, now: datetime, longest: float) -> float:
    """How long the flush loop sleeps: until the earliest due time, at most `longest` seconds.

    Sleeping until the due time (instead of looking every `longest` seconds) is what keeps the
    delay between "the quiet window ended" and "the flush command is sent" near zero.
    """
    if next_due_at is None:
        return longest
    return min(longest, max(FLUSH_MIN_SLEEP_SECONDS, (next_due_at - now).total_seconds()))


def customer_partition(customer_key: str, partitions: int) -> int:
    """The partition the producers' default partitioner (murmur2, as Java's) puts this key in."""
    return (murmur2(customer_key.encode("utf-8")) & 0x7FFFFFFF) % partitions


@dataclass(slots=True)
class Tracked:
    """What the timer, the sweep and the list view need to know of one customer, in memory."""

    partition: int
    due_at: datetime | None = None
    batch_due_at: datetime | None = None  # `next_due` of the state (due_at also moves by defer)
    open: bool = False
    flushing: bool = False
    held: int = 0
    paused: bool = False
    channel: str | None = None
    provider_id: str | None = None
    last_activity_at: datetime | None = None
    last_reply_at: datetime | None = None
    batch_id: str | None = None

    @property
    def pending(self) -> bool:
        """Has an open, flushing or held batch (the list view's `open=1`)."""
        return self.open or self.flushing or self.held > 0


def _is_open(entry: Tracked) -> int:
    return 1 if entry.open or entry.flushing else 0


@dataclass(slots=True)
class SentFlush:
    """A flush command the timer sent for a customer's batch, and whether the agent handled it."""

    batch_id: str
    at: float  # monotonic time it was sent
    handled: bool = False


@dataclass
class CustomerIndex:
    """customer → next due time and status, for the customers of this worker's partitions.

    A heap of (due time, key) gives the due customers without scanning everyone every tick; stale
    heap entries (the customer's due time changed since) are skipped when popped.
    """

    resend_after: float = FLUSH_RESEND_SECONDS
    unhandled_resend_after: float = FLUSH_UNHANDLED_RESEND_SECONDS
    #: Called when a due time earlier than every other one is recorded: the flush loop sleeps
    #: until the earliest due time, so it must wake up and sleep less.
    on_earlier_due: Callable[[], None] | None = None
    entries: dict[str, Tracked] = field(default_factory=dict)
    _heap: list[tuple[datetime, str]] = field(default_factory=list)
    _inflight: dict[str, SentFlush] = field(default_factory=dict)
    _open: int = 0  # customers with an open or flushing batch (kept up to date, never counted)

    def update(self, key: str, partition: int, state: CustomerState, limits: Limits) -> None:
        """Records the customer's new state (the agent calls this after each table write)."""
        open_batch = state.get("open_batch")
        flushing = state.get("flushing_batch")
        batch = flushing or open_batch
        due_at = next_due(state, limits)
        entry = Tracked(
            partition=partition,
            due_at=due_at,
            batch_due_at=due_at,
            open=open_batch is not None,
            flushing=flushing is not None,
            held=len(state.get("held_messages") or []),
            paused=bool(state.get("paused")),
            channel=state.get("channel"),
            provider_id=state.get("provider_id"),
            last_activity_at=state.get("last_activity_at"),
            last_reply_at=state.get("last_reply_at"),
            batch_id=batch["batch_id"] if batch is not None else None,
        )
        previous = self.entries.get(key)
        self._open += _is_open(entry) - (_is_open(previous) if previous is not None else 0)
        self.entries[key] = entry
        sent = self._inflight.get(key)
        if sent is not None and sent.handled:
            del self._inflight[key]  # changed after its flush was handled: the timer decides afresh
        # Not before: a later message of the same batch, handled while the flush command waits in the
        # agent's queue, changes nothing about that command (it carries what the timer saw).
        if entry.due_at is not None:
            self._push(entry.due_at, key)

    def defer(self, key: str, until: datetime) -> None:
        """Look at this customer again at `until` (the estimate was early)."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.due_at = until
            self._push(until, key)

    def _push(self, at: datetime, key: str) -> None:
        earliest = not self._heap or at < self._heap[0][0]
        heapq.heappush(self._heap, (at, key))
        if earliest and self.on_earlier_due is not None:
            self.on_earlier_due()

    def next_due_at(self) -> datetime | None:
        """The earliest due time recorded (possibly stale: waking early costs one empty look)."""
        return self._heap[0][0] if self._heap else None

    def due(self, now: datetime, limit: int = FLUSH_MAX_PER_TICK) -> list[str]:
        """Customers whose due time has passed (each removed from the heap; re-added by defer/update)."""
        found: dict[str, None] = {}  # in order; `in` a list cost O(found) per key, O(limit²) a tick
        while self._heap and self._heap[0][0] <= now and len(found) < limit:
            at, key = heapq.heappop(self._heap)
            entry = self.entries.get(key)
            if entry is None or entry.due_at != at or key in found:
                continue
            entry.due_at = None
            found[key] = None
        return list(found)

    def should_send(self, key: str, batch_id: str, monotonic_now: float) -> bool:
        """False while a flush for this batch is in flight: not handled by the agent yet (and younger
        than `unhandled_resend_after`), or handled and younger than `resend_after`."""
        sent = self._inflight.get(key)
        if sent is None or sent.batch_id != batch_id:
            return True
        wait = self.resend_after if sent.handled else self.unhandled_resend_after
        return monotonic_now - sent.at >= wait

    def mark_sent(self, key: str, batch_id: str, monotonic_now: float) -> None:
        self._inflight[key] = SentFlush(batch_id, monotonic_now)

    def flush_handled(self, key: str, batch_id: str | None) -> None:
        """The agent handled a flush command of this customer's batch (whatever it decided)."""
        sent = self._inflight.get(key)
        if sent is not None and sent.batch_id == batch_id:
            sent.handled = True

    def keep_partitions(self, partitions: set[int]) -> None:
        """Forgets customers of partitions this worker no longer owns."""
        for key in [k for k, e in self.entries.items() if e.partition not in partitions]:
            self._open -= _is_open(self.entries.pop(key))
            self._inflight.pop(key, None)
        self._heap = [(at, key) for at, key in self._heap if key in self.entries]
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self._open = 0
        self.entries.clear()
        self._heap.clear()
        self._inflight.clear()

    def pending(self) -> list[tuple[str, Tracked]]:
        """Customers with an open, flushing or held batch, by key."""
        return sorted((k, e) for k, e in self.entries.items() if e.pending)

    def open_count(self) -> int:
        return self._open

    def reconcile_candidates(self, now: datetime, window_seconds: float) -> list[SweepTarget]:
        """WATI customers active within the window, most recently active first.

        `stop_before` mirrors the state machine's sweep window (after the bot's last reply, within
        WhatsApp's 24 h session): older history pages cannot hold anything to recover.
        """
        since = now - timedelta(seconds=window_seconds)
        session_start = now - timedelta(seconds=domain.WHATSAPP_SESSION_SECONDS)
        found: list[SweepTarget] = []
        for key, e in self.entries.items():
            if providers.has_history(e.channel) and e.provider_id and e.last_activity_at is not None \
                    and e.last_activity_at >= since:
                stop_before = max(e.last_reply_at or session_start, session_start)
                found.append(SweepTarget(key, e.provider_id, e.last_activity_at, stop_before))
        found.sort(key=lambda target: target.last_activity_at, reverse=True)
        return found


class Rejected(Exception):
    """An input event the agent cannot handle; goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: str, error: str, customer_key: str | None = None) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.customer_key = customer_key


def decode_event(
    topics: Topics, topic: str, key: bytes | None, value: bytes | None
) -> tuple[str, str, dict[str, Any]]:
    """(customer key, record name, record) of one input event, or Rejected with the reason."""
    expected = {
        topics.inbound: "InboundMessage",
        topics.agent_activity: "AgentActivity",
        topics.replies: "AssistantReply",
        topics.context_commands: "ContextCommand",
    }.get(topic)
    if expected is None:
        raise Rejected("unknown_topic", f"event from unexpected topic {topic}")
    try:
        name, record = codec.decode_any(value)
    except codec.CodecError as exc:
        raise Rejected("undecodable", str(exc)) from None
    if name != expected:
        raise Rejected("wrong_record_type", f"{topic} carries {expected}, got {name}")
    customer = record.get("customer_key")
    if not key:
        raise Rejected("missing_key", "event has no Kafka key", customer)
    try:
        key_text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_key", "Kafka key is not UTF-8", customer) from None
    if key_text != customer:
        raise Rejected("key_mismatch", "Kafka key differs from the record's customer_key", customer)
    return key_text, name, record


def apply_metric(name: str, labels: dict[str, str], value: float, customer: str | None = None) -> None:
    """Applies one `Effects.metrics` entry; names are attributes of services.common.metrics.

    A metric with a `tenant` label gets the customer's tenant (bounded, `metrics.key_tenant`): the
    domain's effects name what happened, the shell knows whose it was."""
    metric = getattr(metrics, name, None)
    if not isinstance(metric, Counter | Gauge | Histogram):
        logs.event(log, "unknown_metric", logging.WARNING, metric=name)
        return
    # prometheus_client keeps label names on a private attribute; there is no public accessor
    if "tenant" in metric._labelnames and "tenant" not in labels:
        labels = {**labels, "tenant": metrics.key_tenant(customer)}
    target: Any = metric.labels(**labels) if labels else metric
    if isinstance(metric, Histogram):
        target.observe(value)
    elif isinstance(metric, Gauge) or value >= 0:
        target.inc(value)


# -- the faust shell ------------------------------------------------------------------------------

class ChangelogTrackingTable(faust.Table):
    """faust's Table, keeping the changelog send of each write until the shell takes it.

    faust's `table[key] = value` hands the changelog record to its producer buffer and returns; the
    commit's flush gives up after ~0.1 s per buffered message and commits anyway. The shell awaits
    these sends before it acks the input event, so no offset is committed ahead of its state.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.changelog_sends: list[asyncio.Future[Any]] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        sent = super().send_changelog(*args, **kwargs)
        self.changelog_sends.append(sent)
        return sent


def take_changelog_sends(table: Any) -> list[asyncio.Future[Any]]:
    """The changelog sends of the writes since the last call (none for a plain dict: unit tests)."""
    sends: list[asyncio.Future[Any]] | None = getattr(table, "changelog_sends", None)
    if not sends:
        return []
    taken = list(sends)
    sends.clear()
    return taken


class ContextApp(faust.App):
    """faust.App carrying the context runtime; closes the runtime's clients when it stops."""

    runtime: ContextRuntime

    async def on_stop(self) -> None:
        self.runtime.begin_stop()
        await super().on_stop()
        await self.runtime.close()

    async def _on_agent_error(self, agent: faust.types.AgentT, exc: BaseException) -> None:
        """faust calls this when an agent raised (it is dead now): readiness must say so."""
        await self.runtime.on_agent_error(agent, exc)
        await super()._on_agent_error(agent, exc)


@dataclass(slots=True)
class Incoming:
    """One input record as the agent got it; `event` is faust's (table writes are made in its name)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    event: Any = None


@dataclass(slots=True)
class Pending:
    """An event on its way through the pipeline; `outcome` None: nothing to write (dead-lettered,
    duplicate), only the ack is left."""

    item: Incoming
    outcome: Decided | None = None
    #: (customer, batch id) of a flush command: the flush timer learns it was handled
    flush_of: tuple[str, str | None] | None = None
    inbound_at: datetime | None = None  # a customer message's receive time (the partition's progress)


@dataclass(slots=True)
class Decided:
    """An event whose state function ran and whose effects are being produced."""

    item: Incoming
    customer: str
    new_state: CustomerState | None  # None: nothing changed, no table write
    encoded: bytes
    effects: Effects
    outputs: list[tuple[str, bytes]]
    sends: list[asyncio.Future[Any]]


@contextlib.contextmanager
def _in_the_name_of(event: Any) -> Iterator[None]:
    """Makes `event` faust's current event while writing the table.

    faust takes the changelog partition and the RocksDB partition of a table write from the
    current event, which it sets only while a stream iterates one event at a time; the writes happen
    in the completion task, so each is made in the name of its own event (a private faust context
    variable: faust is pinned, and tests/unit/test_context_chunks.py fails if it disappears).
    """
    if event is None:
        yield
        return
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


class ContextRuntime:
    """The per-process state of the shell: table, producer, index, fetcher, readiness."""

    def __init__(self, app: ContextApp, settings: Settings, table_partitions: int) -> None:
        self.app = app
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        # a history fetch must reach each customer's own account, or none
        self.tenants, _ = load_served_tenants(settings, what="tenant accounts cannot be used")
        self.limits_for = TenantLimits.build(settings, self.tenants)  # per customer's tenant
        self.limits = self.limits_for.base
        self.partitions = table_partitions
        self._flush_wakeup = asyncio.Event()
        self.index = CustomerIndex(on_earlier_due=self._flush_wakeup.set)
        self.agent: faust.types.AgentT | None = None
        self.agent_error: str | None = None
        self.index_ready = False
        self.customers: faust.types.TableT = app.Table(
            TABLE_NAME,
            default=None,
            key_type=bytes,  # bytes keys and values use the raw codec: the changelog key is the
            value_type=bytes,  # Kafka key of the inputs, so faust routes views to the right worker
            partitions=table_partitions,
            help="CustomerState (Avro) by customer key",
        )
        #: faust's ack of an input event (the agent's no-ack stream's); None outside a stream
        self.acker: Callable[[Any], Awaitable[Any]] | None = None
        self.ack_guard: AckGuard | None = None  # set by create_app
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._stopping = False
        self.fetcher = HistoryFetcher(settings, self.send_command, tenants=self.tenants)
        self.sweep = ReconcileSweep(settings, self.fetcher)
        #: inbound partition -> receive time of the newest customer message the agent has handled
        self.inbound_read_up_to: dict[int, datetime] = {}
        #: inbound partition -> (due time, customer) of batches waiting for the agent to read that far
        self._behind: dict[int, list[tuple[datetime, str]]] = {}
        #: customer -> the due time it waits in `_behind` with (each waits there once, not once per look)
        self._parked: dict[str, datetime] = {}

    # -- producer ---------------------------------------------------------------------------------
    async def producer(self) -> AIOKafkaProducer:
        """The idempotent acks=all producer of effects, commands and dead letters (started lazily)."""
        async with self._producer_lock:
            if self._producer is None:
                producer = kafka.make_producer(self.settings)
                await producer.start()
                self._producer = producer
            return self._producer

    async def _retrying(
        self, what: str, send: Callable[[], Awaitable[None]], *, fatal: tuple[type[Exception], ...] = ()
    ) -> None:
        """Retries a produce until the broker acks it: an effect must never be skipped.

        `fatal` errors can never succeed on retry (a record too large for the broker): they are
        raised, so the event is dead-lettered instead of stalling every customer of this worker.
        """
        delay = 0.2
        while True:
            try:
                await send()
                return
            except fatal:
                raise
            except KafkaError as exc:
                if self._stopping:
                    raise
                logs.event(log, "produce_retry", logging.WARNING, what=what, error=type(exc).__name__,
                           retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PRODUCE_BACKOFF_MAX_SECONDS)

    async def send_command(self, command: ContextCommand) -> None:
        """Produces a ContextCommand keyed by its customer (flush, history_fetched, pause, ...)."""
        producer = await self.producer()
        await kafka.send_record(
            producer, self.topics.context_commands, command["customer_key"], "ContextCommand",
            dict(command),
        )

    def begin_stop(self) -> None:
        """From now on a failing produce is not retried: the event stays uncommitted (replayed)."""
        self._stopping = True

    async def close(self) -> None:
        self._stopping = True
        await self.sweep.close()
        await self.fetcher.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    # -- the agent's work -------------------------------------------------------------------------
    async def handle_events(self, items: Sequence[Incoming]) -> None:
        """Decides a chunk of events in order, then completes them (what the pipeline does, at once).

        For the tests and for callers without a stream; the agent pipelines the two halves instead
        (`EventPipeline`).
        """
        unwritten: dict[str, CustomerState] = {}
        pending = [await self.decide(item, unwritten) for item in items]
        await self.complete_chunk(pending, unwritten)

    async def decide(self, item: Incoming, unwritten: dict[str, CustomerState]) -> Pending:
        """Runs the state function and starts producing the effects (a bad event is dead-lettered here).

        `unwritten` holds the newest decided state of each customer whose state is not in the table
        yet: a later event of the same customer must see it.
        """
        try:
            customer, name, record = decode_event(self.topics, item.topic, item.key, item.value)
        except Rejected as rejected:
            await self._dead_letter_input(item, rejected.reason, rejected.error, rejected.customer_key)
            return Pending(item)
        flush_of = (customer, record.get("batch_id")) \
            if name == "ContextCommand" and record.get("kind") == "flush" else None
        inbound_at = record.get("received_at") if name == "InboundMessage" else None
        try:
            state = unwritten.get(customer)
            if state is None:
                stored = self.customers.get(customer.encode("utf-8"))
                state = (
                    cast(CustomerState, codec.decode("CustomerState", stored))
                    if stored is not None else domain.new_state(customer)
                )
            new_state, effects = self._dispatch(name, state, record)
            encoded = b"" if effects.duplicate else codec.encode("CustomerState", dict(new_state))
            outputs = self._encode_outputs(effects)  # a schema mismatch is caught here, not later
        except Exception as exc:  # a bug in one event's handling must not stop the others
            logs.event(log, "handler_error", logging.ERROR, customer=customer, record=name,
                       error=f"{type(exc).__name__}: {exc}")
            await self._dead_letter_input(item, "handler_error", f"{type(exc).__name__}: {exc}", customer)
            return Pending(item, flush_of=flush_of, inbound_at=inbound_at)
        if effects.duplicate:
            metrics.dedupe_hits_total.labels(name).inc()
            self._apply_observability(customer, effects)
            return Pending(item, flush_of=flush_of, inbound_at=inbound_at)
        changed = new_state is not state
        if changed:
            unwritten[customer] = new_state
        sends = await self._start_sends(customer, outputs)
        if effects.fetch is not None:
            # A read, started now rather than once the chunk is durable (one ack round trip or more
            # per batch of MISSED_HISTORY=every_batch): its result comes back as a `history_fetched`
            # command after this event, so whatever happens to this event (replayed after a crash:
            # the same fetch is ordered again, and the state function takes the first result in log
            # order and ignores the other) happens before the result is handled.
            self.fetcher.start(effects.fetch)
        return Pending(item, Decided(item, customer, new_state if changed else None, encoded, effects,
                                     outputs, sends), flush_of, inbound_at)

    async def _start_sends(
        self, customer: str, outputs: list[tuple[str, bytes]]
    ) -> list[asyncio.Future[Any]]:
        """Hands the outputs to the producer without waiting for the acks ([] if that failed: the
        retrying path in `_await_effects` sends them again)."""
        if not outputs:
            return []
        try:
            producer = await self.producer()
            key = customer.encode("utf-8")
            return [await producer.send(topic, value, key=key) for topic, value in outputs]
        except KafkaError:
            return []

    async def complete_chunk(self, chunk: Sequence[Pending], unwritten: dict[str, CustomerState]) -> None:
        """Completes decided events in order; acks each input only once nothing of it can be lost.

        1. every effect acked (retrying); 2. every new state written to the table, in order; 3. every
        changelog record of those writes acked by the broker; 4. the inputs acked, in order. An
        exception anywhere (only when stopping, in practice) acks nothing of the chunk: faust cannot
        commit those offsets, and the events are replayed after the restart.
        """
        decided = [p.outcome for p in chunk if p.outcome is not None]
        for outcome in decided:
            await self._await_effects(outcome)
        writes: list[tuple[Decided, list[asyncio.Future[Any]]]] = []
        for pending in chunk:
            if pending.flush_of is not None:  # before its write: the index then decides afresh
                self.index.flush_handled(*pending.flush_of)
            if pending.inbound_at is not None:
                partition = pending.item.partition
                seen = self.inbound_read_up_to.get(partition)
                if seen is None or pending.inbound_at > seen:
                    self.inbound_read_up_to[partition] = pending.inbound_at
            done = pending.outcome
            if done is None:
                continue
            writes.append((done, self._write_state(done)))
            if done.new_state is not None and unwritten.get(done.customer) is done.new_state:
                del unwritten[done.customer]  # the table has it (or a newer one is still unwritten)
        self._release_behind()
        for outcome, changelog in writes:
            await self._durable(outcome, changelog)
        for outcome in decided:
            self._apply_observability(outcome.customer, outcome.effects)
        for pending in chunk:
            await self.ack(pending.item)

    async def _await_effects(self, outcome: Decided) -> None:
        """Waits until the event's effects are acked (producing them again if that failed)."""
        customer = outcome.customer
        try:
            if outcome.outputs:
                try:
                    if not outcome.sends:
                        raise KafkaError("not handed to the producer")
                    await asyncio.gather(*outcome.sends)
                except (MessageSizeTooLargeError, RecordTooLargeError):
                    raise
                except KafkaError:
                    await self._produce(customer, outcome.outputs)
        except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
            # Can never succeed: record it where an operator sees it, then move on (writing the
            # state), rather than retrying it forever on every flush.
            await self._dead_letter_input(outcome.item, "effect_too_large", type(exc).__name__, customer)

    def _write_state(self, outcome: Decided) -> list[asyncio.Future[Any]]:
        """Writes the event's new state to the table (after its effects were acked: see "Delivery
        rule" in the module docstring); returns the changelog sends of the write."""
        if outcome.new_state is None:
            return []
        customer = outcome.customer
        with _in_the_name_of(outcome.item.event):
            self.customers[customer.encode("utf-8")] = outcome.encoded
        self.index.update(customer, outcome.item.partition, outcome.new_state, self.limits_for(customer))
        metrics.open_batches.set(self.index.open_count())
        return take_changelog_sends(self.customers)

    async def _durable(self, outcome: Decided, changelog: list[asyncio.Future[Any]]) -> None:
        """Waits until the changelog records of the event's write are acked by the broker.

        A failed send is repaired by sending the customer's CURRENT value again (never this event's,
        which a later event of the chunk may have superseded: the changelog's last record must be the
        newest state). The current state contains this event's, so its ack makes this event durable.
        """
        delay = 0.2
        while changelog:
            try:
                await asyncio.gather(*changelog)
                return
            except Exception as exc:
                if self._stopping:
                    raise
                logs.event(log, "produce_retry", logging.WARNING, what="changelog",
                           error=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PRODUCE_BACKOFF_MAX_SECONDS)
                key = outcome.customer.encode("utf-8")
                with _in_the_name_of(outcome.item.event):
                    self.customers[key] = self.customers[key]
                changelog = take_changelog_sends(self.customers)

    async def ack(self, item: Incoming) -> None:
        """Acks the input event with faust (its offset becomes committable); no-op without a stream."""
        if item.event is not None and self.acker is not None:
            await self.acker(item.event)

    async def _dead_letter_input(self, item: Incoming, reason: str, error: str, customer: str | None) -> None:
        await self.dead_letter(reason, error, item.topic, item.partition, item.offset, item.key, item.value,
                               customer)

    def _dispatch(
        self, name: str, state: CustomerState, record: dict[str, Any]
    ) -> tuple[CustomerState, Effects]:
        """Calls the state function with the time the event carries, never this worker's clock: a
        replay (after a crash, later, in another interleaving of the four topics) must decide the same."""
        limits = self.limits_for(state["customer_key"])
        if name == "InboundMessage":
            message = cast(InboundMessage, record)
            return domain.on_inbound(state, message, message["received_at"], limits)
        if name == "AgentActivity":
            activity = cast(AgentActivity, record)
            return domain.on_agent_activity(state, activity, activity["received_at"], limits)
        if name == "AssistantReply":
            reply = cast(AssistantReply, record)
            return domain.on_reply(state, reply, reply["sent_at"], limits)
        command = cast(ContextCommand, record)
        # The timer decided "due" with its clock: the flush must be judged with that same clock.
        return domain.on_command(state, command, command["issued_at"], limits)

    def _encode_outputs(self, effects: Effects) -> list[tuple[str, bytes]]:
        """(topic, Avro value) of every record the effects produce, in the delivery order."""
        outputs: list[tuple[str, str, dict[str, Any]]] = (
            [(self.topics.responder_requests, "ResponderRequest", dict(r))
             for r in effects.responder_requests]
            + [(self.topics.vision_requests, "VisionRequest", dict(r)) for r in effects.vision_requests]
            + [(self.topics.audit, "BatchDecision", dict(d)) for d in effects.decisions]
            + [(self.topics.dead_letter, "DeadLetter", dict(d)) for d in effects.dead_letters]
            + [(self.topics.inbound, "InboundMessage", dict(m)) for m in effects.recovered_inbound]
        )
        return [(topic, codec.encode(schema, value)) for topic, schema, value in outputs]

    async def _produce(self, customer: str, outputs: list[tuple[str, bytes]]) -> None:
        """Produces the outputs keyed by the customer and waits for every ack (retrying)."""
        if not outputs:
            return

        async def send_all() -> None:
            producer = await self.producer()
            futures = [await producer.send(topic, value, key=customer.encode("utf-8"))
                       for topic, value in outputs]
            await asyncio.gather(*futures)

        await self._retrying("effects", send_all, fatal=(MessageSizeTooLargeError, RecordTooLargeError))

    def _apply_observability(self, customer: str, effects: Effects) -> None:
        for metric_name, labels, value in effects.metrics:
            if metric_name == "open_batches":
                continue  # set from the index: per-worker truth across rebalances
            try:
                apply_metric(metric_name, labels, value, customer)
            except (ValueError, KeyError) as exc:
                logs.event(log, "metric_error", logging.WARNING, metric=metric_name, error=str(exc))
        for event_name, fields in effects.log:
            values = dict(fields)
            values.setdefault("customer", customer)
            logs.event(log, event_name, logging.INFO, **values)

    async def dead_letter(
        self, reason: str, error: str, topic: str, partition: int, offset: int,
        key: bytes | None, value: bytes | None, customer_key: str | None,
    ) -> None:
        async def send() -> None:
            await kafka.dead_letter(
                await self.producer(), self.topics, service=SERVICE, reason=reason, error=error,
                source_topic=topic, partition=partition, offset=offset, key=key, payload=value,
                customer_key=customer_key,
            )

        await self._retrying("dead_letter", send)

    # -- agent health -----------------------------------------------------------------------------
    async def on_agent_error(self, agent: Any, exc: BaseException) -> None:
        """The agent raised and is dead: readiness reports it, the gauge drops to 0."""
        self.agent_error = f"{type(exc).__name__}: {exc}"
        metrics.agent_up.labels(SERVICE, AGENT_NAME).set(0)
        logs.event(log, "agent_crashed", logging.CRITICAL, agent=AGENT_NAME, error=self.agent_error)

    def agent_failure(self) -> str | None:
        """Why the agent is not running, or None when it is."""
        if self.agent_error is not None:
            return self.agent_error
        agent = self.agent
        actors = list(getattr(agent, "_actors", []) or [])
        for actor in actors:
            task = getattr(actor, "actor_task", None)
            if task is not None and task.done() and not self._stopping:
                return "agent task ended"
        return None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): running, assigned and recovered, index rebuilt, agent alive."""
        app = self.app
        details: dict[str, Any] = {
            "worker": self.worker_name(),
            "partitions": sorted(self.active_partitions()),
        }
        failure = self.agent_failure()
        if failure is not None:
            metrics.agent_up.labels(SERVICE, AGENT_NAME).set(0)
            details["reason"] = f"agent stopped: {failure}"
            return False, details
        if self._stopping:
            details["reason"] = "stopping"
            return False, details
        if app.rebalancing_count == 0 or app.rebalancing:
            details["reason"] = "rebalancing"
            return False, details
        if not self.index_ready:
            details["reason"] = "recovering"
            return False, details
        return True, details

    def worker_name(self) -> str:
        return str(self.app.conf.canonical_url)

    def active_partitions(self) -> set[int]:
        """Partition numbers of the input topics this worker owns actively (not standby)."""
        try:
            actives = self.app.assignor.assigned_actives()
        except Exception:
            return set()
        return {tp.partition for tp in actives if tp.topic == self.topics.inbound}

    # -- recovery, timer, sweep -------------------------------------------------------------------
    async def rebuild_index(self) -> None:
        """After each recovery: one scan of this worker's partitions rebuilds the due index."""
        try:
            owned = self.active_partitions()
            self.index.clear()
            keys = [bytes(k) for k in self.customers]
            broken = 0
            for number, raw_key in enumerate(keys):
                key = raw_key.decode("utf-8", errors="replace")
                partition = customer_partition(key, self.partitions)
                if partition not in owned:
                    continue  # a standby's or a revoked partition's key (memory store)
                stored = self.customers.get(raw_key)
                if stored is None:
                    continue
                try:
                    state = cast(CustomerState, codec.decode("CustomerState", stored))
                except codec.CodecError:
                    broken += 1
                    continue
                self.index.update(key, partition, state, self.limits_for(key))
                if number % 500 == 499:
                    await asyncio.sleep(0)
            metrics.open_batches.set(self.index.open_count())
            # What exists now (the index, the app, the clients) lives as long as the worker: out of the
            # cyclic GC's walk, or every gen-2 collection walks it again (its pause grew with the table).
            # The price: a frozen object that later dies inside a reference cycle is never freed (a few
            # per rebalance; the index's entries hold no cycles and are freed when replaced or revoked).
            gc.freeze()
            self.index_ready = True
            logs.event(log, "index_rebuilt", partitions=sorted(owned), customers=len(self.index.entries),
                       pending=len(self.index.pending()), undecodable=broken)
        except Exception as exc:  # faust swallows exceptions of recovery callbacks: say it
            logs.event(log, "index_rebuild_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            raise

    def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        self.index_ready = False
        lost = {tp.partition for tp in revoked if tp.topic == self.topics.inbound}
        for partition in lost:  # read again from its commit by whoever gets it next
            self.inbound_read_up_to.pop(partition, None)
            for _, key in self._behind.pop(partition, []):
                self._parked.pop(key, None)
        if lost:
            self.index.keep_partitions({e.partition for e in self.index.entries.values()} - lost)

    async def flush_loop(self) -> None:
        """Flushes each batch at its due time, for as long as the app runs; never dies of an error.

        Sleeps until the index's earliest due time (at most FLUSH_SCAN_INTERVAL_SECONDS); the agent
        wakes it when it records an earlier one. Not ready (recovering): looks again after the
        longest sleep.
        """
        longest = self.settings.flush_scan_interval_seconds
        while not self.app.should_stop:
            self._flush_wakeup.clear()  # before reading the index: a wake-up after this is kept
            try:
                ready = await self.flush_tick()
            except Exception as exc:  # a crashed loop would stop every flush of this worker
                logs.event(log, "timer_error", logging.ERROR, timer="context-flush",
                           error=f"{type(exc).__name__}: {exc}")
                ready = False
            delay = flush_sleep(self.index.next_due_at(), utcnow(), longest) if ready else longest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wakeup.wait(), delay)

    async def flush_tick(self) -> bool:
        """Sends a `flush` command for every customer whose batch is due (read-only on the table).

        Returns False when the worker is not ready (nothing was looked at)."""
        if not self.readiness()[0]:
            return False
        now = utcnow()
        monotonic_now = time.monotonic()
        due: list[tuple[str, str, ContextCommand]] = []
        for key in self.index.due(now):
            entry = self.index.entries.get(key)
            if entry is None:
                continue
            # Judged as of the receive time up to which the agent has read the customer's partition
            # while it is behind: by the clock alone, every message it handles late would end its
            # batch's quiet window at once, and the burst's later messages (still unread) would be
            # split off into another batch — more work per message the further behind it is.
            judge = now
            watermark = self.inbound_watermark(entry.partition)
            overdue = entry.batch_due_at is not None \
                and now - entry.batch_due_at >= timedelta(seconds=BEHIND_MAX_WAIT_SECONDS)
            if watermark is not None and watermark < now and not overdue:
                if entry.batch_due_at is not None and entry.batch_due_at > watermark:
                    if self._parked.get(key) != entry.batch_due_at:  # waits there already: once is enough
                        self._parked[key] = entry.batch_due_at
                        waiting = self._behind.setdefault(entry.partition, [])
                        heapq.heappush(waiting, (entry.batch_due_at, key))
                    self.index.defer(key, now + timedelta(seconds=BEHIND_RECHECK_SECONDS))
                    continue
                judge = watermark
            stored = self.customers.get(key.encode("utf-8"))
            if stored is None:
                continue
            try:
                state = cast(CustomerState, codec.decode("CustomerState", stored))
                batch_id = domain.due_action(state, judge, self.limits_for(key))
            except Exception as exc:
                logs.event(log, "due_check_failed", logging.ERROR, customer=key,
                           error=f"{type(exc).__name__}: {exc}")
                self.index.defer(key, now + timedelta(seconds=RECHECK_SECONDS * 10))
                continue
            if batch_id is None:
                estimate = next_due(state, self.limits_for(key))
                later = now + timedelta(seconds=RECHECK_SECONDS)
                if estimate is not None:
                    self.index.defer(key, max(estimate, later))
                continue
            # still due until the agent handles the command: look again after the resend delay
            self.index.defer(key, now + timedelta(seconds=self.index.resend_after))
            if not self.index.should_send(key, batch_id, monotonic_now):
                continue
            batch = state["open_batch"]
            seen = len(batch["messages"]) if batch is not None and batch["batch_id"] == batch_id else None
            if batch is None and state["flushing_batch"] is None:  # a hold's end: no batch seen yet
                seen = 0
            due.append((key, batch_id, {
                "kind": "flush", "customer_key": key, "batch_id": batch_id, "issued_at": judge,
                "history": [], "history_error": None, "history_pages": 0, "actor": None,
                "batch_messages": seen,  # exactly these are flushed, whenever the command is handled
                # and the batch's human-agent block and hold see exactly these agent events and replies
                "agent_events": state.get("agent_events_handled", 0),
                "replies": state.get("replies_handled", 0),
                "opened_replies": (batch.get("opened_replies") if seen is not None and batch
                                   else state.get("replies_handled", 0) if seen == 0 else None),
                "inbound_messages": state.get("inbound_handled", 0),
            }))
        # All due flushes at once: awaiting each ack in turn stretched the tick with the load.
        results = await asyncio.gather(*(self.send_command(c) for _, _, c in due), return_exceptions=True)
        for (key, batch_id, _), result in zip(due, results, strict=True):
            if isinstance(result, KafkaError):
                logs.event(log, "flush_send_failed", logging.WARNING, customer=key,
                           error=type(result).__name__)
            elif isinstance(result, BaseException):
                raise result
            else:
                self.index.mark_sent(key, batch_id, monotonic_now)
        return True

    def _release_behind(self) -> None:
        """Batches that waited for the agent to read their partition far enough are looked at now."""
        if not self._behind:
            return
        now = utcnow()
        for partition, waiting in list(self._behind.items()):
            watermark = self.inbound_watermark(partition)
            while waiting and (watermark is None or waiting[0][0] <= watermark):
                due_at, key = heapq.heappop(waiting)
                if self._parked.get(key) == due_at:
                    del self._parked[key]
                self.index.defer(key, now)
            if not waiting:
                del self._behind[partition]

    def inbound_watermark(self, partition: int) -> datetime | None:
        """The receive time up to which the agent has handled this inbound partition's customer
        messages, while the partition has more to read (the consumer's last known end is past the
        agent's next offset); None when it has read all it knows of, or nothing says (no stream)."""
        seen = self.inbound_read_up_to.get(partition)
        return seen if seen is not None and self.inbound_behind(partition) else None

    def inbound_behind(self, partition: int) -> bool:
        """Whether the agent has records of this inbound partition still to read (as far as the
        consumer's last fetch knows)."""
        guard = self.ack_guard
        if guard is None:
            return False
        tp = TP(self.topics.inbound, partition)
        next_offset = guard.next_offset.get(tp)
        try:
            end = self.app.consumer.highwater(tp)
        except Exception:  # not assigned (any more): the clock decides, as before
            return False
        return next_offset is not None and end is not None and int(end) > next_offset

    async def lag_tick(self) -> None:
        """Exports `consumer_lag{service="context"}`: messages behind the end of the input topics.

        From the consumer's cached high-water marks (updated by every fetch) and the offsets the
        agent has read; partitions not yet read count from their committed offset.
        """
        if not self.readiness()[0]:
            return
        consumer = self.app.consumer
        sources = {self.topics.inbound, self.topics.agent_activity, self.topics.replies,
                   self.topics.context_commands}
        read = getattr(consumer, "_read_offset", {})
        committed = getattr(consumer, "_committed_offset", {})
        lag = 0
        for tp in consumer.assignment():
            if tp.topic not in sources:
                continue
            try:
                end: int | None = consumer.highwater(tp)
            except Exception:  # revoked meanwhile (a rebalance started): skip it this time
                end = None
            last_read = read.get(tp)
            position = last_read + 1 if last_read is not None else committed.get(tp)
            if end is not None and position is not None:
                lag += max(0, int(end) - int(position))
        metrics.consumer_lag.labels(SERVICE).set(lag)

    async def reconcile_tick(self) -> None:
        if not self.readiness()[0]:
            return
        now = utcnow()
        self.sweep.maybe_start(self.index.reconcile_candidates(now, self.settings.reconcile_window_seconds))


class EventPipeline:
    """Decides events as they come and completes them in a task of its own, in arrival order.

    The agent calls `accept` for each event: the state function runs and the effects are handed to
    the producer at once; the completion task takes whatever is queued as one chunk
    (`ContextRuntime.complete_chunk`: effects acked, states written, changelog acked, inputs acked).
    So the state function of the next events runs while the acks of the earlier ones are awaited,
    and nothing polls: an idle worker sleeps on the stream and on the queue.

    A failed completion stops everything: nothing after it is acked, and `accept` raises it (the
    agent dies, readiness says so; when stopping, the events are replayed after the restart).
    """

    def __init__(self, runtime: ContextRuntime, max_inflight: int = AGENT_INFLIGHT_MAX) -> None:
        self.runtime = runtime
        self.max_inflight = max_inflight
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(max_inflight)
        self._unwritten: dict[str, CustomerState] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventPipeline:
        self._task = asyncio.create_task(self._complete_forever(), name="context-completion")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def accept(self, item: Incoming) -> None:
        """Decides one event and queues it for completion (waits while `max_inflight` are queued)."""
        self._raise_if_failed()
        pending = await self.runtime.decide(item, self._unwritten)
        put = asyncio.ensure_future(self._queue.put(pending))
        assert self._task is not None
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():  # the completion task ended while the queue was full
            put.cancel()
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        task = self._task
        if task is None:
            raise RuntimeError("event pipeline is not running")
        if task.done():
            exc = None if task.cancelled() else task.exception()
            raise exc if exc is not None else RuntimeError("event completion stopped")

    async def _complete_forever(self) -> None:
        queue = self._queue
        while True:
            chunk = [await queue.get()]
            while len(chunk) < self.max_inflight and not queue.empty():
                chunk.append(queue.get_nowait())
            try:
                await self.runtime.complete_chunk(chunk, self._unwritten)
            except Exception as exc:
                logs.event(log, "completion_failed", logging.WARNING if self.runtime._stopping else
                           logging.ERROR, error=f"{type(exc).__name__}: {exc}", unacked=len(chunk))
                raise


class _InputReadOffsets(dict[Any, int | None]):
    """faust's read offsets, except that input partitions read as unknown to its fetch loop.

    faust's loop drops a record below a partition's read offset and records a jump above it as a
    gap its commit counts as acked; around a rebalance its read offset is overwritten by records of
    the old generation, so records read again after a seek were dropped, later ones delivered out of
    order, and the jump committed. For input topics `AckGuard.admit` keeps the order instead.
    """

    def __init__(self, input_topics: frozenset[str]) -> None:
        super().__init__()
        self.input_topics = input_topics

    def __missing__(self, tp: Any) -> None:
        return None

    def __getitem__(self, tp: Any) -> int | None:
        if tp.topic in self.input_topics:
            return None
        return super().__getitem__(tp)


class AckGuard:
    """Keeps faust from committing past, or the agent from handling out of order, input records.

    faust's commit trusts that every offset below an acked one was handled, and its fetch loop that
    records come in order; the context drill broke both through several paths, all around
    rebalances: records skipped in the stream and acked on the way (old consumer generation, flow
    control suspended), no seek at all for a partition without a committed offset (aiokafka seeks
    only to an offset > 0), a read offset overwritten after a seek (records read again dropped,
    later ones delivered), jumps of the read offset committed as gaps, and a hole of one message let
    through at the head. So, for the input topics:
    - the agent handles each partition's records strictly in offset order from where the last seek
      put it (`admit`): a record after a hole is skipped (never committable) and the partition is
      sought back to the hole; one handled already since the seek is skipped; faust's own read
      offsets are kept out of the way (`_InputReadOffsets`: nothing dropped, no gaps);
    - a partition never committed is sought to its first offset;
    - an ack faust makes of a record the agent did not get marks it done but is never committable;
    - a commit goes through only when the acked offsets start exactly at the committed one (or,
      before the first commit, at the first offset read); a hole at the head holds it until the
      record is handled, and one not admitted again within `hole_patience_seconds` makes the
      partition be read again from the committed offset (a replay is safe: event times, flush
      counts, dedupe).
    """

    def __init__(self, app: faust.App, input_topics: Iterable[str] = (),
                 *, hole_patience_seconds: float = HOLE_PATIENCE_SECONDS, reread_retry_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.input_topics = frozenset(input_topics)
        self.hole_patience_seconds = hole_patience_seconds
        self.reread_retry_seconds = reread_retry_seconds
        self.clock = clock
        self.delivered: weakref.WeakSet[Any] = weakref.WeakSet()
        self.skipped: dict[Any, set[int]] = {}  # tp -> offsets acked by faust, not handled
        self.first_offsets: dict[Any, int] = {}  # tp without a commit -> where reading started
        self.next_offset: dict[Any, int] = {}  # tp -> the offset the agent handles next
        self.hole_since: dict[Any, tuple[int, float]] = {}  # tp -> (missing offset, first seen)
        self.reread_at: dict[Any, float] = {}  # tp -> when a partition was last sought back to a hole
        self.out_of_order = 0  # records skipped by `admit` (after a hole, or handled already)
        self.rereads = 0
        consumer: Any = app.consumer  # private parts: pinned faust, tests/unit/test_context_chunks.py
        self._record_ack = consumer.ack
        self._new_offset = consumer._new_offset
        self._seek_to_committed = consumer.seek_to_committed
        self._seek = consumer.seek
        consumer.ack = self.ack
        consumer._new_offset = self.new_offset
        consumer.seek_to_committed = self.seek_to_committed
        consumer.seek = self.seek
        read_offsets = _InputReadOffsets(self.input_topics)
        read_offsets.update(consumer._read_offset)
        consumer._read_offset = read_offsets
        self.consumer = consumer

    async def admit(self, message: Any) -> bool:
        """Whether the agent handles `message` now: only its partition's next record is; it is then
        marked delivered (its ack may be committed). Any other is skipped: after a hole, the
        partition is read again from the hole."""
        tp, offset = message.tp, message.offset
        expected = self.next_offset.get(tp)
        if expected is None:  # no seek since the partition came (or came back): start at the commit
            expected = self.expected_offset(tp)
            if expected is not None:
                self.next_offset[tp] = expected
        if expected is not None and offset == expected:
            self.next_offset[tp] = offset + 1
            self.delivered.add(message)
            return True
        self.out_of_order += 1
        message.acked = True  # faust waits for no ack of it
        self.consumer._unacked_messages.discard(message)
        if expected is None:  # nothing says where its reading starts: read from the committed offsets
            self.skipped.setdefault(tp, set()).add(offset)
            await self._seek_all_to_committed()
        elif offset > expected:  # never handled: no commit may pass it before it is
            self.skipped.setdefault(tp, set()).add(offset)
            await self._reread(tp, expected)
        return False

    async def _seek_all_to_committed(self) -> None:
        now = self.clock()
        if now - self.reread_at.get(None, -self.reread_retry_seconds) < self.reread_retry_seconds:
            return
        self.reread_at[None] = now
        self.rereads += 1
        logs.event(log, "input_reread", logging.WARNING, topic="*", partition=-1, from_offset=-1)
        try:
            await self.consumer.perform_seek()
        except Exception as exc:  # mid-rebalance: the assignment's own seek comes next
            logs.event(log, "input_reread_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")

    def deliver(self, message: Any) -> None:
        """`message` reached the agent outside `admit` (tests): its ack may be committed."""
        self.delivered.add(message)

    async def _reread(self, tp: Any, offset: int) -> None:
        now = self.clock()
        last = self.reread_at.get(tp)
        if last is not None and now - last < self.reread_retry_seconds:
            return  # the seek is on its way: records fetched before it still pass by
        self.reread_at[tp] = now
        self.rereads += 1
        logs.event(log, "input_reread", logging.WARNING, topic=tp.topic, partition=tp.partition,
                   from_offset=offset)
        await self.seek(tp, offset)

    def ack(self, message: Any) -> bool:
        generation = getattr(message, "generation_id", None)
        stale = generation is not None and generation != self.app.consumer_generation_id
        if stale or message not in self.delivered:
            self.skipped.setdefault(message.tp, set()).add(message.offset)
            message.acked = True
            self.consumer._unacked_messages.discard(message)
            return False
        holes = self.skipped.get(message.tp)
        if holes:
            holes.discard(message.offset)
        recorded = bool(self._record_ack(message))
        self.consumer._unacked_messages.discard(message)  # also a record read again, acked before
        return recorded

    async def seek(self, tp: Any, offset: int) -> None:
        """faust's seek; the agent handles `tp`'s records from `offset` on."""
        await self._seek(tp, offset)
        if tp.topic in self.input_topics:
            self.next_offset[tp] = offset

    async def seek_to_committed(self) -> Mapping[Any, int]:
        """faust's seek, plus a seek to the first offset for input partitions never committed."""
        committed = await self._seek_to_committed()
        inputs = {tp: offset for tp, offset in committed.items() if tp.topic in self.input_topics}
        fresh = [tp for tp, offset in inputs.items() if not offset]
        self.first_offsets = {}
        self.hole_since.clear()
        self.reread_at.clear()
        self.next_offset = {tp: int(offset) for tp, offset in inputs.items() if offset}
        if fresh:
            earliest = await self.consumer.earliest_offsets(*fresh)
            for tp in fresh:
                first = int(earliest.get(tp) or 0)
                await self.seek(tp, first)
                self.first_offsets[tp] = first
        return committed

    def forget(self, revoked: Iterable[Any]) -> None:
        """Partitions taken away: the next assignment's seek says where reading starts again."""
        for tp in revoked:
            self.next_offset.pop(tp, None)
            self.first_offsets.pop(tp, None)
            self.hole_since.pop(tp, None)
            self.reread_at.pop(tp, None)

    def expected_offset(self, tp: Any) -> int | None:
        """The offset the next commit must start at: the committed one, or the first read."""
        committed = self.consumer._committed_offset.get(tp)
        return int(committed) if committed is not None else self.first_offsets.get(tp)

    def new_offset(self, tp: Any) -> int | None:
        """faust's next commit offset for `tp`, or None while a record before it is unhandled."""
        acked = self.consumer._acked[tp]
        if not acked:
            return None
        committed = self.consumer._committed_offset[tp]
        holes = self.skipped.get(tp)
        if holes:
            holes.difference_update({h for h in holes if committed is not None and h < committed})
        head = min(acked)
        skipped_first = min(holes) if holes and min(holes) < head else None
        if tp.topic in self.input_topics:
            expected = self.expected_offset(tp)
            missing = expected if expected is not None and head > expected else skipped_first
            if missing is not None:
                self._note_hole(tp, missing)
                return None
            self.hole_since.pop(tp, None)
        elif skipped_first is not None:
            return None
        result = self._new_offset(tp)
        return None if result is None else int(result)

    def _note_hole(self, tp: Any, missing: int) -> None:
        """A hole at the head: wait while the record is on its way; if it is not, read it again."""
        now = self.clock()
        seen = self.hole_since.get(tp)
        if seen is None or seen[0] != missing:
            self.hole_since[tp] = (missing, now)
            return
        admitted = self.next_offset.get(tp, missing) > missing and missing not in self.skipped.get(tp, ())
        if admitted or now - seen[1] < self.hole_patience_seconds:
            return  # in the pipeline
        self.hole_since.pop(tp, None)
        self.app.loop.create_task(self._reread(tp, missing))


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip()]


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """faust's form of `kafka.client_security(settings)`: its consumers, producer and admin use it."""
    security = kafka.client_security(settings)
    protocol = security.get("security_protocol", "PLAINTEXT")
    if protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=security["sasl_plain_username"], password=security["sasl_plain_password"],
            mechanism=security["sasl_mechanism"], ssl_context=security.get("ssl_context"),
        )
    if protocol == "SSL":
        return faust.SSLCredentials(security["ssl_context"])
    return None


def _web_host(bind: str) -> str:
    """The host peers use to reach this worker's views (table routing); a wildcard bind → hostname."""
    return socket.gethostname() if bind in ("0.0.0.0", "::", "") else bind


def create_app(settings: Settings, *, table_standby_replicas: int = 1) -> ContextApp:
    """Builds the context service's faust app (no module-level app: tests build their own).

    `table_standby_replicas` (faust's default 1): workers keep a warm copy of other workers'
    partitions, so a takeover after a crash needs no full changelog replay.
    """
    if settings.context_store not in ("memory", "rocksdb"):
        raise ConfigError(f"CONTEXT_STORE must be rocksdb or memory, got {settings.context_store!r}")
    codec.register_faust_codec()
    store = "memory://" if settings.context_store == "memory" else "rocksdb://"
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    session = float(settings.broker_session_timeout_seconds)
    app = ContextApp(
        f"{settings.topic_prefix}{SERVICE}",
        broker=_broker_urls(settings.kafka_bootstrap_servers),
        broker_credentials=broker_credentials(settings),
        store=store,
        datadir=str(Path(settings.data_dir) / f"context-{settings.context_web_port}"),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        table_standby_replicas=table_standby_replicas,
        Table=ChangelogTrackingTable,  # awaitable changelog sends (see the class)
        broker_session_timeout=session,
        broker_heartbeat_interval=max(0.5, session / 3.5),
        web_bind=settings.context_web_host,
        web_host=_web_host(settings.context_web_host),
        web_port=settings.context_web_port,
        web_tables_enabled=False,  # the built-in /table/ endpoints would expose customer data
        web_router_enabled=False,  # /router/ exposes the cluster; @table_route works without it
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        autodiscover=False,
    )
    runtime = ContextRuntime(app, settings, settings.topic_partitions)
    app.runtime = runtime
    topics = runtime.topics
    guard = runtime.ack_guard = AckGuard(
        app, (topics.inbound, topics.agent_activity, topics.replies, topics.context_commands))
    source = app.topic(
        topics.inbound, topics.agent_activity, topics.replies, topics.context_commands,
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=settings.topic_partitions,
    )

    async def context_events(stream: faust.StreamT[bytes]) -> None:
        runtime.agent_error = None  # (re)started by faust's supervisor: alive again
        metrics.agent_up.labels(SERVICE, AGENT_NAME).set(1)
        # faust acks nothing by itself (its StreamT does not declare noack): the pipeline acks each event
        manual = cast(Any, stream).noack()
        runtime.acker = manual.ack
        async with EventPipeline(runtime) as pipeline:
            async for event in manual.events():
                if not await guard.admit(event.message):
                    continue
                await pipeline.accept(Incoming(
                    cast(bytes | None, event.key), cast(bytes | None, event.value), event.message.topic,
                    event.message.partition, event.message.offset, event))

    runtime.agent = app.agent(source, name=AGENT_NAME, concurrency=1)(context_events)
    runtime.customers.on_recover(runtime.rebuild_index)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", ())
        guard.forget(revoked)
        runtime.on_partitions_revoked(revoked)

    def guarded(tick: Callable[[], Awaitable[None]], name: str) -> Callable[[], Awaitable[None]]:
        async def run_tick() -> None:  # an exception would end the timer for good: log and go on
            try:
                await tick()
            except Exception as exc:
                logs.event(log, "timer_error", logging.ERROR, timer=name,
                           error=f"{type(exc).__name__}: {exc}")

        run_tick.__name__ = run_tick.__qualname__ = name.replace("-", "_")
        return run_tick

    app.task(runtime.flush_loop)

    @app.task
    async def watch_the_loop() -> None:
        await watch_loop_lag(SERVICE)

    app.timer(interval=LAG_INTERVAL_SECONDS, name="context-lag")(guarded(runtime.lag_tick, "context-lag"))
    if settings.reconcile_interval_seconds > 0:
        app.timer(interval=settings.reconcile_interval_seconds, name="context-reconcile")(
            guarded(runtime.reconcile_tick, "context-reconcile"))

    from services.context.views import register_views

    register_views(app, runtime)
    return app

