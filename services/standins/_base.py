"""What the three stand-ins share: an aiohttp app on a loopback port, request records, faults.

The stand-ins replace WATI, ManyChat and OpenAI in tests and in `watistream demo`, reached by the
production clients through a different base URL. Tests steer them through Python (state, faults,
latency), never through HTTP, so nothing here is an API a customer could reach.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from aiohttp import web
from multidict import CIMultiDict

# The stand-ins' own test credentials (not secrets: they only open the local fakes).
DEFAULT_WATI_TOKEN = "wati-test-token"  # noqa: S105
DEFAULT_MANYCHAT_TOKEN = "manychat-test-token"  # noqa: S105
DEFAULT_OPENAI_KEY = "sk-test-key-000000"


@dataclass
class RecordedRequest:
    """One request as the stand-in saw it, for assertions (`body` is parsed JSON or form fields)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    at: datetime
    monotonic: float
    #: the request's headers, case-insensitive (tests check who called: `Authorization`, `OpenAI-Project`)
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)


@dataclass
class Fault:
    """An injected answer that replaces the next `times` real ones of a kind of request."""

    status: int
    body: str
    headers: dict[str, str]
    times: int
    content_type: str = "application/json"
    #: requests of that kind that still get their real answer before this fault starts.
    after: int = 0


@dataclass
class FaultQueue:
    """Faults per request kind; the oldest matching fault is served first."""

    faults: dict[str, list[Fault]] = field(default_factory=dict)

    def add(self, kind: str, fault: Fault) -> None:
        if fault.times < 1 or fault.after < 0:
            raise ValueError("times must be >= 1 and after >= 0")
        self.faults.setdefault(kind, []).append(fault)

    def take(self, kind: str) -> Fault | None:
        """Consumes one use of the oldest fault for `kind`, if any."""
        queue = self.faults.get(kind)
        if not queue:
            return None
        fault = queue[0]
        if fault.after > 0:
            fault.after -= 1
            return None
        fault.times -= 1
        if fault.times <= 0:
            queue.pop(0)
        return fault

    def pending(self, kind: str) -> int:
        return sum(f.times for f in self.faults.get(kind, []))

    def clear(self) -> None:
        self.faults.clear()


def fault_response(fault: Fault) -> web.Response:
    headers = dict(fault.headers)
    headers.setdefault("Content-Type", fault.content_type)
    return web.Response(status=fault.status, body=fault.body.encode("utf-8"), headers=headers)


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound listening socket (port 0 = a free one), so the port is known before serving."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class StandInServer:
    """An aiohttp application on 127.0.0.1 with start/stop; subclasses add routes and state."""

    #: client_max_size of the app: big enough for images sent as data URLs / uploads.
    max_body_bytes = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.latency: float = 0.0
        #: requests waiting in `hold_requests` (recorded, not answered yet)
        self.held = 0
        self._gate: asyncio.Event | None = None
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        raise NotImplementedError

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serves on host:port (0 = a free port); returns the base URL (`url`)."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        sock = free_socket(host, port)
        runner = web.AppRunner(
            self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        self.host = host
        self.port = int(sock.getsockname()[1])
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        """`async with WatiStandIn() as wati:` — started on a free port, stopped on exit."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def origin(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL a production client is configured with."""
        return self.origin

    # -- helpers for handlers --------------------------------------------------------------
    async def record(self, request: web.Request, body: Any) -> RecordedRequest:
        entry = RecordedRequest(
            method=request.method,
            path=request.path,
            query={k: v for k, v in request.query.items()},
            body=body,
            at=datetime.now(UTC),
            monotonic=time.monotonic(),
            headers=CIMultiDict(request.headers),
        )
        self.requests.append(entry)
        return entry

    async def delay(self, seconds: float | None = None) -> None:
        gate = self._gate
        if gate is not None:
            self.held += 1
            try:
                await gate.wait()
            finally:
                self.held -= 1
        wait = self.latency if seconds is None else seconds
        if wait > 0:
            await asyncio.sleep(wait)

    # -- a hung server ---------------------------------------------------------------------
    def hold_requests(self) -> None:
        """From now on every request is recorded, then waits unanswered until `release_requests()`
        (a server that hangs: tests await what others do meanwhile instead of sleeping)."""
        if self._gate is None:
            self._gate = asyncio.Event()

    def release_requests(self) -> None:
        """Answers every held request (and stops holding new ones)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()


async def read_form_or_json(request: web.Request) -> dict[str, Any]:
    """Form fields (urlencoded or multipart; file parts as their FileField) or a JSON object body."""
    if request.content_type == "application/json":
        try:
            doc = await request.json()
        except ValueError:
            return {}
        return dict(doc) if isinstance(doc, dict) else {}
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        return {k: v for k, v in form.items()}
    return {}


def merged_headers(defaults: Mapping[str, str], given: Mapping[str, str] | None) -> dict[str, str]:
    """`given` replaces the defaults entirely (so a test can send no Retry-After at all)."""
    return dict(defaults if given is None else given)
