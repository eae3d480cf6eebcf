"""WATI getMessages items -> `HistoryItem`s: times parsed to aware UTC, ids and sender kept.

Pure and lenient (docs/wati.md: "real payloads vary"): one garbage item gives None and never
raises, so one odd item cannot cost a customer their whole missed-message context.

What each item becomes:
- `eventType: "message"` (also when `eventType` is missing): `text` is the message text; for media
  it is the caption, else a `[image]`-style placeholder so the model knows something was sent;
  interactive answers use the button/list title.
- `eventType: "broadcastMessage"` (template sends): text from `finalText`; owner defaults to true.
- `eventType: "ticket"` (assignment/status events): text from `eventDescription`.
- any other eventType with some text is kept under its own `event_type` (missed.py reports it as
  excluded `unsupported`, so the audit shows it rather than it vanishing); without text -> None.

Time: `created` (ISO, 0-7 fraction digits, `Z` or no zone = UTC), else `createdDateTime`, else
`timestamp` (unix seconds as a string); for items whose only date is a `24|11|2022` inside the text
(ticket/broadcast descriptions), that date at 00:00 UTC. No parsable time -> `at=None` (missed.py
excludes it as `no_time`; a time is never guessed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from services.common.records import HistoryItem
from services.common.timeparse import first_time, parse_time

MESSAGE = "message"
BROADCAST = "broadcastMessage"
TICKET = "ticket"
_CANONICAL_EVENT_TYPES = {MESSAGE.lower(): MESSAGE, BROADCAST.lower(): BROADCAST, TICKET.lower(): TICKET}

_PIPE_DATE_IN_TEXT = re.compile(r"(?<!\d)(\d{1,2}\|\d{1,2}\|\d{4})(?!\d)")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def parse_history(raw_items: Iterable[object]) -> list[HistoryItem]:
    """Every parsable item of one or more getMessages pages, in the order given (not sorted)."""
    parsed = (parse_history_item(raw) for raw in raw_items)
    return [item for item in parsed if item is not None]


def parse_history_item(raw: object) -> HistoryItem | None:
    """One getMessages item, or None when it is not a message/event at all. Never raises."""
    try:
        return _parse(raw)
    except Exception:  # lenient by contract: a bad item is skipped, never fatal
        return None


def _parse(raw: object) -> HistoryItem | None:
    if not isinstance(raw, Mapping):
        return None
    raw_event_type = _string(raw.get("eventType"))
    event_type = _CANONICAL_EVENT_TYPES.get((raw_event_type or MESSAGE).lower(), raw_event_type or MESSAGE)
    raw_type = _string(raw.get("type"))
    text = _text(raw, event_type, raw_type)
    if not text and not raw_type:
        return None
    if event_type not in (MESSAGE, BROADCAST, TICKET) and not text:
        return None
    message_type = raw_type or {BROADCAST: "template", TICKET: "ticket"}.get(event_type, "text")
    operator_name = _string(raw.get("operatorName"))
    item: HistoryItem = {
        "item_ids": _ids(raw),
        "at": _time(raw, text),
        "event_type": event_type,
        "owner": _owner(raw.get("owner"), event_type, operator_name),
        "operator_name": operator_name,
        "text": text,
        "message_type": message_type,
        "local_message_id": _string(raw.get("localMessageId")),
        "conversation_id": _string(raw.get("conversationId")),
    }
    return item


def _string(value: object) -> str | None:
    """A non-empty string (numbers become strings), else None. Whitespace is kept as sent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | str):
        text = str(value)
        return text if text.strip() else None
    return None


def _ids(raw: Mapping[str, Any]) -> list[str]:
    ids: list[str] = []
    for key in ("id", "whatsappMessageId"):
        value = _string(raw.get(key))
        if value is not None and value.strip() not in ids:
            ids.append(value.strip())
    return ids


def _title(value: object, key: str) -> str | None:
    return _string(value.get(key)) if isinstance(value, Mapping) else None


def _text(raw: Mapping[str, Any], event_type: str, message_type: str | None) -> str:
    if event_type == BROADCAST:
        candidates = [raw.get("finalText"), raw.get("text")]
    elif event_type == TICKET:
        candidates = [raw.get("eventDescription"), raw.get("text")]
    else:
        candidates = [
            raw.get("text"),
            _title(raw.get("listReply"), "title"),
            _title(raw.get("interactiveButtonReply"), "title"),
            _title(raw.get("buttonReply"), "text"),
            raw.get("eventDescription"),
            raw.get("finalText"),
        ]
    for candidate in candidates:
        text = _string(candidate)
        if text is not None:
            return text.strip()
    if event_type == MESSAGE and message_type and message_type.lower() != "text":
        return f"[{message_type.lower()}]"
    return ""


def _time(raw: Mapping[str, Any], text: str) -> datetime | None:
    at = first_time(raw.get("created"), raw.get("createdDateTime"), raw.get("timestamp"))
    if at is not None:
        return at
    match = _PIPE_DATE_IN_TEXT.search(text)
    return parse_time(match.group(1)) if match else None


def _owner(value: object, event_type: str, operator_name: str | None) -> bool:
    """Lenient bool; when absent: broadcasts are the business's, an operator name means business."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE and lowered:
            return False
    return event_type == BROADCAST or operator_name is not None
