"""OpenAI's error answers as the real API sends them → what the services do (issue 13, point 7).

Every body below is one the API sends (billing: `type: "insufficient_quota"` with each `code`, and
the older `null` / `insufficient_quota` codes; rate limits of each type; 404s about a conversation,
a file, a model, or nothing named), classified by `services.common.openai_errors.classify`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from services.common.openai_errors import (
    BILLING_CODES,
    ErrorBody,
    classify,
    is_billing,
    names_conversation,
    retry_after_seconds,
)
from services.standins.openai import BILLING_MESSAGES

CONV = "conv_68b1f0a2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2"


def body(type_: str | None, code: str | None, param: str | None = None, message: str = "x") -> ErrorBody:
    return ErrorBody.of({"error": {"message": message, "type": type_, "param": param, "code": code}})


BILLING_BODIES = [
    body("insufficient_quota", "credit_balance_exhausted"),
    body("insufficient_quota", "organization_spend_limit_exceeded"),
    body("insufficient_quota", "project_spend_limit_exceeded"),
    body("insufficient_quota", "organization_usage_limit_exceeded"),
    body("insufficient_quota", "insufficient_quota"),  # older bodies
    body("insufficient_quota", None),
    body(None, "insufficient_quota"),  # a body without type: the code alone says it
    body("insufficient_quota", "a_future_billing_code"),  # the type decides
]


@pytest.mark.parametrize("error", BILLING_BODIES, ids=lambda e: f"{e.type}/{e.code}")
def test_every_billing_429_fails_at_once_as_insufficient_quota(error: ErrorBody) -> None:
    kind = classify(429, error)
    assert (kind.reason, kind.retryable) == ("insufficient_quota", False)
    assert not kind.gone and not kind.locked
    assert is_billing(429, error)


@pytest.mark.parametrize("error", [
    body("requests", "rate_limit_exceeded"),
    body("tokens", "rate_limit_exceeded"),
    body("requests", None),
    body(None, None),
    ErrorBody(),  # no body at all
])
def test_every_other_429_is_a_retryable_rate_limit(error: ErrorBody) -> None:
    kind = classify(429, error)
    assert (kind.reason, kind.retryable) == ("rate_limited", True)
    assert not is_billing(429, error)


def test_billing_codes_outside_a_429_are_not_billing() -> None:
    """A 400 that happens to carry such a code is a bad request: only 429 is the billing answer."""
    assert classify(400, body("insufficient_quota", "credit_balance_exhausted")).reason == "bad_request"
    assert not is_billing(400, body("insufficient_quota", None))


def test_the_stand_in_knows_every_billing_code_the_services_know() -> None:
    assert set(BILLING_MESSAGES) == BILLING_CODES


@pytest.mark.parametrize(("error", "conversation_id", "gone"), [
    # names the conversation: gone
    (body("invalid_request_error", None, "conversation", f"Conversation with id '{CONV}' not found."),
     CONV, True),
    (body("invalid_request_error", None, "conversation.id", "Not found."), CONV, True),
    (body("invalid_request_error", None, None, f"No conversation found with id '{CONV}'."), CONV, True),
    (body("invalid_request_error", None, None, f"'{CONV}' was not found."), CONV, True),
    (body("invalid_request_error", None, None, "Conversation not found."), None, True),
    # names something else: not the conversation
    (body("invalid_request_error", None, "input[0].content[2].file_id", "File 'file-Ab12' not found."),
     CONV, False),
    (body("invalid_request_error", None, "input[0].content[2].file_id",
          f"File 'file-Ab12' of conversation '{CONV}' not found."), CONV, False),  # the param decides
    (body("invalid_request_error", None, None, "No such File object: file-Ab12"), CONV, False),
    (body("invalid_request_error", None, "previous_response_id", "Previous response not found."),
     CONV, False),
    (body("invalid_request_error", None, None, "Not found."), CONV, False),
    (ErrorBody(), CONV, False),
    (body("invalid_request_error", None, None, "Reconversation is not a word."), None, False),
])
def test_a_404_is_conversation_gone_only_when_it_names_the_conversation(
    error: ErrorBody, conversation_id: str | None, gone: bool
) -> None:
    kind = classify(404, error, conversation_id)
    assert names_conversation(error, conversation_id) is gone
    assert (kind.gone, kind.retryable) == (gone, False)
    assert kind.reason == ("conversation_not_found" if gone else "not_found")


@pytest.mark.parametrize(("status", "error", "reason", "retryable"), [
    (None, ErrorBody(), "connection_error", True),
    (400, body("invalid_request_error", "conversation_locked", "conversation"), "conversation_locked", True),
    (400, body("invalid_request_error", None), "bad_request", False),
    (400, body("invalid_request_error", "invalid_image"), "bad_request", False),
    (400, body("invalid_request_error", "file_not_found", "input[0].content[1].file_id"),
     "bad_request", False),
    (401, body("invalid_request_error", "invalid_api_key"), "unauthorized", False),
    (403, ErrorBody(), "unauthorized", False),
    (404, body("invalid_request_error", "model_not_found", "model"), "model_not_found", False),
    (408, ErrorBody(), "timeout", True),
    (409, ErrorBody(), "conflict", True),
    (500, body("server_error", None), "server_error", True),
    (503, body("service_unavailable_error", "server_is_overloaded"), "server_error", True),
])
def test_other_statuses(status: int | None, error: ErrorBody, reason: str, retryable: bool) -> None:
    kind = classify(status, error, CONV)
    assert (kind.reason, kind.retryable, kind.gone) == (reason, retryable, False)
    assert kind.locked == (error.code == "conversation_locked")


def test_error_body_of_the_sdk_body_or_a_whole_answer_or_junk() -> None:
    inner = {"message": "m", "type": "t", "param": None, "code": "c"}
    assert ErrorBody.of(inner) == ErrorBody.of({"error": inner}) == ErrorBody("t", "c", None, "m")
    assert ErrorBody.of("Bad gateway") == ErrorBody.of(None) == ErrorBody()
    assert ErrorBody.of({"error": {"code": 42, "type": ["x"]}}) == ErrorBody()


def test_retry_after_in_milliseconds_seconds_or_a_date() -> None:
    now = datetime(2026, 12, 6, 6, 0, tzinfo=UTC).timestamp()
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "100", "retry-after": "9"}) == 0.1
    date = format_datetime(datetime(2026, 12, 6, 6, 0, 7, tzinfo=UTC), usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == 7.0
    assert retry_after_seconds({"retry-after": date}) is None  # a date needs a clock
    past = format_datetime(datetime(2026, 12, 6, 5, 0, tzinfo=UTC), usegmt=True)
    assert retry_after_seconds({"retry-after": past}, now=now) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}, now=now) is None
    assert retry_after_seconds({"retry-after": "-1"}, now=now) is None
