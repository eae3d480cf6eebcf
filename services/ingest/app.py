"""The webhook HTTP service: a thin aiohttp shell around the pure normalisers.

Per webhook, checks run in this order and stop at the first failure, each answered with JSON
`{"error": <code>, "reason": <text>}` and counted in `watistream_webhook_rejects_total{reason=code}`:
401 secret (header or `?token=`), 404 `channel_disabled` for a channel not enabled (CHANNELS, or
its API token unset while another channel's is set), 413 body over `MAX_BODY_BYTES` (Content-Length,
else counted while reading), 415 content type not `application/json`, 400 not UTF-8 JSON / not an
object / rejected by the normaliser. Then the record is produced keyed by customer and the answer
is 200 only after the broker's ack, or 503 + Retry-After once `PRODUCE_TIMEOUT_SECONDS` pass.
Bad input never gets a 500.

Tenants (docs/tenants.md): `/webhooks/{tenant}/wati` and `/webhooks/{tenant}/manychat` (the tenant's
only or `default` account; `/webhooks/{tenant}/{provider}/{account}` names one) check the tenant's
own secret and key the record on the tenant's account (`keys.in_account`); an unknown tenant or
account is a 404 before the secret is looked at. The old routes are the `default` tenant's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from services import providers
from services.common import metrics
from services.common.codec import CodecError
from services.common.config import ConfigError, Settings, channel_names
from services.common.kafka import Topics, dead_letter
from services.common.keys import DEFAULT_ACCOUNT, DEFAULT_TENANT, KeyError_, in_account
from services.common.logs import event, register_secret
from services.common.tenants import (
    Tenants,
    load_tenants,
    require_served_channels,
    serves_tenant_accounts,
    settings_environ,
)
from services.common.timeparse import utcnow

from .auth import check_token, presented_token
from .outcomes import BusinessSend, CustomerMessage, Ignored, Rejected
from .producer import BrokerUnavailable, ProducerSupervisor

log = logging.getLogger(__name__)

#: `/webhooks/<provider name>`, one route per registered provider (services.providers)
WEBHOOK_ROUTE = "/webhooks/{provider}"
# the built-in providers' routes, named for callers that address them directly
WATI_ROUTE = "/webhooks/wati"
MANYCHAT_ROUTE = "/webhooks/manychat"
TENANT_ROUTE = "/webhooks/{tenant}/{provider}"
TENANT_ACCOUNT_ROUTE = "/webhooks/{tenant}/{provider}/{account}"
# A client that sends its body slower than this is cut off (408), so it cannot hold a handler.
BODY_READ_TIMEOUT_SECONDS = 10.0

Outcome = CustomerMessage | BusinessSend | Ignored | Rejected
Normaliser = Callable[[object, datetime], Outcome]

#: provider name → its webhook parser, from the registry (`make_app` adds providers registered
#: later); tests replace an entry to simulate a broken parser
NORMALISERS: dict[str, Normaliser] = {p.name: p.parse_webhook for p in providers.providers()}


def webhook_route(provider_name: str) -> str:
    """The webhook path of a provider: `/webhooks/wati`, `/webhooks/manychat`, ..."""
    return WEBHOOK_ROUTE.format(provider=provider_name)


# the hot path's label children, kept (`metrics.Children`)
http_requests = metrics.Children(metrics.http_requests_total)
webhook_rejects = metrics.Children(metrics.webhook_rejects_total)
webhook_events = metrics.Children(metrics.webhook_events_total)

SUPERVISOR_KEY = web.AppKey("supervisor", ProducerSupervisor)


@dataclass(frozen=True)
class Scope:
    """Whose webhook this is: the tenant, its account on the provider, and the secret to present."""

    tenant: str
    account: str
    secret: str


@dataclass
class Ingest:
    """The handlers' shared state: settings, topics, producer, clock (injectable for tests);
    `tenants` and their resolved webhook secrets (`secrets`, by tenant id)."""

    settings: Settings
    topics: Topics
    supervisor: ProducerSupervisor
    clock: Callable[[], datetime] = utcnow
    tenants: Tenants | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)
    #: the channels served (`served_channels`: with a tenants file, those the tenants list); None =
    #: the settings' (CHANNELS, or each channel whose token is set)
    served: tuple[str, ...] | None = None

    def scope(self, tenant_id: str, provider: str, account_id: str | None) -> Scope | str:
        """The route's scope, or why there is none (unknown tenant, or no such account)."""
        tenant = self.tenants.get(tenant_id) if self.tenants is not None else None
        if tenant is None or tenant_id not in self.secrets:
            return f"no tenant {tenant_id!r}"
        account = tenant.account(provider, account_id)
        if account is None:
            which = f"account {account_id!r}" if account_id is not None else "single or 'default' account"
            return f"tenant {tenant_id!r} has no {provider} {which}"
        return Scope(tenant.id, account.id, self.secrets[tenant.id])

    async def tenant_webhook(self, request: web.Request) -> web.Response:
        """`/webhooks/{tenant}/{provider}[/{account}]`: a tenant's webhook (docs/tenants.md)."""
        info = request.match_info
        provider = info["provider"]
        fields: dict[str, Any] = {"provider": provider, "tenant": info["tenant"]}
        if provider not in NORMALISERS:
            return _reject(404, "unknown_provider", f"no provider {provider!r}", fields)
        scope = self.scope(info["tenant"], provider, info.get("account"))
        if isinstance(scope, str):
            return _reject(404, "unknown_tenant", scope, fields)
        return await self._webhook(request, provider, scope)

    # --- webhooks ---

    def webhook_handler(self, provider: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of one provider's route (its name is fixed: nothing is read from the path)."""
        async def handle(request: web.Request) -> web.Response:
            return await self._webhook(request, provider)
        return handle

    def _default_scope(self) -> Scope:
        """The old routes: the `default` tenant's default account (make_app adds them only then)."""
        return Scope(DEFAULT_TENANT, DEFAULT_ACCOUNT, self.secrets.get(DEFAULT_TENANT, ""))

    async def _webhook(self, request: web.Request, provider: str, scope: Scope | None = None) -> web.Response:
        """One webhook of `scope` (None: the old routes, the `default` tenant's default account)."""
        scope = scope or self._default_scope()
        started = asyncio.get_running_loop().time()
        fields: dict[str, Any] = {"provider": provider}
        if scope.tenant != DEFAULT_TENANT or scope.account != DEFAULT_ACCOUNT:
            fields.update(tenant=scope.tenant, account=scope.account)
        response = await self._handle(request, provider, fields, scope)
        fields["status"] = response.status
        fields["ms"] = round((asyncio.get_running_loop().time() - started) * 1000, 1)
        level = logging.WARNING if response.status >= 500 else logging.INFO
        event(log, "webhook", level, **fields)
        return response

    async def _handle(
        self, request: web.Request, provider: str, fields: dict[str, Any], scope: Scope
    ) -> web.Response:
        problem = check_token(
            presented_token(request.headers.get("Authorization"), request.query), scope.secret
        )
        if problem is not None:
            return _reject(401, "unauthorized", problem, fields, {"WWW-Authenticate": "Bearer"})
        enabled = self.served if self.served is not None else self.settings.enabled_channels
        # none enabled: an ingest without provider credentials; CHANNELS names the providers with
        # settings of their own, one without any (docs/providers.md) is enabled by its registration
        if enabled and provider in channel_names() and provider not in enabled:
            reason = f"the {provider} channel is not enabled here (CHANNELS={','.join(enabled)})"
            return _reject(404, "channel_disabled", reason, fields)
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _reject(413, "payload_too_large",
                           f"the body is {request.content_length} bytes; the limit is {limit}", fields)
        if request.content.is_eof():
            # the parser already has the whole body (the usual small webhook): reading cannot wait,
            # so the timer (~5 µs to arm and cancel under load) is skipped
            body = await read_bounded(request, limit)
        else:
            try:
                async with asyncio.timeout(BODY_READ_TIMEOUT_SECONDS):
                    body = await read_bounded(request, limit)
            except TimeoutError:
                return _reject(408, "request_timeout", "the body did not arrive in time", fields)
        if body is None:
            return _reject(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes", fields)
        if request.content_type != "application/json":
            return _reject(415, "unsupported_media_type",
                           f"Content-Type must be application/json, got '{request.content_type}'", fields)
        payload, parse_problem = parse_json(body)
        if parse_problem is not None:
            return _reject(400, "bad_json", parse_problem, fields)
        received_at = self.clock()
        try:
            outcome = NORMALISERS[provider](payload, received_at)
        except Exception as exc:  # a bug in a normaliser must not become a 500 or lose the payload
            return await self._unprocessable(provider, body, exc, fields)
        if isinstance(outcome, Rejected):
            return _reject(400, outcome.code, outcome.reason, fields)
        if isinstance(outcome, Ignored):
            fields.update(outcome="ignored", reason=outcome.reason)
            webhook_events(provider, "ignored", metrics.tenant_label(scope.tenant)).inc()
            return web.json_response({"status": "ignored", "reason": outcome.reason})
        try:
            key = in_account(outcome.record["customer_key"], scope.tenant, scope.account)
        except KeyError_ as exc:
            return await self._unprocessable(provider, body, exc, fields)
        outcome.record["customer_key"] = key
        return await self._produce(provider, outcome, body, fields)

    async def _produce(
        self, provider: str, outcome: CustomerMessage | BusinessSend, body: bytes, fields: dict[str, Any]
    ) -> web.Response:
        if isinstance(outcome, CustomerMessage):
            kind, topic, schema = "message", self.topics.inbound, "InboundMessage"
        else:
            kind, topic, schema = "agent_activity", self.topics.agent_activity, "AgentActivity"
        record = outcome.record
        event_id = record["event_id"]
        fields.update(kind=kind, customer=record["customer_key"], message_type=record["message_type"],
                      event_ref=event_ref(event_id))
        if isinstance(outcome, BusinessSend):
            fields["sender_kind"] = outcome.record["sender_kind"]
        try:
            await self.supervisor.send(topic, record["customer_key"], schema, dict(record))
        except BrokerUnavailable as exc:
            retry_after = str(max(1, math.ceil(self.settings.produce_timeout_seconds)))
            return _reject(503, "broker_unavailable", f"message not stored, retry later: {exc}", fields,
                           {"Retry-After": retry_after})
        except CodecError as exc:
            return await self._unprocessable(provider, body, exc, fields)
        fields["outcome"] = "accepted"
        webhook_events(provider, kind, metrics.key_tenant(record["customer_key"])).inc()
        return web.json_response({"status": "accepted", "event_id": event_id, "kind": kind})

    async def _unprocessable(
        self, provider: str, body: bytes, exc: Exception, fields: dict[str, Any]
    ) -> web.Response:
        """Our bug, not the sender's: keep the raw body on the dead-letter topic (best effort), 400."""
        log.error("normaliser failed on a %s webhook", provider, exc_info=exc)
        recorded = False
        producer = self.supervisor.producer
        if producer is not None:
            try:
                await asyncio.wait_for(
                    dead_letter(producer, self.topics, service="ingest", reason="normaliser_error",
                                error=f"{type(exc).__name__}: {exc}", source_topic=None,
                                payload=body, key=provider.encode(),
                                tenant=fields.get("tenant", DEFAULT_TENANT)),
                    self.settings.produce_timeout_seconds)
                recorded = True
            except Exception as dl_exc:  # the 400 stands whatever happens to the record
                event(log, "dead_letter_failed", logging.ERROR, error=type(dl_exc).__name__)
        fields["dead_lettered"] = recorded
        note = "it was recorded for inspection" if recorded else "it could not be recorded"
        return _reject(400, "unprocessable", f"the payload could not be normalised; {note}", fields)

    # --- probes ---

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problem = self.supervisor.readiness()
        if problem is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not_ready", "reason": problem}, status=503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


def _reject(
    status: int, code: str, reason: str, fields: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    # the route's tenant (`default` on the old routes), bounded: an unknown tenant's 404 is `other`
    webhook_rejects(code, metrics.tenant_label(fields.get("tenant", DEFAULT_TENANT))).inc()
    # reasons name fields and kinds, never message content: safe to log
    fields.update(outcome="rejected", error=code, reason=reason)
    return web.json_response({"error": code, "reason": reason}, status=status, headers=headers)


def event_ref(event_id: str) -> str:
    """The tail of an event id, for logs: a wamid's head encodes the customer's phone number."""
    return event_id[-16:]


async def read_bounded(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds `limit` bytes (chunked bodies included)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# orjson nests up to 1024 levels, the stdlib until the recursion limit (~1000 minus the stack in
# use): bodies that could come near either (one '[' or '{' per level) take the stdlib, whose answer
# is the contract.
_MAX_FAST_OPENERS = 200
# orjson turns an integer literal outside [-2**63, 2**64) into a float, the stdlib keeps the int;
# such a literal has 19+ digits. Digits -> '0', anything else -> ' '.
_DIGIT_SHAPE = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19


def _has_float(value: object) -> bool:
    """Whether a parsed JSON value holds a float anywhere (webhooks rarely do). Depth is bounded by
    `_MAX_FAST_OPENERS`; the types of a container's items are collected at C speed."""
    items: Collection[object]
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return type(value) is float
    types = set(map(type, items))
    if float in types:
        return True
    if dict in types or list in types:
        return any(_has_float(item) for item in items)
    return False


def parse_json(body: bytes) -> tuple[object, str | None]:
    """(value, None) or (None, why the body is not JSON). NaN/Infinity are refused: not JSON.

    So are unpaired UTF-16 surrogate escapes (`"\\ud800"`): valid JSON syntax, but not Unicode text,
    so no record could hold them (found by the webhook fuzzing drill, issue 7).

    orjson parses a typical webhook ~6x faster than the stdlib. Whatever it accepts (nesting and
    integer size checked) the stdlib accepts with an equal value; whatever it refuses (NaN, `1e400`, a BOM,
    lone surrogates, any syntax error) goes to the stdlib path, which gives the answer and names the
    problem. tests/unit/test_ingest_helpers.py holds the two paths equal over random bodies."""
    if not body.strip():
        return None, "the body is empty"
    if body.count(b"[") + body.count(b"{") <= _MAX_FAST_OPENERS:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if not _has_float(value) or _LONG_DIGITS not in body.translate(_DIGIT_SHAPE):
                return value, None
    return parse_json_stdlib(body)


def parse_json_stdlib(body: bytes) -> tuple[object, str | None]:
    """`parse_json` with the stdlib only: the reference, and the path that words every refusal."""
    if not body.strip():
        return None, "the body is empty"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "the body is not UTF-8"
    try:
        value = json.loads(text, parse_constant=_no_constants)
        if _SURROGATE_ESCAPE.search(text):  # rare: pay for the full check only then
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value, None
    except json.JSONDecodeError as exc:
        return None, f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except UnicodeEncodeError:
        return None, "the body is not valid JSON text: it has an unpaired surrogate escape (\\ud800-\\udfff)"
    except (ValueError, RecursionError) as exc:
        return None, f"the body is not valid JSON: {str(exc) or type(exc).__name__}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every answer by route and status; unknown routes and errors answer JSON, not HTML."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason.lower().replace(" ", "_"), "reason": exc.reason},
                                 status=exc.status, headers={k: v for k, v in exc.headers.items()
                                                             if k.lower() == "allow"})
    except Exception:
        log.exception("unhandled error on %s", route)
        return web.json_response({"error": "internal_error", "reason": "internal error"}, status=500)
    finally:
        http_requests(route, str(status)).inc()


def make_app(settings: Settings, supervisor: ProducerSupervisor, clock: Callable[[], datetime] = utcnow,
             *, tenants: Tenants | None = None, environ: Mapping[str, str] | None = None
             ) -> web.Application:
    """The aiohttp application. Refuses to start unless every tenant's webhook secret resolves (and
    no two tenants share one): webhooks always need a secret, each tenant its own.

    `tenants` default: `load_tenants(settings)` (TENANTS_FILE, else the `default` tenant, whose
    secret is WEBHOOK_TOKEN); `environ` default: the process's environment with the settings' values.
    """
    if not settings.webhook_token and not settings.tenants_file:
        raise ConfigError("WEBHOOK_TOKEN is empty: the webhook endpoints refuse to run without a secret")
    tenants = load_tenants(settings) if tenants is None else tenants
    env = settings_environ(settings, environ)
    problems = tenants.secret_problems(env, only=("webhook_secret",))
    if problems:
        raise ConfigError("webhook secrets: " + "; ".join(problems))
    secrets = {t.id: t.webhook_secret.resolve(env) for t in tenants.by_id.values()}
    register_secret(*secrets.values())  # no tenant's secret ever reaches a log line
    metrics.bound_tenants(tenants.by_id)  # the only tenant label values; any other route is `other`
    ingest = Ingest(settings, Topics.from_settings(settings), supervisor, clock, tenants, secrets,
                    served=(require_served_channels(settings, tenants) if serves_tenant_accounts(settings)
                            else None))
    app = web.Application(middlewares=[observe])
    app[SUPERVISOR_KEY] = supervisor
    for provider in providers.providers():
        NORMALISERS.setdefault(provider.name, provider.parse_webhook)
        if tenants.default is not None:  # the old routes are the default tenant's
            app.router.add_post(webhook_route(provider.name), ingest.webhook_handler(provider.name))
    app.router.add_post(TENANT_ROUTE, ingest.tenant_webhook)
    app.router.add_post(TENANT_ACCOUNT_ROUTE, ingest.tenant_webhook)
    app.router.add_get("/healthz", ingest.healthz)
    app.router.add_get("/readyz", ingest.readyz)
    app.router.add_get("/metrics", ingest.metrics_text)
    return app


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, *, host: str | None = None, port: int | None = None,
    clock: Callable[[], datetime] = utcnow,
    tenants: Tenants | None = None, environ: Mapping[str, str] | None = None,
) -> AsyncIterator[str]:
    """Runs the service in this event loop; yields its base URL (`port=0`: a free port).

    Returns before Kafka is connected: the service answers 503 and `/readyz` says why until it is.
    On exit it stops accepting, lets running requests finish, then flushes the producer.
    """
    supervisor = ProducerSupervisor(settings)
    app = make_app(settings, supervisor, clock, tenants=tenants, environ=environ)  # validates first
    await supervisor.start()
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=settings.produce_timeout_seconds + 1)
    try:
        await runner.setup()
        bind_port = settings.ingest_port if port is None else port
        site = web.TCPSite(runner, host or settings.ingest_host, bind_port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        display_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        yield f"http://{display_host}:{bound_port}"
    finally:
        await runner.cleanup()
        await supervisor.close()
