"""The fair share of a worker's slots between tenants (services/common/fair_share.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.fair_share import UNKNOWN_TENANT, FairQueue, per_tenant_slots, tenant_of

# ------------------------------------------------------------------------------ tenant of a key


@pytest.mark.parametrize(("key", "tenant"), [
    (b"wati:50370000001", "default"),
    (b"manychat:123", "default"),
    (b"playa/reception/wati:50370000001", "playa"),
    (b"shop/default/manychat:77", "shop"),
    (b"\x00responder-requests/3", UNKNOWN_TENANT),  # the keyed consumer's key of a keyless record
    (b"not a key", UNKNOWN_TENANT),
    (b"\xff\xfe", UNKNOWN_TENANT),
    (b"default/default/wati:1", UNKNOWN_TENANT),  # not canonical: never a customer's key
])
def test_tenant_of_a_record_key(key: bytes, tenant: str) -> None:
    assert tenant_of(key) == tenant


# ------------------------------------------------------------------------------ the cap


@pytest.mark.parametrize(("slots", "setting", "tenants", "cap"), [
    (32, 0, 1, 32),  # one tenant: unchanged, every slot
    (32, 0, 0, 32),
    (32, 0, 2, 16),  # several: half, so the others always keep half
    (32, 0, 50, 16),
    (5, 0, 2, 3),  # rounded up
    (1, 0, 3, 1),  # a single slot cannot be shared by capping
    (32, 4, 1, 4),  # the setting wins, also with one tenant
    (32, 64, 2, 32),  # never above the slots
])
def test_per_tenant_slots(slots: int, setting: int, tenants: int, cap: int) -> None:
    assert per_tenant_slots(slots, setting, tenants) == cap


def test_per_tenant_slots_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        per_tenant_slots(0, 0, 1)


@pytest.mark.parametrize(("slots", "per_tenant"), [(0, 1), (1, 0), (-1, 2)])
def test_a_queue_needs_slots(slots: int, per_tenant: int) -> None:
    with pytest.raises(ValueError):
        FairQueue[str](slots, per_tenant)


# ------------------------------------------------------------------------------ admission


def test_a_slow_tenant_at_its_cap_leaves_the_other_slots_to_another_tenant() -> None:
    """The issue's case: A's calls hang, it has more customers waiting than slots; B arrives."""
    q: FairQueue[str] = FairQueue(slots=4, per_tenant=2)
    for i in range(6):
        q.push("a", f"a{i}")
    assert [q.admit(), q.admit()] == [("a", "a0"), ("a", "a1")]
    assert q.admit() is None  # a at its cap: its others wait, two slots stay free
    assert q.in_use == 2
    q.push("b", "b0")
    q.push("b", "b1")
    q.push("b", "b2")
    assert [q.admit(), q.admit(), q.admit()] == [("b", "b0"), ("b", "b1"), None]
    assert (q.held("a"), q.held("b"), q.in_use) == (2, 2, 4)
    assert q.tenants() == {"a", "b"}
    q.release("b")
    assert q.admit() == ("b", "b2")  # b's own slot comes back to b; a is still at its cap
    q.release("a")
    assert q.admit() == ("a", "a2")
    assert q.admit() is None


def test_without_a_cap_a_lone_tenant_uses_every_slot() -> None:
    q: FairQueue[str] = FairQueue(slots=3, per_tenant=3)
    for i in range(5):
        q.push("a", f"a{i}")
    assert [q.admit() for _ in range(4)] == [("a", "a0"), ("a", "a1"), ("a", "a2"), None]
    assert len(q) == 2


def test_a_free_slot_goes_to_the_tenant_holding_fewest() -> None:
    """No cap: a burst of `a` queued first is served alongside `b`, not before it."""
    q: FairQueue[str] = FairQueue(slots=3, per_tenant=3)
    for i in range(4):
        q.push("a", f"a{i}")
    assert q.admit() == ("a", "a0")
    assert q.admit() == ("a", "a1")
    q.push("b", "b0")
    q.push("b", "b1")
    assert q.admit() == ("b", "b0")  # b holds 0 < a's 2
    q.release("a")
    assert q.admit() == ("a", "a2")  # a holds 1, b holds 1: a was served (a1) before b (b0)
    q.release("a")
    q.release("b")
    assert q.admit() == ("b", "b1")  # a 1, b 0
    assert q.admit() == ("a", "a3")


def test_equal_tenants_take_turns() -> None:
    q: FairQueue[str] = FairQueue(slots=1, per_tenant=1)
    for t in ("a", "b", "c"):
        for i in range(2):
            q.push(t, f"{t}{i}")
    order = []
    while (admitted := q.admit()) is not None:
        order.append(admitted[1])
        q.release(admitted[0])
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1"]


def test_an_item_already_waiting_keeps_its_place() -> None:
    q: FairQueue[str] = FairQueue(slots=1, per_tenant=1)
    q.push("a", "x")
    q.push("a", "y")
    q.push("a", "x")
    assert len(q) == 2
    assert "x" in q and "z" not in q
    assert q.admit() == ("a", "x")
    assert "x" not in q
    q.release("a")
    assert q.admit() == ("a", "y")


def test_release_without_a_slot_is_a_bug() -> None:
    q: FairQueue[str] = FairQueue(slots=2, per_tenant=2)
    with pytest.raises(ValueError):
        q.release("a")
    q.push("a", "x")
    q.admit()
    q.release("a")
    with pytest.raises(ValueError):
        q.release("a")


def test_clear_drops_waiting_items_not_held_slots() -> None:
    q: FairQueue[str] = FairQueue(slots=2, per_tenant=2)
    for i in range(3):
        q.push("a", f"a{i}")
    q.push("b", "b0")
    assert q.admit() == ("a", "a0")
    q.clear()
    assert (len(q), q.waiting("a"), q.waiting("b"), q.held("a"), q.in_use) == (0, 0, 0, 1, 1)
    assert q.admit() is None
    q.push("b", "b1")
    assert q.admit() == ("b", "b1")


def test_discard_takes_a_waiting_item_out_of_its_line() -> None:
    """The keyed consumer discards a customer whose queued records left with a revoked partition:
    it no longer counts as waiting, and its tenant keeps (or gives up) its turn like any other."""
    q: FairQueue[str] = FairQueue(slots=1, per_tenant=1)
    q.push("a", "a0")
    q.push("b", "b0")
    q.push("a", "a1")
    assert q.discard("a0") == "a"
    assert (len(q), q.waiting("a"), "a0" in q) == (2, 1, False)
    assert q.discard("a0") is None  # not waiting (any more): nothing to do
    assert q.discard("b0") == "b"
    assert q.tenants() == {"a"}  # b's line is gone with its last item
    assert q.admit() == ("a", "a1")
    assert q.admit() is None and len(q) == 0


# ------------------------------------------------------------------------------ invariants

OPS = st.lists(st.one_of(
    st.tuples(st.just("push"), st.sampled_from("abc"), st.integers(0, 5)),
    st.tuples(st.just("admit"), st.just(""), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("discard"), st.sampled_from("abc"), st.integers(0, 5)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(slots=st.integers(1, 5), per_tenant=st.integers(1, 5), ops=OPS)
def test_invariants_under_any_sequence(slots: int, per_tenant: int, ops: list[tuple[str, object, int]]
                                       ) -> None:
    """Never more than `slots` in use nor `per_tenant` per tenant; every pushed (not discarded) item
    admitted once, in its tenant's push order; never idle while an admissible item waits
    (work-conserving); the admitted tenant holds the fewest slots among those admissible."""
    q: FairQueue[str] = FairQueue(slots, per_tenant)
    cap = min(per_tenant, slots)
    running: list[str] = []  # tenants of admitted, unreleased items
    pushed: dict[str, list[str]] = {}
    admitted: dict[str, list[str]] = {}
    serial = 0
    for op, arg, n in ops:
        if op == "push":
            tenant = str(arg)
            for _ in range(n):
                item = f"{tenant}{serial}"
                serial += 1
                q.push(tenant, item)
                pushed.setdefault(tenant, []).append(item)
        elif op == "admit":
            held = {t: running.count(t) for t in "abc"}
            eligible = [t for t in "abc" if q.waiting(t) and held[t] < cap]
            result = q.admit()
            if result is None:
                assert len(running) >= slots or not eligible
            else:
                tenant, item = result
                assert len(running) < slots and tenant in eligible
                assert held[tenant] == min(held[t] for t in eligible)
                running.append(tenant)
                admitted.setdefault(tenant, []).append(item)
        elif op == "discard":
            tenant = str(arg)
            waiting = pushed.get(tenant, [])[len(admitted.get(tenant, [])):]
            if waiting:
                item = waiting[n % len(waiting)]
                assert q.discard(item) == tenant and item not in q
                pushed[tenant].remove(item)
        elif running:
            tenant = running.pop(int(str(arg)) % len(running))
            q.release(tenant)
        assert q.in_use == len(running) <= slots
        assert q.tenants() == set(running) | {t for t in "abc" if q.waiting(t)}
        for t in "abc":
            assert q.held(t) == running.count(t) <= cap
            assert admitted.get(t, []) == pushed.get(t, [])[:len(admitted.get(t, []))]
            assert q.waiting(t) == len(pushed.get(t, [])) - len(admitted.get(t, []))
