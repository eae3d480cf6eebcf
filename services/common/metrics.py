"""Prometheus metrics shared by every service; names are part of the alerting contract.

`deploy/prometheus/alerts.yml` uses these names, and a test proves each exists. Each process
exports its own registry at `GET /metrics`.

A metric about a customer, message or batch has a `tenant` label, bounded: its value comes from
`tenant_label` / `key_tenant`, which give only the tenants this process was configured with
(`bound_tenants`, at start) or `default`, and `other` for any other value (docs/tenants.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# -- the bounded `tenant` label (docs/tenants.md "Per-tenant visibility") ---------------------------
#: the label value of every tenant this process was not configured with (an unknown tenant's route, a
#: key of a tenant removed from the file, a malformed key): reserved, no tenant may be named so
OTHER_TENANT = "other"
DEFAULT_TENANT_LABEL = "default"  # = keys.DEFAULT_TENANT (keys imports nothing of ours; kept a leaf)
_tenant_labels: frozenset[str] = frozenset({DEFAULT_TENANT_LABEL})


def bound_tenants(tenant_ids: Iterable[str]) -> None:
    """Sets the tenant label values this process may emit: the configured tenants and `default`.

    Called once at start with the loaded tenants. Anything else becomes `other`, so a flood of
    webhooks to invented tenants (or keys) cannot create one series each."""
    global _tenant_labels
    _tenant_labels = frozenset({DEFAULT_TENANT_LABEL, *tenant_ids}) - {OTHER_TENANT}


def bounded_tenants() -> frozenset[str]:
    """The tenant label values allowed now (besides `other`)."""
    return _tenant_labels


def tenant_label(tenant_id: str | None) -> str:
    """`tenant_id` when it is a configured tenant (or `default`), else `other`."""
    return tenant_id if tenant_id in _tenant_labels else OTHER_TENANT


def key_tenant(customer_key: str | bytes | None) -> str:
    """The tenant label of a customer key, or of anything that starts with one (a batch id
    `<customer key>:<seq>`): the short form `wati:...` is `default`, `<tenant>/<account>/...` its
    tenant if configured; a missing or malformed key is `other`. Cheap (no full parse): it runs on
    every webhook, and the bound, not the parse, is what keeps the label safe."""
    if isinstance(customer_key, bytes):
        customer_key = customer_key.decode("utf-8", errors="replace")
    if not customer_key:
        return OTHER_TENANT
    head, sep, _ = customer_key.partition(":")
    if not sep or not head:
        return OTHER_TENANT
    tenant, slash, _ = head.partition("/")
    if not slash:
        return DEFAULT_TENANT_LABEL
    return tenant_label(tenant)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """A metric's children by label values, kept: `labels()` costs ~1.5 µs a call (a lock, label
    checks), which a hot path (one webhook, one produce) pays several times. Children are created on
    first use, as `labels()` does, so `/metrics` shows the same series."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

# ingest
http_requests_total = Counter(
    "watistream_http_requests_total", "HTTP requests by route and status", ["route", "status"],
    registry=REGISTRY)
webhook_rejects_total = Counter(
    "watistream_webhook_rejects_total", "Rejected webhooks by reason", ["reason", "tenant"],
    registry=REGISTRY)
webhook_events_total = Counter(
    "watistream_webhook_events_total", "Accepted webhooks by provider and kind",
    ["provider", "kind", "tenant"],
    registry=REGISTRY)
produce_latency_seconds = Histogram(
    "watistream_produce_latency_seconds", "Time from produce to broker ack", ["topic"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY)

# every service
event_loop_lag_seconds = Histogram(
    "watistream_event_loop_lag_seconds",
    "How much later than asked the event loop woke a sleeping task (services/common/loop_lag.py)",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY)

# every consumer
dead_letters_total = Counter(
    "watistream_dead_letters_total", "Messages sent to the dead-letter topic",
    ["service", "reason", "tenant"],
    registry=REGISTRY)
agent_up = Gauge(
    "watistream_agent_up", "1 while a consumer/agent is running, 0 once it stopped", ["service", "agent"],
    registry=REGISTRY)

# context
batches_flushed_total = Counter(
    "watistream_batches_flushed_total", "Batches flushed by route", ["route", "tenant"], registry=REGISTRY)
gap_checks_total = Counter(
    "watistream_gap_checks_total", "Gap decisions by outcome", ["outcome", "tenant"], registry=REGISTRY)
missed_injected_total = Counter(
    "watistream_missed_messages_injected_total", "Missed messages injected by source", ["source", "tenant"],
    registry=REGISTRY)
missed_per_batch = Histogram(
    "watistream_missed_messages_per_batch", "Missed messages injected per checked batch",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200), registry=REGISTRY)
history_fetch_total = Counter(
    "watistream_history_fetch_total", "getMessages fetches by outcome", ["outcome", "tenant"],
    registry=REGISTRY)
history_fetch_failures_total = Counter(
    "watistream_history_fetch_failures_total", "getMessages fetches that failed", ["reason", "tenant"],
    registry=REGISTRY)
history_fetch_retries_total = Counter(
    "watistream_history_fetch_retries_total", "getMessages answers retried within a fetch (WATI 429)",
    ["reason"], registry=REGISTRY)
history_truncated_total = Counter(
    "watistream_history_truncated_total", "History fetches cut short with more history in the window",
    ["reason"], registry=REGISTRY)
dedupe_hits_total = Counter(
    "watistream_dedupe_hits_total", "Redelivered events ignored", ["kind"], registry=REGISTRY)
batches_held_total = Counter(
    "watistream_batches_held_total", "Batches not answered because a human is active or paused",
    ["reason", "tenant"], registry=REGISTRY)
webhooks_missing_total = Counter(
    "watistream_webhooks_missing_total", "Customer messages found in history but never by webhook",
    ["tenant"], registry=REGISTRY)
messages_recovered_total = Counter(
    "watistream_messages_recovered_total", "Missing customer messages recovered into a batch",
    ["tenant"], registry=REGISTRY)
open_batches = Gauge(
    "watistream_open_batches", "Open batches on this worker", registry=REGISTRY)

# responder / vision
replies_total = Counter(
    "watistream_replies_total", "Batches handled by outcome", ["outcome", "tenant"], registry=REGISTRY)
openai_requests_total = Counter(
    "watistream_openai_requests_total", "OpenAI calls by purpose and outcome",
    ["purpose", "outcome", "tenant"],
    registry=REGISTRY)
openai_latency_seconds = Histogram(
    "watistream_openai_latency_seconds", "OpenAI call latency", ["purpose"], registry=REGISTRY)
openai_retries_total = Counter(
    "watistream_openai_retries_total", "OpenAI attempts the SDK made again after a failed one (vision)",
    ["purpose"], registry=REGISTRY)
send_failures_total = Counter(
    "watistream_send_failures_total", "Channel sends that failed", ["channel", "reason", "tenant"],
    registry=REGISTRY)
inflight_batches = Gauge(
    "watistream_inflight_batches", "Batches being answered now", registry=REGISTRY)
consumer_lag = Gauge(
    "watistream_consumer_lag", "Messages behind the end of the input topics", ["service"],
    registry=REGISTRY)
#: the fair share of the responder's and vision's slots (services/common/fair_share.py)
tenant_slots_held = Gauge(
    "watistream_tenant_slots_held", "Slots (customers handled at once) a tenant holds in this worker",
    ["service", "tenant"], registry=REGISTRY)
tenant_slots_waiting = Gauge(
    "watistream_tenant_slots_waiting", "Customers of a tenant waiting for a slot in this worker",
    ["service", "tenant"], registry=REGISTRY)
#: the partition backpressure per tenant (services/common/backpressure.py)
tenant_records_buffered = Gauge(
    "watistream_tenant_records_buffered",
    "Fetched, unfinished records of a tenant this worker keeps in memory (queued or running)",
    ["service", "tenant"], registry=REGISTRY)
tenant_records_read_past = Gauge(
    "watistream_tenant_records_read_past",
    "Records of a tenant at its RECORDS_PER_TENANT read past by this worker, to be read again",
    ["service", "tenant"], registry=REGISTRY)
images_classified_total = Counter(
    "watistream_images_classified_total", "Images classified by category", ["category", "tenant"],
    registry=REGISTRY)


def render() -> bytes:
    return bytes(generate_latest(REGISTRY))


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# console
console_records_total = Counter(
    "watistream_console_records_total", "Records the console consumed, by record type", ["record"],
    registry=REGISTRY)
console_page_seconds = Histogram(
    "watistream_console_page_seconds", "Console page server time", ["page"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5), registry=REGISTRY)
console_logins_total = Counter(
    "watistream_console_logins_total", "Console login attempts by outcome", ["outcome"], registry=REGISTRY)
console_actions_total = Counter(
    "watistream_console_actions_total", "Operator actions from the console", ["action"], registry=REGISTRY)
