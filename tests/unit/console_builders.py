"""Records as the console consumes them (audit decisions, responder requests, dead letters).

The other record builders (inbound, activity, reply, command) are the context tests' own.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import cast

from services.common.records import BatchDecision, DeadLetter, InboundMessage, MissedItem, ResponderRequest

from .context_builders import KEY, WA_ID


def missed(at: datetime, text: str, *, role: str = "agent", name: str | None = "Ana Agente",
           source: str = "history") -> MissedItem:
    return cast(MissedItem, {"at": at, "role": role, "agent_name": name if role == "agent" else None,
                             "text": text, "message_type": "text", "source": source, "item_ids": [text[:8]]})


def decision(batch_id: str, at: datetime, *, key: str = KEY, held: bool = False, reason: str | None = None,
             injected: Iterable[MissedItem] = (), excluded: Iterable[tuple[str, datetime]] = (),
             webhooks_missing: int = 0, recovered: Iterable[str] = (), history_error: str | None = None,
             check_ran: bool = False) -> BatchDecision:
    return cast(BatchDecision, {
        "batch_id": batch_id, "customer_key": key, "channel": "wati", "decided_at": at,
        "message_count": 1, "prior_last_inbound_at": None, "prior_last_reply_at": None,
        "gap_seconds": 400.0 if check_ran else None, "gap_threshold_seconds": 300.0,
        "missed_check_ran": check_ran, "cutoff": None, "sources": ["history"] if check_ran else [],
        "injected": list(injected),
        "excluded": [{"item_ids": ["x"], "reason": r, "at": when} for r, when in excluded],
        "held": held, "hold_reason": reason if held else None,
        "recovered_event_ids": list(recovered), "webhooks_missing": webhooks_missing,
        "history_error": history_error, "routed_to": "" if held else "responder",
    })


def request(batch_id: str, at: datetime, messages: Iterable[InboundMessage], *,
            missed_items: Iterable[MissedItem] = (), dropped: int = 0, key: str = KEY) -> ResponderRequest:
    return cast(ResponderRequest, {
        "batch_id": batch_id, "customer_key": key, "channel": "wati", "provider_id": WA_ID,
        "messages": list(messages), "prior_last_inbound_at": None, "prior_last_reply_at": None,
        "gap_seconds": None, "missed_check_ran": bool(missed_items), "missed_messages": list(missed_items),
        "missed_dropped_oldest": dropped, "images": [], "created_at": at,
    })


def dead_letter(at: datetime, *, source_topic: str | None, payload: bytes | None = b"\x00garbage",
                key: str | None = KEY, reason: str = "undecodable") -> DeadLetter:
    return cast(DeadLetter, {
        "service": "context", "reason": reason, "error": "not Avro single-object encoding",
        "source_topic": source_topic, "partition": 0, "offset": 7,
        "key": key.encode() if key else None, "payload": payload, "customer_key": key,
        "batch_id": None, "failed_at": at,
    })
