"""OpenAI calls of the responder: create a conversation, create a response in it — with our retries.

The SDK's own retries are off (`max_retries=0`) because its policy retries every 429, including
`insufficient_quota`, which never heals by waiting. Here:
- 429 `rate_limit_exceeded`, 408, 409, 5xx, timeouts, connection errors: retried with exponential
  backoff (0.5 s doubling to 8 s, jitter) or the server's `retry-after-ms` / `Retry-After` when it
  sends one (up to 120 s; longer means give up), for `OPENAI_MAX_ATTEMPTS` attempts in total;
- 400 `conversation_locked` (another request on the conversation still running, e.g. one of ours
  that timed out on our side): waited out in short steps; not counted as an attempt (bounded apart);
- 404 on a response that names the conversation: it is gone (`ConversationGone`), the caller
  recreates it; a 404 that does not (e.g. a deleted `file_id` in an image part) is checked by
  retrieving the conversation: gone only if that 404s too, else `not_found` fails the batch and
  the conversation, with the customer's history, is kept;
- everything else (400, 401, 403, 429 billing — `type: insufficient_quota`, whatever its `code` —,
  bad response) fails at once. Classification: `services/common/openai_errors.py`.
Failures are `AIFailure(reason, detail)`; `detail` holds status, code and ids only — never the
customer's text nor the API's message, which may quote it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from openai import AsyncOpenAI

from ..common import metrics
from ..common.keys import DEFAULT_TENANT, parse_key
from ..common.logs import event
from ..common.openai_accounts import openai_http_client
from ..common.openai_errors import ErrorBody, ErrorClass, classify, retry_after_seconds

log = logging.getLogger(__name__)

T = TypeVar("T")

INITIAL_DELAY = 0.5
MAX_DELAY = 8.0
MAX_RETRY_AFTER = 120.0
LOCKED_WAIT = 1.0
MAX_LOCKED_WAITS = 30


class AIFailure(Exception):
    """No answer could be produced; `reason` is a short code, `detail` is safe to log/dead-letter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConversationGone(Exception):
    """OpenAI answered 404 for the conversation (named in the error, or confirmed by retrieving it)."""


def backoff_delay(
    attempt: int, retry_after: float | None, rand: Callable[[], float] = random.random
) -> float:
    """Pure: the wait before retry number `attempt` (1-based): the server's hint, else exponential."""
    if retry_after is not None:
        return retry_after
    base = min(INITIAL_DELAY * 2 ** (attempt - 1), MAX_DELAY)
    return base * (1 - 0.25 * rand())


def customer_hash(customer_key: str) -> str:
    """A stable pseudonym of the customer for OpenAI (safety_identifier, metadata): never the number."""
    return hashlib.sha256(customer_key.encode()).hexdigest()[:32]


def batch_reference(batch_id: str, customer_key: str) -> str:
    """The batch as OpenAI sees it (response metadata): the customer's pseudonym and the batch's
    number. A batch id starts with the customer key, which holds the phone number."""
    prefix = f"{customer_key}:"
    if batch_id.startswith(prefix):
        number = batch_id[len(prefix):]
    else:
        number = hashlib.sha256(batch_id.encode()).hexdigest()[:16]
    return f"{customer_hash(customer_key)}:{number}"[:512]


def make_client(api_key: str, base_url: str, timeout: float, project: str | None = None) -> AsyncOpenAI:
    """The responder's OpenAI client (our retries, not the SDK's); `project`: the OpenAI-Project
    its calls are made in (a tenant's own project)."""
    return AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0, project=project,
                       http_client=openai_http_client(timeout=timeout))


@dataclass(frozen=True)
class Generated:
    text: str
    response_id: str
    input_tokens: int
    output_tokens: int


def answer_of(response: Any) -> Generated:
    """The answer of a response, or AIFailure for empty output, a refusal or an incomplete answer."""
    status = getattr(response, "status", None)
    text = str(getattr(response, "output_text", "") or "")
    refused = any(
        getattr(part, "type", None) == "refusal"
        for item in (getattr(response, "output", None) or [])
        for part in (getattr(item, "content", None) or [])
    )
    rid = str(getattr(response, "id", "") or "")
    if status == "incomplete":
        details = getattr(response, "incomplete_details", None)
        why = getattr(details, "reason", None) or "unknown"
        raise AIFailure("incomplete", f"response {rid} incomplete ({why})")
    if status == "failed":
        raise AIFailure("failed", f"response {rid} failed")
    if refused and not text.strip():
        raise AIFailure("refusal", f"response {rid} refused")
    if not text.strip():
        raise AIFailure("empty_output", f"response {rid} has no output text")
    usage = getattr(response, "usage", None)
    return Generated(
        text=text.strip(), response_id=rid,
        input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
    )


class Replier:
    """The responder's two OpenAI operations, with the retry policy of the module docstring."""

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        instructions: str,
        max_attempts: int,
        max_output_tokens: int | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        locked_wait: float = LOCKED_WAIT,
        max_locked_waits: int = MAX_LOCKED_WAITS,
    ) -> None:
        self.client = client
        self.model = model
        self.instructions = instructions
        self.max_attempts = max(1, max_attempts)
        self.max_output_tokens = max_output_tokens
        self.sleep = sleep
        self.locked_wait = locked_wait
        self.max_locked_waits = max_locked_waits

    async def create_conversation(self, customer_key: str, channel: str) -> str:
        """A new conversation for the customer (metadata: a hash of the key and the channel only)."""
        metadata = {"service": "watistream", "channel": channel, "customer": customer_hash(customer_key)}
        conversation = await self._call(
            "conversation", lambda: self.client.conversations.create(metadata=metadata), ids="",
            tenant=metrics.key_tenant(customer_key),
        )
        return str(conversation.id)

    async def reply(
        self, conversation_id: str, input_items: list[dict[str, Any]], customer_key: str, batch_id: str
    ) -> Generated:
        """One answer in the conversation; ConversationGone on 404, AIFailure when none can be had."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "instructions": self.instructions,
            "conversation": conversation_id,
            "input": input_items,
            "safety_identifier": customer_hash(customer_key),
            "metadata": {"batch": batch_reference(batch_id, customer_key)},
        }
        if self.max_output_tokens:
            kwargs["max_output_tokens"] = self.max_output_tokens
        try:
            response = await self._call(
                "reply", lambda: self.client.responses.create(**kwargs),
                ids=f"conversation {conversation_id}", conversation_id=conversation_id,
                tenant=metrics.key_tenant(customer_key),
            )
        except AIFailure as failure:
            if failure.reason == "not_found" and await self._conversation_is_gone(
                    conversation_id, metrics.key_tenant(customer_key)):
                raise ConversationGone(failure.detail) from None
            raise
        return answer_of(response)

    async def _conversation_is_gone(self, conversation_id: str, tenant: str) -> bool:
        """After a 404 that did not name the conversation: does the conversation still exist?
        Only a 404 on retrieving it says it is gone; anything else keeps it (and its history)."""
        started = time.monotonic()
        try:
            await self.client.conversations.retrieve(conversation_id)
            outcome = "ok"
        except openai.NotFoundError:
            outcome = "conversation_not_found"
        except openai.OpenAIError as exc:
            outcome = classify(exc.status_code if isinstance(exc, openai.APIStatusError) else None,
                               ErrorBody.of(getattr(exc, "body", None))).reason
        metrics.openai_latency_seconds.labels("conversation_check").observe(time.monotonic() - started)
        metrics.openai_requests_total.labels("conversation_check", outcome, tenant).inc()
        return outcome == "conversation_not_found"

    async def _call(
        self, purpose: str, call: Callable[[], Awaitable[T]], ids: str, conversation_id: str | None = None,
        *, tenant: str,
    ) -> T:
        """`call` with the retry policy; `tenant`: the customer's tenant label of the call's metrics."""
        attempt = 0
        locked_waits = 0
        while True:
            started = time.monotonic()
            try:
                result = await call()
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                metrics.openai_latency_seconds.labels(purpose).observe(time.monotonic() - started)
                status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
                error = ErrorBody.of(getattr(exc, "body", None))
                code = error.code or exc.code
                kind = classify(status, error, conversation_id)
                if isinstance(exc, openai.APITimeoutError):
                    kind = ErrorClass("timeout", True)
                metrics.openai_requests_total.labels(purpose, kind.reason, tenant).inc()
                detail = f"{purpose}: HTTP {status if status is not None else '-'} code {code or '-'} {ids}"
                if kind.gone:
                    raise ConversationGone(detail) from None
                if kind.locked:
                    locked_waits += 1
                    if locked_waits > self.max_locked_waits:
                        raise AIFailure("conversation_locked", detail) from None
                    await self.sleep(self.locked_wait * (1 + 0.5 * random.random()))
                    continue
                attempt += 1
                if not kind.retryable:
                    raise AIFailure(kind.reason, detail) from None
                if attempt >= self.max_attempts:
                    raise AIFailure(kind.reason, f"{detail} after {attempt} attempts") from None
                headers = exc.response.headers if isinstance(exc, openai.APIStatusError) else None
                hint = retry_after_seconds(headers, now=time.time())
                if hint is not None and hint > MAX_RETRY_AFTER:
                    raise AIFailure(kind.reason, f"{detail}; retry-after {hint:.0f}s too long") from None
                delay = backoff_delay(attempt, hint)
                event(log, "openai_retry", logging.WARNING, purpose=purpose, reason=kind.reason,
                      attempt=attempt, delay=round(delay, 3))
                await self.sleep(delay)
                continue
            except openai.OpenAIError as exc:  # bad response body and the like
                metrics.openai_requests_total.labels(purpose, "bad_response", tenant).inc()
                raise AIFailure("bad_response", f"{purpose}: {type(exc).__name__} {ids}") from None
            metrics.openai_latency_seconds.labels(purpose).observe(time.monotonic() - started)
            metrics.openai_requests_total.labels(purpose, "ok", tenant).inc()
            return result


class TenantRepliers:
    """Each tenant's Replier (its model, its instructions, its OpenAI account's client), by the
    tenant of the customer key: a customer is answered only with its own tenant's prompt and model,
    in its own tenant's OpenAI project. Built once at start; one Replier per tenant."""

    def __init__(self, by_tenant: Mapping[str, Replier], *, every: Replier | None = None) -> None:
        self.by_tenant = dict(by_tenant)
        self.every = every

    @classmethod
    def single(cls, replier: Replier) -> TenantRepliers:
        """One Replier for every customer (callers without tenants: tests, tools)."""
        return cls({}, every=replier)

    @property
    def default(self) -> Replier:
        """The `default` tenant's Replier (tests and tools reach its client through it)."""
        return self.every if self.every is not None else self.by_tenant[DEFAULT_TENANT]

    def for_key(self, customer_key: str) -> Replier:
        """The Replier of the key's tenant; NoTenant when the tenant is not configured."""
        if self.every is not None:
            return self.every
        tenant = parse_key(customer_key).tenant
        try:
            return self.by_tenant[tenant]
        except KeyError:
            raise NoTenant(f"tenant {tenant!r} is not configured") from None


class NoTenant(LookupError):
    """The customer key's tenant has no Replier (not configured)."""
