"""Exact context (issue 14): nobody left waiting after a hold, coarse timestamps, one own-message
rule, no blind spot by default — each a timeline driven through the pure state machine."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from services.common import codec
from services.common.config import ConfigError, Settings
from services.context import missed
from services.context import state as sm
from services.context.app import build_limits, create_app, next_due
from services.ingest import wati

from .context_builders import (
    KEY,
    Customer,
    activity,
    agent_item,
    command,
    customer_item,
    inbound,
    limits,
    own_reply,
    reply,
    secs,
    t,
)

T0 = t("10:00:00")


def talk(c: Customer, *events: tuple[str, datetime]) -> None:
    for event_id, at in events:
        c.message(inbound(event_id, at, f"texto {event_id}"))


def flushed(c: Customer, now: datetime) -> sm.Effects:
    """The timer's flush at `now`, and an empty history if a fetch was ordered (its effects)."""
    effects = c.flush(now)
    if effects.fetch is not None:
        return c.history(now + secs(1), [])
    return effects


def answered_once(c: Customer, at: datetime, text: str = "Con gusto le ayudo con su reserva.",
                  ids: tuple[str, ...] = ()) -> None:
    """m0 at T0, flushed and answered at `at` with `text` sent as `ids` (history empty)."""
    talk(c, ("m0", T0))
    flushed(c, T0 + secs(30))
    c.answer(at, text, ids)


def held_after_agent(c: Customer) -> None:
    """Bot answered m0; agent Ana wrote at +100; the customer's m1 (+160) is held at +190."""
    answered_once(c, T0 + secs(40))
    c.agent(activity("a1", T0 + secs(100), "Hola, soy Ana del hotel. ¿Le ayudo con la factura?"))
    talk(c, ("m1", T0 + secs(160)))
    held = c.flush(T0 + secs(190))
    assert held.decisions[0]["hold_reason"] == "human_active"


# -- 1. nobody left waiting after a hold -----------------------------------------------------------

def test_hold_end_is_due_and_the_bot_answers_held_messages_nobody_answered() -> None:
    c = Customer(lim=limits(hold=900))
    held_after_agent(c)
    # The agent's time is a whole second (WATI's webhook): it may stand for any moment of that
    # second, so the hold runs until the END of that second + 900 s, never a fraction less.
    assert c.due(T0 + secs(1000.999)) is None
    assert next_due(c.state, c.limits) == T0 + secs(1001)  # the timer's index knows when it ends
    batch_id = c.due(T0 + secs(1001))
    assert batch_id == f"{KEY}:3"
    effects = c.flush(T0 + secs(1001))
    if effects.fetch is not None:
        c.history(T0 + secs(1001), [customer_item("m1", T0 + secs(160), "texto m1")])
    assert len(c.requests) == 2
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m1"]
    assert [(i["role"], i["at"]) for i in request["missed_messages"]] == [("agent", T0 + secs(100))]
    assert c.state["held_messages"] == []
    assert c.due(T0 + secs(2000)) is None


def test_hold_end_after_a_human_answered_gives_them_as_context_in_time_order() -> None:
    c = Customer(lim=limits(hold=900))
    held_after_agent(c)
    c.agent(activity("a2", T0 + secs(200), "Su factura ya va en camino por correo."))
    assert c.due(T0 + secs(1101)) is not None  # the end of a2's whole second + 900 s
    effects = c.flush(T0 + secs(1101))
    assert effects.responder_requests == [] and effects.fetch is None  # the human handled m1
    assert c.state["held_messages"] == []
    assert c.due(T0 + secs(3000)) is None

    talk(c, ("m2", T0 + secs(1500)))
    effects = c.flush(T0 + secs(1530))
    if effects.fetch is not None:
        c.history(T0 + secs(1531), [])
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m2"]  # m1 is not answered again
    assert [(i["role"], i["at"]) for i in request["missed_messages"]] == [
        ("agent", T0 + secs(100)), ("customer", T0 + secs(160)), ("agent", T0 + secs(200))]


def test_next_batch_after_expired_hold_puts_human_handled_held_messages_in_the_agent_block() -> None:
    """The customer writes again after the hold ended, before the timer's flush came."""
    c = Customer(lim=limits(hold=900))
    held_after_agent(c)
    c.agent(activity("a2", T0 + secs(200), "Su factura ya va en camino por correo."))
    talk(c, ("m2", T0 + secs(1150)))
    effects = c.flush(T0 + secs(1180))
    if effects.fetch is not None:
        c.history(T0 + secs(1181), [])
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m2"]
    assert [(i["role"], i["at"]) for i in request["missed_messages"]] == [
        ("agent", T0 + secs(100)), ("customer", T0 + secs(160)), ("agent", T0 + secs(200))]


def test_resume_ends_a_pause_and_the_bot_answers_what_no_human_answered() -> None:
    c = Customer()
    c.command(command("pause", T0, actor="ops@hotel.com"))
    talk(c, ("m1", T0 + secs(1)))
    flushed(c, T0 + secs(31))
    assert c.requests == [] and c.due(T0 + secs(5000)) is None  # paused: no end in sight
    assert next_due(c.state, c.limits) is None
    c.command(command("resume", T0 + secs(100), actor="ops@hotel.com"))
    assert next_due(c.state, c.limits) is not None
    effects = c.flush(T0 + secs(100))
    if effects.fetch is not None:
        c.history(T0 + secs(101), [])
    assert [m["event_id"] for m in c.requests[-1]["messages"]] == ["m1"]


def test_held_messages_older_than_the_whatsapp_session_are_context_not_questions() -> None:
    c = Customer()
    answered_once(c, T0 + secs(40))
    c.command(command("pause", T0 + secs(50), actor="ops@hotel.com"))
    talk(c, ("m1", T0 + secs(60)))
    flushed(c, T0 + secs(90))
    resumed = T0 + secs(25 * 3600)
    c.command(command("resume", resumed, actor="ops@hotel.com"))
    effects = c.flush(resumed)
    assert effects.responder_requests == []
    talk(c, ("m2", resumed + secs(10)))
    effects = c.flush(resumed + secs(40))
    if effects.fetch is not None:
        c.history(resumed + secs(41), [])
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m2"]
    assert [(i["role"], i["text"]) for i in request["missed_messages"]] == [("customer", "texto m1")]


def test_held_messages_beyond_the_cap_are_dead_lettered_counted_and_audited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm, "HELD_MESSAGES", 2)
    c = Customer()
    c.command(command("pause", T0, actor="ops@hotel.com"))
    talk(c, ("m1", T0 + secs(1)), ("m2", T0 + secs(2)), ("m3", T0 + secs(3)))
    effects = flushed(c, T0 + secs(33))
    assert [m["event_id"] for m in c.state["held_messages"]] == ["m2", "m3"]
    assert [(d["reason"], d["customer_key"]) for d in effects.dead_letters] == [("held_overflow", KEY)]
    assert ("dead_letters_total", {"service": "context", "reason": "held_overflow"}, 1) in effects.metrics
    assert [(e["item_ids"], e["reason"]) for e in effects.decisions[0]["excluded"]] == [
        (["m1"], "held_overflow")]


def test_history_found_agent_message_after_held_ones_counts_as_answering_them() -> None:
    """On an account without real-time agent events the agent's answer is known from history."""
    c = Customer(lim=limits(hold=900, gap=60))
    answered_once(c, T0 + secs(40))
    talk(c, ("m1", T0 + secs(160)))
    effects = c.flush(T0 + secs(190))
    assert effects.fetch is not None
    held = c.history(T0 + secs(191), [agent_item("h-a1", T0 + secs(100), "Hola, soy Ana del hotel.")])
    assert held.decisions[0]["held"] is True
    talk(c, ("m2", T0 + secs(600)))  # still within the hold: held too
    effects = c.flush(T0 + secs(630))
    c.history(T0 + secs(631), [agent_item("h-a1", T0 + secs(100), "Hola, soy Ana del hotel."),
                               agent_item("h-a2", T0 + secs(300), "Ya le respondo su consulta m1.")])
    assert c.state["last_human_at"] == T0 + secs(300)
    effects = c.flush(T0 + secs(1201))  # hold end: the end of second 300, + 900
    if effects.fetch is not None:
        c.history(T0 + secs(1202), [agent_item("h-a2", T0 + secs(300), "Ya le respondo su consulta m1.")])
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m2"]
    assert ("customer", T0 + secs(160)) in [(i["role"], i["at"]) for i in request["missed_messages"]]


# -- 3. one own-message rule, never over a human ---------------------------------------------------

OUR_TEXT = "Con gusto le ayudo con su reserva, ¿para qué fecha sería?"


def test_history_agent_pasting_our_reply_with_their_own_id_is_a_human() -> None:
    pasted = agent_item("h-1", t("17:00:00"), OUR_TEXT, operator="Ana Agente", wamid="wamid.AGENT1")
    selection = missed.select_missed(
        history=[pasted], realtime=[], cutoff=t("16:54:30"), lookback_start=t("16:00:00"),
        batch_start=t("17:40:30"), batch_event_ids=set(), earlier_batch_event_ids=set(),
        seen_event_ids=set(), own_replies=[own_reply(OUR_TEXT, t("16:54:30"), ["wamid.OURS"])],
        now=t("17:41:00"), max_items=200)
    assert [(i["role"], i["agent_name"]) for i in selection.items] == [("agent", "Ana Agente")]


def test_realtime_agent_pasting_our_reply_is_recorded_as_human_activity() -> None:
    c = Customer()
    answered_once(c, T0 + secs(40), OUR_TEXT, ("wamid.OURS",))
    effects = c.agent(activity("wamid.AGENT1", T0 + secs(60), OUR_TEXT, operator="Ana Agente"))
    assert "agent_activity_ignored" not in [name for name, _ in effects.log]
    assert c.state["last_human_at"] == T0 + secs(60)


def test_a_reply_arriving_after_a_human_pasted_it_does_not_remove_the_human_message() -> None:
    c = Customer()
    talk(c, ("m0", T0))
    flushed(c, T0 + secs(30))
    c.agent(activity("wamid.AGENT1", T0 + secs(45), OUR_TEXT, operator="Ana Agente"))
    c.replied(reply(f"{KEY}:1", T0 + secs(40), OUR_TEXT, ids=["wamid.OURS"]))
    assert [i["item_ids"] for i in c.state["agent_messages"]] == [["wamid.AGENT1"]]
    assert c.state["last_human_at"] == T0 + secs(45)


def test_sweep_does_not_recover_over_a_human_who_pasted_our_reply() -> None:
    c = Customer(lim=limits(hold=0))
    answered_once(c, T0 + secs(40), OUR_TEXT, ("wamid.OURS",))
    effects = c.command(command("history_fetched", T0 + secs(400), None, history=[
        customer_item("wamid.ONLY", T0 + secs(300), "¿Siguen ahí?"),
        agent_item("h-2", T0 + secs(320), OUR_TEXT, operator="Ana Agente", wamid="wamid.AGENT2"),
    ]))
    assert c.state["open_batch"] is None, effects.log


@pytest.mark.parametrize(("name", "kind"), [
    ("API Token 7f3a", "own_send"), ("api token", "own_send"), ("API_Token 9", "own_send"),
    ("API-TOKEN", "own_send"), ("APIToken", "own_send"), ("  API  TOKEN (integration)", "own_send"),
    ("Bot", "wati_bot"), ("Bot ", "wati_bot"), (" b o T", "wati_bot"), ("BOT", "wati_bot"),
    ("Tokenizer API", "human_agent"), ("Abbot", "human_agent"), ("Botero Ana", "human_agent"),
])
def test_ingest_state_and_missed_agree_on_who_sent_a_message(name: str, kind: str) -> None:
    assert wati.sender_kind("sessionMessageSent", "text", name, None) == kind
    selection = missed.select_missed(
        history=[agent_item("h-1", t("17:00:00"), "Un texto cualquiera del negocio", operator=name)],
        realtime=[], cutoff=t("16:54:30"), lookback_start=t("16:00:00"), batch_start=t("17:40:30"),
        batch_event_ids=set(), earlier_batch_event_ids=set(), seen_event_ids=set(), own_replies=[],
        now=t("17:41:00"), max_items=200)
    assert (selection.items == []) == (kind != "human_agent")
    c = Customer()
    c.agent(activity("a1", T0, "Un texto cualquiera del negocio", kind="human_agent", operator=name))
    assert (c.state["last_human_at"] is None) == (kind != "human_agent")


# -- 2. coarse timestamps ------------------------------------------------------------------------

def test_whole_second_agent_message_in_the_second_of_our_reply_is_kept() -> None:
    """The bot replied at 16:54:30.300; Ana wrote at 16:54:30.800, which the webhook says is 16:54:30."""
    ana = {"at": t("16:54:30"), "role": "agent", "agent_name": "Ana Agente", "text": "Le llamo en 5 min",
           "message_type": "text", "source": "realtime", "item_ids": ["wamid.ANA"]}
    selection = missed.select_missed(
        history=None, realtime=[ana], cutoff=t("16:54:30.300"),  # type: ignore[list-item]
        lookback_start=t("16:00:00"), batch_start=t("17:40:30"), batch_event_ids=set(),
        earlier_batch_event_ids=set(), seen_event_ids=set(), own_replies=[], now=t("17:41:00"),
        max_items=200)
    assert [i["text"] for i in selection.items] == ["Le llamo en 5 min"]


def test_agent_webhook_in_the_second_of_our_reply_reaches_the_next_request() -> None:
    c = Customer(lim=limits(hold=0))
    answered_once(c, T0 + secs(40.3))
    c.agent(activity("wamid.ANA", T0 + secs(40), "Le llamo en 5 minutos"), now=T0 + secs(41))
    talk(c, ("m1", T0 + secs(100)))
    flushed(c, T0 + secs(130))
    assert [i["text"] for i in c.requests[-1]["missed_messages"]] == ["Le llamo en 5 minutos"]


def test_agent_webhook_before_the_reply_event_is_not_pruned_by_it() -> None:
    """The agent's webhook (16:54:30, coarse) is handled before our reply event (sent 16:54:30.300)."""
    c = Customer(lim=limits(hold=0))
    talk(c, ("m0", T0))
    flushed(c, T0 + secs(30))
    c.agent(activity("wamid.ANA", T0 + secs(40), "Le llamo en 5 minutos"), now=T0 + secs(40.5))
    c.answer(T0 + secs(40.3))
    assert [i["item_ids"] for i in c.state["agent_messages"]] == [["wamid.ANA"]]
    talk(c, ("m1", T0 + secs(100)))
    flushed(c, T0 + secs(130))
    assert [i["text"] for i in c.requests[-1]["missed_messages"]] == ["Le llamo en 5 minutos"]


def test_what_the_model_was_given_is_known_by_ids_not_only_by_time() -> None:
    """An item given in batch 1 whose whole second reaches past our reply is not given again."""
    c = Customer(lim=limits(hold=0, quiet=0.2, max_wait=0.5, gap=0))
    c.agent(activity("wamid.ANA", T0 + secs(40), "Le llamo en 5 minutos"), now=T0 + secs(40.3))
    talk(c, ("m1", T0 + secs(40.4)))
    flushed(c, T0 + secs(40.6))
    assert [i["text"] for i in c.requests[-1]["missed_messages"]] == ["Le llamo en 5 minutos"]
    c.answer(T0 + secs(40.9))
    talk(c, ("m2", T0 + secs(50)))
    flushed(c, T0 + secs(50.6))
    assert c.requests[-1]["missed_messages"] == []
    excluded = [(e["reason"], e["item_ids"]) for e in c.decisions[-1]["excluded"]]
    assert ("in_earlier_batch", ["wamid.ANA"]) in excluded


# -- 4. no blind spot by default -----------------------------------------------------------------

def default_limits(**overrides: object) -> sm.Limits:
    return build_limits(Settings(**overrides))  # type: ignore[arg-type]


def test_by_default_a_short_gap_batch_reads_history_and_recovers_what_wati_never_delivered() -> None:
    c = Customer(lim=default_limits(human_hold_seconds=0.0))  # the agent's message would hold it
    answered_once(c, T0 + secs(40))
    talk(c, ("m1", T0 + secs(100)))  # 60 s after the reply: far below MISSED_GAP_SECONDS
    effects = c.flush(T0 + secs(130))
    assert effects.fetch is not None
    assert ("gap_checks_total", {"outcome": "every_batch"}, 1) in effects.metrics
    c.history(T0 + secs(131), [
        customer_item("wamid.LOST", T0 + secs(60), "¿Tienen estacionamiento?"),  # webhook never came
        agent_item("h-a1", T0 + secs(70), "Sí, gratuito", wamid="wamid.A1"),  # no agent webhooks
        customer_item("m1", T0 + secs(100), "texto m1"),
    ])
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m1"]
    assert [(i["role"], i["text"]) for i in request["missed_messages"]] == [
        ("customer", "¿Tienen estacionamiento?"), ("agent", "Sí, gratuito")]


def test_by_default_an_undelivered_unanswered_customer_message_is_answered() -> None:
    c = Customer(lim=default_limits(human_hold_seconds=0.0))
    answered_once(c, T0 + secs(40))
    talk(c, ("m1", T0 + secs(100)))
    c.flush(T0 + secs(130))
    c.history(T0 + secs(131), [customer_item("wamid.LOST", T0 + secs(60), "¿Tienen estacionamiento?")])
    assert [m["event_id"] for m in c.requests[-1]["messages"]] == ["wamid.LOST", "m1"]


def test_gap_mode_is_for_accounts_with_real_time_agent_events_and_needs_the_sweep() -> None:
    with pytest.raises(ConfigError, match="RECONCILE_INTERVAL_SECONDS"):
        default_limits(missed_history="gap")
    c = Customer(lim=default_limits(missed_history="gap", reconcile_interval_seconds=60.0))
    answered_once(c, T0 + secs(40))
    talk(c, ("m1", T0 + secs(100)))
    assert c.flush(T0 + secs(130)).fetch is None
    with pytest.raises(ConfigError, match="MISSED_HISTORY"):
        default_limits(missed_history="sometimes")


def test_the_shell_produces_the_held_overflow_dead_letters_with_the_effects(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sm, "HELD_MESSAGES", 1)
    c = Customer()
    c.command(command("pause", T0, actor="ops@hotel.com"))
    talk(c, ("m1", T0 + secs(1)), ("m2", T0 + secs(2)))
    effects = flushed(c, T0 + secs(32))
    settings = Settings(kafka_bootstrap_servers="k:9092", topic_prefix="ex.", web_token="t",
                        context_store="memory", data_dir=str(tmp_path))
    runtime = create_app(settings).runtime
    outputs = runtime._encode_outputs(effects)
    assert [topic for topic, _ in outputs] == [runtime.topics.audit, runtime.topics.dead_letter]
    dead = codec.decode("DeadLetter", outputs[1][1])
    assert dead["reason"] == "held_overflow" and dead["customer_key"] == KEY
    assert codec.decode("InboundMessage", dead["payload"])["event_id"] == "m1"


# -- a human message written while the bot composed its answer ------------------------------------

def test_an_agent_message_written_while_the_bot_composed_its_answer_reaches_the_next_request() -> None:
    """m0's batch starts at T0 and is answered at +35; Ana wrote at +32 (after the batch's window,
    before our reply): neither window held it, so no request ever had it."""
    c = Customer(lim=limits(hold=0))
    talk(c, ("m0", T0))
    flushed(c, T0 + secs(30))
    c.agent(activity("wamid.ANA", T0 + secs(32), "Le llamo en 5 minutos"))
    c.answer(T0 + secs(35))
    talk(c, ("m1", T0 + secs(100)))
    flushed(c, T0 + secs(130))
    assert [i["text"] for i in c.requests[-1]["missed_messages"]] == ["Le llamo en 5 minutos"]
    assert c.decisions[-1]["cutoff"] == T0 + secs(35)  # the cutoff is still the bot's last reply


def test_the_same_from_history_and_after_the_hold_it_caused() -> None:
    c = Customer(lim=limits(hold=900, every_batch=True))
    talk(c, ("m0", T0))
    flushed(c, T0 + secs(30))
    c.answer(T0 + secs(35), ids=["wamid.OURS"])
    talk(c, ("m1", T0 + secs(100)))
    c.flush(T0 + secs(130))
    held = c.history(T0 + secs(131), [
        customer_item("m0", T0, "texto m0"),
        agent_item("h-ana", T0 + secs(32), "Le llamo en 5 minutos", wamid="wamid.ANA"),
        agent_item("h-ours", T0 + secs(35.2), "Con gusto le ayudo con su reserva.", wamid="wamid.OURS"),
        customer_item("m1", T0 + secs(100), "texto m1"),
    ])
    assert held.decisions[0]["hold_reason"] == "human_active"  # Ana wrote 98 s before
    effects = c.flush(T0 + secs(933))  # the hold's end (second 32 ends at 33): m1 answered by itself
    c.history(T0 + secs(934), [
        agent_item("h-ana", T0 + secs(32), "Le llamo en 5 minutos", wamid="wamid.ANA"),
        agent_item("h-ours", T0 + secs(35.2), "Con gusto le ayudo con su reserva.", wamid="wamid.OURS"),
        customer_item("m1", T0 + secs(100), "texto m1"),
    ])
    assert effects.fetch is not None
    request = c.requests[-1]
    assert [m["event_id"] for m in request["messages"]] == ["m1"]
    assert [i["text"] for i in request["missed_messages"]] == ["Le llamo en 5 minutos"]
