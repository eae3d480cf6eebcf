"""Backpressure of the keyed consumer, per tenant: which fetched records it keeps in memory, which it
reads past, when it pauses a partition and when it reads again what it read past (issue 17, fair
share). Pure bookkeeping (no Kafka, no asyncio); services/common/keyed_consumer.py is the shell.

The problem: a partition used to be paused when more than `pause_above` of its records were
unfinished, whichever tenants they belonged to. A tenant whose calls hang holds its share of the
slots (services/common/fair_share.py) and the rest of its records wait; a burst of over
`pause_above` of them on one partition paused it, so another tenant's customers fetched after them
waited until the hung tenant's calls timed out.

The rules:

- **a cap per tenant**: a worker keeps at most `per_tenant` fetched, unfinished records of one tenant
  in memory (queued or running). A tenant at its cap is *saturated* until it is down to half of it;
- **read past, read again**: a record of a saturated tenant is read past: its payload is dropped and
  only its offset is kept, unfinished, so the commit point (the lowest unfinished offset) stays at or
  below it and nothing is committed before it is done. A tenant with records read past on a
  partition has every later record on it read past too, so its records (hence each customer's) keep
  their order. Once the tenant has room again, the partition is *rewound* (the consumer seeks to
  that tenant's lowest offset read past) and the records are read again from the broker: what is
  finished or already held is ignored, the tenant's records read past are kept in offset order while
  it has room;
- **the pause counts tenants under their cap**: a partition is paused when more than `pause_above`
  of its unfinished records belong to tenants that are not saturated (resumed below
  `resume_below`), so a saturated tenant's backlog never pauses the others' records behind it;
- **a hard cap**: a partition is also paused when more than `unfinished_max` of its records are
  unfinished, read past ones included, whatever their tenants — the memory bound of the offsets
  kept (a few dozen bytes each) and of what a rewind reads again. Only then does a hung tenant
  stall the others on its partition. A partition being read again is never paused (a re-read adds
  nothing unfinished), so a tenant with room always gets its records back.

Memory: payloads ≤ Σ over tenants of `per_tenant` (saturated tenants) and ≤ `pause_above` per
partition (the others), offsets ≤ `unfinished_max` per partition — each plus at most one fetch
(the pause is applied after a fetch). With one tenant there is no cap (`per_tenant` None): nobody is
saturated, nothing is read past, and a partition pauses above `pause_above` as it always did.

The alternative not taken, a parking topic (produce a saturated tenant's records to a topic of their
own, commit them on the input, consume the parking topic later): it also frees the partition, but
commits a record before it is done (the commit point would no longer be the lowest unfinished
record), adds a topic, a produce per parked record and a second consumer, and moves the problem —
the parking topic's partitions hold several tenants, so a hung tenant's parked records stall
another's parked ones behind them, and each customer's later records must be parked too to keep
their order, across two topics. Reading past and again costs only re-fetching the span of a
rewound partition, which the hard cap bounds; the records must still be on the broker when read
again (retention is days, a tenant's calls time out in minutes), and any the broker no longer has
are counted finished (a seek lands past them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum


class PartitionOffsets:
    """Offsets of one partition fetched but not yet committed, and which of them are finished.

    Pure bookkeeping (no Kafka): records are added in increasing offset order (gaps allowed, e.g.
    after compaction); `commit_point()` is the offset to commit so that every record below it is
    finished and nothing unfinished is skipped. Memory is in the unfinished records, not in the span
    since the commit point: finished offsets behind an unfinished one are compacted away.
    """

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # ascending offsets, all unfinished but those in _done
        self._done: set[int] = set()  # finished offsets still in _pending
        self._highest: int | None = None
        self._committed: int | None = None

    def add(self, offset: int) -> bool:
        """Registers a fetched record; False (ignore it) if it is not above the highest seen."""
        if self._highest is not None and offset <= self._highest:
            return False
        self._pending.append(offset)
        self._highest = offset
        return True

    def done(self, offset: int) -> None:
        """Marks a registered record finished; unknown offsets are ignored."""
        if offset in self._done:
            return
        if not self._pending or offset < self._pending[0] or offset > self._pending[-1]:
            return
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            self._done.discard(self._pending.popleft())
        if len(self._done) > 64 and 2 * len(self._done) > len(self._pending):
            self._pending = deque(o for o in self._pending if o not in self._done)
            self._done.clear()

    def highest(self) -> int | None:
        """The highest offset registered."""
        return self._highest

    def tracked(self) -> int:
        """Offsets held in memory (at most twice the unfinished ones, plus a constant)."""
        return len(self._pending) + len(self._done)

    def commit_point(self) -> int | None:
        """Lowest unfinished offset, or highest seen + 1 when all are finished; None if none seen."""
        if self._pending:
            return self._pending[0]
        return None if self._highest is None else self._highest + 1

    def unfinished(self) -> int:
        """How many registered records are not finished."""
        return len(self._pending) - len(self._done)

    def to_commit(self) -> int | None:
        """The commit point if it moved beyond the last one marked committed, else None."""
        point = self.commit_point()
        if point is None or (self._committed is not None and point <= self._committed):
            return None
        return point

    def mark_committed(self, offset: int) -> None:
        if self._committed is None or offset > self._committed:
            self._committed = offset


@dataclass(frozen=True)
class Limits:
    """The thresholds (module docstring); `per_tenant` None = no cap (one tenant)."""

    pause_above: int = 1000
    resume_below: int = 500
    per_tenant: int | None = None
    unfinished_max: int = 20000

    def __post_init__(self) -> None:
        if not 1 <= self.resume_below <= self.pause_above:  # resume below 0 would never happen
            raise ValueError("need 1 <= resume_below <= pause_above")
        if self.per_tenant is not None and self.per_tenant < 1:
            raise ValueError("per_tenant must be >= 1 (or None: no cap)")
        if self.unfinished_max < self.pause_above:
            raise ValueError("unfinished_max must be >= pause_above")


def records_per_tenant(setting: int, pause_above: int, tenants: int) -> int | None:
    """The cap of a tenant's records in memory per worker: `setting` when > 0; else derived — none
    with one tenant (the single-tenant deployment is unchanged), half of `pause_above` with several,
    so a tenant alone never pauses a partition."""
    if setting > 0:
        return setting
    if tenants <= 1:
        return None
    return max(1, pause_above // 2)


class TenantBuffers:
    """A worker's fetched, unfinished records in memory per tenant, and which tenants are saturated
    (reached `cap`; until down to half of it)."""

    def __init__(self, cap: int | None) -> None:
        if cap is not None and cap < 1:
            raise ValueError("cap must be >= 1 (or None)")
        self.cap = cap
        self._held: dict[str, int] = {}
        self._saturated: set[str] = set()

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def saturated(self, tenant: str) -> bool:
        return tenant in self._saturated

    def tenants(self) -> set[str]:
        """Tenants with records in memory."""
        return set(self._held)

    def total(self) -> int:
        return sum(self._held.values())

    def take(self, tenant: str) -> None:
        """One more record of the tenant in memory (the caller checked it is not saturated)."""
        held = self._held[tenant] = self._held.get(tenant, 0) + 1
        if self.cap is not None and held >= self.cap:
            self._saturated.add(tenant)

    def give_back(self, tenant: str) -> None:
        """A record of the tenant left memory (finished, failed, or dropped on a revoke); ValueError
        if it holds none (a caller bug)."""
        held = self._held.get(tenant, 0)
        if held < 1:
            raise ValueError(f"tenant {tenant!r} holds no record")
        if held == 1:
            del self._held[tenant]
        else:
            self._held[tenant] = held - 1
        if tenant in self._saturated and self.cap is not None and held - 1 <= self.cap // 2:
            self._saturated.discard(tenant)


class Verdict(Enum):
    """What the consumer does with a fetched record."""

    KEEP = "keep"  # keep it in memory and run it in its turn
    READ_PAST = "read_past"  # drop its payload, keep its offset unfinished: read again later
    IGNORE = "ignore"  # already finished or already in memory (read again), or not ours


class PartitionBacklog:
    """One partition's unfinished records: kept per tenant, read past per tenant, and the rewinds."""

    def __init__(self) -> None:
        self.offsets = PartitionOffsets()
        self._kept: dict[str, int] = {}  # tenant -> its records of this partition in memory
        self._read_past: dict[str, deque[int]] = {}  # tenant -> ascending offsets read past
        self._next: int | None = None  # the offset the fetch reads next (as far as we know)
        self._sought: int | None = None  # the offset of the last rewind, until its first record

    def kept(self, tenant: str) -> int:
        return self._kept.get(tenant, 0)

    def read_past(self, tenant: str | None = None) -> int:
        """Records read past (of one tenant, or of all)."""
        if tenant is not None:
            return len(self._read_past.get(tenant, ()))
        return sum(map(len, self._read_past.values()))

    def read_past_tenants(self) -> set[str]:
        return set(self._read_past)

    def rereading(self) -> bool:
        """True while the fetch is below the highest offset seen (a rewind is being read)."""
        highest = self.offsets.highest()
        return self._next is not None and highest is not None and self._next <= highest

    def accept(self, offset: int, tenant: str, buffers: TenantBuffers) -> Verdict:
        """A fetched record of `tenant`: keep it (taking its place in `buffers`), read it past, or
        ignore it. Keeps each tenant's records in offset order (hence each customer's)."""
        if self._sought is not None:
            self._forget_gone(self._sought, offset)
            self._sought = None
        self._next = offset + 1
        past = self._read_past.get(tenant)
        if self.offsets.add(offset):  # a new record
            if past or buffers.saturated(tenant):
                self._read_past.setdefault(tenant, deque()).append(offset)
                return Verdict.READ_PAST
            self._keep(tenant, buffers)
            return Verdict.KEEP
        # read again: only the tenant's lowest record read past, and only if it has room now
        if past and past[0] == offset and not buffers.saturated(tenant):
            past.popleft()
            if not past:
                del self._read_past[tenant]
            self._keep(tenant, buffers)
            return Verdict.KEEP
        return Verdict.IGNORE

    def _keep(self, tenant: str, buffers: TenantBuffers) -> None:
        self._kept[tenant] = self._kept.get(tenant, 0) + 1
        buffers.take(tenant)

    def _forget_gone(self, sought: int, first: int) -> None:
        """After a seek to `sought` the first record is at `first`: the broker has nothing in
        between (deleted by retention, or not records), so offsets read past there are finished."""
        if first <= sought:
            return
        for tenant in list(self._read_past):
            past = self._read_past[tenant]
            gone = [o for o in past if sought <= o < first]
            if not gone:
                continue
            kept = deque(o for o in past if not sought <= o < first)
            if kept:
                self._read_past[tenant] = kept
            else:
                del self._read_past[tenant]
            for o in gone:
                self.offsets.done(o)

    def finished(self, offset: int, tenant: str, done: bool = True) -> None:
        """A kept record of `tenant` left memory; `done` False: it did not finish (cancelled on
        shutdown), so it stays unfinished and holds the commit point (redelivered later)."""
        kept = self._kept.get(tenant, 0)
        if kept <= 1:
            self._kept.pop(tenant, None)
        else:
            self._kept[tenant] = kept - 1
        if done:
            self.offsets.done(offset)

    def rewind(self, buffers: TenantBuffers) -> int | None:
        """The offset to seek to so that records read past of tenants with room now are read again,
        or None (nothing to read again, or the fetch is already below it). The caller seeks."""
        lowest: int | None = None
        for tenant, past in self._read_past.items():
            if not buffers.saturated(tenant) and (lowest is None or past[0] < lowest):
                lowest = past[0]
        if lowest is None or self._next is None or self._next <= lowest:
            return None
        self._next = self._sought = lowest
        return lowest

    def counted(self, buffers: TenantBuffers) -> int:
        """Unfinished records in memory of tenants that are not saturated: what the pause counts."""
        return sum(n for tenant, n in self._kept.items() if not buffers.saturated(tenant))

    def should_pause(self, paused: bool, buffers: TenantBuffers, limits: Limits) -> bool:
        """Whether the partition should be paused now (it is `paused` now)."""
        return should_pause(paused, self.counted(buffers), self.offsets.unfinished(),
                            self.rereading(), limits)


def should_pause(paused: bool, counted: int, unfinished: int, rereading: bool, limits: Limits) -> bool:
    """The pause rule of a partition (module docstring): `counted` of its unfinished records belong to
    tenants under their cap, `unfinished` in all (read past included)."""
    if rereading:
        return False
    if unfinished > limits.unfinished_max:
        return True
    return counted >= limits.resume_below if paused else counted > limits.pause_above
