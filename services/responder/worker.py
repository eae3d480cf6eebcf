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

One batch, one OpenAI call, one send — across rebalances (issue 13, point 4). Two workers can hold
the same batch: the one whose partition was revoked (it may not even know: a worker whose session
expired learns it only when it reaches the coordinator again), and the new owner, which gets the
uncommitted record again. An OpenAI call may last minutes with retries, so:
- the old owner is NOT cancelled (the responder runs the keyed consumer with `cancel_revoked`
  off): its call is paid for and its answer is the one the customer should get, so it finishes
  its call and its send under its claim. (Cancelling would waste the call, and the new owner
  would call again — it still can be turned on; a cancelled handling releases its claim.)
- every claim HOLDS the batch: `expires_at` = the claim's time + OPENAI_DEADLINE_SECONDS, the
  longest its OpenAI work may take (it is cut off there: `openai_deadline`, then the fallback or
  nothing, as for any AI failure); `generated` replaces it by RESPONDER_SEND_HOLD_SECONDS from
  then, for the send (sends take seconds: a crash mid-send should not wait out the OpenAI
  deadline). A new owner that finds another handling's claim holding on an unsent batch WAITS (no
  claim, no OpenAI call) until the batch is `sent` — then it only republishes the stored reply —,
  the claim is released (its handling stopped or failed: `_release`) or it expires (its worker
  died) — then it claims and answers, resuming a `generated` text with the WATI lookup. Waiting is
  woken by the customer's next state record (no polling). So a moved batch costs one call whenever
  the old worker lives. Clocks: the hold is compared with the waiter's clock; skew shortens or
  lengthens the wait (the worker's own cut-off is on its monotonic clock), which can cost a second
  call, never a second send: that is the claim fence's job, below, and it does not depend on
  clocks;
- every handling CLAIMS its batch in the state topic (a claim with an owner unique to this
  handling, written after reading the customer's partition to its end, before the OpenAI call).
  After the OpenAI call it writes `generated` (G), reads the topic up to G — everything the
  broker ordered before G — and sends only if its claim is still the newest one on that batch and
  the batch is not `sent`; a resumed send and an empty outcome's reply read the partition to its
  end for the same check. A refused worker sends, publishes and writes nothing more ("fenced").
  Both workers write to the same partition, so the broker orders the new owner's claim C and the
  old worker's G: if C is before G, the old worker's check after G sees C and refuses; if G is
  before C, the new owner sees G — it read the topic to its end before claiming, and after
  claiming it reads up to C and takes in any record another worker wrote between its base and C
  (then writes C again on it) — and resumes the stored text with the WATI lookup by
  localMessageId instead of a new answer. The check after G costs no broker request (the reader
  follows the topic anyway): the fence adds one end-offsets read and one write (two when a record
  was taken in) per batch.

What remains: (1) the old worker passed its check just before C and is still sending when the new
owner resumes: the WATI lookup only skips the parts WATI already has (ManyChat has no lookup), so a
part may go out twice — as the hold is renewed at `generated`, C comes only after a send that
outlasted RESPONDER_SEND_HOLD_SECONDS (or with a clock far off); (2) a claim whose worker died
holds the batch until it expires: a crash mid-call delays that customer's answer by up to
OPENAI_DEADLINE_SECONDS, mid-send by up to RESPONDER_SEND_HOLD_SECONDS (a stop releases at once; a
shorter hold renewed by a heartbeat would bound it, at one state write per interval), and the dead
worker's call is lost: that batch costs two calls (as does one cancelled on revoke, when
`cancel_revoked` is turned on); (3) a refused worker's G written after C is the customer's latest
record until the new owner writes again (it does so from its own copy, which wins); (4) a claim
forgotten after MAX_CLAIMS newer ones on the same customer fences its handler (the safe side); (5)
a worker that cannot read the state topic waits, and one whose state reader died fails the batch
(dead letter): it never sends unchecked. Kafka transactions would not close (1): the send is an
HTTP effect outside Kafka.

Times (issue 13, point 5): `generated` is written with `sent_at` = now, just before the send
begins, so a send resumed after a crash reports the time the first part may have gone out, not the
restart time; a human message written between the crash and the restart stays after the cutoff.
It errs early (the write precedes the first part), the safe side: our own parts after it are
recognised by their ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from aiokafka.structs import TopicPartition

from .. import providers
from ..common import codec, metrics
from ..common.config import Settings
from ..common.kafka import Topics, dead_letter, send_record
from ..common.keys import KeyError_, parse_key, record_key_problem, split_key
from ..common.logs import event
from ..common.records import (
    AssistantReply,
    BatchClaim,
    BatchProgress,
    ReplyOutcome,
    ResponderRequest,
    ResponderState,
)
from ..common.tenants import Tenants, load_tenants
from ..common.timeparse import utcnow
from ..providers.accounts import request_account_problem
from .ai import AIFailure, ConversationGone, Generated, Replier, TenantRepliers
from .channels import ChannelSender, SendFailed
from .prompt import build_input
from .splitting import limit_for, split_message
from .state_store import (
    StateStore,
    empty_state,
    find_batch,
    wait_for_claim,
    with_claim,
    with_conversation,
    with_progress,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE = "responder"
#: how long a handler that gives its batch up (stop, failure) may spend writing the release
RELEASE_SECONDS = 2.0


def request_problem(request: dict[str, Any]) -> str | None:
    """Pure validation of a decoded ResponderRequest; a reason, or None when it can be answered."""
    if not str(request.get("batch_id") or "").strip():
        return "empty batch_id"
    key = str(request.get("customer_key") or "")
    try:
        provider = parse_key(key).provider
    except KeyError_:
        return "malformed customer_key"
    channel = request.get("channel")
    try:
        channel_provider = providers.for_channel(str(channel)).name
    except providers.UnknownProvider:
        channel_provider = None
    if channel_provider != provider:
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
        replier: Replier | TenantRepliers,
        sender: ChannelSender,
        store: StateStore,
        producer: AIOKafkaProducer,
        topics: Topics,
        kafka_attempts: int = 8,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], datetime] = utcnow,
        tenants: Tenants | None = None,
    ) -> None:
        self.settings = settings
        # each customer is answered with its tenant's Replier and sent from its tenant's account
        self.repliers = replier if isinstance(replier, TenantRepliers) else TenantRepliers.single(replier)
        self.tenants = load_tenants(settings) if tenants is None else tenants
        self.sender = sender
        self.store = store
        self.producer = producer
        self.topics = topics
        self.kafka_attempts = kafka_attempts
        self.sleep = sleep
        self.clock = clock  # the claims' holds (`expires_at`) are times of this clock
        self.deadline = settings.openai_deadline_seconds
        self.send_hold = settings.responder_send_hold_seconds
        self.locale = settings.prompt_locale
        self.fallback_text = settings.fallback_text.strip()

    @property
    def replier(self) -> Replier:
        """The `default` tenant's Replier."""
        return self.repliers.default

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
        no_account = request_account_problem(self.tenants, str(value["customer_key"]))
        if no_account is not None:  # a tenant or account removed from TENANTS_FILE: never answered
            await self._dead_letter(record, "no_account", no_account,
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
        await self._kafka(lambda: self.store.catch_up(key))  # the latest state, whoever wrote it
        state = self.store.get(key) or empty_state(key)
        progress = find_batch(state, batch_id)
        if progress is not None and progress["status"] == "sent":
            return await self._republish(request, state, progress)
        if await self._wait_for_other_claim(key, batch_id):
            state = self.store.get(key) or empty_state(key)
            progress = find_batch(state, batch_id)
            if progress is not None and progress["status"] == "sent":  # the other handling finished
                return await self._republish(request, state, progress)
        claim = self._new_claim(batch_id, uuid.uuid4().hex, self.deadline)
        state, progress = await self._claim(key, claim)
        try:
            return await self._answer_claimed(request, record, state, progress, claim)
        except BaseException:  # stopped (cancelled) or failed: nobody should wait for this claim
            await self._release(key, claim)
            raise

    async def _answer_claimed(
        self, request: ResponderRequest, record: ConsumerRecord, state: ResponderState,
        progress: BatchProgress | None, claim: BatchClaim,
    ) -> str:
        batch_id = request["batch_id"]
        if progress is not None and progress["status"] == "sent":
            return await self._republish(request, state, progress)
        resumed = progress is not None  # generated before a crash: it may have reached WATI already
        if progress is None:
            try:
                state, progress = await self._produce_text(request, record, state, claim)
            except _Fenced:
                return "fenced"
            if progress is None:  # no answer and no fallback: nothing to send
                done: BatchProgress = _progress(batch_id, "sent", "", None)
                await self._persist(with_progress(state, done))
                await self._publish(request, done, state["conversation_id"])
                return "nothing_sent"
        return await self._send_and_finish(request, record, state, progress, claim, resume=resumed)

    def _new_claim(self, batch_id: str, owner: str, hold: float) -> BatchClaim:
        """A claim holding other workers off for `hold` seconds from now (module docstring)."""
        return {"batch_id": batch_id, "owner": owner, "expires_at": self.clock() + timedelta(seconds=hold)}

    async def _wait_for_other_claim(self, key: str, batch_id: str) -> bool:
        """Waits while another handling's claim on the batch holds (`wait_for_claim`): that one is
        calling OpenAI or sending, and a second call would be wasted. Ends when the batch is `sent`,
        the claim is released or expires; True when it waited (the caller re-reads the state).
        A hold is at most the deadline and the send hold from now (claim, then `generated`), so
        a claimant's clock far ahead cannot keep the batch waiting for longer."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline + self.send_hold
        waited = False
        while True:
            claimant, expires_at = self.store.hold(key, batch_id)
            latest = self.store.get(key)
            progress = find_batch(latest, batch_id) if latest is not None else None
            wait = min(wait_for_claim(progress, claimant, expires_at, self.clock()), give_up - loop.time())
            if wait <= 0:
                break
            if not waited:
                waited = True
                metrics.dedupe_hits_total.labels("responder_claim_wait").inc()
                event(log, "claim_wait", customer=key, batch_id=batch_id, seconds=round(wait, 1),
                      status=progress["status"] if progress is not None else "claimed")
            await self.store.wait_change(key, wait)
        if waited:
            await self._kafka(lambda: self.store.catch_up(key))
            event(log, "claim_wait_over", customer=key, batch_id=batch_id)
        return waited

    async def _release(self, key: str, claim: BatchClaim) -> None:
        """Best effort, bounded: ends our hold on a batch we give up unsent, so the next owner
        answers it at once instead of at the hold's end. Written only while the hold still holds
        by our clock — nobody else writes a claim on the batch meanwhile, they wait — and after
        reading the customer's partition to its end, so it never replaces a newer state."""
        batch_id = claim["batch_id"]
        expires_at = claim.get("expires_at")

        async def release() -> None:
            await self.store.catch_up(key)
            latest = self.store.get(key)
            claimant, held_until = self.store.hold(key, batch_id)
            progress = find_batch(latest, batch_id) if latest is not None else None
            now = self.clock()
            if (latest is None or claimant != claim["owner"] or held_until is None or held_until <= now
                    or (progress is not None and progress["status"] == "sent")):
                return
            await self.store.put(with_claim(latest, {**claim, "expires_at": now}))
            event(log, "claim_released", customer=key, batch_id=batch_id)

        if expires_at is None:
            return
        try:
            await asyncio.wait_for(release(), RELEASE_SECONDS)
        except Exception as exc:  # the hold then ends at its time: the safe side
            event(log, "claim_release_failed", logging.WARNING, customer=key, batch_id=batch_id,
                  error=type(exc).__name__)

    async def _claim(self, key: str, claim: BatchClaim) -> tuple[ResponderState, BatchProgress | None]:
        """Writes the claim on the customer's latest state. A record another worker wrote between
        that state and the claim (after our read to the end) is taken in and the claim written
        again on it, so nothing of it is lost and its progress on the batch is seen."""
        state = with_claim(self.store.watch(key) or empty_state(key), claim)
        try:
            written = await self._persist(state)
            await self.store.read_past(*written)
        except BaseException:
            self.store.written_between(key, -1)  # ends the watch
            raise
        missed = self.store.written_between(key, written[1])
        if missed is not None:
            event(log, "claim_rebased", logging.WARNING, customer=key, batch_id=claim["batch_id"])
            state = with_claim(missed, claim)
            await self._persist(state)
        return state, find_batch(state, claim["batch_id"])

    async def _republish(
        self, request: ResponderRequest, state: ResponderState, progress: BatchProgress
    ) -> str:
        """A redelivered batch that is `sent` already: no OpenAI call, nothing sent."""
        batch_id = request["batch_id"]
        metrics.dedupe_hits_total.labels("responder_batch").inc()
        # the original send time: re-publishing "now" would move the context's cutoff past
        # whatever humans wrote since (docs/old-system.md, bug 6). Records from before `sent_at` was
        # stored fall back to the state's time when this batch was its last change.
        sent_at = progress.get("sent_at") or (
            state["updated_at"] if state["batches"][-1]["batch_id"] == batch_id else None)
        await self._publish(request, progress, state["conversation_id"], redelivered=True, sent_at=sent_at)
        return "duplicate"

    async def _still_ours(
        self, claim: BatchClaim, key: str, written: tuple[TopicPartition, int] | None = None
    ) -> bool:
        """The fence (module docstring): reads the state topic up to our own write `written` (all
        that was ordered before it), or else to its end; True when our claim is the newest on the
        batch and the batch is not `sent` — else logs and counts a fenced batch."""
        if written is not None:
            await self.store.read_past(*written)
        else:
            await self._kafka(lambda: self.store.catch_up(key))
        claimant = self.store.claimant(key, claim["batch_id"])
        latest = self.store.get(key)
        progress = find_batch(latest, claim["batch_id"]) if latest is not None else None
        if claimant == claim["owner"] and (progress is None or progress["status"] != "sent"):
            return True
        metrics.dedupe_hits_total.labels("responder_fenced").inc()
        event(log, "batch_fenced", logging.WARNING, customer=key, batch_id=claim["batch_id"],
              reason="sent by another worker" if claimant == claim["owner"] else "claimed by another worker")
        return False

    async def _produce_text(
        self, request: ResponderRequest, record: ConsumerRecord, state: ResponderState, claim: BatchClaim
    ) -> tuple[ResponderState, BatchProgress | None]:
        """Generates the answer (or takes the fallback) and persists it as `generated`, with
        `sent_at` = now: the send begins right after. Raises _Fenced when another worker claimed
        the batch meanwhile (checked after that write: see the module docstring)."""
        key, batch_id = request["customer_key"], request["batch_id"]
        failure: AIFailure | None = None
        try:
            async with asyncio.timeout(self.deadline) as deadline:
                state, generated = await self._generate(request, state)
        except TimeoutError:
            if not deadline.expired():
                raise
            failure = AIFailure("openai_deadline", f"no answer within {self.deadline:g} s")
            event(log, "openai_deadline", logging.WARNING, customer=key, batch_id=batch_id)
            state = with_claim(self.store.get(key) or state, claim)
        except AIFailure as exc:
            failure = exc
            # what was persisted before the failure (e.g. a conversation just created) is kept
            state = with_claim(self.store.get(key) or state, claim)
        if failure is not None and not self.fallback_text:
            if not await self._still_ours(claim, key):
                raise _Fenced()
            await self._dead_letter(record, failure.reason, failure.detail, key, batch_id)
            return state, None
        if failure is not None:
            progress = _progress(batch_id, "generated", self.fallback_text, None, sent_at=utcnow())
        else:
            progress = _progress(batch_id, "generated", generated.text, generated.response_id,
                                 generated.input_tokens, generated.output_tokens, sent_at=utcnow())
        # the hold now covers the send only: a waiting worker must not resume it while it runs
        renewed = self._new_claim(batch_id, claim["owner"], self.send_hold)
        state = with_claim(with_progress(state, progress), renewed)
        written = await self._persist(state)
        if not await self._still_ours(claim, key, written):
            raise _Fenced()
        if failure is not None:
            await self._dead_letter(record, failure.reason, failure.detail, key, batch_id)
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
                return state, await self.repliers.for_key(key).reply(
                    conversation_id, input_items, key, request["batch_id"])
            except ConversationGone as gone:
                if recreated:
                    raise AIFailure("conversation_not_found", str(gone)) from None
                event(log, "conversation_gone", logging.WARNING, customer=key, conversation=conversation_id)
                recreated = True
                state = {**state, "conversation_id": None}

    async def _new_conversation(self, state: ResponderState, channel: str) -> ResponderState:
        """Creates the customer's conversation and persists its id BEFORE it is used."""
        conversation_id = await self.repliers.for_key(state["customer_key"]).create_conversation(
            state["customer_key"], channel)
        state = with_conversation(state, conversation_id)
        await self._persist(state)
        event(log, "conversation_created", customer=state["customer_key"], conversation=conversation_id)
        return state

    async def _send_and_finish(
        self, request: ResponderRequest, record: ConsumerRecord, state: ResponderState,
        progress: BatchProgress, claim: BatchClaim, *, resume: bool = False,
    ) -> str:
        key, batch_id = request["customer_key"], request["batch_id"]
        if resume and not await self._still_ours(claim, key):  # (a new answer was checked already)
            return "fenced"
        # The reply's time is when the send BEGAN, as written ahead with `generated` (before a
        # crash, when resumed): a later time would put human messages written meanwhile before the
        # next cutoff; our own parts after it are excluded by their ids. Entries written before
        # `generated` carried it fall back to now.
        send_started = progress.get("sent_at") or utcnow()
        try:
            sent = await self.sender.send(
                request["channel"], request["provider_id"], progress["text"], batch_id, resume=resume,
                customer_key=key,
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
            metrics.replies_total.labels(outcome, metrics.key_tenant(request["customer_key"])).inc()

    async def _persist(self, state: ResponderState) -> tuple[TopicPartition, int]:
        """Writes the state ahead (acked) and returns where it was written."""
        return await self._kafka(lambda: self.store.put(state))

    async def _dead_letter(
        self, record: ConsumerRecord, reason: str, error: str, customer_key: str | None, batch_id: str | None
    ) -> None:
        await self._kafka(lambda: dead_letter(
            self.producer, self.topics, service=SERVICE, reason=reason, error=error,
            source_topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
            payload=record.value, customer_key=customer_key, batch_id=batch_id,
        ))

    async def _kafka(self, write: Callable[[], Awaitable[T]]) -> T:
        """A write the next step depends on, retried with backoff: for as long as the broker is
        unreachable (the customer's batch waits, nothing is lost; a stop cancels and the batch is
        redelivered), `kafka_attempts` times for other Kafka errors, which then propagate."""
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                return await write()
            except (KafkaError, OSError) as exc:
                outage = isinstance(exc, KafkaTimeoutError | KafkaConnectionError | OSError) or bool(
                    getattr(exc, "retriable", False))
                if not outage and attempt >= self.kafka_attempts:
                    raise
                event(log, "kafka_write_retry", logging.WARNING, error=type(exc).__name__, attempt=attempt)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)


class _Fenced(Exception):
    """Another worker claimed the batch: this handling must not write, send or publish anything."""


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

