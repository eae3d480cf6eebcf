"""The ManyChat normaliser: the three accepted shapes, channel rules, synthetic ids, rejections."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common import codec
from services.ingest.manychat import DEDUPE_BUCKET_SECONDS, normalise_manychat, synthetic_event_id
from services.ingest.outcomes import MAX_TEXT_CHARS, Rejected

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "manychat"
# 5 s into a 10-s bucket, so +/-4 s stays inside it
RECEIVED = datetime.fromtimestamp(1764590405, UTC)


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return doc


def normalised(payload: object, received: datetime = RECEIVED) -> dict[str, Any]:
    outcome = normalise_manychat(payload, received)
    assert not isinstance(outcome, Rejected), outcome
    record = dict(outcome)
    codec.decode("InboundMessage", codec.encode("InboundMessage", record))
    return record


def rejected(payload: object) -> Rejected:
    outcome = normalise_manychat(payload, RECEIVED)
    assert isinstance(outcome, Rejected), outcome
    return outcome


def test_full_subscriber_data() -> None:
    r = normalised(fixture("full_subscriber"))
    assert r["customer_key"] == "manychat:1234567890" and r["provider_id"] == "1234567890"
    assert r["channel"] == "facebook" and r["message_type"] == "text"
    assert r["text"] == "hola, ¿tienen envíos?" and r["sender_name"] == "Ana P"
    assert r["provider_time"] == RECEIVED and r["received_at"] == RECEIVED  # ManyChat sends no time
    assert r["provider_message_ids"] == [] and r["event_id"].startswith("mc-")


def test_instagram_subscriber() -> None:
    r = normalised(fixture("instagram_full"))
    assert r["channel"] == "instagram" and r["username"] == "ana.shop"
    assert r["customer_key"] == "manychat:2233445566"


def test_wrapped_shape_with_image_and_file() -> None:
    r = normalised(fixture("wrapped_image"))
    assert r["customer_key"] == "manychat:3344556677"
    assert r["message_type"] == "image"
    assert r["media_ref"] == "https://scontent.xx.fbcdn.net/v/t1.15752-9/123456789_n.jpg?_nc_cat=1&oh=abc"
    assert r["media_mime"] == "image/jpeg"
    assert r["caption"] == "here is my payment"  # the message's text, not the stale last_input_text
    assert r["text"] == "[file] https://cdn.fbsbx.com/v/t59.2708-21/receipt.pdf?oh=def"


def test_wrapped_shape_without_message_uses_last_input_text() -> None:
    p = fixture("wrapped_image")
    del p["message"]
    r = normalised(p)
    assert (r["message_type"], r["text"]) == ("text", "stale text")


def test_wrapped_shape_only_attachments_and_several_images() -> None:
    p = fixture("wrapped_image")
    p["message"] = {"attachments": [
        {"type": "video", "payload": {"url": "https://v/1.mp4"}},
        {"type": "image", "payload": {"url": "https://i/1.png"}},
        {"type": "image", "url": "https://i/2.jpg"},
        {"type": "share", "payload": {"url": None}},
    ]}
    r = normalised(p)
    assert (r["message_type"], r["media_ref"], r["media_mime"], r["caption"]) == (
        "image", "https://i/1.png", "image/png", None)
    assert r["text"] == "[video] https://v/1.mp4\n[image] https://i/2.jpg"


def test_non_image_attachments_are_listed_in_text() -> None:
    p = fixture("wrapped_image")
    p["message"] = {"text": "see", "attachments": [{"type": "audio", "payload": {"url": "https://a/1.m4a"}}]}
    r = normalised(p)
    assert (r["message_type"], r["text"], r["media_ref"]) == ("text", "see\n[audio] https://a/1.m4a", None)
    p["message"] = {"attachments": [{"type": "audio", "payload": {"url": "https://a/1.m4a"}}]}
    r = normalised(p)
    assert (r["message_type"], r["text"]) == ("audio", "[audio] https://a/1.m4a")


def test_flat_shape() -> None:
    r = normalised(fixture("flat"))
    assert r["customer_key"] == "manychat:4455667788" and r["text"] == "quiero hablar con alguien"
    assert r["sender_name"] == "Luis" and r["channel"] == "facebook"
    r = normalised({"user_id": 5566, "text": "hi", "first_name": "A", "last_name": "B"})
    assert r["customer_key"] == "manychat:5566" and r["text"] == "hi" and r["sender_name"] == "A B"


@pytest.mark.parametrize(("extra", "channel"), [
    ({"channel": "instagram"}, "instagram"),
    ({"platform": "Instagram"}, "instagram"),
    ({"channel": "ig"}, "instagram"),
    ({"channel": "messenger", "ig_id": "178"}, "facebook"),  # an explicit statement wins
    ({"platform": "manychat", "ig_username": "ana"}, "instagram"),  # "manychat" says nothing
    ({"platform": "manychat"}, "facebook"),
    ({"ig_id": "17841400000000001"}, "instagram"),
    ({}, "facebook"),
])
def test_channel_rules(extra: dict[str, Any], channel: str) -> None:
    p = {**fixture("flat"), **extra}
    assert normalised(p)["channel"] == channel


def test_channel_stated_in_the_subscriber_of_the_wrapped_shape() -> None:
    p = fixture("wrapped_image")
    p["subscriber"]["channel"] = "instagram"
    assert normalised(p)["channel"] == "instagram"


# --- synthetic event id ---


def test_same_content_within_the_bucket_gets_the_same_id() -> None:
    first = normalised(fixture("wrapped_image"))
    retry = normalised(fixture("wrapped_image"), RECEIVED + timedelta(seconds=4))
    assert first["event_id"] == retry["event_id"]


def test_id_changes_with_bucket_text_attachments_and_subscriber() -> None:
    base = normalised(fixture("flat"))["event_id"]
    later = normalised(fixture("flat"), RECEIVED + timedelta(seconds=DEDUPE_BUCKET_SECONDS))["event_id"]
    other_text = normalised({**fixture("flat"), "last_input_text": "otra cosa"})["event_id"]
    other_sub = normalised({**fixture("flat"), "subscriber_id": "999"})["event_id"]
    assert len({base, later, other_text, other_sub}) == 4
    assert synthetic_event_id("1", "a", ["u1"], RECEIVED) != synthetic_event_id("1", "a", ["u2"], RECEIVED)
    assert synthetic_event_id("1", "a", [], RECEIVED) == synthetic_event_id("1", "a", [], RECEIVED)


# --- rejections ---


@pytest.mark.parametrize("payload", [[], "x", 1, None])
def test_not_an_object(payload: object) -> None:
    assert rejected(payload).code == "not_an_object"


def with_changes(name: str, **changes: object) -> dict[str, Any]:
    p = copy.deepcopy(fixture(name))
    for key, value in changes.items():
        if value is ...:
            p.pop(key, None)
        else:
            p[key] = value
    return p


@pytest.mark.parametrize(("payload", "code", "words"), [
    ({"last_input_text": "hola", "first_name": "Ana"}, "missing_subscriber", "subscriber id"),
    (with_changes("full_subscriber", id=None), "missing_subscriber", "subscriber id"),
    ({"subscriber": None, "message": {"text": "x"}}, "missing_subscriber", "null"),
    ({"subscriber": {"name": "x"}, "message": {"text": "x"}}, "missing_subscriber", "subscriber id"),
    ({"subscriber": "123", "message": {"text": "x"}}, "bad_field", "'subscriber' must be an object"),
    (with_changes("flat", subscriber_id="{{user_id}}"), "bad_field", "subscriber id"),
    (with_changes("flat", subscriber_id="12 34"), "bad_field", "subscriber id"),
    (with_changes("flat", last_input_text=None), "no_content", "no text"),
    (with_changes("flat", last_input_text="   "), "no_content", "no text"),
    (with_changes("full_subscriber", last_input_text=...), "no_content", "no text"),
    (with_changes("flat", last_input_text=["a"]), "bad_field", "'last_input_text' must be a string"),
    (with_changes("flat", last_input_text="x" * (MAX_TEXT_CHARS + 1)), "text_too_long", "10000"),
    (with_changes("flat", channel="whatsapp"), "unsupported_channel", "'channel' is 'whatsapp'"),
    (with_changes("flat", platform="telegram"), "unsupported_channel", "telegram"),
    (with_changes("wrapped_image", message="hola"), "bad_field", "'message' must be an object"),
    (with_changes("wrapped_image", message={"attachments": {"type": "image"}}), "bad_field",
     "'message.attachments' must be a list"),
    (with_changes("wrapped_image", message={"attachments": ["https://x"]}), "bad_field",
     "'message.attachments[0]' must be an object"),
    (with_changes("wrapped_image", message={"attachments": [{"type": "image", "payload": "u"}]}),
     "bad_field", "'message.attachments[0].payload' must be an object"),
    (with_changes("wrapped_image", message={"attachments": [{"type": "image", "payload": {"url": 5 > 3}}]}),
     "bad_field", "'message.attachments[0].payload.url'"),
    (with_changes("wrapped_image", message={"text": None, "attachments": [{"type": "share"}]}),
     "no_content", "no text"),
    (with_changes("wrapped_image", message={"text": {"t": 1}}), "bad_field", "'message.text'"),
])
def test_rejections_name_the_problem(payload: object, code: str, words: str) -> None:
    outcome = rejected(payload)
    assert outcome.code == code and words in outcome.reason, outcome
