"""Is this business-side message ours? One rule, used by ingest (sender kind), by the context
state machine (real-time agent events, echoes, the reconciliation sweep) and by the missed-message
selection — so the three can never drift apart again.

The rule, first match wins:
1. `own_id`: one of the message's ids (incl. its localMessageId) is an id of one of our sends.
2. `own_operator`: the operator is `API Token ...` (WATI's name for sends through the API — us),
   in any case, with spaces, `_` or `-` between the words, or nothing (`APIToken`).
3. `wati_bot`: the operator is WATI's own chatbot, `Bot` in any case and spacing (`"Bot "`, `b o t`).
4. `own_text`: the text is one of our recent replies (`matches_own_text`) — a fallback for sends
   whose ids we do not know. It never overrides a human: a message with a human operator name
   whose ids can be compared with the reply's and differ (an agent who pastes our answer to
   confirm it) is that human's. Ids are comparable when they are of a kind the reply recorded:
   WhatsApp ids (`wamid.`) with WhatsApp ids, provider ids with provider ids — a history item with
   only WATI's internal id cannot be told apart from our send by id, so its text still decides.
Anything else (a human name, an e-mail, no name at all) is not ours.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from services.common.records import OwnReply

OwnReason = Literal["own_id", "own_operator", "wati_bot", "own_text"]

NEAR_TEXT_MIN_CHARS = 20
NEAR_TEXT_RATIO = 0.9
SHORT_OWN_TEXT_TOLERANCE_SECONDS = 300.0

_API_TOKEN = re.compile(r"^api[\s_-]*token\b")
_SPACES = re.compile(r"\s+")
_WAMID = "wamid."


def _folded(name: str | None) -> str:
    return _SPACES.sub(" ", name or "").strip().casefold()


def is_api_sender(name: str | None) -> bool:
    """`API Token ...`: a send through WATI's API, i.e. ours."""
    return bool(_API_TOKEN.match(_folded(name)))


def is_wati_bot(name: str | None) -> bool:
    """WATI's own chatbot: `Bot` in any case and spacing."""
    return _SPACES.sub("", name or "").casefold() == "bot"


def is_human_name(name: str | None) -> bool:
    """An operator name that is neither our API sender nor WATI's bot."""
    return bool(_folded(name)) and not is_api_sender(name) and not is_wati_bot(name)


def normalise_text(text: str | None) -> str:
    """Comparable form of a message text: NFKC, case-folded, no punctuation, single spaces."""
    if not text:
        return ""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in folded)
    return _SPACES.sub(" ", kept).strip()


def own_reply_ids(own_replies: Iterable[OwnReply]) -> set[str]:
    """Every provider id of our recorded sends."""
    return {pid for reply in own_replies for pid in reply["provider_message_ids"] if pid}


def _text_matches(mine: str, at: datetime | None, reply: OwnReply) -> bool:
    """Equal (long enough, or short and close in time), a part of it, or nearly identical."""
    ours = normalise_text(reply["text"])
    if not ours:
        return False
    if mine == ours:
        if len(mine) >= NEAR_TEXT_MIN_CHARS:
            return True
        return at is not None and abs((at - reply["sent_at"]).total_seconds()) <= (
            SHORT_OWN_TEXT_TOLERANCE_SECONDS)
    if min(len(mine), len(ours)) < NEAR_TEXT_MIN_CHARS:
        return False  # a short text is never ours because our reply merely CONTAINS it
    if mine in ours or ours in mine:
        return True  # a part of a reply split for the channel's limit
    # ratio() <= 2*min/(a+b): skip pairs whose lengths alone rule the threshold out.
    if 2 * min(len(mine), len(ours)) / (len(mine) + len(ours)) < NEAR_TEXT_RATIO:
        return False
    matcher = difflib.SequenceMatcher(None, mine, ours, autojunk=False)
    return matcher.quick_ratio() >= NEAR_TEXT_RATIO and matcher.ratio() >= NEAR_TEXT_RATIO


def matches_own_text(text: str | None, at: datetime | None, own_replies: Iterable[OwnReply]) -> bool:
    """Whether a text is one of our recent replies (by text alone: see `own_reason` for the rule)."""
    mine = normalise_text(text)
    return bool(mine) and any(_text_matches(mine, at, reply) for reply in own_replies)


def _kinds(ids: Iterable[str]) -> set[bool]:
    return {i.startswith(_WAMID) for i in ids if i}


def _ids_tell_apart(ids: Iterable[str], reply: OwnReply) -> bool:
    """The message has an id of a kind the reply recorded (and, checked before, none is the reply's)."""
    return bool(_kinds(ids) & _kinds(reply["provider_message_ids"]))


def own_reason(
    *,
    ids: Iterable[str],
    operator_name: str | None,
    texts: Iterable[str | None],
    at: datetime | None,
    own_replies: Iterable[OwnReply],
    own_send: bool = False,
) -> OwnReason | None:
    """Why a business-side message is ours (the module's rule), or None: it is not ours.

    `texts`: the message's text as each source gave it; `own_send`: ingest already classified the
    operator as our API sender (`sender_kind == "own_send"`).
    """
    replies = list(own_replies)
    id_list = [i for i in ids if i]
    if set(id_list) & own_reply_ids(replies):
        return "own_id"
    if own_send or is_api_sender(operator_name):
        return "own_operator"
    if is_wati_bot(operator_name):
        return "wati_bot"
    human = is_human_name(operator_name)
    candidates = [r for r in replies if not (human and _ids_tell_apart(id_list, r))]
    for text in texts:
        if matches_own_text(text, at, candidates):
            return "own_text"
    return None


def operator_kind(operator_name: str | None) -> Literal["own_send", "wati_bot"] | None:
    """Ingest's first look at a business-side send: ours, WATI's bot, or neither (None)."""
    if is_api_sender(operator_name):
        return "own_send"
    if is_wati_bot(operator_name):
        return "wati_bot"
    return None
