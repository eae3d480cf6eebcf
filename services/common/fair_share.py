"""Fair share of a worker's slots between tenants: who is admitted next (issue 17, point 2).

The keyed consumer (services/common/keyed_consumer.py) runs at most `slots` records at once. With one
line for everybody, a tenant whose OpenAI or WATI is slow, hangs or answers 429 (a WATI send waits
its Retry-After) fills every slot with its customers and another tenant's customers wait behind it.
`FairQueue` keeps one waiting line per tenant and two rules:

- **a cap**: a tenant holds at most `per_tenant` slots, so `slots - per_tenant` are always left to
  the others however long its calls hang (a cap equal to `slots` = no cap);
- **least served first**: a free slot goes to the waiting tenant holding the fewest slots; among
  equals, to the one whose turn came longest ago (round robin), so a burst of one tenant is served
  alongside the others' customers, not before them.

Work-conserving within the cap: a tenant alone uses up to `per_tenant` slots. Pure bookkeeping (no
asyncio, no Kafka): the caller takes a slot with `admit()` and gives it back with `release()`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from .keys import KeyError_, parse_key

Item = TypeVar("Item", bound=Hashable)

UNKNOWN_TENANT = ""
"""The line of keys that are not customer keys (keyless records): they share one tenant's share."""


def tenant_of(kafka_key: bytes) -> str:
    """The tenant of a record's Kafka key (its customer key); `UNKNOWN_TENANT` if it is none."""
    try:
        return parse_key(kafka_key.decode("utf-8")).tenant
    except (UnicodeDecodeError, KeyError_):
        return UNKNOWN_TENANT


def per_tenant_slots(slots: int, setting: int, tenants: int) -> int:
    """The cap of slots per tenant: `setting` when > 0 (at most `slots`); else derived — every slot
    for a single tenant (the single-tenant deployment is unchanged), half of them (rounded up) when
    several tenants share the worker, so one tenant's hung calls leave the other half to the rest."""
    if slots < 1:
        raise ValueError("slots must be >= 1")
    if setting > 0:
        return min(setting, slots)
    if tenants <= 1:
        return slots
    return max(1, math.ceil(slots / 2))


class FairQueue(Generic[Item]):
    """Items waiting per tenant and slots held per tenant: `admit()` says which item runs next."""

    def __init__(self, slots: int, per_tenant: int) -> None:
        if slots < 1 or per_tenant < 1:
            raise ValueError("slots and per_tenant must be >= 1")
        self.slots = slots
        self.per_tenant = min(per_tenant, slots)
        self._lines: dict[str, deque[Item]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting items, longest since served first
        self._where: dict[Item, str] = {}  # waiting item -> its tenant
        self._held: dict[str, int] = {}
        self._in_use = 0

    def __len__(self) -> int:
        """Items waiting."""
        return len(self._where)

    def __contains__(self, item: object) -> bool:
        return item in self._where

    @property
    def in_use(self) -> int:
        """Slots held, over all tenants."""
        return self._in_use

    def held(self, tenant: str) -> int:
        """Slots the tenant holds."""
        return self._held.get(tenant, 0)

    def waiting(self, tenant: str) -> int:
        """Items of the tenant waiting."""
        return len(self._lines.get(tenant, ()))

    def tenants(self) -> set[str]:
        """Tenants holding a slot or with items waiting."""
        return set(self._held) | set(self._lines)

    def push(self, tenant: str, item: Item) -> None:
        """Puts `item` at the end of its tenant's line; an item already waiting keeps its place."""
        if item in self._where:
            return
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = deque()
            self._turns.append(tenant)
        line.append(item)
        self._where[item] = tenant

    def discard(self, item: Item) -> str | None:
        """Takes a waiting `item` out of its tenant's line (its work went away, e.g. its partition
        was revoked); returns its tenant, or None if it was not waiting."""
        tenant = self._where.pop(item, None)
        if tenant is None:
            return None
        line = self._lines[tenant]
        line.remove(item)
        if not line:
            del self._lines[tenant]
            self._turns.remove(tenant)
        return tenant

    def admit(self) -> tuple[str, Item] | None:
        """The next (tenant, item) to run, its slot taken; None when every slot is held or every
        waiting tenant is at its cap (their items wait for a `release`)."""
        if self._in_use >= self.slots:
            return None
        best: str | None = None
        for tenant in self._turns:
            held = self._held.get(tenant, 0)
            if held < self.per_tenant and (best is None or held < self._held.get(best, 0)):
                best = tenant
        if best is None:
            return None
        line = self._lines[best]
        item = line.popleft()
        del self._where[item]
        self._turns.remove(best)
        if line:
            self._turns.append(best)  # its next item waits for its next turn
        else:
            del self._lines[best]
        self._held[best] = self._held.get(best, 0) + 1
        self._in_use += 1
        return best, item

    def release(self, tenant: str) -> None:
        """Gives back a slot `admit` gave the tenant; ValueError if it holds none (a caller bug)."""
        held = self._held.get(tenant, 0)
        if held < 1:
            raise ValueError(f"tenant {tenant!r} holds no slot")
        if held == 1:
            del self._held[tenant]
        else:
            self._held[tenant] = held - 1
        self._in_use -= 1

    def clear(self) -> None:
        """Drops every waiting item (slots held stay held until released)."""
        self._lines.clear()
        self._turns.clear()
        self._where.clear()
