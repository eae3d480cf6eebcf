"""Answering one batch: the responder's handler, called by the keyed consumer per ResponderRequest.

One customer's batches arrive here strictly one after another (the keyed pool), so the customer's
state needs no lock. Every step is written ahead to the compacted state topic before the next:

1. batch already `sent` → a redelivery: no OpenAI call, nothing sent; the AssistantReply is
   published again from the stored record (the context service dedupes by batch id);
2. batch `generated` → the crash came between generating and sending: send the stored text, except
   the parts WATI already has (looked up by localMessageId: the crash may have come mid-send);
3. otherwise ensure the customer's conversation (create it and persist its id before using it —
   the only place conversations are created), call the Responses API in it, persist `generated`
   (text, response id, usage), send, persist `sent`, publish the AssistantReply.
A conversation that OpenAI no longer knows (404) is recreated once. When no answer can be had the
batch is dead-lettered with the reason and the customer gets FALLBACK_TEXT (written ahead like an
answer) or nothing — never an error text. Every batch ends with exactly one AssistantReply
(outcome answered / fallback / nothing_sent) so the context service learns it is done.

Outcome of a stored `sent` entry, for republishing: no text → nothing_sent; a text without a
response id → fallback; a text with one → answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, cast

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from ..common import codec, metrics
from ..common.config import Settings
from ..common.kafka import Topics, dead_letter, send_record
from ..common.keys import KeyError_, parse_key, record_key_problem, split_key
from ..common.logs import event
from ..common.records import AssistantReply, BatchProgress, ReplyOutcome, ResponderRequest, ResponderState
from ..common.timeparse import utcnow
from .ai import AIFailure, ConversationGone, Generated, Replier
from .channels import ChannelSender, SendFailed
from .prompt import build_input
from .splitting import limit_for, split_message
from .state_store import StateStore, empty_state, find_batch, with_conversation, with_progress

log = logging.getLogger(__name__)

SERVICE = "responder"
CHANNEL_PROVIDER = {"wati": "wati", "facebook": "manychat", "instagram": "manychat"}


def request_problem(request: dict[str, Any]) -> str | None:
    """Pure validation of a decoded ResponderRequest; a reason, or None when it can be answered."""
    if not str(request.get("batch_id") or "").strip():
        return "empty batch_id"
    key = str(request.get("customer_key") or "")
    try:
        scope = parse_key(key)
    except KeyError_:
        return "malformed customer_key"
    if not scope.is_default:
        # per-tenant senders are not wired yet (docs/tenants.md "Not done yet"): never answer another
        # tenant's customer from the deployment's account
        return f"tenant {scope.tenant} account {scope.account}: per-tenant sending is not wired yet"
    provider = scope.provider
    channel = request.get("channel")
    if CHANNEL_PROVIDER.get(str(channel)) != provider:
        return f"channel {channel} does not match the customer key's provider {provider}"
    if not str(request.get("provider_id") or "").strip():
        return "empty provider_id"
    if not request.get("messages") and not request.get("images"):
        return "no messages"
    return None


def outcome_of(progress: BatchProgress) -> ReplyOutcome:
    if not progress["text"]:
        return "nothing_sent"
    return "answered" if progress["response_id"] else "fallback"


class ResponderWorker:
    """The keyed consumer's handler (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        replier: Replier,
        sender: ChannelSender,
        store: StateStore,
        producer: AIOKafkaProducer,
        topics: Topics,
        kafka_attempts: int = 8,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.replier = replier
        self.sender = sender
        self.store = store
        self.producer = producer
        self.topics = topics
        self.kafka_attempts = kafka_attempts
        self.sleep = sleep
        self.locale = settings.prompt_locale
        self.fallback_text = settings.fallback_text.strip()

    # ---------------------------------------------------------------- entry point

    async def handle(self, name: str, value: dict[str, Any], record: ConsumerRecord) -> None:
        if name != "ResponderRequest":
            await self._dead_letter(record, "unexpected_record", f"expected ResponderRequest, got {name}",
                                    _str(value.get("customer_key")), _str(value.get("batch_id")))
            return
        key_problem = record_key_problem(record.key, value.get("customer_key"))
        if key_problem is not None:  # not from the context service: never answered
            await self._dead_letter(record, *key_problem, _str(value.get("customer_key")),
                                    _str(value.get("batch_id")))
            return
        problem = request_problem(value)
        if problem is not None:
            await self._dead_letter(record, "invalid_request", problem,
                                    _str(value.get("customer_key")), _str(value.get("batch_id")))
            await self._close_invalid(value)
            return
        request = cast(ResponderRequest, value)
        metrics.inflight_batches.inc()
        started = time.monotonic()
        try:
            outcome = await self._answer(request, record)
        finally:
            metrics.inflight_batches.dec()
        event(log, "batch_done", customer=request["customer_key"], batch_id=request["batch_id"],
              outcome=outcome, seconds=round(time.monotonic() - started, 3))

    # ---------------------------------------------------------------- the steps

    async def _answer(self, request: ResponderRequest, record: ConsumerRecord) -> str:
        key, batch_id = request["customer_key"], request["batch_id"]
        state = self.store.get(key) or empty_state(key)
        progress = find_batch(state, batch_id)
        if progress is not None and progress["status"] == "sent":
            metrics.dedupe_hits_total.labels("responder_batch").inc()
            # the original send time: re-publishing "now" would move the context's cutoff past
            # whatever humans wrote since (docs/old-system.md, bug 6). Records from before `sent_at` was
            # stored fall back to the state's time when this batch was its last change.
            sent_at = progress.get("sent_at") or (
                state["updated_at"] if state["batches"][-1]["batch_id"] == batch_id else None)
            await self._publish(request, progress, state["conversation_id"], redelivered=True,
                                sent_at=sent_at)
            return "duplicate"
        resumed = progress is not None  # generated before a crash: it may have reached WATI already
        if progress is None:
            state, progress = await self._produce_text(request, record, state)
            if progress is None:  # no answer and no fallback: nothing to send
                done: BatchProgress = _progress(batch_id, "sent", "", None)
                await self._persist(with_progress(state, done))
                await self._publish(request, done, state["conversation_id"])
                return "nothing_sent"
        return await self._send_and_finish(request, record, state, progress, resume=resumed)

    async def _produce_text(
        self, request: ResponderRequest, record: ConsumerRecord, state: ResponderState
    ) -> tuple[ResponderState, BatchProgress | None]:
        """Generates the answer (or takes the fallback) and persists it as `generated`."""
        batch_id = request["batch_id"]
        try:
            state, generated = await self._generate(request, state)
            progress = _progress(batch_id, "generated", generated.text, generated.response_id,
                                 generated.input_tokens, generated.output_tokens)
        except AIFailure as failure:
            # what was persisted before the failure (e.g. a conversation just created) is kept
            state = self.store.get(request["customer_key"]) or state
            await self._dead_letter(record, failure.reason, failure.detail, request["customer_key"], batch_id)
            if not self.fallback_text:
                return state, None
            progress = _progress(batch_id, "generated", self.fallback_text, None)
        state = with_progress(state, progress)
        await self._persist(state)
        return state, progress

    async def _generate(
        self, request: ResponderRequest, state: ResponderState
    ) -> tuple[ResponderState, Generated]:
        key = request["customer_key"]
        input_items = build_input(request, self.locale)
        recreated = False
        while True:
            if not state["conversation_id"]:
                state = await self._new_conversation(state, request["channel"])
            conversation_id = state["conversation_id"]
            assert conversation_id is not None
            try:
                return state, await self.replier.reply(conversation_id, input_items, key, request["batch_id"])
            except ConversationGone as gone:
                if recreated:
                    raise AIFailure("conversation_not_found", str(gone)) from None
                event(log, "conversation_gone", logging.WARNING, customer=key, conversation=conversation_id)
                recreated = True
                state = {**state, "conversation_id": None}

    async def _new_conversation(self, state: ResponderState, channel: str) -> ResponderState:
        """Creates the customer's conversation and persists its id BEFORE it is used."""
        conversation_id = await self.replier.create_conversation(state["customer_key"], channel)
        state = with_conversation(state, conversation_id)
        await self._persist(state)
        event(log, "conversation_created", customer=state["customer_key"], conversation=conversation_id)
        return state

    async def _send_and_finish(
        self, request: ResponderRequest, record: ConsumerRecord, state: ResponderState,
        progress: BatchProgress, *, resume: bool = False,
    ) -> str:
        key, batch_id = request["customer_key"], request["batch_id"]
        # The reply's time is when the send BEGAN: a later time would put human messages written
        # meanwhile before the next cutoff; our own parts after it are excluded by their ids.
        send_started = utcnow()
        try:
            sent = await self.sender.send(
                request["channel"], request["provider_id"], progress["text"], batch_id, resume=resume
            )
            parts, ids, text = sent.parts, sent.ids, progress["text"]
        except SendFailed as failure:
            error = f"{failure.reason} after {len(failure.sent_parts)} part(s) on {request['channel']}"
            await self._dead_letter(record, "send_failed", error, key, batch_id)
            parts, ids = failure.sent_parts, failure.ids
            text = "\n\n".join(parts)
        done = _progress(batch_id, "sent", text, progress["response_id"], progress["input_tokens"],
                         progress["output_tokens"], ids, sent_at=send_started)
        state = with_progress(state, done)
        await self._persist(state)
        await self._publish(request, done, state["conversation_id"], parts=parts, sent_at=send_started)
        return outcome_of(done)

    async def _close_invalid(self, value: dict[str, Any]) -> None:
        """Tells the context service an unanswerable batch is done (when its ids allow a reply)."""
        if not _str(value.get("batch_id")) or not _str(value.get("customer_key")):
            return
        try:
            split_key(str(value["customer_key"]))
            request = cast(ResponderRequest, value)
            codec.encode("AssistantReply", {
                "batch_id": request["batch_id"], "customer_key": request["customer_key"],
                "channel": request["channel"], "provider_id": str(request.get("provider_id") or ""),
                "outcome": "nothing_sent", "text": "", "sent_at": utcnow(),
            })
        except (KeyError_, KeyError, codec.CodecError):
            return
        await self._publish(request, _progress(request["batch_id"], "sent", "", None), None)

    # ---------------------------------------------------------------- Kafka writes

    async def _publish(
        self, request: ResponderRequest, progress: BatchProgress, conversation_id: str | None,
        *, parts: list[str] | None = None, redelivered: bool = False, sent_at: datetime | None = None,
    ) -> None:
        outcome = outcome_of(progress)
        if parts is None:
            parts = split_message(progress["text"], limit_for(request["channel"]))
        reply: AssistantReply = {
            "batch_id": request["batch_id"], "customer_key": request["customer_key"],
            "channel": request["channel"], "provider_id": request["provider_id"], "outcome": outcome,
            "text": progress["text"], "parts": parts, "sent_at": sent_at or utcnow(),
            "provider_message_ids": progress["provider_message_ids"], "response_id": progress["response_id"],
            "conversation_id": conversation_id, "input_tokens": progress["input_tokens"],
            "output_tokens": progress["output_tokens"],
        }
        await self._kafka(lambda: send_record(self.producer, self.topics.replies, request["customer_key"],
                                              "AssistantReply", cast(dict[str, Any], reply)))
        if not redelivered:
            metrics.replies_total.labels(outcome).inc()

    async def _persist(self, state: ResponderState) -> None:
        await self._kafka(lambda: self.store.put(state))

    async def _dead_letter(
        self, record: ConsumerRecord, reason: str, error: str, customer_key: str | None, batch_id: str | None
    ) -> None:
        await self._kafka(lambda: dead_letter(
            self.producer, self.topics, service=SERVICE, reason=reason, error=error,
            source_topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
            payload=record.value, customer_key=customer_key, batch_id=batch_id,
        ))

    async def _kafka(self, write: Callable[[], Awaitable[Any]]) -> None:
        """A write the next step depends on, retried with backoff: for as long as the broker is
        unreachable (the customer's batch waits, nothing is lost; a stop cancels and the batch is
        redelivered), `kafka_attempts` times for other Kafka errors, which then propagate."""
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                await write()
                return
            except (KafkaError, OSError) as exc:
                outage = isinstance(exc, KafkaTimeoutError | KafkaConnectionError | OSError) or bool(
                    getattr(exc, "retriable", False))
                if not outage and attempt >= self.kafka_attempts:
                    raise
                event(log, "kafka_write_retry", logging.WARNING, error=type(exc).__name__, attempt=attempt)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)


def _progress(
    batch_id: str, status: str, text: str, response_id: str | None, input_tokens: int = 0,
    output_tokens: int = 0, ids: list[str] | None = None, sent_at: datetime | None = None,
) -> BatchProgress:
    return cast(BatchProgress, {
        "batch_id": batch_id, "status": status, "text": text, "response_id": response_id,
        "provider_message_ids": list(ids or []), "input_tokens": input_tokens, "output_tokens": output_tokens,
        "sent_at": sent_at,
    })


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None

