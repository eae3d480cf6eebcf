"""Typed views of the Avro records in `schemas/` (one TypedDict per schema, same field names).

Values travel as plain dicts (what fastavro reads and writes); these types let mypy check them.
Times are aware UTC datetimes (Avro timestamp-millis).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, NotRequired, TypedDict

Channel = Literal["wati", "facebook", "instagram"]
Role = Literal["customer", "agent", "event"]
ItemSource = Literal["history", "realtime", "both"]
SenderKind = Literal["human_agent", "own_send", "wati_bot", "template", "unknown"]
ReplyOutcome = Literal["answered", "fallback", "nothing_sent", "held"]
CommandKind = Literal["flush", "history_fetched", "pause", "resume", "reconcile"]


class InboundMessage(TypedDict):
    event_id: str
    customer_key: str
    channel: Channel
    provider_id: str
    message_type: str
    text: str | None
    caption: str | None
    media_ref: str | None
    media_mime: str | None
    sender_name: str | None
    provider_message_ids: list[str]
    provider_time: datetime
    received_at: datetime
    recovered: NotRequired[bool]
    username: NotRequired[str | None]


class AgentActivity(TypedDict):
    event_id: str
    customer_key: str
    channel: Channel
    provider_id: str
    event_type: str
    sender_kind: SenderKind
    operator_name: str | None
    operator_email: str | None
    message_type: str
    text: str | None
    provider_message_ids: list[str]
    local_message_id: str | None
    provider_time: datetime
    received_at: datetime


class MissedItem(TypedDict):
    at: datetime
    role: Role
    agent_name: str | None
    text: str
    message_type: str
    source: ItemSource
    item_ids: list[str]


class ImageContext(TypedDict):
    media_ref: str
    file_id: str | None
    mime: str | None
    category: str
    confidence: float
    description: str | None


class ResponderRequest(TypedDict):
    batch_id: str
    customer_key: str
    channel: Channel
    provider_id: str
    messages: list[InboundMessage]
    prior_last_inbound_at: datetime | None
    prior_last_reply_at: datetime | None
    gap_seconds: float | None
    missed_check_ran: bool
    missed_messages: list[MissedItem]
    missed_dropped_oldest: int
    images: list[ImageContext]
    created_at: datetime


class VisionRequest(TypedDict):
    request: ResponderRequest


class ImageClassified(TypedDict):
    batch_id: str
    customer_key: str
    media_ref: str
    category: str
    confidence: float
    model: str
    file_id: str | None
    classified_at: datetime


class AssistantReply(TypedDict):
    batch_id: str
    customer_key: str
    channel: Channel
    provider_id: str
    outcome: ReplyOutcome
    text: str
    parts: list[str]
    sent_at: datetime
    provider_message_ids: list[str]
    response_id: str | None
    conversation_id: str | None
    input_tokens: int
    output_tokens: int


class DeadLetter(TypedDict):
    service: str
    reason: str
    error: str
    source_topic: str | None
    partition: int
    offset: int
    key: bytes | None
    payload: bytes | None
    customer_key: str | None
    batch_id: str | None
    failed_at: datetime


class DeadLetterReplay(TypedDict):
    dead_letter_id: str
    source_topic: str
    replayed_partition: int
    replayed_offset: int
    replayed_by: str
    replayed_at: datetime


class HistoryItem(TypedDict):
    item_ids: list[str]
    at: datetime | None
    event_type: str
    owner: bool
    operator_name: str | None
    text: str
    message_type: str
    local_message_id: str | None
    conversation_id: str | None


class ContextCommand(TypedDict):
    kind: CommandKind
    customer_key: str
    batch_id: str | None
    issued_at: datetime
    history: list[HistoryItem]
    history_error: str | None
    history_pages: int
    actor: str | None
    #: flush: the number of batch messages the timer saw (None: all; 0: a hold's end, no batch open);
    #: replays flush the same batch
    batch_messages: NotRequired[int | None]
    #: flush: agent-activity events / replies of the customer the timer's state had handled (None:
    #: all); the batch's human-agent block and hold see exactly those, however a replay interleaves;
    #: `opened_replies`: the replies handled when the batch opened (its cutoff is the last of them)
    agent_events: NotRequired[int | None]
    replies: NotRequired[int | None]
    opened_replies: NotRequired[int | None]
    #: flush: inbound webhooks the timer's state had handled; a history message whose webhook came
    #: later is recovered into the batch, whatever the interleaving
    inbound_messages: NotRequired[int | None]


class ExcludedItem(TypedDict):
    item_ids: list[str]
    reason: str
    at: datetime | None


class BatchDecision(TypedDict):
    batch_id: str
    customer_key: str
    channel: Channel
    decided_at: datetime
    message_count: int
    prior_last_inbound_at: datetime | None
    prior_last_reply_at: datetime | None
    gap_seconds: float | None
    gap_threshold_seconds: float
    missed_check_ran: bool
    cutoff: datetime | None
    sources: list[str]
    injected: list[MissedItem]
    excluded: list[ExcludedItem]
    held: bool
    hold_reason: str | None
    recovered_event_ids: list[str]
    webhooks_missing: int
    history_error: str | None
    routed_to: str


class BatchProgress(TypedDict):
    batch_id: str
    status: Literal["generated", "sent"]
    text: str
    response_id: str | None
    provider_message_ids: list[str]
    input_tokens: int
    output_tokens: int
    sent_at: NotRequired[datetime | None]


class BatchClaim(TypedDict):
    batch_id: str
    owner: str
    #: until when it holds off another worker (null: written by a version without holds)
    expires_at: NotRequired[datetime | None]


class ResponderState(TypedDict):
    customer_key: str
    conversation_id: str | None
    batches: list[BatchProgress]
    updated_at: datetime
    claim: NotRequired[BatchClaim | None]


class OwnReply(TypedDict):
    batch_id: str
    sent_at: datetime
    text: str
    provider_message_ids: list[str]


class WaitingFlush(TypedDict):
    batch_messages: int
    issued_at: datetime
    agent_events: NotRequired[int | None]
    replies: NotRequired[int | None]
    opened_replies: NotRequired[int | None]
    inbound_messages: NotRequired[int | None]


class EarlyFlush(TypedDict):
    batch_id: str
    batch_messages: int
    issued_at: datetime
    agent_events: NotRequired[int | None]
    replies: NotRequired[int | None]
    opened_replies: NotRequired[int | None]
    inbound_messages: NotRequired[int | None]


class InboundLogEntry(TypedDict):
    seq: int
    ids: list[str]


class AgentLogEntry(TypedDict):
    seq: int
    item_ids: list[str]
    human_at: datetime | None
    forgotten_by: int | None


class ReplyLogEntry(TypedDict):
    seq: int
    batch_id: str
    sent: bool
    echoes: list[MissedItem]
    unanswered: Unanswered | None
    last_reply_before: NotRequired[datetime | None]


class Batch(TypedDict):
    batch_id: str
    opened_at: datetime
    last_message_at: datetime
    messages: list[InboundMessage]
    prior_last_inbound_at: datetime | None
    prior_last_reply_at: datetime | None
    fetch_started_at: datetime | None
    fetch_attempts: int
    waiting_flushes: NotRequired[list[WaitingFlush]]
    seen_agent_events: NotRequired[int | None]
    seen_replies: NotRequired[int | None]
    opened_replies: NotRequired[int | None]
    seen_inbound: NotRequired[int | None]


class Unanswered(TypedDict):
    batch_id: str
    routed_to: str
    emitted_at: datetime
    event_ids: list[str]


class CustomerState(TypedDict):
    customer_key: str
    channel: Channel | None
    provider_id: str | None
    last_inbound_at: datetime | None
    last_reply_at: datetime | None
    last_human_at: datetime | None
    recent_event_ids: list[str]
    own_replies: list[OwnReply]
    agent_messages: list[MissedItem]
    open_batch: Batch | None
    flushing_batch: Batch | None
    held_messages: list[InboundMessage]
    unanswered: list[Unanswered]
    flushed_batch_ids: list[str]
    paused: bool
    paused_by: str | None
    last_activity_at: datetime | None
    batch_seq: int
    early_flushes: NotRequired[list[EarlyFlush]]
    agent_events_handled: NotRequired[int]
    replies_handled: NotRequired[int]
    agent_log: NotRequired[list[AgentLogEntry]]
    reply_log: NotRequired[list[ReplyLogEntry]]
    reply_floor: NotRequired[datetime | None]
    last_human_base: NotRequired[datetime | None]
    inbound_handled: NotRequired[int]
    inbound_log: NotRequired[list[InboundLogEntry]]
    #: history results and fetch retries of a batch handled before it started flushing (a replay)
    early_fetch_commands: NotRequired[list[ContextCommand]]
