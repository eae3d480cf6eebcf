"""The console's HTTP shell: aiohttp handlers over the store, the session checks, the producer.

Routes: `/healthz`, `/readyz`, `/metrics` (open, like every service's); `/login`, `/logout`; the
pages `/`, `/customers`, `/customers/{key}`, `/waiting`, `/dead-letters`, `/dead-letters/{id}`;
POSTs `/customers/{key}/pause|resume` and `/dead-letters/{id}/replay`. A page without a valid
session answers 401 with the login form; a POST without the session's CSRF token answers 403.
Log lines name operators, routes and masked keys only: never a phone number nor a message text.

Tenants (docs/tenants.md, "Per-tenant visibility"): the list pages take `?tenant=<id>`; an operator
limited to some tenants (`Console.scopes`) sees only theirs everywhere: another tenant's customer or
dead letter is "unknown" (404) on its page and on a replay, a pause/resume of another tenant's
customer key is refused (403), and choosing another tenant in the filter is refused (403).
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from services.common import codec, logs, metrics
from services.common.kafka import Topics, send_record
from services.common.keys import SLUG_PATTERN, KeyError_, split_key
from services.common.records import ContextCommand, DeadLetterReplay
from services.common.timeparse import utcnow

from . import pages, rows
from .auth import COOKIE, LoginThrottle, Session, Sessions, check_login
from .replay import NotReplayable, plan_replay, replay
from .rows import tenant_of
from .store import Store

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGE_SIZE = 50
TIMELINE_BATCHES = 30

Ready = Callable[[], tuple[bool, str]]
ReplaysReader = Callable[[], Awaitable[Mapping[str, DeadLetterReplay]]]
Clock = Callable[[], float]


@dataclass
class Console:
    """What the handlers need: the store, the sessions, the users, how to produce, the clock."""

    store: Store
    sessions: Sessions
    users: dict[str, str]
    topics: Topics
    producer: Any  # AIOKafkaProducer (or None before start)
    ready: Ready
    clock: Clock = time.time
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    scopes: dict[str, frozenset[str]] = field(default_factory=dict)  # operator -> its tenants (absent: all)
    tenant_ids: tuple[str, ...] = ()  # the configured tenants, offered by the tenant filter
    # reads the dead-letter-replays topic now (the one record of replays; the store may lag behind
    # it): asked before every replay. None: the store's copy only (tests of the pages, the bench)
    replays: ReplaysReader | None = None
    replaying: set[str] = field(default_factory=set)  # dead letters with a replay under way here

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def may_see(self, session: Session, tenant: str | None) -> bool:
        """Whether the operator may see (and act on) a row of this tenant (None: of no tenant)."""
        if session.user not in self.users:
            return False
        allowed = self.scopes.get(session.user)
        return allowed is None or (tenant is not None and tenant in allowed)


@dataclass(frozen=True)
class TenantView:
    """The tenant filter of a page: the one chosen ('' = all the operator may see), the set the
    store must limit its rows to (None: no limit), and the choices offered."""

    chosen: str
    limit: frozenset[str] | None
    choices: tuple[str, ...]


def tenant_view(request: web.Request, console: Console, session: Session) -> TenantView | web.Response:
    """The page's tenant filter from `?tenant=`, within what the operator may see (else 400/403)."""
    allowed = console.scopes.get(session.user)
    chosen = request.query.get("tenant", "").strip()
    if allowed is None:
        choices = tuple(sorted(set(console.tenant_ids) | set(console.store.tenants())))
    else:
        choices = tuple(sorted(allowed))
    viewer = _viewer(session)
    if chosen and not re.fullmatch(SLUG_PATTERN, chosen):
        return _html(pages.message_page("Bad tenant", "Not a tenant id.", viewer), 400)
    if chosen and not console.may_see(session, chosen):
        logs.event(log, "console_tenant_refused", logging.WARNING, operator=session.user, tenant=chosen)
        return _html(pages.message_page("Not your tenant", "This operator account may not see that "
                                        "tenant.", viewer), 403)
    return TenantView(chosen, frozenset({chosen}) if chosen else allowed, choices)


CONSOLE_KEY: web.AppKey[Console] = web.AppKey("console", Console)
Handler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def _html(text: str, status: int = 200) -> web.Response:
    response = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response


def _secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _viewer(session: Session, view: TenantView | None = None) -> pages.Viewer:
    if view is None:
        return pages.Viewer(session.user, session.csrf)
    return pages.Viewer(session.user, session.csrf, view.choices, view.chosen)


def _local_path(path: str | None) -> str:
    """Only same-site paths are followed after login or a form (no open redirect)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def page(name: str) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Wraps a handler: session required (401 + login form), timed into the page histogram."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            console = request.app[CONSOLE_KEY]
            session = console.sessions.check(request.cookies.get(COOKIE), console.clock())
            if session is not None and session.user not in console.users:
                session = None  # an account removed since: its cookie (and its tenant limit) is gone
            if session is None:
                if request.method != "GET":
                    return _html(pages.message_page("Not logged in", "Log in first.", None, "/login"), 401)
                return _html(pages.login_page(next_path=request.path_qs), 401)
            if request.method == "POST":
                form = await request.post()
                if not console.sessions.csrf_ok(session, str(form.get("csrf") or "")):
                    logs.event(log, "console_csrf_refused", logging.WARNING, operator=session.user,
                               route=name)
                    return _html(pages.message_page("Refused", "The form was stale or not from this site; "
                                                    "reload the page and try again.", _viewer(session)), 403)
            start = time.perf_counter()
            response = await handler(request, session)
            took = time.perf_counter() - start
            metrics.console_page_seconds.labels(name).observe(took)
            response.headers["Server-Timing"] = f"page;dur={took * 1000:.2f}"
            return response

        return run

    return wrap


# ---------------------------------------------------------------- login


async def login_form(request: web.Request) -> web.Response:
    return _html(pages.login_page(next_path=_local_path(request.query.get("next"))))


async def login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    form = await request.post()
    user, password = str(form.get("user") or "").strip(), str(form.get("password") or "")
    keys = (f"user:{user}",)  # not by address: behind a proxy every operator shares one
    now = console.clock()
    if console.throttle.blocked(keys, now):
        metrics.console_logins_total.labels("throttled").inc()
        logs.event(log, "console_login_throttled", logging.WARNING, known_user=user in console.users)
        return _html(pages.login_page("Too many failed logins: wait 15 minutes.",
                                      _local_path(str(form.get("next")))), 429)
    if not check_login(console.users, user, password):
        console.throttle.failed(keys, now)
        metrics.console_logins_total.labels("refused").inc()
        logs.event(log, "console_login_refused", logging.WARNING, known_user=user in console.users)
        refused = pages.login_page("Wrong operator name or password.", _local_path(str(form.get("next"))))
        return _html(refused, 401)
    console.throttle.succeeded(keys)
    metrics.console_logins_total.labels("ok").inc()
    logs.event(log, "console_login", operator=user)
    response = web.HTTPSeeOther(_local_path(str(form.get("next") or "/")))
    response.set_cookie(COOKIE, console.sessions.issue(user, console.clock()), httponly=True,
                        samesite="Strict", secure=_secure(request), path="/",
                        max_age=console.sessions.lifetime)
    return response


@page("logout")
async def logout(request: web.Request, session: Session) -> web.StreamResponse:
    logs.event(log, "console_logout", operator=session.user)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    return response


# ---------------------------------------------------------------- pages


@page("overview")
async def overview(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    view = tenant_view(request, console, session)
    if isinstance(view, web.Response):
        return view
    now = console.now_ms()
    store = console.store
    week_since = now - 7 * 24 * pages.HOUR_MS
    limit = view.limit
    return _html(pages.overview_page(
        _viewer(session, view), now, store.totals(now - 24 * pages.HOUR_MS, limit),
        store.totals(week_since, limit), store.hourly(week_since + pages.HOUR_MS, limit),
        store.waiting_now(limit), store.recent_actions(10, limit),
    ))


def _offset(request: web.Request) -> int:
    try:
        return max(0, int(request.query.get("offset", "0")))
    except ValueError:
        return 0


@page("customers")
async def customers(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    view = tenant_view(request, console, session)
    if isinstance(view, web.Response):
        return view
    query = request.query.get("q", "")[:100]
    filters = [f for f in request.query.getall("f", []) if f in pages.FILTERS]
    result = console.store.customers(query, filters, _offset(request), PAGE_SIZE, view.limit)
    return _html(pages.customers_page(_viewer(session, view), console.now_ms(), result, query, filters))


@page("timeline")
async def timeline(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    key = request.match_info["key"]
    # another tenant's customer is as unknown as one that never wrote (no existence oracle)
    customer = console.store.customer(key) if console.may_see(session, tenant_of(key)) else None
    if customer is None:
        return _html(pages.message_page("Unknown customer", "No customer with this key in the console's "
                                        "retention window.", _viewer(session), "/customers"), 404)
    try:
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        before = None
    rows = console.store.batches(key, before, TIMELINE_BATCHES + 1)
    shown = rows[:TIMELINE_BATCHES]
    # events after the newest batch not shown belong to the batches shown (or the open one)
    since = rows[TIMELINE_BATCHES]["decided_at"] + 1 if len(rows) > TIMELINE_BATCHES else 0
    older = f"{pages.customer_url(key)}?before={shown[-1]['decided_at']}" if since else None
    until = before if before is not None else 2**62
    store = console.store
    return _html(pages.timeline_page(
        _viewer(session), console.now_ms(), customer, list(reversed(shown)),
        store.events_between("inbound", key, since, until),
        store.events_between("agent_activity", key, since, until),
        store.events_between("actions", key, since, until), older,
    ))


@page("waiting")
async def waiting(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    view = tenant_view(request, console, session)
    if isinstance(view, web.Response):
        return view
    waiting_now = console.store.waiting(_offset(request), PAGE_SIZE, view.limit)
    return _html(pages.waiting_page(_viewer(session, view), console.now_ms(), waiting_now))


@page("dead_letters")
async def dead_letters(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    view = tenant_view(request, console, session)
    if isinstance(view, web.Response):
        return view
    letters = console.store.dead_letters(_offset(request), PAGE_SIZE, view.limit)
    return _html(pages.dead_letters_page(_viewer(session, view), letters))


def decoded_text(payload: bytes | None) -> str:
    """The dead letter's payload for a person: the decoded record as JSON, else its raw text."""
    if not payload:
        return "(no payload)"
    try:
        name, value = codec.decode_any(payload)
        return f"{name}\n" + json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable)
    except codec.CodecError as exc:
        raw = codecs.decode(bytes(payload[:4000]), "utf-8", "replace")
        return f"(not a decodable record: {exc})\n{raw}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _visible_letter(console: Console, session: Session, letter_id: str) -> dict[str, Any] | None:
    """The dead letter, or None when it is unknown or of a tenant the operator may not see."""
    letter = console.store.dead_letter(letter_id)
    return letter if letter is not None and console.may_see(session, letter.get("tenant")) else None


@page("dead_letter")
async def dead_letter(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    letter = _visible_letter(console, session, request.match_info["id"])
    if letter is None:
        return _html(pages.message_page("Unknown dead letter", "Not in the console's retention window.",
                                        _viewer(session), "/dead-letters"), 404)
    problem = None
    try:
        plan_replay(letter, console.topics.all())
    except NotReplayable as exc:
        problem = str(exc)
    decoded = decoded_text(letter.get("payload"))
    return _html(pages.dead_letter_page(_viewer(session), letter, decoded, problem))


# ---------------------------------------------------------------- actions (POST, CSRF checked by @page)


def _command(kind: str) -> Handler:
    async def post(request: web.Request, session: Session) -> web.StreamResponse:
        console = request.app[CONSOLE_KEY]
        key = request.match_info["key"]
        try:
            split_key(key)
        except KeyError_:
            return _html(pages.message_page("Bad customer key", "Not a customer key.", _viewer(session)), 400)
        if not console.may_see(session, tenant_of(key)):
            logs.event(log, "console_tenant_refused", logging.WARNING, operator=session.user, route=kind,
                       customer=key)
            return _html(pages.message_page("Not your tenant", "This operator account may not act on "
                                            "that tenant's customers.", _viewer(session)), 403)
        command: ContextCommand = {
            "kind": "pause" if kind == "pause" else "resume", "customer_key": key, "batch_id": None,
            "issued_at": utcnow(), "history": [], "history_error": None, "history_pages": 0,
            "actor": session.user,
        }
        try:
            await send_record(console.producer, console.topics.context_commands, key, "ContextCommand",
                              dict(command))
        except Exception as exc:
            logs.event(log, "console_command_failed", logging.WARNING, customer=key, kind=kind,
                       operator=session.user, error=type(exc).__name__)
            return _html(pages.message_page("Not sent", "The broker did not take the command; try again.",
                                            _viewer(session), pages.customer_url(key)), 503)
        with console.store.transaction():  # shown at once; the consumer finds the same command later
            console.store.apply_command({"customer_key": key, "kind": kind, "actor": session.user,
                                         "at": rows.ms(command["issued_at"])})
        metrics.console_actions_total.labels(kind).inc()
        logs.event(log, "operator_command", customer=key, kind=kind, operator=session.user)
        form = await request.post()
        return web.HTTPSeeOther(_local_path(str(form.get("back") or pages.customer_url(key))))

    return post


@page("replay")
async def replay_letter(request: web.Request, session: Session) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    letter_id = request.match_info["id"]
    letter = _visible_letter(console, session, letter_id)
    if letter is None:
        return _html(pages.message_page("Unknown dead letter", "Not in the console's retention window.",
                                        _viewer(session), "/dead-letters"), 404)
    back = f"/dead-letters/{quote(letter_id)}"
    try:
        plan = plan_replay(letter, console.topics.all())
    except NotReplayable as exc:
        return _html(pages.message_page("Not replayed", str(exc), _viewer(session), back), 409)
    form = await request.post()
    if form.get("confirm") != "yes":
        return _html(pages.dead_letter_page(_viewer(session), letter, decoded_text(letter.get("payload")),
                                            None, confirm=True), 400)
    if letter_id in console.replaying:  # a second click while the first replay is under way
        return _html(pages.message_page("Not replayed", "A replay of it is under way.", _viewer(session),
                                        back), 409)
    console.replaying.add(letter_id)
    try:
        if console.replays is not None:  # the topic, not only the store: a CLI replay not read yet
            try:
                recorded = (await console.replays()).get(letter_id)
            except Exception as exc:
                logs.event(log, "console_replay_check_failed", logging.WARNING, letter=letter_id,
                           operator=session.user, error=type(exc).__name__)
                return _html(pages.message_page(
                    "Not replayed", "The record of replays could not be read; try again.", _viewer(session),
                    back), 503)
            if recorded is not None:
                with console.store.transaction():
                    console.store.apply_replay(rows.replay_row(recorded))
                return _html(pages.message_page(
                    "Not replayed", f"already replayed by {recorded['replayed_by']}", _viewer(session),
                    back), 409)
        try:
            done = await replay(console.producer, console.topics, plan, session.user)
        except Exception as exc:
            logs.event(log, "console_replay_failed", logging.WARNING, letter=letter_id, operator=session.user,
                       error=type(exc).__name__)
            return _html(pages.message_page("Not replayed", "The broker did not take the record; try again.",
                                            _viewer(session), back), 503)
        with console.store.transaction():  # shown at once; the consumer reads the same record later
            console.store.apply_replay(rows.replay_row(done))
    finally:
        console.replaying.discard(letter_id)
    partition, offset = done["replayed_partition"], done["replayed_offset"]
    metrics.console_actions_total.labels("replay").inc()
    logs.event(log, "operator_replay", letter=letter_id, topic=plan.topic, partition=partition, offset=offset,
               operator=session.user, customer=letter.get("customer_key") or "-")
    return web.HTTPSeeOther(back)


# ---------------------------------------------------------------- ops


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, reason = request.app[CONSOLE_KEY].ready()
    return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)


async def metrics_view(_: web.Request) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = metrics.CONTENT_TYPE
    return response


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:; "
        "script-src 'none'; form-action 'self'; frame-ancestors 'none'")
    return response


def build_app(console: Console) -> web.Application:
    app = web.Application(middlewares=[security_headers], client_max_size=64 * 1024)
    app[CONSOLE_KEY] = console
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_view)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/", overview)
    r.add_get("/customers", customers)
    r.add_get("/customers/{key}", timeline)
    r.add_post("/customers/{key}/pause", page("pause")(_command("pause")))
    r.add_post("/customers/{key}/resume", page("resume")(_command("resume")))
    r.add_get("/waiting", waiting)
    r.add_get("/dead-letters", dead_letters)
    r.add_get("/dead-letters/{id}", dead_letter)
    r.add_post("/dead-letters/{id}/replay", replay_letter)
    r.add_static("/static/", STATIC, show_index=False)
    return app
