"""The context service's shell helpers without faust or Kafka: due-time index, event decoding,
metrics application, view helpers, the token bucket, and the history fetcher against the WATI
stand-in (the production WatiClient, reached by URL)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from services.common import codec, metrics
from services.common.config import GapPolicy, Settings
from services.common.kafka import Topics
from services.common.records import ContextCommand, CustomerState, InboundMessage
from services.common.tenants import Tenants, parse_tenants
from services.context import state as sm
from services.context.app import (
    CustomerIndex,
    Rejected,
    apply_metric,
    build_limits,
    customer_partition,
    decode_event,
    flush_sleep,
    next_due,
)
from services.context.fetcher import FetchResult, HistoryFetcher, ReconcileSweep, SweepTarget, TokenBucket
from services.context.views import bearer_ok, customer_view, jsonable, parse_actor, parse_paging
from services.providers.accounts import AccountClients
from services.standins import WatiStandIn

from .waiting import until

KEY = "wati:50370001111"
T0 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)
LIMITS = sm.Limits(quiet_window_seconds=30, max_batch_wait_seconds=120, missed_lookback_seconds=86400,
                   missed_max_items=200, history_timeout_seconds=20, policy=GapPolicy(300, 900))
TOPICS = Topics.from_settings(Settings(topic_prefix="u."))


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


def message(text: str, at: datetime, event_id: str, key: str = KEY) -> InboundMessage:
    return {
        "event_id": event_id, "customer_key": key, "channel": "wati", "provider_id": key.split(":")[1],
        "message_type": "text", "text": text, "caption": None, "media_ref": None, "media_mime": None,
        "sender_name": None, "provider_message_ids": [event_id], "provider_time": at, "received_at": at,
        "recovered": False, "username": None,
    }


def with_open_batch(now: datetime, *texts: tuple[str, float]) -> CustomerState:
    """A customer whose burst of messages (text, seconds after `now`) is open."""
    state = sm.new_state(KEY)
    for number, (text, offset) in enumerate(texts):
        state, _ = sm.on_inbound(state, message(text, now + secs(offset), f"e{number}"), now + secs(offset),
                                 LIMITS)
    return state


def flush(state: CustomerState, at: datetime) -> tuple[CustomerState, sm.Effects]:
    batch_id = sm.due_action(state, at, LIMITS)
    assert batch_id is not None
    command: ContextCommand = {"kind": "flush", "customer_key": KEY, "batch_id": batch_id, "issued_at": at,
                               "history": [], "history_error": None, "history_pages": 0, "actor": None}
    return sm.on_command(state, command, at, LIMITS)


# -- next_due agrees with the state machine's due_action ------------------------------------------

def test_next_due_is_the_quiet_window_after_the_last_message() -> None:
    state = with_open_batch(T0, ("a", 0), ("b", 10))
    due = next_due(state, LIMITS)
    assert due == T0 + secs(40)
    assert sm.due_action(state, due - secs(0.001), LIMITS) is None
    assert sm.due_action(state, due, LIMITS) is not None


def test_next_due_is_capped_by_the_max_wait_of_a_never_ending_burst() -> None:
    state = with_open_batch(T0, *[(f"m{i}", i * 25.0) for i in range(6)])  # last at +125 s
    due = next_due(state, LIMITS)
    assert due == T0 + secs(120)
    assert sm.due_action(state, due, LIMITS) is not None
    assert sm.due_action(state, due - secs(0.001), LIMITS) is None


def test_next_due_of_a_flushing_batch_is_its_history_timeout() -> None:
    state = with_open_batch(T0, ("first contact", 0))  # no prior inbound: the history check runs
    state, effects = flush(state, T0 + secs(30))
    assert effects.fetch is not None and state["flushing_batch"] is not None
    due = next_due(state, LIMITS)
    assert due == T0 + secs(50)
    assert sm.due_action(state, due - secs(0.001), LIMITS) is None
    assert sm.due_action(state, due, LIMITS) == state["flushing_batch"]["batch_id"]


def test_next_due_is_none_without_a_pending_batch() -> None:
    assert next_due(sm.new_state(KEY), LIMITS) is None


def test_build_limits_copies_the_thresholds() -> None:
    settings = Settings(quiet_window_seconds=7, max_batch_wait_seconds=70, missed_lookback_seconds=3600,
                        missed_max_items=9, history_timeout_seconds=4, missed_gap_seconds=60,
                        human_hold_seconds=5)
    limits = build_limits(settings)
    assert (limits.quiet_window_seconds, limits.max_batch_wait_seconds, limits.missed_lookback_seconds,
            limits.missed_max_items, limits.history_timeout_seconds) == (7, 70, 3600, 9, 4)
    assert limits.policy.gap_seconds("wati:1") == 60 and limits.policy.hold_seconds("wati:1") == 5


# -- partitioning --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["wati:50370001111", "wati:US.123124141512", "manychat:991", "wati:ñ"])
@pytest.mark.parametrize("partitions", [1, 4, 8, 13])
def test_customer_partition_is_the_producers_default_partition(key: str, partitions: int) -> None:
    expected = DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))
    assert customer_partition(key, partitions) == expected


# -- the due index ---------------------------------------------------------------------------------

def test_index_returns_due_customers_once_and_skips_stale_times() -> None:
    index = CustomerIndex()
    early = with_open_batch(T0, ("a", 0))
    late = with_open_batch(T0 + secs(100), ("b", 0))
    index.update("wati:1", 0, early, LIMITS)
    index.update("wati:2", 1, late, LIMITS)
    assert index.due(T0 + secs(29)) == []
    assert index.due(T0 + secs(30)) == ["wati:1"]
    assert index.due(T0 + secs(31)) == []  # popped: only defer/update bring it back
    index.update("wati:2", 1, with_open_batch(T0 + secs(200), ("c", 0)), LIMITS)  # moved later
    assert index.due(T0 + secs(131)) == []  # the stale heap entry (T0+130) is skipped
    assert index.due(T0 + secs(230)) == ["wati:2"]
    index.defer("wati:1", T0 + secs(300))
    assert index.due(T0 + secs(300)) == ["wati:1"]


def test_index_forgets_customers_without_pending_batches() -> None:
    index = CustomerIndex()
    state = with_open_batch(T0, ("a", 0))
    index.update(KEY, 2, state, LIMITS)
    assert [k for k, _ in index.pending()] == [KEY] and index.open_count() == 1
    gap_ok = dataclasses.replace(LIMITS, policy=GapPolicy(10**9, 900), history_every_batch=False)
    state = with_open_batch(T0, ("a", 0))
    state["last_inbound_at"] = T0  # not a first contact any more: no history check, answered now
    state["open_batch"]["prior_last_inbound_at"] = T0 - secs(60)  # type: ignore[index]
    batch_id = sm.due_action(state, T0 + secs(30), gap_ok)
    assert batch_id is not None
    done, effects = sm.on_command(state, {
        "kind": "flush", "customer_key": KEY, "batch_id": batch_id, "issued_at": T0 + secs(30), "history": [],
        "history_error": None, "history_pages": 0, "actor": None}, T0 + secs(30), gap_ok)
    assert effects.responder_requests
    index.update(KEY, 2, done, gap_ok)
    assert index.pending() == [] and index.open_count() == 0
    assert index.due(T0 + secs(10**6)) == []


def test_index_resends_a_handled_flush_only_after_the_resend_delay() -> None:
    index = CustomerIndex(resend_after=5.0, unhandled_resend_after=60.0)
    assert index.should_send(KEY, "b1", 100.0)
    index.mark_sent(KEY, "b1", 100.0)
    assert index.should_send(KEY, "b2", 101.0)  # another batch is another flush
    index.flush_handled(KEY, "b2")  # a flush of another batch says nothing about b1's
    assert not index.should_send(KEY, "b1", 104.9)
    index.flush_handled(KEY, "b1")  # the agent handled it, the state did not change
    assert not index.should_send(KEY, "b1", 104.9)
    assert index.should_send(KEY, "b1", 105.0)
    index.update(KEY, 0, with_open_batch(T0, ("a", 0)), LIMITS)  # changed after it: decide afresh
    assert index.should_send(KEY, "b1", 101.0)


def test_index_sends_no_second_flush_while_the_first_waits_for_the_agent() -> None:
    """A lagging agent handles a later message of the batch before the flush command the timer sent:
    that is no reason for another command (an instrumented bench run handled ~3.7 copies per batch)."""
    index = CustomerIndex(resend_after=5.0)
    index.unhandled_resend_after = 60.0
    index.mark_sent(KEY, "b1", 100.0)
    index.update(KEY, 0, with_open_batch(T0, ("a", 0), ("b", 1)), LIMITS)  # message b handled
    assert not index.should_send(KEY, "b1", 101.0)
    assert not index.should_send(KEY, "b1", 159.9)  # still not handled: no copy every 5 s either
    assert index.should_send(KEY, "b1", 160.0)  # the safety net
    index.mark_sent(KEY, "b1", 160.0)
    index.flush_handled(KEY, "b1")
    index.update(KEY, 0, with_open_batch(T0, ("a", 0), ("b", 1)), LIMITS)
    assert index.should_send(KEY, "b1", 160.1)


def test_index_wakes_the_flush_loop_only_for_a_new_earliest_due_time() -> None:
    wakeups: list[int] = []
    index = CustomerIndex(on_earlier_due=lambda: wakeups.append(1))
    assert index.next_due_at() is None
    index.update("wati:1", 0, with_open_batch(T0, ("a", 0)), LIMITS)  # due T0+30: the first
    assert len(wakeups) == 1 and index.next_due_at() == T0 + secs(30)
    index.update("wati:2", 1, with_open_batch(T0 + secs(10), ("b", 0)), LIMITS)  # due later: no wake-up
    assert len(wakeups) == 1 and index.next_due_at() == T0 + secs(30)
    index.update("wati:3", 2, with_open_batch(T0 - secs(10), ("c", 0)), LIMITS)  # due earlier: wake up
    assert len(wakeups) == 2 and index.next_due_at() == T0 + secs(20)
    index.defer("wati:2", T0 + secs(1))  # a deferral can be the earliest too
    assert len(wakeups) == 3 and index.next_due_at() == T0 + secs(1)
    assert index.due(T0 + secs(30)) == ["wati:2", "wati:3", "wati:1"]
    assert index.next_due_at() == T0 + secs(40)  # only wati:2's stale entry is left


def test_flush_sleep_is_until_the_earliest_due_time_within_bounds() -> None:
    assert flush_sleep(None, T0, 0.2) == 0.2  # nothing pending: the longest sleep
    assert flush_sleep(T0 + secs(0.05), T0, 0.2) == pytest.approx(0.05)  # exactly until it is due
    assert flush_sleep(T0 + secs(5), T0, 0.2) == 0.2  # never longer than the longest sleep
    assert 0 < flush_sleep(T0 - secs(1), T0, 0.2) < 0.01  # overdue: look again at once, never spin


def test_index_keeps_only_the_partitions_it_still_owns() -> None:
    index = CustomerIndex()
    index.update("wati:1", 0, with_open_batch(T0, ("a", 0)), LIMITS)
    index.update("wati:2", 3, with_open_batch(T0, ("b", 0)), LIMITS)
    index.keep_partitions({3})
    assert list(index.entries) == ["wati:2"]
    assert index.due(T0 + secs(60)) == ["wati:2"]


def test_reconcile_candidates_are_recent_wati_customers_with_the_sweep_window() -> None:
    index = CustomerIndex()
    now = T0 + timedelta(days=3)
    recent = with_open_batch(now - secs(600), ("hi", 0))
    recent["last_reply_at"] = now - secs(300)
    index.update("wati:recent", 0, recent, LIMITS)
    never_replied = with_open_batch(now - secs(60), ("hello", 0))
    index.update("wati:new", 0, never_replied, LIMITS)
    stale = with_open_batch(now - secs(7200), ("old", 0))
    index.update("wati:stale", 0, stale, LIMITS)
    other = with_open_batch(now - secs(30), ("fb", 0))
    other["channel"] = "facebook"
    index.update("manychat:1", 0, other, LIMITS)
    targets = index.reconcile_candidates(now, window_seconds=3600)
    assert [t.customer_key for t in targets] == ["wati:new", "wati:recent"]
    assert targets[0].stop_before == now - timedelta(hours=24)
    assert targets[1].stop_before == now - secs(300)
    assert targets[0].provider_id == KEY.split(":")[1]


# -- decoding input events ---------------------------------------------------------------------------

def test_decode_event_accepts_the_topics_record() -> None:
    value = codec.encode("InboundMessage", dict(message("hi", T0, "e1")))
    customer, name, record = decode_event(TOPICS, TOPICS.inbound, KEY.encode(), value)
    assert (customer, name, record["text"]) == (KEY, "InboundMessage", "hi")


@pytest.mark.parametrize(("topic", "key", "value", "reason"), [
    (TOPICS.inbound, KEY.encode(), b"\x00garbage", "undecodable"),
    (TOPICS.inbound, KEY.encode(), None, "undecodable"),
    (TOPICS.replies, KEY.encode(), codec.encode("InboundMessage", dict(message("x", T0, "e"))),
     "wrong_record_type"),
    (TOPICS.inbound, None, codec.encode("InboundMessage", dict(message("x", T0, "e"))), "missing_key"),
    (TOPICS.inbound, b"\xff\xfe", codec.encode("InboundMessage", dict(message("x", T0, "e"))), "bad_key"),
    (TOPICS.inbound, b"wati:other", codec.encode("InboundMessage", dict(message("x", T0, "e"))),
     "key_mismatch"),
    (TOPICS.audit, KEY.encode(), codec.encode("InboundMessage", dict(message("x", T0, "e"))),
     "unknown_topic"),
])
def test_decode_event_rejects_with_a_reason(topic: str, key: bytes | None, value: bytes | None,
                                            reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        decode_event(TOPICS, topic, key, value)
    assert caught.value.reason == reason and caught.value.error


# -- metrics ---------------------------------------------------------------------------------------------

def sample(name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels or {})
    return float(value or 0.0)


def test_apply_metric_counts_observes_and_ignores_unknown_names() -> None:
    flushed = {"route": "responder", "tenant": "default"}
    before = sample("watistream_batches_flushed_total", flushed)
    apply_metric("batches_flushed_total", {"route": "responder"}, 1, KEY)
    assert sample("watistream_batches_flushed_total", flushed) == before + 1
    count = sample("watistream_missed_messages_per_batch_count")
    apply_metric("missed_per_batch", {}, 3.0)
    assert sample("watistream_missed_messages_per_batch_count") == count + 1
    missing = sample("watistream_webhooks_missing_total", {"tenant": "default"})
    apply_metric("webhooks_missing_total", {}, 2, KEY)
    assert sample("watistream_webhooks_missing_total", {"tenant": "default"}) == missing + 2
    apply_metric("no_such_metric", {}, 1)  # logged, never raised
    apply_metric("webhooks_missing_total", {}, -1, KEY)  # a counter never goes down
    assert sample("watistream_webhooks_missing_total", {"tenant": "default"}) == missing + 2


def test_apply_metric_labels_by_the_customers_tenant_bounded() -> None:
    """The shell adds the customer's tenant; a tenant this process was not configured with is `other`."""
    configured = metrics.bounded_tenants()
    metrics.bound_tenants(["hotel-a"])
    try:
        held = {"reason": "human_active"}
        ours = sample("watistream_batches_held_total", held | {"tenant": "hotel-a"})
        other = sample("watistream_batches_held_total", held | {"tenant": "other"})
        apply_metric("batches_held_total", held, 1, "hotel-a/centro/wati:50370001111")
        apply_metric("batches_held_total", held, 1, "hotel-zz/centro/wati:50370001111")
        assert sample("watistream_batches_held_total", held | {"tenant": "hotel-a"}) == ours + 1
        assert sample("watistream_batches_held_total", held | {"tenant": "other"}) == other + 1
        assert sample("watistream_batches_held_total", held | {"tenant": "hotel-zz"}) == 0.0
    finally:
        metrics.bound_tenants(configured)


# -- view helpers -------------------------------------------------------------------------------------

def test_bearer_ok_needs_the_exact_token() -> None:
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer  s3cret ", "s3cret")
    for header in (None, "", "Bearer", "Bearer s3cre", "Basic s3cret", "s3cret", "Bearer s3cret2"):
        assert not bearer_ok(header, "s3cret"), header
    assert not bearer_ok("Bearer ", "")  # an empty token never opens the views


def test_parse_paging() -> None:
    assert parse_paging({}) == (False, 1, 50)
    assert parse_paging({"open": "1", "page": "3", "page_size": "10"}) == (True, 3, 10)
    for bad in ({"page": "0"}, {"page_size": "0"}, {"page_size": "501"}, {"page": "x"}):
        with pytest.raises(ValueError):
            parse_paging(bad)


def test_parse_actor() -> None:
    assert parse_actor(b"") is None and parse_actor(b"{}") is None
    assert parse_actor(b'{"actor": " Ana "}') == "Ana"
    for bad in (b"nope", b"[1]", b'{"actor": 5}', b'{"actor": ""}', b'{"actor": "' + b"x" * 201 + b'"}'):
        with pytest.raises(ValueError):
            parse_actor(bad)


def test_customer_view_is_json_ready_with_a_status() -> None:
    state = with_open_batch(T0, ("a", 0))
    view = customer_view(state, "http://w:1")
    assert view["status"] == "open" and view["open_batch"]["opened_at"] == "2026-03-02T12:00:00Z"
    assert view["state"]["last_inbound_at"] == "2026-03-02T12:00:00Z"
    state["paused"] = True
    assert customer_view(state, "w")["status"] == "paused"
    assert jsonable({"b": b"x", "l": (T0,)}) == {"b": "x", "l": ["2026-03-02T12:00:00Z"]}


# -- token bucket ---------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_spends_the_rate_and_pauses() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, burst=1.0, clock=clock)
    assert bucket.take()
    assert not bucket.take()
    assert bucket.wait_time() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take()
    clock.now += 10  # saved up at most `burst`
    assert bucket.take() and not bucket.take()
    bucket.pause(3.0)
    clock.now += 2.9
    assert not bucket.take() and bucket.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    assert not bucket.take()  # the pause emptied the bucket: the next token comes at the rate
    clock.now += 0.5
    assert bucket.take()
    with pytest.raises(ValueError):
        TokenBucket(0)


# -- the history fetcher against the WATI stand-in -------------------------------------------------------

@pytest.fixture(scope="module")
async def wati_server() -> AsyncIterator[WatiStandIn]:
    async with WatiStandIn() as server:
        yield server


@pytest.fixture
async def wati(wati_server: WatiStandIn) -> AsyncIterator[WatiStandIn]:
    wati_server.reset()
    yield wati_server
    wati_server.reset()


class Commands:
    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[ContextCommand] = []
        self.fail_first = fail_first

    async def __call__(self, command: ContextCommand) -> None:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ConnectionError("broker down")
        self.sent.append(command)


def fetcher_for(wati: WatiStandIn, commands: Commands, **overrides: Any) -> HistoryFetcher:
    settings = Settings(wati_api_url=wati.url, wati_api_token=wati.token, history_timeout_seconds=2.0,
                        **overrides)
    return HistoryFetcher(settings, commands)


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    await until(check, timeout=timeout, what="timed out", poll=0.01)


async def test_fetch_order_delivers_parsed_history_as_a_command(wati: WatiStandIn) -> None:
    wati.add_message("50370001111", text="agent said", owner=True, operator_name="Ana", at=T0)
    wati.add_message("50370001111", text="customer said", owner=False, at=T0 + secs(5), ts_format="unix")
    commands = Commands(fail_first=1)  # the first delivery fails: it is retried
    fetcher = fetcher_for(wati, commands)
    try:
        fetcher.start(sm.HistoryFetchOrder(KEY, "50370001111", f"{KEY}:1", T0 - secs(60)))
        await wait_until(lambda: commands.sent)
    finally:
        await fetcher.close()
    command = commands.sent[0]
    assert command["kind"] == "history_fetched" and command["batch_id"] == f"{KEY}:1"
    assert command["customer_key"] == KEY and command["history_error"] is None
    assert command["history_pages"] == 1
    assert sorted(i["text"] for i in command["history"]) == ["agent said", "customer said"]
    assert all(i["at"] is not None and i["at"].tzinfo is not None for i in command["history"])
    codec.encode("ContextCommand", dict(command))  # matches the schema


@pytest.mark.parametrize(("status", "reason"), [(500, "server_error"), (401, "unauthorized"),
                                                (200, "bad_response")])
async def test_fetch_failures_become_reason_codes(wati: WatiStandIn, status: int, reason: str) -> None:
    wati.fail_next("getMessages", status, body="<html>oops</html>" if status == 200 else None)
    fetcher = fetcher_for(wati, Commands())
    before = sample("watistream_history_fetch_failures_total", {"reason": reason, "tenant": "default"})
    try:
        result = await fetcher.fetch(KEY, "50370001111", None, purpose="batch")
    finally:
        await fetcher.close()
    assert result == FetchResult(error=reason, status=status)
    assert sample("watistream_history_fetch_failures_total",
                  {"reason": reason, "tenant": "default"}) == before + 1


async def test_a_customer_of_an_unconfigured_tenant_is_never_fetched_from_another_account(
    wati: WatiStandIn,
) -> None:
    """A key whose tenant is not configured (removed from TENANTS_FILE): answered without history,
    and the default account is not asked about its number (which it knows as its own customer)."""
    wati.add_message("50370001111", text="the default tenant's conversation", owner=False, at=T0)
    fetcher = fetcher_for(wati, Commands())
    no_account = {"reason": "no_account", "tenant": "other"}  # a tenant not configured: bounded
    before = sample("watistream_history_fetch_failures_total", no_account)
    try:
        result = await fetcher.fetch("hotel-a/centro/wati:50370001111", "50370001111", None, purpose="batch")
    finally:
        await fetcher.close()
    assert result == FetchResult(error="no_account")
    assert wati.requests == []
    assert sample("watistream_history_fetch_failures_total", no_account) == before + 1


@pytest.fixture
async def two_watis() -> AsyncIterator[tuple[WatiStandIn, WatiStandIn]]:
    """Two WATI accounts: different tenant ids (in the API URL) and different tokens."""
    async with WatiStandIn("token-of-playa", tenant="302222") as playa, \
            WatiStandIn("token-of-shop", tenant="401111") as shop:
        yield playa, shop


def two_tenants(playa: WatiStandIn, shop: WatiStandIn, **overrides: Any) -> tuple[Settings, Tenants]:
    settings = Settings(history_timeout_seconds=30.0, **overrides)
    tenants = parse_tenants({"tenants": [
        {"id": "playa", "webhook_secret": "env:PLAYA_HOOK",
         "wati": {"id": "reception", "api_url": playa.url, "token": "env:PLAYA_WATI"}},
        {"id": "shop", "webhook_secret": "env:SHOP_HOOK",
         "wati": {"api_url": shop.url, "token": "env:SHOP_WATI"}},
    ]}, settings, "tenants.json")
    return settings, tenants


def two_tenant_fetcher(playa: WatiStandIn, shop: WatiStandIn, **overrides: Any) -> HistoryFetcher:
    settings, tenants = two_tenants(playa, shop, **overrides)
    environ = {"PLAYA_WATI": playa.token, "SHOP_WATI": shop.token}
    return HistoryFetcher(settings, Commands(), tenants=tenants,
                          clients=AccountClients(settings, tenants, "history", environ=environ))


async def test_each_tenants_history_is_read_from_its_own_account_only(
    two_watis: tuple[WatiStandIn, WatiStandIn],
) -> None:
    """Two tenants share a phone number: each key's history comes from its tenant's WATI account
    (its tenant id, its token), and neither account is ever asked about the other's customer."""
    playa, shop = two_watis
    playa.add_message("50370001111", text="playa's conversation", owner=False, at=T0)
    shop.add_message("50370001111", text="shop's conversation", owner=False, at=T0)
    fetcher = two_tenant_fetcher(playa, shop)
    try:
        of_playa = await fetcher.fetch("playa/reception/wati:50370001111", "50370001111", None,
                                       purpose="batch")
        of_shop = await fetcher.fetch("shop/default/wati:50370001111", "50370001111", None, purpose="batch")
        again = await fetcher.fetch("playa/reception/wati:50370001111", "50370001111", None,
                                    purpose="batch")
        unknown = await fetcher.fetch("playa/restaurant/wati:50370001111", "50370001111", None,
                                      purpose="batch")
        assert len(fetcher.clients) == 2  # one client per account, reused
    finally:
        await fetcher.close()
    assert [i["text"] for i in of_playa.history] == ["playa's conversation"] == [
        i["text"] for i in again.history]
    assert [i["text"] for i in of_shop.history] == ["shop's conversation"]
    assert unknown == FetchResult(error="no_account")  # an account the tenant does not have
    assert [r.path for r in playa.requests] == ["/302222/api/v1/getMessages/50370001111"] * 2
    assert [r.path for r in shop.requests] == ["/401111/api/v1/getMessages/50370001111"]
    assert {r.headers["Authorization"] for r in playa.requests} == {"Bearer token-of-playa"}
    assert {r.headers["Authorization"] for r in shop.requests} == {"Bearer token-of-shop"}


async def test_a_hung_tenant_account_does_not_delay_another_tenants_fetches(
    two_watis: tuple[WatiStandIn, WatiStandIn],
) -> None:
    """Fair share: the slow tenant's fetches fill only its own account's slots; the other tenant's
    customer is fetched while every slow fetch still hangs (a shared pool would make it wait)."""
    playa, shop = two_watis
    shop.add_message("50370009999", text="shop's conversation", owner=False, at=T0)
    fetcher = two_tenant_fetcher(playa, shop, history_fetches_per_account=2)
    playa.hold_requests()
    slow = [asyncio.ensure_future(fetcher.fetch(f"playa/reception/wati:5037000{n:04d}", f"5037000{n:04d}",
                                                None, purpose="batch")) for n in range(20)]
    try:
        await wait_until(lambda: playa.held == 2)  # its two slots are taken; 18 wait for them
        fast = await asyncio.wait_for(
            fetcher.fetch("shop/default/wati:50370009999", "50370009999", None, purpose="batch"), 10.0)
        assert [i["text"] for i in fast.history] == ["shop's conversation"]
        assert playa.held == 2 and not any(task.done() for task in slow)
    finally:
        playa.release_requests()
        results = await asyncio.gather(*slow)
        await fetcher.close()
    assert all(r.error is None for r in results) and len(playa.requests) == 20


async def test_a_rate_limited_tenant_account_does_not_delay_another_tenants_fetches(
    two_watis: tuple[WatiStandIn, WatiStandIn],
) -> None:
    """Fair share under 429: `playa`'s WATI answers 429 with a long Retry-After; its fetches wait out
    the back-off inside their own account's slots, and `shop`'s customer is fetched meanwhile."""
    playa, shop = two_watis
    shop.add_message("50370009999", text="shop's conversation", owner=False, at=T0)
    playa.fail_next("getMessages", 429, times=100, headers={"Retry-After": "30"})
    fetcher = two_tenant_fetcher(playa, shop, history_fetches_per_account=2)
    slow = [asyncio.ensure_future(fetcher.fetch(f"playa/reception/wati:5037000{n:04d}", f"5037000{n:04d}",
                                                None, purpose="batch")) for n in range(5)]
    try:
        await wait_until(lambda: len(playa.requests) == 2)  # both slots backing off on a 429
        fast = await asyncio.wait_for(
            fetcher.fetch("shop/default/wati:50370009999", "50370009999", None, purpose="batch"), 10.0)
        assert [i["text"] for i in fast.history] == ["shop's conversation"]
        assert not any(task.done() for task in slow) and len(playa.requests) == 2
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        await fetcher.close()


async def test_fetch_retries_429_and_times_out_a_slow_wati(wati: WatiStandIn) -> None:
    wati.add_message("50370001111", text="hello", owner=False, at=T0)
    wati.fail_next("getMessages", 429)
    fetcher = fetcher_for(wati, Commands())
    try:
        ok = await fetcher.fetch(KEY, "50370001111", None, purpose="batch")
        assert ok.error is None and [i["text"] for i in ok.history] == ["hello"]
        wati.latency = 5.0
        slow = await fetcher.fetch(KEY, "50370001111", None, purpose="batch")
    finally:
        await fetcher.close()
    assert slow.error == "timeout" and slow.history == []


async def test_a_second_order_for_the_same_batch_replaces_the_running_fetch(wati: WatiStandIn) -> None:
    wati.latency = 0.5
    commands = Commands()
    fetcher = fetcher_for(wati, commands)
    order = sm.HistoryFetchOrder(KEY, "50370001111", f"{KEY}:7", None)
    try:
        fetcher.start(order)
        await asyncio.sleep(0)
        fetcher.start(order)
        await wait_until(lambda: commands.sent)
        await wait_until(lambda: fetcher.running == 0)
    finally:
        await fetcher.close()
    assert len(commands.sent) == 1


async def test_sweep_delivers_history_without_batch_id_and_backs_off_on_429(wati: WatiStandIn) -> None:
    wati.add_message("50370002222", text="lost message", owner=False, at=T0)
    commands = Commands()
    settings = Settings(wati_api_url=wati.url, wati_api_token=wati.token, history_timeout_seconds=2.0,
                        reconcile_rate_per_second=50.0)
    fetcher = HistoryFetcher(settings, commands)
    sweep = ReconcileSweep(settings, fetcher)
    targets = [SweepTarget("wati:50370001111", "50370001111", T0, T0 - secs(60)),
               SweepTarget("wati:50370002222", "50370002222", T0, T0 - secs(60))]
    wati.fail_next("getMessages", 429, times=6)  # outlasts the client's own 5 retries
    try:
        assert sweep.maybe_start(targets)
        assert not sweep.maybe_start(targets)  # one sweep at a time
        await wait_until(lambda: sweep.running == 0)
    finally:
        await sweep.close()
        await fetcher.close()
    assert [c["customer_key"] for c in commands.sent] == ["wati:50370002222"]
    assert commands.sent[0]["batch_id"] is None
    assert [i["text"] for i in commands.sent[0]["history"]] == ["lost message"]
    default_account = ("default", "default", "wati")
    assert sweep.backoffs[default_account] == 1.0  # reset by the successful fetch after the back-off
    assert sweep.buckets[default_account].paused_until > 0


async def test_a_hung_tenant_account_does_not_hold_up_the_sweep_of_another_tenant(
    two_watis: tuple[WatiStandIn, WatiStandIn],
) -> None:
    """Each account is swept on its own budget: `shop`'s customer is checked (and its history
    delivered) while `playa`'s WATI hangs on the customer listed before it."""
    playa, shop = two_watis
    shop.add_message("50370002222", text="shop's lost message", owner=False, at=T0)
    settings, tenants = two_tenants(playa, shop, reconcile_rate_per_second=50.0)
    commands = Commands()
    environ = {"PLAYA_WATI": playa.token, "SHOP_WATI": shop.token}
    fetcher = HistoryFetcher(settings, commands, tenants=tenants,
                             clients=AccountClients(settings, tenants, "history", environ=environ))
    sweep = ReconcileSweep(settings, fetcher)
    targets = [SweepTarget("playa/reception/wati:50370001111", "50370001111", T0, T0 - secs(60)),
               SweepTarget("shop/default/wati:50370002222", "50370002222", T0, T0 - secs(60)),
               SweepTarget("gone/default/wati:50370003333", "50370003333", T0, T0 - secs(60))]
    playa.hold_requests()
    try:
        assert sweep.maybe_start(targets)
        await wait_until(lambda: bool(commands.sent))
        assert [c["customer_key"] for c in commands.sent] == ["shop/default/wati:50370002222"]
        assert playa.held == 1 and sweep.running == 1  # playa's sweep still waits for its WATI
        assert not sweep.maybe_start(targets[:1])  # one sweep per account at a time
    finally:
        playa.release_requests()
        await wait_until(lambda: sweep.running == 0)
        await sweep.close()
        await fetcher.close()
    assert len(sweep.buckets) == 2  # the unknown tenant is not swept


# -- the app factory and readiness (no broker: nothing is started) ------------------------------------

def test_create_app_configures_faust_safely(tmp_path: Any) -> None:
    from services.context.app import AGENT_NAME, create_app

    settings = Settings(kafka_bootstrap_servers="k1:9092,k2:9092", topic_prefix="p.", topic_partitions=6,
                        context_web_port=16066, data_dir=str(tmp_path), broker_session_timeout_seconds=9,
                        web_token="t", context_store="memory")
    app = create_app(settings)
    conf = app.conf
    assert conf.id == "p.context"
    assert [str(u) for u in conf.broker] == ["kafka://k1:9092", "kafka://k2:9092"]
    assert str(conf.store) == "memory:" and conf.topic_partitions == 6
    assert conf.web_tables_enabled is False and conf.web_router_enabled is False
    assert conf.web_stats_enabled is False and conf.web_graph_enabled is False
    assert conf.web_bind == "127.0.0.1" and conf.web_port == 16066 and conf.web_host == "127.0.0.1"
    assert conf.broker_session_timeout == 9 and conf.broker_heartbeat_interval < 9 / 3
    assert str(conf.datadir).endswith("context-16066")
    assert [(a.name, a.concurrency) for a in app.agents.values()] == [(AGENT_NAME, 1)]  # stateful: one
    assert list(app.tables) == ["customers"]
    assert app.tables["customers"].changelog_topic.get_topic_name() == "p.context-customers-changelog"
    rocks = create_app(dataclasses.replace(settings, context_store="rocksdb"))
    assert str(rocks.conf.store) == "rocksdb:"


async def test_readiness_reports_a_crashed_agent() -> None:
    from services.context.app import create_app

    app = create_app(Settings(kafka_bootstrap_servers="k:9092", topic_prefix="r.", web_token="t",
                              context_store="memory"))
    runtime = app.runtime
    ready, details = runtime.readiness()
    assert not ready and details["reason"] == "rebalancing"  # never assigned yet
    app.rebalancing_count = 1
    runtime.index_ready = True
    assert runtime.readiness()[0] is True
    await runtime.on_agent_error(None, ValueError("boom"))
    ready, details = runtime.readiness()
    assert not ready and details["reason"] == "agent stopped: ValueError: boom"
    assert sample("watistream_agent_up", {"service": "context", "agent": "context-events"}) == 0.0


def test_the_worker_refuses_to_start_without_its_secrets() -> None:
    from services.common.config import ConfigError
    from services.context.main import check_settings

    complete = Settings(kafka_bootstrap_servers="k:9092", web_token="t", wati_api_url="http://w/1",
                        wati_api_token="x")
    check_settings(complete)
    for missing in ("web_token", "wati_api_url", "wati_api_token", "kafka_bootstrap_servers"):
        with pytest.raises(ConfigError, match=r"missing required|no channel enabled"):
            check_settings(dataclasses.replace(complete, **{missing: ""}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CONTEXT_STORE"):
        check_settings(dataclasses.replace(complete, context_store="redis"))
