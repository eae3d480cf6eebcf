"""The WATI normaliser: every message type, timestamp format, classification rule and rejection."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from services.common import codec
from services.ingest.outcomes import MAX_TEXT_CHARS, BusinessSend, CustomerMessage, Ignored, Rejected
from services.ingest.wati import base_event_type, classify_wati, sender_kind

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "wati"
RECEIVED = datetime(2025, 12, 1, 8, 0, 0, tzinfo=UTC)


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return doc


def message(payload: dict[str, Any], received: datetime = RECEIVED) -> dict[str, Any]:
    outcome = classify_wati(payload, received)
    assert isinstance(outcome, CustomerMessage), outcome
    record = dict(outcome.record)
    codec.decode("InboundMessage", codec.encode("InboundMessage", record))  # fits the schema
    return record


def activity(payload: dict[str, Any]) -> dict[str, Any]:
    outcome = classify_wati(payload, RECEIVED)
    assert isinstance(outcome, BusinessSend), outcome
    record = dict(outcome.record)
    codec.decode("AgentActivity", codec.encode("AgentActivity", record))
    return record


def rejected(payload: object) -> Rejected:
    outcome = classify_wati(payload, RECEIVED)
    assert isinstance(outcome, Rejected), outcome
    return outcome


# --- customer messages, one per type of the reference ---


def test_text_message_from_the_reference() -> None:
    p = fixture("text")
    r = message(p)
    assert r["event_id"] == p["whatsappMessageId"]
    assert r["provider_message_ids"] == [p["whatsappMessageId"], p["id"]]
    assert r["customer_key"] == "wati:50370000001" and r["provider_id"] == "50370000001"
    assert r["channel"] == "wati" and r["message_type"] == "text"
    assert r["text"] == "hello, is my order ready?" and r["caption"] is None and r["media_ref"] is None
    assert r["sender_name"] == "Ana Pérez" and r["username"] is None
    assert r["provider_time"] == datetime(2025, 11, 27, 10, 14, 16, 626857, tzinfo=UTC)  # `created`
    assert r["received_at"] == RECEIVED and r["recovered"] is False


@pytest.mark.parametrize(("name", "mtype", "ref", "mime", "caption"), [
    ("image", "image", "data/images/3AF5B54BC1F6E79D5D65.jpg", "image/jpeg", "this is the transfer"),
    ("document", "document",
     "https://live-mt-server.wati.io/123456/api/file/showFile?fileName=data/documents/invoice_0042.pdf",
     "application/pdf", "invoice"),
    ("voice", "voice", "data/audios/3AF5B54BC1F6E79D5D66", "audio/ogg", None),
    ("audio", "audio", "data/audios/song.mp3", "audio/mpeg", None),
    ("video", "video", "data/videos/unboxing.mp4", "video/mp4", None),
    ("sticker", "sticker", "data/stickers/3AF5B54BC1F6E79D5D67", "image/webp", None),
])
def test_media_caption_reference_and_mime(
    name: str, mtype: str, ref: str, mime: str, caption: str | None
) -> None:
    r = message(fixture(name))
    assert (r["message_type"], r["media_ref"], r["media_mime"], r["caption"]) == (mtype, ref, mime, caption)
    assert r["text"] is None  # WATI's `text` of a media message is its caption


def test_media_without_known_extension_has_no_mime() -> None:
    p = fixture("image")
    p["data"] = "data/images/NOEXTENSION"
    assert message(p)["media_mime"] is None


@pytest.mark.parametrize(("name", "text"), [
    ("button", "Yes, confirm"),
    ("interactive", "Track my order"),
    ("interactive_button", "Talk to an agent"),
])
def test_interactive_answers_become_text(name: str, text: str) -> None:
    assert message(fixture(name))["text"] == text


def test_button_reply_wins_over_text_and_falls_back_to_it() -> None:
    p = fixture("button")
    p["buttonReply"] = {"text": "Cancel"}
    assert message(p)["text"] == "Cancel"
    p["buttonReply"] = None
    assert message(p)["text"] == "Yes, confirm"


def test_location_from_structured_data() -> None:
    expected = "📍 location: 13.6929,-89.2182 — Plaza Futura, San Salvador"
    assert message(fixture("location"))["text"] == expected


@pytest.mark.parametrize(("data", "text", "expected"), [
    ({"lat": "13.5", "long": "-89.1"}, None, "📍 location: 13.5,-89.1"),
    ({"latitude": 1, "lng": 2}, "my house", "📍 location: 1,2 — my house"),
    ('{"latitude": 13.7, "longitude": -89.2}', None, "📍 location: 13.7,-89.2"),
    ("https://maps.google.com/?q=13.70,-89.20", None, "📍 location: 13.7,-89.2"),
    (None, "13.70, -89.20", "📍 location: 13.7,-89.2"),
    (None, "near the park", "📍 location: near the park"),
    (None, None, "📍 location"),
    ({"unexpected": True}, None, "📍 location"),
])
def test_location_is_lenient(data: object, text: str | None, expected: str) -> None:
    p = fixture("location")
    p["data"], p["text"] = data, text
    r = message(p)
    assert r["text"] == expected and r["media_ref"] is None


def test_contacts_reaction_order_catalog_placeholder() -> None:
    assert message(fixture("contacts"))["text"] == "👤 contact: Bob Lee (+503 7111 2222)"
    assert message(fixture("reaction"))["text"] == "reaction: 👍"
    assert message(fixture("order"))["text"] == "🛒 order: 2 items"
    assert message(fixture("catalog"))["text"] == "🛍️ catalog: Show me the catalog"
    placeholder = message(fixture("media_placeholder"))
    assert placeholder["message_type"] == "media_placeholder" and placeholder["text"] is None


@pytest.mark.parametrize(("data", "contact", "text", "expected"), [
    (None, {"name": "Eva", "phone": "+1 555"}, None, "👤 contact: Eva (+1 555)"),
    ([{"name": {"first_name": "Al", "last_name": "Bo"}}, {"phones": ["+1"]}], None, None,
     "👤 contact: Al Bo; ? (+1)"),
    ([{"formattedName": "Zed", "phones": [{"wa_id": 5037}]}], None, None, "👤 contact: Zed (5037)"),
    (None, None, "shared a card", "👤 contact: shared a card"),
    ("not a card", None, None, "👤 contact"),
])
def test_contacts_is_lenient(data: object, contact: object, text: str | None, expected: str) -> None:
    p = fixture("contacts")
    p["data"], p["messageContact"], p["text"] = data, contact, text
    assert message(p)["text"] == expected


@pytest.mark.parametrize(("data", "text", "expected"), [
    ({"emoji": "❤️", "message_id": "wamid.X"}, None, "reaction: ❤️"),
    ("😂", None, "reaction: 😂"),
    (None, None, "reaction removed"),
])
def test_reaction_emoji_sources(data: object, text: str | None, expected: str) -> None:
    p = fixture("reaction")
    p["data"], p["text"] = data, text
    assert message(p)["text"] == expected


def test_order_and_catalog_without_text() -> None:
    p = fixture("order")
    p["text"] = None
    assert message(p)["text"] == "🛒 order"
    p["type"] = "catalog"
    assert message(p)["text"] == "🛍️ catalog"


def test_unknown_type_is_accepted_as_is() -> None:
    p = fixture("text")
    p["type"], p["text"] = "ephemeral_poll", "which one?"
    r = message(p)
    assert (r["message_type"], r["text"], r["media_ref"]) == ("ephemeral_poll", "which one?", None)
    p["data"] = "data/files/poll.png"
    r = message(p)
    assert (r["media_ref"], r["media_mime"]) == ("data/files/poll.png", "image/png")


def test_missing_type_defaults_to_text() -> None:
    p = fixture("text")
    del p["type"]
    assert message(p)["message_type"] == "text"


# --- event types, BSUID, keys ---


def test_new_contact_and_missing_event_type_are_messages() -> None:
    new = message(fixture("new_contact"))
    assert new["text"] == "hi, first time here"
    assert new["provider_time"] == datetime(2025, 11, 27, 10, 15, 0, 123456, tzinfo=UTC)
    assert message(fixture("no_event_type"))["text"] == "no event type on this one"


def test_bsuid_only_message_is_keyed_by_bsuid() -> None:
    r = message(fixture("message_bsuid"))
    assert r["customer_key"] == "wati:US.1231241415120001" and r["provider_id"] == "US.1231241415120001"
    assert r["username"] == "@bob"


def test_wa_id_wins_over_bsuid_so_a_customer_keeps_one_key() -> None:
    p = fixture("message_bsuid")
    p["waId"] = "50371234567"
    assert message(p)["customer_key"] == "wati:50371234567"
    p["waId"] = "+50371234567"
    assert message(p)["customer_key"] == "wati:50371234567"
    p["waId"] = 50371234567  # a number where a string is documented
    assert message(p)["customer_key"] == "wati:50371234567"


@pytest.mark.parametrize("event_type", [
    "message_bsuid", "newContactMessageReceived_bsuid", "message_v2", "newContactMessageReceived_v2_bsuid"])
def test_every_message_variant_is_a_message(event_type: str) -> None:
    p = fixture("text")
    p["eventType"] = event_type
    assert message(p)["text"] == "hello, is my order ready?"


def test_base_event_type() -> None:
    assert base_event_type("sessionMessageSent_v2_bsuid") == "sessionMessageSent"
    assert base_event_type(" message_bsuid ") == "message"
    assert base_event_type("templateMessageSent_v2") == "templateMessageSent"


def test_assignee_on_a_customer_message_is_not_the_sender() -> None:
    r = message(fixture("text"))  # carries operatorName "Hien Trinh": the assignee
    assert r["sender_name"] == "Ana Pérez"
    assert "Hien" not in json.dumps({k: str(v) for k, v in r.items()})


# --- time ---


@pytest.mark.parametrize(("fields", "expected"), [
    ({"timestamp": "1764238453"}, datetime(2025, 11, 27, 10, 14, 13, tzinfo=UTC)),
    ({"timestamp": 1764238453}, datetime(2025, 11, 27, 10, 14, 13, tzinfo=UTC)),
    ({"timestamp": "1764238453123"}, datetime(2025, 11, 27, 10, 14, 13, 123000, tzinfo=UTC)),
    ({"timestamp": None, "created": "2025-11-27T10:14:16.6268572Z"},
     datetime(2025, 11, 27, 10, 14, 16, 626857, tzinfo=UTC)),
    ({"created": "2022-11-24T14:23:36.141Z"}, datetime(2022, 11, 24, 14, 23, 36, 141000, tzinfo=UTC)),
    ({"created": "2022-11-24T14:23:36.14"}, datetime(2022, 11, 24, 14, 23, 36, 140000, tzinfo=UTC)),
    ({"created": "2022-11-24T08:23:36-06:00"}, datetime(2022, 11, 24, 14, 23, 36, tzinfo=UTC)),
    ({"timestamp": "garbage", "created": "2022-11-24T14:23:36Z"},
     datetime(2022, 11, 24, 14, 23, 36, tzinfo=UTC)),
    # both present: WATI's `created` wins (same clock and precision as getMessages items)
    ({"timestamp": "1764238453", "created": "2025-11-27T10:14:16.6268572Z"},
     datetime(2025, 11, 27, 10, 14, 16, 626857, tzinfo=UTC)),
    ({"timestamp": "1764238453", "created": "garbage"}, datetime(2025, 11, 27, 10, 14, 13, tzinfo=UTC)),
    ({"timestamp": ["1764238453"], "created": None}, RECEIVED),
    ({"timestamp": "", "created": "not a time"}, RECEIVED),
    ({}, RECEIVED),
])
def test_provider_time_formats(fields: dict[str, Any], expected: datetime) -> None:
    p = fixture("text")
    p.pop("timestamp")
    p.pop("created")
    p.update(fields)
    r = message(p)
    assert r["provider_time"] == expected and r["provider_time"].tzinfo is not None


def test_received_at_is_utc_whatever_zone_it_came_in() -> None:
    local = RECEIVED.astimezone(timezone(timedelta(hours=-6)))
    assert message(fixture("text"), local)["received_at"] == RECEIVED
    naive = RECEIVED.replace(tzinfo=None)
    assert message(fixture("text"), naive)["received_at"] == RECEIVED


def test_event_id_falls_back_to_id() -> None:
    p = fixture("text")
    p["whatsappMessageId"] = None
    r = message(p)
    assert r["event_id"] == p["id"] and r["provider_message_ids"] == [p["id"]]


# --- business-side sends ---


def test_session_message_sent_by_a_human_agent() -> None:
    p = fixture("session_message_sent_v2")
    r = activity(p)
    assert r["sender_kind"] == "human_agent" and r["event_type"] == "sessionMessageSent_v2"
    assert r["customer_key"] == "wati:50370000001" and r["provider_id"] == "50370000001"
    assert r["operator_name"] == "Maria Lopez" and r["operator_email"] == "maria@example.com"
    assert r["text"] == "Hi Ana, your order ships tomorrow." and r["message_type"] == "text"
    assert r["event_id"] == p["whatsappMessageId"]
    assert r["provider_message_ids"] == [p["whatsappMessageId"], p["id"]]
    assert r["local_message_id"] == p["localMessageId"]
    assert r["provider_time"] == datetime.fromtimestamp(1765791326, UTC)  # no `created`: timestamp


def test_bsuid_variants_of_business_sends() -> None:
    bot = activity(fixture("session_message_sent_v2_bsuid"))
    assert bot["sender_kind"] == "wati_bot" and bot["customer_key"] == "wati:SV.5559876543210"
    assert bot["event_type"] == "sessionMessageSent_v2_bsuid"
    own = activity(fixture("template_message_sent_v2_bsuid"))
    assert own["sender_kind"] == "own_send" and own["customer_key"] == "wati:SV.5552222333444"


def test_template_sent() -> None:
    r = activity(fixture("template_message_sent_v2"))
    assert r["sender_kind"] == "template" and r["message_type"] == "template"
    assert r["provider_time"] == datetime(2025, 12, 15, 9, 30, 0, 123456, tzinfo=UTC)
    p = fixture("template_message_sent_v2")
    del p["type"]
    p["text"] = None
    r = activity(p)
    assert r["message_type"] == "template" and r["text"] == "[template appointment_confirmed]"
    p["finalText"] = "Hello Ana (final)"
    assert activity(p)["text"] == "Hello Ana (final)"


def test_owner_true_message_is_business_side() -> None:
    r = activity(fixture("owner_message"))
    assert r["sender_kind"] == "own_send" and r["event_type"] == "message"
    p = fixture("no_event_type")
    p["owner"] = True
    p["operatorName"] = "Maria"
    assert activity(p)["sender_kind"] == "human_agent"
    p["owner"] = "true"  # lenient boolean
    assert activity(p)["sender_kind"] == "human_agent"


def test_business_send_event_id_may_fall_back_to_local_message_id() -> None:
    p = fixture("session_message_sent_v2")
    p["whatsappMessageId"] = p["id"] = None
    r = activity(p)
    assert r["event_id"] == p["localMessageId"] and r["provider_message_ids"] == []


@pytest.mark.parametrize(("base", "mtype", "name", "email", "kind"), [
    ("sessionMessageSent", "text", "API Token 7f3a", None, "own_send"),
    ("sessionMessageSent", "text", "api token", "x@y.z", "own_send"),
    ("templateMessageSent", "template", "API Token x", None, "own_send"),
    ("sessionMessageSent", "text", "Bot", None, "wati_bot"),
    ("sessionMessageSent", "text", "Bot ", None, "wati_bot"),
    ("sessionMessageSent", "text", " b o T", None, "wati_bot"),
    ("templateMessageSent", "template", None, None, "template"),
    ("sessionMessageSent", "template", None, None, "template"),
    ("templateMessageSent", "text", "Maria", None, "template"),
    ("sessionMessageSent", "text", "Maria", None, "human_agent"),
    ("sessionMessageSent", "text", "Botanic Team", None, "human_agent"),
    ("sessionMessageSent", "text", None, "maria@example.com", "human_agent"),
    ("sessionMessageSent", "text", "  ", " ", "unknown"),
    ("message", "text", None, None, "unknown"),
])
def test_sender_kind_rules(base: str, mtype: str, name: str | None, email: str | None, kind: str) -> None:
    assert sender_kind(base, mtype, name, email) == kind


# --- ignored events ---


@pytest.mark.parametrize("event_type", [
    "sentMessageDELIVERED_v2", "sentMessageREAD_v2", "sentMessageREPLIED_v2", "sentMessageDELIVERED",
    "sentMessageDELIVERED_v2_bsuid", "templateMessageFailed", "messageStatusUpdated"])
def test_status_events_are_ignored(event_type: str) -> None:
    p = fixture("status_delivered")
    p["eventType"] = event_type
    outcome = classify_wati(p, RECEIVED)
    assert isinstance(outcome, Ignored) and "status event" in outcome.reason


def test_fixture_status_events_and_unknown_events_are_ignored() -> None:
    assert isinstance(classify_wati(fixture("status_delivered"), RECEIVED), Ignored)
    assert isinstance(classify_wati(fixture("template_failed"), RECEIVED), Ignored)
    outcome = classify_wati({"eventType": "ticketClosed", "waId": "1"}, RECEIVED)
    assert isinstance(outcome, Ignored) and "not handled" in outcome.reason


# --- rejections (HTTP 400) ---


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, None])
def test_not_an_object(payload: object) -> None:
    assert rejected(payload).code == "not_an_object"


def mutate(name: str, **changes: object) -> dict[str, Any]:
    p = copy.deepcopy(fixture(name))
    for key, value in changes.items():
        if value is ...:
            p.pop(key, None)
        else:
            p[key] = value
    return p


@pytest.mark.parametrize(("payload", "code", "words"), [
    (mutate("text", waId=...), "missing_customer", "waId"),
    (mutate("text", waId="", bsuid=None), "missing_customer", "bsuid"),
    (mutate("session_message_sent_v2", waId=None, bsuid=None), "missing_customer", "waId"),
    (mutate("text", whatsappMessageId=None, id=...), "missing_event_id", "whatsappMessageId"),
    (mutate("session_message_sent_v2", whatsappMessageId=..., id=..., localMessageId=...),
     "missing_event_id", "localMessageId"),
    (mutate("text", text=["hello"]), "bad_field", "'text' must be a string, got a list"),
    (mutate("text", text={"body": "x"}), "bad_field", "'text' must be a string, got an object"),
    (mutate("text", text="x" * (MAX_TEXT_CHARS + 1)), "text_too_long", "limit is 10000"),
    (mutate("text", senderName="n" * 2000), "field_too_long", "'senderName'"),
    (mutate("text", waId=True), "bad_field", "'waId' must be a string, got a boolean"),
    (mutate("text", waId="5037/../x"), "bad_field", "'waId' is not a WhatsApp id"),
    (mutate("message_bsuid", bsuid="US 123"), "bad_field", "'bsuid'"),
    (mutate("text", eventType=5), "bad_field", "'eventType'"),
    (mutate("text", eventType=["message"]), "bad_field", "'eventType' must be a string, got a list"),
    (mutate("text", owner="maybe"), "bad_field", "'owner' must be a boolean"),
    (mutate("text", type={"t": 1}), "bad_field", "'type'"),
    (mutate("image", data=True), "bad_field", "'data'"),
    (mutate("interactive", listReply="Track my order"), "bad_field", "'listReply' must be an object"),
    (mutate("interactive", listReply={"title": ["x"]}), "bad_field", "'listReply.title'"),
    (mutate("session_message_sent_v2", operatorName=["x"]), "bad_field", "'operatorName'"),
    (mutate("no_event_type", waId=None), "unknown_payload", "eventType"),
    ({"foo": "bar"}, "unknown_payload", "eventType"),
])
def test_rejections_name_the_problem(payload: dict[str, Any], code: str, words: str) -> None:
    outcome = rejected(payload)
    assert outcome.code == code and words in outcome.reason, outcome


def test_text_at_the_limit_is_accepted() -> None:
    assert message(mutate("text", text="x" * MAX_TEXT_CHARS))["text"] == "x" * MAX_TEXT_CHARS


def test_every_fixture_classifies_without_error() -> None:
    for path in sorted(FIXTURES.glob("*.json")):
        outcome = classify_wati(json.loads(path.read_text(encoding="utf-8")), RECEIVED)
        assert not isinstance(outcome, Rejected), (path.name, outcome)
