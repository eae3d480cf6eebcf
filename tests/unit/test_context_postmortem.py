"""Every bug of the old system (docs/old-system.md), replayed with
its own timeline against the pure context logic. Each must be impossible here.

Bug 7 (the image classifier sent "Error: No conversation context available" to a customer) lives
in the responder/vision services, not in the context logic: its regression test belongs there.

Where a timeline would also trigger the human-hold feature (issue 9), the test says how it is
configured: some run with the hold off to replay the old system's case exactly, some with it on to show
the timeline through the whole state machine.
"""

from __future__ import annotations

from services.context.missed import select_missed

from .context_builders import (
    Customer,
    activity,
    agent_item,
    customer_item,
    hist,
    inbound,
    limits,
    own_reply,
    secs,
    t,
)

OCT3 = (2025, 10, 3)
VALERIA = "Hola mi nombre es Valeria Mendoza, yo soy el asistente virtual del hotel. ¿En qué le ayudo?"


def test_postmortem_bug1_gap_is_measured_from_the_customers_last_message_not_the_bots_reply() -> None:
    """Customer 03:29, bot 03:30, customer 13:49: the gap is 10 h 20 min (from 03:29), and the bot's
    reply — and any business-side activity after it — never touches the customer's clock."""
    c = Customer(lim=limits(hold=0))
    c.message(inbound("w1", t("03:29:00", OCT3), "¿Tienen habitaciones?"))
    c.flush(t("03:29:30", OCT3))  # first contact: history look-back
    c.history(t("03:29:31", OCT3), [])
    c.answer(t("03:30:00", OCT3), ids=["wamid.BOT1"])
    c.agent(activity("a1", t("09:00:00", OCT3), "Buenos días", kind="template", operator=None))
    assert c.state["last_inbound_at"] == t("03:29:00", OCT3)
    assert c.state["last_reply_at"] == t("03:30:00", OCT3)

    c.message(inbound("w2", t("13:49:00", OCT3), "Hola, sigo interesado"))
    effects = c.flush(t("13:49:30", OCT3))
    assert effects.fetch is not None, "a 10-hour gap must run the missed-message check"
    request = c.history(t("13:49:32", OCT3), []).responder_requests[0]
    assert request["prior_last_inbound_at"] == t("03:29:00", OCT3)
    assert request["gap_seconds"] == (t("13:49:00", OCT3) - t("03:29:00", OCT3)).total_seconds() == 37200
    assert request["missed_check_ran"] is True


def test_postmortem_bug2_gap_uses_the_prior_inbound_time_captured_before_the_update() -> None:
    """16:54:17 previous message; 17:07:17 "Que paso?" (updates last_inbound_at at once); the flush
    runs 35 s later at 17:07:52. The gap is 13 min (check runs), not 35 s."""
    c = Customer(lim=limits(hold=0))
    c.message(inbound("w1", t("16:54:17"), "Quiero una cotización"))
    c.flush(t("16:54:47"))
    c.history(t("16:54:48"), [])
    c.answer(t("16:54:55"))

    c.message(inbound("w2", t("17:07:17"), "Que paso?"))
    assert c.state["last_inbound_at"] == t("17:07:17")  # updated immediately, as in the old system
    effects = c.flush(t("17:07:52"))
    assert effects.fetch is not None
    assert ("gap_checks_total", {"outcome": "gap_exceeded"}, 1) in effects.metrics
    decision = c.history(t("17:07:53"), []).decisions[0]
    assert decision["prior_last_inbound_at"] == t("16:54:17")
    assert decision["gap_seconds"] == 780  # 13 minutes — never 35 s
    assert decision["missed_check_ran"] is True


def test_postmortem_bug3_unsorted_history_gives_every_gap_message_in_chronological_order() -> None:
    """Previous webhook 17:21:23, new one 444 s later (17:28:47). WATI returns the agent's 25 photo
    messages of the gap scrambled, with an OLD conversation at the end of the list: the old code's
    `[-20:]` injected those old messages as "[Unknown time]". Here: all 25, ascending, nothing old.
    (Hold off: this replays the old system's case; the hold has its own tests.)"""
    c = Customer(lim=limits(hold=0))
    c.message(inbound("w1", t("17:21:23"), "¿Me manda fotos del hotel?"))
    c.flush(t("17:21:53"))
    c.history(t("17:21:54"), [])
    c.answer(t("17:21:58"), ids=["wamid.BOT1"])
    c.message(inbound("w2", t("17:28:47.100"), "Gracias"))
    assert c.flush(t("17:29:18")).fetch is not None

    photos = [agent_item(f"p{i}", t("17:22:00") + secs(10 * i), f"Foto {i:02d} - Áreas Públicas",
                         operator="Hien Trinh", message_type="image") for i in range(25)]
    scrambled = photos[13:] + photos[:13][::-1]
    old_conversation = [
        agent_item("o1", t("15:00:00", OCT3), "Super Aerial View 2 - Áreas Públicas"),
        agent_item("o2", t("15:01:00", OCT3), "Envieme fotos del hotel"),
        hist("o3", None, "Gracias, en unos momentos responderemos..."),
        customer_item("o4", t("14:59:00", OCT3), "Hola"),
    ]
    request = c.history(t("17:29:20"), [
        customer_item("w2", t("17:28:47.100"), "Gracias"), *scrambled,
        agent_item("bot", t("17:21:58.400"), "Con gusto le ayudo", operator=None, wamid="wamid.BOT1"),
        customer_item("w1", t("17:21:23"), "¿Me manda fotos del hotel?"),
        *old_conversation,
    ]).responder_requests[0]
    injected = request["missed_messages"]
    assert [i["text"] for i in injected] == [f"Foto {i:02d} - Áreas Públicas" for i in range(25)]
    assert [i["at"] for i in injected] == sorted(i["at"] for i in injected)
    assert request["missed_dropped_oldest"] == 0
    excluded = {e["item_ids"][0]: e["reason"] for e in c.decisions[-1]["excluded"]}
    assert excluded == {"w2": "in_batch", "bot": "own_id", "w1": "before_cutoff", "o1": "before_cutoff",
                        "o2": "before_cutoff", "o3": "no_time", "o4": "before_cutoff"}


def test_postmortem_bug4_only_items_in_the_gap_window() -> None:
    """Last webhook 16:54:17, bot 16:54:30, agent 17:00 and 17:03, customer 17:05, new webhook
    17:21:23: exactly those three — not "the 20 most recent ever" (40 older items in history)."""
    older = [agent_item(f"old{i}", t("09:00:00", OCT3) + secs(600 * i), f"antiguo {i}") for i in range(40)]
    gap = [agent_item("g1", t("17:00:00"), "Agent message 1"),
           agent_item("g2", t("17:03:00"), "Agent message 2"),
           customer_item("g3", t("17:05:00"), "Customer reply")]
    selection = select_missed(
        history=gap[::-1] + older, realtime=[], cutoff=t("16:54:30"), lookback_start=t("06:00:00"),
        batch_start=t("17:21:23"), batch_event_ids={"w-new"}, earlier_batch_event_ids=set(),
        seen_event_ids={"g3"}, own_replies=[], now=t("17:21:53"), max_items=20,
    )
    assert [i["text"] for i in selection.items] == ["Agent message 1", "Agent message 2", "Customer reply"]
    assert selection.dropped_oldest == 0
    assert {e["reason"] for e in selection.excluded} == {"before_cutoff"}


def test_postmortem_bug4_gap_window_through_the_state_machine_with_the_hold() -> None:
    """The same timeline end to end, on an account without agent webhooks (history is the only
    source). The customer's 17:05 reply is held (an agent wrote at 17:03) and answered with the
    17:21:23 message; the missed context is exactly the two agent messages of the gap."""
    c = Customer(lim=limits(quiet=10, hold=900))
    c.message(inbound("w1", t("16:54:17"), "Hola"))
    c.flush(t("16:54:27"))
    c.history(t("16:54:28"), [])
    c.answer(t("16:54:30"), ids=["wamid.BOT1"])
    older = [agent_item(f"old{i}", t("09:00:00", OCT3) + secs(600 * i), f"antiguo {i}") for i in range(40)]
    page = [agent_item("g1", t("17:00:00"), "Agent message 1"),
            agent_item("g2", t("17:03:00"), "Agent message 2"),
            customer_item("w2", t("17:05:00"), "Customer reply"),
            agent_item("bot", t("16:54:30.700"), VALERIA, operator=None, wamid="wamid.BOT1"),
            customer_item("w1", t("16:54:17"), "Hola"), *older]

    c.message(inbound("w2", t("17:05:00"), "Customer reply"))
    assert c.flush(t("17:05:10")).fetch is not None
    held = c.history(t("17:05:11"), page)
    assert held.responder_requests == [] and held.decisions[0]["hold_reason"] == "human_active"

    c.message(inbound("w3", t("17:21:23"), "¿Hola?"))
    assert c.flush(t("17:21:33")).fetch is not None
    effects = c.history(t("17:21:35"), [customer_item("w3", t("17:21:23"), "¿Hola?"), *page])
    request = effects.responder_requests[0]
    assert [i["text"] for i in request["missed_messages"]] == ["Agent message 1", "Agent message 2"]
    assert [m["event_id"] for m in request["messages"]] == ["w2", "w3"]
    assert request["prior_last_reply_at"] == t("16:54:30")


def test_postmortem_bug5_cutoff_is_the_bots_reply_and_the_bots_reply_is_never_missed() -> None:
    """16:54:17 customer, 16:54:30 bot (WATI's `created` for it is 16:54:30.8 — AFTER our sent_at),
    17:40:00 agent, 17:40:10 customer, 17:40:30 new webhook. The old code injected the bot's own
    "Hola mi nombre es Valeria Mendoza..." as a missed message. Recognised by id, by operator and
    by text — each alone suffices."""
    bot_by_id = agent_item("bot1", t("16:54:30.800"), VALERIA, operator=None, wamid="wamid.BOT1")
    bot_by_operator = agent_item("bot2", t("16:54:30.800"), VALERIA + " ", operator="API Token 7f")
    bot_by_text = hist("bot3", t("16:54:30.800"), VALERIA, owner=True, operator="Valeria")
    for bot, reason in ((bot_by_id, "own_id"), (bot_by_operator, "own_operator"), (bot_by_text, "own_text")):
        selection = select_missed(
            history=[customer_item("w1", t("16:54:17"), "Hola"), bot,
                     agent_item("a1", t("17:40:00"), "How can I help?", operator=None),
                     customer_item("w2", t("17:40:10"), "I need info")],
            realtime=[], cutoff=t("16:54:30"), lookback_start=t("16:00:00"), batch_start=t("17:40:30"),
            batch_event_ids={"w3"}, earlier_batch_event_ids=set(), seen_event_ids={"w1", "w2"},
            own_replies=[own_reply(VALERIA, t("16:54:30"), ["wamid.BOT1"])], now=t("17:41:00"), max_items=200,
        )
        assert [(i["role"], i["text"]) for i in selection.items] == [
            ("agent", "How can I help?"), ("customer", "I need info")], reason
        assert {e["item_ids"][0]: e["reason"] for e in selection.excluded} == {
            "w1": "before_cutoff", bot["item_ids"][0]: reason}


def test_postmortem_bug5_through_the_state_machine() -> None:
    """The same timeline with real-time agent events and the hold on: the customer's 17:40:10 and
    17:40:30 messages are held while Ana works; at 17:56 the bot answers all of them, knowing what
    Ana said, with the cutoff at its own 16:54:30 reply and without its own reply as context."""
    c = Customer(lim=limits(quiet=10, hold=900))
    c.message(inbound("w1", t("16:54:17"), "Hola"))
    c.flush(t("16:54:27"))
    c.history(t("16:54:28"), [])
    c.answer(t("16:54:30"), VALERIA, ids=["wamid.BOT1"])
    c.agent(activity("a1", t("17:40:00"), "How can I help?", operator="Ana", ids=["wamid.A1"]))
    c.message(inbound("w2", t("17:40:10"), "I need info"))
    assert c.flush(t("17:40:20")).fetch is not None
    c.history(t("17:40:21"), [])
    c.message(inbound("w3", t("17:40:30"), "¿Hola?"))
    assert c.flush(t("17:40:40")).fetch is not None  # held messages wait: the history is read again
    c.history(t("17:40:41"), [])
    assert c.requests[-1]["batch_id"] == f"{c.state['customer_key']}:1"
    assert [d["hold_reason"] for d in c.decisions[-2:]] == ["human_active", "human_active"]

    c.message(inbound("w4", t("17:56:00"), "¿Me ayudan?"))
    assert c.flush(t("17:56:10")).fetch is not None
    request = c.history(t("17:56:12"), [
        customer_item("w4", t("17:56:00"), "¿Me ayudan?"),
        customer_item("w3", t("17:40:30"), "¿Hola?"),
        customer_item("w2", t("17:40:10"), "I need info"),
        agent_item("h-a1", t("17:40:00.300"), "How can I help?", operator="Ana", wamid="wamid.A1"),
        agent_item("h-bot", t("16:54:30.800"), VALERIA, operator=None, wamid="wamid.BOT1"),
        customer_item("w1", t("16:54:17"), "Hola"),
    ]).responder_requests[0]
    assert request["prior_last_reply_at"] == t("16:54:30")
    assert c.decisions[-1]["cutoff"] == t("16:54:30")
    assert [(i["role"], i["agent_name"], i["text"], i["source"]) for i in request["missed_messages"]] == [
        ("agent", "Ana", "How can I help?", "both")]
    assert [m["event_id"] for m in request["messages"]] == ["w2", "w3", "w4"]
    assert all(VALERIA not in i["text"] for i in request["missed_messages"])


def test_postmortem_bug6_a_reply_during_the_burst_does_not_move_the_cutoff() -> None:
    """Bot's last reply 17:42:40; agent 17:44:30 "Necesita algo?" and 17:44:39 "Envieme el menu";
    customer 17:48:50; a bot reply lands at 17:48:53 (for the customer's previous batch) before
    this batch is flushed. The cutoff stays 17:42:40 and both agent messages are injected — even
    though the 17:48:53 reply pruned the agent memory up to its own time for everyone else."""
    c = Customer(lim=limits(hold=120))
    c.message(inbound("w1", t("17:42:00"), "Quiero reservar"))
    c.flush(t("17:42:30"))
    c.history(t("17:42:31"), [])
    c.answer(t("17:42:40"), ids=["wamid.R1"])
    c.agent(activity("a1", t("17:44:30"), "Necesita algo?", operator="Hien Trinh", ids=["wamid.A1"]))
    c.agent(activity("a2", t("17:44:39"), "Envieme el menu", operator="Hien Trinh", ids=["wamid.A2"]))
    c.message(inbound("w2", t("17:47:00"), "?"))
    c.flush(t("17:47:30"))  # gap 300 s: no fetch; the agent messages come from real time
    batch2 = c.requests[-1]
    assert [i["text"] for i in batch2["missed_messages"]] == ["Necesita algo?", "Envieme el menu"]

    c.message(inbound("w3", t("17:48:50"), "Hola?"))  # batch 3 opens: prior reply 17:42:40
    c.answer(t("17:48:53"), "Claro, aquí tiene el menú.", ids=["wamid.R2"], request=batch2)
    assert c.state["last_reply_at"] == t("17:48:53")
    c.flush(t("17:49:20"))
    request = c.requests[-1]
    assert request["prior_last_reply_at"] == t("17:42:40")
    assert [(i["text"], i["at"]) for i in request["missed_messages"]] == [
        ("Necesita algo?", t("17:44:30")), ("Envieme el menu", t("17:44:39"))]
    # once batch 3 is answered, the memory is pruned for good
    c.answer(t("17:49:30"), request=request)
    assert c.state["agent_messages"] == []


def test_postmortem_bug6_with_the_history_fetch() -> None:
    """The same timeline with a 60 s gap threshold for this customer, so every batch fetches the
    history: the two agent messages come from both sources, once each; the bot's replies, the
    earlier batch's "?" and the batch itself are excluded with their reasons."""
    key = "wati:50376973593"
    c = Customer(lim=limits(hold=120, customers={key: {"missed_gap_seconds": 60}}))
    c.message(inbound("w1", t("17:42:00"), "Quiero reservar"))
    c.flush(t("17:42:30"))
    c.history(t("17:42:31"), [])
    c.answer(t("17:42:40"), "Con gusto, ¿para qué fecha desea reservar?", ids=["wamid.R1"])
    c.agent(activity("a1", t("17:44:30"), "Necesita algo?", operator="Hien Trinh", ids=["wamid.A1"]))
    c.agent(activity("a2", t("17:44:39"), "Envieme el menu", operator="Hien Trinh", ids=["wamid.A2"]))
    page = [
        agent_item("h-a2", t("17:44:39.250"), "Envieme el menu", operator="Hien Trinh", wamid="wamid.A2"),
        agent_item("h-a1", t("17:44:30.120"), "Necesita algo?", operator="Hien Trinh", wamid="wamid.A1"),
        agent_item("h-r1", t("17:42:40.600"), "Con gusto, ¿para qué fecha desea reservar?", operator=None,
                   wamid="wamid.R1"),
        customer_item("w1", t("17:42:00"), "Quiero reservar"),
    ]
    c.message(inbound("w2", t("17:47:00"), "?"))
    assert c.flush(t("17:47:30")).fetch is not None
    c.history(t("17:47:31"), [customer_item("w2", t("17:47:00"), "?"), *page])
    batch2 = c.requests[-1]

    c.message(inbound("w3", t("17:48:50"), "Hola?"))
    c.answer(t("17:48:53"), "Claro, aquí tiene el menú.", ids=["wamid.R2"], request=batch2)
    assert c.flush(t("17:49:20")).fetch is not None
    request = c.history(t("17:49:21"), [
        customer_item("w3", t("17:48:50"), "Hola?"),
        agent_item("h-r2", t("17:48:53.300"), "Claro, aquí tiene el menú.", operator=None, wamid="wamid.R2"),
        customer_item("w2", t("17:47:00"), "?"),
        *page,
    ]).responder_requests[0]
    assert request["prior_last_reply_at"] == t("17:42:40")
    assert [(i["text"], i["source"]) for i in request["missed_messages"]] == [
        ("Necesita algo?", "both"), ("Envieme el menu", "both")]
    assert {e["item_ids"][0]: e["reason"] for e in c.decisions[-1]["excluded"]} == {
        "w3": "in_batch", "h-r2": "not_before_batch", "w2": "in_earlier_batch", "h-r1": "own_id",
        "w1": "before_cutoff"}
