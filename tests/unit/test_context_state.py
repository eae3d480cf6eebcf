"""The context state machine: dedupe, quiet-window batching, prior values, gap check, history,
hold and pause, routing, recovery and reconciliation — driven with an injected clock."""

from __future__ import annotations

import copy
from datetime import datetime

import pytest
from prometheus_client import Counter, Histogram

from services.common import codec, metrics
from services.common.records import SenderKind
from services.context import state as sm

from .context_builders import (
    KEY,
    Customer,
    activity,
    agent_item,
    command,
    customer_item,
    inbound,
    limits,
    reply,
    roundtrip,
    secs,
    t,
)

T0 = t("10:00:00")


def talk(c: Customer, *events: tuple[str, datetime]) -> None:
    """Customer messages (event id, provider time), each processed when sent."""
    for event_id, at in events:
        c.message(inbound(event_id, at, f"texto {event_id}"))


def flushed_request(c: Customer, now: datetime) -> None:
    """Flush at `now`; deliver an empty history if a fetch was ordered."""
    effects = c.flush(now)
    if effects.fetch is not None:
        c.history(now + secs(1), [])


# -- new state and dedupe ------------------------------------------------------------------------

def test_new_state_has_every_schema_field_and_roundtrips() -> None:
    state = sm.new_state(KEY)
    assert roundtrip(state) == state
    fields = {f["name"] for f in codec.registry().schema("CustomerState").parsed["fields"]}
    assert set(state) == fields


def test_same_message_twice_changes_nothing_the_second_time() -> None:
    c = Customer()
    c.message(inbound("wamid.1", T0))
    before = copy.deepcopy(c.state)
    result_state, effects = sm.on_inbound(c.state, inbound("wamid.1", T0), T0 + secs(3), c.limits)
    assert effects.duplicate is True
    assert result_state == before
    assert effects.responder_requests == [] and effects.decisions == [] and effects.metrics == []


def test_duplicate_by_another_provider_id() -> None:
    c = Customer()
    c.message(inbound("wamid.1", T0, ids=["wamid.1", "6928abc"]))
    assert c.message(inbound("6928abc", T0, ids=["6928abc"])).duplicate


def test_handlers_never_mutate_the_state_passed_in() -> None:
    c = Customer()
    c.message(inbound("m1", T0))
    before = copy.deepcopy(c.state)
    sm.on_inbound(c.state, inbound("m2", T0 + secs(1)), T0 + secs(1), c.limits)
    sm.on_agent_activity(c.state, activity("a1", T0, "hola"), T0, c.limits)
    sm.on_command(c.state, command("flush", T0 + secs(60), f"{KEY}:1"), T0 + secs(60), c.limits)
    assert c.state == before


def test_recent_event_ids_are_a_bounded_fifo() -> None:
    c = Customer()
    c.state["recent_event_ids"] = [f"old{i}" for i in range(sm.RECENT_EVENT_IDS - 2)]
    for i in range(5):
        c.message(inbound(f"m{i}", T0 + secs(i)))
    ids = c.state["recent_event_ids"]
    assert len(ids) == sm.RECENT_EVENT_IDS
    assert ids[0] == "old3" and ids[-1] == "m4"
    assert c.message(inbound("old2", T0)).duplicate is False  # forgotten: oldest first


# -- batching -------------------------------------------------------------------------------------------

def test_quiet_window_with_an_injected_clock() -> None:
    c = Customer()
    talk(c, ("m1", T0), ("m2", T0 + secs(20)))
    assert c.due(T0 + secs(49)) is None  # 30 s after the LAST message
    assert c.due(T0 + secs(50)) == f"{KEY}:1"


def test_max_wait_caps_a_never_ending_burst() -> None:
    c = Customer()
    for i in range(6):  # every 20 s: the quiet window never passes
        c.message(inbound(f"m{i}", T0 + secs(20 * i)))
        assert c.due(T0 + secs(20 * i + 1)) is None
    assert c.due(T0 + secs(119)) is None
    assert c.due(T0 + secs(120)) == f"{KEY}:1"


def test_one_request_per_burst_in_arrival_order() -> None:
    c = Customer()
    # the second webhook arrives first: arrival order, not provider order, is the batch order
    c.message(inbound("m2", T0 + secs(2), "segundo"), now=T0 + secs(3))
    c.message(inbound("m1", T0 + secs(1), "primero"), now=T0 + secs(4))
    c.message(inbound("m3", T0 + secs(5), "tercero"), now=T0 + secs(6))
    flushed_request(c, T0 + secs(40))
    assert len(c.requests) == 1
    assert [m["event_id"] for m in c.requests[0]["messages"]] == ["m2", "m1", "m3"]
    assert c.state["last_inbound_at"] == T0 + secs(5)


def test_flush_that_is_not_due_is_ignored() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    batch_id = c.state["open_batch"]["batch_id"]  # type: ignore[index]
    effects = c.command(command("flush", T0 + secs(10), batch_id))
    assert effects.responder_requests == [] and effects.fetch is None
    assert c.state["open_batch"] is not None


def test_flush_of_an_unknown_batch_is_ignored() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    effects = c.command(command("flush", T0 + secs(60), "wati:other:9"))
    assert effects.responder_requests == [] and c.state["open_batch"] is not None


def test_replayed_flush_emits_nothing_twice() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(60)  # short gap: answered at flush, no fetch
    talk(c, ("m1", T0))
    flush = command("flush", T0 + secs(30), f"{KEY}:1")
    first = c.command(flush)
    second = c.command(flush)
    assert len(first.responder_requests) == 1
    assert second.duplicate and second.responder_requests == [] and second.decisions == []


def test_replayed_history_result_emits_nothing_twice() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))  # first contact: fetch
    result = command("history_fetched", T0 + secs(31), f"{KEY}:1", history=[])
    assert len(c.command(result).responder_requests) == 1
    again = c.command(result)
    assert again.duplicate and again.responder_requests == []


def test_stale_history_result_is_ignored() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    effects = c.command(command("history_fetched", T0 + secs(5), f"{KEY}:7", history=[]))
    assert effects.responder_requests == [] and not effects.duplicate
    assert c.state["open_batch"] is not None


def test_message_during_flushing_starts_a_new_batch_that_waits_its_turn() -> None:
    c = Customer(lim=limits(history_timeout=60))
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))  # fetch running
    talk(c, ("m2", T0 + secs(32)))
    assert c.state["flushing_batch"]["batch_id"] == f"{KEY}:1"  # type: ignore[index]
    assert c.state["open_batch"]["batch_id"] == f"{KEY}:2"  # type: ignore[index]
    assert c.due(T0 + secs(63)) is None  # batch 2 is due but waits for batch 1
    early = c.command(command("flush", T0 + secs(63), f"{KEY}:2"))
    assert early.responder_requests == []
    c.history(T0 + secs(64), [])
    assert c.due(T0 + secs(64)) == f"{KEY}:2"
    c.flush(T0 + secs(64))
    assert [[m["event_id"] for m in r["messages"]] for r in c.requests] == [["m1"], ["m2"]]


def test_message_while_the_previous_batch_is_answered_is_a_new_batch() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    talk(c, ("m2", T0 + secs(35)))  # the responder is still working on batch 1
    c.answer(T0 + secs(40))
    flushed_request(c, T0 + secs(65))
    assert [r["batch_id"] for r in c.requests] == [f"{KEY}:1", f"{KEY}:2"]
    assert [m["event_id"] for m in c.requests[1]["messages"]] == ["m2"]


def test_batch_id_is_deterministic_from_the_state() -> None:
    state = sm.new_state(KEY)
    one, _ = sm.on_inbound(state, inbound("m1", T0), T0, limits())
    two, _ = sm.on_inbound(state, inbound("m1", T0), T0, limits())
    assert one["open_batch"]["batch_id"] == two["open_batch"]["batch_id"] == f"{KEY}:1"  # type: ignore[index]


# -- prior values and the two clocks ----------------------------------------------------------------

def test_priors_are_captured_when_the_batch_opens_and_a_reply_during_the_burst_does_not_move_them() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))  # last_reply_at = +40
    talk(c, ("m2", T0 + secs(600)))  # batch 2 opens: priors (+0, +40)
    talk(c, ("m3", T0 + secs(605)))
    # a retried reply for batch 1 from another responder instance — and a fresh reply time
    c.replied(reply(f"{KEY}:1", T0 + secs(606)))  # duplicate: ignored
    c.state["unanswered"].append({"batch_id": f"{KEY}:x", "routed_to": "responder",
                                  "emitted_at": T0, "event_ids": []})
    c.replied(reply(f"{KEY}:x", T0 + secs(607)))  # moves last_reply_at during the burst
    assert c.state["last_reply_at"] == T0 + secs(607)
    flushed_request(c, T0 + secs(640))
    request = c.requests[-1]
    assert request["prior_last_inbound_at"] == T0
    assert request["prior_last_reply_at"] == T0 + secs(40)
    assert request["gap_seconds"] == 600
    assert request["missed_check_ran"] is True


def test_reply_and_agent_events_never_move_last_inbound_at() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))
    c.agent(activity("a1", T0 + secs(100), "Hola, soy Ana"))
    assert c.state["last_inbound_at"] == T0
    assert c.state["last_reply_at"] == T0 + secs(40)
    assert c.state["last_human_at"] == T0 + secs(100)


def test_customer_messages_never_move_last_reply_at() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))
    talk(c, ("m2", T0 + secs(50)))
    assert c.state["last_reply_at"] == T0 + secs(40)


def test_an_older_late_message_does_not_move_last_inbound_at_back() -> None:
    c = Customer()
    talk(c, ("m2", T0 + secs(10)), ("m1", T0))
    assert c.state["last_inbound_at"] == T0 + secs(10)


# -- the gap decision ----------------------------------------------------------------------------------

def test_short_gap_answers_at_flush_without_a_fetch() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(299)
    talk(c, ("m1", T0))
    effects = c.flush(T0 + secs(30))
    assert effects.fetch is None and len(effects.responder_requests) == 1
    decision = effects.decisions[0]
    assert decision["missed_check_ran"] is False and decision["gap_seconds"] == 299
    assert ("gap_checks_total", {"outcome": "short_gap"}, 1) in effects.metrics


def test_gap_equal_to_the_threshold_does_not_run_the_check() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(300)
    talk(c, ("m1", T0))
    assert c.flush(T0 + secs(30)).fetch is None


def test_long_gap_orders_a_fetch_that_stops_at_the_cutoff() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(301)
    c.state["last_reply_at"] = T0 - secs(290)
    talk(c, ("m1", T0))
    effects = c.flush(T0 + secs(30))
    assert effects.fetch == sm.HistoryFetchOrder(KEY, "50376973593", f"{KEY}:1", T0 - secs(290))
    assert effects.responder_requests == []
    assert c.state["flushing_batch"]["fetch_attempts"] == 1  # type: ignore[index]


def test_first_contact_looks_back() -> None:
    c = Customer(lim=limits(lookback=3600))
    talk(c, ("m1", T0))
    effects = c.flush(T0 + secs(30))
    assert effects.fetch is not None
    assert effects.fetch.stop_before == T0 + secs(30) - secs(3600)
    assert ("gap_checks_total", {"outcome": "first_contact"}, 1) in effects.metrics


def test_manychat_never_fetches_history() -> None:
    c = Customer(key="manychat:998877")
    c.message(inbound("mc1", T0, key="manychat:998877", channel="instagram"))
    effects = c.flush(T0 + secs(30))
    assert effects.fetch is None and len(effects.responder_requests) == 1
    assert effects.responder_requests[0]["channel"] == "instagram"
    assert ("gap_checks_total", {"outcome": "not_wati"}, 1) in effects.metrics


def test_per_customer_gap_threshold_override() -> None:
    vip = Customer(lim=limits(customers={KEY: {"missed_gap_seconds": 60}}))
    vip.state["last_inbound_at"] = T0 - secs(90)
    talk(vip, ("m1", T0))
    assert vip.flush(T0 + secs(30)).fetch is not None
    assert vip.state["flushing_batch"] is not None


def test_history_error_answers_without_history_and_records_it() -> None:
    c = Customer(lim=limits(hold=0))
    talk(c, ("m1", T0))
    c.state["agent_messages"].append({"at": T0 - secs(5), "role": "agent", "agent_name": "Ana",
                                      "text": "ya le ayudo", "message_type": "text",
                                      "source": "realtime", "item_ids": ["a1"]})
    c.flush(T0 + secs(30))
    effects = c.history(T0 + secs(35), error="http_500")
    request = effects.responder_requests[0]
    assert [i["text"] for i in request["missed_messages"]] == ["ya le ayudo"]
    decision = effects.decisions[0]
    assert decision["history_error"] == "http_500" and decision["sources"] == ["realtime"]
    assert decision["missed_check_ran"] is True


def test_partial_history_with_an_error_is_still_used() -> None:
    c = Customer(lim=limits(hold=0))
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))
    effects = c.history(T0 + secs(35), [agent_item("h1", T0 - secs(60), "página 1")], error="http_429")
    assert [i["text"] for i in effects.responder_requests[0]["missed_messages"]] == ["página 1"]
    assert effects.decisions[0]["sources"] == ["realtime", "history"]


def test_fetch_timeout_retries_once_then_answers_without_history() -> None:
    c = Customer(lim=limits(history_timeout=20))
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))
    assert c.due(T0 + secs(49)) is None
    assert c.due(T0 + secs(50)) == f"{KEY}:1"
    retry = c.flush(T0 + secs(50))
    assert retry.fetch is not None and retry.responder_requests == []
    assert c.state["flushing_batch"]["fetch_attempts"] == 2  # type: ignore[index]
    final = c.flush(T0 + secs(70))
    assert len(final.responder_requests) == 1
    assert final.decisions[0]["history_error"] == "timeout"
    # the first fetch finally answers: nothing happens twice
    late = c.command(command("history_fetched", T0 + secs(71), f"{KEY}:1", history=[]))
    assert late.duplicate and late.responder_requests == []


def test_late_result_after_a_retry_finalizes_once() -> None:
    c = Customer(lim=limits(history_timeout=20))
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))
    c.flush(T0 + secs(50))  # retry ordered
    first = c.command(command("history_fetched", T0 + secs(51), f"{KEY}:1", history=[]))
    second = c.command(command("history_fetched", T0 + secs(52), f"{KEY}:1", history=[]))
    assert len(first.responder_requests) == 1 and second.responder_requests == []


def test_flush_while_the_fetch_runs_is_ignored() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))
    effects = c.command(command("flush", T0 + secs(31), f"{KEY}:1"))
    assert effects.fetch is None and effects.responder_requests == []


# -- hold and pause --------------------------------------------------------------------------------

def test_human_within_hold_holds_the_batch_and_the_next_after_expiry_carries_everything() -> None:
    c = Customer(lim=limits(hold=900))
    talk(c, ("m0", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))
    c.agent(activity("a1", T0 + secs(100), "Hola, soy Ana del hotel. ¿Le ayudo con la factura?"))
    talk(c, ("m1", T0 + secs(160)))
    held = c.flush(T0 + secs(190))
    assert held.responder_requests == [] and held.vision_requests == [] and held.fetch is None
    decision = held.decisions[0]
    assert decision["held"] is True and decision["hold_reason"] == "human_active"
    assert decision["routed_to"] == "held"
    assert ("batches_held_total", {"reason": "human_active"}, 1) in held.metrics
    assert [m["event_id"] for m in c.state["held_messages"]] == ["m1"]
    assert c.state["open_batch"] is None and c.state["flushed_batch_ids"][-1] == f"{KEY}:2"

    talk(c, ("m2", T0 + secs(1100)))  # the hold (900 s after the agent) has expired
    effects = c.flush(T0 + secs(1130))
    assert effects.fetch is not None  # gap 940 s
    request = c.history(T0 + secs(1131), [
        customer_item("m1", T0 + secs(160), "texto m1"),
        agent_item("h-a1", T0 + secs(100.3), "Hola, soy Ana del hotel. ¿Le ayudo con la factura?",
                   wamid="a1"),
    ]).responder_requests[0]
    assert [m["event_id"] for m in request["messages"]] == ["m1", "m2"]
    assert [(i["role"], i["source"]) for i in request["missed_messages"]] == [("agent", "both")]
    assert c.state["held_messages"] == []


def test_hold_zero_turns_it_off() -> None:
    c = Customer(lim=limits(hold=0))
    c.agent(activity("a1", T0, "Hola"))
    talk(c, ("m1", T0 + secs(10)))
    flushed_request(c, T0 + secs(40))
    assert len(c.requests) == 1


def test_history_found_human_message_also_holds() -> None:
    c = Customer(lim=limits(hold=900))
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))
    effects = c.history(T0 + secs(31), [agent_item("h1", T0 - secs(120), "Le atiendo yo, un momento")])
    assert effects.decisions[0]["hold_reason"] == "human_active"
    assert c.state["last_human_at"] == T0 - secs(120)


def test_templates_are_context_but_not_human_activity() -> None:
    c = Customer(lim=limits(hold=900))
    c.agent(activity("tpl1", T0, "Recordatorio de su reserva", kind="template", operator=None))
    assert c.state["last_human_at"] is None
    assert c.state["agent_messages"][0]["agent_name"] == "template"
    talk(c, ("m1", T0 + secs(10)))
    flushed_request(c, T0 + secs(40))
    assert [i["agent_name"] for i in c.requests[0]["missed_messages"]] == ["template"]


def test_pause_holds_every_batch_and_resume_lets_the_next_one_through() -> None:
    c = Customer()
    c.command(command("pause", T0, actor="ops@hotel.com"))
    assert c.state["paused"] is True and c.state["paused_by"] == "ops@hotel.com"
    talk(c, ("m1", T0 + secs(1)))
    flushed_request(c, T0 + secs(31))
    assert c.requests == [] and c.decisions[-1]["hold_reason"] == "paused"
    c.state = roundtrip(c.state)  # a restart: the pause is state
    assert c.state["paused"] is True
    c.command(command("resume", T0 + secs(100), actor="ops@hotel.com"))
    assert c.state["paused"] is False and c.state["paused_by"] is None
    talk(c, ("m2", T0 + secs(110)))
    flushed_request(c, T0 + secs(140))
    assert [m["event_id"] for m in c.requests[0]["messages"]] == ["m1", "m2"]


# -- agent activity ---------------------------------------------------------------------------------

def test_human_agent_message_is_recorded() -> None:
    c = Customer()
    effects = c.agent(activity("a1", T0, "  Necesita algo?  ", operator=" Hien  Trinh ", local="loc-1"))
    item = c.state["agent_messages"][0]
    assert (item["text"], item["agent_name"], item["source"]) == ("Necesita algo?", "Hien Trinh", "realtime")
    assert set(item["item_ids"]) == {"a1", "loc-1"}
    assert effects.log[0][0] == "agent_message_recorded"


def test_duplicate_agent_activity_is_ignored() -> None:
    c = Customer()
    c.agent(activity("a1", T0, "hola"))
    assert c.agent(activity("a1", T0, "hola")).duplicate
    assert len(c.state["agent_messages"]) == 1


@pytest.mark.parametrize("kind, operator, email, reason", [
    ("own_send", None, None, "own_operator"),
    ("wati_bot", "Bot ", None, "wati_bot"),
    ("unknown", "Bot", None, "wati_bot"),
    ("human_agent", "API Token 1234", None, "own_operator"),
    ("unknown", None, None, "unknown_sender"),
])
def test_not_human_activity_is_ignored(
    kind: SenderKind, operator: str | None, email: str | None, reason: str
) -> None:
    c = Customer()
    effects = c.agent(activity("a1", T0, "texto", kind=kind, operator=operator, email=email))
    assert c.state["agent_messages"] == [] and c.state["last_human_at"] is None
    assert effects.log == [
        ("agent_activity_ignored", {"event_id": "a1", "sender_kind": kind, "reason": reason})]


def test_unknown_sender_with_an_operator_email_is_a_human() -> None:
    c = Customer()
    c.agent(activity("a1", T0, "Le escribo yo", kind="unknown", operator=None, email="ana@hotel.com"))
    assert c.state["last_human_at"] == T0 and len(c.state["agent_messages"]) == 1


def test_our_own_send_echoed_after_the_reply_is_ignored_by_id() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40), ids=["wamid.OUT1"])
    effects = c.agent(activity("echo", T0 + secs(41), "Con gusto", kind="unknown", operator="Hien",
                               ids=["echo", "wamid.OUT1"]))
    assert effects.log[0][1]["reason"] == "own_id"
    assert c.state["last_human_at"] is None


def test_our_own_send_echoed_before_the_reply_is_forgotten_when_the_reply_arrives() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    # WATI's echo (assigned operator's name) overtakes the responder's reply event
    c.agent(activity("echo", T0 + secs(39), "Con gusto le ayudo con su reserva.", operator="Hien",
                     ids=["echo", "wamid.OUT1"]))
    assert c.state["last_human_at"] == T0 + secs(39)
    c.answer(T0 + secs(40), ids=["wamid.OUT1"])
    assert c.state["agent_messages"] == [] and c.state["last_human_at"] is None


# -- replies --------------------------------------------------------------------------------------------

def test_duplicate_reply_is_ignored() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))
    assert c.replied(reply(f"{KEY}:1", T0 + secs(99))).duplicate
    assert c.state["last_reply_at"] == T0 + secs(40)


def test_nothing_sent_clears_unanswered_but_keeps_last_reply_at() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    assert [u["batch_id"] for u in c.state["unanswered"]] == [f"{KEY}:1"]
    c.replied(reply(f"{KEY}:1", T0 + secs(40), outcome="nothing_sent"))
    assert c.state["unanswered"] == [] and c.state["last_reply_at"] is None
    assert c.state["own_replies"] == []


def test_own_replies_are_bounded() -> None:
    c = Customer()
    for i in range(sm.OWN_REPLIES + 3):
        c.replied(reply(f"{KEY}:{i}", T0 + secs(i), f"respuesta {i}"))
    assert len(c.state["own_replies"]) == sm.OWN_REPLIES
    assert c.state["own_replies"][-1]["text"] == f"respuesta {sm.OWN_REPLIES + 2}"


def test_reply_prunes_agent_messages_it_covers() -> None:
    c = Customer(lim=limits(hold=0))
    c.agent(activity("a1", T0, "antes"))
    talk(c, ("m1", T0 + secs(5)))
    flushed_request(c, T0 + secs(35))
    c.agent(activity("a2", T0 + secs(50), "después"))
    c.answer(T0 + secs(40))
    # kept while a batch may still open with the decided batch's cutoff (none: the lookback) — a
    # replay may handle the next message after this reply where the first run handled it before
    assert [m["text"] for m in c.state["agent_messages"]] == ["antes", "después"]
    talk(c, ("m2", T0 + secs(100)))
    flushed_request(c, T0 + secs(130))  # decided with the reply at T0+40 handled: the floor
    c.answer(T0 + secs(140))
    assert [m["text"] for m in c.state["agent_messages"]] == ["después"]


def test_customer_messages_of_answered_batches_are_not_missed_context_later() -> None:
    c = Customer(lim=limits(hold=0, gap=10))
    talk(c, ("m1", T0))
    flushed_request(c, T0 + secs(30))
    talk(c, ("m2", T0 + secs(35)))  # opens batch 2 (no prior reply) before batch 1 is answered
    c.answer(T0 + secs(36), ids=["wamid.R1"])
    assert c.flush(T0 + secs(65)).fetch is not None  # gap 35 s > 10 s
    effects = c.history(T0 + secs(66), [
        customer_item("m1", T0, "texto m1"),
        agent_item("r1", T0 + secs(36), "Con gusto le ayudo con su reserva.", wamid="wamid.R1"),
        customer_item("m2", T0 + secs(35), "texto m2"),
    ])
    assert effects.responder_requests[0]["missed_messages"] == []
    assert {e["item_ids"][0]: e["reason"] for e in effects.decisions[0]["excluded"]} == {
        "m1": "in_earlier_batch", "r1": "not_before_batch", "m2": "in_batch"}


# -- routing -----------------------------------------------------------------------------------------

def test_image_with_media_goes_to_vision() -> None:
    c = Customer()
    c.message(inbound("img1", T0, None, message_type="image", media_ref="data/images/pago.jpg"))
    flushed_request(c, T0 + secs(30))
    assert c.decisions[-1]["routed_to"] == "vision"


def test_image_routing_effects() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(10)
    c.message(inbound("img1", T0, None, message_type="image", media_ref="data/images/pago.jpg"))
    effects = c.flush(T0 + secs(30))
    assert len(effects.vision_requests) == 1 and effects.responder_requests == []
    assert ("batches_flushed_total", {"route": "vision"}, 1) in effects.metrics


def test_image_without_media_reference_goes_to_the_responder() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(10)
    c.message(inbound("img1", T0, "[image]", message_type="image", media_ref=None))
    effects = c.flush(T0 + secs(30))
    assert len(effects.responder_requests) == 1


def test_text_batch_follows_an_unanswered_vision_batch_then_returns_to_the_responder() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(10)
    c.message(inbound("img1", T0, None, message_type="sticker", media_ref="data/x.webp"))
    assert len(c.flush(T0 + secs(30)).vision_requests) == 1
    talk(c, ("m2", T0 + secs(31)))
    assert len(c.flush(T0 + secs(61)).vision_requests) == 1  # keeps the customer's order
    c.replied(reply(f"{KEY}:1", T0 + secs(70)))
    c.replied(reply(f"{KEY}:2", T0 + secs(71)))
    talk(c, ("m3", T0 + secs(80)))
    assert len(c.flush(T0 + secs(110)).responder_requests) == 1


def test_unanswered_batches_expire() -> None:
    c = Customer()
    c.state["last_inbound_at"] = T0 - secs(10)
    c.message(inbound("img1", T0, None, message_type="image", media_ref="data/x.jpg"))
    c.flush(T0 + secs(30))  # vision, never answered (dead-lettered downstream)
    later = T0 + secs(sm.UNANSWERED_TTL_SECONDS + 100)
    c.state["last_inbound_at"] = later - secs(10)
    talk(c, ("m2", later))
    effects = c.flush(later + secs(30))
    assert len(effects.responder_requests) == 1
    assert [u["batch_id"] for u in c.state["unanswered"]] == [f"{KEY}:2"]


# -- recovery and reconciliation -----------------------------------------------------------------

def test_message_only_in_history_is_recovered_into_the_batch_and_its_late_webhook_changes_nothing() -> None:
    c = Customer(lim=limits(hold=0))
    talk(c, ("m0", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))
    talk(c, ("m2", T0 + secs(1000)))
    c.flush(T0 + secs(1030))
    effects = c.history(T0 + secs(1031), [
        customer_item("wamid.LOST", T0 + secs(900), "¿Me confirman la reserva?"),
        customer_item("m2", T0 + secs(1000), "texto m2"),
    ])
    request = effects.responder_requests[0]
    assert [(m["event_id"], m.get("recovered")) for m in request["messages"]] == [
        ("wamid.LOST", True), ("m2", False)]
    assert request["missed_messages"] == []
    decision = effects.decisions[0]
    assert decision["recovered_event_ids"] == ["wamid.LOST"] and decision["webhooks_missing"] == 1
    assert ("messages_recovered_total", {}, 1) in effects.metrics
    assert ("webhooks_missing_total", {}, 1) in effects.metrics
    assert c.state["last_inbound_at"] == T0 + secs(1000)
    late = c.message(inbound("wamid.LOST", T0 + secs(900)), now=T0 + secs(1040))
    # nothing opened or emitted; the webhook is only counted (a flush's inbound count, 6b)
    assert late.log == [("duplicate_ignored", {"kind": "inbound", "event_id": "wamid.LOST"})]
    assert c.state["open_batch"] is None and not late.responder_requests
    assert c.message(inbound("wamid.LOST", T0 + secs(900)), now=T0 + secs(1041)).duplicate  # again


def test_reconciliation_sweep_recovers_once_and_answers_within_one_sweep() -> None:
    c = Customer(lim=limits(hold=0))
    talk(c, ("m0", T0))
    flushed_request(c, T0 + secs(30))
    c.answer(T0 + secs(40))
    sweep = command("history_fetched", T0 + secs(400), None, history=[
        customer_item("m0", T0, "texto m0"),
        agent_item("our", T0 + secs(40.5), "Con gusto le ayudo con su reserva.", operator="API Token"),
        customer_item("wamid.ONLY", T0 + secs(300), "¿Hola? ¿Siguen ahí?"),
    ])
    effects = c.command(sweep)
    assert ("messages_recovered_total", {}, 1) in effects.metrics
    assert [(m["event_id"], m["recovered"], m["received_at"]) for m in effects.recovered_inbound] == [
        ("wamid.ONLY", True, T0 + secs(400))], "to the inbound topic, stamped with the sweep's time"
    for message in effects.recovered_inbound:  # the inbound topic: handled like its webhook
        c.message(message, message["received_at"])
    batch = c.state["open_batch"]
    assert batch is not None and [m["event_id"] for m in batch["messages"]] == ["wamid.ONLY"]
    assert batch["prior_last_reply_at"] == T0 + secs(40)
    again = c.command(command("history_fetched", T0 + secs(401), None, history=sweep["history"]))
    assert again.metrics == [] and not again.recovered_inbound
    assert len(c.state["open_batch"]["messages"]) == 1  # type: ignore[index]
    flushed_request(c, T0 + secs(431))
    assert [(m["event_id"], m.get("recovered")) for m in c.requests[-1]["messages"]] == [("wamid.ONLY", True)]
    assert c.decisions[-1]["recovered_event_ids"] == ["wamid.ONLY"]
    late = c.message(inbound("wamid.ONLY", T0 + secs(300)), now=T0 + secs(440))
    assert late.log == [("duplicate_ignored", {"kind": "inbound", "event_id": "wamid.ONLY"})]
    assert c.state["open_batch"] is None and not late.responder_requests


def test_sweep_ignores_messages_before_the_last_reply_or_older_than_a_day() -> None:
    c = Customer()
    c.state["last_reply_at"] = T0
    c.state["channel"], c.state["provider_id"] = "wati", "50376973593"
    effects = c.command(command("history_fetched", T0 + secs(100), None, history=[
        customer_item("old", T0 - secs(5), "antes de la respuesta"),
    ]))
    assert c.state["open_batch"] is None and effects.metrics == []
    far = Customer()
    now = T0 + secs(2 * 86400)
    yesterday = customer_item("x", now - secs(86401), "ayer")
    far.command(command("history_fetched", now, None, history=[yesterday]))
    assert far.state["open_batch"] is None


def test_a_swept_message_joins_the_open_batch_and_is_asked_in_time_order() -> None:
    c = Customer()
    talk(c, ("m5", T0 + secs(50)))
    lost = customer_item("lost", T0 + secs(20), "x")
    swept = c.command(command("history_fetched", T0 + secs(60), None, history=[lost]))
    for message in swept.recovered_inbound:
        c.message(message, message["received_at"])
    assert [m["event_id"] for m in c.state["open_batch"]["messages"]] == ["m5", "lost"]  # type: ignore[index]
    c.flush(T0 + secs(95))
    c.history(T0 + secs(96))
    assert [m["event_id"] for m in c.requests[-1]["messages"]] == ["lost", "m5"]


def test_reconcile_command_orders_a_fetch_for_wati_customers_only() -> None:
    c = Customer()
    talk(c, ("m1", T0))
    effects = c.command(command("reconcile", T0 + secs(5)))
    assert effects.fetch is not None and effects.fetch.batch_id == sm.RECONCILE_FETCH_ID
    mc = Customer(key="manychat:1")
    mc.message(inbound("mc1", T0, key="manychat:1", channel="facebook"))
    assert mc.command(command("reconcile", T0 + secs(5))).fetch is None


# -- observability ------------------------------------------------------------------------------------

def test_every_metric_emitted_exists_with_its_labels() -> None:
    c = Customer(lim=limits(hold=900, history_timeout=5))
    emitted: list[tuple[str, dict[str, str], float]] = []
    talk(c, ("m0", T0))
    emitted += c.flush(T0 + secs(30)).metrics
    emitted += c.flush(T0 + secs(36)).metrics  # timeout → retry
    emitted += c.history(T0 + secs(37), [customer_item("lost", T0 - secs(10), "perdido")]).metrics
    c.answer(T0 + secs(40))
    c.agent(activity("a1", T0 + secs(50), "hola"))
    talk(c, ("m1", T0 + secs(60)))
    emitted += c.flush(T0 + secs(90)).metrics  # held
    emitted += c.command(command("history_fetched", T0 + secs(95), None,
                                 history=[customer_item("lost2", T0 + secs(61), "x")])).metrics
    names = {name for name, _, _ in emitted}
    assert {"batches_flushed_total", "gap_checks_total", "missed_per_batch", "history_fetch_failures_total",
            "batches_held_total", "webhooks_missing_total", "messages_recovered_total"} <= names
    for name, labels, value in emitted:
        metric = getattr(metrics, name)
        assert isinstance(metric, Counter | Histogram), name
        # the shell adds `tenant` from the customer key (context.app.apply_metric); the domain never does
        assert set(labels) | ({"tenant"} & set(metric._labelnames)) == set(metric._labelnames), name
        assert "tenant" not in labels, name
        assert value >= 0


def test_one_decision_per_batch_with_every_field() -> None:
    c = Customer(lim=limits(hold=0))
    c.state["last_inbound_at"] = T0 - secs(600)
    c.state["last_reply_at"] = T0 - secs(590)
    talk(c, ("m1", T0))
    c.flush(T0 + secs(30))
    effects = c.history(T0 + secs(31), [
        agent_item("a1", T0 - secs(100), "Le atiende Ana"),
        agent_item("own", T0 - secs(589), "x", operator="API Token 1"),
        customer_item("old", T0 - secs(700), "viejo"),
    ])
    assert len(effects.decisions) == 1
    decision = effects.decisions[0]
    assert decision["cutoff"] == T0 - secs(590) and decision["gap_threshold_seconds"] == 300
    assert decision["gap_seconds"] == 600 and decision["message_count"] == 1
    assert [i["text"] for i in decision["injected"]] == ["Le atiende Ana"]
    assert sorted((e["item_ids"][0], e["reason"]) for e in decision["excluded"]) == [
        ("old", "before_cutoff"), ("own", "own_operator")]
    names = [name for name, _ in effects.log]
    assert names == ["batch_decided"]
