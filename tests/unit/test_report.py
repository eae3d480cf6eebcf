"""`watistream report`, pure part: a scripted day of audit decisions and dead letters -> exact counts.

The scripted day is also produced to a real broker by tests/integration/test_report_topic.py.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common import codec
from services.context.report import (
    Report,
    parse_since,
    render_json,
    render_markdown,
    summarise,
)

A = "wati:50371234567"  # long gap with history items; masks like F
B = "wati:50379876543"  # realtime agent messages, then held while the agent works
C = "wati:50375550123"  # an item from both sources, a recovered message
D = "wati:50370001111"  # history fetch failure, then paused by an operator
E = "manychat:1234567890123"  # facebook, image batch, a vision dead letter
F = "wati:50379990567"  # routine only; same mask as A
RAW_IDS = ["50371234567", "50379876543", "50375550123", "50370001111", "1234567890123", "50379990567"]

LABEL = {
    A: "wati:********567#1",
    F: "wati:********567#2",
    B: "wati:********543",
    C: "wati:********123",
    D: "wati:********111",
    E: "manychat:**********123",
}


def item(
    at: datetime, source: str, role: str = "agent", text: str = "hola", ids: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "at": at, "role": role, "agent_name": "Ana" if role == "agent" else None, "text": text,
        "message_type": "text", "source": source, "item_ids": list(ids),
    }


def excluded(reason: str, *ids: str) -> dict[str, Any]:
    return {"item_ids": list(ids), "reason": reason, "at": None}


def decision(
    batch_id: str, key: str, at: datetime, *, channel: str = "wati", gap: float | None = 45.0,
    check: bool = False, sources: tuple[str, ...] = (), injected: tuple[dict[str, Any], ...] = (),
    excluded_items: tuple[dict[str, Any], ...] = (), held: bool = False, hold_reason: str | None = None,
    recovered: tuple[str, ...] = (), missing: int = 0, history_error: str | None = None,
    routed: str = "responder",
) -> dict[str, Any]:
    return {
        "batch_id": batch_id, "customer_key": key, "channel": channel, "decided_at": at,
        "message_count": 1 + len(recovered),
        "prior_last_inbound_at": at - timedelta(seconds=gap) if gap is not None else None,
        "prior_last_reply_at": at - timedelta(seconds=(gap or 0) + 5),
        "gap_seconds": gap, "gap_threshold_seconds": 300.0, "missed_check_ran": check,
        "cutoff": at - timedelta(seconds=(gap or 0) + 5) if check else None,
        "sources": list(sources), "injected": list(injected), "excluded": list(excluded_items),
        "held": held, "hold_reason": hold_reason, "recovered_event_ids": list(recovered),
        "webhooks_missing": missing, "history_error": history_error, "routed_to": routed,
    }


def dead(service: str, reason: str, at: datetime, key: str | None = None) -> dict[str, Any]:
    return {
        "service": service, "reason": reason, "error": f"boom for {key or 'nobody'}",
        "source_topic": "x.inbound", "partition": 0, "offset": 7, "key": key.encode() if key else None,
        "payload": b"\x00\x01", "customer_key": key, "batch_id": None, "failed_at": at,
    }


def scripted_day(now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A day of decisions and dead letters ending at `now`; two records are older than 24 h and one
    decision is a redelivery. Texts and errors carry phone numbers that the report must not print."""
    h = timedelta(hours=1)
    a2 = decision(
        "b-a2", A, now - 10 * h, gap=7200, check=True, sources=("history",),
        injected=(
            item(now - 11 * h, "history", "customer", "mi numero es 50371234567", ("wamid.a1",)),
            item(now - 10.8 * h, "history", "agent", "le llamo al 50371234567", ("wamid.a2",)),
            item(now - 10.5 * h, "history", "agent", "listo", ("wamid.a3",)),
        ),
        excluded_items=(
            excluded("own_id", "wamid.own1"), excluded("before_cutoff", "wamid.old1"),
            excluded("before_cutoff", "wamid.old2"),
        ),
    )
    decisions = [
        decision("b-a0", A, now - 30 * h, gap=90000, check=True, sources=("history",),
                 injected=tuple(item(now - 31 * h, "history") for _ in range(5))),  # older than 24 h
        decision("b-a1", A, now - 20 * h),
        a2,
        decision("b-b1", B, now - 8 * h, gap=60, sources=("realtime",),
                 injected=(item(now - 8.2 * h, "realtime", ids=("wamid.b1",)),
                           item(now - 8.1 * h, "realtime", ids=("wamid.b2",)))),
        decision("b-b2", B, now - 7.8 * h, gap=600, held=True, hold_reason="human_active", routed="held"),
        dict(a2),  # redelivered audit event of the same batch
        decision(
            "b-c1", C, now - 6 * h, gap=3600, check=True, sources=("history", "realtime"),
            injected=(item(now - 6.5 * h, "both", ids=("wamid.c1", "local-1")),
                      item(now - 6.4 * h, "history", "customer", ids=("wamid.c2",))),
            excluded_items=(excluded("duplicate", "wamid.c1"),),
            recovered=("wamid.HBgLNTAzNzU1NTAxMjMVAgARGBI",), missing=1,
        ),
        decision("b-d1", D, now - 5 * h, gap=90000, check=True, sources=("history",),
                 history_error="HTTP 500 from /api/v1/getMessages/50370001111"),
        decision("b-d2", D, now - 1 * h, held=True, hold_reason="paused", routed="held"),
        decision("b-e1", E, now - 3 * h, channel="facebook", routed="vision"),
        decision("b-f1", F, now - 2 * h),
    ]
    dead_letters = [
        dead("ingest", "broker_timeout", now - 26 * h, C),  # older than 24 h
        dead("responder", "openai_failed", now - 9 * h, A),
        dead("responder", "openai_failed", now - 7 * h, B),
        dead("context", "undecodable", now - 4 * h),
        dead("vision", "download_failed", now - 3 * h, E),
    ]
    return decisions, dead_letters


NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)

EXPECTED_OVERALL = {
    "batches": 9,
    "routed_to": {"held": 2, "responder": 6, "vision": 1},
    "gaps_detected": 3,
    "batches_with_injected": 3,
    "injected": {
        "total": 7,
        "by_source": {"history": 4, "realtime": 2, "both": 1},
        "by_role": {"agent": 5, "customer": 2},
    },
    "excluded": {"total": 4, "by_reason": {"before_cutoff": 2, "duplicate": 1, "own_id": 1}},
    "webhooks_missing": 1,
    "recovered": 1,
    "held": {"total": 2, "by_reason": {"human_active": 1, "paused": 1}},
    "history_fetch_failures": 1,
    "dead_letters": {
        "total": 4,
        "by_service": {
            "context": {"undecodable": 1},
            "responder": {"openai_failed": 2},
            "vision": {"download_failed": 1},
        },
    },
}

EXPECTED_RECORDS = {
    "decisions": 11, "dead_letters": 5, "duplicate_decisions": 1, "outside_window": 2,
    "undecodable": {"audit": 0, "dead_letter": 0},
}


def expected_customer(key: str) -> dict[str, Any]:
    """Per-customer counts of the scripted day (what a reader of the day would count by hand)."""
    zero_dl: dict[str, Any] = {"total": 0, "by_service": {}}
    base: dict[str, Any] = {
        "batches": 1, "routed_to": {"responder": 1}, "gaps_detected": 0, "batches_with_injected": 0,
        "injected": {"total": 0, "by_source": {"history": 0, "realtime": 0, "both": 0}, "by_role": {}},
        "excluded": {"total": 0, "by_reason": {}}, "webhooks_missing": 0, "recovered": 0,
        "held": {"total": 0, "by_reason": {}}, "history_fetch_failures": 0, "dead_letters": zero_dl,
    }
    if key == A:
        base.update(
            batches=2, routed_to={"responder": 2}, gaps_detected=1, batches_with_injected=1,
            injected={"total": 3, "by_source": {"history": 3, "realtime": 0, "both": 0},
                      "by_role": {"agent": 2, "customer": 1}},
            excluded={"total": 3, "by_reason": {"before_cutoff": 2, "own_id": 1}},
            dead_letters={"total": 1, "by_service": {"responder": {"openai_failed": 1}}},
        )
    elif key == B:
        base.update(
            batches=2, routed_to={"held": 1, "responder": 1}, batches_with_injected=1,
            injected={"total": 2, "by_source": {"history": 0, "realtime": 2, "both": 0},
                      "by_role": {"agent": 2}},
            held={"total": 1, "by_reason": {"human_active": 1}},
            dead_letters={"total": 1, "by_service": {"responder": {"openai_failed": 1}}},
        )
    elif key == C:
        base.update(
            gaps_detected=1, batches_with_injected=1,
            injected={"total": 2, "by_source": {"history": 1, "realtime": 0, "both": 1},
                      "by_role": {"agent": 1, "customer": 1}},
            excluded={"total": 1, "by_reason": {"duplicate": 1}}, webhooks_missing=1, recovered=1,
        )
    elif key == D:
        base.update(
            batches=2, routed_to={"held": 1, "responder": 1}, gaps_detected=1,
            held={"total": 1, "by_reason": {"paused": 1}}, history_fetch_failures=1,
        )
    elif key == E:
        base.update(routed_to={"vision": 1},
                    dead_letters={"total": 1, "by_service": {"vision": {"download_failed": 1}}})
    return base


def day_report(now: datetime = NOW) -> Report:
    decisions, dead_letters = scripted_day(now)
    return summarise(decisions, dead_letters, now - timedelta(hours=24), now)  # type: ignore[arg-type]


def assert_scripted_day_json(doc: dict[str, Any]) -> None:
    """Shared with the integration test: the JSON report of the scripted day, exactly."""
    assert doc["overall"] == EXPECTED_OVERALL
    assert doc["records"] == EXPECTED_RECORDS
    assert doc["complete"] is True
    rows = {row.pop("customer"): row for row in doc["customers"]}
    assert rows == {LABEL[key]: expected_customer(key) for key in (A, B, C, D, E, F)}
    assert [LABEL[k] for k in (E, D, C, B, A, F)] == list(rows), "sorted by masked label"


def assert_no_phone_numbers(text: str) -> None:
    for raw in RAW_IDS:
        assert raw not in text
    assert not re.search(r"\d{7,}", text), "a long digit run (phone number?) in the report"
    assert "wamid" not in text and "getMessages" not in text, "free text of a record leaked"


# ---------------------------------------------------------------- summarise


def test_scripted_day_counts_overall_and_per_customer() -> None:
    assert_scripted_day_json(json.loads(render_json(day_report())))


def test_records_survive_the_avro_codec_unchanged() -> None:
    """The scripted records are valid audit/dead-letter values: what the integration test produces."""
    decisions, dead_letters = scripted_day(NOW)
    decoded_d = [codec.decode("BatchDecision", codec.encode("BatchDecision", d)) for d in decisions]
    decoded_l = [codec.decode("DeadLetter", codec.encode("DeadLetter", x)) for x in dead_letters]
    report = summarise(decoded_d, decoded_l, NOW - timedelta(hours=24), NOW)  # type: ignore[arg-type]
    assert json.loads(render_json(report)) == json.loads(render_json(day_report()))


def test_window_is_inclusive_and_filters_by_the_records_own_time() -> None:
    decisions, dead_letters = scripted_day(NOW)
    # only the last hour: D's paused batch (1 h ago, exactly on the boundary) and nothing else
    report = summarise(decisions, dead_letters, NOW - timedelta(hours=1), NOW)  # type: ignore[arg-type]
    doc = report.as_dict()
    assert doc["overall"]["batches"] == 1
    assert doc["overall"]["held"] == {"total": 1, "by_reason": {"paused": 1}}
    assert doc["overall"]["dead_letters"]["total"] == 0
    assert [c["customer"] for c in doc["customers"]] == [LABEL[D]]
    assert doc["records"]["outside_window"] == len(decisions) + len(dead_letters) - 1
    # the window's end excludes later records too
    report = summarise(decisions, dead_letters, NOW - timedelta(hours=48), NOW - timedelta(hours=25))  # type: ignore[arg-type]
    assert report.overall.batches == 1 and report.overall.injected_by_source["history"] == 5
    assert report.overall.dead_letters == {("ingest", "broker_timeout"): 1}


def test_redelivered_decision_counts_once() -> None:
    decisions, _ = scripted_day(NOW)
    once = summarise(decisions, [], NOW - timedelta(hours=24), NOW)  # type: ignore[arg-type]
    twice = summarise(decisions + decisions, [], NOW - timedelta(hours=24), NOW)  # type: ignore[arg-type]
    assert once.overall == twice.overall
    assert twice.duplicate_decisions == once.duplicate_decisions + 10  # the 10 in-window records again


def test_customers_that_mask_alike_stay_separate_rows() -> None:
    report = day_report()
    labels = [c.customer for c in report.customers]
    assert LABEL[A] in labels and LABEL[F] in labels
    assert len(labels) == len(set(labels)) == 6


def test_dead_letter_without_customer_counts_only_overall() -> None:
    report = summarise([], [dead("ingest", "bad", NOW)], NOW - timedelta(hours=1), NOW)  # type: ignore[list-item]
    assert report.overall.dead_letter_count == 1
    assert report.customers == []


def test_naive_window_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        summarise([], [], datetime(2025, 1, 1), datetime(2025, 1, 2))


def test_reason_codes_are_redacted_and_bounded() -> None:
    """Reason codes come from other services; a hostile or careless one must not leak a number."""
    d = decision("b-x", A, NOW, held=True, hold_reason="paused for 50371234567 | " + "x" * 200, routed="")
    report = summarise([d], [dead("x", "", NOW, A)], NOW - timedelta(hours=1), NOW)  # type: ignore[list-item]
    (reason,) = report.overall.holds_by_reason
    assert "50371234567" not in reason and len(reason) <= 80
    assert report.overall.routed_to == {"unspecified": 1}
    assert report.overall.dead_letters == {("x", "unspecified"): 1}
    for text in (render_markdown(report), render_json(report)):
        assert_no_phone_numbers(text)


# ---------------------------------------------------------------- rendering


def test_outputs_never_show_a_raw_customer_key_or_text() -> None:
    report = day_report()
    for text in (render_markdown(report), render_json(report)):
        assert_no_phone_numbers(text)
        assert "mi numero" not in text and "boom" not in text


def test_markdown_of_the_scripted_day() -> None:
    text = render_markdown(day_report())
    lines = text.splitlines()
    assert lines[0] == "# watistream report"
    assert "Window: 2025-03-09T12:00:00Z to 2025-03-10T12:00:00Z" in lines
    assert ("Read: 11 batch decisions, 5 dead letters (0 undecodable, 1 duplicate decisions ignored, "
            "2 outside the window)") in lines
    for row in (
        "| Batches | 9 (held 2, responder 6, vision 1) |",
        "| Gaps detected (history checked) | 3 |",
        "| Missed messages injected | 7 (history 4, realtime 2, both 1) |",
        "| Batches with missed messages | 3 |",
        "| Items excluded | 4 (before_cutoff 2, duplicate 1, own_id 1) |",
        "| Webhooks missing | 1 |",
        "| Messages recovered | 1 |",
        "| Batches held | 2 (human_active 1, paused 1) |",
        "| History-fetch failures | 1 |",
        "| Dead letters | 4 |",
        # per customer: Batches | Gaps | Injected | Excluded | Missing | Recovered | Held | Hist | DL
        f"| `{LABEL[A]}` | 2 | 1 | 3 (3/0/0) | 3 | 0 | 0 | 0 | 0 | 1 |",
        f"| `{LABEL[B]}` | 2 | 0 | 2 (0/2/0) | 0 | 0 | 0 | 1 (human_active 1) | 0 | 1 |",
        f"| `{LABEL[C]}` | 1 | 1 | 2 (1/0/1) | 1 | 1 | 1 | 0 | 0 | 0 |",
        f"| `{LABEL[D]}` | 2 | 1 | 0 (0/0/0) | 0 | 0 | 0 | 1 (paused 1) | 1 | 0 |",
        f"| `{LABEL[E]}` | 1 | 0 | 0 (0/0/0) | 0 | 0 | 0 | 0 | 0 | 1 |",
        "1 other customer(s) had routine batches only (listed by --format json).",
        "| context | undecodable | 1 |",
        "| responder | openai_failed | 2 |",
        "| vision | download_failed | 1 |",
    ):
        assert row in lines, row
    assert not any(LABEL[F] in line for line in lines), "routine customers are not listed in markdown"
    assert "## Warnings" not in text


def test_markdown_warns_about_undecodable_and_incomplete_reads() -> None:
    decisions, dead_letters = scripted_day(NOW)
    report = summarise(decisions, dead_letters, NOW - timedelta(hours=24), NOW,  # type: ignore[arg-type]
                       undecodable={"audit": 2}, complete=False)
    text = render_markdown(report)
    assert "## Warnings" in text
    assert "- 2 undecodable record(s) on the audit topic were skipped" in text
    assert "counts are INCOMPLETE" in text
    doc = json.loads(render_json(report))
    assert doc["complete"] is False
    assert doc["records"]["undecodable"] == {"audit": 2, "dead_letter": 0}


def test_empty_window() -> None:
    report = summarise([], [], NOW - timedelta(hours=24), NOW)
    assert "No customer activity in the window." in render_markdown(report)
    doc = json.loads(render_json(report))
    assert doc["customers"] == []
    assert doc["overall"]["injected"]["by_source"] == {"history": 0, "realtime": 0, "both": 0}
    assert doc["overall"]["batches"] == 0


# ---------------------------------------------------------------- parse_since


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("30m", timedelta(minutes=30)),
        ("7d", timedelta(days=7)),
        ("90s", timedelta(seconds=90)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
        (" 1.5H ", timedelta(minutes=90)),
    ],
)
def test_parse_since(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize(
    "text", ["", "24", "h", "-1h", "0m", "0h0m", "24x", "1 day", "24h!", "1.h", "99999999999w"]
)
def test_parse_since_refuses_bad_input_clearly(text: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(text)


# ---------------------------------------------------------------- per tenant (`--tenant`)

HOTEL = "hotel-a/centro/"  # a second tenant's account; its customers have the SAME phone numbers


def tenant_day(now: datetime, prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The scripted day of another tenant's account: every customer key (and batch id, which starts
    with it) carries the tenant and account; the phone numbers are the default tenant's."""
    decisions, dead_letters = scripted_day(now)
    for d in decisions:
        d["customer_key"] = prefix + d["customer_key"]
        d["batch_id"] = prefix + d["batch_id"]
    for x in dead_letters:
        if x["customer_key"]:
            x["customer_key"] = prefix + x["customer_key"]
            x["key"] = x["customer_key"].encode()
    return decisions, dead_letters


def two_tenants_report(tenant: str | None, now: datetime = NOW) -> Report:
    decisions, dead_letters = scripted_day(now)
    other_decisions, other_dead = tenant_day(now, HOTEL)
    return summarise(decisions + other_decisions, dead_letters + other_dead,  # type: ignore[arg-type]
                     now - timedelta(hours=24), now, tenant=tenant)


# a tenant's report leaves out what names no customer (the context's key-less dead letter)
TENANT_OVERALL = {**EXPECTED_OVERALL, "dead_letters": {
    "total": 3, "by_service": {"responder": {"openai_failed": 2}, "vision": {"download_failed": 1}}}}
TENANT_RECORDS = {**EXPECTED_RECORDS, "dead_letters": 4}


@pytest.mark.parametrize(("tenant", "prefix"), [("hotel-a", HOTEL), ("default", "")])
def test_a_tenants_report_counts_and_lists_only_its_customers(tenant: str, prefix: str) -> None:
    """Two tenants share every phone number: each one's report is exactly its own day, no more."""
    doc = json.loads(render_json(two_tenants_report(tenant)))
    assert doc["tenant"] == tenant
    assert doc["overall"] == TENANT_OVERALL
    assert doc["records"] == TENANT_RECORDS
    rows = {row.pop("customer"): row for row in doc["customers"]}
    assert rows == {prefix + LABEL[key]: expected_customer(key) for key in (A, B, C, D, E, F)}


def test_no_line_of_another_tenant_appears_in_either_format() -> None:
    for tenant, foreign in (("hotel-a", re.compile(r"(?<![/\w-])(wati|manychat):")), ("default", "hotel-a")):
        report = two_tenants_report(tenant)
        for text in (render_markdown(report), render_json(report)):
            assert not re.search(foreign, text), (tenant, text)
            assert_no_phone_numbers(text)
    text = render_markdown(two_tenants_report("hotel-a"))
    assert "Tenant: hotel-a (only its customers' records)" in text.splitlines()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(line.startswith(f"| `{HOTEL}") for line in rows)
    assert "| context | undecodable | 1 |" not in text


def test_without_a_tenant_the_report_has_both_tenants_customers() -> None:
    """The filter, not the data, is what keeps the other tenant out (this fails if keys merged)."""
    doc = two_tenants_report(None).as_dict()
    assert doc["tenant"] is None
    assert len(doc["customers"]) == 12 and doc["overall"]["batches"] == 18


def test_a_tenant_with_no_records_is_an_empty_report() -> None:
    doc = two_tenants_report("shop-b").as_dict()
    assert doc["customers"] == [] and doc["overall"]["batches"] == 0
    assert doc["records"]["decisions"] == 0 and doc["records"]["dead_letters"] == 0


@pytest.mark.parametrize("tenant", ["Hotel A", "", "a/b", "-x", "x" * 41])
def test_a_malformed_tenant_id_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match="is not a tenant id"):
        summarise([], [], NOW - timedelta(hours=1), NOW, tenant=tenant)


def test_a_dead_letter_known_only_by_its_kafka_key_counts_for_that_keys_tenant() -> None:
    """An undecodable record has no customer key in its dead letter, only the record's Kafka key."""
    letter = dead("context", "undecodable", NOW, HOTEL + A)
    letter["customer_key"] = None
    for tenant, count in (("hotel-a", 1), ("default", 0)):
        report = summarise([], [letter], NOW - timedelta(hours=1), NOW, tenant=tenant)  # type: ignore[list-item]
        assert report.overall.dead_letter_count == count and report.customers == [], tenant
