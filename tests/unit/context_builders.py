"""Builders for the context service's unit tests: messages, history items, states, a driver.

`Customer` drives the pure state machine like the faust shell does: every state it keeps has
been through the Avro codec (as the table stores it), and every request and decision it gets
back is encoded with its schema, so a field the schema does not know fails the test.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from services.common import codec
from services.common.config import GapPolicy
from services.common.records import (
    AgentActivity,
    AssistantReply,
    ContextCommand,
    CustomerState,
    HistoryItem,
    InboundMessage,
    MissedItem,
    OwnReply,
    ResponderRequest,
    SenderKind,
)
from services.context import state as sm
from services.context.state import Effects, Limits

KEY = "wati:50376973593"
WA_ID = "50376973593"
DAY = (2025, 10, 7)


def t(clock: str, day: tuple[int, int, int] = DAY) -> datetime:
    """`t("16:54:17")` or `t("16:54:17.250")`: an aware UTC time on the day of docs/old-system.md's cases."""
    main, _, frac = clock.partition(".")
    h, m, s = (int(x) for x in main.split(":"))
    micro = int((frac or "0").ljust(6, "0")[:6])
    return datetime(*day, h, m, s, micro, tzinfo=UTC)


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


def limits(
    *,
    quiet: float = 30,
    max_wait: float = 120,
    lookback: float = 86400,
    max_items: int = 200,
    history_timeout: float = 20,
    gap: float = 300,
    hold: float = 900,
    customers: dict[str, dict[str, float]] | None = None,
    every_batch: bool = False,
) -> Limits:
    """Test thresholds. `every_batch` False: the gap rule (MISSED_HISTORY=gap), which most
    timelines here exercise; the production default (every batch) is tested with `build_limits`."""
    return Limits(
        quiet_window_seconds=quiet,
        max_batch_wait_seconds=max_wait,
        missed_lookback_seconds=lookback,
        missed_max_items=max_items,
        history_timeout_seconds=history_timeout,
        policy=GapPolicy(gap, hold, {}, customers or {}),
        history_every_batch=every_batch,
    )


def inbound(
    event_id: str,
    at: datetime,
    text: str | None = "hola",
    *,
    key: str = KEY,
    channel: str = "wati",
    message_type: str = "text",
    media_ref: str | None = None,
    ids: Iterable[str] | None = None,
) -> InboundMessage:
    return cast(InboundMessage, {
        "event_id": event_id,
        "customer_key": key,
        "channel": channel,
        "provider_id": key.split(":", 1)[1],
        "message_type": message_type,
        "text": text,
        "caption": None,
        "media_ref": media_ref,
        "media_mime": "image/jpeg" if media_ref else None,
        "sender_name": "Cliente",
        "provider_message_ids": list(ids) if ids is not None else [event_id],
        "provider_time": at,
        "received_at": at + secs(0.2),
        "recovered": False,
        "username": None,
    })


def activity(
    event_id: str,
    at: datetime,
    text: str | None,
    *,
    kind: SenderKind = "human_agent",
    operator: str | None = "Ana Agente",
    email: str | None = None,
    local: str | None = None,
    ids: Iterable[str] | None = None,
    message_type: str = "text",
) -> AgentActivity:
    return {
        "event_id": event_id,
        "customer_key": KEY,
        "channel": "wati",
        "provider_id": WA_ID,
        "event_type": "templateMessageSent_v2" if kind == "template" else "sessionMessageSent_v2",
        "sender_kind": kind,
        "operator_name": operator,
        "operator_email": email,
        "message_type": message_type,
        "text": text,
        "provider_message_ids": list(ids) if ids is not None else [event_id],
        "local_message_id": local,
        "provider_time": at,
        "received_at": at + secs(0.5),
    }


def reply(
    batch_id: str,
    sent_at: datetime,
    text: str = "Con gusto le ayudo con su reserva, ¿para qué fecha sería?",
    *,
    ids: Iterable[str] = (),
    outcome: str = "answered",
) -> AssistantReply:
    return cast(AssistantReply, {
        "batch_id": batch_id,
        "customer_key": KEY,
        "channel": "wati",
        "provider_id": WA_ID,
        "outcome": outcome,
        "text": text if outcome in ("answered", "fallback") else "",
        "parts": [text] if outcome in ("answered", "fallback") else [],
        "sent_at": sent_at,
        "provider_message_ids": list(ids),
        "response_id": "resp_1",
        "conversation_id": "conv_1",
        "input_tokens": 10,
        "output_tokens": 5,
    })


def command(
    kind: str,
    issued_at: datetime,
    batch_id: str | None = None,
    *,
    history: Iterable[HistoryItem] = (),
    error: str | None = None,
    actor: str | None = None,
) -> ContextCommand:
    return cast(ContextCommand, {
        "kind": kind, "customer_key": KEY, "batch_id": batch_id, "issued_at": issued_at,
        "history": list(history), "history_error": error, "history_pages": 1, "actor": actor,
    })


def hist(
    item_id: str,
    at: datetime | None,
    text: str,
    *,
    owner: bool = False,
    operator: str | None = None,
    event_type: str = "message",
    local: str | None = None,
    wamid: str | None = None,
    message_type: str = "text",
) -> HistoryItem:
    """A parsed getMessages item (what the fetcher hands the state machine)."""
    return {
        "item_ids": [item_id] + ([wamid] if wamid else []),
        "at": at,
        "event_type": event_type,
        "owner": owner,
        "operator_name": operator,
        "text": text,
        "message_type": message_type,
        "local_message_id": local,
        "conversation_id": "conv-wati-1",
    }


def customer_item(item_id: str, at: datetime, text: str) -> HistoryItem:
    return hist(item_id, at, text)


def agent_item(item_id: str, at: datetime, text: str, operator: str | None = "Ana Agente",
               **kw: Any) -> HistoryItem:
    return hist(item_id, at, text, owner=True, operator=operator, **kw)


def realtime(item_id: str, at: datetime, text: str, *, name: str | None = "Ana Agente",
             ids: Iterable[str] | None = None) -> MissedItem:
    return {"at": at, "role": "agent", "agent_name": name, "text": text, "message_type": "text",
            "source": "realtime", "item_ids": list(ids) if ids is not None else [item_id]}


def own_reply(text: str, sent_at: datetime, ids: Iterable[str] = (), batch_id: str = "b") -> OwnReply:
    return {"batch_id": batch_id, "sent_at": sent_at, "text": text, "provider_message_ids": list(ids)}


def roundtrip(state: CustomerState) -> CustomerState:
    """What the faust table would give back: the state through the Avro codec."""
    return cast(CustomerState, codec.decode("CustomerState", codec.encode("CustomerState", dict(state))))


def check_effects(effects: Effects) -> None:
    """Every record the shell would produce is valid for its schema."""
    for request in effects.responder_requests:
        codec.encode("ResponderRequest", dict(request))
    for vision in effects.vision_requests:
        codec.encode("VisionRequest", {"request": dict(vision["request"])})
    for decision in effects.decisions:
        codec.encode("BatchDecision", dict(decision))
    for dead_letter in effects.dead_letters:
        codec.encode("DeadLetter", dict(dead_letter))
    for message in effects.recovered_inbound:
        codec.encode("InboundMessage", dict(message))


class Customer:
    """One customer's state driven through the state machine, the way the faust shell does it."""

    def __init__(self, key: str = KEY, lim: Limits | None = None) -> None:
        self.limits = lim or limits()
        self.state = sm.new_state(key)
        self.requests: list[ResponderRequest] = []
        self.decisions: list[dict[str, Any]] = []

    def _apply(self, result: tuple[CustomerState, Effects]) -> Effects:
        new_state, effects = result
        check_effects(effects)
        if not effects.duplicate:
            self.state = roundtrip(new_state)
        self.requests += effects.responder_requests + [v["request"] for v in effects.vision_requests]
        self.decisions += [dict(d) for d in effects.decisions]
        return effects

    def message(self, msg: InboundMessage, now: datetime | None = None) -> Effects:
        return self._apply(sm.on_inbound(self.state, msg, now or msg["provider_time"], self.limits))

    def agent(self, act: AgentActivity, now: datetime | None = None) -> Effects:
        return self._apply(sm.on_agent_activity(self.state, act, now or act["provider_time"], self.limits))

    def replied(self, rep: AssistantReply, now: datetime | None = None) -> Effects:
        return self._apply(sm.on_reply(self.state, rep, now or rep["sent_at"], self.limits))

    def command(self, cmd: ContextCommand) -> Effects:
        return self._apply(sm.on_command(self.state, cmd, cmd["issued_at"], self.limits))

    def due(self, now: datetime) -> str | None:
        return sm.due_action(self.state, now, self.limits)

    def flush(self, now: datetime) -> Effects:
        """The timer's flush at `now` (asserts something is due)."""
        batch_id = self.due(now)
        assert batch_id is not None, f"nothing due at {now}"
        return self.command(command("flush", now, batch_id))

    def history(self, now: datetime, items: Iterable[HistoryItem] = (), error: str | None = None) -> Effects:
        """Delivers the fetch result for the flushing batch."""
        flushing = self.state["flushing_batch"]
        assert flushing is not None, "no batch waits for history"
        return self.command(command("history_fetched", now, flushing["batch_id"], history=items,
                                    error=error))

    def answer(self, sent_at: datetime, text: str = "Con gusto le ayudo con su reserva.",
               ids: Iterable[str] = (), request: ResponderRequest | None = None) -> Effects:
        """The responder's reply to the latest (or the given) request."""
        target = request or self.requests[-1]
        return self.replied(reply(target["batch_id"], sent_at, text, ids=ids))


def ready_recording_commands(runtime: Any, table: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """Makes a context runtime ready over `table` (its customers), its timer's commands recorded in
    the list returned instead of produced."""
    runtime.customers = table
    sent: list[dict[str, Any]] = []

    async def send_command(cmd: Any) -> None:
        sent.append(dict(cmd))

    runtime.send_command = send_command
    runtime.index_ready = True
    runtime.readiness = lambda: (True, {})
    return sent
