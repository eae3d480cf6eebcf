"""OpenAI stand-in: Conversations, Responses (with conversation state) and Files — docs/openai.md.

Works with the official `openai` SDK (`AsyncOpenAI(base_url=<url>, api_key=...)`). What it models:
- conversations: create (items, metadata ≤ 16 pairs), retrieve, update, delete (items survive, like
  OpenAI), items create/list (newest first by default, `order`, `limit` 1-100, `after`)/retrieve/delete;
- responses: `conversation` (string or `{"id"}`): stored items are prepended, input + output appended
  when the response completes; `previous_response_id` chains; both at once → 400
  `mutually_exclusive_parameters`; unknown/deleted conversation → 404; a second request on a
  conversation while one is in flight (including its latency) → 400 `conversation_locked`;
  `text.format` json_schema → JSON made by `json_fn` (default: a deterministic schema-valid object);
  `max_output_tokens` truncates (status `incomplete`); usage ≈ characters / 4;
- input validation: roles, parts `input_text` / `input_image` (`detail` required, `image_url` a
  base64 data URL of png/jpeg/webp/gif or a URL OpenAI could reach — loopback/private hosts are
  refused like an undownloadable image — or the `file_id` of an uploaded file) / `input_file`;
- files: upload (multipart, `purpose`), retrieve, content, delete;
- models: list and retrieve (`client.models.retrieve`, what `watistream check` asks) over `models`;
  an unknown model is 404 `model_not_found`, OpenAI's wording (responses accept any model name);
- faults (`fail_next`), latency (global, per conversation, per predicate), `hold(conversation)`
  (a response waits, lock held, until the test releases it), records for assertions.

Errors as the real API sends them (`fail_next`): billing 429s keep `type: "insufficient_quota"`
with `code` one of `BILLING_MESSAGES` (or, in older bodies, `null` — pass `type_` to write that);
rate-limit 429s carry `retry-after-ms` or `Retry-After` (seconds), as the test chooses.

Projects: conversations and files belong to the project they were created in — the request's
`OpenAI-Project` header, else the key's default project — and are not found (404, or
`file_not_found`) from another project, as on OpenAI; objects made by the test helpers
(`add_conversation`) are visible to every project. Further keys are accepted with `add_key`.

Choices where the reference is silent: 404 bodies use `code: null` (only the status says "not
found"); an unknown `file_id` in an image part is 400 `file_not_found` (`missing_file_status = 404`
answers 404 naming the part's `file_id` instead); only `message` input items are supported (other
item types → 400), which is all this project sends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import ipaddress
import json
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from ._base import (
    DEFAULT_OPENAI_KEY,
    Fault,
    FaultQueue,
    RecordedRequest,
    StandInServer,
    bearer_token,
    fault_response,
    merged_headers,
)

ReplyFn = Callable[[dict[str, Any]], str]
JsonFn = Callable[[dict[str, Any], dict[str, Any]], Any]

ROLES = ("user", "assistant", "system", "developer")
DETAILS = ("low", "high", "auto")
IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FAULT_KINDS = ("responses", "conversations", "files", "any")
#: billing `code` → message, sent with 429 `type: "insufficient_quota"`. The stand-in's own list
#: (not the services'): a fake that imported the code under test could not disagree with it.
BILLING_MESSAGES = {
    "insufficient_quota": "You exceeded your current quota, please check your plan and billing details.",
    "credit_balance_exhausted": "Your credit balance is exhausted. Add credits to continue using the API.",
    "organization_spend_limit_exceeded": "Your organization has reached its spend limit.",
    "project_spend_limit_exceeded": "This project has reached its spend limit.",
    "organization_usage_limit_exceeded": "Your organization has reached its usage limit.",
}
DEFAULT_MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini", "gpt-5", "gpt-5-mini")
LOCKED_MESSAGE = "Another process is currently operating on this conversation. Please retry in a few seconds."
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+);base64,(.*)$", re.DOTALL)
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JSON = web.RequestKey("json", object)
_JSON_ERROR = web.RequestKey("json_error", bool)
_RECORD = web.RequestKey("record", RecordedRequest)
#: the project the current request acts in (set per request by the middleware)
_PROJECT: contextvars.ContextVar[str] = contextvars.ContextVar("openai_standin_project", default="")


def project_of(api_key: str | None, project_header: str | None) -> str:
    """The project a request acts in: its `OpenAI-Project`, else its key's default project."""
    return project_header.strip() if project_header and project_header.strip() else f"key:{api_key}"


class ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(
    status: int, message: str, type_: str, param: str | None, code: str | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    all_headers = {"x-request-id": "req_" + secrets.token_hex(16)}
    all_headers.update(headers or {})
    return web.json_response(body, status=status, headers=all_headers)


def _missing(param: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param,
                    code="missing_required_parameter")


def _invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param, code=code)


def new_id(prefix: str, length: int = 48) -> str:
    return prefix + secrets.token_hex(length // 2)


def file_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "file-" + "".join(secrets.choice(alphabet) for _ in range(22))


def approx_tokens(text: str) -> int:
    """Token count good enough for usage fields: a quarter of the characters, at least 1."""
    return max(1, len(text) // 4) if text else 0


# -- pure helpers (validation, generation) ---------------------------------------------------------
def validate_metadata(value: object, param: str = "metadata") -> dict[str, str]:
    """≤ 16 string pairs, keys ≤ 64 characters, values ≤ 512 characters."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(param, "expected an object.", "invalid_type")
    if len(value) > 16:
        raise _invalid(param, f"too many properties. Expected an object with at most 16 properties, "
                       f"but got an object with {len(value)} properties instead.",
                       "object_above_max_properties")
    for key, val in value.items():
        if not isinstance(key, str) or len(key) > 64:
            raise _invalid(f"{param}.{key}", "keys must be strings of at most 64 characters.",
                           "string_above_max_length")
        if not isinstance(val, str):
            raise _invalid(f"{param}.{key}", "expected a string.", "invalid_type")
        if len(val) > 512:
            raise _invalid(f"{param}.{key}", "string too long. Expected at most 512 characters.",
                           "string_above_max_length")
    return dict(value)


def is_reachable_url(url: str) -> bool:
    """Whether OpenAI's servers could download this URL (not loopback/private/link-local)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname
    if host == "localhost" or host.endswith(".localhost") or host.endswith(".local"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    return not (address.is_loopback or address.is_private or address.is_link_local
                or address.is_unspecified)


def schema_example(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A deterministic value valid for a JSON schema: first enum value, zero, "", false, ...

    Covers what structured outputs allow ($ref/$defs, anyOf, enum, const, objects with every
    property, arrays of minItems, string minLength/format, number minimum).
    """
    root = schema if root is None else root
    if depth > 32 or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return schema_example(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return schema_example((non_null or options)[0], root, depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = schema_example(part, root, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
            else:
                return value
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: schema_example(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = int(schema.get("minItems", 0) or 0)
        return [schema_example(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind == "string":
        fmt = schema.get("format")
        if fmt == "date-time":
            return "1970-01-01T00:00:00Z"
        if fmt == "date":
            return "1970-01-01"
        return "x" * int(schema.get("minLength", 0) or 0)
    if kind in ("integer", "number"):
        low = schema.get("minimum")
        if low is None and "exclusiveMinimum" in schema:
            low = schema["exclusiveMinimum"] + (1 if kind == "integer" else 0.5)
        value = low if low is not None else 0
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    return None


def message_text(item: dict[str, Any]) -> str:
    """The text parts of one message item, joined."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(
        str(p.get("text", "")) for p in content
        if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
    )


def last_user_text(items: list[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("role") == "user":
            text = message_text(item).strip()
            if text:
                return text
    return ""


def default_reply(request: dict[str, Any]) -> str:
    """A short deterministic answer that mentions the customer's last text."""
    raw = request.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else [
        i for i in (raw or []) if isinstance(i, dict)
    ]
    text = last_user_text(items)
    if not text:
        has_image = any(
            isinstance(p, dict) and p.get("type") == "input_image"
            for i in items if isinstance(i.get("content"), list) for p in i["content"]
        )
        if has_image:
            return "Thanks for the image. How can I help you with it?"
        return "Thanks for your message. How can I help you?"
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f'Thanks for your message: "{text}". How can I help you further?'


def default_json(request: dict[str, Any], schema: dict[str, Any]) -> Any:
    return schema_example(schema)


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    content_type: str
    created_at: int
    #: the project it was uploaded in ("" = visible to every project: test setup)
    project: str = ""

    def object(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "expires_at": None, "status_details": None,
        }


@dataclass
class ResponseRecord:
    """One completed response: what was asked, what the model 'saw', what it answered."""

    id: str
    conversation_id: str | None
    request: dict[str, Any]
    effective_input: list[dict[str, Any]]
    response: dict[str, Any]
    started: float
    finished: float

    @property
    def output_text(self) -> str:
        return "".join(
            str(p.get("text", ""))
            for item in self.response.get("output", [])
            for p in item.get("content", [])
            if p.get("type") == "output_text"
        )


@dataclass
class _ConversationInfo:
    id: str
    created_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    deleted: bool = False
    #: the project it was created in ("" = visible to every project: test setup)
    project: str = ""

    def object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at,
                "metadata": dict(self.metadata)}


class OpenAIStandIn(StandInServer):
    """The OpenAI endpoints this project uses, stateful, with faults and per-conversation locks."""

    def __init__(
        self,
        api_key: str = DEFAULT_OPENAI_KEY,
        *,
        reply_fn: ReplyFn | None = None,
        json_fn: JsonFn | None = None,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        #: further keys this stand-in accepts (other accounts: a tenant's own key), see `add_key`
        self.other_keys: set[str] = set()
        #: request JSON → reply text (plain-text responses).
        self.reply_fn: ReplyFn = reply_fn or default_reply
        #: (request JSON, schema) → object (json.dumps'ed) or str (sent as is, may be invalid JSON).
        self.json_fn: JsonFn = json_fn or default_json
        #: conversation id → its items, oldest first (kept after a delete, like OpenAI).
        self.conversations: dict[str, list[dict[str, Any]]] = {}
        self.responses: dict[str, ResponseRecord] = {}
        self.files: dict[str, StoredFile] = {}
        #: status of a response whose input names an unknown or deleted `file_id` (400 or 404).
        self.missing_file_status = 400
        #: per-conversation latency of responses (overrides rules and the global latency).
        self.conversation_latency: dict[str, float] = {}
        self.locked_count = 0
        self.locked_by_conversation: dict[str, int] = {}
        self.faults = FaultQueue()
        self._info: dict[str, _ConversationInfo] = {}
        self._latency_rules: list[tuple[Callable[[dict[str, Any]], bool], float]] = []
        self._busy: set[str] = set()
        self._in_flight = 0
        self._gates: dict[str, asyncio.Event] = {}
        #: the models this key "has access to" (GET /v1/models).
        self.models: set[str] = set(DEFAULT_MODELS)

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"

    # -- control API -------------------------------------------------------------------------
    def fail_next(
        self,
        status: int,
        code: str | None = None,
        times: int = 1,
        headers: dict[str, str] | None = None,
        message: str | None = None,
        *,
        kind: str = "responses",
        after: int = 0,
        type_: str | None = None,
        param: str | None = None,
    ) -> None:
        """The next `times` requests of `kind` ("responses", "conversations", "files", "any"),
        after `after` normal ones, fail.

        Type and message follow OpenAI per status (429 `rate_limit_exceeded`, or a billing error
        `type: "insufficient_quota"` when `code` is one of `BILLING_MESSAGES`; 500 `server_error`,
        503 `server_is_overloaded`). `type_` writes the body's type as given and its code exactly as
        `code` (None → `null`, e.g. an older billing body); `param` names the parameter at fault.
        Default header: `retry-after-ms: 1` so the SDK retries at once; `headers` replaces it
        (`{}` = none, `{"retry-after": "2"}` = seconds).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}")
        default_type, default_code, default_message = _fault_defaults(status, code)
        if type_ is not None:
            default_code = code
            if status == 429 and type_ == "insufficient_quota":
                default_message = BILLING_MESSAGES[code or "insufficient_quota"]
        body = json.dumps({"error": {
            "message": message or default_message, "type": type_ or default_type, "param": param,
            "code": code if code is not None else default_code,
        }})
        all_headers = merged_headers({"retry-after-ms": "1"}, headers)
        self.faults.add(kind, Fault(status, body, all_headers, times, after=after))

    def add_key(self, api_key: str) -> None:
        """Accepts another API key too (another OpenAI account, e.g. a tenant's own); requests
        record which key and `OpenAI-Project` they came with (`requests[i].headers`)."""
        self.other_keys.add(api_key)

    def latency_for(self, predicate: Callable[[dict[str, Any]], bool], seconds: float) -> None:
        """Responses whose request JSON matches take `seconds` (first matching rule wins)."""
        self._latency_rules.append((predicate, seconds))

    def hold(self, conversation_id: str) -> asyncio.Event:
        """Responses on this conversation wait (holding its lock) until the returned event is set.

        Deterministic "slow customer" for tests: no timing assumptions, release when ready.
        """
        gate = self._gates.get(conversation_id)
        if gate is None or gate.is_set():
            gate = self._gates[conversation_id] = asyncio.Event()
        return gate

    def release_all(self) -> None:
        """Sets every hold (e.g. at the end of a test)."""
        for gate in self._gates.values():
            gate.set()
        self._gates.clear()

    def clear_latency(self) -> None:
        self.latency = 0.0
        self.conversation_latency.clear()
        self._latency_rules.clear()

    def responses_for(self, conversation_id: str) -> list[ResponseRecord]:
        """Completed responses of one conversation, oldest first."""
        return [r for r in self.responses.values() if r.conversation_id == conversation_id]

    def add_conversation(
        self, items: list[dict[str, Any]] | None = None, metadata: dict[str, str] | None = None
    ) -> str:
        """Creates a conversation directly (test setup); returns its id."""
        conv = _ConversationInfo(new_id("conv_"), int(time.time()), validate_metadata(metadata))
        self._info[conv.id] = conv
        self.conversations[conv.id] = [_normalize_item(i, "items", self.files) for i in items or []]
        return conv.id

    def is_deleted(self, conversation_id: str) -> bool:
        info = self._info.get(conversation_id)
        return info is None or info.deleted

    @property
    def in_flight(self) -> int:
        """Responses being generated now."""
        return self._in_flight

    def reset(self) -> None:
        self.conversations.clear()
        self._info.clear()
        self.responses.clear()
        self.files.clear()
        self.requests.clear()
        self.faults.clear()
        self.clear_latency()
        self.release_all()
        self.locked_count = 0
        self.locked_by_conversation.clear()
        self.missing_file_status = 400
        self.reply_fn = default_reply
        self.json_fn = default_json
        self.models = set(DEFAULT_MODELS)

    # -- HTTP plumbing -----------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._middleware])
        r = app.router
        r.add_post("/v1/conversations", self._conversation_create)
        r.add_get("/v1/conversations/{cid}", self._conversation_get)
        r.add_post("/v1/conversations/{cid}", self._conversation_update)
        r.add_delete("/v1/conversations/{cid}", self._conversation_delete)
        r.add_post("/v1/conversations/{cid}/items", self._items_create)
        r.add_get("/v1/conversations/{cid}/items", self._items_list)
        r.add_get("/v1/conversations/{cid}/items/{iid}", self._item_get)
        r.add_delete("/v1/conversations/{cid}/items/{iid}", self._item_delete)
        r.add_post("/v1/responses", self._response_create)
        r.add_get("/v1/responses/{rid}", self._response_get)
        r.add_delete("/v1/responses/{rid}", self._response_delete)
        r.add_post("/v1/files", self._file_create)
        r.add_get("/v1/files/{fid}", self._file_get)
        r.add_get("/v1/files/{fid}/content", self._file_content)
        r.add_delete("/v1/files/{fid}", self._file_delete)
        r.add_get("/v1/models", self._models_list)
        r.add_get("/v1/models/{model}", self._model_get)
        r.add_route("*", "/{tail:.*}", self._unknown)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        """Records the request, checks the key, serves faults; turns ApiError into its answer."""
        body: Any = None
        if request.content_type == "application/json" and request.body_exists:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
                request[_JSON_ERROR] = True
        elif request.content_type == "multipart/form-data":
            body = "<multipart>"
        request[_JSON] = body
        request[_RECORD] = await self.record(request, body)
        _PROJECT.set(project_of(bearer_token(request), request.headers.get("OpenAI-Project")))
        if bearer_token(request) not in {self.api_key, *self.other_keys}:
            return error_response(
                401, "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", "invalid_request_error", None,
                "invalid_api_key")
        kind = _kind_of(request.path)
        fault = self.faults.take(kind) if kind else None
        if fault is None and kind:
            fault = self.faults.take("any")
        if fault is not None:
            return fault_response(fault)
        if request.get(_JSON_ERROR):
            return error_response(
                400, "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)", "invalid_request_error", None, None)
        try:
            result: web.StreamResponse = await handler(request)
        except ApiError as exc:
            return exc.response()
        return result

    @staticmethod
    def _body(request: web.Request) -> dict[str, Any]:
        body = request.get(_JSON)
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def _conversation(self, cid: str, param: str | None = None) -> _ConversationInfo:
        info = self._info.get(cid)
        if info is None or info.deleted or not _visible(info.project):
            raise ApiError(404, f"Conversation with id '{cid}' not found.", param=param)
        return info

    def _check_unlocked(self, cid: str) -> None:
        if cid in self._busy:
            self.locked_count += 1
            self.locked_by_conversation[cid] = self.locked_by_conversation.get(cid, 0) + 1
            raise ApiError(400, LOCKED_MESSAGE, param="conversation", code="conversation_locked")

    async def _unknown(self, request: web.Request) -> web.Response:
        raise ApiError(404, f"Invalid URL ({request.method} {request.path})")

    # -- models ------------------------------------------------------------------------------
    @staticmethod
    def _model_object(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}

    async def _models_list(self, request: web.Request) -> web.Response:
        await self.delay()
        data = [self._model_object(m) for m in sorted(self.models)]
        return web.json_response({"object": "list", "data": data})

    async def _model_get(self, request: web.Request) -> web.Response:
        await self.delay()
        model = request.match_info["model"]
        if model not in self.models:
            raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           code="model_not_found")
        return web.json_response(self._model_object(model))

    # -- conversations -----------------------------------------------------------------------
    async def _conversation_create(self, request: web.Request) -> web.Response:
        await self.delay()
        body = self._body(request)
        raw_items = body.get("items") or []
        if not isinstance(raw_items, list):
            raise _invalid("items", "expected an array.", "invalid_type")
        if len(raw_items) > 20:
            raise _invalid("items", "array too long. Expected at most 20 items.", "array_above_max_length")
        metadata = validate_metadata(body.get("metadata"))
        items = [_normalize_item(i, f"items[{n}]", self._visible_files()) for n, i in enumerate(raw_items)]
        conv = _ConversationInfo(new_id("conv_"), int(time.time()), metadata, project=_PROJECT.get())
        self._info[conv.id] = conv
        self.conversations[conv.id] = items
        return web.json_response(conv.object())

    async def _conversation_get(self, request: web.Request) -> web.Response:
        await self.delay()
        return web.json_response(self._conversation(request.match_info["cid"]).object())

    async def _conversation_update(self, request: web.Request) -> web.Response:
        await self.delay()
        conv = self._conversation(request.match_info["cid"])
        body = self._body(request)
        if "metadata" not in body:
            raise _missing("metadata")
        conv.metadata = validate_metadata(body["metadata"])
        return web.json_response(conv.object())

    async def _conversation_delete(self, request: web.Request) -> web.Response:
        await self.delay()
        conv = self._conversation(request.match_info["cid"])
        conv.deleted = True
        return web.json_response({"id": conv.id, "object": "conversation.deleted", "deleted": True})

    async def _items_create(self, request: web.Request) -> web.Response:
        await self.delay()
        conv = self._conversation(request.match_info["cid"])
        body = self._body(request)
        raw_items = body.get("items")
        if raw_items is None:
            raise _missing("items")
        if not isinstance(raw_items, list) or not raw_items:
            raise _invalid("items", "expected a non-empty array.", "invalid_type")
        if len(raw_items) > 20:
            raise _invalid("items", "array too long. Expected at most 20 items.", "array_above_max_length")
        items = [_normalize_item(i, f"items[{n}]", self._visible_files()) for n, i in enumerate(raw_items)]
        self._check_unlocked(conv.id)
        self.conversations[conv.id].extend(items)
        return web.json_response(_list_object(items, has_more=False))

    async def _items_list(self, request: web.Request) -> web.Response:
        await self.delay()
        conv = self._conversation(request.match_info["cid"])
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise _invalid("limit", "expected an integer.", "invalid_type") from None
        if not 1 <= limit <= 100:
            raise _invalid("limit", "expected a value between 1 and 100.", "integer_out_of_range")
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _invalid("order", "expected 'asc' or 'desc'.")
        items = list(self.conversations[conv.id])
        if order == "desc":
            items.reverse()
        after = request.query.get("after")
        if after:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise _invalid("after", f"no item with id '{after}' in this conversation.")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return web.json_response(_list_object(page, has_more=len(items) > limit))

    async def _item_get(self, request: web.Request) -> web.Response:
        await self.delay()
        conv = self._conversation(request.match_info["cid"])
        item = self._find_item(conv.id, request.match_info["iid"])
        return web.json_response(item)

    async def _item_delete(self, request: web.Request) -> web.Response:
        await self.delay()
        conv = self._conversation(request.match_info["cid"])
        item = self._find_item(conv.id, request.match_info["iid"])
        self._check_unlocked(conv.id)
        self.conversations[conv.id].remove(item)
        return web.json_response(conv.object())

    def _find_item(self, cid: str, iid: str) -> dict[str, Any]:
        for item in self.conversations[cid]:
            if item.get("id") == iid:
                return item
        raise ApiError(404, f"Item with id '{iid}' not found.")

    # -- responses ---------------------------------------------------------------------------
    async def _response_create(self, request: web.Request) -> web.Response:
        body = self._body(request)
        plan = self._plan_response(body)
        cid = plan["conversation_id"]
        if cid is not None:
            self._check_unlocked(cid)
            self._busy.add(cid)
        self._in_flight += 1
        started = time.monotonic()
        try:
            await self.delay(self._latency_of(body, cid))
            gate = self._gates.get(cid) if cid is not None else None
            if gate is not None:
                await gate.wait()
            if cid is not None:
                self._conversation(cid, "conversation")  # deleted meanwhile → 404
            try:
                response = self._generate(body, plan)
            except ApiError:
                raise
            except Exception:  # a test's reply_fn/json_fn failed: answer like OpenAI's 500
                raise ApiError(500, "The server had an error while processing your request. Sorry "
                               "about that!", type_="server_error") from None
            if cid is not None:
                self.conversations[cid].extend(plan["input_items"])
                self.conversations[cid].extend(json.loads(json.dumps(response["output"])))
            self.responses[response["id"]] = ResponseRecord(
                id=response["id"], conversation_id=cid, request=body,
                effective_input=plan["prefix"] + plan["input_items"], response=response,
                started=started, finished=time.monotonic(),
            )
            return web.json_response(response)
        finally:
            self._in_flight -= 1
            if cid is not None:
                self._busy.discard(cid)

    def _plan_response(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validates a create-response body; resolves conversation / previous response state."""
        model = body.get("model")
        if not model:
            raise _missing("model")
        if not isinstance(model, str):
            raise _invalid("model", "expected a string.", "invalid_type")
        if "input" not in body or body["input"] is None:
            raise _missing("input")
        raw_input = body["input"]
        if isinstance(raw_input, str):
            input_items = [_normalize_item({"role": "user", "content": raw_input}, "input",
                                           self._visible_files(), self.missing_file_status)]
        elif isinstance(raw_input, list):
            input_items = [_normalize_item(i, f"input[{n}]", self._visible_files(), self.missing_file_status)
                           for n, i in enumerate(raw_input)]
        else:
            raise _invalid("input", "expected a string or an array.", "invalid_type")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _invalid("instructions", "expected a string.", "invalid_type")
        validate_metadata(body.get("metadata"))
        max_tokens = body.get("max_output_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 16
        ):
            raise _invalid("max_output_tokens", "integer below minimum value. Expected a value >= 16.",
                           "integer_below_min_value")
        fmt = _text_format(body.get("text"))
        conversation = body.get("conversation")
        previous = body.get("previous_response_id")
        if conversation is not None and previous is not None:
            raise ApiError(400, "Mutually exclusive parameters: Ensure you are only providing one of: "
                           "'previous_response_id' or 'conversation'.", param=None,
                           code="mutually_exclusive_parameters")
        cid: str | None = None
        prefix: list[dict[str, Any]] = []
        if conversation is not None:
            if isinstance(conversation, dict):
                conversation = conversation.get("id")
            if not isinstance(conversation, str) or not conversation:
                raise _invalid("conversation", "expected a conversation id or an object with 'id'.",
                               "invalid_type")
            cid = self._conversation(conversation, "conversation").id
            prefix = list(self.conversations[cid])
        elif previous is not None:
            record = self.responses.get(str(previous))
            if record is None:
                raise ApiError(404, f"Previous response with id '{previous}' not found.",
                               param="previous_response_id")
            prefix = record.effective_input + list(record.response["output"])
        return {"conversation_id": cid, "prefix": prefix, "input_items": input_items, "format": fmt,
                "previous": previous}

    def _latency_of(self, body: dict[str, Any], cid: str | None) -> float:
        if cid is not None and cid in self.conversation_latency:
            return self.conversation_latency[cid]
        for predicate, seconds in self._latency_rules:
            if predicate(body):
                return seconds
        return self.latency

    def _generate(self, body: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
        fmt: dict[str, Any] = plan["format"]
        if fmt["type"] == "json_schema":
            value = self.json_fn(body, fmt.get("schema") or {})
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        elif fmt["type"] == "json_object":
            text = "{}"
        else:
            text = str(self.reply_fn(body))
        status, incomplete = "completed", None
        max_tokens = body.get("max_output_tokens")
        if isinstance(max_tokens, int) and approx_tokens(text) > max_tokens:
            text = text[: max_tokens * 4]
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        effective = plan["prefix"] + plan["input_items"]
        input_tokens = approx_tokens(str(body.get("instructions") or "")) + sum(
            _item_tokens(i) for i in effective
        )
        output_tokens = approx_tokens(text)
        now = int(time.time())
        cid = plan["conversation_id"]
        return {
            "id": new_id("resp_"), "object": "response", "created_at": now, "status": status,
            "background": False, "completed_at": now if status == "completed" else None,
            "error": None, "incomplete_details": incomplete,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": [{
                "id": new_id("msg_"), "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }],
            "parallel_tool_calls": True, "previous_response_id": plan["previous"],
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
            "text": {"format": fmt}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": body.get("truncation", "disabled"),
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": None, "metadata": body.get("metadata") or {},
            "safety_identifier": body.get("safety_identifier"),
            "conversation": {"id": cid} if cid else None,
        }

    async def _response_get(self, request: web.Request) -> web.Response:
        await self.delay()
        record = self.responses.get(request.match_info["rid"])
        if record is None:
            raise ApiError(404, f"Response with id '{request.match_info['rid']}' not found.")
        return web.json_response(record.response)

    async def _response_delete(self, request: web.Request) -> web.Response:
        await self.delay()
        rid = request.match_info["rid"]
        if self.responses.pop(rid, None) is None:
            raise ApiError(404, f"Response with id '{rid}' not found.")
        return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})

    # -- files -------------------------------------------------------------------------------
    async def _file_create(self, request: web.Request) -> web.Response:
        await self.delay()
        if request.content_type != "multipart/form-data":
            raise ApiError(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
        form = await request.post()
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, web.FileField):
            raise _missing("file")
        if not isinstance(purpose, str) or not purpose:
            raise _missing("purpose")
        if purpose not in FILE_PURPOSES:
            raise _invalid("purpose", f"expected one of {', '.join(FILE_PURPOSES)}.")
        data = upload.file.read()
        if not data:
            raise _invalid("file", "the file is empty.")
        stored = StoredFile(file_id(), upload.filename or "upload", purpose, data,
                            upload.content_type or "application/octet-stream", int(time.time()),
                            project=_PROJECT.get())
        self.files[stored.id] = stored
        record = request.get(_RECORD)
        if record is not None:
            record.body = {"purpose": purpose, "filename": stored.filename,
                                      "bytes": len(data)}
        return web.json_response(stored.object())

    def _visible_files(self) -> dict[str, StoredFile]:
        """The files of the current request's project (and the test setup's)."""
        return {fid: f for fid, f in self.files.items() if _visible(f.project)}

    def _file(self, fid: str) -> StoredFile:
        stored = self.files.get(fid)
        if stored is None or not _visible(stored.project):
            raise ApiError(404, f"No such File object: {fid}", param="id")
        return stored

    async def _file_get(self, request: web.Request) -> web.Response:
        await self.delay()
        return web.json_response(self._file(request.match_info["fid"]).object())

    async def _file_content(self, request: web.Request) -> web.Response:
        await self.delay()
        stored = self._file(request.match_info["fid"])
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _file_delete(self, request: web.Request) -> web.Response:
        await self.delay()
        stored = self._file(request.match_info["fid"])
        del self.files[stored.id]
        return web.json_response({"id": stored.id, "object": "file", "deleted": True})


# -- module helpers ------------------------------------------------------------------------------

def _visible(project: str) -> bool:
    """Whether an object of `project` is visible to the current request (same project, or setup's)."""
    return not project or project == _PROJECT.get()

def _kind_of(path: str) -> str | None:
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/conversations"):
        return "conversations"
    if path.startswith("/v1/files"):
        return "files"
    return None


def _fault_defaults(status: int, code: str | None) -> tuple[str, str | None, str]:
    """(type, code, message) OpenAI uses for an error status."""
    if status == 429 and code in BILLING_MESSAGES:
        return ("insufficient_quota", code, BILLING_MESSAGES[code])
    if status == 429:
        return ("requests", "rate_limit_exceeded",
                "Rate limit reached for requests. Please try again in 1ms.")
    if status == 503:
        return ("service_unavailable_error", "server_is_overloaded",
                "The server is overloaded or not ready yet.")
    if status >= 500:
        return ("server_error", None,
                "The server had an error while processing your request. Sorry about that!")
    if status == 401:
        return ("invalid_request_error", "invalid_api_key", "Incorrect API key provided.")
    if status == 404:
        return ("invalid_request_error", None, "Not found.")
    return ("invalid_request_error", None, f"Injected error (HTTP {status}).")


def _list_object(items: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list", "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def _text_format(text: object) -> dict[str, Any]:
    if text is None:
        return {"type": "text"}
    if not isinstance(text, dict):
        raise _invalid("text", "expected an object.", "invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_schema", "json_object"):
        raise _invalid("text.format.type", "expected 'text', 'json_schema' or 'json_object'.")
    if fmt["type"] == "json_schema":
        name = fmt.get("name")
        if not name:
            raise _missing("text.format.name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise _invalid("text.format.name", "must match ^[a-zA-Z0-9_-]{1,64}$.")
        if not isinstance(fmt.get("schema"), dict):
            raise _missing("text.format.schema")
    return dict(fmt)


def _normalize_item(
    raw: object, param: str, files: dict[str, StoredFile], missing_file_status: int = 400
) -> dict[str, Any]:
    """Validates one input message and returns it as a stored conversation item."""
    if not isinstance(raw, dict):
        raise _invalid(param, "expected an object.", "invalid_type")
    kind = raw.get("type", "message")
    if kind != "message":
        raise _invalid(f"{param}.type", f"the stand-in supports 'message' items only, got {kind!r}.")
    role = raw.get("role")
    if role is None:
        raise _missing(f"{param}.role")
    if role not in ROLES:
        raise _invalid(f"{param}.role", f"expected one of {', '.join(ROLES)}.")
    content = raw.get("content")
    if content is None:
        raise _missing(f"{param}.content")
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": text_type, "text": content}]
    elif isinstance(content, list):
        parts = [_normalize_part(p, f"{param}.content[{n}]", role, files, missing_file_status)
                 for n, p in enumerate(content)]
    else:
        raise _invalid(f"{param}.content", "expected a string or an array.", "invalid_type")
    for part in parts:
        if part["type"] == "output_text":
            part.setdefault("annotations", [])
    return {"id": raw.get("id") or new_id("msg_"), "type": "message", "status": "completed",
            "role": role, "content": parts}


def _missing_file(fid: object, param: str, status: int) -> ApiError:
    """An unknown file: 400 `file_not_found`, or (missing_file_status = 404) a 404 naming the part."""
    return ApiError(status, f"File '{fid}' not found.", param=param,
                    code="file_not_found" if status == 400 else None)


def _normalize_part(
    raw: object, param: str, role: str, files: dict[str, StoredFile], missing_file_status: int = 400
) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _invalid(param, "expected an object.", "invalid_type")
    kind = raw.get("type")
    if kind in ("input_text", "output_text"):
        if kind == "output_text" and role != "assistant":
            raise _invalid(f"{param}.type", "output_text is only valid in assistant messages.")
        if not isinstance(raw.get("text"), str):
            raise _missing(f"{param}.text")
        return dict(raw)
    if kind == "input_image":
        if role == "assistant":
            raise _invalid(f"{param}.type", "input_image is not valid in assistant messages.")
        if "detail" not in raw or raw["detail"] is None:
            raise _missing(f"{param}.detail")
        if raw["detail"] not in DETAILS:
            raise _invalid(f"{param}.detail", "expected one of low, high, auto.")
        url, fid = raw.get("image_url"), raw.get("file_id")
        if url is None and fid is None:
            raise ApiError(400, f"Invalid '{param}': one of 'image_url' or 'file_id' is required.",
                           param=param, code="missing_required_parameter")
        if fid is not None and fid not in files:
            raise _missing_file(fid, f"{param}.file_id", missing_file_status)
        if url is not None:
            _check_image_url(url, f"{param}.image_url")
        return dict(raw)
    if kind == "input_file":
        if raw.get("file_id") is not None and raw["file_id"] not in files:
            raise _missing_file(raw["file_id"], f"{param}.file_id", missing_file_status)
        return dict(raw)
    raise _invalid(f"{param}.type", f"unsupported content part type {kind!r}.")


def _check_image_url(url: object, param: str) -> None:
    if not isinstance(url, str) or not url:
        raise _invalid(param, "expected a URL string.", "invalid_type")
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if not match or match.group(1).lower() not in IMAGE_MIMES:
            raise ApiError(400, "Invalid image URL: expected a base64 data URL of a PNG, JPEG, WEBP or "
                           "non-animated GIF image.", param=param, code="invalid_image_url")
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            raise ApiError(400, "The image data you provided does not represent a valid image.",
                           param=param, code="invalid_image")
        return
    if not is_reachable_url(url):
        raise ApiError(400, f"Timeout while downloading {url}.", param=param, code="invalid_image_url")


def _item_tokens(item: dict[str, Any]) -> int:
    total = 4
    for part in item.get("content", []):
        if part.get("type") == "input_image":
            total += 85 if part.get("detail") == "low" else 765
        else:
            total += approx_tokens(str(part.get("text", "")))
    return total

