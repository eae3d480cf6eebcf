"""The bounded `tenant` label (docs/tenants.md, "Per-tenant visibility"): only configured tenants
(and `default`) are label values; every other value is `other`, so invented tenants cannot create
series."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import metrics
from services.common.metrics import OTHER_TENANT, bound_tenants, key_tenant, tenant_label


@pytest.fixture(autouse=True)
def restore_bound() -> Iterator[None]:
    before = metrics.bounded_tenants()
    yield
    bound_tenants(before)


def test_only_configured_tenants_and_default_are_label_values() -> None:
    bound_tenants(["hotel-a", "shop-b"])
    assert metrics.bounded_tenants() == {"default", "hotel-a", "shop-b"}
    assert [tenant_label(t) for t in ("hotel-a", "shop-b", "default")] == ["hotel-a", "shop-b", "default"]
    assert [tenant_label(t) for t in ("hotel-b", "HOTEL-A", "", None, "x" * 1000)] == [OTHER_TENANT] * 5


def test_other_cannot_be_bound_as_a_tenant() -> None:
    bound_tenants(["other", "hotel-a"])
    assert metrics.bounded_tenants() == {"default", "hotel-a"}


def test_a_rebound_process_forgets_removed_tenants() -> None:
    bound_tenants(["hotel-a"])
    bound_tenants(["shop-b"])
    assert tenant_label("hotel-a") == OTHER_TENANT and tenant_label("shop-b") == "shop-b"


@pytest.mark.parametrize(("key", "label"), [
    ("wati:50370000001", "default"),
    ("manychat:123", "default"),
    ("hotel-a/centro/wati:50370000001", "hotel-a"),
    ("hotel-a/centro/wati:50370000001:7", "hotel-a"),  # a batch id starts with its customer key
    (b"hotel-a/playa/wati:50370000001", "hotel-a"),  # a Kafka key
    ("default/centro/wati:1", "default"),  # the default tenant's other account
    ("hotel-z/centro/wati:50370000001", "other"),  # not configured here
    ("evil/x/wati:1", "other"),
    ("wati", "other"),  # ingest dead-letters a raw payload under its provider
    (":1", "other"),
    ("", "other"),
    (None, "other"),
])
def test_key_tenant_is_the_keys_tenant_when_configured(key: str | bytes | None, label: str) -> None:
    bound_tenants(["hotel-a"])
    assert key_tenant(key) == label


@given(st.text(max_size=80))
def test_no_key_gives_a_label_outside_the_bound(key: str) -> None:
    bound_tenants(["hotel-a"])
    assert key_tenant(key) in {"default", "hotel-a", OTHER_TENANT}


def test_every_customer_metric_has_a_tenant_label() -> None:
    """The metrics about a customer, message or batch (the list docs/tenants.md gives)."""
    tenant_labelled = {
        m._name for m in vars(metrics).values()
        if isinstance(m, metrics.Counter | metrics.Gauge | metrics.Histogram) and "tenant" in m._labelnames
    }
    assert tenant_labelled == {
        "watistream_webhook_rejects", "watistream_webhook_events", "watistream_dead_letters",
        "watistream_batches_flushed", "watistream_gap_checks", "watistream_missed_messages_injected",
        "watistream_history_fetch", "watistream_history_fetch_failures", "watistream_batches_held",
        "watistream_webhooks_missing", "watistream_messages_recovered", "watistream_replies",
        "watistream_openai_requests", "watistream_send_failures", "watistream_images_classified",
        "watistream_tenant_slots_held", "watistream_tenant_slots_waiting",
        "watistream_tenant_records_buffered", "watistream_tenant_records_read_past",
    }


def test_the_dashboard_filters_every_tenant_labelled_series_by_its_tenant_variable() -> None:
    """deploy/grafana: a `tenant` variable from the label's values; every query of a tenant-labelled
    metric selects `tenant=~"$tenant"` (All = `.*`), so one tenant's view shows only its series."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
                            / "watistream.json").read_text(encoding="utf-8"))
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "tenant" and variable["includeAll"] and variable["allValue"] == ".*"
    assert "label_values(watistream_webhook_events_total, tenant)" in variable["query"]["query"]
    tenant_labelled = {m._name for m in vars(metrics).values()
                       if isinstance(m, metrics.Counter) and "tenant" in m._labelnames}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    seen = set()
    for expr in exprs:
        for name, selector in re.findall(r"\b(watistream_[a-z_]+?)_total(\{[^}]*\})?\[", expr):
            if name in tenant_labelled:
                seen.add(name)
                assert 'tenant=~"$tenant"' in selector, expr
    assert seen == tenant_labelled
    assert any(expr.startswith("sum by (tenant)") for expr in exprs)
