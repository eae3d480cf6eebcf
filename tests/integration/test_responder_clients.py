"""The responder's OpenAI retry policy and channel sending, against the stand-ins (no Kafka needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.manychat import ManyChatClient
from services.common.wati import WatiClient
from services.responder.ai import AIFailure, ConversationGone, Replier, make_client
from services.responder.channels import ChannelSender, SendFailed, local_message_id
from services.standins import StandIns

USER = [{"role": "user", "content": [{"type": "input_text", "text": "Hola"}]}]


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
