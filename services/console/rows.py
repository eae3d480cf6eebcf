"""Pure mapping of topic records to the console store's rows: plain data in, plain dicts out.

Times become integer epoch milliseconds (what the store indexes and compares). The human-agent
block is rebuilt with the responder's own `missed_block` from the `ResponderRequest`, so the text
the console shows is the text the responder gave the model, byte for byte (same PROMPT_LOCALE).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import orjson

from services.common.keys import KeyError_, parse_key
from services.common.records import (
    AgentActivity,
    AssistantReply,
    BatchDecision,
    ContextCommand,
    DeadLetter,
    DeadLetterReplay,
    InboundMessage,
    MissedItem,
    ResponderRequest,
)
from services.responder.prompt import Labels, batch_text, message_text, missed_block

Row = dict[str, Any]

SOURCES = ("realtime", "history", "both")


def ms(at: datetime | int | None) -> int | None:
    """Epoch milliseconds of an aware datetime (a naive one is taken as UTC); an int already is
    (the consumer decodes timestamps as epoch milliseconds: `codec.decode_any_fast`)."""
    if at is None or type(at) is int:
        return at
    assert isinstance(at, datetime)
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1000)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _items(items: Iterable[MissedItem]) -> list[dict[str, Any]]:
    return [
        {"at": ms(i["at"]), "role": i["role"], "agent_name": i.get("agent_name"),
         "text": i.get("text") or "", "message_type": i.get("message_type") or "text",
         "source": i.get("source")}
        for i in items
    ]


def decision_row(d: BatchDecision) -> Row:
    """One batch's decision (audit topic): held or routed, what was injected and excluded, why.
    (Called for every decision of a rebuild: most have nothing injected and one exclusion.)"""
    injected = d["injected"]
    by_source = dict.fromkeys(SOURCES, 0)
    if injected:
        for item in injected:
            source = item.get("source")
            if source in by_source:
                by_source[source] += 1
        injected_json = _dumps(_items(injected))
    else:
        injected_json = "[]"
    excluded = d["excluded"]
    held = d["held"]
    return {
        "batch_id": d["batch_id"],
        "customer_key": d["customer_key"],
        "decided_at": ms(d["decided_at"]),
        "message_count": d["message_count"] or 0,
        "gap_seconds": d["gap_seconds"],
        "gap_threshold_seconds": d["gap_threshold_seconds"],
        "missed_check_ran": 1 if d["missed_check_ran"] else 0,
        "cutoff": ms(d["cutoff"]),
        "held": 1 if held else 0,
        "hold_reason": d["hold_reason"],
        "routed_to": d["routed_to"] or "",
        "injected_json": injected_json,
        "excluded_json": _dumps([
            {"item_ids": e["item_ids"] or [], "reason": e["reason"] or "", "at": ms(e["at"])}
            for e in excluded
        ]) if excluded else "[]",
        "inj_realtime": by_source["realtime"],
        "inj_history": by_source["history"],
        "inj_both": by_source["both"],
        "webhooks_missing": d["webhooks_missing"] or 0,
        "recovered": len(d["recovered_event_ids"] or ()),
        "history_error": d["history_error"],
        # not a column of the decision: its customer's and its hour figures' tenant, found here (in
        # the consumer's decoding worker) rather than by the store's single writer
        "tenant": tenant_of(d["customer_key"]),
    }


def request_row(r: ResponderRequest, labels: Labels) -> Row:
    """What the responder was asked (responder-requests topic), with the block exactly as it builds it."""
    missed = r.get("missed_messages") or []
    block = missed_block(missed, r.get("missed_dropped_oldest", 0), labels) if missed else None
    return {
        "batch_id": r["batch_id"],
        "customer_key": r["customer_key"],
        "created_at": ms(r["created_at"]),
        "messages_json": _dumps([
            {"event_id": m["event_id"], "at": ms(m["provider_time"]), "text": message_text(m, labels),
             "recovered": bool(m.get("recovered"))}
            for m in r.get("messages") or []
        ]),
        "user_text": batch_text(r.get("messages") or [], labels),
        "block": block,
        "images": len(r.get("images") or []),
        "message_count": len(r.get("messages") or []),
    }


def reply_row(r: AssistantReply) -> Row:
    """The bot's answer (replies topic): what was sent and when, or why nothing was."""
    return {
        "batch_id": r["batch_id"],
        "customer_key": r["customer_key"],
        "outcome": r["outcome"],
        "text": r.get("text") or "",
        "sent_at": ms(r["sent_at"]),
        "parts": len(r.get("parts") or []),
    }


def inbound_row(m: InboundMessage, labels: Labels) -> Row:
    """A customer message as received (inbound topic)."""
    return {
        "event_id": m["event_id"],
        "customer_key": m["customer_key"],
        "channel": m["channel"],
        "provider_id": m["provider_id"],
        "sender_name": (m.get("sender_name") or m.get("username") or "").strip() or None,
        "at": ms(m["received_at"]),
        "provider_time": ms(m["provider_time"]),
        "text": message_text(m, labels),
        "recovered": int(bool(m.get("recovered"))),
    }


def agent_row(a: AgentActivity) -> Row:
    """Something the business side did in the inbox, seen in real time (agent-activity topic)."""
    return {
        "event_id": a["event_id"],
        "customer_key": a["customer_key"],
        "at": ms(a["received_at"]),
        "sender_kind": a.get("sender_kind") or "unknown",
        "operator_name": a.get("operator_name"),
        "event_type": a.get("event_type") or "",
        "text": a.get("text") or "",
    }


def command_row(c: ContextCommand) -> Row | None:
    """A pause or resume (context-commands topic); other commands are the context service's own."""
    if c["kind"] not in ("pause", "resume"):
        return None
    return {
        "customer_key": c["customer_key"],
        "kind": c["kind"],
        "actor": c.get("actor"),
        "at": ms(c["issued_at"]),
    }


def dead_letter_row(letter: DeadLetter, partition: int, offset: int) -> Row:
    """A dead letter, identified by its place on the dead-letter topic (that is what a replay marks)."""
    return {
        "id": f"{partition}:{offset}",
        "failed_at": ms(letter["failed_at"]),
        "service": letter.get("service") or "",
        "reason": letter.get("reason") or "",
        "error": letter.get("error") or "",
        "source_topic": letter.get("source_topic"),
        "source_partition": int(letter.get("partition", -1)),
        "source_offset": int(letter.get("offset", -1)),
        "record_key": letter.get("key"),
        "payload": letter.get("payload"),
        "customer_key": letter.get("customer_key"),
        "batch_id": letter.get("batch_id"),
    }


def tenant_of(key: str | bytes | None) -> str | None:
    """The tenant of a customer key (or a Kafka key that is one), None when it is not one: such a
    row belongs to no tenant and only operators of every tenant see it (docs/tenants.md)."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not key:
        return None
    head, _, ident = key.partition(":")
    if not ident or ident != ident.strip():  # parse_key's rule for the id
        return None
    return _tenant_of_head(head)


@lru_cache(maxsize=1024)
def _tenant_of_head(head: str) -> str | None:
    """The tenant of a key's head (`<provider>` or `<tenant>/<account>/<provider>`): few distinct
    heads (tenants x accounts x providers), each parsed once; called for every record of a rebuild."""
    try:
        return parse_key(f"{head}:-").tenant
    except KeyError_:
        return None


def replay_row(r: DeadLetterReplay) -> Row:
    """A dead letter's replay (dead-letter-replays topic, the CLI's and the console's): who, when, where."""
    return {
        "dead_letter_id": r["dead_letter_id"],
        "replayed_at": ms(r["replayed_at"]),
        "replayed_by": r["replayed_by"],
        "source_topic": r["source_topic"],
        "replayed_partition": int(r["replayed_partition"]),
        "replayed_offset": int(r["replayed_offset"]),
    }


def hour_of(at_ms: int) -> int:
    """The hour bucket (epoch ms of the hour's start) of a time."""
    return at_ms - at_ms % 3_600_000


#: what one new decision adds to its hour's figures on the overview, in `decision_figures`' order
DECISION_FIGURES = ("batches", "held", "gaps", "inj_realtime", "inj_history", "inj_both", "webhooks_missing",
                    "recovered", "history_failures")
_counted = itemgetter("held", "missed_check_ran", "inj_realtime", "inj_history", "inj_both",
                      "webhooks_missing", "recovered")


def decision_figures(row: Mapping[str, Any]) -> tuple[int, ...]:
    """`DECISION_FIGURES` of one new decision (a tuple: the catch-up sums one per decision)."""
    return (1, *_counted(row), 1 if row["history_error"] else 0)


def decision_counts(row: Mapping[str, Any]) -> dict[str, int]:
    """What one new decision adds to its hour's figures on the overview."""
    return dict(zip(DECISION_FIGURES, decision_figures(row), strict=True))
