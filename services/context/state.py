"""The context service's per-customer state machine: pure, synchronous, no Kafka and no HTTP.

The faust agent (services/context/app.py) decodes each event of a customer, calls ONE of the
`on_*` functions below with the customer's state (a fresh copy decoded from the table, which the
function may mutate) and the event, writes the returned state back to the table in the same
step, and performs the returned `Effects` (produce requests/audit events, start a history fetch).
Because the dedupe memory travels in the same state write as the effect, a replayed event (after
a crash or a rebalance) changes nothing and emits nothing twice. (The functions never mutate the
state passed in: they work on a deep copy, so a caller may compare before and after.)

Times: `now` is the worker's wall clock as carried by the event being handled (the flush command's
`issued_at`, or the processing time the shell passes) — injected, so tests control it.

Invariants (the old system's bugs, docs/old-system.md; docs/design.md "Lessons"):
1. `last_inbound_at` changes only on customer messages; `last_reply_at` only on reply events.
2. A batch captures `prior_last_inbound_at` / `prior_last_reply_at` when it OPENS, before anything
   is updated; nothing read later changes them (6: the same rule for the reply time).
3-5. Missed messages: selected by the window (prior_last_reply_at, first message of the batch),
   sorted by parsed time, never "the last N", never our own messages (services/context/missed.py).

Decisions taken here (where the issues leave a choice):
- Batch ids are `<customer_key>:<batch_seq>`: deterministic from the state, so a replayed message
  opens the same batch id, and unique per customer.
- One batch at a time leaves the customer: while a batch waits for its history (`flushing_batch`),
  a newer open batch is not flushed (`due_action` returns None for it) — answers stay in order.
- Gap check (WATI only; ManyChat has no history API): with `Limits.history_every_batch` (the
  default, MISSED_HISTORY=every_batch) the history is read for EVERY batch (`every_batch`): an
  account without real-time agent webhooks, and a customer message WATI never delivered, leave no
  blind spot. Otherwise (MISSED_HISTORY=gap) it runs when `gap = earliest provider time of the
  batch - prior last_inbound_at` EXCEEDS the customer's threshold, on first contact (no prior
  inbound: look back `missed_lookback_seconds`), and when held messages wait or the batch carries
  them (gap < 0) (`after_hold`: the held batch's fetch kept nothing). Real-time agent messages
  since the last reply are injected whatever the gap.
- A history fetch that failed but returned some pages is used (the newest pages are the ones that
  matter), with its `history_error` recorded; a failed fetch without items answers without history.
- Hold: a batch is held when the operator paused the customer, or when a human agent wrote within
  the customer's `hold_seconds` before `now` (0 = off). Human activity comes from real-time agent
  events and from human-agent messages a history fetch finds (the only source on accounts
  without `sessionMessageSent_v2`). Nobody is left waiting: when the hold ends (`hold_seconds`
  after the last human message, or `resume` for a pause) `due_action` makes the held messages due
  (`hold_ends_at` is that time, for the timer) and their flush answers, as a batch of their own,
  those no human wrote after; those a human wrote after (the human handled them) and those older
  than WhatsApp's 24 h session become context: customer items among the agents' messages, given
  to the model in time order and never answered. A batch flushed after the hold's end does the
  same with the held messages it carries. Beyond HELD_MESSAGES the oldest held messages are
  dead-lettered (`held_overflow`), counted and listed in the audit as excluded.
- Request messages: held and recovered messages first, ordered by provider time (they precede the
  burst), then the batch's own messages in arrival order.
- Routing: vision when a message is an image/sticker with a media reference, or when an earlier
  batch of the customer routed to vision is still unanswered (vision forwards in order; a text batch
  overtaking it would be answered first).
- Agent activity: our own sends and WATI's bot are ignored, by the one own-message rule of
  services/common/own_messages.py (id, `API Token`, `Bot`, own text — never over a human name);
  templates are kept as context (role agent, name "template") but are not human activity; `unknown`
  counts as human only with an operator name or e-mail that is not ours (our own echo arrives
  without one). A reply that reveals an earlier "human" item was our own send removes it again.
- Pruning real-time agent messages on a reply never drops what a pending batch still needs (its
  cutoff may be older than the new reply: docs/old-system.md, bug 6), nor what came after the last
  request's window end (`window_end:` entries in `recent_event_ids`): a human message written
  while the bot composed its answer was in no request, and the next window reaches back to it.
- Customer messages of earlier batches the bot ANSWERED are remembered (`answered:<id>` in
  `recent_event_ids`) and excluded from later missed context as `in_earlier_batch`, like those of
  batches still unanswered; a batch answered with nothing sent leaves its messages as context.
  Context items given to the model are remembered too (`given:<id>`): a whole-second real-time
  item in the second of the cutoff may be before or after it, and its ids — not its time — tell
  whether the model already has it.
- Replays (RELIABILITY.md 6b): a flush names what the timer's state had handled — the batch's
  messages, the customer's agent-activity events and replies, the replies when the batch opened —
  and waits for them in a replay; the batch sees exactly those (`_seen_view`), its cutoff is the
  reply time after `opened_replies` replies. Later events belong to the next batch. A flush
  also waits while an earlier batch fetches its history again (its replayed result came first).
  A history result (or the timer's retry of a fetch) read before its batch started flushing waits
  for it (`early_fetch_commands`); a hold's end is a counted flush too (`batch_messages` 0); the
  sweep's recovered messages go through the inbound topic, whose one order decides.
  Liveness: once every webhook the flush counted is handled, a batch still short of its count is
  never completed — the flush is settled (`_never_satisfied`), never left waiting.
- Metrics are `(attribute name in services.common.metrics, labels, value)`; for a Histogram the
  value is observed, for a Counter added. Duplicates (`Effects.duplicate`) carry no metric: the
  shell counts `dedupe_hits_total` itself. History-fetch failures reported by the fetcher are
  counted by the fetcher; the state counts only the timeouts it detects itself (result never came).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from services import providers
from services.common import codec, own_messages
from services.common.config import GapPolicy
from services.common.keys import split_key
from services.common.records import (
    AgentActivity,
    AgentLogEntry,
    AssistantReply,
    Batch,
    BatchDecision,
    Channel,
    ContextCommand,
    CustomerState,
    EarlyFlush,
    ExcludedItem,
    HistoryItem,
    InboundLogEntry,
    InboundMessage,
    MissedItem,
    OwnReply,
    ReplyLogEntry,
    ResponderRequest,
    Unanswered,
    VisionRequest,
    WaitingFlush,
)
from services.common.timeparse import is_whole_second, latest_possible, possibly_after, surely_after
from services.context import missed
from services.context.plain import copy_plain  # copy.deepcopy's result, several times faster

RECENT_EVENT_IDS = 1000
OWN_REPLIES = 30
AGENT_MESSAGES = 100
FLUSHED_BATCH_IDS = 100
WHATSAPP_SESSION_SECONDS = 24 * 3600
HELD_MESSAGES = 200
"""Customer messages kept across held batches; beyond it the OLDEST are dead-lettered (reason
`held_overflow`), counted in `dead_letters_total` and listed as excluded in the held batch's audit."""
HELD_OVERFLOW = "held_overflow"
SERVICE = "context"
UNANSWERED_TTL_SECONDS = 3600.0
"""An emitted batch without a reply after this long is forgotten (the responder dead-lettered it):
it no longer pins the customer's batches to vision nor excludes its messages."""
MAX_FETCH_ATTEMPTS = 2
"""History fetches per batch: the first, and one retry after a timeout; then answer without."""
RECONCILE_FETCH_ID = "reconcile"
"""`HistoryFetchOrder.batch_id` of a sweep fetch; its result may come back with this id or None."""
IMAGE_TYPES = frozenset({"image", "sticker"})
"""Message types vision classifies (when the message carries a media reference)."""
REPLY_KEY = "reply:"
ANSWERED_KEY = "answered:"
GIVEN_KEY = "given:"
WINDOW_KEY = "window_end:"
"""`recent_event_ids` entries `window_end:<ISO time>`: where each emitted request's missed window
ended (its batch start). What happened between it and the bot's reply was in no request."""
GIVEN_ITEMS = 20
"""Context items remembered as given per batch (see `_given_keys`)."""
"""Prefixes in `recent_event_ids`: replies handled (dedupe), customer messages the bot answered."""
MAX_WAITING_FLUSHES = 8
"""Flushes one batch may keep waiting for their messages during a replay. While a replay waits, the
timer re-sends the same count every few seconds: of one count only the first and the latest are
kept (judged on the same messages, a later time can only be due if an earlier one is)."""
INBOUND_LOG = 200
"""Inbound webhooks remembered with their numbers (a flush's count is judged against them)."""
MAX_EARLY_FLUSHES = 32
"""Flushes of batches to come one customer may keep (every batch's bound is MAX_WAITING_FLUSHES)."""
MAX_EARLY_FETCH_COMMANDS = 16
"""History results and fetch retries one customer may keep for batches not flushing yet (a replay);
beyond it later ones are ignored (the first in log order are the ones that decide)."""


@dataclass(frozen=True)
class Limits:
    """Thresholds the state machine needs (from Settings; tests build their own)."""

    quiet_window_seconds: float
    max_batch_wait_seconds: float
    missed_lookback_seconds: float
    missed_max_items: int
    history_timeout_seconds: float
    policy: GapPolicy  # per-customer gap and hold thresholds
    history_every_batch: bool = True  # MISSED_HISTORY=every_batch: no blind spot (False: gap rule)


@dataclass(frozen=True)
class HistoryFetchOrder:
    """Ask the shell to fetch WATI history and deliver it as a `history_fetched` command."""

    customer_key: str
    provider_id: str
    batch_id: str
    stop_before: datetime | None  # pages may stop once items are older than this


@dataclass
class Effects:
    """What the shell must do after writing the new state, in this order."""

    responder_requests: list[ResponderRequest] = field(default_factory=list)
    vision_requests: list[VisionRequest] = field(default_factory=list)
    decisions: list[BatchDecision] = field(default_factory=list)  # audit topic, one per batch
    fetch: HistoryFetchOrder | None = None
    log: list[tuple[str, dict[str, object]]] = field(default_factory=list)  # (event name, fields)
    metrics: list[tuple[str, dict[str, str], float]] = field(default_factory=list)  # (name, labels, inc)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # DeadLetter records to produce
    duplicate: bool = False  # the event was a redelivery: nothing changed
    # customer messages only the reconciliation sweep found: produced to the inbound topic (keyed by
    # the customer) and handled there like their webhooks, in that topic's one order (6b)
    recovered_inbound: list[InboundMessage] = field(default_factory=list)


@dataclass(frozen=True)
class GapDecision:
    """Whether a batch's missed-message check (history fetch) runs, and why."""

    gap_seconds: float | None
    threshold_seconds: float
    check: bool
    outcome: str  # gap_exceeded | first_contact | after_hold | every_batch | short_gap | not_wati


# -- public API -----------------------------------------------------------------------------------

def new_state(customer_key: str) -> CustomerState:
    """The state of a customer never seen before."""
    return {
        "customer_key": customer_key,
        "channel": None,
        "provider_id": None,
        "last_inbound_at": None,
        "last_reply_at": None,
        "last_human_at": None,
        "recent_event_ids": [],
        "own_replies": [],
        "agent_messages": [],
        "open_batch": None,
        "flushing_batch": None,
        "held_messages": [],
        "unanswered": [],
        "flushed_batch_ids": [],
        "paused": False,
        "paused_by": None,
        "last_activity_at": None,
        "batch_seq": 0,
        "early_flushes": [],
        "agent_events_handled": 0,
        "replies_handled": 0,
        "agent_log": [],
        "reply_log": [],
        "reply_floor": None,
        "last_human_base": None,
        "inbound_handled": 0,
        "inbound_log": [],
        "early_fetch_commands": [],
    }


def on_inbound(
    state: CustomerState, message: InboundMessage, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """A customer message: dedupe, open a batch (capturing the priors) if none is open, append."""
    ids = message_ids(message)
    seen = set(state["recent_event_ids"])
    if seen.intersection(ids):
        log: list[tuple[str, dict[str, object]]] = [
            ("duplicate_ignored", {"kind": "inbound", "event_id": message["event_id"]})]
        if any(set(e["ids"]).intersection(ids) for e in state.get("inbound_log", [])):
            return state, Effects(duplicate=True, log=log)  # this webhook again
        # The late webhook of a message already recovered from history: one answer, never two. It
        # is counted all the same: a replay may handle it before the history (RELIABILITY.md 6b).
        state = copy_plain(state)
        _log_inbound(state, ids)
        return _decide_waiting_flushes(state, limits, Effects(log=log))  # a flush may count it
    state = copy_plain(state)
    _log_inbound(state, ids)
    effects = Effects()
    batch = state["open_batch"]
    if batch is None:
        batch = _open_batch(state, now)
        effects.log.append(("batch_opened", _batch_fields(batch)))
    batch["messages"].append(_normalised_message(message))
    # the quiet window runs from the latest receive time, whatever order ingest's racing requests
    # were handled in: `_seen_part` and `_reopen` judge a replayed batch's part by the same rule
    batch["last_message_at"] = max(batch["last_message_at"], now)
    _remember(state["recent_event_ids"], ids, RECENT_EVENT_IDS)
    state["last_inbound_at"] = _later(state["last_inbound_at"], message["provider_time"])
    state["channel"] = message["channel"]
    state["provider_id"] = message["provider_id"]
    state["last_activity_at"] = now
    return _decide_waiting_flushes(state, limits, effects)


def _decide_waiting_flushes(
    state: CustomerState, limits: Limits, effects: Effects
) -> tuple[CustomerState, Effects]:
    """Decides, in log order and each at its own time, the flushes whose messages are all in now.

    Only a replay gets here: the flush was handled before messages it counted (another interleaving
    of the input topics). Deciding it once they are in, exactly as it was decided the first time,
    keeps the batch's id and contents those of the batch already emitted before the crash.
    """
    while True:
        batch = state["open_batch"]
        if batch is None:
            hold_end = _hold_end_due(state)
            if hold_end is None:
                return state, effects
            state["early_flushes"] = [f for f in state.get("early_flushes") or [] if f is not hold_end]
            state, decided = _end_hold_counted(state, hold_end["batch_id"], hold_end["issued_at"], limits,
                                               _seen_counts(hold_end))
            _merge_effects(effects, decided)
            continue
        if not batch.get("waiting_flushes"):
            return state, effects
        first = batch["waiting_flushes"][0]
        if state["flushing_batch"] is not None:
            # an earlier batch still fetches (its replayed history came before its flush was
            # decided): this flush waits for it, or the batch is cut where a later timer says
            return state, effects
        if first["batch_messages"] == 0:  # a hold's end; the batch was opened by later messages
            if not _counted_all(state, first):
                return state, effects
            batch["waiting_flushes"] = batch["waiting_flushes"][1:]
            state, decided = _end_hold_counted(state, batch["batch_id"], first["issued_at"], limits,
                                               _seen_counts(first))
            _merge_effects(effects, decided)
            continue
        short = _never_satisfied(state, batch, first)
        if short is None and not _handled_all(state, batch, first):
            return state, effects
        batch["waiting_flushes"] = batch["waiting_flushes"][1:]
        if short == "batch_replied":
            _merge_effects(effects, _close_replied(state, batch, first))
            continue
        seen = first["batch_messages"] if short is None else len(batch["messages"])
        if short is not None:
            effects.log.append(("waiting_flush_settled", {
                "batch_id": batch["batch_id"], "reason": short, "batch_messages": first["batch_messages"],
                "handled": len(batch["messages"])}))
        state, decided = _decide_flush(state, batch["batch_id"], seen, first["issued_at"],
                                       limits, _seen_counts(first))  # may reopen the next batch
        _merge_effects(effects, decided)


def _never_satisfied(state: CustomerState, batch: Batch, flush: Any) -> str | None:
    """Why a waiting flush can never get the messages it counted (None: it can, or it has them).

    Every inbound webhook the timer's state had handled is handled again, yet the batch has fewer
    messages than the timer counted: the missing ones are elsewhere (an earlier batch, the dedupe
    memory) and no replayed record will bring them. Waiting would leave the batch — and every later
    flush of the customer, queued behind it — undecided for ever. `batch_replied`: the responder
    already answered this batch id (a previous worker decided it before the crash); else
    `messages_elsewhere`: it is decided with what it has. A flush without an inbound count (an
    older command) cannot be judged and keeps waiting."""
    inbound = _seen_counts(flush)[3]
    if (inbound is None or state.get("inbound_handled", 0) < inbound
            or len(batch["messages"]) >= flush["batch_messages"]):
        return None
    replied = REPLY_KEY + batch["batch_id"] in state["recent_event_ids"]
    return "batch_replied" if replied else "messages_elsewhere"


def _close_replied(state: CustomerState, batch: Batch, flush: Any) -> Effects:
    """Closes an open batch (state already copied) whose reply is in although its flush can never be
    decided here (`_never_satisfied`): a previous worker emitted it and the responder answered; a
    second request under the same id would be dropped by the responder's dedupe. Its messages count
    as answered; the next message opens the next batch."""
    state["open_batch"] = None
    _remember(state["flushed_batch_ids"], [batch["batch_id"]], FLUSHED_BATCH_IDS)
    state["early_fetch_commands"] = [c for c in state.get("early_fetch_commands") or []
                                     if c["batch_id"] != batch["batch_id"]]
    answered = [ANSWERED_KEY + i for m in batch["messages"] for i in message_ids(m)]
    _remember(state["recent_event_ids"], answered, RECENT_EVENT_IDS)
    return Effects(log=[("waiting_flush_settled", {
        "batch_id": batch["batch_id"], "reason": "batch_replied", "batch_messages": flush["batch_messages"],
        "handled": len(batch["messages"])})])


def _flush_ignored(batch_id: str, reason: str) -> Effects:
    return Effects(log=[("flush_ignored", {"batch_id": batch_id, "reason": reason})])


def _merge_effects(into: Effects, more: Effects) -> None:
    into.responder_requests.extend(more.responder_requests)
    into.vision_requests.extend(more.vision_requests)
    into.decisions.extend(more.decisions)
    into.fetch = more.fetch or into.fetch
    into.log.extend(more.log)
    into.metrics.extend(more.metrics)
    into.dead_letters.extend(more.dead_letters)
    into.recovered_inbound.extend(more.recovered_inbound)


def on_agent_activity(
    state: CustomerState, activity: AgentActivity, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """A business-side send reported in real time (sessionMessageSent_v2 / templateMessageSent_v2).

    Human-agent sends become real-time missed items and move `last_human_at` (hold); templates
    become context items only; our own sends and WATI's bot are ignored (with the reason logged).
    Never touches last_inbound_at / last_reply_at.
    """
    ids = _unique([activity["event_id"], *activity["provider_message_ids"]])
    if set(state["recent_event_ids"]).intersection(ids):
        return state, Effects(duplicate=True, log=[("duplicate_ignored", {
            "kind": "agent_activity", "event_id": activity["event_id"]})])
    state = copy_plain(state)
    effects = Effects()
    _remember(state["recent_event_ids"], ids, RECENT_EVENT_IDS)
    entry = _log_agent_event(state)
    if state["channel"] is None:
        state["channel"] = activity["channel"]
    if state["provider_id"] is None:
        state["provider_id"] = activity["provider_id"]
    match_ids = set(ids) | ({activity["local_message_id"]} if activity["local_message_id"] else set())
    kind = activity["sender_kind"]
    reason = _ignored_activity_reason(state, activity, match_ids)
    if reason is not None:
        effects.log.append(("agent_activity_ignored", {
            "event_id": activity["event_id"], "sender_kind": kind, "reason": reason}))
        return _decide_waiting_flushes(state, limits, effects)
    template = kind == "template"
    text = (activity["text"] or "").strip() or f"[{activity['message_type'] or 'message'}]"
    item: MissedItem = {
        "at": activity["provider_time"],
        "role": "agent",
        "agent_name": missed.TEMPLATE_AGENT_NAME if template else _clean(activity["operator_name"]),
        "text": text,
        "message_type": activity["message_type"],
        "source": "realtime",
        "item_ids": _unique([*ids, activity["local_message_id"] or ""]),
    }
    agent_messages = sorted([*state["agent_messages"], item], key=lambda m: m["at"])
    state["agent_messages"] = agent_messages[-AGENT_MESSAGES:]
    entry["item_ids"] = list(item["item_ids"])
    if not template:
        entry["human_at"] = activity["provider_time"]
        state["last_human_at"] = _later(state["last_human_at"], activity["provider_time"])
    effects.log.append(("agent_message_recorded", {
        "event_id": activity["event_id"], "sender_kind": kind, "at": activity["provider_time"],
        "human": not template}))
    return _decide_waiting_flushes(state, limits, effects)


def on_reply(
    state: CustomerState, reply: AssistantReply, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """The responder answered (or gave up on) a batch: moves last_reply_at only if something was sent."""
    key = REPLY_KEY + reply["batch_id"]
    if key in state["recent_event_ids"]:
        return state, Effects(duplicate=True, log=[("duplicate_ignored", {
            "kind": "reply", "batch_id": reply["batch_id"]})])
    state = copy_plain(state)
    effects = Effects()
    answered_entry = next((u for u in state["unanswered"] if u["batch_id"] == reply["batch_id"]), None)
    remembered = [key]
    sent = reply["outcome"] in ("answered", "fallback") and bool(reply["text"].strip())
    last_reply_before = state["last_reply_at"]
    removed: list[MissedItem] = []
    if sent:
        state["last_reply_at"] = _later(state["last_reply_at"], reply["sent_at"])
        own: OwnReply = {
            "batch_id": reply["batch_id"],
            "sent_at": reply["sent_at"],
            "text": reply["text"],
            "provider_message_ids": _unique(reply["provider_message_ids"]),
        }
        state["own_replies"] = [*state["own_replies"], own][-OWN_REPLIES:]
        removed = _forget_own_echoes(state, own)
        echo_ids = {i for m in removed for i in m["item_ids"]}
        for entry in state.get("agent_log", []):
            if entry["forgotten_by"] is None and echo_ids.intersection(entry["item_ids"]):
                entry["forgotten_by"] = state.get("replies_handled", 0) + 1  # this reply's seq
        if reply["outcome"] == "answered" and answered_entry is not None:
            remembered.extend(ANSWERED_KEY + i for i in answered_entry["event_ids"])
    _remember(state["recent_event_ids"], remembered, RECENT_EVENT_IDS)
    state["unanswered"] = [u for u in state["unanswered"] if u["batch_id"] != reply["batch_id"]]
    pruned = _prune_agent_messages(state, now, limits)
    state["replies_handled"] = state.get("replies_handled", 0) + 1
    logged: ReplyLogEntry = {
        "seq": state["replies_handled"], "batch_id": reply["batch_id"], "sent": sent, "echoes": removed,
        "unanswered": answered_entry, "last_reply_before": last_reply_before}
    state["reply_log"] = [*state.get("reply_log", []), logged][-OWN_REPLIES:]
    effects.log.append(("reply_recorded", {
        "batch_id": reply["batch_id"], "outcome": reply["outcome"], "sent": sent,
        "last_reply_at": state["last_reply_at"], "agent_messages_pruned": pruned,
        "own_echoes_removed": len(removed)}))
    return _decide_waiting_flushes(state, limits, effects)


def on_command(
    state: CustomerState, command: ContextCommand, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """flush / history_fetched / pause / resume / reconcile, keyed by customer."""
    kind = command["kind"]
    if kind == "flush":
        return _on_flush(state, command, now, limits)
    if kind == "history_fetched":
        batch_id = command["batch_id"]
        if not batch_id or batch_id == RECONCILE_FETCH_ID:
            return _on_sweep_result(state, command, now, limits)
        return _on_history(state, command, now, limits)
    if kind in ("pause", "resume"):
        state = copy_plain(state)
        state["paused"] = kind == "pause"
        state["paused_by"] = (command["actor"] or "operator") if kind == "pause" else None
        return state, Effects(log=[("bot_paused" if kind == "pause" else "bot_resumed", {
            "actor": command["actor"], "held_messages": len(state["held_messages"])})])
    if kind == "reconcile":
        return _on_reconcile(state, now)
    return state, Effects(log=[("command_ignored", {"kind": kind, "reason": "unknown_kind"})])


def due_action(state: CustomerState, now: datetime, limits: Limits) -> str | None:
    """For the shell's timer (read-only): the batch id that needs a `flush` command now, else None.

    Due when the open batch's quiet window or max wait has passed, or when a flushing batch's
    history fetch has been running longer than `history_timeout_seconds` (crashed fetch task,
    worker restart): the flush command then retries the fetch once, then answers without history.
    While a batch is flushing, the open batch waits for it (answers leave in order).
    """
    flushing = state["flushing_batch"]
    if flushing is not None:
        return flushing["batch_id"] if _fetch_timed_out(flushing, now, limits) else None
    batch = state["open_batch"]
    if batch is not None and _is_due(batch, now, limits):
        return batch["batch_id"]
    if batch is None and state["held_messages"] and _hold_reason(state, now, limits) is None:
        return _next_batch_id(state)  # the hold ended: the held messages' batch (see `_end_hold`)
    return None


def hold_ends_at(state: CustomerState, limits: Limits) -> datetime | None:
    """When held messages stop waiting (for the timer): None when none wait or while paused.

    A pause ends with the `resume` command (a state change, after which the timer asks again); a
    human hold ends `hold_seconds` after the last human-agent message.
    """
    held = state["held_messages"]
    if not held or state["paused"]:
        return None
    hold = limits.policy.hold_seconds(state["customer_key"])
    last_human = state["last_human_at"]
    if hold > 0 and last_human is not None:  # from the end of a whole-second time's second
        return latest_possible(last_human) + timedelta(seconds=hold)
    return max(m["provider_time"] for m in held)  # no hold applies (any more): due now


# -- helpers others may call --------------------------------------------------------------------

def message_ids(message: InboundMessage) -> list[str]:
    """Every id a customer message is known by (its event id first)."""
    return _unique([message["event_id"], *message["provider_message_ids"]])


def batch_start(batch: Batch) -> datetime:
    """The earliest provider time of the batch: the missed-message window ends strictly before it."""
    return min(m["provider_time"] for m in batch["messages"])


def gap_decision(batch: Batch, customer_key: str, limits: Limits, held: bool = False) -> GapDecision:
    """Gap = earliest message of the batch - prior last_inbound_at (docs/old-system.md, bugs 1 and 2).

    `held`: customer messages of a held batch wait to be answered with this one. Their fetch found
    what the humans said meanwhile but kept none of it, so the history is read again whatever the gap
    (an account without sessionMessageSent_v2 has no other source of the agents' messages).
    """
    threshold = limits.policy.gap_seconds(customer_key)
    prior = batch["prior_last_inbound_at"]
    gap = None if prior is None else (batch_start(batch) - prior).total_seconds()
    if not providers.has_history(batch["messages"][0]["channel"]):
        # "not_wati" (a reason already in audits and reports): the channel's provider has no history
        return GapDecision(gap, threshold, False, "not_wati")
    if gap is None:
        return GapDecision(gap, threshold, True, "first_contact")
    if gap > threshold:
        return GapDecision(gap, threshold, True, "gap_exceeded")
    if held or gap < 0:  # gap < 0: the batch carries messages that were held (they predate it)
        return GapDecision(gap, threshold, True, "after_hold")
    if limits.history_every_batch:
        return GapDecision(gap, threshold, True, "every_batch")
    return GapDecision(gap, threshold, False, "short_gap")


# -- flush, history, sweep ---------------------------------------------------------------------

def _on_flush(
    state: CustomerState, command: ContextCommand, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    batch_id = command["batch_id"]
    if not batch_id:
        return state, Effects(log=[("flush_ignored", {"reason": "no_batch_id"})])
    if batch_id in state["flushed_batch_ids"]:
        return state, Effects(duplicate=True, log=[("duplicate_ignored", {
            "kind": "flush", "batch_id": batch_id})])
    flushing, batch = state["flushing_batch"], state["open_batch"]
    if flushing is not None and flushing["batch_id"] == batch_id:
        if not _fetch_timed_out(flushing, now, limits):
            return state, Effects(log=[("flush_ignored", {"batch_id": batch_id, "reason": "fetch_running"})])
        state = copy_plain(state)
        flushing = state["flushing_batch"]
        assert flushing is not None
        effects = Effects(metrics=[("history_fetch_failures_total", {"reason": "timeout"}, 1)])
        if flushing["fetch_attempts"] < MAX_FETCH_ATTEMPTS:
            flushing["fetch_started_at"] = now
            flushing["fetch_attempts"] += 1
            effects.fetch = _fetch_order(state, flushing, now, limits)
            effects.log.append(("history_fetch_retry", {
                "batch_id": batch_id, "attempt": flushing["fetch_attempts"]}))
            return state, effects
        state, effects = _finalize(state, "flushing_batch", None, "timeout", now, limits, effects)
        return _decide_waiting_flushes(state, limits, effects)
    seen = command.get("batch_messages")
    if (seen is None and batch is None and flushing is None and state["held_messages"]
            and batch_id == _next_batch_id(state)):
        return _end_hold(state, batch_id, now, limits)  # a command from before the hold end's counts
    counts = _seen_counts(command)
    if seen == 0:
        return _on_hold_end_flush(state, batch_id, now, limits, counts)
    to_come = _batch_number(state, batch_id) > state["batch_seq"]
    if seen is not None and to_come:
        return _wait_early(state, batch_id, seen, counts, now)
    if seen is None and to_come and any(f["batch_id"] == batch_id for f in state.get("early_flushes") or []):
        return _keep_fetch_command(state, command)  # the first run's retry of the batch's fetch
    if batch is None or batch["batch_id"] != batch_id:
        return state, Effects(log=[("flush_ignored", {"batch_id": batch_id, "reason": "unknown_batch"})])
    waiting = batch.get("waiting_flushes") or []
    if waiting and seen is None:  # the first run's retry of the fetch of a batch still waiting here
        return _keep_fetch_command(state, command)
    if flushing is not None and seen is None:
        return state, Effects(log=[("flush_ignored", {
            "batch_id": batch_id, "reason": "earlier_batch_flushing"})])
    wanted = {"batch_messages": seen, "issued_at": now, **_count_fields(counts)}
    if seen is not None and (waiting or flushing is not None or not _handled_all(state, batch, wanted)):
        # A replay in another interleaving: messages (or agent-activity events, or replies) the
        # timer saw are not handled yet. The flush waits for them and is decided, at its own time,
        # when the last of them comes (on_inbound, on_agent_activity, on_reply); one behind an
        # earlier waiting flush waits its turn (log order decides, whatever it counts: a new timer
        # reading the replayed, shorter batch sends a smaller count). One read while an earlier
        # batch fetches its history again (its replayed result came before its flush) waits for it.
        queued = _queued(waiting, wanted)
        if len(queued) > MAX_WAITING_FLUSHES:
            return state, _flush_ignored(batch_id, "too_many_waiting")
        state = _with_waiting_flushes(state, queued)
        effects = Effects(log=[("flush_waiting", {"batch_id": batch_id, "batch_messages": seen,
                                                  "handled": len(batch["messages"])})])
        return _decide_waiting_flushes(state, limits, effects)  # unless it never can be (liveness)
    return _decide_flush(state, batch_id, seen, now, limits, counts)


Counts = tuple[int | None, int | None, int | None, int | None]
"""(agent-activity events, replies, replies when the batch opened, inbound webhooks) a flush says
the timer's state had handled."""
COUNT_FIELDS = ("agent_events", "replies", "opened_replies", "inbound_messages")


def _seen_counts(flush: Any) -> Counts:
    """The counts of a flush command or of a waiting flush (None: not counted, older commands)."""
    agent_events, replies, opened_replies, inbound = (flush.get(name) for name in COUNT_FIELDS)
    return agent_events, replies, opened_replies, inbound


def _count_fields(counts: Counts) -> dict[str, int | None]:
    return dict(zip(COUNT_FIELDS, counts, strict=True))


def _handled_all(state: CustomerState, batch: Batch, flush: Any) -> bool:
    """Whether every message, agent-activity event and reply the flush counted is handled."""
    return len(batch["messages"]) >= flush["batch_messages"] and _counted_all(state, flush)


def _counted_all(state: CustomerState, flush: Any) -> bool:
    """Whether every inbound webhook, agent-activity event and reply the flush counted is handled."""
    agent_events, replies, _, inbound = _seen_counts(flush)
    return ((inbound is None or state.get("inbound_handled", 0) >= inbound)
            and (agent_events is None or state.get("agent_events_handled", 0) >= agent_events)
            and (replies is None or state.get("replies_handled", 0) >= replies))


def _reply_time_after(state: CustomerState, replies: int, otherwise: datetime | None) -> datetime | None:
    """`last_reply_at` as it was once the customer's first `replies` replies were handled
    (`otherwise` when the reply log no longer tells)."""
    if replies == state.get("replies_handled", 0):
        return state["last_reply_at"]
    following = next((r for r in state.get("reply_log", []) if r["seq"] == replies + 1), None)
    return following.get("last_reply_before") if following is not None else otherwise


def _log_inbound(state: CustomerState, ids: list[str]) -> None:
    """Counts an inbound webhook (once, also when its message was recovered first)."""
    state["inbound_handled"] = state.get("inbound_handled", 0) + 1
    entry: InboundLogEntry = {"seq": state["inbound_handled"], "ids": ids}
    state["inbound_log"] = [*state.get("inbound_log", []), entry][-INBOUND_LOG:]


def _take_back(state: CustomerState, recovered_ids: set[str]) -> list[str]:
    """Removes from the open batch the webhooks of messages a flushed batch just recovered from
    history (handled after its timer: a replay may handle them before the flush). A batch they
    opened alone is un-opened; one they opened with others starts at the first other message —
    the batch the first run opened when they had come after. Returns the event ids removed."""
    batch = state["open_batch"]
    if batch is None:
        return []
    kept = [m for m in batch["messages"] if not recovered_ids.intersection(message_ids(m))]
    if len(kept) == len(batch["messages"]):
        return []
    removed = [m["event_id"] for m in batch["messages"] if m not in kept]
    if not kept:
        state["open_batch"] = None
        state["batch_seq"] -= 1
        back = [cast(EarlyFlush, {"batch_id": batch["batch_id"], "batch_messages": w["batch_messages"],
                                  "issued_at": w["issued_at"], **_count_fields(_seen_counts(w))})
                for w in batch.get("waiting_flushes") or []]
        state["early_flushes"] = back + (state.get("early_flushes") or [])
        return removed
    first = batch["messages"].index(kept[0])
    for message in batch["messages"][:first]:  # what the first run knew when `kept[0]` opened it
        batch["prior_last_inbound_at"] = _later(batch["prior_last_inbound_at"], message["provider_time"])
    batch["messages"] = kept
    batch["opened_at"] = kept[0]["received_at"]
    batch["last_message_at"] = max(m["received_at"] for m in kept)
    return removed


def _log_agent_event(state: CustomerState) -> AgentLogEntry:
    """Counts an accepted agent-activity event; its log entry (item ids filled in if it records one)."""
    if state.get("agent_events_handled", 0) == 0:  # a state from before the log: what it knew stays
        state["last_human_base"] = _later(state.get("last_human_base"), state["last_human_at"])
    state["agent_events_handled"] = state.get("agent_events_handled", 0) + 1
    entry: AgentLogEntry = {"seq": state["agent_events_handled"], "item_ids": [], "human_at": None,
                            "forgotten_by": None}
    log = [*state.get("agent_log", []), entry]
    for dropped in log[:-AGENT_MESSAGES]:  # what the log forgets still counts for the hold
        if dropped["forgotten_by"] is None:
            state["last_human_base"] = _later(state.get("last_human_base"), dropped["human_at"])
    state["agent_log"] = log[-AGENT_MESSAGES:]
    return entry


def _decide_flush(
    state: CustomerState, batch_id: str, seen: int | None, now: datetime, limits: Limits,
    counts: Counts = (None, None, None, None),
) -> tuple[CustomerState, Effects]:
    """Flushes the open batch's first `seen` messages if they are due at `now` (the flush's time);
    its human-agent block and hold will see the agent-activity events and replies of `counts`."""
    batch = state["open_batch"]
    assert batch is not None and batch["batch_id"] == batch_id
    if not _is_due(_seen_part(batch, seen), now, limits):  # judged on what the timer saw
        return state, Effects(log=[("flush_ignored", {"batch_id": batch_id, "reason": "not_due"})])
    state = copy_plain(state)
    batch = state["open_batch"]
    assert batch is not None
    later = _take_unseen(batch, seen)
    batch["waiting_flushes"] = []  # decided: any later one names a flushed batch
    batch["seen_agent_events"], batch["seen_replies"], opened_replies, batch["seen_inbound"] = counts
    if opened_replies is not None:  # the cutoff the first run's batch captured when it opened
        batch["prior_last_reply_at"] = _reply_time_after(state, opened_replies, batch["prior_last_reply_at"])
    state, effects = _start_flush(state, batch, now, limits, Effects())
    if later:
        _reopen(state, batch, later)
    state, effects = _handle_kept_fetch_commands(state, batch_id, limits, effects)
    if later:
        return _decide_waiting_flushes(state, limits, effects)
    return state, effects


def _batch_number(state: CustomerState, batch_id: str) -> int:
    """The sequence number in a batch id of this customer (0 for an id of another form)."""
    head, _, number = batch_id.rpartition(":")
    return int(number) if head == state["customer_key"] and number.isdigit() else 0


def _queued(entries: list[Any], entry: dict[str, Any]) -> list[Any]:
    """`entries` with `entry` at the end; of its batch and count, only the first and the latest are
    kept (MAX_WAITING_FLUSHES)."""
    same = [e for e in entries if e.get("batch_id") == entry.get("batch_id")
            and e["batch_messages"] == entry["batch_messages"]]
    if len(same) >= 2:
        entries = [e for e in entries if e is not same[-1]]
    return [*entries, entry]


def _with_waiting_flushes(state: CustomerState, queued: list[Any]) -> CustomerState:
    """A copy of `state` whose open batch waits with the flushes `queued`."""
    state = copy_plain(state)
    batch = state["open_batch"]
    assert batch is not None
    batch["waiting_flushes"] = queued
    return state


def _wait_early(
    state: CustomerState, batch_id: str, seen: int, counts: Counts, now: datetime
) -> tuple[CustomerState, Effects]:
    """A flush of a batch the replay has not opened yet: kept until it opens (`_open_batch`), then
    decided like any flush waiting for its messages — never dropped, or the batch would be cut
    where a later timer's flush says, not where the one already emitted was."""
    early = state.get("early_flushes") or []
    queued = _queued(early, {"batch_id": batch_id, "batch_messages": seen, "issued_at": now,
                             **_count_fields(counts)})
    if (sum(1 for f in queued if f["batch_id"] == batch_id) > MAX_WAITING_FLUSHES
            or len(queued) > MAX_EARLY_FLUSHES):
        return state, _flush_ignored(batch_id, "too_many_waiting")
    state = copy_plain(state)
    state["early_flushes"] = queued
    return state, Effects(log=[("flush_waiting", {"batch_id": batch_id, "batch_messages": seen,
                                                  "handled": 0})])


def _on_hold_end_flush(
    state: CustomerState, batch_id: str, now: datetime, limits: Limits, counts: Counts
) -> tuple[CustomerState, Effects]:
    """The timer's flush of a hold's end, with its counts (`batch_messages` 0: the timer saw no open
    batch). It queues like any counted flush, in log order — in the open batch when messages handled
    after the timer opened it, else among the flushes of batches to come — and is decided once the
    replay has handled what the timer counted and every earlier batch is decided."""
    batch = state["open_batch"]
    if batch is not None and batch["batch_id"] == batch_id:
        queued = _queued(batch.get("waiting_flushes") or [],
                         {"batch_messages": 0, "issued_at": now, **_count_fields(counts)})
        if len(queued) > MAX_WAITING_FLUSHES:
            return state, _flush_ignored(batch_id, "too_many_waiting")
        state = _with_waiting_flushes(state, queued)
    elif _batch_number(state, batch_id) > state["batch_seq"]:
        state, effects = _wait_early(state, batch_id, 0, counts, now)
        if effects.log and effects.log[0][0] == "flush_ignored":
            return state, effects  # beyond the bound
    else:
        return state, _flush_ignored(batch_id, "unknown_batch")
    return _decide_waiting_flushes(state, limits, Effects(log=[("flush_waiting", {
        "batch_id": batch_id, "batch_messages": 0, "handled": 0})]))


def _hold_end_due(state: CustomerState) -> EarlyFlush | None:
    """The hold end's flush of the next batch whose turn it is (no batch open or flushing, it is the
    first of that batch's flushes, and what its timer counted is handled), if any."""
    if state["open_batch"] is not None or state["flushing_batch"] is not None:
        return None
    next_id = _next_batch_id(state)
    first = next((f for f in state.get("early_flushes") or [] if f["batch_id"] == next_id), None)
    if first is None or first["batch_messages"] != 0 or not _counted_all(state, first):
        return None
    return first


def _end_hold_counted(
    state: CustomerState, batch_id: str, now: datetime, limits: Limits, counts: Counts
) -> tuple[CustomerState, Effects]:
    """A counted hold end (state already copied), decided as at its timer's point: the hold and the
    held messages are judged on the agent events and replies it counted, and a batch opened by
    messages handled after the timer follows the held messages' batch (it opened after it in the
    first run, or the first run moved it there as here)."""
    later = state["open_batch"]
    if later is None:
        return _end_hold(state, batch_id, now, limits, counts)
    # un-opened while the held messages' batch is decided, which captures the priors it had then
    state["open_batch"] = None
    state["batch_seq"] -= 1
    last_inbound = state["last_inbound_at"]
    state["last_inbound_at"] = later["prior_last_inbound_at"]
    state, effects = _end_hold(state, batch_id, now, limits, counts)
    state["last_inbound_at"] = last_inbound
    state["batch_seq"] += 1
    if state["batch_seq"] == _batch_number(state, later["batch_id"]):  # the hold's end opened nothing
        state["open_batch"] = later
        return state, effects
    # it follows the held messages' batch; its own flushes came after this one in the log
    later["batch_id"] = f"{state['customer_key']}:{state['batch_seq']}"
    early = state.get("early_flushes") or []
    later["waiting_flushes"] = [cast(WaitingFlush, {
        "batch_messages": f["batch_messages"], "issued_at": f["issued_at"], **_count_fields(_seen_counts(f))})
        for f in early if f["batch_id"] == later["batch_id"]]
    state["early_flushes"] = [f for f in early if _batch_number(state, f["batch_id"]) > state["batch_seq"]]
    state["open_batch"] = later
    effects.log.append(("batch_moved", {"from": batch_id, "to": later["batch_id"]}))
    return state, effects


def _end_hold(
    state: CustomerState, batch_id: str, now: datetime, limits: Limits,
    counts: Counts = (None, None, None, None),
) -> tuple[CustomerState, Effects]:
    """The hold ended (timer flush with the next batch id): nobody is left waiting.

    Held messages a human wrote after, or older than WhatsApp's 24 h session, become context (the
    next request gives them in the human-agent block, in time order); the others are answered now,
    as a batch of their own (`batch_id` is the id `_open_batch` gives it). With the timer's
    `counts`, the hold and the held messages are judged on the agent events and replies it had
    handled, and its batch sees exactly those (as a counted flush's).
    """
    agent_events, replies, opened_replies, inbound = counts
    last_human_now = state["last_human_at"]
    judged = state.copy()  # shallow: only top-level keys are replaced
    if agent_events is not None:
        judged["last_human_at"] = _last_human_seen(state, agent_events, replies)
    if _hold_reason(judged, now, limits) is not None:
        return state, Effects(log=[("flush_ignored", {"batch_id": batch_id, "reason": "still_held"})])
    state = copy_plain(state)
    effects = Effects()
    state["last_human_at"] = judged["last_human_at"]
    to_answer, as_context = _settle_held(state, state["held_messages"], now)
    state["last_human_at"] = last_human_now
    state["held_messages"] = []
    effects.log.append(("hold_ended", {"batch_id": batch_id, "answered": len(to_answer),
                                       "as_context": len(as_context)}))
    if not to_answer:
        return state, effects
    batch = _open_batch(state, now)
    batch["messages"] = to_answer
    batch["waiting_flushes"] = []  # this hold end's flush again: decided now
    if agent_events is not None:  # its block and hold see what the timer's state had handled
        batch["seen_agent_events"], batch["seen_replies"] = agent_events, replies
        batch["seen_inbound"] = inbound
        if opened_replies is not None:
            cutoff = _reply_time_after(state, opened_replies, batch["prior_last_reply_at"])
            batch["prior_last_reply_at"] = cutoff
    effects.log.append(("batch_opened", _batch_fields(batch)))
    state, effects = _start_flush(state, batch, now, limits, effects)
    return _handle_kept_fetch_commands(state, batch["batch_id"], limits, effects)


def _settle_held(
    state: CustomerState, held: list[InboundMessage], now: datetime
) -> tuple[list[InboundMessage], list[MissedItem]]:
    """Splits held messages once their hold is over into (to answer, context).

    Context: a human agent wrote after it (the human handled it), or it is older than WhatsApp's
    24 h session (no question to answer any more). Context items join `agent_messages` (role
    customer), so the selection gives them to the model in time order with the agents' messages.
    "After" is judged at the resolution the times have (`surely_after`): a human message in the
    same whole second as the customer's may have come first, and then the bot answers — nobody is
    left waiting on a guess.
    """
    session_start = now - timedelta(seconds=WHATSAPP_SESSION_SECONDS)
    last_human = state["last_human_at"]
    to_answer: list[InboundMessage] = []
    as_context: list[MissedItem] = []
    for message in held:
        at = message["provider_time"]
        if at <= session_start or (last_human is not None and surely_after(last_human, at)):
            as_context.append(_context_item(message))
        else:
            to_answer.append(message)
    if as_context:
        merged = sorted([*state["agent_messages"], *as_context], key=lambda m: m["at"])
        state["agent_messages"] = merged[-AGENT_MESSAGES:]
    return to_answer, as_context


def _context_item(message: InboundMessage) -> MissedItem:
    text = (message["text"] or message["caption"] or "").strip() or f"[{message['message_type']}]"
    return {"at": message["provider_time"], "role": "customer", "agent_name": None, "text": text,
            "message_type": message["message_type"], "source": "realtime",
            "item_ids": message_ids(message)}


def _start_flush(
    state: CustomerState, batch: Batch, now: datetime, limits: Limits, effects: Effects
) -> tuple[CustomerState, Effects]:
    """The open batch (state already copied) is due: order its history fetch, or finalize it."""
    batch_id = batch["batch_id"]
    gap = gap_decision(batch, state["customer_key"], limits, bool(state["held_messages"]))
    effects.metrics.append(("gap_checks_total", {"outcome": gap.outcome}, 1))
    if not gap.check:
        return _finalize(state, "open_batch", None, None, now, limits, effects)
    batch["fetch_started_at"] = now
    batch["fetch_attempts"] = 1
    state["flushing_batch"], state["open_batch"] = batch, None
    effects.fetch = _fetch_order(state, batch, now, limits)
    effects.log.append(("history_fetch_ordered", {
        "batch_id": batch_id, "gap_seconds": gap.gap_seconds, "threshold_seconds": gap.threshold_seconds,
        "outcome": gap.outcome, "stop_before": effects.fetch.stop_before}))
    return state, effects


def _on_history(
    state: CustomerState, command: ContextCommand, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    batch_id = command["batch_id"]
    flushing = state["flushing_batch"]
    if flushing is None or flushing["batch_id"] != batch_id:
        if batch_id in state["flushed_batch_ids"]:
            return state, Effects(duplicate=True, log=[("duplicate_ignored", {
                "kind": "history", "batch_id": batch_id})])
        open_batch = state["open_batch"]
        if batch_id and ((open_batch is not None and open_batch["batch_id"] == batch_id)
                or _batch_number(state, batch_id) > state["batch_seq"]):
            return _keep_fetch_command(state, command)  # a replay: its flush is not decided yet
        return state, Effects(log=[("history_ignored", {"batch_id": batch_id, "reason": "stale"})])
    error = command["history_error"]
    history: list[HistoryItem] | None = list(command["history"])
    if error and not history:
        history = None
    state, effects = _finalize(copy_plain(state), "flushing_batch", history, error, now, limits, Effects())
    return _decide_waiting_flushes(state, limits, effects)  # flushes that waited for this batch


def _keep_fetch_command(state: CustomerState, command: ContextCommand) -> tuple[CustomerState, Effects]:
    """A history result (or the timer's retry of a fetch) of a batch this replay has not started
    flushing yet: its flush waits for messages or events it counted. In the first run the batch
    was flushing when this came; it is handled when the batch starts flushing here
    (`_handle_kept_fetch_commands`), so the batch is decided on the first run's result, at its
    time — not on a new fetch, later, with what the history holds then."""
    batch_id = command["batch_id"]
    kept = state.get("early_fetch_commands") or []
    if any(c["batch_id"] == batch_id and c["kind"] == "history_fetched" for c in kept):
        # its first result decides the batch (or a timeout before it): nothing after it matters
        return state, Effects(log=[("fetch_command_ignored", {"batch_id": batch_id,
                                                              "reason": "after_kept_result"})])
    if len(kept) >= MAX_EARLY_FETCH_COMMANDS:
        return state, Effects(log=[("fetch_command_ignored", {"batch_id": batch_id,
                                                              "reason": "too_many_kept"})])
    state = copy_plain(state)
    state["early_fetch_commands"] = [*kept, copy_plain(command)]
    return state, Effects(log=[("fetch_command_kept", {"batch_id": batch_id, "kind": command["kind"]})])


def _handle_kept_fetch_commands(
    state: CustomerState, batch_id: str, limits: Limits, effects: Effects
) -> tuple[CustomerState, Effects]:
    """The batch (state already copied) has just been decided: handles, in log order and each at its
    own time, the results and retries of its fetch a replay read before (`_keep_fetch_command`).
    The fetch `_start_flush` ordered is dropped when they decide the batch."""
    kept = state.get("early_fetch_commands") or []
    mine = [c for c in kept if c["batch_id"] == batch_id]
    if not mine:
        return state, effects
    state["early_fetch_commands"] = [c for c in kept if c["batch_id"] != batch_id]
    flushing = state["flushing_batch"]
    if flushing is None or flushing["batch_id"] != batch_id:
        return state, effects  # decided without a fetch (no check ran): nothing to handle
    effects.log.append(("kept_fetch_commands_handled", {"batch_id": batch_id, "commands": len(mine)}))
    for command in mine:
        state, more = on_command(state, command, command["issued_at"], limits)
        _merge_effects(effects, more)
    flushing = state["flushing_batch"]
    if effects.fetch is not None and (flushing is None or flushing["batch_id"] != effects.fetch.batch_id):
        effects.fetch = None  # the batch it was for is decided
    return state, effects


def _on_reconcile(state: CustomerState, now: datetime) -> tuple[CustomerState, Effects]:
    """A sweep asks for this customer's history (the shell may also fetch directly)."""
    if not providers.has_history(state["channel"]) or not state["provider_id"]:
        return state, Effects(log=[("reconcile_skipped", {"reason": "not_wati"})])
    order = HistoryFetchOrder(state["customer_key"], state["provider_id"], RECONCILE_FETCH_ID,
                              _sweep_lower_bound(state, now))
    return state, Effects(fetch=order, log=[("reconcile_fetch_ordered", {"stop_before": order.stop_before})])


def _sweep_lower_bound(state: CustomerState, now: datetime) -> datetime:
    session_start = now - timedelta(seconds=WHATSAPP_SESSION_SECONDS)
    last_reply = state["last_reply_at"]
    return session_start if last_reply is None else max(last_reply, session_start)


def _on_sweep_result(
    state: CustomerState, command: ContextCommand, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """Reconciliation: customer messages after the last reply, within 24 h, no webhook handled,
    and no human agent answered (`_human_answered_until`).

    They are not put into a batch here: they go to the inbound topic as `recovered` messages
    (`Effects.recovered_inbound`), and are handled there like webhooks — opening or joining a batch,
    counted in the inbound log a flush's count is judged against — so the customer is answered
    within one sweep. Whether a message's webhook was "seen" depends on where a replay puts this
    command among the inbound events; the inbound topic has one order: of a recovered copy and its
    webhook, the first in it is the message, the other a duplicate, in the first run and in any
    replay (a copy produced again by a replay, or by a repeated sweep before the first is handled,
    comes later: a duplicate). The state is unchanged; only what is recovered is counted as missing.
    """
    if command["history_error"]:
        return state, Effects(log=[("reconcile_failed", {"error": command["history_error"]})])
    lower = _sweep_lower_bound(state, now)
    seen = set(state["recent_event_ids"])
    answered_until = _human_answered_until(state, command["history"], lower)
    found: list[HistoryItem] = []
    for item in command["history"]:
        ids = item["item_ids"]
        at = item["at"]
        if (item["event_type"] != "message" or item["owner"] or at is None or at <= lower or not ids
                or not item["text"].strip() or seen.intersection(ids)
                or (answered_until is not None and at <= answered_until)):
            continue
        found.append(item)
        seen.update(ids)
    if not found:
        return state, Effects(log=[("reconcile_clean", {"items": len(command["history"])})])
    recovered = sorted((_recovered_message(state, item, now) for item in found),
                       key=lambda m: m["provider_time"])
    return state, Effects(recovered_inbound=recovered, metrics=[
        ("webhooks_missing_total", {}, len(recovered)), ("messages_recovered_total", {}, len(recovered))],
        log=[("messages_recovered", {"count": len(recovered), "by": "reconcile",
                                     "event_ids": [m["event_id"] for m in recovered]})])


def _human_answered_until(
    state: CustomerState, history: list[HistoryItem], lower: datetime
) -> datetime | None:
    """The last business-side item after `lower` that is not ours (a human's or a template).

    A customer message before it was handled by that human: like `missed.select_missed`, the sweep
    leaves it as context instead of recovering it for the bot to answer over the agent.
    """
    latest: datetime | None = None
    for item in history:
        at = item["at"]
        if at is None or at <= lower or not item["owner"] or not item["text"].strip():
            continue
        if item["event_type"] == "message" and own_messages.own_reason(
            ids=[*item["item_ids"], item["local_message_id"] or ""], operator_name=item["operator_name"],
            texts=[item["text"]], at=at, own_replies=state["own_replies"],
        ) is not None:
            continue
        if item["event_type"] in ("message", "broadcastMessage"):
            latest = _later(latest, at)
    return latest


# -- finalize: select, hold or route, emit --------------------------------------------------------

def _finalize(
    state: CustomerState,
    slot: str,
    history: list[HistoryItem] | None,
    history_error: str | None,
    now: datetime,
    limits: Limits,
    effects: Effects,
) -> tuple[CustomerState, Effects]:
    """Ends a batch (state already copied): exactly one BatchDecision, and a request unless held."""
    batch: Batch | None = state["open_batch"] if slot == "open_batch" else state["flushing_batch"]
    assert batch is not None
    key = state["customer_key"]
    gap = gap_decision(batch, key, limits, bool(state["held_messages"]))
    lookback_start = now - timedelta(seconds=limits.missed_lookback_seconds)
    cutoff = batch["prior_last_reply_at"]
    held_before = state["held_messages"]
    resume_from = _resume_from(state, cutoff)
    seen_inbound = batch.get("seen_inbound")
    late_inbound = {i for e in state.get("inbound_log", []) if seen_inbound is not None
                    and e["seq"] > seen_inbound for i in e["ids"]}  # webhooks the timer had not seen
    window = WindowStart(cutoff if cutoff is not None else lookback_start, resume_from)
    seen = _seen_view(state, batch, window)
    state["last_human_at"], last_human_now = seen.last_human_at, state["last_human_at"]
    seen_replies = batch.get("seen_replies")
    state["reply_floor"] = (state["last_reply_at"] if seen_replies is None
                            else _reply_time_after(state, seen_replies, state["last_reply_at"]))
    earlier_ids = {i for u in seen.unanswered for i in u["event_ids"]}
    earlier_ids |= {e[len(ANSWERED_KEY):] for e in state["recent_event_ids"] if e.startswith(ANSWERED_KEY)}
    given_ids = {e[len(GIVEN_KEY):] for e in state["recent_event_ids"] if e.startswith(GIVEN_KEY)}

    def select(held: list[InboundMessage]) -> missed.Selection:
        return missed.select_missed(
            history=history,
            realtime=seen.agent_messages(state),
            cutoff=cutoff,
            lookback_start=lookback_start,
            batch_start=batch_start(batch),
            batch_event_ids={i for m in [*held, *batch["messages"]] for i in message_ids(m)},
            earlier_batch_event_ids=earlier_ids,
            given_event_ids=given_ids,
            resume_from=resume_from,
            seen_event_ids=set(state["recent_event_ids"]) - late_inbound,
            own_replies=seen.own_replies,
            now=now,
            max_items=limits.missed_max_items,
        )

    selection = select(held_before)
    human_items = [item for item in selection.items if item["role"] == "agent"
                   and item["agent_name"] != missed.TEMPLATE_AGENT_NAME
                   and not seen.echo_ids.intersection(item["item_ids"])]  # a later reply showed them ours
    humans = [item["at"] for item in human_items]
    for at in humans:
        state["last_human_at"] = _later(state["last_human_at"], at)
    state["last_human_base"] = _later(state.get("last_human_base"), max(  # found in history
        (item["at"] for item in human_items if item["source"] != "realtime"), default=None))
    hold_reason = _hold_reason(state, now, limits)
    if hold_reason is None and held_before:
        # The hold is over: what a human answered meanwhile (or what outlived the 24 h session) is
        # context in the agents' block, in time order; only the rest is answered with the batch.
        held_before, as_context = _settle_held(state, held_before, now)
        if as_context:
            selection = select(held_before)
    state["last_human_at"] = _later(last_human_now, max(humans, default=None))
    recovered = [_recovered_message(state, item, now) for item in selection.recovered]
    for message in recovered:
        _remember(state["recent_event_ids"], message_ids(message), RECENT_EVENT_IDS)
        state["last_inbound_at"] = _later(state["last_inbound_at"], message["provider_time"])

    recovered_ids = [m["event_id"] for m in [*recovered, *batch["messages"]] if m.get("recovered")]
    # held and recovered messages first, by time (the sweep's came through the inbound topic)
    swept = [m for m in batch["messages"] if m.get("recovered")]
    messages = (sorted([*held_before, *recovered, *swept], key=lambda m: m["provider_time"])
                + [m for m in batch["messages"] if not m.get("recovered")])

    if slot == "open_batch":
        state["open_batch"] = None
    else:
        state["flushing_batch"] = None
    _remember(state["flushed_batch_ids"], [batch["batch_id"]], FLUSHED_BATCH_IDS)
    if state.get("early_fetch_commands"):  # decided: what a replay kept for it is moot
        state["early_fetch_commands"] = [c for c in state.get("early_fetch_commands") or []
                                         if c["batch_id"] != batch["batch_id"]]
    taken_back = _take_back(state, {i for m in recovered for i in message_ids(m)} & late_inbound)
    if taken_back:
        effects.log.append(("recovered_webhooks_taken_back", {"batch_id": batch["batch_id"],
                                                              "event_ids": taken_back}))
    expired = _expire_unanswered(state, now)
    channel: Channel = batch["messages"][-1]["channel"]
    provider_id = batch["messages"][-1]["provider_id"]

    if hold_reason is not None:
        routed_to = "held"
        dropped_held = max(0, len(messages) - HELD_MESSAGES)
        state["held_messages"] = messages[dropped_held:]
        message_count = len(batch["messages"]) + len(recovered)
        injected: list[MissedItem] = []
        effects.metrics.append(("batches_held_total", {"reason": hold_reason}, 1))
        if dropped_held:
            overflow = messages[:dropped_held]
            effects.dead_letters += [_held_overflow(key, batch["batch_id"], m, now) for m in overflow]
            effects.metrics.append(("dead_letters_total", {"service": SERVICE, "reason": HELD_OVERFLOW},
                                    dropped_held))
            overflow_excluded: list[ExcludedItem] = [
                {"item_ids": message_ids(m), "reason": HELD_OVERFLOW, "at": m["provider_time"]}
                for m in overflow]
            selection.excluded = [*selection.excluded, *overflow_excluded]
            effects.log.append(("held_messages_dead_lettered", {
                "batch_id": batch["batch_id"], "count": dropped_held,
                "event_ids": [m["event_id"] for m in overflow]}))
    else:
        routed_to = "vision" if _needs_vision(messages, _live(seen.unanswered, now)) else "responder"
        state["held_messages"] = []
        message_count = len(messages)
        injected = selection.items
        request: ResponderRequest = {
            "batch_id": batch["batch_id"],
            "customer_key": key,
            "channel": channel,
            "provider_id": provider_id,
            "messages": messages,
            "prior_last_inbound_at": batch["prior_last_inbound_at"],
            "prior_last_reply_at": cutoff,
            "gap_seconds": gap.gap_seconds,
            "missed_check_ran": gap.check,
            "missed_messages": injected,
            "missed_dropped_oldest": selection.dropped_oldest,
            "images": [],
            "created_at": now,
        }
        if routed_to == "vision":
            effects.vision_requests.append({"request": request})
        else:
            effects.responder_requests.append(request)
        entry: Unanswered = {
            "batch_id": batch["batch_id"], "routed_to": routed_to, "emitted_at": now,
            "event_ids": _unique(i for m in messages for i in message_ids(m)),
        }
        _remember(state["recent_event_ids"],
                  [*_given_keys(injected), WINDOW_KEY + batch_start(batch).isoformat()], RECENT_EVENT_IDS)
        state["unanswered"] = [*state["unanswered"], entry]
        effects.metrics.append(("missed_per_batch", {}, float(len(injected))))
        by_source: dict[str, int] = {}
        for item in injected:
            by_source[item["source"]] = by_source.get(item["source"], 0) + 1
        effects.metrics += [("missed_injected_total", {"source": s}, n) for s, n in sorted(by_source.items())]

    decision: BatchDecision = {
        "batch_id": batch["batch_id"],
        "customer_key": key,
        "channel": channel,
        "decided_at": now,
        "message_count": message_count,
        "prior_last_inbound_at": batch["prior_last_inbound_at"],
        "prior_last_reply_at": cutoff,
        "gap_seconds": gap.gap_seconds,
        "gap_threshold_seconds": gap.threshold_seconds,
        "missed_check_ran": gap.check,
        "cutoff": cutoff if cutoff is not None else lookback_start,
        "sources": selection.sources,
        "injected": injected,
        "excluded": selection.excluded,
        "held": hold_reason is not None,
        "hold_reason": hold_reason,
        "recovered_event_ids": recovered_ids,
        "webhooks_missing": selection.webhooks_missing,
        "history_error": history_error,
        "routed_to": routed_to,
    }
    effects.decisions.append(decision)
    effects.metrics.append(("batches_flushed_total", {"route": routed_to}, 1))
    if selection.webhooks_missing:
        effects.metrics.append(("webhooks_missing_total", {}, selection.webhooks_missing))
    if recovered:
        effects.metrics.append(("messages_recovered_total", {}, len(recovered)))
    excluded_by_reason: dict[str, int] = {}
    for excluded in selection.excluded:
        excluded_by_reason[excluded["reason"]] = excluded_by_reason.get(excluded["reason"], 0) + 1
    effects.log.append(("batch_decided", {
        "batch_id": batch["batch_id"],
        "routed_to": routed_to,
        "messages": message_count,
        "prior_last_inbound_at": batch["prior_last_inbound_at"],
        "prior_last_reply_at": cutoff,
        "gap_seconds": gap.gap_seconds,
        "gap_threshold_seconds": gap.threshold_seconds,
        "gap_outcome": gap.outcome,
        "missed_check_ran": gap.check,
        "window": [decision["cutoff"], batch_start(batch)],
        "sources": selection.sources,
        "injected": len(injected),
        "dropped_oldest": selection.dropped_oldest,
        "excluded": excluded_by_reason,
        "held": hold_reason is not None,
        "hold_reason": hold_reason,
        "recovered_event_ids": recovered_ids,
        "webhooks_missing": selection.webhooks_missing,
        "missing_event_ids": selection.missing_ids,
        "history_error": history_error,
        "unanswered_expired": expired,
    }))
    return state, effects


@dataclass(frozen=True)
class SeenView:
    """What a flushed batch sees of the customer's agent-activity events and replies: those the
    timer's state had handled when it decided the flush (the batch's `seen_agent_events` and
    `seen_replies`). Events handled after it — before the flush in a replay's interleaving, or
    between the timer and the flush in the first run — belong to the next batch: their agent items
    are left out, the echoes a later reply removed are back, its own reply and the unanswered entry
    it removed are as before it. So the human-agent block and the hold are the same in any order."""

    window: WindowStart
    late_item_ids: frozenset[str]
    echoes: tuple[MissedItem, ...]
    echo_ids: frozenset[str]
    own_replies: list[OwnReply]
    unanswered: list[Unanswered]
    last_human_at: datetime | None

    def agent_messages(self, state: CustomerState) -> list[MissedItem]:
        kept = [m for m in state["agent_messages"] if not self.late_item_ids.intersection(m["item_ids"])
                and self.window.maybe_inside(m["at"])]  # pruned or not: outside, so not even listed
        return sorted([*kept, *self.echoes], key=lambda m: m["at"])


@dataclass(frozen=True)
class WindowStart:
    """Where a batch's missed-message window starts, as `missed.select_missed` reads it."""

    lower: datetime  # the cutoff, or the lookback start without one
    resume_from: datetime | None

    def maybe_inside(self, at: datetime) -> bool:
        """False for a real-time item `select_missed` would exclude as `before_cutoff`."""
        return (at > self.lower or possibly_after(at, self.lower)
                or (self.resume_from is not None and at > self.resume_from))


def _seen_view(state: CustomerState, batch: Batch, window: WindowStart) -> SeenView:
    agent_events, replies = batch.get("seen_agent_events"), batch.get("seen_replies")
    late_agent = [e for e in state.get("agent_log", []) if agent_events is not None
                  and e["seq"] > agent_events]
    late_replies = [r for r in state.get("reply_log", []) if replies is not None and r["seq"] > replies]
    late_ids = frozenset(i for e in late_agent for i in e["item_ids"])
    echoes = tuple(m for r in late_replies for m in r["echoes"] if not late_ids.intersection(m["item_ids"]))
    late_sent = {r["batch_id"] for r in late_replies if r["sent"]}
    unanswered = list(state["unanswered"])
    for r in late_replies:
        if r["unanswered"] is not None and all(u["batch_id"] != r["batch_id"] for u in unanswered):
            unanswered.append(r["unanswered"])
    view = SeenView(window, late_ids, echoes, frozenset(i for m in echoes for i in m["item_ids"]),
                    [o for o in state["own_replies"] if o["batch_id"] not in late_sent], unanswered,
                    state["last_human_at"])
    # last_human_at as the timer's state had it: the human-agent messages it had handled, less
    # those a reply it had handled showed were our own sends, and what history found before
    return dataclasses.replace(view, last_human_at=_last_human_seen(state, agent_events, replies))


def _last_human_seen(state: CustomerState, agent_events: int | None, replies: int | None) -> datetime | None:
    """`last_human_at` once the customer's first `agent_events` agent-activity events and `replies`
    replies were handled (None: all): their human-agent messages, less those a reply among them
    showed were our own sends, and what history found before."""
    last_human = state.get("last_human_base")
    if state.get("agent_events_handled", 0) == 0:  # a state from before the agent log
        last_human = _later(last_human, state["last_human_at"])
    for entry in state.get("agent_log", []):
        forgotten = entry["forgotten_by"]
        if ((agent_events is None or entry["seq"] <= agent_events)
                and (forgotten is None or (replies is not None and forgotten > replies))):
            last_human = _later(last_human, entry["human_at"])
    return last_human


def _hold_reason(state: CustomerState, now: datetime, limits: Limits) -> str | None:
    if state["paused"]:
        return "paused"
    hold = limits.policy.hold_seconds(state["customer_key"])
    last_human = state["last_human_at"]
    if hold > 0 and last_human is not None and (now - latest_possible(last_human)).total_seconds() < hold:
        return "human_active"  # a whole-second time may stand for any moment of its second
    return None


def _window_ends(state: CustomerState) -> list[datetime]:
    return [datetime.fromisoformat(e[len(WINDOW_KEY):]) for e in state["recent_event_ids"]
            if e.startswith(WINDOW_KEY)]


def _resume_from(state: CustomerState, cutoff: datetime | None) -> datetime | None:
    """Where the request answered by the reply at `cutoff` stopped looking (its batch start): items
    between it and the cutoff — written while the bot composed that answer — were in no request."""
    if cutoff is None:
        return None
    ends = [end for end in _window_ends(state) if end <= cutoff]
    return max(ends) if ends else None


def _window_lower(state: CustomerState, cutoff: datetime) -> datetime:
    """Where the window of a batch with this cutoff starts: the cutoff, or the earlier `_resume_from`
    (what the request its reply answered never saw). Pruning stops there, or a batch would select
    an item in one interleaving of a replay and find it pruned in another."""
    resume = _resume_from(state, cutoff)
    return cutoff if resume is None else min(cutoff, resume)


def _given_keys(injected: list[MissedItem]) -> list[str]:
    """`given:<id>` of the context items whose time alone could not tell later whether the model
    has them: real-time-only items with a whole-second time (history's times have milliseconds),
    the newest GIVEN_ITEMS — so the dedupe memory is not flooded by a long missed block."""
    coarse = [i for i in injected if i["source"] == "realtime" and is_whole_second(i["at"])]
    return [GIVEN_KEY + pid for item in coarse[-GIVEN_ITEMS:] for pid in item["item_ids"]]


def _held_overflow(
    customer_key: str, batch_id: str, message: InboundMessage, now: datetime
) -> dict[str, Any]:
    """The DeadLetter record of a held message beyond HELD_MESSAGES (the message is its payload)."""
    return {
        "service": SERVICE, "reason": HELD_OVERFLOW,
        "error": f"more than {HELD_MESSAGES} customer messages held; the oldest cannot be kept",
        "source_topic": None, "partition": -1, "offset": -1, "key": customer_key.encode("utf-8"),
        "payload": codec.encode("InboundMessage", dict(message)), "customer_key": customer_key,
        "batch_id": batch_id, "failed_at": now,
    }


def _needs_vision(messages: list[InboundMessage], unanswered: list[Unanswered]) -> bool:
    has_image = any(m["message_type"] in IMAGE_TYPES and m["media_ref"] for m in messages)
    return has_image or any(u["routed_to"] == "vision" for u in unanswered)


def _live(unanswered: list[Unanswered], now: datetime) -> list[Unanswered]:
    """The entries not expired at `now` (UNANSWERED_TTL_SECONDS)."""
    limit = now - timedelta(seconds=UNANSWERED_TTL_SECONDS)
    return [u for u in unanswered if u["emitted_at"] > limit]


def _expire_unanswered(state: CustomerState, now: datetime) -> int:
    kept = _live(state["unanswered"], now)
    expired = len(state["unanswered"]) - len(kept)
    state["unanswered"] = kept
    return expired


# -- small helpers --------------------------------------------------------------------------------

def _next_batch_id(state: CustomerState) -> str:
    """The id the next `_open_batch` gives (a held batch's end is flushed under it)."""
    return f"{state['customer_key']}:{state['batch_seq'] + 1}"


def _open_batch(state: CustomerState, now: datetime) -> Batch:
    """Opens a batch, capturing the prior values BEFORE anything of the new message is applied."""
    state["batch_seq"] += 1
    batch: Batch = {
        "batch_id": f"{state['customer_key']}:{state['batch_seq']}",  # = _next_batch_id before
        "opened_at": now,
        "last_message_at": now,
        "messages": [],
        "prior_last_inbound_at": state["last_inbound_at"],
        "prior_last_reply_at": state["last_reply_at"],
        "fetch_started_at": None,
        "fetch_attempts": 0,
        "waiting_flushes": [],
        "seen_agent_events": None,
        "seen_replies": None,
        "opened_replies": state.get("replies_handled", 0),
        "seen_inbound": None,
    }
    early = state.get("early_flushes") or []
    if early:  # flushes handled before the replay opened this batch wait in it, in log order
        batch["waiting_flushes"] = [cast(WaitingFlush, {
            "batch_messages": f["batch_messages"], "issued_at": f["issued_at"],
            **_count_fields(_seen_counts(f))})
            for f in early if f["batch_id"] == batch["batch_id"]]
        state["early_flushes"] = [f for f in early
                                  if _batch_number(state, f["batch_id"]) > state["batch_seq"]]
    state["open_batch"] = batch
    return batch


def _seen_part(batch: Batch, seen: int | None) -> Batch:
    """The batch as the timer saw it: its first `seen` messages (the batch itself when that is all)."""
    if seen is None or len(batch["messages"]) <= seen:
        return batch
    part = batch.copy()
    part["messages"] = batch["messages"][:seen]
    part["last_message_at"] = max(m["received_at"] for m in part["messages"])
    return part


def _take_unseen(batch: Batch, seen: int | None) -> list[InboundMessage]:
    """Removes (and returns) the batch's messages after the first `seen`: they were handled after
    the timer decided the flush, so they belong to the next batch, however the replay interleaves."""
    part = _seen_part(batch, seen)
    if part is batch:
        return []
    later = batch["messages"][len(part["messages"]):]
    batch["messages"], batch["last_message_at"] = part["messages"], part["last_message_at"]
    return later


def _reopen(state: CustomerState, flushed: Batch, later: list[InboundMessage]) -> None:
    """Opens the next batch with `later`, exactly as if they had come after the flush."""
    before = state["last_inbound_at"]
    state["last_inbound_at"] = flushed["prior_last_inbound_at"]
    for message in flushed["messages"]:
        state["last_inbound_at"] = _later(state["last_inbound_at"], message["provider_time"])
    batch = _open_batch(state, later[0]["received_at"])
    state["last_inbound_at"] = before
    batch["messages"] = later
    batch["last_message_at"] = max(m["received_at"] for m in later)


def _batch_fields(batch: Batch) -> dict[str, object]:
    return {"batch_id": batch["batch_id"], "prior_last_inbound_at": batch["prior_last_inbound_at"],
            "prior_last_reply_at": batch["prior_last_reply_at"]}


def _is_due(batch: Batch, now: datetime, limits: Limits) -> bool:
    quiet_end = batch["last_message_at"] + timedelta(seconds=limits.quiet_window_seconds)
    max_end = batch["opened_at"] + timedelta(seconds=limits.max_batch_wait_seconds)
    return now >= quiet_end or now >= max_end


def _fetch_timed_out(batch: Batch, now: datetime, limits: Limits) -> bool:
    started = batch["fetch_started_at"]
    return started is None or now >= started + timedelta(seconds=limits.history_timeout_seconds)


def _fetch_order(state: CustomerState, batch: Batch, now: datetime, limits: Limits) -> HistoryFetchOrder:
    cutoff = batch["prior_last_reply_at"]
    stop_before = cutoff if cutoff is not None else now - timedelta(seconds=limits.missed_lookback_seconds)
    provider_id = state["provider_id"] or batch["messages"][-1]["provider_id"]
    return HistoryFetchOrder(state["customer_key"], provider_id, batch["batch_id"], stop_before)


def _first_channel(customer_key: str) -> Channel:
    """The channel of a customer whose state never recorded one: its key's provider's first."""
    return cast(Channel, providers.by_name(split_key(customer_key)[0]).channels[0])


def _recovered_message(state: CustomerState, item: HistoryItem, now: datetime) -> InboundMessage:
    """A customer message found only in history, as if its webhook had come (flagged `recovered`).

    Its event id is the last of its ids (the wamid when WATI gave one, as ingest does). History
    carries no media reference, so a recovered image reaches the responder as its placeholder text.
    """
    ids = list(item["item_ids"])
    at = item["at"]
    assert at is not None and ids
    provider_id = state["provider_id"] or split_key(state["customer_key"])[1]
    return {
        "event_id": ids[-1],
        "customer_key": state["customer_key"],
        "channel": state["channel"] or _first_channel(state["customer_key"]),
        "provider_id": provider_id,
        "message_type": item["message_type"],
        "text": item["text"],
        "caption": None,
        "media_ref": None,
        "media_mime": None,
        "sender_name": None,
        "provider_message_ids": ids,
        "provider_time": at,
        "received_at": now,
        "recovered": True,
        "username": None,
    }


def _normalised_message(message: InboundMessage) -> InboundMessage:
    """A copy with the optional fields present, so the state always matches the Avro schema."""
    copied = copy_plain(message)
    copied.setdefault("recovered", False)
    copied.setdefault("username", None)
    return copied


def _ignored_activity_reason(
    state: CustomerState, activity: AgentActivity, match_ids: set[str]
) -> str | None:
    """Why a business-side send is not a human agent's (None: it is, or it is a template)."""
    kind = activity["sender_kind"]
    name = activity["operator_name"]
    if kind == "template":  # a template is context, never a human's nor ours — unless sent by us
        ours = match_ids & own_messages.own_reply_ids(state["own_replies"])
        return "own_id" if ours else None
    reason = own_messages.own_reason(
        ids=match_ids, operator_name=name, texts=[activity["text"]], at=activity["provider_time"],
        own_replies=state["own_replies"], own_send=kind == "own_send")
    if reason is not None:
        return reason
    if kind == "wati_bot":
        return "wati_bot"
    if kind == "unknown" and not (_clean(name) or _clean(activity["operator_email"])):
        return "unknown_sender"
    return None


def _forget_own_echoes(state: CustomerState, reply: OwnReply) -> list[MissedItem]:
    """Removes real-time "agent" items that this reply shows were our own send (race with the echo)."""
    ids = set(reply["provider_message_ids"])
    kept: list[MissedItem] = []
    removed: list[MissedItem] = []
    for item in state["agent_messages"]:
        ours = item["role"] == "agent" and (bool(ids.intersection(item["item_ids"])) or (
            item["agent_name"] != missed.TEMPLATE_AGENT_NAME
            and own_messages.own_reason(ids=item["item_ids"], operator_name=item["agent_name"],
                                        texts=[item["text"]], at=item["at"], own_replies=[reply])
            is not None
        ))
        (removed if ours else kept).append(item)
    if removed:
        state["agent_messages"] = kept
        if state["last_human_at"] is not None and any(r["at"] == state["last_human_at"] for r in removed):
            humans = [m["at"] for m in kept
                      if m["role"] == "agent" and m["agent_name"] != missed.TEMPLATE_AGENT_NAME]
            state["last_human_at"] = max(humans) if humans else None
    return removed


def _prune_agent_messages(state: CustomerState, now: datetime, limits: Limits) -> int:
    """Drops real-time agent items at or before the last reply — but never what a pending batch
    (open or flushing, whose cutoff was captured earlier) still needs, nor what came after
    `reply_floor`: a replay may open the next batch after this reply although the first run opened
    it before, and its flush then gives it the older cutoff of the first run (never older than the
    floor: a batch opens after the previous one was decided)."""
    horizon, floor = state["last_reply_at"], state.get("reply_floor")
    if horizon is None or floor is None:
        return 0
    horizon = min(horizon, _window_lower(state, floor))
    ends = _window_ends(state)
    if ends:  # what came after the last request's window is in no request yet: keep it
        horizon = min(horizon, max(ends))
    for batch in (state["open_batch"], state["flushing_batch"]):
        if batch is None:
            continue
        needed = batch["prior_last_reply_at"]
        if needed is None:
            needed = now - timedelta(seconds=limits.missed_lookback_seconds)
        horizon = min(horizon, _window_lower(state, needed))
    kept = [m for m in state["agent_messages"] if possibly_after(m["at"], horizon)]  # coarse: keep
    pruned = len(state["agent_messages"]) - len(kept)
    state["agent_messages"] = kept
    return pruned


def _remember(memory: list[str], ids: Iterable[str], limit: int) -> None:
    """Appends ids not yet remembered; forgets the oldest beyond `limit` (FIFO)."""
    present = set(memory)
    for i in ids:
        if i and i not in present:
            memory.append(i)
            present.add(i)
    if len(memory) > limit:
        del memory[: len(memory) - limit]


def _unique(values: Iterable[str]) -> list[str]:
    return [v for v in dict.fromkeys(values) if v]


def _later(current: datetime | None, candidate: datetime | None) -> datetime | None:
    if current is None:
        return candidate
    if candidate is None:
        return current
    return max(current, candidate)


def _clean(value: str | None) -> str | None:
    cleaned = " ".join(value.split()) if value else ""
    return cleaned or None
