"""WATI webhook payload -> customer message, business-side send, ignored event or rejection. Pure.

Facts behind the rules are in `docs/wati.md`. Parsing is lenient about shape (real payloads
vary: numbers where strings are documented, missing `eventType`, `_bsuid` variants) and strict about
types that would corrupt a record (a list where the text belongs is a 400 naming the field).

Customer key: `wati:<waId>` when the payload has a waId, else `wati:<bsuid>`
(`services.common.keys.wati_key`). Why this cannot give one customer two keys: a contact that has a
phone number carries `waId` in every plain payload, so it is keyed by its number; WATI's BSUID-first
variants (`*_bsuid`) may omit `waId` only for contacts that have no number (WhatsApp usernames), and
those are keyed by their BSUID for as long as WATI sends no number. The one thing that would split a
customer — a contact whose number WATI sends sometimes and omits other times — is not a documented
behaviour. `provider_id` is the same identifier: getMessages/sendSessionMessage accept both.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from services.common import own_messages
from services.common.keys import wati_key
from services.common.records import AgentActivity, InboundMessage, SenderKind
from services.common.timeparse import parse_time

from .outcomes import (
    MAX_TEXT_CHARS,
    MAX_URL_CHARS,
    BusinessSend,
    CustomerMessage,
    Ignored,
    Invalid,
    Rejected,
    guess_mime,
    json_type,
    opt_bool,
    opt_obj,
    opt_str,
)

WatiOutcome = CustomerMessage | BusinessSend | Ignored | Rejected

# Event types by their base name (`_bsuid` and `_v2` suffixes removed).
CUSTOMER_EVENTS = frozenset({"message", "newContactMessageReceived"})
BUSINESS_EVENTS = frozenset({"sessionMessageSent", "templateMessageSent"})
STATUS_PREFIXES = ("sentMessage", "templateMessageFailed", "messageStatus")

MEDIA_TYPES = frozenset({"image", "document", "voice", "audio", "video", "sticker"})
# WhatsApp always sends voice notes as Ogg/Opus and stickers as WebP, whatever the file is named.
_MIME_BY_TYPE = {"voice": "audio/ogg", "sticker": "image/webp"}

# waIds are digits, BSUIDs look like `US.123124141512` / `HK.ENT.xxx`, contact ids are hex: none
# holds a slash, space or query character, which would break the API paths they are used in.
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_LAT_LONG = re.compile(r"(-?\d{1,3}(?:\.\d+)?)\s*,\s*(-?\d{1,3}(?:\.\d+)?)")


def base_event_type(event_type: str) -> str:
    """`message_bsuid` -> `message`, `sessionMessageSent_v2_bsuid` -> `sessionMessageSent`."""
    return event_type.strip().removesuffix("_bsuid").removesuffix("_v2")


def classify_wati(payload: object, received_at: datetime) -> WatiOutcome:
    """Classifies one WATI webhook body (already parsed JSON) received at `received_at` (UTC)."""
    if not isinstance(payload, dict):
        return Rejected("not_an_object", f"the body must be a JSON object, got {json_type(payload)}")
    received = _utc(received_at)
    try:
        return _classify(payload, received)
    except Invalid as exc:
        return exc.rejected()


def _classify(p: dict[str, Any], received_at: datetime) -> WatiOutcome:
    event_type = opt_str(p, "eventType", numbers=False)
    owner = opt_bool(p, "owner")
    if event_type is None:
        # WATI sometimes omits eventType on message webhooks; recognise them by their fields.
        if not _looks_like_message(p):
            raise Invalid(
                "unknown_payload",
                "no 'eventType', and not a message (a message has 'waId' or 'bsuid', 'type', "
                "'owner' and 'text' or 'data')",
            )
        base = "message"
    else:
        base = base_event_type(event_type)
        if base not in CUSTOMER_EVENTS and base not in BUSINESS_EVENTS:
            if base.startswith(STATUS_PREFIXES):
                return Ignored(f"status event '{event_type}' carries no message")
            return Ignored(f"event type '{event_type}' is not handled")
    if base in BUSINESS_EVENTS or owner:
        return BusinessSend(_agent_activity(p, event_type or "message", base, received_at))
    return CustomerMessage(_inbound(p, received_at))


def _looks_like_message(p: dict[str, Any]) -> bool:
    has_contact = bool(p.get("waId") or p.get("bsuid"))
    has_content = p.get("text") not in (None, "") or p.get("data") not in (None, "")
    return has_contact and "type" in p and "owner" in p and has_content


def _customer(p: dict[str, Any]) -> tuple[str, str]:
    """(customer key, provider id) from waId, else bsuid."""
    wa_id = opt_str(p, "waId")
    if wa_id is not None:
        wa_id = wa_id.strip().removeprefix("+")  # one number, one key: `+8618...` == `8618...`
    bsuid = opt_str(p, "bsuid")
    for name, value in (("waId", wa_id), ("bsuid", bsuid)):
        if value is not None and not _IDENT.match(value.strip()):
            raise Invalid("bad_field", f"field '{name}' is not a WhatsApp id (letters, digits, '._:@-')")
    if not wa_id and not bsuid:
        raise Invalid("missing_customer", "neither 'waId' nor 'bsuid' is present: no customer to key by")
    key = wati_key(wa_id, bsuid)
    return key, key.split(":", 1)[1]


def _ids(p: dict[str, Any]) -> list[str]:
    """Every id WATI knows the message by: whatsappMessageId (Meta's wamid, globally unique) first."""
    return [i for i in (opt_str(p, "whatsappMessageId"), opt_str(p, "id")) if i]


def provider_time(p: dict[str, Any], received_at: datetime) -> datetime:
    """`created` (WATI's record, sub-second), else `timestamp` (unix seconds from WhatsApp).

    `created` first because getMessages items are placed on WATI's clock too (their `created`):
    the batch's first message and the history items it is compared with (strictly before it) must
    share one clock and its precision — `timestamp` is whole seconds and seen ~3 s earlier than
    `created`, which could push an agent message of the same seconds out of the window.

    A message without a parseable time is still a message: it gets `received_at`, which is at most
    the webhook's delivery delay later than the truth. A present but garbage value is tolerated the
    same way rather than rejected, because losing the message would be worse than a late clock.
    """
    for name in ("created", "timestamp"):
        value = p.get(name)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            parsed = parse_time(value)
            if parsed is not None:
                return parsed
    return received_at


def _data(p: dict[str, Any]) -> tuple[str | None, Any]:
    """`data` as (media path or URL, structured value): a string is a reference, else structure."""
    value = p.get("data")
    if isinstance(value, dict | list):
        return None, value
    ref = opt_str(p, "data", limit=MAX_URL_CHARS)
    if ref is not None and ref.lstrip().startswith(("{", "[")):
        try:
            return None, json.loads(ref)  # location/contacts sometimes arrive as a JSON string
        except ValueError:
            pass
    return ref, None


def _reply_title(p: dict[str, Any]) -> str | None:
    """The chosen option of an interactive answer (list, interactive button, quick-reply button)."""
    for obj_name, field in (("listReply", "title"), ("interactiveButtonReply", "title"),
                            ("buttonReply", "text")):
        obj = opt_obj(p, obj_name)
        if obj is not None:
            title = opt_str(obj, field, limit=MAX_TEXT_CHARS, where=f"{obj_name}.")
            if title is not None:
                return title
    return None


def _inbound(p: dict[str, Any], received_at: datetime) -> InboundMessage:
    """A customer's message. `operatorName`/`assignedId` here name the ASSIGNEE, so they are unused."""
    key, provider_id = _customer(p)
    ids = _ids(p)
    if not ids:
        raise Invalid("missing_event_id", "neither 'whatsappMessageId' nor 'id' is present")
    text = opt_str(p, "text", limit=MAX_TEXT_CHARS)
    message_type = (opt_str(p, "type", numbers=False) or "text").strip()
    ref, structured = _data(p)
    reply = _reply_title(p)
    caption: str | None = None
    media_ref: str | None = None
    media_mime: str | None = None
    if message_type in MEDIA_TYPES:
        caption, text = text, None  # WATI puts a media message's caption in `text`
        media_ref = ref
        media_mime = guess_mime(ref) or _MIME_BY_TYPE.get(message_type)
    elif message_type == "location":
        text = location_text(text, structured if structured is not None else ref)
    elif message_type == "contacts":
        text = contacts_text(text, structured if structured is not None else p.get("messageContact"))
    elif message_type == "reaction":
        text = reaction_text(text, structured if structured is not None else ref)
    elif message_type in ("order", "catalog"):
        label = "🛒 order" if message_type == "order" else "🛍️ catalog"
        text = f"{label}: {text}" if text else label
    elif reply is not None:
        text = reply  # button / interactive / list answers
    elif ref is not None and message_type != "text":
        media_ref, media_mime = ref, guess_mime(ref)  # an unknown type that carries a file
    return {
        "event_id": ids[0],
        "customer_key": key,
        "channel": "wati",
        "provider_id": provider_id,
        "message_type": message_type,
        "text": text,
        "caption": caption,
        "media_ref": media_ref,
        "media_mime": media_mime,
        "sender_name": opt_str(p, "senderName"),
        "provider_message_ids": ids,
        "provider_time": provider_time(p, received_at),
        "received_at": received_at,
        "recovered": False,
        "username": opt_str(p, "username"),
    }


def sender_kind(
    base_event: str, message_type: str, operator_name: str | None, operator_email: str | None
) -> SenderKind:
    """Who sent a business-side message, judged by WATI's operator fields (first rule that fits).

    `API Token ...` is a send through the API, i.e. ours; `Bot` (also seen as `"Bot "`) is WATI's own
    chatbot — both by the one own-message rule (services/common/own_messages.py); a template event
    is a template; any other name or an email is a human agent. Context re-checks every kind with
    the same rule against the ids of the sends it recorded.
    """
    name = (operator_name or "").strip()
    ours_or_bot = own_messages.operator_kind(name)  # the one rule, shared with the context service
    if ours_or_bot is not None:
        return ours_or_bot
    if base_event == "templateMessageSent" or message_type == "template":
        return "template"
    if name or (operator_email or "").strip():
        return "human_agent"
    return "unknown"


def _agent_activity(p: dict[str, Any], event_type: str, base: str, received_at: datetime) -> AgentActivity:
    """A business-side send (`sessionMessageSent_v2`, `templateMessageSent_v2`, owner=true messages)."""
    key, provider_id = _customer(p)
    ids = _ids(p)
    local_id = opt_str(p, "localMessageId")
    if not ids and not local_id:
        raise Invalid("missing_event_id", "none of 'whatsappMessageId', 'id', 'localMessageId' is present")
    is_template = base == "templateMessageSent"
    message_type = (opt_str(p, "type", numbers=False) or ("template" if is_template else "text")).strip()
    # templates' rendered text is `finalText` in the history API; accept it here too
    text = opt_str(p, "text", limit=MAX_TEXT_CHARS) or opt_str(p, "finalText", limit=MAX_TEXT_CHARS)
    if text is None and is_template:
        name = opt_str(p, "templateName")
        text = f"[template {name}]" if name else None
    operator_name = opt_str(p, "operatorName")
    operator_email = opt_str(p, "operatorEmail")
    return {
        "event_id": ids[0] if ids else str(local_id),
        "customer_key": key,
        "channel": "wati",
        "provider_id": provider_id,
        "event_type": event_type,
        "sender_kind": sender_kind(base, message_type, operator_name, operator_email),
        "operator_name": operator_name,
        "operator_email": operator_email,
        "message_type": message_type,
        "text": text,
        "provider_message_ids": ids,
        "local_message_id": local_id,
        "provider_time": provider_time(p, received_at),
        "received_at": received_at,
    }


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- readable texts for structured messages (lenient: unknown shapes fall back to the raw text) ---


def _num(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def location_text(text: str | None, data: Any) -> str:
    """`📍 location: 13.69,-89.19 — Name, Address` from whatever coordinates the payload carries."""
    lat = lon = None
    extras: list[str] = []
    if isinstance(data, dict):
        lat = _num(data.get("latitude", data.get("lat")))
        lon = _num(data.get("longitude", data.get("long", data.get("lng"))))
        extras = [str(data[k]) for k in ("name", "address") if isinstance(data.get(k), str) and data[k]]
    if lat is None or lon is None:
        for source in (data if isinstance(data, str) else None, text):
            found = _LAT_LONG.search(source or "")
            if found:
                lat, lon = float(found.group(1)), float(found.group(2))
                break
    if lat is None or lon is None:
        return f"📍 location: {text}" if text else "📍 location"
    place = f"📍 location: {lat:g},{lon:g}"
    if extras:
        place += " — " + ", ".join(extras)
    elif text and not _LAT_LONG.search(text):
        place += f" — {text}"
    return place


def _contact_name(contact: dict[str, Any]) -> str | None:
    name = contact.get("name")
    if isinstance(name, dict):
        name = name.get("formatted_name") or " ".join(
            str(name[k]) for k in ("first_name", "last_name") if isinstance(name.get(k), str))
    if isinstance(name, str) and name.strip():
        return name.strip()
    for k in ("formattedName", "fullName", "displayName"):
        if isinstance(contact.get(k), str) and contact[k].strip():
            return str(contact[k]).strip()
    return None


def _contact_phones(contact: dict[str, Any]) -> list[str]:
    phones = contact.get("phones")
    out: list[str] = []
    if isinstance(phones, list):
        for phone in phones:
            if isinstance(phone, dict):
                value = phone.get("phone") or phone.get("wa_id")
                if isinstance(value, str | int) and not isinstance(value, bool):
                    out.append(str(value))
            elif isinstance(phone, str):
                out.append(phone)
    elif isinstance(contact.get("phone"), str):
        out.append(contact["phone"])
    return out


def contacts_text(text: str | None, data: Any) -> str:
    """`👤 contact: Ana P (+503 7000 0000); Bob` from a shared contact card."""
    cards = data if isinstance(data, list) else [data] if isinstance(data, dict) else []
    described: list[str] = []
    for card in cards:
        if not isinstance(card, dict):
            continue
        name = _contact_name(card)
        phones = _contact_phones(card)
        if name or phones:
            described.append(f"{name or '?'}" + (f" ({', '.join(phones)})" if phones else ""))
    if described:
        return "👤 contact: " + "; ".join(described)
    return f"👤 contact: {text}" if text else "👤 contact"


def reaction_text(text: str | None, data: Any) -> str:
    """`reaction: 👍` — the emoji is in `text`, or in `data` (`{"emoji": ...}` or a plain string)."""
    emoji = text
    if not emoji and isinstance(data, dict) and isinstance(data.get("emoji"), str):
        emoji = data["emoji"]
    if not emoji and isinstance(data, str):
        emoji = data
    emoji = (emoji or "").strip()
    return f"reaction: {emoji}" if emoji else "reaction removed"
