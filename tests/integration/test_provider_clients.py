"""The production WATI and ManyChat clients against the stand-ins (and their pure parsing helpers)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.common.manychat import ManyChatClient, ManyChatError
from services.common.wati import (
    HistoryPage,
    WatiClient,
    WatiError,
    media_file_name,
    parse_history_page,
    parse_retry_after,
    sent_message_ids,
)
from services.standins import StandIns

WATI_TOKEN = "wati-test-token"
MC_TOKEN = "manychat-test-token"
T0 = datetime(2025, 11, 27, 10, 0, tzinfo=UTC)
CONTACT = "50370000001"


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as running:
        yield running


@pytest.fixture
async def s(stand_ins: StandIns) -> AsyncIterator[StandIns]:
    stand_ins.reset()
    yield stand_ins
    stand_ins.reset()


class SleepRecorder:
    """Stands in for asyncio.sleep so Retry-After handling is checked without waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
async def wati(s: StandIns, sleeps: SleepRecorder) -> AsyncIterator[WatiClient]:
    async with WatiClient(s.wati_url, WATI_TOKEN, timeout=5, sleep=sleeps) as client:
        yield client


@pytest.fixture
async def manychat(s: StandIns) -> AsyncIterator[ManyChatClient]:
    async with ManyChatClient(s.manychat_url, MC_TOKEN, timeout=5) as client:
        yield client


def add_minutes(s: StandIns, count: int, contact: str = CONTACT) -> None:
    """`count` customer messages, one per minute from T0 (m0 oldest)."""
    for minute in range(count):
        s.wati.add_message(contact, text=f"m{minute}", owner=False, at=T0 + timedelta(minutes=minute))


def assert_safe(exc: Exception) -> None:
    """Error texts never carry the token or the contact id."""
    assert WATI_TOKEN not in str(exc) and MC_TOKEN not in str(exc) and CONTACT not in str(exc)


# -- WATI history --------------------------------------------------------------------------------
async def test_fetch_history_stops_at_the_first_page_older_than_the_cutoff(
        s: StandIns, wati: WatiClient) -> None:
    add_minutes(s, 25)
    items, pages = await wati.fetch_history(CONTACT, stop_before=T0 + timedelta(minutes=12), page_size=10)
    assert pages == 2  # page 2 (m14..m5) already reaches before m12: nothing older is needed
    assert [i["text"] for i in items] == [f"m{n}" for n in range(24, 4, -1)]
    assert [r.query["pageNumber"] for r in s.wati.requests] == ["1", "2"]


async def test_fetch_history_without_cutoff_reads_every_page(s: StandIns, wati: WatiClient) -> None:
    add_minutes(s, 25)
    items, pages = await wati.fetch_history(CONTACT, stop_before=None, page_size=10)
    assert pages == 3 and len(items) == 25
    capped, capped_pages = await wati.fetch_history(CONTACT, stop_before=None, page_size=10, max_pages=2)
    assert capped_pages == 2 and len(capped) == 20


async def test_fetch_history_tells_the_caller_what_it_absorbed(s: StandIns, wati: WatiClient) -> None:
    """The notices the context service counts: each 429 retried, and a cut by the page cap only
    when WATI had more within the window."""
    add_minutes(s, 25)
    heard: list[str] = []
    s.wati.fail_next("getMessages", 429, times=2, after=1)  # page 2 is refused twice, then served
    items, pages = await wati.fetch_history(CONTACT, stop_before=None, page_size=10, max_pages=2,
                                            notice=heard.append)
    assert (len(items), pages) == (20, 2)
    assert heard == ["rate_limited", "rate_limited", "max_pages"]
    heard.clear()
    # not cut: the window ends on the last page allowed; the history ends on the last page allowed
    await wati.fetch_history(CONTACT, stop_before=T0 + timedelta(minutes=12), page_size=10, max_pages=2,
                             notice=heard.append)
    await wati.fetch_history(CONTACT, stop_before=None, page_size=10, max_pages=3, notice=heard.append)
    assert heard == []


async def test_fetch_history_of_an_empty_contact(wati: WatiClient) -> None:
    assert await wati.fetch_history("US.123124141512", stop_before=T0) == ([], 1)


async def test_fetch_history_by_bsuid_with_every_timestamp_format(s: StandIns, wati: WatiClient) -> None:
    bsuid = "US.123124141512"
    for n, fmt in enumerate(("iso", "iso_no_z", "iso7", "unix")):
        s.wati.add_message(bsuid, text=fmt, owner=n % 2 == 0, at=T0 + timedelta(minutes=n), ts_format=fmt)  # type: ignore[arg-type]
    items, pages = await wati.fetch_history(bsuid, stop_before=T0 + timedelta(minutes=2), page_size=2)
    assert pages == 2 and [i["text"] for i in items] == ["unix", "iso7", "iso_no_z", "iso"]


async def test_fetch_history_drops_items_repeated_across_pages(s: StandIns, wati: WatiClient) -> None:
    add_minutes(s, 3)
    repeated = s.wati.history(CONTACT)[1]
    s.wati.history_order = "as_added"
    s.wati.add_history(CONTACT, dict(repeated))
    items, _ = await wati.fetch_history(CONTACT, stop_before=None, page_size=2)
    assert [i["text"] for i in items] == ["m0", "m1", "m2"]
    s.wati.history_order = "newest_first"


async def test_429_is_retried_after_retry_after(s: StandIns, wati: WatiClient, sleeps: SleepRecorder) -> None:
    add_minutes(s, 3)
    s.wati.fail_next("getMessages", 429, headers={"Retry-After": "1"})
    s.wati.fail_next("getMessages", 429, headers={"Retry-After": "120"})
    s.wati.fail_next("getMessages", 429, headers={})
    items, pages = await wati.fetch_history(CONTACT, stop_before=None)
    assert len(items) == 3 and pages == 1
    assert sleeps.calls == [1.0, 10.0, 2.0]  # as told, capped at 10 s, own backoff without a header


async def test_429_with_real_sleep_and_zero_retry_after(s: StandIns) -> None:
    add_minutes(s, 1)
    s.wati.fail_next("getMessages", 429, times=2)  # Retry-After: 0
    async with WatiClient(s.wati_url, WATI_TOKEN) as client:
        items, _ = await client.fetch_history(CONTACT, stop_before=None)
    assert len(items) == 1


async def test_429_retries_are_bounded(s: StandIns, wati: WatiClient, sleeps: SleepRecorder) -> None:
    s.wati.fail_next("getMessages", 429, times=3)
    with pytest.raises(WatiError) as info:
        await wati.fetch_history(CONTACT, stop_before=None, max_429_retries=2)
    assert info.value.reason == "rate_limited" and info.value.retryable and info.value.status == 429
    assert len(sleeps.calls) == 2


@pytest.mark.parametrize(("status", "body", "reason", "retryable"), [
    (500, None, "server_error", True),
    (503, None, "server_error", True),
    (404, None, "not_found", False),
    (400, None, "client_error", False),
    (200, "<html>bad gateway</html>", "bad_response", True),
    (200, '{"result": "success", "messages": []}', "bad_response", True),
    (200, '{"result": "success", "messages": {"items": [1, 2]}}', "bad_response", True),
    (200, '["items"]', "bad_response", True),
    (200, '{"result": "error", "info": "Invalid Contact"}', "result_false", False),
    (200, '{"result": false}', "result_false", False),
])
async def test_history_errors(s: StandIns, wati: WatiClient, status: int, body: str | None, reason: str,
                              retryable: bool) -> None:
    s.wati.fail_next("getMessages", status, body=body)
    with pytest.raises(WatiError) as info:
        await wati.fetch_history(CONTACT, stop_before=None)
    assert (info.value.reason, info.value.retryable) == (reason, retryable)
    assert_safe(info.value)


async def test_error_on_a_later_page_raises(s: StandIns, wati: WatiClient) -> None:
    add_minutes(s, 5)
    s.wati.fail_next("getMessages", 500, after=1)
    with pytest.raises(WatiError):
        await wati.fetch_history(CONTACT, stop_before=None, page_size=2)


async def test_wrong_token_is_unauthorized(s: StandIns) -> None:
    async with WatiClient(s.wati_url, "wrong-token-xyz") as client:
        with pytest.raises(WatiError) as info:
            await client.get_messages_page(CONTACT, 1)
    assert info.value.reason == "unauthorized" and not info.value.retryable
    assert "wrong-token-xyz" not in str(info.value)


async def test_timeout_and_connection_errors_are_retryable(s: StandIns) -> None:
    s.wati.latency = 0.3
    async with WatiClient(s.wati_url, WATI_TOKEN, timeout=0.05) as client:
        with pytest.raises(WatiError) as info:
            await client.get_messages_page(CONTACT, 1)
    assert (info.value.reason, info.value.retryable) == ("timeout", True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with WatiClient(f"http://127.0.0.1:{port}/t", WATI_TOKEN) as client:
        with pytest.raises(WatiError) as info:
            await client.get_messages_page(CONTACT, 1)
    assert (info.value.reason, info.value.retryable) == ("connection_error", True)


# -- WATI sends ----------------------------------------------------------------------------------
async def test_send_session_message_returns_ids_and_appears_in_history(s: StandIns, wati: WatiClient) -> None:
    text = "Línea 1\n\nDos & tres = ?" + "x" * 4000
    ids = await wati.send_session_message(CONTACT, text, local_message_id="batch-42")
    sent = s.wati.sent[0]
    assert sent.text == text and sent.local_message_id == "batch-42"
    assert ids == [sent.message_id, sent.whatsapp_message_id, "batch-42"]
    items, _ = await wati.fetch_history(CONTACT, stop_before=None)
    assert items[0]["owner"] is True and items[0]["operatorName"].startswith("API Token")
    assert {items[0]["id"], items[0]["whatsappMessageId"]} <= set(ids)


async def test_send_rejects_bad_text_before_sending(s: StandIns, wati: WatiClient) -> None:
    for text in ("a" * 4097, "", "   "):
        with pytest.raises(ValueError):
            await wati.send_session_message(CONTACT, text)
    assert s.wati.requests == []


@pytest.mark.parametrize(("status", "body", "reason", "retryable"), [
    (200, None, "result_false", False),
    (200, '{"result": "false", "info": "session expired"}', "result_false", False),
    (200, '{"ok": false}', "result_false", False),
    (200, "garbage", "bad_response", False),
    (429, None, "rate_limited", True),
    (500, None, "server_error", True),
    (401, "", "unauthorized", False),
])
async def test_send_errors(s: StandIns, wati: WatiClient, status: int, body: str | None, reason: str,
                           retryable: bool) -> None:
    s.wati.fail_next("send", status, body=body)
    with pytest.raises(WatiError) as info:
        await wati.send_session_message(CONTACT, "hola")
    assert (info.value.reason, info.value.retryable, info.value.status) == (reason, retryable, status)
    assert_safe(info.value)
    assert not s.wati.sent


async def test_send_reads_ids_leniently(s: StandIns, wati: WatiClient) -> None:
    s.wati.fail_next("send", 200, body='{"result": "success", "localMessageId": "srv-1"}')
    assert await wati.send_session_message(CONTACT, "x", local_message_id="mine") == ["srv-1", "mine"]
    s.wati.fail_next("send", 200, body='{"result": true}')
    assert await wati.send_session_message(CONTACT, "x") == []


# -- WATI media ----------------------------------------------------------------------------------
async def test_get_media_by_path_or_url(s: StandIns, wati: WatiClient) -> None:
    s.wati.add_media("data/images/receipt.jpg", b"\xff\xd8" + b"j" * 100, "image/jpeg")
    data, content_type = await wati.get_media("data/images/receipt.jpg", max_bytes=1000)
    assert data.startswith(b"\xff\xd8") and content_type == "image/jpeg"
    url = "https://live-server-1234.wati.io/tenant123/api/file/showFile?fileName=data/images/receipt.jpg"
    assert (await wati.get_media(url, max_bytes=1000))[0] == data
    # only our own base URL is ever called with the token, never the host named in the payload
    assert all(r.path == "/tenant123/api/v1/getMedia" for r in s.wati.requests)
    assert [r.query["fileName"] for r in s.wati.requests] == ["data/images/receipt.jpg"] * 2


async def test_get_media_errors(s: StandIns, wati: WatiClient) -> None:
    s.wati.add_media("data/images/big.png", b"p" * 5000, "image/png")
    with pytest.raises(WatiError) as info:
        await wati.get_media("data/images/big.png", max_bytes=4999)
    assert info.value.reason == "too_large" and not info.value.retryable
    with pytest.raises(WatiError) as info:
        await wati.get_media("data/images/none.png", max_bytes=10)
    assert (info.value.reason, info.value.status) == ("not_found", 404)
    with pytest.raises(WatiError) as info:
        await wati.get_media("https://x.wati.io/api/file/showFile?other=1", max_bytes=10)
    assert info.value.reason == "bad_media_ref"
    s.wati.fail_next("getMedia", 500)
    with pytest.raises(WatiError) as info:
        await wati.get_media("data/images/big.png", max_bytes=10_000)
    assert info.value.retryable


async def test_get_media_streams_without_content_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"c" * 100

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer tok"
        name = request.url.params["fileName"]
        if name.endswith("err.jpg"):
            return httpx.Response(200, json={"result": False, "info": "File not found"})
        return httpx.Response(200, content=chunks())  # chunked: no Content-Length, no type

    async with WatiClient("https://wati.example/t1", "tok", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(WatiError) as info:
            await client.get_media("data/images/a.jpg", max_bytes=999)
        assert info.value.reason == "too_large"
        data, content_type = await client.get_media("data/images/a.jpg", max_bytes=1000)
        assert len(data) == 1000 and content_type == "image/jpeg"  # guessed from the file name
        with pytest.raises(WatiError) as info:
            await client.get_media("data/images/err.jpg", max_bytes=1000)
        assert info.value.reason == "media_error"


# -- ManyChat ------------------------------------------------------------------------------------
async def test_manychat_splits_more_than_ten_messages(s: StandIns, manychat: ManyChatClient) -> None:
    texts = [f"part {n}" for n in range(23)]
    await manychat.send_content("1234567890", texts, instagram=False)
    assert [len(sent.texts) for sent in s.manychat.sent] == [10, 10, 3]
    assert s.manychat.texts_for("1234567890") == texts
    body = s.manychat.requests[0].body
    assert body["subscriber_id"] == 1234567890 and body["data"]["version"] == "v2"
    assert "type" not in body["data"]["content"]  # Facebook
    assert {sent.channel for sent in s.manychat.sent} == {"facebook"}


async def test_manychat_instagram_content_type(s: StandIns, manychat: ManyChatClient) -> None:
    await manychat.send_content("777", ["hola"], instagram=True)
    assert s.manychat.sent[0].channel == "instagram"
    assert s.manychat.requests[0].body["data"]["content"]["type"] == "instagram"
    assert "message_tag" not in s.manychat.requests[0].body


async def test_manychat_message_tag_is_opt_in(s: StandIns) -> None:
    async with ManyChatClient(s.manychat_url, MC_TOKEN, message_tag="ACCOUNT_UPDATE") as client:
        await client.send_content("777", ["x"], instagram=False)
    assert s.manychat.sent[0].message_tag == "ACCOUNT_UPDATE"


async def test_manychat_validates_before_sending(s: StandIns, manychat: ManyChatClient) -> None:
    for texts in (["ok", "a" * 2001], [], ["ok", ""]):
        with pytest.raises(ValueError):
            await manychat.send_content("777", texts, instagram=False)
    await manychat.send_content("777", ["a" * 2000], instagram=False)
    assert len(s.manychat.requests) == 1


@pytest.mark.parametrize(("status", "body", "reason", "retryable"), [
    (429, None, "rate_limited", True),
    (500, None, "server_error", True),
    (400, None, "rejected", False),
    (401, None, "unauthorized", False),
    (200, "not json", "bad_response", False),
    (200, '{"status": "error", "message": "Subscriber does not exist"}', "status_error", False),
])
async def test_manychat_errors(s: StandIns, manychat: ManyChatClient, status: int, body: str | None,
                               reason: str, retryable: bool) -> None:
    s.manychat.fail_next(status, body=body)
    with pytest.raises(ManyChatError) as info:
        await manychat.send_content("777", ["x"], instagram=False)
    assert (info.value.reason, info.value.retryable, info.value.sent_messages) == (reason, retryable, 0)
    assert_safe(info.value)


async def test_manychat_partial_failure_reports_what_was_sent(s: StandIns, manychat: ManyChatClient) -> None:
    s.manychat.fail_next(503, after=1)
    with pytest.raises(ManyChatError) as info:
        await manychat.send_content("777", [str(n) for n in range(15)], instagram=True)
    assert info.value.sent_messages == 10 and info.value.retryable
    assert s.manychat.texts_for("777") == [str(n) for n in range(10)]


async def test_manychat_wrong_token(s: StandIns) -> None:
    async with ManyChatClient(s.manychat_url, "bad-token-123") as client:
        with pytest.raises(ManyChatError) as info:
            await client.send_content("777", ["x"], instagram=False)
    assert info.value.reason == "unauthorized" and "bad-token-123" not in str(info.value)


# -- pure helpers --------------------------------------------------------------------------------
def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 00:00:30 GMT", now) == 30.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_media_file_name() -> None:
    assert media_file_name("data/images/x.jpg") == "data/images/x.jpg"
    assert media_file_name("/data/images/x.jpg") == "data/images/x.jpg"
    assert media_file_name("https://live.wati.io/1/api/file/showFile?fileName=data%2Fimages%2Fx.jpg") == (
        "data/images/x.jpg")
    for bad in ("", "https://live.wati.io/1/api/file/showFile", "https://h/x?fileName="):
        with pytest.raises(WatiError):
            media_file_name(bad)


def test_parse_history_page_has_more() -> None:
    items: list[dict[str, Any]] = [{"id": "a"}, {"id": "b"}]
    assert parse_history_page({"result": "success", "messages": {"items": items, "total": 5}}, 1, 2) == (
        HistoryPage(items, True))
    assert not parse_history_page({"messages": {"items": items, "total": 4}}, 2, 2).has_more
    assert parse_history_page({"messages": {"items": items}, "link": {"nextPage": "/p2"}}, 1, 2).has_more
    assert not parse_history_page({"messages": {"items": items}, "link": {"nextPage": None}}, 1, 2).has_more
    assert parse_history_page({"messages": {"items": items}}, 1, 2).has_more  # full page, nothing else known
    assert not parse_history_page({"messages": {"items": items}}, 1, 3).has_more
    assert parse_history_page({"messages": {"items": None}}, 1, 2) == HistoryPage([], False)


def test_sent_message_ids() -> None:
    doc = {"result": True, "message": {"id": "m1", "whatsappMessageId": "wamid.X", "localMessageId": "l1"}}
    assert sent_message_ids(doc, "l1") == ["m1", "wamid.X", "l1"]
    assert sent_message_ids({"id": "top-level-is-not-the-message", "messageId": 7}, None) == ["7"]
    assert sent_message_ids({"message": {"id": ""}}, None) == []
