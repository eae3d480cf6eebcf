"""The responder's durable per-customer record: conversation id and recent batches' progress.

Stored in the COMPACTED topic `responder_state`, keyed by customer, one `ResponderState` per write.
Every responder process reads the whole topic from the beginning (no group, all partitions) into a
dict and follows it, so a customer that moves to another worker on a rebalance brings its
conversation and its answered batches along: the new owner waits (`catch_up`) until it has read
up to the end offsets of the moment it got the partitions.

Writes are write-ahead: `put` returns only after the broker acked, and the local copy is updated
from the ack. The reader may still be behind its own writes, so each key remembers the offset of
the state it holds and the reader never applies an older one over a newer one.

Memory: every process holds every customer's record. Records are bounded (`MAX_BATCHES` batch
entries; reply texts are kept only for the `KEEP_TEXTS` newest sent batches, and always for a
batch that is generated but not yet sent, which is the one text a restart needs).

Claims (the fence of issue 13, point 4; the worker's docstring says how they are used): each
handling of a batch writes a claim `{batch_id, owner}` with the customer's state before it calls
OpenAI; `owner` is unique per handling. All records of a customer go to one partition, so the
broker orders every claim. The store remembers, per customer, where each (batch, owner) claim FIRST
appeared, whether it read the record or got the ack of its own write; `claimant(key, batch)` is the
owner whose claim appeared LAST: the newest handler wins, so the worker that holds the partition now
can always take a batch over from one that lost it. A stale worker's later writes repeat its own
older claim, so they never make it the claimant again.

Holds (one OpenAI call per batch): a claim carries `expires_at`, until when it holds another worker
off the batch (that worker waits for the batch to be `sent` instead of calling OpenAI again). The
store keeps, per (batch, owner), the `expires_at` of the claim's LATEST record: the claimant renews
it with `generated` (for the send) and ends it early when it gives the batch up (release).
`wait_for_claim` is the pure rule; `wait_change` wakes a waiter on the customer's next record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from ..common import codec
from ..common.config import Settings
from ..common.kafka import Topics, make_consumer
from ..common.logs import event
from ..common.records import BatchClaim, BatchProgress, ResponderState
from ..common.timeparse import utcnow

log = logging.getLogger(__name__)

MAX_BATCHES = 20
KEEP_TEXTS = 5
#: claims remembered per customer (the oldest go first); a handler whose claim is forgotten is fenced
MAX_CLAIMS = 8
#: the producers' partitioner (`make_producer` keeps aiokafka's default): a key's partition
_PARTITIONER = DefaultPartitioner()


def empty_state(customer_key: str) -> ResponderState:
    return {"customer_key": customer_key, "conversation_id": None, "batches": [], "updated_at": utcnow()}


def find_batch(state: ResponderState, batch_id: str) -> BatchProgress | None:
    for progress in state["batches"]:
        if progress["batch_id"] == batch_id:
            return progress
    return None


def with_progress(
    state: ResponderState, progress: BatchProgress, now: datetime | None = None
) -> ResponderState:
    """A new state with `progress` replacing the batch's entry (moved to the end), bounded.

    Pure. The oldest entries go first beyond MAX_BATCHES; texts of sent batches older than the
    KEEP_TEXTS newest are dropped (never the text of a generated-but-unsent batch).
    """
    batches = [b for b in state["batches"] if b["batch_id"] != progress["batch_id"]]
    batches.append(progress)
    batches = batches[-MAX_BATCHES:]
    sent_seen = 0
    pruned: list[BatchProgress] = []
    for entry in reversed(batches):
        if entry["status"] == "sent":
            sent_seen += 1
            if sent_seen > KEEP_TEXTS and entry["text"]:
                entry = cast(BatchProgress, {**entry, "text": ""})
        pruned.append(entry)
    pruned.reverse()
    return {**state, "batches": pruned, "updated_at": now or utcnow()}


def with_claim(state: ResponderState, claim: BatchClaim, now: datetime | None = None) -> ResponderState:
    """A new state carrying `claim` (pure): written before a batch's OpenAI call and send."""
    return {**state, "claim": claim, "updated_at": now or utcnow()}


def note_claim(claims: dict[tuple[str, str], int], offset: int, claim: BatchClaim | None) -> None:
    """Records where a (batch, owner) claim first appeared (pure bookkeeping on `claims`, bounded)."""
    if claim is None:
        return
    ident = (claim["batch_id"], claim["owner"])
    seen = claims.get(ident)
    if seen is not None and seen <= offset:
        return
    claims[ident] = offset
    while len(claims) > MAX_CLAIMS:
        del claims[min(claims, key=claims.__getitem__)]


def claimant_of(claims: dict[tuple[str, str], int], batch_id: str) -> str | None:
    """The owner whose claim on `batch_id` appeared last (the newest handler), None if unknown."""
    owners = [(offset, owner) for (batch, owner), offset in claims.items() if batch == batch_id]
    return max(owners)[1] if owners else None


def note_hold(holds: dict[tuple[str, str], tuple[int, datetime | None]], offset: int,
              claim: BatchClaim | None) -> None:
    """Records the `expires_at` of a (batch, owner) claim's LATEST record (pure bookkeeping, bounded
    like `note_claim`): a renewal or a release replaces the claim's first hold."""
    if claim is None:
        return
    ident = (claim["batch_id"], claim["owner"])
    seen = holds.get(ident)
    if seen is not None and seen[0] > offset:
        return
    holds[ident] = (offset, claim.get("expires_at"))
    while len(holds) > MAX_CLAIMS:
        del holds[min(holds, key=lambda i: holds[i][0])]


def wait_for_claim(
    progress: BatchProgress | None, claimant: str | None, expires_at: datetime | None, now: datetime
) -> float:
    """Pure: how long a worker about to answer a batch waits for another handling's claim (0: go on).

    It waits while the newest claim on the batch is another's, the batch is not `sent` and the
    claim holds (`expires_at` after `now`): that handling is calling OpenAI or sending, and one
    call is enough. A `sent` batch, a released or expired claim, or one without a hold (an older
    version's) does not hold anyone off. The caller's own claim is written only after this."""
    if claimant is None or expires_at is None:
        return 0.0
    if progress is not None and progress["status"] == "sent":
        return 0.0
    return max(0.0, (expires_at - now).total_seconds())


def with_conversation(
    state: ResponderState, conversation_id: str, now: datetime | None = None
) -> ResponderState:
    return {**state, "conversation_id": conversation_id, "updated_at": now or utcnow()}


class StateStore:
    """Reads the compacted state topic into memory and writes through it (see module docstring)."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, topics: Topics | None = None) -> None:
        self.settings = settings
        self.producer = producer
        self.topics = topics or Topics.from_settings(settings)
        self.topic = self.topics.responder_state
        self._states: dict[str, tuple[int, ResponderState]] = {}
        self._claims: dict[str, dict[tuple[str, str], int]] = {}
        self._holds: dict[str, dict[tuple[str, str], tuple[int, datetime | None]]] = {}
        #: customers someone waits on (`wait_change`): set when a record of theirs is applied
        self._changes: dict[str, asyncio.Event] = {}
        #: customers whose claim is being written: (base offset, records read above it)
        self._watches: dict[str, tuple[int, list[tuple[int, ResponderState]]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._initial_done = False
        self._failed: str | None = None

    async def start(self) -> None:
        """Starts the reader (from the beginning of every partition); see `wait_ready`."""
        self._consumer = make_consumer(
            self.settings,
            enable_auto_commit=False, auto_offset_reset="earliest", group_id=None,
        )
        await self._consumer.start()
        # the producer's public metadata call waits until the topic's partitions are known
        partitions = await self.producer.partitions_for(self.topic)
        if not partitions:
            raise RuntimeError(f"state topic {self.topic} has no partitions (was it created?)")
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._read_loop(), name="responder-state-reader")
        self._task.add_done_callback(self._reader_ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        self._consumer = None

    def ready(self) -> tuple[bool, str]:
        if self._failed:
            return False, f"state reader stopped: {self._failed}"
        if not self._initial_done:
            return False, "reading responder state"
        return True, "ok"

    async def wait_ready(self) -> None:
        """Returns once the reader has read everything that was in the topic when this was called."""
        await self.catch_up()
        self._initial_done = True

    async def catch_up(self, customer_key: str | None = None) -> None:
        """Waits until the reader reached the end offsets of this moment (used on partition
        assignment), of the customer's partition only when one is given."""
        assert self._consumer is not None
        partitions = self._partitions if customer_key is None else [self.partition_of(customer_key)]
        targets = await self._consumer.end_offsets(partitions)
        while True:
            if self._failed:
                raise RuntimeError(f"state reader stopped: {self._failed}")
            if all(self._positions.get(tp, -1) >= end for tp, end in targets.items()):
                return
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), 1.0)

    def partition_of(self, customer_key: str) -> TopicPartition:
        """The partition the producer writes this customer's records to (its default partitioner)."""
        ids = [tp.partition for tp in self._partitions]
        return TopicPartition(self.topic, _PARTITIONER(customer_key.encode(), ids, ids))

    def get(self, customer_key: str) -> ResponderState | None:
        held = self._states.get(customer_key)
        return held[1] if held else None

    def claimant(self, customer_key: str, batch_id: str) -> str | None:
        """The owner of the newest claim on this batch seen so far (see module docstring)."""
        return claimant_of(self._claims.get(customer_key, {}), batch_id)

    def hold(self, customer_key: str, batch_id: str) -> tuple[str | None, datetime | None]:
        """The newest claimant of the batch and until when its claim holds (latest record's)."""
        claimant = self.claimant(customer_key, batch_id)
        if claimant is None:
            return None, None
        held = self._holds.get(customer_key, {}).get((batch_id, claimant))
        return claimant, held[1] if held is not None else None

    async def wait_change(self, customer_key: str, timeout: float) -> None:
        """Returns when a record of the customer is applied (read or own write), or after `timeout`."""
        change = self._changes.setdefault(customer_key, asyncio.Event())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), timeout)
        finally:
            if self._changes.get(customer_key) is change:
                del self._changes[customer_key]
        if self._failed:
            raise RuntimeError(f"state reader stopped: {self._failed}")

    def watch(self, customer_key: str) -> ResponderState | None:
        """The customer's state to base a claim on; from now on the reader keeps every record of
        the customer above it, for `written_between` (a writer that read the topic to its end may
        still miss a record landing before its own write)."""
        held = self._states.get(customer_key)
        self._watches[customer_key] = (held[0] if held else -1, [])
        return held[1] if held else None

    def written_between(self, customer_key: str, own_offset: int) -> ResponderState | None:
        """Ends the watch: the newest state written by another between the base and our own write at
        `own_offset` (call after `read_past` of that write), or None when there was none."""
        base, seen = self._watches.pop(customer_key, (-1, []))
        between = [(offset, state) for offset, state in seen if base < offset < own_offset]
        return max(between, key=lambda item: item[0])[1] if between else None

    def __len__(self) -> int:
        return len(self._states)

    async def read_past(self, written: TopicPartition, offset: int) -> None:
        """Waits until the reader has read `written` beyond `offset` (typically one's own write): it
        has then seen every record the broker ordered before that write, without asking the broker
        for end offsets (the fence's check after a write, see the worker)."""
        while self._positions.get(written, -1) <= offset:
            if self._failed:
                raise RuntimeError(f"state reader stopped: {self._failed}")
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), 1.0)

    async def put(self, state: ResponderState) -> tuple[TopicPartition, int]:
        """Writes the customer's new state and waits for the broker's ack (then it is the local copy);
        returns where it was written."""
        key = state["customer_key"]
        metadata = await self.producer.send_and_wait(
            self.topic, codec.encode("ResponderState", cast(dict[str, Any], state)), key=key.encode()
        )
        self._apply(key, int(metadata.offset), state)
        return TopicPartition(self.topic, int(metadata.partition)), int(metadata.offset)

    def _apply(self, key: str, offset: int, state: ResponderState | None) -> None:
        if state is not None and state.get("claim") is not None:
            note_claim(self._claims.setdefault(key, {}), offset, state.get("claim"))
            note_hold(self._holds.setdefault(key, {}), offset, state.get("claim"))
        change = self._changes.pop(key, None)
        if change is not None:
            change.set()
        held = self._states.get(key)
        if held is not None and held[0] >= offset:
            return
        if state is None:
            self._states.pop(key, None)
            self._claims.pop(key, None)
            self._holds.pop(key, None)
        else:
            self._states[key] = (offset, state)

    async def _read_loop(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for record in records:
                    self._read(record.key, record.offset, record.value)
            for tp in self._partitions:
                self._positions[tp] = await self._consumer.position(tp)
            self._progress.set()
            self._progress = asyncio.Event()

    def _read(self, raw_key: bytes | None, offset: int, value: bytes | None) -> None:
        if raw_key is None:
            return
        key = raw_key.decode(errors="replace")
        if value is None:  # tombstone
            self._apply(key, offset, None)
            return
        try:
            state = cast(ResponderState, codec.decode("ResponderState", value))
        except codec.CodecError as exc:
            event(log, "state_record_unreadable", logging.ERROR, customer=key, offset=offset, error=str(exc))
            return
        watch = self._watches.get(key)
        if watch is not None and offset > watch[0]:
            watch[1].append((offset, state))
        self._apply(key, offset, state)

    def _reader_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        self._failed = type(exc).__name__ if exc else "ended"
        self._progress.set()
        for change in self._changes.values():  # waiters learn the reader stopped
            change.set()
        event(log, "state_reader_failed", logging.ERROR, error=self._failed)
