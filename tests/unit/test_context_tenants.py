"""Tenants in the context service: each customer gets its tenant's thresholds, and two tenants'
customers with the same phone number are two states, two batches, two requests."""

from __future__ import annotations

import json

from services.common.config import Settings
from services.common.keys import wati_key
from services.common.tenants import load_tenants, parse_tenants
from services.context import state as sm
from services.context.app import TenantLimits, build_limits, next_due
from tests.unit.context_builders import Customer, inbound, secs, t

PHONE = "50376973593"
SETTINGS = Settings(quiet_window_seconds=30, max_batch_wait_seconds=120, missed_gap_seconds=300,
                    human_hold_seconds=900, missed_lookback_seconds=86400,
                    customer_overrides=json.dumps(
                        {"customers": {f"wati:{PHONE}": {"human_hold_seconds": 5}}}))
TENANTS = parse_tenants({"tenants": [
    {"id": "default", "wati": {"api_url": "https://live.wati.example/1", "token": "env:WATI_API_TOKEN"},
     "webhook_secret": "env:WEBHOOK_TOKEN",
     "customer_overrides": {"customers": {f"wati:{PHONE}": {"human_hold_seconds": 5}}}},
    {"id": "hotel-a", "wati": {"id": "centro", "api_url": "https://live.wati.example/2", "token": "env:A"},
     "webhook_secret": "env:A_HOOK",
     "thresholds": {"quiet_window_seconds": 10, "max_batch_wait_seconds": 40, "missed_lookback_seconds": 600,
                    "missed_gap_seconds": 60, "human_hold_seconds": 0},
     "customer_overrides": {"groups": {"vip": {"missed_gap_seconds": 1}},
                            "customers": {f"hotel-a/centro/wati:{PHONE}": "vip"}}},
]}, SETTINGS)
LIMITS_FOR = TenantLimits.build(SETTINGS, TENANTS)
DEFAULT_KEY = wati_key(PHONE)
HOTEL_KEY = wati_key(PHONE, tenant="hotel-a", account="centro")


def test_without_a_tenants_file_every_customer_gets_the_deployments_limits() -> None:
    limits_for = TenantLimits.build(SETTINGS, load_tenants(SETTINGS))
    assert limits_for(DEFAULT_KEY) == build_limits(SETTINGS) == limits_for.base


def test_each_customer_gets_its_tenants_thresholds() -> None:
    hotel = LIMITS_FOR(HOTEL_KEY)
    assert (hotel.quiet_window_seconds, hotel.max_batch_wait_seconds, hotel.missed_lookback_seconds) == (
        10, 40, 600)
    assert hotel.policy.gap_seconds(HOTEL_KEY) == 1  # its group override
    assert hotel.policy.gap_seconds(wati_key("1", tenant="hotel-a", account="centro")) == 60
    assert hotel.policy.hold_seconds(HOTEL_KEY) == 0
    default = LIMITS_FOR(DEFAULT_KEY)
    assert (default.quiet_window_seconds, default.policy.hold_seconds(DEFAULT_KEY)) == (30, 5)
    # what the tenants do not set stays the deployment's
    assert hotel.missed_max_items == default.missed_max_items == LIMITS_FOR.base.missed_max_items
    assert hotel.history_every_batch == LIMITS_FOR.base.history_every_batch


def test_a_key_of_no_configured_tenant_keeps_the_deployments_limits() -> None:
    assert LIMITS_FOR(wati_key(PHONE, tenant="removed", account="x")) == LIMITS_FOR.base
    assert LIMITS_FOR("not a key") == LIMITS_FOR.base


def test_two_tenants_sharing_a_phone_number_have_separate_state_and_batches() -> None:
    ours = Customer(DEFAULT_KEY, LIMITS_FOR(DEFAULT_KEY))
    theirs = Customer(HOTEL_KEY, LIMITS_FOR(HOTEL_KEY))
    t0 = t("10:00:00")
    ours.message(inbound("wamid.1", t0, "room for tonight?", key=DEFAULT_KEY))
    theirs.message(inbound("wamid.2", t0, "table for two?", key=HOTEL_KEY))
    # hotel-a's quiet window (10 s) ends its batch before the default tenant's (30 s)
    assert next_due(theirs.state, theirs.limits) == t0 + secs(10)
    assert next_due(ours.state, ours.limits) == t0 + secs(30)
    assert ours.due(t0 + secs(10)) is None

    effects = theirs.flush(t0 + secs(10))
    assert effects.fetch is not None and effects.fetch.customer_key == HOTEL_KEY  # its own history
    theirs.history(t0 + secs(11))
    (request,) = theirs.requests
    assert request["customer_key"] == HOTEL_KEY and request["batch_id"] == f"{HOTEL_KEY}:1"
    assert [m["text"] for m in request["messages"]] == ["table for two?"]
    # the default tenant's customer is untouched: its own open batch, its own text only
    assert ours.requests == [] and ours.state["customer_key"] == DEFAULT_KEY
    open_batch = ours.state["open_batch"]
    assert open_batch is not None and [m["text"] for m in open_batch["messages"]] == ["room for tonight?"]
    assert open_batch["batch_id"] == f"{DEFAULT_KEY}:1" != request["batch_id"]


def test_a_state_made_for_one_tenant_is_never_the_others() -> None:
    assert sm.new_state(HOTEL_KEY)["customer_key"] != sm.new_state(DEFAULT_KEY)["customer_key"]
