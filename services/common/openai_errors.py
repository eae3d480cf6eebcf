"""What an OpenAI error answer means, as the real API sends it: pure functions over status and body.

Shared by the responder (its own retry policy) and vision (the SDK's retries, our metric labels).

- Billing: a 429 whose `type` is `insufficient_quota`, whatever its `code` — today one of
  `BILLING_CODES` (credit balance exhausted, spend or usage limit reached), older bodies `null` or
  `insufficient_quota`. Waiting does not heal it: not retried, reason `insufficient_quota`.
  A 429 of any other type (`requests`, `tokens`, ...) is a rate limit: retried.
- 404: "conversation gone" only when the error names the conversation (its `param` is
  `conversation`, or its message mentions the conversation or its id). Any other 404 — a deleted
  `file_id` in an image part, an unknown model — is a plain failure: recreating the conversation
  would drop the customer's history and would not bring the file back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

#: `code` values OpenAI sends with `type: "insufficient_quota"` (and the older `insufficient_quota`)
BILLING_CODES = frozenset({
    "insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded", "organization_usage_limit_exceeded",
})
BILLING_TYPE = "insufficient_quota"
_CONVERSATION_WORD = re.compile(r"\bconversation\b", re.IGNORECASE)


@dataclass(frozen=True)
class ErrorClass:
    """What to do about one failed call: `reason` is a bounded metric label and dead-letter reason."""

    reason: str
    retryable: bool
    locked: bool = False
    gone: bool = False


@dataclass(frozen=True)
class ErrorBody:
    """The `error` object of an OpenAI error answer (every field may be missing)."""

    type: str | None = None
    code: str | None = None
    param: str | None = None
    message: str | None = None

    @classmethod
    def of(cls, body: object) -> ErrorBody:
        """From the SDK's `exc.body` (the `error` object) or a whole answer `{"error": {...}}`."""
        if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
            body = body["error"]
        if not isinstance(body, Mapping):
            return cls()

        def text(key: str) -> str | None:
            value = body.get(key)
            return value if isinstance(value, str) else None

        return cls(text("type"), text("code"), text("param"), text("message"))


def is_billing(status: int | None, error: ErrorBody) -> bool:
    """A 429 that waiting does not heal: the account has no credit or hit a spend/usage limit."""
    return status == 429 and (error.type == BILLING_TYPE or error.code in BILLING_CODES)


def names_conversation(error: ErrorBody, conversation_id: str | None) -> bool:
    """The error is about the conversation itself (not a file, a model or a previous response)."""
    param = (error.param or "").split(".", 1)[0].split("[", 1)[0]
    if param:
        return param == "conversation"
    message = error.message or ""
    if conversation_id and conversation_id in message:
        return True
    return bool(_CONVERSATION_WORD.search(message))


def classify(
    status: int | None, error: ErrorBody | None = None, conversation_id: str | None = None
) -> ErrorClass:
    """Pure: an HTTP status (None = timeout/connection) and the error body → reason and retryability.

    `conversation_id` is the conversation the request was about, if any (a 404 naming it means the
    conversation is gone)."""
    error = error or ErrorBody()
    if status is None:
        return ErrorClass("connection_error", True)
    if status == 400 and error.code == "conversation_locked":
        return ErrorClass("conversation_locked", True, locked=True)
    if status == 404:
        if error.code == "model_not_found":
            return ErrorClass("model_not_found", False)
        if names_conversation(error, conversation_id):
            return ErrorClass("conversation_not_found", False, gone=True)
        return ErrorClass("not_found", False)
    if status == 429:
        if is_billing(status, error):
            return ErrorClass("insufficient_quota", False)
        return ErrorClass("rate_limited", True)
    if status in (408, 409):
        return ErrorClass("timeout" if status == 408 else "conflict", True)
    if status >= 500:
        return ErrorClass("server_error", True)
    if status in (401, 403):
        return ErrorClass("unauthorized", False)
    return ErrorClass("bad_request", False)


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """The server's wait hint: `retry-after-ms`, else `Retry-After` in seconds or as an HTTP date
    (relative to `now`, Unix seconds; dates are ignored without it); None if absent or bad."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / divisor
        except (TypeError, ValueError):
            continue
        if value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is not None and now is not None:
        try:
            when = parsedate_to_datetime(str(raw)).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, when - now)
    return None
