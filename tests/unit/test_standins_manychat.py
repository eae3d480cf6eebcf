"""The ManyChat stand-in: sendContent validation, recording, auth and faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.standins import ManyChatStandIn

TOKEN = "manychat-test-token"


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[ManyChatStandIn]:
    async with ManyChatStandIn() as stand_in:
        yield stand_in


@pytest.fixture
async def mc(server: ManyChatStandIn) -> AsyncIterator[ManyChatStandIn]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
async def http(mc: ManyChatStandIn) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mc.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def body(texts: list[str], *, content_type: str | None = None, subscriber: Any = 1234567890,
         ) -> dict[str, Any]:
    content: dict[str, Any] = {"messages": [{"type": "text", "text": t} for t in texts]}
    if content_type:
        content["type"] = content_type
    return {"subscriber_id": subscriber, "data": {"version": "v2", "content": content}}


async def send(http: httpx.AsyncClient, payload: Any) -> httpx.Response:
    return await http.post("/fb/sending/sendContent", json=payload)


async def test_facebook_and_instagram_sends_are_recorded(
        mc: ManyChatStandIn, http: httpx.AsyncClient) -> None:
    facebook = await send(http, body(["hola", "segunda"]))
    assert facebook.status_code == 200 and facebook.json() == {"status": "success"}
    instagram = await send(http, {**body(["ig"], content_type="instagram", subscriber="555"),
                                  "message_tag": "ACCOUNT_UPDATE"})
    assert instagram.status_code == 200
    assert [(s.subscriber_id, s.channel, s.texts) for s in mc.sent] == [
        ("1234567890", "facebook", ["hola", "segunda"]), ("555", "instagram", ["ig"])]
    assert mc.sent[1].message_tag == "ACCOUNT_UPDATE"
    assert mc.texts_for("1234567890") == ["hola", "segunda"]
    assert mc.requests[0].body == body(["hola", "segunda"])


def details(response: httpx.Response) -> str:
    doc = response.json()
    assert response.status_code == 400
    assert doc["status"] == "error" and doc["message"] == "Validation error"
    return str(doc["details"]["messages"][0]["message"])


async def test_limits(mc: ManyChatStandIn, http: httpx.AsyncClient) -> None:
    assert (await send(http, body(["a" * 2000] * 10))).status_code == 200
    assert details(await send(http, body(["a" * 2001]))) == "Provided text is longer than 2000 symbols"
    assert "at most 10" in details(await send(http, body(["a"] * 11)))
    assert len(mc.sent) == 1


@pytest.mark.parametrize("payload", [
    {"data": {"version": "v2", "content": {"messages": [{"type": "text", "text": "x"}]}}},
    {**body(["x"]), "subscriber_id": "not-a-number"},
    {"subscriber_id": 1, "data": {"version": "v1", "content": {"messages": [{"type": "text", "text": "x"}]}}},
    body(["x"], content_type="myspace"),
    body([]),
    {"subscriber_id": 1, "data": {"version": "v2", "content": {"messages": [{"type": "text", "text": ""}]}}},
    {"subscriber_id": 1, "data": {"version": "v2", "content": {"messages": [{"type": "gif"}]}}},
    {"subscriber_id": 1, "data": {"version": "v2", "content": {
        "type": "instagram", "messages": [{"type": "file", "url": "https://x/y.pdf"}]}}},
    ["not", "an", "object"],
])
async def test_invalid_bodies_are_400(mc: ManyChatStandIn, http: httpx.AsyncClient, payload: Any) -> None:
    assert details(await send(http, payload))
    assert not mc.sent


async def test_non_json_body_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/fb/sending/sendContent", content=b"{oops",
                               headers={"Content-Type": "application/json"})
    assert details(response)


async def test_wrong_token_is_401(mc: ManyChatStandIn) -> None:
    async with httpx.AsyncClient(base_url=mc.url, headers={"Authorization": "Bearer wrong"}) as http:
        response = await send(http, body(["x"]))
    assert response.status_code == 401 and response.json()["status"] == "error"
    assert not mc.sent


async def test_faults(mc: ManyChatStandIn, http: httpx.AsyncClient) -> None:
    mc.fail_next(429)
    limited = await send(http, body(["x"]))
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "0"
    mc.fail_next(500, times=2, after=1)
    statuses = [(await send(http, body([str(n)]))).status_code for n in range(4)]
    assert statuses == [200, 500, 500, 200]
    assert mc.texts_for("1234567890") == ["0", "3"]
    mc.fail_next(200, body="not json")
    assert (await send(http, body(["x"]))).text == "not json"
