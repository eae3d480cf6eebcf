"""Customer keys with tenants: the format, the single-tenant keys' meaning kept, isolation of two
tenants sharing a phone number, co-partitioning, and a context table of old keys working unchanged."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from services.common import codec
from services.common.config import Settings
from services.common.keys import (
    DEFAULT_ACCOUNT,
    DEFAULT_TENANT,
    CustomerKey,
    KeyError_,
    format_key,
    in_account,
    manychat_key,
    mask,
    parse_key,
    record_key_problem,
    split_key,
    wati_key,
)
from services.common.records import CustomerState
from services.common.tenants import default_tenant
from services.context import state as sm
from services.context.app import build_limits, customer_partition
from services.ingest.outcomes import CustomerMessage
from services.ingest.wati import classify_wati
from tests.unit.context_builders import inbound, limits, roundtrip, secs, t

PHONE = "50370000000"
slugs = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?\Z")
idents = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=30)


# --- the format ---


@pytest.mark.parametrize("key", [
    "wati:50370000000", "wati:US.123124141512", "manychat:991", "wati:ñ", "wati:a:b/c",
])
def test_single_tenant_keys_mean_the_default_tenants_default_account(key: str) -> None:
    parsed = parse_key(key)
    assert (parsed.tenant, parsed.account) == (DEFAULT_TENANT, DEFAULT_ACCOUNT) and parsed.is_default
    assert str(parsed) == key  # canonical: nothing to rewrite
    assert split_key(key) == tuple(key.split(":", 1))


def test_the_default_account_is_written_in_the_single_tenant_form() -> None:
    assert wati_key(PHONE) == wati_key(PHONE, tenant="default", account="default") == f"wati:{PHONE}"
    assert manychat_key("991") == "manychat:991"
    assert format_key("default", "default", "wati", PHONE) == f"wati:{PHONE}"


def test_other_tenants_and_accounts_carry_both_in_the_key() -> None:
    assert wati_key(PHONE, tenant="hotel-a", account="centro") == f"hotel-a/centro/wati:{PHONE}"
    assert wati_key(None, "US.1", tenant="hotel-a", account="centro") == "hotel-a/centro/wati:US.1"
    assert manychat_key("991", tenant="shop-b") == "shop-b/default/manychat:991"
    assert format_key("default", "second", "wati", PHONE) == f"default/second/wati:{PHONE}"
    assert parse_key(f"hotel-a/centro/wati:{PHONE}") == CustomerKey("hotel-a", "centro", "wati", PHONE)
    assert split_key(f"hotel-a/centro/wati:{PHONE}") == ("wati", PHONE)


def test_in_account_scopes_a_normalisers_key() -> None:
    assert in_account(f"wati:{PHONE}", "hotel-a", "centro") == f"hotel-a/centro/wati:{PHONE}"
    assert in_account("manychat:991", "default", "default") == "manychat:991"
    with pytest.raises(KeyError_, match="already scoped"):
        in_account(f"hotel-a/centro/wati:{PHONE}", "shop-b", "default")


@given(tenant=slugs, account=slugs, provider=st.sampled_from(["wati", "manychat"]), ident=idents)
def test_format_and_parse_round_trip(tenant: str, account: str, provider: str, ident: str) -> None:
    ident = ident.strip() or "x"
    key = format_key(tenant, account, provider, ident)
    assert parse_key(key) == CustomerKey(tenant, account, provider, ident)
    assert str(parse_key(key)) == key


def test_two_tenants_with_the_same_customer_phone_get_different_keys() -> None:
    keys = {
        wati_key(PHONE),
        wati_key(PHONE, tenant="hotel-a", account="centro"),
        wati_key(PHONE, tenant="hotel-a", account="playa"),  # two numbers of one business: two customers
        wati_key(PHONE, tenant="shop-b"),
    }
    assert len(keys) == 4
    assert {parse_key(k).ident for k in keys} == {PHONE}


@pytest.mark.parametrize("key", [
    "", "wati", "wati:", "telegram:1", ":1", "wati: 1", "wati:1 ",
    "default/default/wati:50370000000",  # the default account has ONE form (one key per customer)
    "hotel-a/wati:50370000000", "a/b/c/wati:1", "Hotel/main/wati:50370000000", "hotel-a/-x/wati:1",
    "hotel-a//wati:1",
    "hotel-a/main/telegram:1", "hotel-a/main/wati:",
])
def test_malformed_keys_are_rejected_masked(key: str) -> None:
    with pytest.raises(KeyError_) as err:
        parse_key(key)
    with pytest.raises(KeyError_):
        split_key(key)
    ident = key.partition(":")[2]
    if len(ident) > 4:
        assert ident not in str(err.value)  # a phone number never reaches a log


@pytest.mark.parametrize(("args", "reason"), [
    (("Hotel", "main", "wati", "1"), "tenant id 'Hotel' is not a slug"),
    (("hotel", "a/b", "wati", "1"), "account id 'a/b' is not a slug"),
    (("hotel", "main", "sms", "1"), "unknown provider 'sms'"),
    (("hotel", "main", "wati", "  "), "wati customer key needs an id"),
    (("x" * 41, "main", "wati", "1"), "is not a slug"),
])
def test_format_rejects_what_it_cannot_write(args: tuple[str, str, str, str], reason: str) -> None:
    with pytest.raises(KeyError_, match=reason):
        format_key(*args)


def test_mask_keeps_tenant_and_account_but_hides_the_number() -> None:
    assert mask(f"hotel-a/centro/wati:{PHONE}") == "hotel-a/centro/wati:********000"
    assert mask(f"wati:{PHONE}") == "wati:********000"


# --- partitioning ---


@given(tenant=slugs, ident=st.from_regex(r"\A[0-9]{8,15}\Z"), partitions=st.integers(1, 64))
def test_a_tenant_key_is_partitioned_like_every_key(tenant: str, ident: str, partitions: int) -> None:
    """Every topic is keyed by the customer key, so the producer's default partitioner puts all of a
    customer's records (inbound, agent, requests, replies, commands) on one partition number, and the
    context service's own computation agrees with it for tenant keys as for single-tenant keys."""
    key = wati_key(ident, tenant=tenant, account="main")
    expected = DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))
    assert customer_partition(key, partitions) == expected
    assert record_key_problem(key.encode(), key) is None
    assert record_key_problem(wati_key(ident).encode(), key) == (
        "key_mismatch", "Kafka key differs from the record's customer_key")


# --- migration: a context table of single-tenant keys under the tenant-aware code ---

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "wati"


def old_table() -> dict[str, bytes]:
    """A context table as the single-tenant deployment left it: Avro CustomerState values under
    `wati:<waId>` keys, one customer mid-conversation (an answered batch, then a new open one)."""
    key = f"wati:{PHONE}"
    lim = limits()
    state, _ = sm.on_inbound(sm.new_state(key), inbound("m1", t("10:00:00"), key=key),
                             t("10:00:00"), lim)
    state = roundtrip(state)
    assert sm.due_action(state, t("10:00:00") + secs(31), lim) is not None
    return {key: codec.encode("CustomerState", dict(state))}


def ingest_key(wa_id: str) -> str:
    """The key today's ingest gives a WATI text message from `wa_id` (the default tenant)."""
    payload: dict[str, Any] = json.loads((FIXTURES / "text.json").read_text(encoding="utf-8"))
    payload["waId"] = wa_id
    outcome = classify_wati(payload, datetime(2025, 12, 1, tzinfo=UTC))
    assert isinstance(outcome, CustomerMessage)
    return str(outcome.record["customer_key"])


def test_an_old_context_table_is_read_unchanged_for_the_default_tenant() -> None:
    table = old_table()
    for key, value in table.items():
        parsed = parse_key(key)
        assert parsed.is_default and str(parsed) == key  # the stored key is the new code's key
        state = cast(CustomerState, codec.decode("CustomerState", value))
        assert state["customer_key"] == key
    # the new code's ingest keys the same customer the same way: its next message finds its state
    assert ingest_key(PHONE) in table
    assert wati_key(PHONE, tenant="default", account="default") in table


def test_an_old_state_continues_its_conversation_under_the_new_code() -> None:
    table = old_table()
    key = ingest_key(PHONE)
    state = cast(CustomerState, codec.decode("CustomerState", table[key]))
    lim = limits()
    state, _ = sm.on_inbound(state, inbound("m2", t("10:00:10"), key=key), t("10:00:10"), lim)
    batch = state["open_batch"]
    assert batch is not None
    assert [m["event_id"] for m in batch["messages"]] == ["m1", "m2"]  # the old batch, continued
    assert batch["batch_id"] == f"{key}:1"


def test_another_tenant_with_the_same_number_finds_no_state_in_the_old_table() -> None:
    table = old_table()
    other = wati_key(PHONE, tenant="shop-b")
    assert other not in table  # its own fresh state: nothing of the default tenant's conversation
    fresh = sm.new_state(other)
    assert fresh["open_batch"] is None and fresh["customer_key"] == other


def test_the_default_tenants_thresholds_are_the_ones_the_context_service_uses() -> None:
    settings = Settings(quiet_window_seconds=7, max_batch_wait_seconds=70, missed_lookback_seconds=3600,
                        missed_gap_seconds=60, human_hold_seconds=5,
                        customer_overrides='{"customers": {"wati:1": {"missed_gap_seconds": 9}}}')
    thresholds = default_tenant(settings).thresholds
    built = build_limits(settings)
    assert (thresholds.quiet_window_seconds, thresholds.max_batch_wait_seconds,
            thresholds.missed_lookback_seconds, thresholds.policy) == (
        built.quiet_window_seconds, built.max_batch_wait_seconds, built.missed_lookback_seconds,
        built.policy)
