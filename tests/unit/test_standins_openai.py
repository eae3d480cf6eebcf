"""The OpenAI stand-in, driven through the official `openai` SDK as the services use it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import httpx
import jsonschema  # type: ignore[import-untyped]
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from services.standins import OpenAIStandIn
from services.standins.openai import LOCKED_MESSAGE, default_reply, schema_example

KEY = "sk-test-key-000000"
# The SDK's typed overloads reject the malformed requests these tests send on purpose.
Client = Any
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[OpenAIStandIn]:
    async with OpenAIStandIn() as stand_in:
        yield stand_in


@pytest.fixture
async def oa(server: OpenAIStandIn) -> AsyncIterator[OpenAIStandIn]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
async def client(oa: OpenAIStandIn) -> AsyncIterator[Client]:
    sdk = AsyncOpenAI(base_url=oa.url, api_key=KEY, max_retries=0, timeout=10)
    try:
        yield sdk
    finally:
        await sdk.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- conversations ---------------------------------------------------------------------------------
async def test_conversation_create_retrieve_delete(client: Client, oa: OpenAIStandIn) -> None:
    conv = await client.conversations.create(metadata={"customer": "wati:abc"})
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert conv.metadata == {"customer": "wati:abc"}
    assert abs(conv.created_at - time.time()) < 60
    again = await client.conversations.retrieve(conv.id)
    assert again.id == conv.id
    deleted = await client.conversations.delete(conv.id)
    assert deleted.deleted is True and deleted.object == "conversation.deleted"
    with pytest.raises(openai.NotFoundError) as info:
        await client.conversations.retrieve(conv.id)
    err = error_of(info.value)
    assert err["type"] == "invalid_request_error" and conv.id in err["message"]
    assert oa.is_deleted(conv.id) and conv.id in oa.conversations  # items outlive the conversation


async def test_unknown_conversation_is_404(client: Client) -> None:
    for call in (
        client.conversations.retrieve("conv_nope"),
        client.conversations.delete("conv_nope"),
        client.conversations.items.create("conv_nope", items=[{"role": "user", "content": "x"}]),
    ):
        with pytest.raises(openai.NotFoundError):
            await call


async def test_metadata_limits(client: Client) -> None:
    await client.conversations.create(metadata={f"k{i}": "v" for i in range(16)})
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(openai.BadRequestError) as info:
            await client.conversations.create(metadata=bad)
        assert error_of(info.value)["param"].startswith("metadata")


async def test_items_create_and_list_newest_first_with_paging(client: Client) -> None:
    conv = await client.conversations.create(items=[{"role": "user", "content": "one"}])
    created = await client.conversations.items.create(
        conv.id, items=[{"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}])
    assert [i.role for i in created.data] == ["assistant", "user"]
    page = await client.conversations.items.list(conv.id)
    texts = [i.content[0].text for i in page.data]
    assert texts == ["three", "two", "one"]
    asc = await client.conversations.items.list(conv.id, order="asc", limit=2)
    assert [i.content[0].text for i in asc.data] == ["one", "two"]
    assert asc.has_more is True
    everything = [i.content[0].text async for i in client.conversations.items.list(
        conv.id, order="asc", limit=1)]
    assert everything == ["one", "two", "three"]
    with pytest.raises(openai.BadRequestError):
        await client.conversations.items.list(conv.id, limit=101)


# -- responses with conversation state ---------------------------------------------------------------
async def test_response_prepends_and_appends_conversation_state(
        client: Client, oa: OpenAIStandIn) -> None:
    conv = await client.conversations.create()
    first = await client.responses.create(
        model="gpt-test", instructions="You are helpful.", conversation=conv.id, input="hola, precio?")
    assert first.id.startswith("resp_") and first.status == "completed"
    assert first.conversation is not None and first.conversation.id == conv.id
    assert "hola, precio?" in first.output_text
    assert first.usage is not None and first.usage.total_tokens == (
        first.usage.input_tokens + first.usage.output_tokens) and first.usage.output_tokens > 0
    second = await client.responses.create(
        model="gpt-test", instructions="You are helpful.", conversation={"id": conv.id},
        input=[{"role": "developer", "content": "missed: agent said 10 USD"},
               {"role": "user", "content": [{"type": "input_text", "text": "ok gracias"}]}])
    record = oa.responses_for(conv.id)[-1]
    assert record.id == second.id
    assert [(i["role"], i["content"][0]["text"]) for i in record.effective_input] == [
        ("user", "hola, precio?"), ("assistant", first.output_text),
        ("developer", "missed: agent said 10 USD"), ("user", "ok gracias")]
    stored = oa.conversations[conv.id]
    assert [i["role"] for i in stored] == ["user", "assistant", "developer", "user", "assistant"]
    assert stored[-1]["id"] == second.output[0].id
    assert all("You are helpful." not in json.dumps(i) for i in stored)  # instructions not stored
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # history billed as input
    fetched = await client.responses.retrieve(second.id)
    assert fetched.output_text == second.output_text


async def test_response_on_unknown_or_deleted_conversation_is_404(client: Client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="m", conversation="conv_missing", input="hi")
    assert error_of(info.value)["param"] == "conversation"
    conv = await client.conversations.create()
    await client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="m", conversation=conv.id, input="hi")


async def test_previous_response_id_chains_and_excludes_conversation(
        client: Client, oa: OpenAIStandIn) -> None:
    first = await client.responses.create(model="m", input="first")
    second = await client.responses.create(model="m", input="second", previous_response_id=first.id)
    assert [i["content"][0]["text"] for i in oa.responses[second.id].effective_input][:1] == ["first"]
    conv = await client.conversations.create()
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(
            model="m", input="x", conversation=conv.id, previous_response_id=first.id)
    assert error_of(info.value)["code"] == "mutually_exclusive_parameters"
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="m", input="x", previous_response_id="resp_unknown")


async def test_overlapping_requests_on_one_conversation_are_locked(
        client: Client, oa: OpenAIStandIn) -> None:
    slow = await client.conversations.create()
    other = await client.conversations.create()
    gate = oa.hold(slow.id)
    first = asyncio.create_task(client.responses.create(model="m", conversation=slow.id, input="a"))
    await wait_for(lambda: oa.in_flight == 1)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="m", conversation=slow.id, input="b")
    err = error_of(info.value)
    assert err["code"] == "conversation_locked" and err["param"] == "conversation"
    assert err["message"] == LOCKED_MESSAGE
    with pytest.raises(openai.BadRequestError):  # adding items is a write too
        await client.conversations.items.create(slow.id, items=[{"role": "user", "content": "c"}])
    # another customer is neither locked nor slowed down by the slow one
    fast = await client.responses.create(model="m", conversation=other.id, input="fast")
    assert not first.done() and fast.status == "completed"
    gate.set()
    await first
    assert oa.locked_count == 2 and oa.locked_by_conversation == {slow.id: 2}
    assert oa.conversations[slow.id][0]["content"][0]["text"] == "a"
    assert len(oa.conversations[slow.id]) == 2  # the rejected request left no trace
    await client.responses.create(model="m", conversation=slow.id, input="after")  # lock released


async def test_failed_generation_releases_the_lock(client: Client, oa: OpenAIStandIn) -> None:
    conv = await client.conversations.create()

    def broken(request: dict[str, Any]) -> str:
        raise RuntimeError("reply generator failed")

    oa.reply_fn = broken
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model="m", conversation=conv.id, input="x")
    assert oa.conversations[conv.id] == []
    oa.reply_fn = lambda request: "fine"
    ok = await client.responses.create(model="m", conversation=conv.id, input="x")
    assert ok.output_text == "fine"


# -- structured output ---------------------------------------------------------------------------------
class ImageClass(BaseModel):
    category: Literal["payment_proof", "general_inquiry", "other"]
    confidence: float
    notes: str | None
    tags: list[str]


async def test_json_schema_output_parses_with_sdk(client: Client) -> None:
    parsed = await client.responses.parse(model="m", input="classify", text_format=ImageClass)
    assert parsed.output_parsed == ImageClass(category="payment_proof", confidence=0.0, notes="", tags=[])


async def test_json_fn_controls_structured_output(client: Client, oa: OpenAIStandIn) -> None:
    seen: list[dict[str, Any]] = []

    def classify(request: dict[str, Any], schema: dict[str, Any]) -> Any:
        seen.append(schema)
        return {"category": "general_inquiry", "confidence": 0.9, "notes": None, "tags": ["x"]}

    oa.json_fn = classify
    parsed = await client.responses.parse(model="m", input="classify", text_format=ImageClass)
    assert parsed.output_parsed is not None and parsed.output_parsed.category == "general_inquiry"
    assert seen and "category" in seen[0]["properties"]
    oa.json_fn = lambda request, schema: "not json"  # a test can make the model misbehave
    raw = await client.responses.create(model="m", input="c", text={"format": {
        "type": "json_schema", "name": "c", "schema": {"type": "object"}}})
    assert raw.output_text == "not json"


async def test_json_schema_needs_name_and_schema(client: Client) -> None:
    for fmt in ({"type": "json_schema", "schema": {"type": "object"}}, {"type": "json_schema", "name": "x"}):
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model="m", input="c", text={"format": fmt})
        assert error_of(info.value)["code"] == "missing_required_parameter"


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}, "b": {"enum": ["x", "y"]},
                                      "c": {"type": ["string", "null"], "minLength": 2}},
     "required": ["a", "b", "c"], "additionalProperties": False},
    {"$defs": {"Item": {"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": 0}},
                        "required": ["n"]}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"},
                                                "minItems": 2},
                                      "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
                                      "k": {"const": "fixed"},
                                      "when": {"type": "string", "format": "date-time"}},
     "required": ["items", "maybe", "k", "when"]},
    ImageClass.model_json_schema(),
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_example_is_valid_for_its_schema(schema: dict[str, Any]) -> None:
    value = schema_example(schema)
    jsonschema.validate(value, schema)
    assert schema_example(schema) == value  # deterministic


# -- input validation --------------------------------------------------------------------------------
def image_input(part: dict[str, Any]) -> list[Any]:
    return [{"role": "user", "content": [{"type": "input_text", "text": "what is this"}, part]}]


async def test_image_parts(client: Client, oa: OpenAIStandIn) -> None:
    ok = await client.responses.create(model="m", input=image_input(
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "low"}))
    assert ok.status == "completed"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}, "missing_required_parameter"),
        ({"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "max"},
         "invalid_value"),
        ({"type": "input_image", "image_url": "data:image/png;base64,@@@", "detail": "low"}, "invalid_image"),
        ({"type": "input_image", "image_url": "data:text/plain;base64,aGk=", "detail": "low"},
         "invalid_image_url"),
        ({"type": "input_image", "image_url": "http://127.0.0.1:9/api/v1/getMedia?fileName=x.jpg",
          "detail": "low"}, "invalid_image_url"),
        ({"type": "input_image", "file_id": "file-unknown", "detail": "auto"}, "file_not_found"),
    ]
    for part, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model="m", input=image_input(part))
        err = error_of(info.value)
        assert err["code"] == code, part
        assert err["param"] is not None and err["param"].startswith("input[0].content[1]")
    public = await client.responses.create(model="m", input=image_input(
        {"type": "input_image", "image_url": "https://cdn.example.com/a.jpg", "detail": "high"}))
    assert public.status == "completed"
    assert len(oa.responses) == 2


async def test_files_upload_and_use_by_id(client: Client, oa: OpenAIStandIn) -> None:
    uploaded = await client.files.create(file=("receipt.png", base64.b64decode(PNG), "image/png"),
                                         purpose="vision")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "vision"
    assert uploaded.bytes == len(base64.b64decode(PNG))
    assert (await client.files.retrieve(uploaded.id)).filename == "receipt.png"
    assert (await client.files.content(uploaded.id)).content == base64.b64decode(PNG)
    answer = await client.responses.create(model="m", input=image_input(
        {"type": "input_image", "file_id": uploaded.id, "detail": "low"}))
    assert "what is this" in answer.output_text
    assert oa.requests[0].body == {"purpose": "vision", "filename": "receipt.png",
                                   "bytes": len(base64.b64decode(PNG))}
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.png", b"x", "image/png"), purpose="nonsense")
    await client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)


async def test_request_validation(client: Client) -> None:
    bad_calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.responses.create(model="m", input=[{"role": "robot", "content": "x"}]),
        lambda: client.responses.create(model="m", input="x", max_output_tokens=5),
        lambda: client.responses.create(model="m", input=[{"type": "function_call_output", "call_id": "c",
                                                           "output": "o"}]),
        lambda: client.responses.create(model="m", input="x", metadata={f"k{i}": "v" for i in range(17)}),
        lambda: client.responses.create(model="", input="x"),
    ]
    for call in bad_calls:
        with pytest.raises(openai.BadRequestError):
            await call()


async def test_max_output_tokens_truncates_to_incomplete(client: Client, oa: OpenAIStandIn) -> None:
    oa.reply_fn = lambda request: "word " * 400
    answer = await client.responses.create(model="m", input="x", max_output_tokens=20)
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None and answer.incomplete_details.reason == "max_output_tokens"
    assert len(answer.output_text) == 80


def test_default_reply_mentions_last_user_text() -> None:
    request = {"input": [{"role": "user", "content": "first"}, {"role": "developer", "content": "dev"},
                         {"role": "user", "content": [{"type": "input_text", "text": "where is my order"}]}]}
    assert "where is my order" in default_reply(request)
    assert default_reply(request) == default_reply(request)
    assert "image" in default_reply({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "x", "detail": "low"}]}]})


# -- auth, faults, latency --------------------------------------------------------------------------
async def test_wrong_key_is_401(oa: OpenAIStandIn) -> None:
    async with AsyncOpenAI(base_url=oa.url, api_key="sk-wrong-key-123456", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.conversations.create()
    err = error_of(info.value)
    assert err["code"] == "invalid_api_key" and "sk-wrong" not in err["message"]


@pytest.mark.parametrize(("status", "code", "error_type", "exc_type"), [
    (429, None, "rate_limit_exceeded", openai.RateLimitError),
    (429, "insufficient_quota", "insufficient_quota", openai.RateLimitError),
    (500, None, None, openai.InternalServerError),
    (503, None, "server_is_overloaded", openai.InternalServerError),
])
async def test_faults(client: Client, oa: OpenAIStandIn, status: int, code: str | None,
                      error_type: str | None, exc_type: type[Exception]) -> None:
    oa.fail_next(status, code)
    with pytest.raises(exc_type) as info:
        await client.responses.create(model="m", input="x")
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.status_code == status and error_of(info.value)["code"] == error_type
    assert info.value.response.headers["retry-after-ms"] == "1"
    ok = await client.responses.create(model="m", input="x")  # the fault was used up
    assert ok.status == "completed"


async def test_sdk_retries_quickly_on_retry_after_ms(
        oa: OpenAIStandIn, caplog: pytest.LogCaptureFixture) -> None:
    oa.fail_next(429, times=1)
    oa.fail_next(503, times=1)
    async with AsyncOpenAI(base_url=oa.url, api_key=KEY, max_retries=2) as sdk:
        with caplog.at_level(logging.INFO, logger="openai"):
            answer = await sdk.responses.create(model="m", input="x")
    assert answer.status == "completed"
    assert len([r for r in oa.requests if r.path == "/v1/responses"]) == 3
    delays = [float(m.group(1)) for r in caplog.records
              if (m := re.match(r"Retrying request in ([0-9.]+) seconds", r.getMessage()))]
    assert delays == [0.001, 0.001]  # the SDK's own backoff would be >= 0.375 s


async def test_fault_kinds_and_after(client: Client, oa: OpenAIStandIn) -> None:
    oa.fail_next(500, kind="conversations", after=1)
    await client.conversations.create()
    await client.responses.create(model="m", input="x")  # responses are not affected
    with pytest.raises(openai.InternalServerError):
        await client.conversations.create()
    oa.fail_next(400, code="invalid_image_url", kind="any", message="Timeout while downloading x.")
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("a.png", b"x", "image/png"), purpose="vision")
    assert error_of(info.value)["message"] == "Timeout while downloading x."
    with pytest.raises(ValueError):
        oa.fail_next(500, kind="nonsense")


async def test_latency_global_and_by_predicate(client: Client, oa: OpenAIStandIn) -> None:
    oa.latency_for(lambda request: request.get("input") == "slow", 0.2)
    fast = await client.responses.create(model="m", input="fast")
    slow = await client.responses.create(model="m", input="slow")
    durations = {r.id: r.finished - r.started for r in oa.responses.values()}
    assert durations[slow.id] >= 0.2 > durations[fast.id]
    oa.latency = 0.1
    started = time.monotonic()
    await client.conversations.create()
    assert time.monotonic() - started >= 0.1


async def test_timeout_on_our_side_still_appends(oa: OpenAIStandIn) -> None:
    """No idempotency key: a request we gave up on still lands in the conversation (reference)."""
    conv_id = oa.add_conversation()
    gate = oa.hold(conv_id)
    async with AsyncOpenAI(base_url=oa.url, api_key=KEY, max_retries=0, timeout=0.05) as sdk:
        with pytest.raises(openai.APITimeoutError):
            await sdk.responses.create(model="m", conversation=conv_id, input="lost?")
    assert oa.responses_for(conv_id) == []
    gate.set()
    await wait_for(lambda: len(oa.responses_for(conv_id)) == 1)
    assert [i["role"] for i in oa.conversations[conv_id]] == ["user", "assistant"]


async def test_unknown_route_and_bad_json(oa: OpenAIStandIn) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=oa.url, headers=headers) as http:
        missing = await http.post("/chat/nothing", json={})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
        broken = await http.post("/responses", content=b"{not json")
        assert broken.status_code == 400 and "parse the JSON" in broken.json()["error"]["message"]
        listed = await http.post("/responses", json=["x"])
        assert listed.status_code == 400
    assert [r.path for r in oa.requests] == ["/v1/chat/nothing", "/v1/responses", "/v1/responses"]


async def test_objects_live_in_the_project_that_made_them(oa: OpenAIStandIn) -> None:
    """Another account (an `add_key` key, or a project header) sees neither the conversations nor
    the files of another project, as on OpenAI; requests record their key and project."""
    oa.add_key("sk-shop-0000")
    mine = AsyncOpenAI(base_url=oa.url, api_key=KEY, max_retries=0, timeout=10)
    shop = AsyncOpenAI(base_url=oa.url, api_key="sk-shop-0000", project="proj_shop", max_retries=0,
                       timeout=10)
    try:
        conversation = await shop.conversations.create()
        uploaded = await shop.files.create(file=("a.png", base64.b64decode(PNG), "image/png"),
                                           purpose="vision")
        await shop.responses.create(model="m", conversation=conversation.id, input=[{
            "role": "user", "content": [{"type": "input_text", "text": "hola"},
                                        {"type": "input_image", "file_id": uploaded.id, "detail": "low"}]}])
        with pytest.raises(openai.NotFoundError):
            await mine.conversations.retrieve(conversation.id)
        with pytest.raises(openai.NotFoundError):
            await mine.responses.create(model="m", conversation=conversation.id, input="hola")
        with pytest.raises(openai.BadRequestError):  # the file is not found in this project
            await mine.responses.create(model="m", input=[{"role": "user", "content": [
                {"type": "input_image", "file_id": uploaded.id, "detail": "low"}]}])
        with pytest.raises(openai.NotFoundError):
            await mine.files.retrieve(uploaded.id)
        shared = oa.add_conversation()  # test setup: every project sees it
        await mine.conversations.retrieve(shared)
        await shop.conversations.retrieve(shared)
    finally:
        await mine.close()
        await shop.close()
    shop_requests = [r for r in oa.requests if r.headers.get("Authorization") == "Bearer sk-shop-0000"]
    assert len(shop_requests) == 4
    assert {r.headers.get("OpenAI-Project") for r in shop_requests} == {"proj_shop"}
    with pytest.raises(openai.AuthenticationError):
        async with AsyncOpenAI(base_url=oa.url, api_key="sk-unknown-0000", max_retries=0) as unknown:
            await unknown.conversations.create()
