"""getMessages items -> HistoryItem: every timestamp format of docs/wati.md, every eventType,
lenient owners and texts, and garbage that must give None without raising."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.context.history import parse_history, parse_history_item


def message(**overrides: Any) -> dict[str, Any]:
    """A getMessages `message` item as WATI sends it (docs/wati.md)."""
    item: dict[str, Any] = {
        "id": "69282478274a880fe782b2d9",
        "whatsappMessageId": "wamid.HBgNODYxAA==",
        "created": "2025-11-27T10:14:16.6268572Z",
        "timestamp": "1764238456",
        "text": "hello",
        "type": "text",
        "data": None,
        "owner": False,
        "eventType": "message",
        "statusString": "READ",
        "operatorName": None,
        "assignedId": "682b27727d7094c8b13ed038",
        "localMessageId": None,
        "conversationId": "68c8d56157578adb12ada249",
        "ticketId": "69280a6d6244a6d9b9b486e9",
    }
    item.update(overrides)
    return item


# -- timestamps -----------------------------------------------------------------------------------

def test_seven_digit_fraction_with_z_is_parsed_to_the_microsecond() -> None:
    item = parse_history_item(message())
    assert item is not None
    assert item["at"] == datetime(2025, 11, 27, 10, 14, 16, 626857, tzinfo=UTC)


def test_created_without_z_is_utc() -> None:
    item = parse_history_item(message(created="2022-11-24T14:23:36.141"))
    assert item is not None
    assert item["at"] == datetime(2022, 11, 24, 14, 23, 36, 141000, tzinfo=UTC)
    assert item["at"].tzinfo is not None


@pytest.mark.parametrize("created, expected_micro", [
    ("2022-11-24T14:23:36Z", 0),
    ("2022-11-24T14:23:36.1Z", 100000),
    ("2022-11-24T14:23:36.14Z", 140000),
    ("2022-11-24T14:23:36.141Z", 141000),
    ("2022-11-24T14:23:36.141592Z", 141592),
])
def test_variable_fraction_lengths(created: str, expected_micro: int) -> None:
    item = parse_history_item(message(created=created))
    assert item is not None
    assert item["at"] == datetime(2022, 11, 24, 14, 23, 36, expected_micro, tzinfo=UTC)


def test_offset_is_converted_to_utc() -> None:
    item = parse_history_item(message(created="2025-10-07T11:54:17-06:00"))
    assert item is not None
    assert item["at"] == datetime(2025, 10, 7, 17, 54, 17, tzinfo=UTC)


def test_unix_seconds_string_when_created_is_missing() -> None:
    item = parse_history_item(message(created=None, timestamp="1764238453"))
    assert item is not None
    assert item["at"] == datetime.fromtimestamp(1764238453, tz=UTC)


def test_unix_seconds_when_created_is_unparseable() -> None:
    item = parse_history_item(message(created="not a date", timestamp="1764238453"))
    assert item is not None
    assert item["at"] == datetime.fromtimestamp(1764238453, tz=UTC)


def test_created_wins_over_timestamp() -> None:
    item = parse_history_item(message(created="2025-11-27T10:14:16Z", timestamp="1"))
    assert item is not None
    assert item["at"] == datetime(2025, 11, 27, 10, 14, 16, tzinfo=UTC)


def test_ticket_whose_only_date_is_a_pipe_date_in_its_text() -> None:
    raw = {"eventType": "ticket", "id": "t1",
           "eventDescription": "Chat closed by agent@x.com on 24|11|2022"}
    item = parse_history_item(raw)
    assert item is not None
    assert item["at"] == datetime(2022, 11, 24, tzinfo=UTC)


def test_no_time_at_all_gives_none_never_a_guess() -> None:
    item = parse_history_item(message(created=None, timestamp=None))
    assert item is not None
    assert item["at"] is None
    item = parse_history_item(message(created="garbage", timestamp="soon"))
    assert item is not None and item["at"] is None


# -- event types and texts --------------------------------------------------------------------------

def test_customer_message_fields() -> None:
    item = parse_history_item(message(localMessageId="loc-1"))
    assert item == {
        "item_ids": ["69282478274a880fe782b2d9", "wamid.HBgNODYxAA=="],
        "at": datetime(2025, 11, 27, 10, 14, 16, 626857, tzinfo=UTC),
        "event_type": "message",
        "owner": False,
        "operator_name": None,
        "text": "hello",
        "message_type": "text",
        "local_message_id": "loc-1",
        "conversation_id": "68c8d56157578adb12ada249",
    }


def test_agent_message_keeps_operator_name_as_sent() -> None:
    item = parse_history_item(message(owner=True, operatorName="Bot "))
    assert item is not None
    assert item["owner"] is True
    assert item["operator_name"] == "Bot "


def test_broadcast_text_comes_from_final_text_and_is_the_business_side() -> None:
    raw = {"eventType": "broadcastMessage", "id": "bc1", "created": "2025-10-07T17:00:00Z",
           "finalText": "Promo de octubre: 20% en suites", "templateName": "promo_oct"}
    item = parse_history_item(raw)
    assert item is not None
    assert item["event_type"] == "broadcastMessage"
    assert item["text"] == "Promo de octubre: 20% en suites"
    assert item["owner"] is True
    assert item["message_type"] == "template"


def test_ticket_text_comes_from_event_description() -> None:
    raw = {"eventType": "ticket", "id": "tk1", "created": "2025-10-07T17:39:00.5Z",
           "eventDescription": "Chat is now assigned to agent@x.com. Automation will not work"}
    item = parse_history_item(raw)
    assert item is not None
    assert item["event_type"] == "ticket"
    assert item["text"].startswith("Chat is now assigned to agent@x.com")
    assert item["message_type"] == "ticket"
    assert item["owner"] is False


@pytest.mark.parametrize("event_type", ["MESSAGE", "Message", "broadcastmessage", "TICKET"])
def test_event_type_spelling_is_lenient(event_type: str) -> None:
    item = parse_history_item(message(eventType=event_type, finalText="x", eventDescription="y"))
    assert item is not None
    assert item["event_type"] in ("message", "broadcastMessage", "ticket")


def test_missing_event_type_is_a_message() -> None:
    raw = message()
    del raw["eventType"]
    item = parse_history_item(raw)
    assert item is not None and item["event_type"] == "message"


def test_image_with_caption_uses_the_caption() -> None:
    item = parse_history_item(message(type="image", text="mi comprobante", data="data/images/x.jpg"))
    assert item is not None
    assert item["text"] == "mi comprobante"
    assert item["message_type"] == "image"


@pytest.mark.parametrize("kind", ["image", "audio", "voice", "document", "sticker", "video"])
def test_media_without_caption_gets_a_placeholder(kind: str) -> None:
    item = parse_history_item(message(type=kind, text=None, data="data/x"))
    assert item is not None
    assert item["text"] == f"[{kind}]"


def test_interactive_answers_use_their_titles() -> None:
    listed = parse_history_item(message(type="interactive", text="", listReply={"title": "Suite"}))
    button = parse_history_item(message(type="button", text=None, buttonReply={"text": "Sí"}))
    assert listed is not None and listed["text"] == "Suite"
    assert button is not None and button["text"] == "Sí"


@pytest.mark.parametrize("raw_owner, expected", [
    (True, True), (False, False), ("true", True), ("false", False), ("True", True),
    ("FALSE", False), (1, True), (0, False),
])
def test_owner_is_lenient(raw_owner: object, expected: bool) -> None:
    item = parse_history_item(message(owner=raw_owner))
    assert item is not None and item["owner"] is expected


def test_missing_owner_with_an_operator_name_is_the_business() -> None:
    raw = message(operatorName="Hien Trinh")
    del raw["owner"]
    item = parse_history_item(raw)
    assert item is not None and item["owner"] is True
    raw = message()
    del raw["owner"]
    item = parse_history_item(raw)
    assert item is not None and item["owner"] is False


def test_ids_skip_missing_and_empty_values() -> None:
    only_wamid = parse_history_item(message(id=None))
    only_id = parse_history_item(message(whatsappMessageId=""))
    numeric = parse_history_item(message(id=12345, whatsappMessageId=None))
    assert only_wamid is not None and only_wamid["item_ids"] == ["wamid.HBgNODYxAA=="]
    assert only_id is not None and only_id["item_ids"] == ["69282478274a880fe782b2d9"]
    assert numeric is not None and numeric["item_ids"] == ["12345"]


def test_text_type_with_empty_text_is_kept_for_the_audit() -> None:
    item = parse_history_item(message(text="   "))
    assert item is not None and item["text"] == ""


# -- garbage ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [None, "text", 42, [1, 2], {"x": 1}, {}, {"eventType": "message"},
                                 {"eventType": "ticket", "id": "t"}, {"text": None, "type": None}])
def test_garbage_gives_none(raw: object) -> None:
    assert parse_history_item(raw) is None


def test_unknown_event_type_is_kept_with_its_name_when_it_has_text() -> None:
    item = parse_history_item({"eventType": "note", "id": "n1", "text": "internal note",
                               "created": "2025-10-07T17:00:00Z"})
    assert item is not None and item["event_type"] == "note"
    assert parse_history_item({"eventType": "sentMessageDELIVERED_v2", "id": "s1"}) is None


def test_wrong_types_inside_an_item_do_not_raise() -> None:
    item = parse_history_item(message(text={"a": 1}, created=["x"], timestamp={"y": 2}, owner=None))
    assert item is not None
    assert item["at"] is None
    assert item["text"] == ""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                        max_size=4),
    max_leaves=12,
)
item_keys = st.sampled_from(["id", "whatsappMessageId", "created", "timestamp", "text", "type", "owner",
                             "eventType", "operatorName", "finalText", "eventDescription", "listReply",
                             "localMessageId", "conversationId"])


@settings(max_examples=60, deadline=None)
@given(st.one_of(json_values, st.dictionaries(item_keys, json_values, max_size=10)))
def test_parse_never_raises(raw: object) -> None:
    item = parse_history_item(raw)
    if item is not None:
        assert isinstance(item["text"], str)
        assert item["at"] is None or item["at"].tzinfo is not None


def test_parse_history_drops_garbage_and_keeps_page_order() -> None:
    raws = [message(id="b", whatsappMessageId=None), None, "junk",
            message(id="a", whatsappMessageId=None, created="2020-01-01T00:00:00Z")]
    items = parse_history(raws)
    assert [i["item_ids"] for i in items] == [["b"], ["a"]]
