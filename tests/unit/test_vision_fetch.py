"""Vision's small non-Kafka helpers: OpenAI failure labels and the attachment client's guard."""

from __future__ import annotations

import json
from typing import Any

import httpx
import httpx2
import openai
import pytest

from services.vision.images import ImageRejected
from services.vision.worker import (
    attachment_http_client,
    openai_detail,
    openai_outcome,
    refuse_retry_of_billing_errors,
)

REQUEST = httpx2.Request("POST", "https://api.openai.com/v1/responses")


def status_error(status: int, code: str | None = None, type_: str = "t") -> openai.APIStatusError:
    body = {"error": {"message": "echoed customer text", "type": type_, "param": None, "code": code}}
    response = httpx2.Response(status, json=body, request=REQUEST)
    return openai.APIStatusError("echoed customer text", response=response, body=body["error"])


@pytest.mark.parametrize(("exc", "label"), [
    (openai.APITimeoutError(REQUEST), "timeout"),
    (openai.APIConnectionError(request=REQUEST), "connection_error"),
    (openai.RateLimitError("m", response=httpx2.Response(429, request=REQUEST), body=None), "rate_limited"),
    (status_error(500), "server_error"),
    (status_error(503), "server_error"),
    (status_error(400, "invalid_image"), "bad_request"),
    (status_error(401, "invalid_api_key"), "unauthorized"),
    (status_error(404), "not_found"),
    # billing bodies (issue 13, point 7): labelled `rate_limited` before
    (status_error(429, "credit_balance_exhausted", "insufficient_quota"), "insufficient_quota"),
    (status_error(429, None, "insufficient_quota"), "insufficient_quota"),
    (status_error(429, "rate_limit_exceeded", "requests"), "rate_limited"),
    (RuntimeError("x"), "error"),
])
def test_openai_failures_have_bounded_labels(exc: BaseException, label: str) -> None:
    assert openai_outcome(exc) == label


def test_openai_detail_names_status_and_code_not_the_message() -> None:
    detail = openai_detail(status_error(400, "invalid_image"))
    assert detail == "APIStatusError (HTTP 400, invalid_image)"
    assert openai_detail(openai.APITimeoutError(REQUEST)) == "APITimeoutError"


async def test_every_redirect_target_is_checked() -> None:
    client = attachment_http_client(allow_private_urls=False)
    try:
        [hook] = client.event_hooks["request"]
        await hook(httpx.Request("GET", "https://scontent.xx.fbcdn.net/a.jpg"))
        with pytest.raises(ImageRejected):
            await hook(httpx.Request("GET", "http://169.254.169.254/latest/meta-data"))
        assert client.follow_redirects and client.max_redirects == 3
    finally:
        await client.aclose()


@pytest.mark.parametrize(("status", "body", "refused"), [
    (429, {"error": {"type": "insufficient_quota", "code": "credit_balance_exhausted"}}, True),
    (429, {"error": {"type": "insufficient_quota", "code": None}}, True),
    (429, {"error": {"type": "requests", "code": "rate_limit_exceeded"}}, False),
    (429, None, False),  # not JSON
    (500, {"error": {"type": "insufficient_quota", "code": None}}, False),
])
async def test_the_sdk_is_told_not_to_retry_a_billing_429(status: int, body: Any, refused: bool) -> None:
    content = b"Too Many Requests" if body is None else json.dumps(body).encode()
    response = httpx2.Response(status, content=content, request=REQUEST)
    await refuse_retry_of_billing_errors(response)
    assert response.headers.get("x-should-retry") == ("false" if refused else None)
