"""The context service's per-customer state machine: pure, synchronous, no Kafka and no HTTP.

The faust agent (services/context/app.py) decodes each event of a customer, calls ONE of the
`on_*` functions below with the customer's state (a fresh copy decoded from the table, which the
function may mutate) and the event, writes the returned state back to the table in the same
step, and performs the returned `Effects` (produce requests/audit events, start a history fetch).
Because the dedupe memory travels in the same state write as the effect, a replayed event (after
a crash or a rebalance) changes nothing and emits nothing twice.

Times: `now` is the worker's wall clock as carried by the event being handled (the flush command's
`issued_at`, or the processing time the shell passes) — injected, so tests control it.

Invariants (the old system's post-mortem, DESIGN.md "Lessons"):
1. `last_inbound_at` changes only on customer messages; `last_reply_at` only on reply events.
2. A batch captures `prior_last_inbound_at` / `prior_last_reply_at` when it OPENS, before anything
   is updated; nothing read later changes them (6: the same rule for the reply time).
3-5. Missed messages: selected by the window (prior_last_reply_at, first message of the batch),
   sorted by parsed time, never "the last N", never our own messages (services/context/missed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.common.config import GapPolicy
from services.common.records import (
    AgentActivity,
    AssistantReply,
    BatchDecision,
    ContextCommand,
    CustomerState,
    InboundMessage,
    ResponderRequest,
    VisionRequest,
)

RECENT_EVENT_IDS = 1000
OWN_REPLIES = 30
AGENT_MESSAGES = 100
FLUSHED_BATCH_IDS = 100
WHATSAPP_SESSION_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Limits:
    """Thresholds the state machine needs (from Settings; tests build their own)."""

    quiet_window_seconds: float
    max_batch_wait_seconds: float
    missed_lookback_seconds: float
    missed_max_items: int
    history_timeout_seconds: float
    policy: GapPolicy  # per-customer gap and hold thresholds


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
    duplicate: bool = False  # the event was a redelivery: nothing changed


def new_state(customer_key: str) -> CustomerState:
    """The state of a customer never seen before."""
    raise NotImplementedError


def on_inbound(
    state: CustomerState, message: InboundMessage, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """A customer message."""
    raise NotImplementedError


def on_agent_activity(
    state: CustomerState, activity: AgentActivity, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """A business-side send reported in real time (sessionMessageSent_v2 / templateMessageSent_v2)."""
    raise NotImplementedError


def on_reply(
    state: CustomerState, reply: AssistantReply, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """The responder answered (or gave up on) a batch."""
    raise NotImplementedError


def on_command(
    state: CustomerState, command: ContextCommand, now: datetime, limits: Limits
) -> tuple[CustomerState, Effects]:
    """flush / history_fetched / pause / resume / reconcile, keyed by customer."""
    raise NotImplementedError


def due_action(state: CustomerState, now: datetime, limits: Limits) -> str | None:
    """For the shell's timer (read-only): the batch id that needs a `flush` command now, else None.

    Due when the open batch's quiet window or max wait has passed, or when a flushing batch's
    history fetch has been running longer than `history_timeout_seconds` (crashed fetch task,
    worker restart): the flush command then retries the fetch once, then answers without history.
    """
    raise NotImplementedError
