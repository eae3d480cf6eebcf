"""The pure half of services/common/deadletters.py: ids, filters, refusals, formatting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common import codec
from services.common.deadletters import (
    DeadLetterEntry,
    Filters,
    describe_payload,
    format_entry,
    format_list,
    parse_id,
    refusal,
    select,
)
from services.common.records import DeadLetter, DeadLetterReplay

AT = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


def entry(id_: str = "1:5", **fields: object) -> DeadLetterEntry:
    record: DeadLetter = {
        "service": "responder", "reason": "openai_failed", "error": "boom",
        "source_topic": "w.responder-requests",
        "partition": 2, "offset": 9, "key": b"wati:1", "payload": b'{"a": 1}', "customer_key": "wati:1",
        "batch_id": "b1", "failed_at": AT,
    }
    record.update(fields)  # type: ignore[typeddict-item]
    return DeadLetterEntry(id_, record)


REPLAY: DeadLetterReplay = {"dead_letter_id": "1:5", "source_topic": "w.responder-requests",
                            "replayed_partition": 2, "replayed_offset": 40, "replayed_by": "ana",
                            "replayed_at": AT + timedelta(hours=1)}


def test_ids() -> None:
    assert parse_id(" 3:1542 ") == (3, 1542)
    for bad in ("3", "a:1", "3:-1", ""):
        with pytest.raises(ValueError, match="not a dead-letter id"):
            parse_id(bad)


def test_filters() -> None:
    entries = [entry("1:5"), entry("0:1", reason="send_failed", customer_key="manychat:7", service="vision",
                                   failed_at=AT - timedelta(days=2))]
    assert select(entries, Filters(), {}) == entries
    assert select(entries, Filters(reason="send_failed"), {}) == entries[1:]
    assert select(entries, Filters(customer="wati:1"), {}) == entries[:1]
    assert select(entries, Filters(service="vision"), {}) == entries[1:]
    assert select(entries, Filters(since=AT - timedelta(days=1)), {}) == entries[:1]
    assert select(entries, Filters(until=AT), {}) == entries[1:]
    assert select(entries, Filters(replayed=True), {"1:5": REPLAY}) == entries[:1]
    assert select(entries, Filters(replayed=False), {"1:5": REPLAY}) == entries[1:]


def test_refusals() -> None:
    assert refusal(entry(), {}) is None
    assert "already replayed at 2026-12-06 11:00:00 UTC by ana" in str(refusal(entry(), {"1:5": REPLAY}))
    assert "no source topic" in str(refusal(entry(source_topic=None), {}))
    assert "no payload" in str(refusal(entry(payload=None), {}))


def test_list_and_show() -> None:
    text = format_list([entry()], {"1:5": REPLAY})
    assert text.splitlines()[1].split() == ["1:5", "2026-12-06", "10:00:00", "responder", "openai_failed",
                                            "wati:1", "yes"]
    assert text.splitlines()[-1] == "1 dead letter(s)"
    assert format_list([], {}) == "no dead letters match"
    shown = format_entry(entry(), REPLAY)
    assert "by ana, now w.responder-requests 2:40" in shown and '"a": 1' in shown
    assert "cannot be: no source topic" in format_entry(entry(source_topic=None), None)


def test_payload_is_shown_readably() -> None:
    assert describe_payload(None) == "(none)"
    assert describe_payload(b"\xff\x00") == "(2 bytes, not text)"
    assert describe_payload(b"plain") == "plain"
    encoded = codec.encode("DeadLetterReplay", dict(REPLAY))
    assert describe_payload(encoded).startswith("DeadLetterReplay {")
