"""Regression tests from the review of the context service (each failed before its fix)."""

from __future__ import annotations

from typing import Any

from services.common import codec
from services.common.config import Settings
from services.context import state as sm
from services.context.state import HistoryFetchOrder

from .context_builders import KEY, Customer, agent_item, command, customer_item, inbound, limits, t


def _answered_customer(hold: float = 900) -> Customer:
    """A WATI customer whose first message at 10:00 the bot answered at 10:00:40."""
    c = Customer(lim=limits(hold=hold))
    c.message(inbound("w1", t("10:00:00"), "¿Tienen habitaciones?"))
    c.flush(t("10:00:30"))
    c.history(t("10:00:31"), [])
    c.answer(t("10:00:40"), ids=["wamid.BOT1"])
    return c


def test_after_a_hold_the_agent_messages_found_by_history_reach_the_next_request() -> None:
    """Account without sessionMessageSent_v2: the human agent is seen only in getMessages.

    10:20 the agent writes (history only); 10:34 the customer writes (gap 34 min: fetch; the agent
    wrote 14 min ago: held); 10:36 the customer writes again (gap 2 min: short; the hold expired).
    The one request must carry both customer messages AND the agent's message (issue 9 point 3):
    the held batch's fetch was the only place the agent's message was seen.
    """
    c = _answered_customer()
    c.message(inbound("w2", t("10:34:00"), "Ya hablé con Ana"))
    assert c.flush(t("10:34:30")).fetch is not None
    held = c.history(t("10:34:31"), [agent_item("h1", t("10:20:00"), "Le envié el menú por correo")])
    assert held.decisions[0]["held"] is True and not held.responder_requests

    c.message(inbound("w3", t("10:36:00"), "¿Me confirma la reserva?"))
    effects = c.flush(t("10:36:30"))
    if effects.fetch is not None:  # the fixed state machine looks at the history again
        effects = c.history(t("10:36:31"), [
            agent_item("h1", t("10:20:00"), "Le envié el menú por correo"),
            customer_item("w2", t("10:34:00"), "Ya hablé con Ana"),
        ])
    [request] = effects.responder_requests
    assert [m["event_id"] for m in request["messages"]] == ["w2", "w3"]
    assert [(i["role"], i["text"]) for i in request["missed_messages"]] == [
        ("agent", "Le envié el menú por correo")]
    assert request["missed_check_ran"] is True


def test_the_sweep_does_not_recover_a_customer_message_a_human_agent_already_answered() -> None:
    """The chat was assigned to a human, so WATI sent the bot no webhook; the agent answered it.

    The sweep must not put that message into a batch for the bot to answer (the bot would talk
    over the agent, and the agent's answer — after the batch start — would be cut from its
    context): like select_missed, only messages nobody answered are recovered.
    """
    c = _answered_customer(hold=0)
    history = [
        customer_item("lost1", t("10:10:00"), "¿Aceptan mascotas?"),
        agent_item("h1", t("10:11:00"), "Sí, con un cargo de 10 dólares"),
    ]
    effects = c.command(command("history_fetched", t("10:30:00"), None, history=history))
    assert c.state["open_batch"] is None
    assert not effects.metrics


def test_the_sweep_still_recovers_what_nobody_answered() -> None:
    c = _answered_customer(hold=0)
    history = [
        agent_item("h1", t("10:05:00"), "Buenas, ¿algo más?"),
        customer_item("lost1", t("10:10:00"), "¿Aceptan mascotas?"),
        agent_item("own1", t("10:12:00"), "Respuesta automática", operator="API Token 3"),
    ]
    swept = c.command(command("history_fetched", t("10:30:00"), None, history=history))
    assert [m["event_id"] for m in swept.recovered_inbound] == ["lost1"]
    for message in swept.recovered_inbound:  # back through the inbound topic, like its webhook
        c.message(message, message["received_at"])
    batch = c.state["open_batch"]
    assert batch is not None and [m["event_id"] for m in batch["messages"]] == ["lost1"]


async def test_a_reconcile_command_starts_the_fetch_it_orders(tmp_path: Any) -> None:
    """`on_command("reconcile")` changes no state but orders a fetch: the shell must still start it."""
    from services.context.app import Incoming, create_app

    app = create_app(Settings(kafka_bootstrap_servers="k:9092", topic_prefix="rv.", web_token="t",
                              context_store="memory", data_dir=str(tmp_path)))
    runtime = app.runtime
    state = _answered_customer().state
    runtime.customers = {KEY.encode("utf-8"): codec.encode("CustomerState", dict(state))}  # type: ignore[assignment]
    started: list[HistoryFetchOrder] = []
    runtime.fetcher.start = started.append  # type: ignore[method-assign]
    value = codec.encode("ContextCommand", dict(command("reconcile", t("10:30:00"))))
    await runtime.handle_events([Incoming(KEY.encode("utf-8"), value, runtime.topics.context_commands, 0, 1)])
    assert [o.batch_id for o in started] == [sm.RECONCILE_FETCH_ID]
