"""The console's consumer: the topics it shows, in its own group, into its store.

`apply_records` (synchronous, no Kafka) decodes a polled batch and writes it and the next offsets
in one store transaction. `ConsoleConsumer` is the thin shell: group `<prefix>console`, positions
taken from the store on assignment (the store's offsets win over the group's: they were written
with the rows), and the store's emptiness means "from the beginning" — the rebuild. The group's
offsets are committed too, so its lag shows in the usual tools.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from services.common import codec, logs, metrics
from services.common.config import Settings
from services.common.kafka import Topics, make_consumer
from services.common.records import (
    AgentActivity,
    AssistantReply,
    BatchDecision,
    ContextCommand,
    DeadLetter,
    DeadLetterReplay,
    InboundMessage,
    ResponderRequest,
)
from services.responder.prompt import Labels

from . import rows
from .store import Store

log = logging.getLogger(__name__)
SERVICE = "console"


class Polled(NamedTuple):
    """One record as the shell hands it over: where it was and its raw value (a tuple: one is made
    per record, and the catch-up after a rebuild makes millions)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


def console_topics(topics: Topics) -> list[str]:
    return [topics.audit, topics.inbound, topics.agent_activity, topics.replies,
            topics.responder_requests, topics.dead_letter, topics.context_commands,
            topics.dead_letter_replays]


@dataclass
class Prepared:
    """A polled batch decoded and mapped to rows, ready to write: `ops` in record order (kind,
    row), the decisions apart (they are written in bulk), the next positions, counts by outcome."""

    ops: list[tuple[str, rows.Row]] = field(default_factory=list)
    decisions: list[rows.Row] = field(default_factory=list)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)


# Records whose row mapping only turns times into epoch milliseconds: decoded with their times
# left as those integers (no datetime made and taken apart again). A ResponderRequest's times are
# formatted into the human-agent block, exactly as the responder does: decoded as datetimes.
RAW_TIMESTAMPS = frozenset({"BatchDecision", "AssistantReply", "InboundMessage", "AgentActivity",
                            "ContextCommand", "DeadLetter", "DeadLetterReplay"})


def prepare_records(polled: Iterable[Polled], topics: Topics, labels: Labels) -> Prepared:
    """Decodes and maps a batch (pure: no store); an undecodable record is counted and skipped."""
    out = Prepared()
    decode = codec.decode_any_fast
    for rec in polled:
        out.positions[(rec.topic, rec.partition)] = rec.offset + 1
        try:
            name, value = decode(rec.value, raw_timestamps=RAW_TIMESTAMPS)
        except codec.CodecError:
            out.counts["undecodable"] += 1
            continue
        out.counts[name] += 1
        if name == "BatchDecision":
            out.decisions.append(rows.decision_row(cast(BatchDecision, value)))
        elif name == "ResponderRequest":
            out.ops.append(("request", rows.request_row(cast(ResponderRequest, value), labels)))
        elif name == "AssistantReply":
            out.ops.append(("reply", rows.reply_row(cast(AssistantReply, value))))
        elif name == "InboundMessage":
            out.ops.append(("inbound", rows.inbound_row(cast(InboundMessage, value), labels)))
        elif name == "AgentActivity":
            out.ops.append(("agent", rows.agent_row(cast(AgentActivity, value))))
        elif name == "DeadLetter" and rec.topic == topics.dead_letter:
            letter = cast(DeadLetter, value)
            out.ops.append(("dead_letter", rows.dead_letter_row(letter, rec.partition, rec.offset)))
        elif name == "DeadLetterReplay" and rec.topic == topics.dead_letter_replays:
            out.ops.append(("replay", rows.replay_row(cast(DeadLetterReplay, value))))
        elif name == "ContextCommand" and (row := rows.command_row(cast(ContextCommand, value))):
            out.ops.append(("command", row))
        else:
            out.counts["ignored"] += 1
    return out


def write_prepared(store: Store, prepared: Prepared) -> None:
    """Writes the rows and the next positions in one transaction."""
    apply = {"request": store.apply_request, "reply": store.apply_reply, "inbound": store.apply_inbound,
             "agent": store.apply_agent, "dead_letter": store.apply_dead_letter,
             "command": store.apply_command, "replay": store.apply_replay}
    with store.transaction():
        for kind, row in prepared.ops:
            apply[kind](row)
        store.apply_decisions(prepared.decisions)  # the bulk of the topics, in few statements
        store.set_offsets(prepared.positions)


def apply_records(store: Store, polled: Iterable[Polled], topics: Topics, labels: Labels) -> Counter[str]:
    """Decodes, maps and writes a batch with its next positions atomically; counts by outcome."""
    prepared = prepare_records(polled, topics, labels)
    write_prepared(store, prepared)
    return prepared.counts


# -- decoding in worker processes -------------------------------------------------------------------
# Decoding and mapping are pure Python (~15 µs a decision): in the event loop's process they share
# one core with the fetches and the SQLite writes. Worker processes (spawned: no copy of the loop or
# of the store's connections) take the raw values and hand back the rows; the writes stay in this
# process, in order, one transaction per polled batch.

_worker: tuple[Topics, Labels] | None = None


def _init_worker(topics: Topics, labels: Labels) -> None:
    global _worker
    _worker = (topics, labels)


def _prepare_in_worker(polled: list[Polled]) -> Prepared:
    assert _worker is not None
    return prepare_records(polled, *_worker)


def default_decode_workers() -> int:
    """None by default: decoding runs in a thread of the console's process. Worker processes
    (`decode_workers`, one per core beyond the first pays off only on an idle machine) gained little
    here (BENCHMARKS section 7), and a console SIGKILLed with spawned workers did not come back
    ready in the SIGKILL drill."""
    return 0


# a polled batch being decoded: (its rows to come, how many records, the group offsets, the records)
InFlight = tuple["asyncio.Future[Prepared]", int, dict[TopicPartition, Any], list[Polled]]


class _Seeker(ConsumerRebalanceListener):
    def __init__(self, shell: ConsoleConsumer) -> None:
        self.shell = shell

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.shell.seek_assigned(list(assigned))


class ConsoleConsumer:
    """Polls the console's topics into the store until stopped."""

    def __init__(self, settings: Settings, store: Store, labels: Labels, *, max_records: int = 2000,
                 decode_workers: int | None = None) -> None:
        self.settings = settings
        self.decode_workers = default_decode_workers() if decode_workers is None else decode_workers
        self.pool: ProcessPoolExecutor | None = None
        self.store = store
        self.labels = labels
        self.topics = Topics.from_settings(settings)
        self.max_records = max_records
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        self.assigned = False
        self.applied = 0
        self.writing: asyncio.Task[None] | None = None
        self._consumed = metrics.Children(metrics.console_records_total)

    async def seek_assigned(self, partitions: list[TopicPartition]) -> None:
        assert self.consumer is not None
        stored = self.store.offsets()
        for tp in partitions:
            # No stored position: from offset 0, which is the beginning (an offset below the log's
            # start is out of range, and `auto_offset_reset="earliest"` moves it to the first one
            # kept). Not `seek_to_beginning`: it awaits an offset lookup inside the rebalance, and on
            # topics created a moment before that lookup failed once (leader not known yet) and
            # kept the console unready ~16 s.
            self.consumer.seek(tp, stored.get((tp.topic, tp.partition), 0))
        self.assigned = True
        logs.event(log, "console_assigned", partitions=len(partitions), rebuild=not stored)

    async def start(self) -> None:
        session_ms = int(self.settings.broker_session_timeout_seconds * 1000)
        self.consumer = make_consumer(
            self.settings,  # with the cluster's SASL/TLS settings
            group_id=f"{self.settings.topic_prefix}console",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, session_ms // 3),
            max_poll_records=self.max_records,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        if self.decode_workers > 0:
            self.pool = ProcessPoolExecutor(
                self.decode_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.topics, self.labels))
        self.consumer.subscribe(console_topics(self.topics), listener=_Seeker(self))
        await self.consumer.start()
        metrics.agent_up.labels(SERVICE, "console").set(1)
        self.task = asyncio.create_task(self._loop(), name="console-consumer")

    async def _loop(self) -> None:
        """Fetch; decode in the worker processes (or a thread without them), several batches at a
        time; write each in turn in a worker thread (SQLite releases the GIL while it works)."""
        assert self.consumer is not None
        loop = asyncio.get_running_loop()
        in_flight: collections.deque[InFlight] = collections.deque()
        most = 2 * max(1, self.decode_workers)
        while True:
            try:
                batches = await self.consumer.getmany(
                    timeout_ms=0 if in_flight else 500, max_records=self.max_records)
            except KafkaError as exc:  # a broker outage: aiokafka reconnects; keep asking
                logs.event(log, "console_fetch_failed", logging.WARNING, error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            polled = [Polled(tp.topic, tp.partition, r.offset, r.value)
                      for tp, records in batches.items() for r in records]
            if polled:
                commit = {tp: OffsetAndMetadata(records[-1].offset + 1, "")
                          for tp, records in batches.items() if records}
                if self.pool is not None:
                    prepared = loop.run_in_executor(self.pool, _prepare_in_worker, polled)
                else:
                    prepared = asyncio.ensure_future(
                        asyncio.to_thread(prepare_records, polled, self.topics, self.labels))
                in_flight.append((prepared, len(polled), commit, polled))
            # write, in order, what is decoded: all of it when nothing more came, else enough to
            # keep at most `most` batches decoding
            while in_flight and (not polled or len(in_flight) > most or in_flight[0][0].done()):
                future, count, commit, polled_batch = in_flight.popleft()
                try:
                    ready = await future
                except BrokenProcessPool:  # a worker died (killed, out of memory): decode here now on
                    logs.event(log, "console_decode_workers_lost", logging.WARNING)
                    if self.pool is not None:
                        self.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = None
                    ready = await asyncio.to_thread(prepare_records, polled_batch, self.topics, self.labels)
                if self.writing is not None:
                    # one write at a time, in order; shielded: a stop cancelling this loop here must
                    # not cancel the write (`stop` waits for it)
                    await asyncio.shield(self.writing)
                self.writing = asyncio.create_task(self._write(ready, count, commit))

    async def _write(self, prepared: Prepared, count: int, commit: dict[TopicPartition, Any]) -> None:
        # the thread cannot be stopped: a cancel here waits for its transaction (rows and positions
        # together) to end, so the write is counted and the store is never closed under it
        writing = asyncio.ensure_future(asyncio.to_thread(write_prepared, self.store, prepared))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await writing
            raise
        self.applied += count
        for name, n in prepared.counts.items():
            self._consumed(name).inc(n)
        if self.consumer is not None:
            with contextlib.suppress(Exception):  # informative only: the store holds the positions
                await self.consumer.commit(commit)

    def ready(self) -> tuple[bool, str]:
        if self.task is None:
            return False, "not started"
        if self.task.done():
            return False, "consumer stopped"
        if not self.assigned:
            return False, "waiting for a partition assignment"
        return True, "ok"

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None
        if self.pool is not None:  # batches still decoding are dropped: their positions were not written
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self.writing is not None:  # a write under way finishes (its thread cannot be cancelled)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.writing
            self.writing = None
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            self.consumer = None
        metrics.agent_up.labels(SERVICE, "console").set(0)
