"""The responder's OpenAI retry policy and channel sending, against the stand-ins (no Kafka needed)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.common import metrics
from services.common.manychat import ManyChatClient
from services.common.wati import WatiClient
from services.responder.ai import AIFailure, ConversationGone, Replier, make_client
from services.responder.channels import ChannelSender, SendFailed, local_message_id
from services.standins import StandIns

USER: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "input_text", "text": "Hola"}]}]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
async def s() -> AsyncIterator[StandIns]:
    async with StandIns.running() as stand_ins:
        yield stand_ins


@pytest.fixture(autouse=True)
def _reset(s: StandIns) -> None:
    s.reset()


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def replier(s: StandIns, sleep: Sleeps | None = None, timeout: float = 10.0, attempts: int = 3) -> Replier:
    client = make_client(s.openai.api_key, s.openai_url, timeout)
    if sleep is None:
        return Replier(client, model="gpt-test", instructions="Sé breve.", max_attempts=attempts)
    return Replier(client, model="gpt-test", instructions="Sé breve.", max_attempts=attempts, sleep=sleep)


async def test_conversation_locked_is_waited_out_and_not_counted(s: StandIns) -> None:
    sleeps = Sleeps()
    r = replier(s, sleeps, attempts=1)
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(400, code="conversation_locked", times=3)
    got = await r.reply(conv, USER, "wati:5037", "b1")
    assert got.text and len(sleeps.delays) == 3
    assert all(1.0 <= d <= 1.5 for d in sleeps.delays)


async def test_retry_after_ms_is_honoured(s: StandIns) -> None:
    sleeps = Sleeps()
    r = replier(s, sleeps)
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(429, headers={"retry-after-ms": "250"})
    s.openai.fail_next(503, headers={"retry-after": "2"})
    got = await r.reply(conv, USER, "wati:5037", "b1")
    assert got.text and sleeps.delays == [0.25, 2.0]


async def test_too_long_retry_after_gives_up(s: StandIns) -> None:
    r = replier(s, Sleeps())
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(429, headers={"retry-after": "600"})
    with pytest.raises(AIFailure) as info:
        await r.reply(conv, USER, "wati:5037", "b1")
    assert info.value.reason == "rate_limited"


async def test_exponential_backoff_without_hints_and_exhaustion(s: StandIns) -> None:
    sleeps = Sleeps()
    r = replier(s, sleeps, attempts=3)
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(500, times=3, headers={})
    with pytest.raises(AIFailure) as info:
        await r.reply(conv, USER, "wati:5037", "b1")
    assert info.value.reason == "server_error" and "after 3 attempts" in info.value.detail
    assert len(sleeps.delays) == 2
    assert 0.375 <= sleeps.delays[0] <= 0.5 and 0.75 <= sleeps.delays[1] <= 1.0


async def test_timeouts_are_retried_then_fail(s: StandIns) -> None:
    r = replier(s, timeout=0.2, attempts=2)
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.latency = 0.5
    with pytest.raises(AIFailure) as info:
        await r.reply(conv, USER, "wati:5037", "b1")
    assert info.value.reason == "timeout"
    assert len([q for q in s.openai.requests if q.path == "/v1/responses"]) == 2
    # wait until the stand-in finished the abandoned requests (they still complete there, like OpenAI)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while s.openai.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def test_deleted_conversation_is_reported_as_gone(s: StandIns) -> None:
    r = replier(s)
    conv = await r.create_conversation("wati:5037", "wati")
    await r.client.conversations.delete(conv)
    with pytest.raises(ConversationGone):
        await r.reply(conv, USER, "wati:5037", "b1")


def _sample(purpose: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "watistream_openai_requests_total",
        {"purpose": purpose, "outcome": outcome, "tenant": "default"}) or 0.0


class Rises:
    """`watistream_openai_requests_total` samples before a call, to assert their exact rises."""

    KEYS = [("reply", o) for o in ("ok", "rate_limited", "insufficient_quota", "not_found",
                                   "conversation_not_found")] + [
        ("conversation_check", o) for o in ("ok", "conversation_not_found")]

    def __init__(self) -> None:
        self.before = {k: _sample(*k) for k in self.KEYS}

    def __call__(self) -> dict[str, float]:
        """Only what changed, as "purpose:outcome" → rise."""
        return {f"{p}:{o}": _sample(p, o) - self.before[(p, o)] for p, o in self.KEYS
                if _sample(p, o) != self.before[(p, o)]}


def responses_posted(s: StandIns) -> int:
    return len([q for q in s.openai.requests if q.path == "/v1/responses"])


@pytest.mark.parametrize(("code", "type_"), [
    ("credit_balance_exhausted", None),
    ("organization_spend_limit_exceeded", None),
    ("project_spend_limit_exceeded", None),
    ("organization_usage_limit_exceeded", None),
    ("insufficient_quota", None),
    (None, "insufficient_quota"),  # older bodies: code null
])
async def test_every_billing_429_fails_at_once_and_is_counted_as_insufficient_quota(
    s: StandIns, code: str | None, type_: str | None
) -> None:
    """Issue 13, point 7: retried as a rate limit (5 attempts, `rate_limited`) before."""
    sleeps = Sleeps()
    r = replier(s, sleeps, attempts=5)
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(429, code=code, type_=type_, times=5)
    rises = Rises()
    with pytest.raises(AIFailure) as info:
        await r.reply(conv, USER, "wati:5037", "b1")
    assert info.value.reason == "insufficient_quota"
    assert f"code {code or '-'}" in info.value.detail
    assert responses_posted(s) == 1 and sleeps.delays == []
    assert rises() == {"reply:insufficient_quota": 1}


async def test_a_429_with_retry_after_in_seconds_is_waited_then_answered(s: StandIns) -> None:
    sleeps = Sleeps()
    r = replier(s, sleeps)
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(429, code="rate_limit_exceeded", headers={"retry-after": "3"})
    s.openai.fail_next(429, code="rate_limit_exceeded", headers={"retry-after-ms": "40"})
    rises = Rises()
    got = await r.reply(conv, USER, "wati:5037", "b1")
    assert got.text and sleeps.delays == [3.0, 0.04]
    assert rises() == {"reply:rate_limited": 2, "reply:ok": 1}


async def _image_input(r: Replier) -> tuple[list[dict[str, Any]], str]:
    """A user message with an uploaded image, and the image's file id."""
    uploaded = await r.client.files.create(file=("a.png", PNG, "image/png"), purpose="vision")
    content = [*USER[0]["content"], {"type": "input_image", "file_id": uploaded.id, "detail": "low"}]
    return [{"role": "user", "content": content}], uploaded.id


async def test_a_404_about_a_deleted_file_keeps_the_conversation(s: StandIns) -> None:
    """Vision's file deleted before the answer: OpenAI's 404 names the file, not the conversation.
    Before: ConversationGone, and the worker started a new conversation (the history lost)."""
    r = replier(s, Sleeps())
    conv = await r.create_conversation("wati:5037", "wati")
    await r.reply(conv, USER, "wati:5037", "b0")  # the customer's history
    items, file_id = await _image_input(r)
    await r.client.files.delete(file_id)
    s.openai.missing_file_status = 404
    rises = Rises()
    with pytest.raises(AIFailure) as info:
        await r.reply(conv, items, "wati:5037", "b1")
    assert info.value.reason == "not_found" and "HTTP 404" in info.value.detail
    assert not s.openai.is_deleted(conv) and len(s.openai.conversations[conv]) == 2  # history kept
    assert [q.method for q in s.openai.requests if q.path == f"/v1/conversations/{conv}"] == ["GET"]
    assert rises() == {"reply:not_found": 1, "conversation_check:ok": 1}


async def test_a_404_naming_nothing_is_gone_only_if_the_conversation_is(s: StandIns) -> None:
    r = replier(s, Sleeps())
    conv = await r.create_conversation("wati:5037", "wati")
    s.openai.fail_next(404, message="Not found.")  # live conversation: the 404 was about something else
    rises = Rises()
    with pytest.raises(AIFailure) as info:
        await r.reply(conv, USER, "wati:5037", "b1")
    assert info.value.reason == "not_found"
    assert rises() == {"reply:not_found": 1, "conversation_check:ok": 1}

    await r.client.conversations.delete(conv)
    s.openai.fail_next(404, message="Not found.")
    rises = Rises()
    with pytest.raises(ConversationGone):
        await r.reply(conv, USER, "wati:5037", "b2")
    assert rises() == {"reply:not_found": 1, "conversation_check:conversation_not_found": 1}


async def test_a_404_naming_the_conversation_needs_no_check(s: StandIns) -> None:
    r = replier(s, Sleeps())
    conv = await r.create_conversation("wati:5037", "wati")
    await r.client.conversations.delete(conv)
    rises = Rises()
    with pytest.raises(ConversationGone):
        await r.reply(conv, USER, "wati:5037", "b1")
    assert [q.method for q in s.openai.requests if q.path == f"/v1/conversations/{conv}"] == ["DELETE"]
    assert rises() == {"reply:conversation_not_found": 1}


async def test_conversation_metadata_has_no_phone_number(s: StandIns) -> None:
    r = replier(s)
    await r.create_conversation("wati:50372927077", "wati")
    [req] = [q for q in s.openai.requests if q.path == "/v1/conversations"]
    assert "50372927077" not in str(req.body)
    assert set(req.body["metadata"]) == {"service", "channel", "customer"}


# ------------------------------------------------------------------------------------------ channels


def sender(s: StandIns, sleeps: Sleeps, *, wati: bool = True, manychat: bool = True) -> ChannelSender:
    return ChannelSender(
        WatiClient(s.wati_url, s.wati.token) if wati else None,
        ManyChatClient(s.manychat_url, s.manychat.token) if manychat else None,
        sleep=sleeps,
    )


async def test_wati_result_false_is_a_failure_not_retried(s: StandIns) -> None:
    sleeps = Sleeps()
    ch = sender(s, sleeps)
    s.wati.fail_next("send", 200, body='{"result": false}')
    with pytest.raises(SendFailed) as info:
        await ch.send("wati", "5037", "Hola", "b1")
    assert info.value.reason == "result_false" and info.value.sent_parts == [] and sleeps.delays == []
    assert s.wati.sent == []
    await ch.aclose()


async def test_wati_retryable_failure_is_retried(s: StandIns) -> None:
    sleeps = Sleeps()
    ch = sender(s, sleeps)
    s.wati.fail_next("send", 503)
    s.wati.fail_next("send", 429, headers={"Retry-After": "3"})
    sent = await ch.send("wati", "5037", "Hola", "b1")
    assert sent.parts == ["Hola"] and sent.ids
    assert sleeps.delays == [0.5, 3.0]
    assert [m.text for m in s.wati.sent] == ["Hola"]
    assert s.wati.sent[0].local_message_id == local_message_id("b1", 0)
    await ch.aclose()


async def test_wati_failure_after_first_part_reports_what_went_out(s: StandIns) -> None:
    ch = sender(s, Sleeps())
    text = ("a" * 4000) + "\n\n" + ("b" * 100)
    s.wati.fail_next("send", 400, after=1)
    with pytest.raises(SendFailed) as info:
        await ch.send("wati", "5037", text, "b1")
    assert info.value.sent_parts == ["a" * 4000] and info.value.ids
    await ch.aclose()


async def test_manychat_resumes_after_a_failed_call_without_resending(s: StandIns) -> None:
    sleeps = Sleeps()
    ch = sender(s, sleeps)
    parts = [f"Parte {n}." + " x" * 990 for n in range(25)]
    s.manychat.fail_next(500, after=1)  # the second call (parts 10-19) fails once
    sent = await ch.send("instagram", "77", "\n\n".join(parts), "b1")
    assert sent.parts == parts
    assert s.manychat.texts_for("77") == parts
    assert [len(c.texts) for c in s.manychat.sent] == [10, 10, 5]
    assert {c.channel for c in s.manychat.sent} == {"instagram"} and sleeps.delays == [0.5]
    await ch.aclose()


async def test_manychat_rejection_and_missing_channel(s: StandIns) -> None:
    ch = sender(s, Sleeps(), wati=False)
    s.manychat.fail_next(400)
    with pytest.raises(SendFailed) as info:
        await ch.send("facebook", "77", "Hola", "b1")
    assert info.value.reason == "rejected"
    with pytest.raises(SendFailed) as missing:
        await ch.send("wati", "5037", "Hola", "b1")
    assert missing.value.reason == "channel_not_configured"
    with pytest.raises(SendFailed) as empty:
        await ch.send("facebook", "77", "  ", "b1")
    assert empty.value.reason == "empty_text"
    await ch.aclose()
