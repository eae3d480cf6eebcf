"""The WATI stand-in over plain HTTP: shapes, paging, sends, media, auth and faults."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.common.timeparse import first_time, parse_time
from services.standins import WatiStandIn

TOKEN = "wati-test-token"
T0 = datetime(2025, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[WatiStandIn]:
    async with WatiStandIn() as stand_in:
        yield stand_in


@pytest.fixture
async def wati(server: WatiStandIn) -> AsyncIterator[WatiStandIn]:
    server.reset()
    server.history_order = "newest_first"
    yield server
    server.reset()


@pytest.fixture
async def http(wati: WatiStandIn) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=wati.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


async def page(http: httpx.AsyncClient, contact: str, number: int, size: int) -> dict[str, Any]:
    response = await http.get(f"/api/v1/getMessages/{contact}",
                              params={"pageSize": size, "pageNumber": number})
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def texts(doc: dict[str, Any]) -> list[str]:
    return [i["text"] for i in doc["messages"]["items"]]


async def test_url_includes_tenant(wati: WatiStandIn) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/tenant123", wati.url)


async def test_get_messages_is_paged_newest_first(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    for minute in (3, 1, 5, 2, 4):  # added out of order on purpose
        wati.add_message("50370000001", text=f"m{minute}", owner=False, at=T0 + timedelta(minutes=minute))
    first = await page(http, "50370000001", 1, 2)
    assert first["result"] == "success"
    assert texts(first) == ["m5", "m4"]
    assert first["messages"]["total"] == 5 and first["messages"]["pageNumber"] == 1
    assert first["messages"]["pageSize"] == 2
    assert first["link"]["nextPage"] and first["link"]["prevPage"] is None
    assert texts(await page(http, "50370000001", 2, 2)) == ["m3", "m2"]
    last = await page(http, "50370000001", 3, 2)
    assert texts(last) == ["m1"] and last["link"]["nextPage"] is None
    assert texts(await page(http, "50370000001", 4, 2)) == []
    wati.history_order = "oldest_first"
    assert texts(await page(http, "50370000001", 1, 5)) == ["m1", "m2", "m3", "m4", "m5"]
    wati.history_order = "as_added"
    assert texts(await page(http, "50370000001", 1, 5)) == ["m3", "m1", "m5", "m2", "m4"]


async def test_unknown_contact_is_empty_success(http: httpx.AsyncClient) -> None:
    doc = await page(http, "50399999999", 1, 100)
    assert doc["result"] == "success" and doc["messages"]["items"] == [] and doc["messages"]["total"] == 0


async def test_paging_parameters_are_validated(http: httpx.AsyncClient) -> None:
    for params in ({"pageSize": "x"}, {"pageNumber": "0"}):
        response = await http.get("/api/v1/getMessages/5037", params=params)
        assert response.status_code == 400 and response.json()["result"] is False


@pytest.mark.parametrize(("ts_format", "pattern"), [
    ("iso", r"2025-11-27T10:00:00\.123Z"),
    ("iso_no_z", r"2025-11-27T10:00:00\.123"),
    ("iso7", r"2025-11-27T10:00:00\.1234560Z"),
])
def test_add_message_timestamp_formats(wati: WatiStandIn, ts_format: Any, pattern: str) -> None:
    item = wati.add_message("5037", text="x", owner=False, at=T0, ts_format=ts_format)
    assert re.fullmatch(pattern, item["created"])
    assert item["timestamp"] == str(int(T0.timestamp()))
    parsed = parse_time(item["created"])
    assert parsed is not None and abs(parsed - T0) < timedelta(milliseconds=1)


def test_add_message_unix_and_item_kinds(wati: WatiStandIn) -> None:
    unix = wati.add_message("5037", text="u", owner=False, at=T0, ts_format="unix")
    assert "created" not in unix and first_time(unix.get("created"), unix["timestamp"]) == T0.replace(
        microsecond=0)
    message = wati.add_message("5037", text="Hola", owner=True, operator_name="Ana Agent", at=T0)
    assert message["eventType"] == "message" and message["owner"] is True
    assert message["operatorName"] == "Ana Agent" and message["whatsappMessageId"].startswith("wamid.")
    assert re.fullmatch(r"[0-9a-f]{24}", message["id"])
    ticket = wati.add_message("5037", text="Chat is now assigned to a@x.com", owner=True, at=T0,
                              event_type="ticket")
    assert ticket["eventDescription"] == "Chat is now assigned to a@x.com" and "text" not in ticket
    broadcast = wati.add_message("5037", text="Promo!", owner=True, at=T0, event_type="broadcastMessage")
    assert broadcast["finalText"] == "Promo!"
    extra = wati.add_message("5037", text="pic", owner=False, at=T0, type="image", data="data/images/a.jpg",
                             timestamp=None)
    assert extra["type"] == "image" and extra["data"] == "data/images/a.jpg" and extra["timestamp"] is None
    raw = wati.add_history("5037", {"id": "raw1", "text": "as is", "created": "24|11|2022"})
    assert wati.history("5037")[-1] is raw and len(wati.history("5037")) == 6


async def test_bsuid_and_linked_contacts(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    wati.add_message("US.123124141512", text="by bsuid", owner=False, at=T0)
    assert texts(await page(http, "US.123124141512", 1, 10)) == ["by bsuid"]
    wati.add_message("50370000002", text="by phone", owner=False, at=T0 + timedelta(minutes=1))
    wati.link_contact("50370000002", "US.123124141512")
    assert texts(await page(http, "US.123124141512", 1, 10)) == ["by phone", "by bsuid"]
    assert texts(await page(http, "50370000002", 1, 10)) == ["by phone", "by bsuid"]


async def test_send_appends_own_message_to_history(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    wati.add_message("5037", text="hola", owner=False, at=datetime.now(UTC) - timedelta(minutes=1))
    by_form = await http.post("/api/v1/sendSessionMessage/5037",
                              data={"messageText": "Hi from the bot", "localMessageId": "batch-1"})
    by_query = await http.post("/api/v1/sendSessionMessage/5037", params={"messageText": "second"})
    doc = by_form.json()
    assert by_form.status_code == 200 and doc["result"] is True
    message = doc["message"]
    assert message["whatsappMessageId"].startswith("wamid.") and message["localMessageId"] == "batch-1"
    assert by_query.json()["message"]["text"] == "second"
    newest = (await page(http, "5037", 1, 10))["messages"]["items"]
    assert [i["text"] for i in newest] == ["second", "Hi from the bot", "hola"]
    assert newest[1]["owner"] is True and newest[1]["operatorName"] == "API Token oken"
    assert newest[1]["id"] == message["id"]
    assert [(s.contact_id, s.text, s.local_message_id) for s in wati.sent] == [
        ("5037", "Hi from the bot", "batch-1"), ("5037", "second", None)]
    assert wati.sent[0].message_id == message["id"]
    assert wati.sent[0].whatsapp_message_id == message["whatsappMessageId"]
    assert wati.requests[0].body == {"messageText": "Hi from the bot", "localMessageId": "batch-1"}
    assert wati.requests[0].path == "/tenant123/api/v1/sendSessionMessage/5037"
    assert wati.requests[1].query == {"messageText": "second"}


async def test_send_uses_injected_clock(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    wati.clock = lambda: T0
    try:
        await http.post("/api/v1/sendSessionMessage/5037", data={"messageText": "x"})
    finally:
        wati.clock = lambda: datetime.now(UTC)
    assert wati.history("5037")[0]["timestamp"] == str(int(T0.timestamp()))


async def test_send_text_limits_are_business_errors(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    ok = await http.post("/api/v1/sendSessionMessage/5037", data={"messageText": "a" * 4096})
    assert ok.json()["result"] is True
    for text in ("a" * 4097, ""):
        rejected = await http.post("/api/v1/sendSessionMessage/5037", data={"messageText": text})
        assert rejected.status_code == 200
        assert rejected.json()["result"] is False and rejected.json()["info"]
    assert len(wati.sent) == 1 and len(wati.history("5037")) == 1


async def test_send_file_and_get_media(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    response = await http.post("/api/v1/sendSessionFile/5037", params={"caption": "your receipt"},
                               files={"file": ("r.jpg", b"\xff\xd8jpeg", "image/jpeg")})
    message = response.json()["message"]
    assert response.json()["result"] is True and message["type"] == "image"
    assert message["data"].startswith("data/images/") and message["text"] == "your receipt"
    assert wati.sent[0].kind == "file" and wati.sent[0].file_bytes == b"\xff\xd8jpeg"
    media = await http.get("/api/v1/getMedia", params={"fileName": message["data"]})
    assert media.status_code == 200 and media.content == b"\xff\xd8jpeg"
    assert media.headers["content-type"] == "image/jpeg"
    no_file = await http.post("/api/v1/sendSessionFile/5037", data={"caption": "x"})
    assert no_file.json()["result"] is False


async def test_get_media(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    wati.add_media("data/images/a.png", b"png-bytes", "image/png")
    ok = await http.get("/api/v1/getMedia", params={"fileName": "data/images/a.png"})
    assert ok.content == b"png-bytes" and ok.headers["content-type"] == "image/png"
    missing = await http.get("/api/v1/getMedia", params={"fileName": "data/images/none.png"})
    assert missing.status_code == 404 and missing.json() == {"result": False, "info": "File not found"}
    async with httpx.AsyncClient(base_url=wati.url) as no_token:
        anonymous = await no_token.get("/api/v1/getMedia", params={"fileName": "data/images/a.png"})
    assert anonymous.status_code == 401


async def test_auth_and_tenant(wati: WatiStandIn) -> None:
    async with httpx.AsyncClient(base_url=wati.origin) as raw:
        wrong = await raw.get("/tenant123/api/v1/getMessages/5037", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.content == b""
        other_tenant = await raw.get("/other/api/v1/getMessages/5037",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        assert other_tenant.status_code == 404
    assert not wati.sent


async def test_faults(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    wati.fail_next("getMessages", 429)
    limited = await http.get("/api/v1/getMessages/5037")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "0"
    assert (await http.get("/api/v1/getMessages/5037")).status_code == 200
    wati.fail_next("getMessages", 500, times=2)
    assert [(await http.get("/api/v1/getMessages/5037")).status_code for _ in range(3)] == [500, 500, 200]
    wati.fail_next("getMessages", 200, body="<html>gateway</html>", headers={"Content-Type": "text/html"})
    garbage = await http.get("/api/v1/getMessages/5037")
    assert garbage.status_code == 200 and garbage.text == "<html>gateway</html>"
    wati.fail_next("send", 200)
    refused = await http.post("/api/v1/sendSessionMessage/5037", data={"messageText": "x"})
    assert refused.json()["result"] is False and not wati.sent and not wati.history("5037")
    wati.fail_next("send", 429, headers={"Retry-After": "7"}, after=1)
    assert (await http.post("/api/v1/sendSessionMessage/5037", data={"messageText": "x"})).status_code == 200
    late = await http.post("/api/v1/sendSessionMessage/5037", data={"messageText": "y"})
    assert late.status_code == 429 and late.headers["Retry-After"] == "7"
    wati.fail_next("getMedia", 503)
    assert (await http.get("/api/v1/getMedia", params={"fileName": "x"})).status_code == 503
    with pytest.raises(ValueError):
        wati.fail_next("nonsense", 500)  # type: ignore[arg-type]


async def test_latency_and_request_records(wati: WatiStandIn, http: httpx.AsyncClient) -> None:
    wati.latency = 0.1
    started = time.monotonic()
    await http.get("/api/v1/getMessages/5037", params={"pageSize": 7})
    assert time.monotonic() - started >= 0.1
    record = wati.requests[-1]
    assert (record.method, record.path, record.query) == (
        "GET", "/tenant123/api/v1/getMessages/5037", {"pageSize": "7"})


async def test_held_requests_wait_unanswered_until_released() -> None:
    """A hung WATI for tests that await what happens meanwhile (no sleeps)."""
    async with WatiStandIn() as wati, httpx.AsyncClient() as http:
        wati.hold_requests()
        pending = asyncio.ensure_future(http.get(f"{wati.url}/api/v1/getMessages/5037",
                                                 headers={"Authorization": f"Bearer {wati.token}"}))
        while wati.held < 1:
            await asyncio.sleep(0.01)
        assert not pending.done() and len(wati.requests) == 1  # recorded, not answered
        wati.release_requests()
        assert (await pending).status_code == 200 and wati.held == 0


async def test_one_server_hosts_several_tenants_each_with_its_own_token_and_state() -> None:
    """As on WATI's shared hosts: the path's tenant id picks the account; its token only opens it."""
    async with WatiStandIn("token-a", tenant="301111") as host, httpx.AsyncClient() as http:
        other = host.add_tenant("302222", "token-b")
        assert other.url == f"{host.origin}/302222" and host.url == f"{host.origin}/301111"
        host.add_message("5037", text="A's customer", owner=False, at=datetime.now(UTC))
        other.add_message("5037", text="B's customer", owner=False, at=datetime.now(UTC))

        async def texts(url: str, token: str) -> tuple[int, list[str]]:
            response = await http.get(f"{url}/api/v1/getMessages/5037",
                                      headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 200:
                return response.status_code, []
            return 200, [m["text"] for m in response.json()["messages"]["items"]]

        assert await texts(host.url, "token-a") == (200, ["A's customer"])
        assert await texts(other.url, "token-b") == (200, ["B's customer"])
        assert await texts(other.url, "token-a") == (401, [])  # A's token does not open B
        assert await texts(f"{host.origin}/309999", "token-a") == (404, [])
        assert len(host.requests) == 2 and len(other.requests) == 2  # each records its own
        with pytest.raises(ValueError):
            host.add_tenant("302222", "x")
        host.reset()
        assert await texts(other.url, "token-b") == (200, [])
