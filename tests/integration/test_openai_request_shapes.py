"""Every request the services send to OpenAI is valid per OpenAI's published OpenAPI spec.

The services' own clients (the responder's `Replier`, vision's `VisionWorker`) make each kind of
request they make in production against the stand-in — conversation create, a reply with missed
messages, images and an output cap, the conversation check after an unexplained 404, the image
upload and the classification — and each recorded request is validated against the request schema
of its endpoint in `tests/fixtures/openai/openapi-subset.json` (JSON Schema 2020-12, as OpenAPI 3.1
writes it; made by `tests/fixtures/openai/make_spec_subset.py`), and its top-level fields must be
ones the spec names (the spec's objects are open, so a misspelt parameter would pass otherwise).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest

from services.common.config import Settings
from services.common.records import ResponderRequest
from services.responder.ai import AIFailure, Replier, make_client
from services.responder.prompt import build_input
from services.standins import StandIns
from services.vision.worker import MediaFetcher, VisionWorker


def _any_of(node: Any) -> Any:
    """`oneOf` read as `anyOf`: the spec's branches overlap (a user message is both an
    EasyInputMessage and an InputMessage) and OpenAPI picks one by `discriminator`, which JSON
    Schema does not apply. A value must still match at least one branch."""
    if isinstance(node, list):
        return [_any_of(n) for n in node]
    if isinstance(node, dict):
        return {("anyOf" if k == "oneOf" else k): _any_of(v) for k, v in node.items()}
    return node


SPEC = _any_of(json.loads(
    (Path(__file__).parents[1] / "fixtures" / "openai" / "openapi-subset.json").read_text()))
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
NOW = datetime(2026, 12, 6, 5, 30, tzinfo=UTC)
#: the stand-in's concrete paths → the spec's path templates
TEMPLATES = [(re.compile(r"^/v1/conversations/[^/]+$"), "/conversations/{conversation_id}"),
             (re.compile(r"^/v1/(responses|conversations|files)$"), r"/\1")]


def template(path: str) -> str:
    for pattern, replacement in TEMPLATES:
        if pattern.match(path):
            return pattern.sub(replacement, path)
    raise AssertionError(f"a request to {path}, an endpoint the spec subset does not cover")


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        return cast(dict[str, Any], SPEC["components"]["schemas"][ref.rsplit("/", 1)[-1]])
    return node


def known_fields(schema: dict[str, Any]) -> set[str]:
    """Top-level property names a request schema declares (through $ref and allOf)."""
    schema = _resolve(schema)
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names |= known_fields(part)
    return names


def spec_problems(method: str, path: str, body: Any) -> list[str]:
    """Why a request body is not valid for `method path` of the spec ([] when it is)."""
    schema = SPEC["requests"][f"{method} {path}"]
    if schema is None:
        return [] if body in (None, {}, "") else [f"{method} {path} takes no body"]
    validator = jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]})
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
                for e in validator.iter_errors(body)]
    unknown = set(body) - known_fields(schema) if isinstance(body, dict) else set()
    return problems + [f"{name}: not a parameter of {method} {path}" for name in sorted(unknown)]


def as_spec_body(request: Any) -> Any:
    """The stand-in records a multipart upload as its form fields: the spec's names."""
    if request.path == "/v1/files" and request.method == "POST":
        return {"file": request.body["filename"], "purpose": request.body["purpose"]}
    return request.body


@pytest.fixture(scope="module")
async def s() -> AsyncIterator[StandIns]:
    async with StandIns.running() as stand_ins:
        yield stand_ins


def responder_request(file_id: str) -> ResponderRequest:
    message = {"event_id": "wamid.1", "customer_key": "wati:5037", "channel": "wati", "provider_id": "5037",
               "message_type": "image", "text": None, "caption": "mi pago", "media_ref": "data/images/p.png",
               "media_mime": "image/png", "sender_name": "Ana", "provider_message_ids": [],
               "provider_time": NOW, "received_at": NOW}
    return cast(ResponderRequest, {
        "batch_id": "b-1", "customer_key": "wati:5037", "channel": "wati", "provider_id": "5037",
        "messages": [message, {**message, "message_type": "text", "text": "¿Llegó?", "caption": None}],
        "missed_messages": [{"at": NOW, "role": "agent", "agent_name": "Luis", "text": "Le escribo luego",
                             "message_type": "text", "source": "history", "item_ids": ["x"]}],
        "missed_dropped_oldest": 2,
        "images": [{"media_ref": "data/images/p.png", "file_id": file_id, "mime": "image/png",
                    "category": "payment_proof", "confidence": 0.9, "description": "Un comprobante"}],
    })


async def test_every_request_the_services_send_is_valid_per_the_spec(s: StandIns) -> None:
    s.reset()
    settings = Settings(openai_api_key=s.openai.api_key, openai_base_url=s.openai_url)
    client = make_client(s.openai.api_key, s.openai_url, 10.0)
    vision = VisionWorker(settings, producer=cast(Any, None), client=client,
                          fetcher=cast(MediaFetcher, None))
    replier = Replier(client, model="gpt-test", instructions="Sé breve.", max_attempts=1,
                      max_output_tokens=400)

    file_id = await vision._upload(PNG, "image/png", tenant="default")  # POST /files
    await vision._classify(file_id, "mi pago", tenant="default")  # POST /responses, no conversation
    conversation = await replier.create_conversation("wati:5037", "wati")  # POST /conversations
    items = build_input(responder_request(file_id), "es")
    await replier.reply(conversation, items, "wati:5037", "b-1")  # POST /responses in the conversation
    s.openai.fail_next(404, message="Not found.")
    with pytest.raises(AIFailure):  # the unexplained 404 → GET /conversations/{id}
        await replier.reply(conversation, items, "wati:5037", "b-2")

    checked: dict[str, int] = {}
    problems: list[str] = []
    for request in s.openai.requests:
        endpoint = f"{request.method} {template(request.path)}"
        checked[endpoint] = checked.get(endpoint, 0) + 1
        problems += [f"{endpoint}: {p}" for p in spec_problems(request.method, template(request.path),
                                                                as_spec_body(request))]
    assert problems == []
    assert checked == {"POST /files": 1, "POST /responses": 3, "POST /conversations": 1,
                       "GET /conversations/{conversation_id}": 1}


@pytest.mark.parametrize(("body", "problem"), [
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f",
                                                            "detail": "tiny"}]}]}, "input"),
    ({"model": "m", "input": "hola", "max_output_tokens": 4}, "max_output_tokens"),
    ({"model": "m", "input": "hola", "conversation_id": "conv_1"}, "conversation_id: not a parameter"),
])
def test_the_spec_check_sees_an_invalid_request(body: dict[str, Any], problem: str) -> None:
    """Guards the check itself: a bad enum value, a number under the minimum, an unknown field."""
    found = spec_problems("POST", "/responses", body)
    assert any(p.startswith(problem) for p in found), found
