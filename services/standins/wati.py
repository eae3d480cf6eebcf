"""WATI stand-in: getMessages history, sendSessionMessage/File, getMedia — shapes of docs/wati.md.

Behaviour chosen where the reference says "unconfirmed" (tests rely on these choices):
- getMessages of a contact with no history (unknown contact) answers the ordinary success shape
  with no items (`total: 0`), as WATI does for a contact without messages. Items come NEWEST FIRST
  by parsed `created`/`timestamp` (items without a parseable time last) unless `history_order`
  says otherwise; pages are 1-based; `link.nextPage` is a relative URL or null.
- sendSessionMessage reads `messageText` and `localMessageId` from the query string or a form
  field. Success: HTTP 200 `{"ok": true, "result": true, "message": <the history item>}` where the
  item carries `id`, `whatsappMessageId` and `localMessageId`. Business errors (empty text, text
  over 4096 characters) are HTTP 200 `{"result": false, "info": "..."}`, like WATI.
- Our own sends appear in the contact's history as `owner: true`, `operatorName: "API Token <last4>"`.
- A wrong or missing Bearer token is HTTP 401 with an empty body; an unknown tenant is HTTP 404.
- Several WATI tenants (accounts) on one server, as on WATI's shared hosts: `add_tenant` gives each
  its own tenant id in the path, its own token and its own contacts, sends, media, faults and
  latency; a request is answered by the tenant its path names.
- getMedia of an unknown file is HTTP 404 `{"result": false, "info": "File not found"}`.
- A contact may be known by a phone number and a BSUID at once: `link_contact` makes them share one
  history, so either id works in paths.
- getContacts (`pageSize`, `pageNumber`), the cheap authenticated call of `watistream check`:
  `{"result": "success", "contact_list": [{"wAid": ..., "phone": ...}], "link": {...}}` over the
  contacts that have history here; same 401/404 as every call.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from services.common.timeparse import first_time

from ._base import (
    DEFAULT_WATI_TOKEN,
    Fault,
    FaultQueue,
    StandInServer,
    bearer_token,
    fault_response,
    merged_headers,
)

MAX_TEXT_CHARS = 4096
PathKind = Literal["getMessages", "send", "getMedia"]
TsFormat = Literal["iso", "iso_no_z", "iso7", "unix"]
HistoryOrder = Literal["newest_first", "oldest_first", "as_added"]
_PATH_KINDS = ("getMessages", "send", "getMedia")


@dataclass
class WatiSent:
    """One send our code made through the stand-in (text or file)."""

    contact_id: str
    kind: Literal["text", "file"]
    text: str
    message_id: str
    whatsapp_message_id: str
    local_message_id: str | None
    at: datetime
    file_name: str | None = None
    file_bytes: bytes | None = None
    content_type: str | None = None


@dataclass
class _Media:
    data: bytes
    content_type: str


@dataclass
class _Contact:
    items: list[dict[str, Any]] = field(default_factory=list)
    conversation_id: str = field(default_factory=lambda: secrets.token_hex(12))
    ticket_id: str = field(default_factory=lambda: secrets.token_hex(12))


def object_id() -> str:
    """A 24-hex id like WATI's (MongoDB ObjectId-shaped)."""
    return secrets.token_hex(12)


def wamid() -> str:
    """A Meta message id shaped like `wamid.HBgN...`."""
    return "wamid.HBgL" + secrets.token_hex(16).upper() + "AA=="


def format_created(at: datetime, ts_format: TsFormat) -> str | None:
    """`created` the way WATI writes it in the chosen variant (None for "unix": only `timestamp`)."""
    at = at.astimezone(UTC)
    if ts_format == "iso":
        return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    if ts_format == "iso_no_z":
        return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}"
    if ts_format == "iso7":
        return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond:06d}0Z"
    if ts_format == "unix":
        return None
    raise ValueError(f"unknown ts_format {ts_format!r}")


class WatiStandIn(StandInServer):
    """A WATI tenant with per-contact history, recorded sends, media and fault injection."""

    def __init__(
        self,
        token: str = DEFAULT_WATI_TOKEN,
        *,
        tenant: str = "tenant123",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__()
        self.token = token
        self.tenant = tenant
        #: time source for our sends' history items (tests may inject a clock).
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.history_order: HistoryOrder = "newest_first"
        self.sent: list[WatiSent] = []
        self.faults = FaultQueue()
        self._contacts: dict[str, _Contact] = {}
        self._aliases: dict[str, str] = {}
        self._media: dict[str, _Media] = {}
        #: the other tenants this server hosts (`add_tenant`), and the server hosting this one
        self._tenants: dict[str, WatiStandIn] = {}
        self._host: WatiStandIn | None = None

    def add_tenant(self, tenant: str, token: str) -> WatiStandIn:
        """Another WATI tenant on this server (same origin, its own id and token and state); returns
        its stand-in, steered and asserted on like this one."""
        if tenant == self.tenant or tenant in self._tenants:
            raise ValueError(f"tenant {tenant!r} is already served here")
        other = WatiStandIn(token, tenant=tenant, clock=self.clock)
        other._host = self
        self._tenants[tenant] = other
        return other

    @property
    def origin(self) -> str:
        return self._host.origin if self._host is not None else super().origin

    @property
    def url(self) -> str:
        """API base including the tenant, like `https://live-server-XXXX.wati.io/{tenantId}`."""
        return f"{self.origin}/{self.tenant}"

    @property
    def operator_name(self) -> str:
        """How WATI names sends made with our API token in history."""
        return f"API Token {self.token[-4:]}"

    # -- state helpers ----------------------------------------------------------------------
    def _canonical(self, contact_id: str) -> str:
        return self._aliases.get(contact_id, contact_id)

    def _contact(self, contact_id: str) -> _Contact:
        return self._contacts.setdefault(self._canonical(contact_id), _Contact())

    def link_contact(self, *contact_ids: str) -> None:
        """Makes several ids (waId, BSUID) name one contact; history added before is merged."""
        if len(contact_ids) < 2:
            raise ValueError("link_contact needs at least two ids")
        canonical = self._canonical(contact_ids[0])
        target = self._contacts.setdefault(canonical, _Contact())
        for other in contact_ids[1:]:
            other_canonical = self._canonical(other)
            if other_canonical == canonical:
                continue
            moved = self._contacts.pop(other_canonical, None)
            if moved is not None:
                target.items.extend(moved.items)
            for alias, points_to in list(self._aliases.items()):
                if points_to == other_canonical:
                    self._aliases[alias] = canonical
            self._aliases[other_canonical] = canonical

    def add_history(self, contact_id: str, item: dict[str, Any]) -> dict[str, Any]:
        """Adds one raw WATI history item exactly as given; returns it."""
        self._contact(contact_id).items.append(item)
        return item

    def add_message(
        self,
        contact_id: str,
        *,
        text: str,
        owner: bool,
        operator_name: str | None = None,
        at: datetime,
        event_type: str = "message",
        ts_format: TsFormat = "iso",
        **extra: Any,
    ) -> dict[str, Any]:
        """Builds a realistic history item and adds it; `extra` keys override/add fields.

        event_type "message": text in `text`; "ticket": text in `eventDescription`;
        "broadcastMessage": text in `finalText` (a template send, owner true).
        """
        contact = self._contact(contact_id)
        created = format_created(at, ts_format)
        item: dict[str, Any] = {"id": object_id()}
        if created is not None:
            item["created"] = created
        item["conversationId"] = contact.conversation_id
        item["ticketId"] = contact.ticket_id
        item["timestamp"] = str(int(at.timestamp()))
        item["eventType"] = event_type
        if event_type == "message":
            item.update({
                "whatsappMessageId": wamid(), "text": text, "type": "text", "data": None,
                "owner": owner, "statusString": "READ" if owner else "SENT",
                "operatorName": operator_name, "operatorEmail": None, "assignedId": None,
                "localMessageId": None, "replySourceMessage": None, "avatarUrl": None,
            })
        elif event_type == "ticket":
            item.update({"eventDescription": text, "actor": operator_name, "type": "ticket"})
        elif event_type == "broadcastMessage":
            item.update({
                "whatsappMessageId": wamid(), "finalText": text, "type": "template", "owner": True,
                "operatorName": operator_name, "broadcastName": "broadcast", "templateName": "template",
                "statusString": "DELIVERED",
            })
        else:
            item.update({"text": text, "owner": owner, "operatorName": operator_name})
        item.update(extra)
        contact.items.append(item)
        return item

    def history(self, contact_id: str) -> list[dict[str, Any]]:
        """The contact's items in the order they were added (a copy)."""
        contact = self._contacts.get(self._canonical(contact_id))
        return list(contact.items) if contact else []

    def add_media(self, file_name: str, data: bytes, content_type: str) -> None:
        """Registers bytes served by `getMedia?fileName=<file_name>`."""
        self._media[file_name.lstrip("/")] = _Media(data, content_type)

    def fail_next(
        self,
        path_kind: PathKind,
        status: int,
        times: int = 1,
        body: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        after: int = 0,
    ) -> None:
        """The next `times` requests of that kind (after `after` normal ones) get this answer.

        Defaults: 429 carries `Retry-After: 0`; a 200 on "send" is `{"result": false, ...}`;
        other bodies are `{"result": false, "info": "<status>"}`. Passing `headers` replaces the
        defaults (`{}` = no Retry-After). `body` may be anything, e.g. non-JSON garbage.
        """
        if path_kind not in _PATH_KINDS:
            raise ValueError(f"path_kind must be one of {_PATH_KINDS}")
        default_headers = {"Retry-After": "0"} if status == 429 else {}
        if body is None:
            info = "Injected failure" if status == 200 else f"HTTP {status}"
            body = json.dumps({"result": False, "info": info})
        self.faults.add(path_kind, Fault(
            status, body, merged_headers(default_headers, headers), times, after=after))

    def reset(self) -> None:
        """Forgets history, sends, media, faults and records (servers keep running)."""
        self._contacts.clear()
        self._aliases.clear()
        self._media.clear()
        self.sent.clear()
        self.requests.clear()
        self.faults.clear()
        self.latency = 0.0
        self.release_requests()
        self.history_order = "newest_first"
        self.clock = lambda: datetime.now(UTC)
        for other in self._tenants.values():  # the hosted tenants stay, emptied
            other.reset()

    # -- HTTP ------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_get("/{tenant}/api/v1/getMessages/{contact}", self._by_tenant("_get_messages"))
        app.router.add_post("/{tenant}/api/v1/sendSessionMessage/{contact}", self._by_tenant("_send_message"))
        app.router.add_post("/{tenant}/api/v1/sendSessionFile/{contact}", self._by_tenant("_send_file"))
        app.router.add_get("/{tenant}/api/v1/getMedia", self._by_tenant("_get_media"))
        app.router.add_get("/{tenant}/api/v1/getContacts", self._by_tenant("_get_contacts"))
        return app

    def _by_tenant(self, handler: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of the tenant the path names (this one for an unknown tenant: its 404)."""

        async def handle(request: web.Request) -> web.Response:
            target = self._tenants.get(request.match_info.get("tenant", ""), self)
            response: web.Response = await getattr(target, handler)(request)
            return response

        return handle

    async def _guard(self, request: web.Request, kind: str, body: Any) -> web.Response | None:
        """Records, waits the latency, checks tenant and token, serves an injected fault."""
        await self.record(request, body)
        await self.delay()
        if request.match_info.get("tenant") != self.tenant:
            return web.Response(status=404, text="Not Found")
        if bearer_token(request) != self.token:
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        fault = self.faults.take(kind)
        return fault_response(fault) if fault is not None else None

    async def _get_messages(self, request: web.Request) -> web.Response:
        blocked = await self._guard(request, "getMessages", None)
        if blocked is not None:
            return blocked
        contact_id = request.match_info["contact"]
        try:
            page_size = int(request.query.get("pageSize", "100"))
            page_number = int(request.query.get("pageNumber", "1"))
        except ValueError:
            return web.json_response({"result": False, "info": "Invalid paging parameters"}, status=400)
        if page_size < 1 or page_number < 1:
            return web.json_response({"result": False, "info": "Invalid paging parameters"}, status=400)
        items = self._ordered(contact_id)
        start = (page_number - 1) * page_size
        page = items[start:start + page_size]
        total = len(items)
        has_next = start + page_size < total

        def link(number: int) -> str:
            return f"/api/v1/getMessages/{contact_id}?pageSize={page_size}&pageNumber={number}"

        return web.json_response({
            "result": "success",
            "messages": {
                "items": page, "pageNumber": page_number, "pageSize": page_size,
                "total": total, "lastId": None,
            },
            "link": {
                "prevPage": link(page_number - 1) if page_number > 1 else None,
                "nextPage": link(page_number + 1) if has_next else None,
                "pageNumber": page_number, "pageSize": page_size, "total": total,
            },
        })

    async def _get_contacts(self, request: web.Request) -> web.Response:
        blocked = await self._guard(request, "getContacts", None)
        if blocked is not None:
            return blocked
        try:
            page_size = int(request.query.get("pageSize", "20"))
            page_number = int(request.query.get("pageNumber", "1"))
        except ValueError:
            return web.json_response({"result": False, "info": "Invalid paging parameters"}, status=400)
        if page_size < 1 or page_number < 1:
            return web.json_response({"result": False, "info": "Invalid paging parameters"}, status=400)
        ids = sorted(self._contacts)
        start = (page_number - 1) * page_size
        page = [{"id": contact_id, "wAid": contact_id, "phone": contact_id} for contact_id in
                ids[start:start + page_size]]
        return web.json_response({
            "result": "success", "contact_list": page,
            "link": {"pageNumber": page_number, "pageSize": page_size, "total": len(ids)},
        })

    def _ordered(self, contact_id: str) -> list[dict[str, Any]]:
        items = self.history(contact_id)
        if self.history_order == "as_added":
            return items
        floor = datetime.min.replace(tzinfo=UTC)

        def when(item: dict[str, Any]) -> datetime:
            return first_time(item.get("created"), item.get("timestamp")) or floor

        newest_first = self.history_order == "newest_first"
        timed = sorted(
            (i for i in items if when(i) != floor), key=when, reverse=newest_first
        )
        untimed = [i for i in items if when(i) == floor]
        return timed + untimed

    async def _send_message(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        blocked = await self._guard(request, "send", _plain(form))
        if blocked is not None:
            return blocked
        text = _field(request, form, "messageText")
        local_id = _field(request, form, "localMessageId") or None
        if not text:
            return web.json_response({"result": False, "info": "Message text is required"})
        if len(text) > MAX_TEXT_CHARS:
            return web.json_response({
                "result": False,
                "info": f"Message text is too long. Maximum length is {MAX_TEXT_CHARS} characters.",
            })
        contact_id = request.match_info["contact"]
        item = self._append_own(contact_id, text=text, local_id=local_id, msg_type="text", data=None)
        self.sent.append(WatiSent(
            contact_id=contact_id, kind="text", text=text, message_id=item["id"],
            whatsapp_message_id=item["whatsappMessageId"], local_message_id=local_id,
            at=datetime.now(UTC),
        ))
        return web.json_response({"ok": True, "result": True, "message": dict(item)})

    async def _send_file(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        blocked = await self._guard(request, "send", _plain(form))
        if blocked is not None:
            return blocked
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return web.json_response({"result": False, "info": "File is required"})
        data = upload.file.read()
        content_type = upload.content_type or "application/octet-stream"
        caption = _field(request, form, "caption")
        folder = next(
            (k for k in ("image", "video", "audio") if content_type.startswith(k + "/")), "document"
        )
        path = f"data/{folder}s/{secrets.token_hex(6)}_{upload.filename}"
        self.add_media(path, data, content_type)
        contact_id = request.match_info["contact"]
        item = self._append_own(contact_id, text=caption, local_id=None, msg_type=folder, data=path)
        self.sent.append(WatiSent(
            contact_id=contact_id, kind="file", text=caption, message_id=item["id"],
            whatsapp_message_id=item["whatsappMessageId"], local_message_id=None,
            at=datetime.now(UTC), file_name=upload.filename, file_bytes=data, content_type=content_type,
        ))
        return web.json_response({"ok": True, "result": True, "message": dict(item)})

    def _append_own(
        self, contact_id: str, *, text: str, local_id: str | None, msg_type: str, data: str | None
    ) -> dict[str, Any]:
        at = self.clock()
        return self.add_message(
            contact_id, text=text, owner=True, operator_name=self.operator_name, at=at,
            type=msg_type, data=data, localMessageId=local_id, statusString="SENT",
        )

    async def _get_media(self, request: web.Request) -> web.Response:
        blocked = await self._guard(request, "getMedia", None)
        if blocked is not None:
            return blocked
        name = request.query.get("fileName", "").lstrip("/")
        if not name:
            return web.json_response({"result": False, "info": "fileName is required"}, status=400)
        media = self._media.get(name)
        if media is None:
            return web.json_response({"result": False, "info": "File not found"}, status=404)
        return web.Response(body=media.data, content_type=media.content_type)

    @staticmethod
    async def _form(request: web.Request) -> dict[str, Any]:
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return dict((await request.post()).items())
        return {}


def _field(request: web.Request, form: dict[str, Any], name: str) -> str:
    """A text field from the form, else from the query string (WATI accepts both)."""
    value = form.get(name)
    if isinstance(value, str):
        return value
    return request.query.get(name, "")


def _plain(form: dict[str, Any]) -> dict[str, Any]:
    """Form fields for the request record (file parts by their name only)."""
    return {
        k: (f"<file {v.filename}>" if isinstance(v, web.FileField) else v) for k, v in form.items()
    }
