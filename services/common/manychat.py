"""ManyChat sending client: `POST /fb/sending/sendContent` (docs/manychat.md).

Failures are `ManyChatError` with a short `reason` safe to log (never the body, the subscriber id
or the token) and `retryable`. When a reply needs several calls (more than 10 messages) and a later
call fails, `sent_messages` tells how many texts already went out, so a retry can skip them.
The client never logs; callers log with `logs.event`.
"""

from __future__ import annotations

from typing import Any

import httpx

from .provider_http import ProviderClient

MAX_TEXT_CHARS = 2000
MAX_MESSAGES_PER_CALL = 10


class ManyChatError(Exception):
    """A ManyChat call failed; `reason` is a short code safe to log."""

    def __init__(
        self, reason: str, *, status: int | None = None, retryable: bool = False, sent_messages: int = 0
    ) -> None:
        super().__init__(f"ManyChat {reason}" + (f" (HTTP {status})" if status is not None else ""))
        self.reason = reason
        self.status = status
        self.retryable = retryable
        self.sent_messages = sent_messages


def send_content_body(
    subscriber_id: str, texts: list[str], *, instagram: bool, message_tag: str | None = None
) -> dict[str, Any]:
    """One sendContent body; `content.type` is "instagram" or absent (Facebook)."""
    content: dict[str, Any] = {"messages": [{"type": "text", "text": t} for t in texts]}
    if instagram:
        content = {"type": "instagram", **content}
    ident: int | str = int(subscriber_id) if subscriber_id.isdigit() else subscriber_id
    body: dict[str, Any] = {"subscriber_id": ident, "data": {"version": "v2", "content": content}}
    if message_tag:
        body["message_tag"] = message_tag
    return body


def _status_error(status: int, sent: int) -> ManyChatError:
    if status == 429:
        return ManyChatError("rate_limited", status=status, retryable=True, sent_messages=sent)
    if status >= 500:
        return ManyChatError("server_error", status=status, retryable=True, sent_messages=sent)
    if status in (401, 403):
        return ManyChatError("unauthorized", status=status, sent_messages=sent)
    if status == 400:
        return ManyChatError("rejected", status=status, sent_messages=sent)
    return ManyChatError("client_error", status=status, sent_messages=sent)


class ManyChatClient(ProviderClient):
    """A ManyChat page's sending API (the Bearer token is the page API key)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        message_tag: str | None = None,
    ) -> None:
        super().__init__("ManyChat", base_url, token, timeout=timeout, transport=transport)
        self._url = self._base + "/fb/sending/sendContent"
        self._message_tag = message_tag

    async def send_content(self, subscriber_id: str, texts: list[str], *, instagram: bool) -> None:
        """Sends the texts in order, ≤ 10 per call; each text must be ≤ 2000 characters.

        Raises ValueError before sending anything when a text is empty or too long (splitting
        is the caller's job), ManyChatError when a call fails.
        """
        subscriber = str(subscriber_id).strip()
        if not subscriber:
            raise ValueError("empty subscriber id")
        if not texts:
            raise ValueError("no texts to send")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty message text")
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"message text longer than {MAX_TEXT_CHARS} characters")
        sent = 0
        for start in range(0, len(texts), MAX_MESSAGES_PER_CALL):
            chunk = texts[start:start + MAX_MESSAGES_PER_CALL]
            body = send_content_body(subscriber, chunk, instagram=instagram, message_tag=self._message_tag)
            await self._post(body, sent)
            sent += len(chunk)

    async def _post(self, body: dict[str, Any], sent: int) -> None:
        try:
            response = await self._http.post(self._url, json=body)
        except httpx.TimeoutException:
            raise ManyChatError("timeout", retryable=True, sent_messages=sent) from None
        except httpx.HTTPError:
            raise ManyChatError("connection_error", retryable=True, sent_messages=sent) from None
        if response.status_code != 200:
            raise _status_error(response.status_code, sent)
        try:
            doc = response.json()
        except ValueError:
            raise ManyChatError("bad_response", status=200, sent_messages=sent) from None
        if not isinstance(doc, dict):
            raise ManyChatError("bad_response", status=200, sent_messages=sent)
        if doc.get("status") != "success":
            raise ManyChatError("status_error", status=200, sent_messages=sent)
