"""select_missed: the exact missed-message context of one batch (issue 3 point 5, issue 9 points 2, 4)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from services.common.records import HistoryItem, MissedItem, OwnReply
from services.context import missed
from services.context.history import parse_history
from services.context.missed import Selection, select_missed

from .context_builders import agent_item, customer_item, hist, own_reply, realtime, secs, t

CUTOFF = t("16:54:30")  # the bot's last reply
BATCH = t("17:40:30")  # first message of the batch
NOW = t("17:41:00")
DAY_BEFORE = NOW - secs(86400)


def select(
    history: list[HistoryItem] | None = None,
    rt: list[MissedItem] | None = None,
    *,
    cutoff: datetime | None = CUTOFF,
    lookback_start: datetime = DAY_BEFORE,
    batch_start: datetime = BATCH,
    batch_ids: set[str] | None = None,
    earlier_ids: set[str] | None = None,
    seen: set[str] | None = None,
    own: list[OwnReply] | None = None,
    now: datetime = NOW,
    max_items: int = 200,
) -> Selection:
    if seen is None:  # by default every customer message came by webhook
        seen = {i for item in history or [] if not item["owner"] for i in item["item_ids"]}
    return select_missed(
        history=history, realtime=rt or [], cutoff=cutoff, lookback_start=lookback_start,
        batch_start=batch_start, batch_event_ids=batch_ids or set(),
        earlier_batch_event_ids=earlier_ids or set(), seen_event_ids=seen, own_replies=own or [], now=now,
        max_items=max_items,
    )


def texts(selection: Selection) -> list[str]:
    return [i["text"] for i in selection.items]


def reasons(selection: Selection) -> dict[str, str]:
    return {e["item_ids"][0]: e["reason"] for e in selection.excluded}


# -- window --------------------------------------------------------------------------------------

def test_items_strictly_inside_the_window_are_kept() -> None:
    history = [
        customer_item("c0", CUTOFF - secs(1), "antes"),
        agent_item("a0", CUTOFF, "exactly at the cutoff"),
        agent_item("a1", CUTOFF + secs(0.001), "just after the cutoff"),
        customer_item("c1", BATCH - secs(0.001), "just before the batch"),
        customer_item("c2", BATCH, "exactly at the batch start"),
        customer_item("c3", BATCH + secs(5), "inside the burst"),
    ]
    selection = select(history)
    assert texts(selection) == ["just after the cutoff", "just before the batch"]
    assert reasons(selection) == {"c0": "before_cutoff", "a0": "before_cutoff",
                                  "c2": "not_before_batch", "c3": "not_before_batch"}


def test_without_a_prior_reply_the_lookback_start_is_the_lower_bound() -> None:
    start = t("12:00:00")
    history = [agent_item("a0", start, "at lookback start"), agent_item("a1", start + secs(1), "after")]
    selection = select(history, cutoff=None, lookback_start=start)
    assert texts(selection) == ["after"]
    assert reasons(selection) == {"a0": "before_cutoff"}


def test_unsorted_history_comes_out_ascending_by_parsed_time() -> None:
    history = [
        agent_item("a3", t("17:30:00"), "third"),
        customer_item("c1", t("17:00:00"), "first"),
        agent_item("a4", t("17:35:00"), "fourth"),
        agent_item("a2", t("17:10:00"), "second"),
    ]
    assert texts(select(history)) == ["first", "second", "third", "fourth"]


def test_ties_keep_input_order() -> None:
    same = t("17:00:00")
    history = [agent_item("a1", same, "uno"), agent_item("a2", same, "dos"), agent_item("a3", same, "tres")]
    assert texts(select(history)) == ["uno", "dos", "tres"]


def test_mixed_timestamp_formats_from_raw_pages_sort_correctly() -> None:
    raws: list[Any] = [
        {"id": "x1", "eventType": "message", "owner": True, "operatorName": "Ana", "text": "iso 7 digits",
         "created": "2025-10-07T17:20:00.1234567Z"},
        {"id": "x2", "eventType": "message", "owner": True, "operatorName": "Ana", "text": "unix string",
         "timestamp": str(int(t("17:10:00").timestamp()))},
        {"id": "x3", "eventType": "message", "owner": True, "operatorName": "Ana", "text": "no zone",
         "created": "2025-10-07T17:15:00.5"},
        {"id": "x4", "eventType": "message", "owner": True, "operatorName": "Ana", "text": "no time"},
    ]
    selection = select(parse_history(raws))
    assert texts(selection) == ["unix string", "no zone", "iso 7 digits"]
    assert reasons(selection) == {"x4": "no_time"}


def test_item_without_time_is_excluded_never_guessed() -> None:
    selection = select([agent_item("a1", None, "¿sigue ahí?")])  # type: ignore[arg-type]
    assert selection.items == []
    assert reasons(selection) == {"a1": "no_time"}


def test_empty_text_is_excluded() -> None:
    selection = select([agent_item("a1", t("17:00:00"), "   ")])
    assert reasons(selection) == {"a1": "empty"}


# -- roles --------------------------------------------------------------------------------------------

def test_customer_and_human_agent_roles_and_names() -> None:
    history = [customer_item("c1", t("17:40:10"), "I need info"),
               agent_item("a1", t("17:40:00"), "How can I help?", operator="  Hien   Trinh ")]
    items = select(history).items
    assert [(i["role"], i["agent_name"], i["source"]) for i in items] == [
        ("agent", "Hien Trinh", "history"), ("customer", None, "history")]


def test_agent_with_unknown_operator_is_kept_without_a_name() -> None:
    items = select([agent_item("a1", t("17:00:00"), "Le escribo por su reserva", operator=None)]).items
    assert [(i["role"], i["agent_name"]) for i in items] == [("agent", None)]


def test_broadcast_is_kept_as_a_template_agent_item() -> None:
    item = hist("bc1", t("17:00:00"), "Promo de octubre", event_type="broadcastMessage", owner=True,
                operator="API Token 123", message_type="template")
    items = select([item]).items
    assert [(i["role"], i["agent_name"], i["text"]) for i in items] == [
        ("agent", "template", "Promo de octubre")]


def test_ticket_is_kept_as_an_event() -> None:
    item = hist("tk1", t("17:39:00"), "Chat is now assigned to agent@x.com", event_type="ticket",
                message_type="ticket")
    items = select([item]).items
    assert [(i["role"], i["agent_name"]) for i in items] == [("event", None)]


def test_unknown_event_type_is_excluded_as_unsupported() -> None:
    selection = select([hist("n1", t("17:00:00"), "internal note", event_type="note", owner=True)])
    assert selection.items == []
    assert reasons(selection) == {"n1": "unsupported"}


# -- our own messages ------------------------------------------------------------------------------

def test_own_message_by_recorded_id() -> None:
    ours = agent_item("m-ours", t("17:00:00"), "Texto cualquiera", operator="Hien Trinh", wamid="wamid.OURS")
    selection = select([ours], own=[own_reply("otra cosa", t("17:00:00"), ids=["wamid.OURS"])])
    assert selection.items == []
    assert reasons(selection) == {"m-ours": "own_id"}


def test_own_message_by_local_message_id() -> None:
    ours = agent_item("m-ours", t("17:00:00"), "Texto cualquiera", local="loc-777")
    selection = select([ours], own=[own_reply("otra cosa", t("16:00:00"), ids=["loc-777"])])
    assert reasons(selection) == {"m-ours": "own_id"}


@pytest.mark.parametrize("operator", ["API Token 4f2a", "api token", "API  TOKEN (integration)", "Bot",
                                      "Bot ", " bot", "BOT"])
def test_own_or_wati_bot_operator_is_excluded(operator: str) -> None:
    selection = select([agent_item("a1", t("17:00:00"), "Hola, soy el asistente", operator=operator)])
    assert selection.items == []
    assert reasons(selection) == {"a1": "own_operator"}


@pytest.mark.parametrize("operator", ["Roberto", "Botero Ana", "Abbot", "Tokenizer API"])
def test_human_names_resembling_bot_are_kept(operator: str) -> None:
    assert texts(select([agent_item("a1", t("17:00:00"), "Hola", operator=operator)])) == ["Hola"]


LONG_REPLY = "Hola, mi nombre es Valeria Mendoza, soy el asistente virtual del hotel. ¿En qué le ayudo?"


def test_own_message_by_exact_text() -> None:
    item = agent_item("a1", t("17:00:00"), LONG_REPLY, operator="Hien Trinh")
    selection = select([item], own=[own_reply(LONG_REPLY, t("16:00:00"))])
    assert reasons(selection) == {"a1": "own_text"}


def test_own_message_by_normalised_text() -> None:
    shouted = "  HOLA mi nombre es Valeria Mendoza soy el asistente virtual del hotel   en qué le ayudo "
    selection = select([agent_item("a1", t("17:00:00"), shouted)], own=[own_reply(LONG_REPLY, t("16:00:00"))])
    assert reasons(selection) == {"a1": "own_text"}


def test_one_part_of_a_split_reply_is_ours() -> None:
    whole = LONG_REPLY + " Tenemos suites con vista al mar y desayuno incluido para dos personas."
    part = "Tenemos suites con vista al mar y desayuno incluido para dos personas."
    selection = select([agent_item("a1", t("17:00:00"), part)], own=[own_reply(whole, t("16:00:00"))])
    assert reasons(selection) == {"a1": "own_text"}


def test_near_identical_text_is_ours() -> None:
    edited = LONG_REPLY.replace("Valeria", "Valerie")
    selection = select([agent_item("a1", t("17:00:00"), edited)], own=[own_reply(LONG_REPLY, t("16:00:00"))])
    assert reasons(selection) == {"a1": "own_text"}


def test_short_human_ok_is_not_dropped_because_our_reply_contains_ok() -> None:
    ours = own_reply("Ok, le confirmo la reserva para el viernes. ¿Algo más?", t("17:00:00"))
    selection = select([agent_item("a1", t("17:00:30"), "ok")], own=[ours])
    assert texts(selection) == ["ok"]


def test_short_text_equal_to_our_reply_counts_only_close_in_time() -> None:
    ours = own_reply("Ok.", t("17:00:00"))
    echo = agent_item("a1", t("17:00:02"), "ok")
    later = agent_item("a2", t("17:30:00"), "OK")
    selection = select([echo, later], own=[ours])
    assert texts(selection) == ["OK"]
    assert reasons(selection) == {"a1": "own_text"}


def test_human_text_that_merely_contains_our_short_reply_is_kept() -> None:
    human = agent_item("a1", t("17:00:30"), "Gracias por esperar, ya reviso su pago con el banco")
    selection = select([human], own=[own_reply("Gracias", t("17:00:00"))])
    assert len(selection.items) == 1


def test_customer_repeating_our_text_is_never_own_text() -> None:
    ours = [own_reply(LONG_REPLY, t("16:00:00"))]
    selection = select([customer_item("c1", t("17:00:00"), LONG_REPLY)], own=ours)
    assert [i["role"] for i in selection.items] == ["customer"]


# -- batch and earlier batches -------------------------------------------------------------------

def test_items_of_the_current_batch_are_excluded_even_with_a_rounded_time() -> None:
    # history's `timestamp` is whole seconds: the batch's own message can look older than the batch
    copy = customer_item("wamid.B1", BATCH - secs(0.4), "mensaje del lote")
    selection = select([copy], batch_ids={"wamid.B1"})
    assert selection.items == []
    assert reasons(selection) == {"wamid.B1": "in_batch"}


def test_customer_items_of_an_earlier_unanswered_batch_are_excluded() -> None:
    selection = select([customer_item("c1", t("17:20:00"), "¿hola?")], earlier_ids={"c1"})
    assert reasons(selection) == {"c1": "in_earlier_batch"}


def test_messages_of_an_older_conversation_are_before_the_cutoff() -> None:
    old = [agent_item(f"old{i}", t("10:00:00", day=(2025, 10, 1)) + secs(60 * i), f"viejo {i}")
           for i in range(30)]
    fresh = [agent_item("new1", t("17:05:00"), "nuevo")]
    selection = select(old + fresh)
    assert texts(selection) == ["nuevo"]
    assert {e["reason"] for e in selection.excluded} == {"before_cutoff"}


def test_several_pages_of_history_hundreds_of_items() -> None:
    history: list[HistoryItem] = []
    for i in range(300):  # three pages of 100, newest first, spanning 10 days
        at = BATCH - secs(3000 * i + 30)
        item = agent_item(f"a{i}", at, f"agente {i}") if i % 2 else customer_item(f"c{i}", at, f"cliente {i}")
        history.append(item)
    selection = select(history)
    expected = [h["at"] for h in history if h["at"] is not None and CUTOFF < h["at"] < BATCH]
    assert len(selection.items) == len(expected) > 0
    assert [i["at"] for i in selection.items] == sorted(expected)
    assert len(selection.excluded) == 300 - len(expected)


def test_cap_drops_the_oldest_and_reports_it() -> None:
    history = [agent_item(f"a{i}", t("17:00:00") + secs(i), f"msg {i}") for i in range(10)]
    selection = select(list(reversed(history)), max_items=4)
    assert texts(selection) == ["msg 6", "msg 7", "msg 8", "msg 9"]
    assert selection.dropped_oldest == 6
    assert sorted(e["item_ids"][0] for e in selection.excluded if e["reason"] == "dropped_oldest") == [
        f"a{i}" for i in range(6)]


def test_zero_max_items_means_no_cap() -> None:
    history = [agent_item(f"a{i}", t("17:00:00") + secs(i), f"msg {i}") for i in range(10)]
    selection = select(history, max_items=0)
    assert len(selection.items) == 10 and selection.dropped_oldest == 0


# -- merging the two sources -------------------------------------------------------------------------

def test_same_agent_message_from_both_sources_by_id_appears_once() -> None:
    hist_copy = agent_item("69aa", t("17:24:30.412"), "Necesita algo?", operator="Hien", wamid="wamid.A1")
    rt_copy = realtime("evt-1", t("17:24:30"), "Necesita algo?", name="Hien Trinh", ids=["wamid.A1"])
    selection = select([hist_copy], [rt_copy])
    assert len(selection.items) == 1
    item = selection.items[0]
    assert item["source"] == "both"
    assert item["at"] == t("17:24:30.412")  # history's millisecond time
    assert item["agent_name"] == "Hien Trinh"  # the webhook names the sender
    assert set(item["item_ids"]) == {"69aa", "wamid.A1"}


def test_same_agent_message_merged_by_local_message_id() -> None:
    hist_copy = agent_item("69bb", t("17:24:39"), "Envieme el menu", local="loc-9")
    rt_copy = realtime("evt-2", t("17:24:39"), "Envieme el menu", ids=["evt-2", "loc-9"])
    selection = select([hist_copy], [rt_copy])
    assert [i["source"] for i in selection.items] == ["both"]


def test_same_agent_message_merged_by_text_within_tolerance() -> None:
    hist_copy = agent_item("69cc", t("17:24:39.900"), "Envíeme el menú, por favor")
    rt_copy = realtime("evt-3", t("17:24:39") + secs(100), "envieme el menu por favor!!")
    selection = select([hist_copy], [rt_copy])
    assert len(selection.items) == 2  # accents differ: not the same normalised text
    rt_same = realtime("evt-4", t("17:24:39") + secs(100), "ENVÍEME el menú por favor")
    selection = select([hist_copy], [rt_same])
    assert [i["source"] for i in selection.items] == ["both"]


def test_text_match_outside_tolerance_is_two_messages() -> None:
    hist_copy = agent_item("69dd", t("17:00:00"), "Buenas tardes")
    later = t("17:00:00") + secs(missed.TEXT_MERGE_TOLERANCE_SECONDS + 1)
    rt_copy = realtime("evt-5", later, "Buenas tardes")
    assert [i["source"] for i in select([hist_copy], [rt_copy]).items] == ["history", "realtime"]


def test_text_match_never_merges_a_customer_with_an_agent() -> None:
    hist_copy = customer_item("c1", t("17:00:00"), "ok")
    rt_copy = realtime("evt-6", t("17:00:10"), "ok")
    assert sorted(i["role"] for i in select([hist_copy], [rt_copy]).items) == ["agent", "customer"]


def test_same_id_twice_in_history_is_a_duplicate() -> None:
    item = agent_item("a1", t("17:00:00"), "Hola")
    selection = select([item, dict(item)])  # type: ignore[list-item]
    assert texts(selection) == ["Hola"]
    assert [e["reason"] for e in selection.excluded] == ["duplicate"]


def test_customer_writing_ok_twice_keeps_both() -> None:
    history = [customer_item("c1", t("17:00:00"), "ok"), customer_item("c2", t("17:00:05"), "ok")]
    assert texts(select(history)) == ["ok", "ok"]


def test_realtime_item_later_known_as_ours_by_id_is_excluded() -> None:
    echo = realtime("evt-7", t("17:00:01"), "texto", name="Hien", ids=["wamid.SENT"])
    selection = select([], [echo], own=[own_reply("texto distinto", t("17:00:00"), ids=["wamid.SENT"])])
    assert reasons(selection) == {"wamid.SENT": "own_id"}


def test_history_copy_with_api_operator_excludes_the_realtime_copy_too() -> None:
    hist_copy = agent_item("69ee", t("17:00:00"), "Su pedido va en camino", operator="API Token x",
                           wamid="wamid.E")
    rt_copy = realtime("evt-8", t("17:00:00"), "Su pedido va en camino", name="Hien", ids=["wamid.E"])
    selection = select([hist_copy], [rt_copy])
    assert selection.items == []
    assert [e["reason"] for e in selection.excluded] == ["own_operator"]


def test_realtime_items_obey_the_window() -> None:
    """A real-time item's whole-second time stands for its second: one in the cutoff's second may
    follow the cutoff (issue 14 point 2), one in the second before cannot."""
    rt = [realtime("r0", CUTOFF - secs(1), "second before cutoff"), realtime("r1", t("17:00:00"), "inside"),
          realtime("r2", BATCH, "at batch start")]
    selection = select(None, rt)
    assert texts(selection) == ["inside"]
    assert selection.sources == ["realtime"]


def test_sources_name_history_when_it_was_consulted() -> None:
    assert select([], []).sources == ["realtime", "history"]
    assert select(None, []).sources == ["realtime"]


# -- recovery ------------------------------------------------------------------------------------------

def test_customer_message_never_delivered_within_24h_is_recovered_not_missed() -> None:
    lost = customer_item("lost1", t("17:30:00"), "¿Tienen habitación para hoy?")
    selection = select([lost], seen=set())
    assert selection.items == []
    assert [r["item_ids"] for r in selection.recovered] == [["lost1"]]
    assert selection.webhooks_missing == 1
    assert selection.missing_ids == ["lost1"]


def test_undelivered_customer_message_a_human_answered_stays_context_not_recovered() -> None:
    """The chat was assigned to an agent (WATI sent the bot nothing): the agent handled it."""
    history = [
        agent_item("a1", t("17:29:00"), "Hola, soy Ana. ¿Para qué fechas?"),
        customer_item("lost1", t("17:30:00"), "Del 12 al 14"),
        agent_item("a2", t("17:31:00"), "Tenemos una doble disponible."),
        customer_item("lost2", t("17:35:00"), "¿Y el precio?"),  # nobody answered this one
    ]
    selection = select(history, seen=set())
    assert texts(selection) == ["Hola, soy Ana. ¿Para qué fechas?", "Del 12 al 14",
                                "Tenemos una doble disponible."]
    assert [r["item_ids"] for r in selection.recovered] == [["lost2"]]
    assert selection.webhooks_missing == 2


def test_customer_message_never_delivered_older_than_24h_stays_a_missed_item() -> None:
    now = t("17:41:00", day=(2025, 10, 8))
    lost = customer_item("lost2", t("17:30:00"), "¿Tienen habitación?")  # a day and 11 minutes ago
    selection = select([lost], seen=set(), now=now, batch_start=now - secs(30))
    assert selection.recovered == []
    assert texts(selection) == ["¿Tienen habitación?"]
    assert selection.webhooks_missing == 1


def test_delivered_customer_messages_are_not_missing() -> None:
    selection = select([customer_item("c1", t("17:30:00"), "hola")], seen={"c1"})
    assert selection.webhooks_missing == 0 and selection.recovered == []


def test_customer_message_without_ids_cannot_be_recovered() -> None:
    item = customer_item("x", t("17:30:00"), "hola")
    item["item_ids"] = []
    selection = select([item], seen=set())
    assert selection.webhooks_missing == 0
    assert texts(selection) == ["hola"]


def test_agent_messages_are_never_recovered() -> None:
    selection = select([agent_item("a1", t("17:30:00"), "hola")], seen=set())
    assert selection.recovered == [] and selection.webhooks_missing == 0


def test_undelivered_message_after_the_batch_start_is_left_for_its_webhook() -> None:
    selection = select([customer_item("c9", BATCH + secs(3), "otra")], seen=set())
    assert selection.recovered == [] and selection.webhooks_missing == 0


# -- helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("  Hola,   ¿CÓMO  está?  ", "hola cómo está"),
    ("ok!!!", "ok"),
    ("\uff21\uff22\uff23", "abc"),  # full-width letters
    ("", ""),
    (None, ""),
])
def test_normalise_text(raw: str | None, expected: str) -> None:
    assert missed.normalise_text(raw) == expected
