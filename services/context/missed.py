"""The exact missed-message context of one batch: what customer and human agents said since the
bot's last reply and before the batch, from WATI's history and from real-time agent events.

Pure: no Kafka, no HTTP, no clock (every time is passed in). The old system's bugs 3-5
(docs/old-system.md) are ruled out here: items are kept by the WINDOW (never "the last N"), sorted
by PARSED time, the cutoff is the bot's last reply, and our own messages are never "missed".

Decisions (issue 3 point 5, issue 9 points 2 and 4):
- Window: strictly after `cutoff` (the batch's prior `last_reply_at`; without one, strictly after
  `lookback_start`) and strictly before `batch_start` (the earliest provider time of the batch).
  Equal times are outside on both ends — at the resolution each time really has: a real-time-only
  item's whole-second time (WATI's webhook `timestamp`) stands for its whole second, so an agent
  message written in the second of our reply, just after it, is inside (`timeparse.
  possibly_after`). Whether the model already has such an item is told by ids, not by time: ids in
  `given_event_ids` (context given to an earlier request) are then `in_earlier_batch`.
  `resume_from`: the previous request's window ended at its batch start, and the bot replied later;
  what was written in between (an agent answering while the bot composed its reply, a customer
  message WATI never delivered) was in no request, so the window reaches back to it — our reply and
  that batch's messages are still excluded, by the rules below.
- Roles: customer messages (owner false) -> `customer`; business-side messages of a human or of an
  operator we cannot name -> `agent` (agent_name = operator name, or None); broadcast/template
  items -> `agent` with agent_name `"template"` (the customer saw them: a promotion or a reminder
  the bot should not contradict); ticket items (assignment/status events such as "Chat is now
  assigned to agent@x.com") -> `event`: they tell the model that a human took over or closed the
  chat, which explains the agents' messages around them. Unknown event types -> excluded
  `unsupported` (visible in the audit instead of silently injected or silently lost).
- Our own messages: the one rule of services/common/own_messages.py (also used by ingest and the
  state machine): by id -> `own_id`; by operator name (`API Token ...`, and WATI's `Bot`; for
  `message` items only - a broadcast is never ours) -> `own_operator`; by text (normalised: NFKC,
  case-fold, no punctuation; equal, a part of a split reply, or nearly identical; a short text only
  close in time) -> `own_text` — but never over a human: an item with a human operator name whose
  ids can be told apart from our reply's is the human's, even when the agent pasted our answer.
- Batch: items whose ids are in the current request (`batch_event_ids`, incl. held messages) ->
  `in_batch`; ids of an earlier emitted batch (still unanswered, or answered: the bot has them in
  its conversation) -> `in_earlier_batch`.
- Order of the reasons (the first that applies is reported): `in_batch` (before the window: WATI's
  whole-second `timestamp` can put a batch message's copy just before the batch start), then the
  window (`no_time`, `before_cutoff`, `not_before_batch`: anything outside is reported as such, our
  old replies included), then `own_id`, `in_earlier_batch`, `own_operator`, `own_text`.
- Merge of the two sources: items sharing any id (ids + localMessageId) are one item; a real-time
  agent item and a history agent item with the same normalised text within
  TEXT_MERGE_TOLERANCE_SECONDS (120 s: WATI's `created` and the webhook's `timestamp` differ by the
  send latency and by the truncation to seconds) are one item. A merged item has source `both`,
  the history's time and text (millisecond `created`) and the real-time operator name (the
  webhook names the SENDER). The same id twice in history (overlapping pages while new messages
  arrive) -> `duplicate`. Two different-id items of the same source are never merged by text:
  a customer may really write "ok" twice.
- Time: an item without a parsable time -> `no_time` (never guessed, never "Unknown time").
- Order and cap: ascending by parsed time, ties in input order (real-time items first, then history
  in page order). When there are more than
  `max_items` (> 0), the OLDEST are dropped (`dropped_oldest`, also listed as excluded) - the
  newest context is the one that matters, and the responder's block says that older ones exist.
- Recovery: a customer message in the window whose ids were never seen as an inbound event (and
  that is not in this or an earlier batch) is a webhook WATI never delivered: counted in
  `webhooks_missing`; within SESSION_SECONDS of `now` (WhatsApp's 24 h session) and when no human
  agent (or template) wrote after it, it is returned in `recovered` (the state machine answers it as
  part of the batch). Older, or answered by a human (typical: the chat was assigned to an agent, so
  WATI sent the bot nothing), it stays a missed item: the human handled it, the bot must know it.
  Items without any id cannot be told apart from delivered ones and are never counted or
  recovered. Customer messages AFTER the batch start are not recovered here: their webhook may be
  in flight; the next fetch or the reconciliation sweep sees them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from services.common.own_messages import (
    is_wati_bot,
    matches_own_text,
    normalise_text,
    own_reason,
    own_reply_ids,
)
from services.common.records import ExcludedItem, HistoryItem, ItemSource, MissedItem, OwnReply, Role
from services.common.timeparse import is_whole_second, possibly_after

__all__ = ["is_wati_bot", "matches_own_text", "normalise_text", "own_reply_ids", "select_missed"]

TEXT_MERGE_TOLERANCE_SECONDS = 120.0
SESSION_SECONDS = 24 * 3600.0
TEMPLATE_AGENT_NAME = "template"

# Exclusion reasons (the audit's vocabulary).
IN_BATCH = "in_batch"
OWN_ID = "own_id"
IN_EARLIER_BATCH = "in_earlier_batch"
NO_TIME = "no_time"
BEFORE_CUTOFF = "before_cutoff"
NOT_BEFORE_BATCH = "not_before_batch"
OWN_OPERATOR = "own_operator"
OWN_TEXT = "own_text"
DUPLICATE = "duplicate"
EMPTY = "empty"
UNSUPPORTED = "unsupported"
DROPPED_OLDEST = "dropped_oldest"

_MESSAGE, _BROADCAST, _TICKET = "message", "broadcastMessage", "ticket"
_SPACES = re.compile(r"\s+")


@dataclass
class Selection:
    """The result of `select_missed`: what to inject, what was left out and why."""

    items: list[MissedItem]
    excluded: list[ExcludedItem]
    dropped_oldest: int
    recovered: list[HistoryItem]
    webhooks_missing: int
    sources: list[str]
    missing_ids: list[str] = field(default_factory=list)  # event ids of every missing webhook


@dataclass
class _Candidate:
    source: Literal["history", "realtime"]
    ids: list[str]  # every id incl. localMessageId, in a stable order
    at: datetime | None
    role: Role | None  # None: unsupported event type
    agent_name: str | None
    text: str
    message_type: str
    history: HistoryItem | None = None


@dataclass
class _Group:
    """One real message, seen in history, in real time, or in both."""

    history: _Candidate | None = None
    realtime: _Candidate | None = None

    def members(self) -> list[_Candidate]:
        return [c for c in (self.history, self.realtime) if c is not None]

    @property
    def ids(self) -> list[str]:
        out: list[str] = []
        for member in self.members():
            out.extend(i for i in member.ids if i not in out)
        return out

    @property
    def at(self) -> datetime | None:
        if self.history is not None and self.history.at is not None:
            return self.history.at
        return self.realtime.at if self.realtime is not None else None

    @property
    def main(self) -> _Candidate:
        main = self.history or self.realtime
        assert main is not None
        return main


def _clean_name(name: str | None) -> str | None:
    cleaned = _SPACES.sub(" ", name).strip() if name else ""
    return cleaned or None


def _from_history(item: HistoryItem) -> _Candidate:
    ids = list(item["item_ids"])
    local = item.get("local_message_id")
    if local and local not in ids:
        ids.append(local)
    role: Role | None
    agent_name: str | None = None
    if item["event_type"] == _MESSAGE:
        role = "agent" if item["owner"] else "customer"
        if item["owner"]:
            agent_name = _clean_name(item["operator_name"])
    elif item["event_type"] == _BROADCAST:
        role, agent_name = "agent", TEMPLATE_AGENT_NAME
    elif item["event_type"] == _TICKET:
        role = "event"
    else:
        role = None
    return _Candidate("history", ids, item["at"], role, agent_name, item["text"], item["message_type"],
                      item)


def _from_realtime(item: MissedItem) -> _Candidate:
    return _Candidate("realtime", list(dict.fromkeys(item["item_ids"])), item["at"], item["role"],
                      item["agent_name"], item["text"], item["message_type"])


_OWN_REASONS = {"own_operator": OWN_OPERATOR, "wati_bot": OWN_OPERATOR, "own_text": OWN_TEXT}


def _own_reason(group: _Group, at: datetime | None, own_replies: list[OwnReply]) -> str | None:
    """The shared own-message rule (services/common/own_messages.py) over each source's view of
    the message (operator name and text); WATI's bot is reported as `own_operator` here."""
    found: set[str] = set()
    for member in group.members():
        operator = None if member.agent_name == TEMPLATE_AGENT_NAME else member.agent_name
        own = own_reason(ids=group.ids, operator_name=operator, texts=[member.text], at=at,
                         own_replies=own_replies)
        if own is not None:
            found.add(_OWN_REASONS.get(own, own))
    for reason in (OWN_OPERATOR, OWN_TEXT):
        if reason in found:
            return reason
    return None


def _in_cutoff_second(group: _Group, at: datetime, lower: datetime) -> bool:
    """A real-time-only item with a whole-second time (WATI's webhook `timestamp`) in the second
    of the cutoff: it may have been written just after it. (History's `created` has milliseconds.)"""
    return group.history is None and is_whole_second(at) and possibly_after(at, lower)


def _excluded(ids: list[str], reason: str, at: datetime | None) -> ExcludedItem:
    return {"item_ids": list(ids), "reason": reason, "at": at}


def _group_by_ids(candidates: list[_Candidate], excluded: list[ExcludedItem]) -> list[_Group]:
    """Items sharing an id are one message; a second copy from the same source is a duplicate."""
    groups: list[_Group] = []
    by_id: dict[str, int] = {}
    for cand in candidates:
        found = sorted({by_id[i] for i in cand.ids if i in by_id})
        if not found:
            groups.append(_Group())
            index = len(groups) - 1
        else:
            index = found[0]
            for other in found[1:]:  # the candidate bridges two groups: fold them together
                _absorb(groups[index], groups[other], excluded)
                groups[other] = _Group()
                for i, g in by_id.items():
                    if g == other:
                        by_id[i] = index
        group = groups[index]
        slot = "history" if cand.source == "history" else "realtime"
        if getattr(group, slot) is None:
            setattr(group, slot, cand)
        else:
            excluded.append(_excluded(cand.ids, DUPLICATE, cand.at))
        for i in cand.ids:
            by_id[i] = index
    return [g for g in groups if g.members()]


def _absorb(into: _Group, other: _Group, excluded: list[ExcludedItem]) -> None:
    for slot in ("history", "realtime"):
        cand = getattr(other, slot)
        if cand is None:
            continue
        if getattr(into, slot) is None:
            setattr(into, slot, cand)
        else:
            excluded.append(_excluded(cand.ids, DUPLICATE, cand.at))


def _merge_by_text(groups: list[_Group]) -> list[_Group]:
    """A real-time-only agent item and a history-only item with the same text, close in time."""
    history_only = [g for g in groups if g.realtime is None and g.history is not None]
    taken: set[int] = set()
    for group in groups:
        rt = group.realtime
        if group.history is not None or rt is None or rt.at is None:
            continue
        text = normalise_text(rt.text)
        if not text:
            continue
        best: tuple[float, int] | None = None
        for index, candidate in enumerate(history_only):
            hist = candidate.history
            if index in taken or hist is None or hist.at is None or hist.role != rt.role:
                continue
            distance = abs((hist.at - rt.at).total_seconds())
            if distance <= TEXT_MERGE_TOLERANCE_SECONDS and normalise_text(hist.text) == text and (
                best is None or distance < best[0]
            ):
                best = (distance, index)
        if best is not None:
            taken.add(best[1])
            group.history = history_only[best[1]].history
    merged_away = {id(history_only[i]) for i in taken}
    return [g for g in groups if id(g) not in merged_away]


def select_missed(
    *,
    history: list[HistoryItem] | None,
    realtime: list[MissedItem],
    cutoff: datetime | None,
    lookback_start: datetime,
    batch_start: datetime,
    batch_event_ids: set[str],
    earlier_batch_event_ids: set[str],
    seen_event_ids: set[str],
    given_event_ids: set[str] | frozenset[str] = frozenset(),
    resume_from: datetime | None = None,
    own_replies: list[OwnReply],
    now: datetime,
    max_items: int,
) -> Selection:
    """The missed-message context of one batch (rules in the module docstring).

    `history` None means no history was consulted (short gap, ManyChat, fetch failed);
    `realtime` are the human-agent/template items recorded from WATI's send events;
    `resume_from` (before `cutoff`): where the request the cutoff's reply answered stopped looking —
    items after it were in no request, so they are in the window too (see the module docstring).
    """
    lower = cutoff if cutoff is not None else lookback_start
    own_ids = own_reply_ids(own_replies)
    excluded: list[ExcludedItem] = []

    candidates: list[_Candidate] = []
    for cand in [*(_from_realtime(i) for i in realtime), *(_from_history(i) for i in history or [])]:
        if cand.role is None:
            excluded.append(_excluded(cand.ids, UNSUPPORTED, cand.at))
        elif not cand.text.strip():
            excluded.append(_excluded(cand.ids, EMPTY, cand.at))
        else:
            candidates.append(cand)

    groups = _merge_by_text(_group_by_ids(candidates, excluded))

    kept: list[MissedItem] = []
    maybe_recovered: list[HistoryItem] = []
    missing_ids: list[str] = []
    session_start = now - timedelta(seconds=SESSION_SECONDS)
    for group in groups:
        ids, at, main = group.ids, group.at, group.main
        id_set = set(ids)
        reason: str | None = None
        if id_set & batch_event_ids:  # first: history may give a batch message a rounded, earlier time
            reason = IN_BATCH
        elif at is None:
            reason = NO_TIME
        elif at <= lower and not _in_cutoff_second(group, at, lower) and not (
                resume_from is not None and at > resume_from):
            reason = BEFORE_CUTOFF
        elif at >= batch_start:
            reason = NOT_BEFORE_BATCH
        elif id_set & own_ids:
            reason = OWN_ID
        elif id_set & earlier_batch_event_ids or (at <= lower and id_set & given_event_ids):
            reason = IN_EARLIER_BATCH
        elif main.role == "agent":
            reason = _own_reason(group, at, own_replies)
        if reason is not None:
            excluded.append(_excluded(ids, reason, at))
            continue
        assert at is not None and main.role is not None  # excluded above otherwise
        original = group.history.history if group.history is not None else None
        if main.role == "customer" and original is not None and ids and not id_set & seen_event_ids:
            missing_ids.append(ids[-1])
            if at > session_start:
                maybe_recovered.append(original)  # decided below, once the agents' items are known
        source: ItemSource = "both" if group.history and group.realtime else main.source
        agent_name = None
        if main.role == "agent":
            rt_name = group.realtime.agent_name if group.realtime else None
            agent_name = rt_name or (group.history.agent_name if group.history else None)
        kept.append({
            "at": at,
            "role": main.role,
            "agent_name": agent_name,
            "text": main.text.strip(),
            "message_type": main.message_type,
            "source": source,
            "item_ids": ids,
        })

    # A missing customer message that a human agent (or a template) answered afterwards was handled
    # by that human: it stays context (a missed item). Only what nobody answered is recovered into
    # the batch, so the bot answers it instead of leaving the customer unanswered.
    answered_until = max((i["at"] for i in kept if i["role"] == "agent"), default=None)
    recovered = [o for o in maybe_recovered
                 if answered_until is None or o["at"] is None or o["at"] > answered_until]
    recovered_ids = {i for o in recovered for i in o["item_ids"]}
    kept = [i for i in kept if not (i["role"] == "customer" and recovered_ids & set(i["item_ids"]))]
    kept.sort(key=lambda item: item["at"])
    dropped = 0
    if max_items > 0 and len(kept) > max_items:
        dropped = len(kept) - max_items
        for item in kept[:dropped]:
            excluded.append(_excluded(item["item_ids"], DROPPED_OLDEST, item["at"]))
        kept = kept[dropped:]
    recovered.sort(key=lambda item: item["at"] or batch_start)
    return Selection(
        items=kept,
        excluded=excluded,
        dropped_oldest=dropped,
        recovered=recovered,
        webhooks_missing=len(missing_ids),
        sources=["realtime"] + (["history"] if history is not None else []),
        missing_ids=missing_ids,
    )
