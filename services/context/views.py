"""The context service's web views (faust web): customer state, open batches, pause/resume, ops.

Every view that shows or changes customer data requires `Authorization: Bearer <WEB_TOKEN>`
(compared in constant time; 401 JSON otherwise). The server binds `CONTEXT_WEB_HOST` (loopback by
default), and faust's built-in table/router/stats endpoints are off (app.py).

- `GET  /customers/{key}/`          one customer's state and batches, answered by the worker that owns
                                     the key (faust forwards the request, Authorization included);
                                     keys contain ':' — send it as is or URL-encoded (`wati%3A123`).
- `GET  /customers/?open=1&page=N&page_size=M`  customers of THIS worker's partitions (open=1: with
                                     an open, flushing or held batch); each worker lists its own.
- `POST /customers/{key}/pause/`     (and `/resume/`) produce a pause/resume ContextCommand keyed by the
                                     customer; the agent applies it in-stream, so it survives restarts
                                     and rebalances. Optional JSON body `{"actor": "name"}`. 202.
- `GET  /healthz`, `/readyz`, `/metrics`  unauthenticated (no customer data): liveness; readiness
                                     (assigned, recovered, agent alive — 503 JSON with the reason);
                                     Prometheus text.
"""

from __future__ import annotations

import hmac
import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from faust import web

from services.common import codec, logs, metrics
from services.common.keys import KeyError_, split_key
from services.common.records import ContextCommand, CustomerState
from services.common.timeparse import utcnow

if TYPE_CHECKING:
    from services.context.app import ContextApp, ContextRuntime

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500
MAX_BODY_BYTES = 4096
MAX_ACTOR_CHARS = 200


def jsonable(value: Any) -> Any:
    """Datetimes → ISO 8601 UTC (`...Z`), bytes → text, recursively."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def bearer_ok(header: str | None, token: str) -> bool:
    """True when the header is `Bearer <token>` (constant-time compare; an empty token never matches)."""
    if not token or not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))


def parse_paging(query: dict[str, str]) -> tuple[bool, int, int]:
    """(open only, page ≥ 1, page size 1..MAX_PAGE_SIZE); ValueError names the bad parameter."""
    open_only = query.get("open", "0").strip().lower() in ("1", "true", "yes")
    try:
        page = int(query.get("page", "1"))
        size = int(query.get("page_size", "50"))
    except ValueError:
        raise ValueError("page and page_size must be integers") from None
    if page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page must be >= 1 and page_size between 1 and {MAX_PAGE_SIZE}")
    return open_only, page, size


def customer_view(state: CustomerState, worker: str) -> dict[str, Any]:
    """A customer's state for operators, with a one-word status first."""
    if state.get("paused"):
        status = "paused"
    elif state.get("flushing_batch") is not None:
        status = "flushing"
    elif state.get("open_batch") is not None:
        status = "open"
    elif state.get("held_messages"):
        status = "held"
    else:
        status = "idle"
    return {
        "customer_key": state["customer_key"],
        "worker": worker,
        "status": status,
        "open_batch": jsonable(state.get("open_batch")),
        "flushing_batch": jsonable(state.get("flushing_batch")),
        "held_messages": jsonable(state.get("held_messages") or []),
        "state": jsonable(dict(state)),
    }


def parse_actor(body: bytes) -> str | None:
    """The optional `actor` of a pause/resume body; ValueError when the body is not acceptable."""
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        raise ValueError("body must be JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("body must be a JSON object")
    actor = doc.get("actor")
    if actor is None:
        return None
    if not isinstance(actor, str) or not actor.strip() or len(actor) > MAX_ACTOR_CHARS:
        raise ValueError(f"actor must be a non-empty string of at most {MAX_ACTOR_CHARS} characters")
    return actor.strip()


def register_views(app: ContextApp, runtime: ContextRuntime) -> None:
    """Adds the views to the app's faust web server."""
    token = runtime.settings.web_token
    customers = runtime.customers

    def denied(view: web.View, request: web.Request) -> web.Response | None:
        if bearer_ok(request.headers.get("Authorization"), token):
            return None
        return view.json({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})

    @app.page("/healthz")
    class Health(web.View):
        async def get(self, request: web.Request, **kwargs: Any) -> web.Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class Ready(web.View):
        async def get(self, request: web.Request, **kwargs: Any) -> web.Response:
            ready, details = runtime.readiness()
            return self.json({"ready": ready, **details}, status=200 if ready else 503)

    @app.page("/metrics")
    class Metrics(web.View):
        async def get(self, request: web.Request, **kwargs: Any) -> web.Response:
            return self.bytes(metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    @app.page("/customers/")
    class CustomerList(web.View):
        async def get(self, request: web.Request, **kwargs: Any) -> web.Response:
            refusal = denied(self, request)
            if refusal is not None:
                return refusal
            try:
                open_only, page, size = parse_paging(dict(request.query))
            except ValueError as exc:
                return self.json({"error": "bad_request", "detail": str(exc)}, status=400)
            start = (page - 1) * size
            if open_only:
                pending = runtime.index.pending()
                total = len(pending)
                items = [
                    {"customer_key": key, "open": e.open, "flushing": e.flushing, "held_messages": e.held,
                     "paused": e.paused, "batch_id": e.batch_id,
                     "due_at": jsonable(e.due_at), "last_activity_at": jsonable(e.last_activity_at)}
                    for key, e in pending[start:start + size]
                ]
            else:
                keys = sorted(runtime.index.entries)
                total = len(keys)
                items = [{"customer_key": key} for key in keys[start:start + size]]
            return self.json({
                "worker": runtime.worker_name(),
                "partitions": sorted(runtime.active_partitions()),
                "note": "each worker lists only the customers of its own partitions",
                "open_only": open_only, "page": page, "page_size": size, "total": total,
                "customers": items,
            })

    @app.page("/customers/{key}/")
    class CustomerDetail(web.View):
        async def get(self, request: web.Request, key: str, **kwargs: Any) -> web.Response:
            refusal = denied(self, request)
            if refusal is not None:
                return refusal
            return await self.routed(request)

        @app.table_route(table=customers, match_info="key")
        async def routed(self: web.View, request: web.Request, *args: Any, **kwargs: Any) -> web.Response:
            key = str(cast(Any, request).match_info["key"])
            stored = customers.get(key.encode("utf-8"))
            if stored is None:
                return self.json({"error": "not_found", "customer_key": key}, status=404)
            try:
                state = cast(CustomerState, codec.decode("CustomerState", stored))
            except codec.CodecError as exc:
                return self.json({"error": "undecodable_state", "detail": str(exc)}, status=500)
            return self.json(customer_view(state, runtime.worker_name()))

    def command_view(kind: str) -> type[web.View]:
        class CommandView(web.View):
            async def post(self, request: web.Request, key: str, **kwargs: Any) -> web.Response:
                refusal = denied(self, request)
                if refusal is not None:
                    return refusal
                try:
                    split_key(key)
                except KeyError_:
                    return self.json({"error": "bad_customer_key"}, status=400)
                if (cast(Any, request).content_length or 0) > MAX_BODY_BYTES:
                    return self.json({"error": "body_too_large"}, status=413)
                body = await cast(Any, request).read()  # aiohttp caps it at 1 MiB
                if len(body) > MAX_BODY_BYTES:  # a chunked body has no Content-Length to check first
                    return self.json({"error": "body_too_large"}, status=413)
                try:
                    actor = parse_actor(body)
                except ValueError as exc:
                    return self.json({"error": "bad_request", "detail": str(exc)}, status=400)
                command: ContextCommand = {
                    "kind": "pause" if kind == "pause" else "resume", "customer_key": key,
                    "batch_id": None, "issued_at": utcnow(), "history": [], "history_error": None,
                    "history_pages": 0, "actor": actor,
                }
                try:
                    await runtime.send_command(command)
                except Exception as exc:
                    logs.event(log, "command_send_failed", logging.WARNING, customer=key, kind=kind,
                               error=type(exc).__name__)
                    return self.json({"error": "unavailable"}, status=503, headers={"Retry-After": "5"})
                logs.event(log, "operator_command", customer=key, kind=kind, actor=actor)
                return self.json({"accepted": True, "command": kind, "customer_key": key}, status=202)

        CommandView.__name__ = f"Customer{kind.title()}"
        return CommandView

    app.page("/customers/{key}/pause/", name="customer-pause")(command_view("pause"))
    app.page("/customers/{key}/resume/", name="customer-resume")(command_view("resume"))
