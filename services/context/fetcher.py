"""History fetches of the context service (through the customer's provider: `Provider.fetch_history`,
WATI's getMessages today), run beside the agent, never inside it.

A slow WATI must never stall other customers, so the agent only ORDERS a fetch (state.py's
`HistoryFetchOrder`); this module runs it as an asyncio task (overall timeout
`HISTORY_TIMEOUT_SECONDS`), parses the raw items (services/context/history.py) and hands
the result back to the agent as a `history_fetched` ContextCommand keyed by the customer, so the
state changes in-stream. Every failure still produces that command, with `history_error` set to a
short reason code, and the state machine answers without context. A task lost with the process is
covered by the state machine too: `due_action` re-flushes a batch whose fetch timed out.

Each customer's history is read through ITS tenant's account (the key's tenant and account,
services/providers/accounts.py): one client per account, never another tenant's. A key of a tenant
or account that is not configured is answered without history (error `no_account`). Fair share:
concurrency is bounded PER ACCOUNT (`HISTORY_FETCHES_PER_ACCOUNT`), not per worker, so one
tenant's slow or rate-limited (429) WATI occupies only its own slots and never delays the fetches of
another tenant's customers on the same worker and partition (tests/integration/test_tenant_clients.py).

The reconciliation sweep (issue 9 point 4) fetches, on a token-bucket budget of
`RECONCILE_RATE_PER_SECOND` getMessages calls per WATI account, the history of WATI customers active
within `RECONCILE_WINDOW_SECONDS`, and delivers it the same way with no batch id; HTTP 429 that
outlasts the client's own retries pauses that account's sweep (backing off) instead of hammering
WATI — never another account's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from services import providers
from services.common import logs, metrics
from services.common.config import Settings
from services.common.keys import parse_key
from services.common.records import ContextCommand, HistoryItem
from services.common.tenants import Tenants, load_tenants
from services.common.timeparse import utcnow
from services.context.state import HistoryFetchOrder
from services.providers.accounts import AccountClients, NoAccount, account_of
from services.providers.base import Client, Provider, ProviderFailure

log = logging.getLogger(__name__)

#: Tries to deliver a fetch result before giving up (the state machine's timeout covers the rest).
COMMAND_SEND_ATTEMPTS = 5
#: Longest pause of the sweep after WATI kept answering 429.
SWEEP_BACKOFF_MAX_SECONDS = 60.0

SendCommand = Callable[[ContextCommand], Awaitable[None]]
NO_ACCOUNT = "no_account"
"""Fetch error of a customer whose tenant or account is not configured (answered without history)."""


def account_slot(customer_key: str) -> tuple[str, str, str]:
    """(tenant, account, provider) of a valid key: the unit of fetch concurrency (one API account)."""
    key = parse_key(customer_key)
    return key.tenant, key.account, key.provider


@dataclass(frozen=True)
class SweepTarget:
    """One customer the reconciliation sweep checks, and how far back its history matters."""

    customer_key: str
    provider_id: str
    last_activity_at: datetime
    stop_before: datetime


@dataclass(frozen=True)
class FetchResult:
    """Parsed history, pages read, and the failure reason (None on success)."""

    history: list[HistoryItem] = field(default_factory=list)
    pages: int = 0
    error: str | None = None
    status: int | None = None


def history_command(
    customer_key: str, batch_id: str | None, result: FetchResult, issued_at: datetime
) -> ContextCommand:
    """The `history_fetched` command that carries a fetch result back to the agent."""
    return {
        "kind": "history_fetched", "customer_key": customer_key, "batch_id": batch_id,
        "issued_at": issued_at, "history": list(result.history), "history_error": result.error,
        "history_pages": result.pages, "actor": None,
    }


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `pause` empties it for a while (429)."""

    def __init__(
        self, rate: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.tokens = self.burst
        self.updated = clock()
        self.paused_until = 0.0

    def wait_time(self) -> float:
        """Seconds until a token is available (0 = take one now)."""
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def take(self) -> bool:
        """Takes a token if one is available now."""
        if self.wait_time() > 0:
            return False
        self.tokens -= 1.0
        return True

    def pause(self, seconds: float) -> None:
        """No tokens for `seconds` (and the saved-up ones are gone)."""
        now = self.clock()
        self.paused_until = max(self.paused_until, now + seconds)
        self.tokens = 0.0
        self.updated = self.paused_until

    async def acquire(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        while not self.take():
            await sleep(max(0.01, self.wait_time()))


def count_history_notice(notice: str) -> None:
    """Counts what `WatiClient.fetch_history` absorbed: a 429 it retried, a history it truncated."""
    if notice == "max_pages":
        metrics.history_truncated_total.labels(notice).inc()
    else:
        metrics.history_fetch_retries_total.labels(notice).inc()


class HistoryFetcher:
    """Runs history fetches as background tasks and delivers their results as commands."""

    def __init__(
        self,
        settings: Settings,
        send_command: SendCommand,
        *,
        tenants: Tenants | None = None,
        clients: AccountClients | None = None,
        per_account: int | None = None,
    ) -> None:
        self.settings = settings
        self.send_command = send_command
        self.tenants = load_tenants(settings) if tenants is None else tenants
        self.clients = clients if clients is not None else AccountClients(settings, self.tenants, "history")
        self.per_account = max(1, per_account or settings.history_fetches_per_account)
        #: one semaphore per account that fetched: bounded by the accounts of the tenants file
        self._limits: dict[tuple[str, str, str], asyncio.Semaphore] = {}
        self._tasks: dict[tuple[str, str | None], asyncio.Task[None]] = {}

    def client(self, provider: Provider, customer_key: str) -> Client | None:
        """The history client of the customer's account, opened on first use (NoAccount: none)."""
        return self.clients.client(provider, customer_key)

    def _limit(self, customer_key: str) -> asyncio.Semaphore:
        slot = account_slot(customer_key)
        limit = self._limits.get(slot)
        if limit is None:
            limit = self._limits[slot] = asyncio.Semaphore(self.per_account)
        return limit

    @property
    def running(self) -> int:
        return sum(1 for t in self._tasks.values() if not t.done())

    def start(self, order: HistoryFetchOrder) -> None:
        """Starts the fetch of a batch; one still running for the same batch is replaced.

        The state machine orders a second fetch only after the first timed out (lost task, worker
        restart, stuck WATI): the old task's late answer would only be a stale duplicate.
        """
        task_key = (order.customer_key, order.batch_id)
        running = self._tasks.get(task_key)
        if running is not None and not running.done():
            running.cancel()
        task = asyncio.ensure_future(self._run_order(order))
        self._tasks[task_key] = task
        task.add_done_callback(lambda t: self._forget(task_key, t))

    def _forget(self, task_key: tuple[str, str | None], task: asyncio.Task[None]) -> None:
        if self._tasks.get(task_key) is task:
            del self._tasks[task_key]
        if not task.cancelled() and task.exception() is not None:
            logs.event(log, "history_task_failed", logging.ERROR, customer=task_key[0],
                       batch_id=task_key[1], error=repr(task.exception()))

    async def _run_order(self, order: HistoryFetchOrder) -> None:
        result = await self.fetch(order.customer_key, order.provider_id, order.stop_before,
                                  purpose="batch", batch_id=order.batch_id)
        await self.deliver(order.customer_key, order.batch_id, result)

    async def deliver(self, customer_key: str, batch_id: str | None, result: FetchResult) -> None:
        """Sends the result to the agent; retries a few times, then leaves it to the state timeout."""
        for attempt in range(COMMAND_SEND_ATTEMPTS):
            try:
                await self.send_command(history_command(customer_key, batch_id, result, utcnow()))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logs.event(log, "history_delivery_retry", logging.WARNING, customer=customer_key,
                           batch_id=batch_id, attempt=attempt + 1, error=type(exc).__name__)
                await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
        logs.event(log, "history_delivery_failed", logging.ERROR, customer=customer_key, batch_id=batch_id)

    async def fetch(
        self,
        customer_key: str,
        provider_id: str,
        stop_before: datetime | None,
        *,
        purpose: str,
        batch_id: str | None = None,
    ) -> FetchResult:
        """One customer's history within HISTORY_TIMEOUT_SECONDS, read through the customer's own
        tenant account (waiting only for that account's other fetches); failures become `error`s."""
        started = time.monotonic()
        try:
            account_of(self.tenants, customer_key)
            provider = providers.by_name(account_slot(customer_key)[2])
            limit = self._limit(customer_key)
        except (NoAccount, providers.UnknownProvider) as exc:
            logs.event(log, "history_no_account", logging.WARNING, customer=customer_key, batch_id=batch_id,
                       reason=getattr(exc, "reason", str(exc)))
            tenant = metrics.key_tenant(customer_key)
            metrics.history_fetch_total.labels("error", tenant).inc()
            metrics.history_fetch_failures_total.labels(NO_ACCOUNT, tenant).inc()
            return FetchResult(error=NO_ACCOUNT)
        async with limit:
            queued = time.monotonic() - started  # waiting for one of the account's fetch slots
            try:
                history, pages = await asyncio.wait_for(
                    provider.fetch_history(
                        self.client(provider, customer_key), provider_id, stop_before=stop_before,
                        max_pages=self.settings.history_max_pages, notice=count_history_notice,
                    ),
                    timeout=self.settings.history_timeout_seconds,
                )
                result = FetchResult(history=history, pages=pages)
            except ProviderFailure as exc:
                result = FetchResult(error=exc.reason, status=exc.status)
            except TimeoutError:
                result = FetchResult(error="timeout")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                result = FetchResult(error=f"unexpected_{type(exc).__name__}")
        outcome = "ok" if result.error is None else "error"
        tenant = metrics.key_tenant(customer_key)
        metrics.history_fetch_total.labels(outcome, tenant).inc()
        if result.error is not None:
            metrics.history_fetch_failures_total.labels(result.error, tenant).inc()
        logs.event(
            log, "history_fetched", logging.INFO if result.error is None else logging.WARNING,
            customer=customer_key, batch_id=batch_id, purpose=purpose, items=len(result.history),
            pages=result.pages, error=result.error, status=result.status,
            seconds=round(time.monotonic() - started, 3), queued_seconds=round(queued, 3),
        )
        return result

    async def close(self) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.clients.aclose()


class ReconcileSweep:
    """Fetches the history of recently active WATI customers on a rate budget, one sweep at a time
    PER ACCOUNT: each account (a tenant's WATI account, the unit WATI rate-limits) has its own token
    bucket of `RECONCILE_RATE_PER_SECOND` and its own back-off on 429, so one tenant's slow or
    rate-limited WATI never delays the sweep of another tenant's customers."""

    def __init__(
        self, settings: Settings, fetcher: HistoryFetcher, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.clock = clock
        #: per account (tenant, account, provider): its budget, back-off and running sweep; bounded by
        #: the accounts whose customers were active (keys of unknown tenants are not swept)
        self.buckets: dict[tuple[str, str, str], TokenBucket] = {}
        self.backoffs: dict[tuple[str, str, str], float] = {}
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}

    def maybe_start(self, candidates: list[SweepTarget]) -> bool:
        """Starts a sweep of each account's candidates unless that account's previous one still runs;
        True when any started."""
        by_account: dict[tuple[str, str, str], list[SweepTarget]] = {}
        for target in candidates:
            try:
                account_of(self.fetcher.tenants, target.customer_key)
            except NoAccount:
                continue  # a tenant or account not configured: nothing to sweep it with
            by_account.setdefault(account_slot(target.customer_key), []).append(target)
        started = False
        for slot, targets in by_account.items():
            running = self._tasks.get(slot)
            if running is not None and not running.done():
                continue
            self._tasks[slot] = asyncio.ensure_future(self.run(targets, slot))
            started = True
        return started

    def bucket(self, slot: tuple[str, str, str]) -> TokenBucket:
        bucket = self.buckets.get(slot)
        if bucket is None:
            bucket = self.buckets[slot] = TokenBucket(
                max(0.01, self.settings.reconcile_rate_per_second), burst=1.0, clock=self.clock)
        return bucket

    async def run(self, candidates: list[SweepTarget], slot: tuple[str, str, str] = ("", "", "")) -> None:
        """One account's sweep over its candidates."""
        bucket = self.bucket(slot)
        checked = 0
        for target in candidates:
            await bucket.acquire()
            result = await self.fetcher.fetch(target.customer_key, target.provider_id, target.stop_before,
                                              purpose="reconcile")
            checked += 1
            if result.error == "rate_limited" or result.status == 429:
                backoff = self.backoffs.get(slot, 1.0)
                bucket.pause(backoff)
                logs.event(log, "reconcile_backoff", logging.WARNING, seconds=backoff, tenant=slot[0],
                           account=slot[1])
                self.backoffs[slot] = min(backoff * 2, SWEEP_BACKOFF_MAX_SECONDS)
                continue
            self.backoffs[slot] = 1.0
            if result.error is None:
                await self.fetcher.deliver(target.customer_key, None, result)
        logs.event(log, "reconcile_sweep_done", customers=len(candidates), checked=checked, tenant=slot[0],
                   account=slot[1])

    @property
    def running(self) -> int:
        """Accounts being swept now."""
        return sum(1 for task in self._tasks.values() if not task.done())

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            if not task.done():
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
