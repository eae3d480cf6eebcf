"""ManyChat stand-in: `POST /fb/sending/sendContent`, validated like docs/manychat.md.

Answers (shapes chosen where the reference is silent):
- success: HTTP 200 `{"status": "success"}`;
- invalid body: HTTP 400 `{"status": "error", "message": "Validation error",
  "details": {"messages": [{"message": "..."}]}}` — e.g. "Provided text is longer than 2000 symbols";
- wrong/missing Bearer token: HTTP 401 `{"status": "error", "message": "Unauthorized", "details": []}`.
- `GET /fb/page/getInfo` (the cheap authenticated call of `watistream check`): HTTP 200
  `{"status": "success", "data": {"id": <page id>, "name": <page name>, ...}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ._base import (
    DEFAULT_MANYCHAT_TOKEN,
    Fault,
    FaultQueue,
    StandInServer,
    bearer_token,
    fault_response,
    merged_headers,
)

MAX_TEXT_CHARS = 2000
MAX_MESSAGES = 10
CONTENT_TYPES = ("instagram", "whatsapp", "telegram")


@dataclass
class ManyChatSent:
    """One accepted sendContent call."""

    subscriber_id: str
    channel: str  # "facebook" when content.type is absent, else content.type
    texts: list[str]
    messages: list[dict[str, Any]]
    message_tag: str | None
    body: dict[str, Any]
    at: datetime


class ManyChatValidationError(ValueError):
    pass


def validate_send_content(body: object) -> ManyChatSent:
    """Checks a sendContent body as ManyChat does; raises ManyChatValidationError with its wording."""
    if not isinstance(body, dict):
        raise ManyChatValidationError("Request body must be a JSON object")
    subscriber = body.get("subscriber_id")
    if isinstance(subscriber, bool) or not isinstance(subscriber, int | str) or not str(subscriber).strip():
        raise ManyChatValidationError("subscriber_id is required")
    if not str(subscriber).strip().isdigit():
        raise ManyChatValidationError("subscriber_id must be an integer")
    data = body.get("data")
    if not isinstance(data, dict):
        raise ManyChatValidationError("data is required")
    if data.get("version") != "v2":
        raise ManyChatValidationError("Unsupported data version, expected v2")
    content = data.get("content")
    if not isinstance(content, dict):
        raise ManyChatValidationError("data.content is required")
    content_type = content.get("type")
    if content_type is not None and content_type not in CONTENT_TYPES:
        raise ManyChatValidationError(f"Unsupported content type {content_type!r}")
    messages = content.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ManyChatValidationError("content.messages must be a non-empty array")
    if len(messages) > MAX_MESSAGES:
        raise ManyChatValidationError(f"Too many messages: at most {MAX_MESSAGES} are allowed")
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise ManyChatValidationError("Each message must be an object")
        kind = message.get("type")
        if kind == "text":
            text = message.get("text")
            if not isinstance(text, str) or not text:
                raise ManyChatValidationError("Text message must have a non-empty text")
            if len(text) > MAX_TEXT_CHARS:
                raise ManyChatValidationError(f"Provided text is longer than {MAX_TEXT_CHARS} symbols")
            texts.append(text)
        elif kind in ("image", "video", "audio", "file"):
            if content_type == "instagram" and kind == "file":
                raise ManyChatValidationError("Instagram does not support file attachments")
            if not isinstance(message.get("url"), str) or not message["url"]:
                raise ManyChatValidationError(f"{kind} message must have a url")
        else:
            raise ManyChatValidationError(f"Unsupported message type {kind!r}")
    tag = body.get("message_tag")
    if tag is not None and not isinstance(tag, str):
        raise ManyChatValidationError("message_tag must be a string")
    return ManyChatSent(
        subscriber_id=str(subscriber).strip(),
        channel=content_type or "facebook",
        texts=texts,
        messages=list(messages),
        message_tag=tag,
        body=body,
        at=datetime.now(UTC),
    )


def _error(status: int, message: str, details: Any) -> web.Response:
    return web.json_response({"status": "error", "message": message, "details": details}, status=status)


class ManyChatStandIn(StandInServer):
    """ManyChat's sending API with recorded sends and fault injection."""

    def __init__(self, token: str = DEFAULT_MANYCHAT_TOKEN, *, page_id: str = "987",
                 page_name: str = "Tienda Demo") -> None:
        super().__init__()
        self.token = token
        self.page_id = page_id
        self.page_name = page_name
        self.sent: list[ManyChatSent] = []
        self.faults = FaultQueue()

    def fail_next(
        self,
        status: int,
        times: int = 1,
        body: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        after: int = 0,
    ) -> None:
        """The next `times` sendContent calls (after `after` normal ones) get this answer.

        Failed calls are not recorded in `sent`.
        Defaults: 429 carries `Retry-After: 0`; the body is `{"status": "error", ...}`. Passing
        `headers` replaces the defaults; `body` may be anything, e.g. non-JSON garbage.
        """
        default_headers = {"Retry-After": "0"} if status == 429 else {}
        if body is None:
            body = json.dumps({"status": "error", "message": f"Injected failure (HTTP {status})",
                               "details": []})
        self.faults.add("send", Fault(
            status, body, merged_headers(default_headers, headers), times, after=after))

    def texts_for(self, subscriber_id: str) -> list[str]:
        """Every text sent to one subscriber, in order."""
        return [t for s in self.sent if s.subscriber_id == str(subscriber_id) for t in s.texts]

    def reset(self) -> None:
        self.sent.clear()
        self.requests.clear()
        self.faults.clear()
        self.latency = 0.0

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/fb/sending/sendContent", self._send_content)
        app.router.add_get("/fb/page/getInfo", self._page_info)
        return app

    async def _page_info(self, request: web.Request) -> web.Response:
        await self.record(request, None)
        await self.delay()
        if bearer_token(request) != self.token:
            return _error(401, "Unauthorized", [])
        return web.json_response({"status": "success", "data": {
            "id": int(self.page_id) if self.page_id.isdigit() else self.page_id, "name": self.page_name,
            "category": "Shopping & retail", "avatar_link": None, "username": None, "about": None,
            "description": None, "is_pro": True, "timezone": "UTC",
        }})

    async def _send_content(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        await self.record(request, body if body is not None else raw.decode("utf-8", "replace"))
        await self.delay()
        if bearer_token(request) != self.token:
            return _error(401, "Unauthorized", [])
        fault = self.faults.take("send")
        if fault is not None:
            return fault_response(fault)
        try:
            sent = validate_send_content(body)
        except ManyChatValidationError as exc:
            return _error(400, "Validation error", {"messages": [{"message": str(exc)}]})
        self.sent.append(sent)
        return web.json_response({"status": "success"})
