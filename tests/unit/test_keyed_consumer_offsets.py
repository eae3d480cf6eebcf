"""The keyed consumer's per-partition offset bookkeeping: commit only what is finished."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.keyed_consumer import PartitionOffsets


def test_nothing_seen_commits_nothing() -> None:
    offsets = PartitionOffsets()
    assert offsets.commit_point() is None
    assert offsets.to_commit() is None
    assert offsets.unfinished() == 0


def test_unfinished_record_holds_the_commit_point() -> None:
    offsets = PartitionOffsets()
    for o in (5, 6, 7):
        assert offsets.add(o)
    assert offsets.commit_point() == 5
    offsets.done(6)
    offsets.done(7)
    assert offsets.commit_point() == 5  # 5 still running: nothing past it is committed
    assert offsets.unfinished() == 1
    offsets.done(5)
    assert offsets.commit_point() == 8
    assert offsets.unfinished() == 0


def test_in_order_completion_moves_one_by_one() -> None:
    offsets = PartitionOffsets()
    for o in range(3):
        offsets.add(o)
    offsets.done(0)
    assert offsets.commit_point() == 1
    offsets.done(1)
    assert offsets.commit_point() == 2


def test_gaps_in_offsets_are_allowed() -> None:
    offsets = PartitionOffsets()
    for o in (10, 13, 20):
        offsets.add(o)
    offsets.done(10)
    assert offsets.commit_point() == 13
    offsets.done(20)
    assert offsets.commit_point() == 13
    offsets.done(13)
    assert offsets.commit_point() == 21


def test_duplicates_and_lower_offsets_are_ignored() -> None:
    offsets = PartitionOffsets()
    assert offsets.add(4)
    assert not offsets.add(4)
    assert not offsets.add(2)
    assert offsets.unfinished() == 1


def test_unknown_and_repeated_done_are_ignored() -> None:
    offsets = PartitionOffsets()
    offsets.add(1)
    offsets.add(2)
    offsets.done(0)  # below everything
    offsets.done(9)  # above everything
    offsets.done(2)
    offsets.done(2)
    assert offsets.unfinished() == 1
    assert offsets.commit_point() == 1
    offsets.done(1)
    offsets.done(1)
    assert offsets.commit_point() == 3
    assert offsets.unfinished() == 0


def test_done_before_any_add_is_ignored() -> None:
    offsets = PartitionOffsets()
    offsets.done(3)
    assert offsets.commit_point() is None


def test_to_commit_only_when_the_point_moved() -> None:
    offsets = PartitionOffsets()
    offsets.add(0)
    offsets.add(1)
    assert offsets.to_commit() == 0  # nothing finished yet: committing 0 is harmless but allowed
    offsets.mark_committed(0)
    assert offsets.to_commit() is None
    offsets.done(0)
    assert offsets.to_commit() == 1
    offsets.mark_committed(1)
    assert offsets.to_commit() is None
    offsets.mark_committed(0)  # an older commit never moves the mark back
    assert offsets.to_commit() is None
    offsets.done(1)
    assert offsets.to_commit() == 2


@given(
    gaps=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60),
    order=st.randoms(use_true_random=False),
    cut=st.floats(min_value=0, max_value=1),
)
def test_commit_point_is_the_lowest_unfinished(gaps: list[int], order: object, cut: float) -> None:
    """Model check: after any subset finished in any order, the point is min(unfinished) or max+1."""
    import random

    assert isinstance(order, random.Random)
    offsets = PartitionOffsets()
    seen: list[int] = []
    position = 0
    for gap in gaps:
        position += gap
        seen.append(position)
        offsets.add(position)
    finishing = list(seen)
    order.shuffle(finishing)
    finished: set[int] = set()
    for o in finishing[: int(len(finishing) * cut)]:
        offsets.done(o)
        finished.add(o)
        unfinished = [s for s in seen if s not in finished]
        expected = min(unfinished) if unfinished else max(seen) + 1
        assert offsets.commit_point() == expected
        assert offsets.unfinished() == len(unfinished)
        # never past an unfinished record
        assert all(u >= offsets.commit_point() for u in unfinished)  # type: ignore[operator]
