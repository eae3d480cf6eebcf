"""ManyChat External Request body -> customer message or rejection. Pure.

ManyChat has no fixed webhook: the account owner defines the body of an External Request
(`docs/manychat.md`). Three shapes are accepted:

(a) Full Subscriber Data at the top level: `{"id", "first_name", "last_name", "name",
    "last_input_text", "ig_id", "ig_username", ...}`;
(b) wrapped: `{"platform": "manychat", "subscriber": {...full subscriber data...},
    "message": {"text": ..., "attachments": [{"type": "image", "payload": {"url": ...}}]}}` — the
    message's own content is used; without `message`, the subscriber's `last_input_text`;
(c) flat: `{"subscriber_id" (or "user_id", i.e. `{{user_id}}`), "last_input_text" (or "text"),
    "first_name", "last_name"}`.

Channel: an explicit `channel`/`platform` field (top level or subscriber) that names Instagram or
Facebook/Messenger decides; otherwise `ig_id`/`ig_username` mean Instagram, and anything else is
Facebook. A channel we cannot answer on (whatsapp, telegram, sms, ...) is rejected rather than
answered on the wrong channel.

ManyChat sends neither a message id nor a message time: the event id is a hash (see
`synthetic_event_id`) and the provider time is the time ingest received it (`last_interaction` is
the subscriber's, not the message's, and is often stale).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.common.keys import manychat_key
from services.common.records import Channel, InboundMessage

from .outcomes import (
    MAX_TEXT_CHARS,
    MAX_URL_CHARS,
    Invalid,
    Rejected,
    guess_mime,
    json_type,
    opt_obj,
    opt_str,
)

# Retries of one delivery that arrive within the same bucket get the same event id, so context
# drops them. Trade-offs: a retry that straddles a bucket boundary (or comes later than the bucket)
# passes as a second message; two identical messages ("ok", "ok") from one customer inside one
# bucket collapse into one — harmless for answering. 10 s covers an immediate client retry.
DEDUPE_BUCKET_SECONDS = 10

_SUBSCRIBER_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_INSTAGRAM = frozenset({"instagram", "ig"})
_FACEBOOK = frozenset({"facebook", "messenger", "fb", "manychat"})  # `manychat` says nothing


@dataclass(frozen=True)
class Attachment:
    kind: str
    url: str


def normalise_manychat(payload: object, received_at: datetime) -> InboundMessage | Rejected:
    """One ManyChat body (already parsed JSON) -> an InboundMessage, or why it is rejected."""
    if not isinstance(payload, dict):
        return Rejected("not_an_object", f"the body must be a JSON object, got {json_type(payload)}")
    received = received_at.replace(tzinfo=UTC) if received_at.tzinfo is None else received_at.astimezone(UTC)
    try:
        return _normalise(payload, received)
    except Invalid as exc:
        return exc.rejected()


def _normalise(p: dict[str, Any], received_at: datetime) -> InboundMessage:
    subscriber, message, subscriber_id = _shape(p)
    if message is not None:
        text = opt_str(message, "text", limit=MAX_TEXT_CHARS, where="message.")
        attachments = _attachments(message)
    else:
        text = opt_str(subscriber, "last_input_text", limit=MAX_TEXT_CHARS) or opt_str(
            subscriber, "text", limit=MAX_TEXT_CHARS)
        attachments = []
    if text is None and not attachments:
        raise Invalid("no_content", "the message has no text and no attachment with a url")
    channel = _channel(p, subscriber)
    images = [a for a in attachments if a.kind == "image"]
    listed = [a for a in attachments if not images or a is not images[0]]
    listing = [f"[{a.kind}] {a.url}" for a in listed]
    caption = media_ref = media_mime = None
    if images:
        message_type = "image"
        caption, media_ref, media_mime = text, images[0].url, guess_mime(images[0].url)
        body = "\n".join(listing) or None
    else:
        message_type = "text" if text else attachments[0].kind
        body = "\n".join(([text] if text else []) + listing)
    return {
        "event_id": synthetic_event_id(subscriber_id, text, [a.url for a in attachments], received_at),
        "customer_key": manychat_key(subscriber_id),
        "channel": channel,
        "provider_id": subscriber_id,
        "message_type": message_type,
        "text": body,
        "caption": caption,
        "media_ref": media_ref,
        "media_mime": media_mime,
        "sender_name": _name(subscriber),
        "provider_message_ids": [],
        "provider_time": received_at,
        "received_at": received_at,
        "recovered": False,
        "username": opt_str(subscriber, "ig_username"),
    }


def _shape(p: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(subscriber fields, message or None, subscriber id) for shapes (b), (c), (a) in that order."""
    if "subscriber" in p:
        subscriber = opt_obj(p, "subscriber")
        if subscriber is None:
            raise Invalid("missing_subscriber", "'subscriber' is null")
        message = opt_obj(p, "message")
        raw_id = (opt_str(subscriber, "id", where="subscriber.")
                  or opt_str(subscriber, "subscriber_id", where="subscriber.")
                  or opt_str(p, "subscriber_id"))
    elif "subscriber_id" in p or "user_id" in p:
        subscriber, message = p, None
        raw_id = opt_str(p, "subscriber_id") or opt_str(p, "user_id")
    else:
        subscriber, message = p, None
        raw_id = opt_str(p, "id")
    if raw_id is None:
        raise Invalid("missing_subscriber",
                      "no subscriber id: expected 'id', 'subscriber.id', 'subscriber_id' or 'user_id'")
    subscriber_id = raw_id.strip()
    if not _SUBSCRIBER_ID.match(subscriber_id):
        # also catches an unfilled template variable such as "{{user_id}}"
        raise Invalid("bad_field", "the subscriber id must be 1-128 letters, digits or '_.:-'")
    return subscriber, message, subscriber_id


def _attachments(message: dict[str, Any]) -> list[Attachment]:
    raw = message.get("attachments")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise Invalid("bad_field", f"field 'message.attachments' must be a list, got {json_type(raw)}")
    found: list[Attachment] = []
    for n, item in enumerate(raw):
        where = f"message.attachments[{n}]."
        if not isinstance(item, dict):
            raise Invalid("bad_field", f"'message.attachments[{n}]' must be an object, got {json_type(item)}")
        kind = (opt_str(item, "type", where=where) or "file").strip().lower()
        payload = opt_obj(item, "payload", where=where)
        url = (opt_str(payload, "url", limit=MAX_URL_CHARS, where=where + "payload.") if payload else None) \
            or opt_str(item, "url", limit=MAX_URL_CHARS, where=where)
        if url is not None:  # e.g. a story mention or share without a url carries nothing to show
            found.append(Attachment(kind, url.strip()))
    return found


def _channel(p: dict[str, Any], subscriber: dict[str, Any]) -> Channel:
    for doc, where in ((p, ""), (subscriber, "subscriber.")):
        for name in ("channel", "platform"):
            stated = opt_str(doc, name, where=where)
            if stated is None:
                continue
            value = stated.strip().lower()
            if value in _INSTAGRAM:
                return "instagram"
            if value in _FACEBOOK:
                if value != "manychat":
                    return "facebook"
                continue
            raise Invalid("unsupported_channel", f"'{where}{name}' is '{stated}': only Facebook and "
                          "Instagram are answered through ManyChat")
    if opt_str(subscriber, "ig_id") or opt_str(subscriber, "ig_username"):
        return "instagram"
    return "facebook"


def _name(subscriber: dict[str, Any]) -> str | None:
    full = opt_str(subscriber, "name")
    if full:
        return full.strip()
    parts = [opt_str(subscriber, "first_name"), opt_str(subscriber, "last_name")]
    joined = " ".join(part.strip() for part in parts if part)
    return joined or None


def synthetic_event_id(subscriber_id: str, text: str | None, urls: list[str], received_at: datetime) -> str:
    """`mc-<32 hex>`: sha256 of (subscriber id, text, attachment urls, 10-s bucket of received_at)."""
    bucket = int(received_at.timestamp()) // DEDUPE_BUCKET_SECONDS
    material = "\x1f".join([subscriber_id, text or "", "\x1e".join(urls), str(bucket)])
    return "mc-" + hashlib.sha256(material.encode()).hexdigest()[:32]
