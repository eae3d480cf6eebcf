"""Sending an answer to the customer's channel: WATI session messages or ManyChat sendContent.

The answer is split to the channel's limit (WATI 4096, ManyChat 2000 characters; ManyChat's client
sends ≤ 10 messages per call). Retryable failures (429, 5xx, timeouts) are retried a few times with
backoff (WATI's Retry-After honoured, capped), resuming after the parts already delivered; WATI's
`result: false` and other non-retryable failures end the send: `SendFailed` says which parts went out.
WATI parts carry a `localMessageId` derived from the batch id, so the same part keeps the same id.

A send resumed after a crash (`resume=True`: the batch was generated, maybe partly or wholly sent,
but `sent` was never recorded) first looks for the batch's parts in the contact's newest WATI history
page by that `localMessageId`, and sends only the parts WATI does not have: a responder SIGKILLed
while WATI was accepting its reply must not send the reply twice (chaos drill, issue 7). A failed
lookup sends anyway: a possible duplicate is better than no answer. ManyChat has no history to ask:
its resumed sends stay at-least-once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..common import metrics
from ..common.manychat import ManyChatClient, ManyChatError
from ..common.wati import WatiClient, WatiError, sent_message_ids
from .splitting import limit_for, split_message

MAX_RETRY_AFTER = 10.0
#: history items searched for the parts of a resumed send (WATI lists the newest first).
RESUME_LOOKUP_ITEMS = 100


class SendFailed(Exception):
    """The answer (or part of it) could not be sent; `reason` is a short code safe to log."""

    def __init__(self, reason: str, sent_parts: list[str], ids: list[str]) -> None:
        super().__init__(f"send failed: {reason} after {len(sent_parts)} part(s)")
        self.reason = reason
        self.sent_parts = sent_parts
        self.ids = ids


@dataclass
class Sent:
    parts: list[str]
    ids: list[str] = field(default_factory=list)


def local_message_id(batch_id: str, index: int) -> str:
    """Deterministic per (batch, part): a resend of the same part carries the same id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"watistream:{batch_id}:{index}"))


class ChannelSender:
    """Sends texts through the configured providers; a missing provider fails the send explicitly."""

    def __init__(
        self,
        wati: WatiClient | None,
        manychat: ManyChatClient | None,
        *,
        attempts: int = 3,
        base_delay: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.wati = wati
        self.manychat = manychat
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self.sleep = sleep

    async def aclose(self) -> None:
        if self.wati is not None:
            await self.wati.aclose()
        if self.manychat is not None:
            await self.manychat.aclose()

    async def send(
        self, channel: str, provider_id: str, text: str, batch_id: str, *, resume: bool = False
    ) -> Sent:
        parts = split_message(text, limit_for(channel))
        if not parts:
            raise SendFailed("empty_text", [], [])
        if channel == "wati":
            return await self._send_wati(provider_id, parts, batch_id, resume=resume)
        if channel in ("facebook", "instagram"):
            return await self._send_manychat(provider_id, parts, instagram=channel == "instagram")
        raise SendFailed("unknown_channel", [], [])

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        return float(self.base_delay * 2 ** (attempt - 1))

    async def _send_wati(self, contact_id: str, parts: list[str], batch_id: str, *, resume: bool) -> Sent:
        if self.wati is None:
            metrics.send_failures_total.labels("wati", "not_configured").inc()
            raise SendFailed("channel_not_configured", [], [])
        delivered = await self._delivered_wati(contact_id, batch_id, len(parts)) if resume else {}
        sent = Sent([])
        for index, part in enumerate(parts):
            if index in delivered:  # WATI has it already (sent before a crash): never twice
                sent.parts.append(part)
                sent.ids.extend(delivered[index])
                continue
            attempt = 0
            while True:
                attempt += 1
                try:
                    ids = await self.wati.send_session_message(
                        contact_id, part, local_message_id=local_message_id(batch_id, index)
                    )
                except WatiError as exc:
                    metrics.send_failures_total.labels("wati", exc.reason).inc()
                    if not exc.retryable or attempt >= self.attempts:
                        raise SendFailed(exc.reason, sent.parts, sent.ids) from None
                    await self.sleep(self._delay(attempt, exc.retry_after))
                    continue
                except ValueError:
                    metrics.send_failures_total.labels("wati", "invalid_text").inc()
                    raise SendFailed("invalid_text", sent.parts, sent.ids) from None
                sent.parts.append(part)
                sent.ids.extend(ids)
                break
        return sent

    async def _delivered_wati(self, contact_id: str, batch_id: str, count: int) -> dict[int, list[str]]:
        """Part index → ids of the parts of this batch already in WATI's history (by localMessageId)."""
        assert self.wati is not None
        wanted = {local_message_id(batch_id, index): index for index in range(count)}
        try:
            page = await self.wati.get_messages_page(contact_id, 1, RESUME_LOOKUP_ITEMS)
        except WatiError as exc:
            metrics.send_failures_total.labels("wati", f"resume_lookup_{exc.reason}").inc()
            return {}
        found: dict[int, list[str]] = {}
        for item in page.items:
            local_id = item.get("localMessageId")
            if isinstance(local_id, str) and local_id in wanted:
                found[wanted[local_id]] = sent_message_ids({"message": item}, local_id)
        return found

    async def _send_manychat(self, subscriber_id: str, parts: list[str], *, instagram: bool) -> Sent:
        channel = "instagram" if instagram else "facebook"
        if self.manychat is None:
            metrics.send_failures_total.labels(channel, "not_configured").inc()
            raise SendFailed("channel_not_configured", [], [])
        remaining = list(parts)
        delivered: list[str] = []
        attempt = 0
        while remaining:
            attempt += 1
            try:
                await self.manychat.send_content(subscriber_id, remaining, instagram=instagram)
            except ManyChatError as exc:
                metrics.send_failures_total.labels(channel, exc.reason).inc()
                done = max(0, min(exc.sent_messages, len(remaining)))
                delivered.extend(remaining[:done])
                remaining = remaining[done:]
                if not exc.retryable or attempt >= self.attempts:
                    raise SendFailed(exc.reason, delivered, []) from None
                await self.sleep(self._delay(attempt, None))
                continue
            except ValueError:
                metrics.send_failures_total.labels(channel, "invalid_text").inc()
                raise SendFailed("invalid_text", delivered, []) from None
            delivered.extend(remaining)
            remaining = []
        return Sent(delivered, [])
