"""The keyed consumer's backpressure per tenant (services/common/backpressure.py): which records are
kept, read past and read again, and when a partition pauses."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.backpressure import (
    Limits,
    PartitionBacklog,
    PartitionOffsets,
    TenantBuffers,
    Verdict,
    records_per_tenant,
    should_pause,
)

KEEP, PAST, IGNORE = Verdict.KEEP, Verdict.READ_PAST, Verdict.IGNORE

# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("setting", "pause_above", "tenants", "cap"), [
    (0, 1000, 1, None),  # one tenant: no cap, the single-tenant deployment is unchanged
    (0, 1000, 0, None),
    (0, 1000, 2, 500),  # several: half the pause mark, so a tenant alone never pauses a partition
    (0, 1000, 50, 500),
    (0, 1, 3, 1),
    (7, 1000, 1, 7),  # the setting wins, also with one tenant
    (7, 1000, 9, 7),
])
def test_records_per_tenant(setting: int, pause_above: int, tenants: int, cap: int | None) -> None:
    assert records_per_tenant(setting, pause_above, tenants) == cap


@pytest.mark.parametrize("kwargs", [
    {"pause_above": 0, "resume_below": 0},
    {"pause_above": 10, "resume_below": 11},
    {"pause_above": 10, "resume_below": 0},  # paused for good: nothing is unfinished below 0
    {"per_tenant": 0},
    {"pause_above": 10, "resume_below": 5, "unfinished_max": 9},
])
def test_limits_refuse_inconsistent_thresholds(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_a_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TenantBuffers(0)


# ------------------------------------------------------------------------------ the tenant's cap


def test_a_tenant_is_saturated_at_its_cap_until_down_to_half() -> None:
    buffers = TenantBuffers(4)
    for _ in range(3):
        buffers.take("a")
    assert not buffers.saturated("a")
    buffers.take("a")
    assert buffers.saturated("a") and buffers.held("a") == 4
    buffers.give_back("a")
    assert buffers.saturated("a")  # 3 > half: still saturated, no flapping at the cap
    buffers.give_back("a")
    assert not buffers.saturated("a") and buffers.held("a") == 2
    assert buffers.tenants() == {"a"} and buffers.total() == 2


def test_without_a_cap_nobody_is_saturated() -> None:
    buffers = TenantBuffers(None)
    for _ in range(10_000):
        buffers.take("a")
    assert not buffers.saturated("a")


def test_giving_back_what_was_not_taken_is_a_caller_bug() -> None:
    buffers = TenantBuffers(2)
    with pytest.raises(ValueError):
        buffers.give_back("a")
    buffers.take("a")
    buffers.give_back("a")
    assert buffers.tenants() == set()


# ------------------------------------------------------------------------------ keep or read past


def fetch(backlog: PartitionBacklog, buffers: TenantBuffers, records: list[tuple[int, str]]
          ) -> list[Verdict]:
    return [backlog.accept(offset, tenant, buffers) for offset, tenant in records]


def test_a_saturated_tenants_records_are_read_past_and_the_bufferss_kept() -> None:
    """The issue's case: `a` hangs with a burst, `b`'s record comes after it on the same partition."""
    buffers, backlog = TenantBuffers(2), PartitionBacklog()
    verdicts = fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "a"), (3, "a"), (4, "b")])
    assert verdicts == [KEEP, KEEP, PAST, PAST, KEEP]
    assert (buffers.held("a"), backlog.kept("a"), backlog.read_past("a")) == (2, 2, 2)
    assert backlog.read_past() == 2 and backlog.read_past_tenants() == {"a"}
    assert backlog.offsets.unfinished() == 5  # read past is unfinished: never committed
    assert backlog.offsets.commit_point() == 0


def test_once_a_tenant_read_past_its_later_records_are_read_past_too_even_with_room() -> None:
    """Its records (hence each customer's) keep their order: none may overtake one read past."""
    buffers, backlog = TenantBuffers(2), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "a")])
    backlog.finished(0, "a")
    buffers.give_back("a")
    assert not buffers.saturated("a")
    assert fetch(backlog, buffers, [(3, "a")]) == [PAST]


def test_finished_records_move_the_commit_point_not_past_a_record_read_past() -> None:
    buffers, backlog = TenantBuffers(1), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "b")])
    backlog.finished(0, "a")
    backlog.finished(2, "b")
    assert backlog.offsets.commit_point() == 1  # a's record 1 was read past: not done


def test_a_record_that_did_not_finish_leaves_memory_but_holds_the_commit_point() -> None:
    buffers, backlog = TenantBuffers(None), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a")])
    backlog.finished(0, "a", done=False)  # cancelled on shutdown
    backlog.finished(1, "a")
    assert backlog.kept("a") == 0
    assert backlog.offsets.commit_point() == 0


# ------------------------------------------------------------------------------ read again


def test_nothing_to_read_again_while_the_tenant_is_saturated() -> None:
    buffers, backlog = TenantBuffers(2), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "a")])
    assert backlog.rewind(buffers) is None
    assert PartitionBacklog().rewind(buffers) is None  # nothing seen at all


def test_a_tenant_with_room_again_is_read_again_from_its_lowest_record_in_order() -> None:
    buffers, backlog = TenantBuffers(2), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")])
    for offset in (0, 1):
        backlog.finished(offset, "a")
        buffers.give_back("a")
    assert backlog.rewind(buffers) == 2
    assert backlog.rereading()
    assert backlog.rewind(buffers) is None  # the fetch is already there: no second seek
    # read again: a's records kept in order while it has room, b's (finished or kept) ignored
    assert fetch(backlog, buffers, [(2, "a"), (3, "b"), (4, "a"), (5, "b")]) == [KEEP, IGNORE, KEEP, IGNORE]
    assert not backlog.rereading()
    assert backlog.read_past() == 0 and backlog.kept("a") == 2


def test_a_re_read_stops_keeping_once_the_tenant_is_saturated_again() -> None:
    buffers, backlog = TenantBuffers(2), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "a"), (3, "a"), (4, "a")])
    for offset in (0, 1):
        backlog.finished(offset, "a")
        buffers.give_back("a")
    assert backlog.rewind(buffers) == 2
    assert fetch(backlog, buffers, [(2, "a"), (3, "a"), (4, "a")]) == [KEEP, KEEP, IGNORE]
    assert backlog.read_past("a") == 1 and buffers.saturated("a")
    assert fetch(backlog, buffers, [(5, "a")]) == [PAST]  # new, and behind one read past
    backlog.finished(2, "a")
    buffers.give_back("a")
    assert backlog.rewind(buffers) == 4
    assert fetch(backlog, buffers, [(4, "a"), (5, "a")]) == [KEEP, IGNORE]  # 2 kept: saturated again


def test_a_record_read_again_out_of_turn_stays_read_past() -> None:
    """a's record 2 came back while a was saturated; a has room at 3: 3 must not overtake 2."""
    buffers = TenantBuffers(2)
    backlog = PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "a"), (3, "a")])
    backlog.finished(0, "a")
    buffers.give_back("a")
    buffers.give_back("a")  # a down to 0: room
    backlog.rewind(buffers)
    buffers.take("a")
    buffers.take("a")  # saturated again before the re-read arrives
    assert fetch(backlog, buffers, [(2, "a")]) == [IGNORE]
    buffers.give_back("a")
    buffers.give_back("a")
    assert fetch(backlog, buffers, [(3, "a")]) == [IGNORE]  # 2 still read past: 3 waits behind it
    assert backlog.read_past("a") == 2
    assert backlog.rewind(buffers) == 2


def test_the_rewind_goes_to_the_lowest_record_of_the_tenants_with_room_only() -> None:
    buffers, backlog = TenantBuffers(1), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (1, "a"), (2, "b"), (3, "b"), (4, "a")])
    backlog.finished(2, "b")
    buffers.give_back("b")  # b has room, a is still saturated
    assert backlog.rewind(buffers) == 3


def test_records_the_broker_no_longer_has_are_counted_finished_after_a_rewind() -> None:
    """A seek to 2 lands on 5 (retention deleted 2..4): what was read past there is gone."""
    buffers, backlog = TenantBuffers(1), PartitionBacklog()
    fetch(backlog, buffers, [(0, "a"), (2, "a"), (4, "a"), (5, "b"), (6, "a")])
    backlog.finished(0, "a")
    buffers.give_back("a")
    assert backlog.rewind(buffers) == 2
    assert fetch(backlog, buffers, [(5, "b"), (6, "a")]) == [IGNORE, KEEP]
    assert backlog.read_past() == 0
    assert backlog.offsets.commit_point() == 5  # b's 5 is still kept, unfinished


# ------------------------------------------------------------------------------ the pause


LIMITS = Limits(pause_above=10, resume_below=5, per_tenant=3, unfinished_max=20)


@pytest.mark.parametrize(("paused", "counted", "unfinished", "rereading", "pause"), [
    (False, 10, 10, False, False),  # at the mark: not above
    (False, 11, 11, False, True),
    (True, 5, 5, False, True),  # paused until below the low mark
    (True, 4, 4, False, False),
    (False, 0, 20, False, False),  # read past: not counted, up to the hard cap
    (False, 0, 21, False, True),  # above the hard cap, whatever the tenants
    (True, 0, 21, False, True),
    (True, 0, 20, False, False),
    (True, 50, 50, True, False),  # a re-read adds nothing unfinished: never paused
    (False, 50, 50, True, False),
])
def test_should_pause(paused: bool, counted: int, unfinished: int, rereading: bool, pause: bool) -> None:
    assert should_pause(paused, counted, unfinished, rereading, LIMITS) is pause


def test_a_saturated_tenants_records_do_not_count_toward_the_pause() -> None:
    buffers, backlog = TenantBuffers(3), PartitionBacklog()
    limits = Limits(pause_above=4, resume_below=2, per_tenant=3, unfinished_max=20)
    fetch(backlog, buffers, [(o, "a") for o in range(15)])  # 3 kept, 12 read past
    assert backlog.counted(buffers) == 0
    assert not backlog.should_pause(False, buffers, limits)
    fetch(backlog, buffers, [(15, "b"), (16, "c"), (17, "c")])
    assert backlog.counted(buffers) == 3
    assert not backlog.should_pause(False, buffers, limits)
    fetch(backlog, buffers, [(18, "d"), (19, "d"), (20, "b")])  # 21 unfinished: the hard cap
    assert backlog.should_pause(False, buffers, limits)


def test_with_one_tenant_the_partition_pauses_as_it_always_did() -> None:
    buffers, backlog = TenantBuffers(None), PartitionBacklog()
    limits = Limits(pause_above=10, resume_below=5)
    assert fetch(backlog, buffers, [(o, "default") for o in range(11)]) == [KEEP] * 11
    assert backlog.should_pause(False, buffers, limits)
    for o in range(7):
        backlog.finished(o, "default")
    assert not backlog.should_pause(True, buffers, limits)


# ------------------------------------------------------------------------------ offsets memory


def test_finished_offsets_behind_an_unfinished_one_are_compacted() -> None:
    """A hung record at the commit point while the bufferss flow: memory stays in the unfinished."""
    offsets = PartitionOffsets()
    for o in range(100_000):
        offsets.add(o)
        if o:
            offsets.done(o)
    assert offsets.unfinished() == 1
    assert offsets.tracked() <= 2 * offsets.unfinished() + 130
    assert offsets.commit_point() == 0
    offsets.done(0)
    assert offsets.commit_point() == 100_000


# ------------------------------------------------------------------------------ invariants


@dataclass
class World:
    """A worker consuming partitions of a log, as the keyed consumer does, in plain data."""

    limits: Limits
    logs: list[list[tuple[str, str]]]  # per partition: (tenant, key) by offset
    buffers: TenantBuffers = field(init=False)
    backlogs: list[PartitionBacklog] = field(init=False)
    position: list[int] = field(init=False)  # the fetch position per partition
    paused: list[bool] = field(init=False)
    queues: dict[str, deque[tuple[int, int]]] = field(default_factory=dict)  # key -> (part, offset)
    finished: list[set[int]] = field(init=False)
    order: dict[str, list[int]] = field(default_factory=dict)  # key -> offsets in finishing order

    def __post_init__(self) -> None:
        n = len(self.logs)
        self.buffers = TenantBuffers(self.limits.per_tenant)
        self.backlogs = [PartitionBacklog() for _ in range(n)]
        self.position, self.paused = [0] * n, [False] * n
        self.finished = [set() for _ in range(n)]

    def fetch(self, p: int, count: int) -> None:
        if self.paused[p]:
            return
        for _ in range(count):
            if self.position[p] >= len(self.logs[p]):
                break
            offset = self.position[p]
            tenant, key = self.logs[p][offset]
            self.position[p] += 1
            if self.backlogs[p].accept(offset, tenant, self.buffers) is Verdict.KEEP:
                assert (p, offset) not in self.queues.get(key, ()), "kept twice"
                assert offset not in self.finished[p], "kept after it finished"
                self.queues.setdefault(key, deque()).append((p, offset))
        self.after_fetch()

    def after_fetch(self) -> None:
        for p, backlog in enumerate(self.backlogs):
            seek = backlog.rewind(self.buffers)
            if seek is not None:
                self.position[p] = seek
            self.paused[p] = backlog.should_pause(self.paused[p], self.buffers, self.limits)

    def finish(self, pick: int) -> None:
        """Finishes the head record of one key (a key runs one record at a time, in order)."""
        keys = sorted(k for k, q in self.queues.items() if q)
        if not keys:
            return
        key = keys[pick % len(keys)]
        p, offset = self.queues[key].popleft()
        tenant = self.logs[p][offset][0]
        self.backlogs[p].finished(offset, tenant)
        self.buffers.give_back(tenant)
        self.finished[p].add(offset)
        self.order.setdefault(key, []).append(offset)

    def check(self) -> None:
        cap = self.limits.per_tenant
        for tenant in self.buffers.tenants():
            # memory: a tenant's records in memory never exceed its cap
            assert cap is None or self.buffers.held(tenant) <= cap
        for p, backlog in enumerate(self.backlogs):
            # memory: offsets bounded by the hard cap (plus one fetch), payloads by the pause mark
            assert backlog.offsets.unfinished() <= self.limits.unfinished_max + FETCH
            assert backlog.offsets.tracked() <= 2 * backlog.offsets.unfinished() + 130
            assert backlog.counted(self.buffers) <= self.limits.pause_above + FETCH + (cap or 0)
            # never commit past an unfinished record
            point = backlog.offsets.commit_point()
            if point is not None:
                assert all(o in self.finished[p] for o in range(point))
        for key, offsets in self.order.items():  # per key, in order
            assert offsets == sorted(offsets), key


FETCH = 3  # records per fetch at most, in the model
TENANTS = ["a", "b", "c"]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    pause = draw(st.integers(1, 8))
    limits = Limits(pause_above=pause, resume_below=draw(st.integers(1, pause)),
                    per_tenant=draw(st.one_of(st.none(), st.integers(1, 5))),
                    unfinished_max=pause + draw(st.integers(0, 10)))
    record = st.tuples(st.sampled_from(TENANTS), st.integers(0, 3))
    drawn = draw(st.lists(st.lists(record, max_size=40), min_size=1, max_size=2))
    # a key lives on one partition, as a Kafka key does
    return World(limits, [[(t, f"{p}/{t}{k}") for t, k in log] for p, log in enumerate(drawn)])


OPS = st.lists(st.tuples(st.sampled_from(["fetch", "finish"]), st.integers(0, 7)), max_size=120)


@settings(max_examples=400, deadline=None)
@given(world=worlds(), ops=OPS)
def test_invariants_under_any_sequence_and_everything_is_eventually_done(
    world: World, ops: list[tuple[str, int]]
) -> None:
    """Memory bounded, nothing committed past an unfinished record, each key in order — and, once
    records are handled, every record of the log is handled exactly once (nothing stuck)."""
    for op, n in ops:
        if op == "fetch":
            world.fetch(n % len(world.logs), 1 + n % FETCH)
        else:
            world.finish(n)
        world.check()
    for _ in range(10_000):  # drain: handle what is kept, fetch the rest
        if any(world.queues.values()):
            world.finish(0)
        else:
            for p in range(len(world.logs)):
                world.fetch(p, FETCH)
            world.after_fetch()
        world.check()
        if all(len(world.finished[p]) == len(log) for p, log in enumerate(world.logs)):
            break
    for p, log in enumerate(world.logs):
        assert world.finished[p] == set(range(len(log)))
        assert world.backlogs[p].offsets.commit_point() == (len(log) if log else None)
    assert world.buffers.total() == 0
    assert sum(map(len, world.order.values())) == sum(map(len, world.logs))  # each exactly once
