"""A stand-in provider, "echo", written by following docs/providers.md — for tests only, never shipped.

It is the guide's example made real: one module (this one) implementing `Provider`, its own
stand-in HTTP server (`EchoServer`: sends at `POST /messages`, media at `GET /media/<name>`, Bearer
token), registered by a test with `providers.register(EchoProvider(url, token))` and removed with
`providers.unregister("echo")`. The Avro `Channel` symbol `echo` is added by the test to a copy of
schemas/ (`with_echo_schemas`), as the guide says, then released with the project's tool.

Webhook body: `{"id": <message id>, "user": <user id>, "text": <text>, "name": <optional>}`.
Messages are limited to `ECHO_LIMIT` characters, so a reply of any length is split.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from services.common.checks import Check, failed, passed, unreachable
from services.common.config import Settings
from services.common.records import HistoryItem, InboundMessage
from services.devtools.schemas import release
from services.ingest.outcomes import CustomerMessage, Rejected
from services.providers.base import (
    AccountAccess,
    Client,
    DownloadUrl,
    MediaPolicy,
    Notice,
    Outcome,
    ProviderFailure,
    Purpose,
    SendFailed,
    SendPolicy,
    Sent,
)

NAME = "echo"
ECHO_LIMIT = 40
TOKEN = "echo-token-123"


# ------------------------------------------------------------------------------ the stand-in server


@dataclass
class EchoServer:
    """The echo platform's API: what was sent to whom, and media to serve."""

    token: str = TOKEN
    sent: list[tuple[str, str]] = field(default_factory=list)  # (user id, text)
    media: dict[str, bytes] = field(default_factory=dict)
    fail_next: list[int] = field(default_factory=list)  # HTTP statuses to answer the next sends with

    def texts_to(self, user: str) -> list[str]:
        return [text for to, text in self.sent if to == user]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/messages", self._send)
        app.router.add_get("/media/{name}", self._media)
        app.router.add_get("/me", self._me)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _send(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.fail_next:
            return web.json_response({"error": "failed"}, status=self.fail_next.pop(0))
        body = await request.json()
        text, to = body.get("text"), body.get("to")
        if not isinstance(text, str) or not text or len(text) > ECHO_LIMIT or not isinstance(to, str):
            return web.json_response({"error": "bad_message"}, status=400)
        self.sent.append((to, text))
        return web.json_response({"id": f"echo-{len(self.sent)}"})

    async def _me(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"id": "echo-account"})

    async def _media(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        data = self.media.get(request.match_info["name"])
        if data is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[EchoServer, str]]:
    """Runs an EchoServer on a free loopback port; yields it and its base URL."""
    server = EchoServer()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield server, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------ the provider module


class EchoClient:
    """The echo API's client (what `open_client` returns; the services close it)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                      timeout=5.0)

    async def aclose(self) -> None:
        await self.http.aclose()


class EchoProvider:
    name: str = NAME
    channels: tuple[str, ...] = (NAME,)
    has_history: bool = False
    client_type: type = EchoClient
    audience: str = "echo users"
    title: str = "echo"
    # no settings of its own (its URL and token are given to the constructor): CHANNELS does not
    # name it and it is enabled by its registration; `watistream check` reaches it all the same
    required_settings: tuple[str, ...] = ()
    token_setting: str = ""
    checked_for: tuple[Purpose, ...] = ("send", "media")
    # the tenants file lists no echo accounts (the guide's step 1 says how a provider opts in)
    tenant_accounts: bool = False
    shared_api_url: bool = True

    def __init__(self, base_url: str, token: str = TOKEN) -> None:
        self.base_url = base_url
        self.token = token

    def parse_webhook(self, payload: object, received_at: datetime) -> Outcome:
        if not isinstance(payload, dict):
            return Rejected("not_an_object", "the body must be a JSON object")
        event_id, user, text = payload.get("id"), payload.get("user"), payload.get("text")
        if not isinstance(user, str) or not user.strip():
            return Rejected("missing_user", "`user` must be a non-empty string")
        if not isinstance(event_id, str) or not event_id.strip():
            return Rejected("missing_id", "`id` must be a non-empty string")
        if not isinstance(text, str) or not text.strip():
            return Rejected("missing_text", "`text` must be a non-empty string")
        name = payload.get("name")
        record: InboundMessage = {
            "event_id": event_id, "customer_key": f"{NAME}:{user}", "channel": NAME,  # type: ignore[typeddict-item]
            "provider_id": user, "message_type": "text", "text": text, "caption": None, "media_ref": None,
            "media_mime": None, "sender_name": name if isinstance(name, str) else None,
            "provider_message_ids": [event_id], "provider_time": received_at, "received_at": received_at,
        }
        return CustomerMessage(record)

    def message_limit(self, channel: str) -> int:
        return ECHO_LIMIT

    def configured(self, settings: Settings) -> bool:
        return True

    def unconfigured_warning(self) -> str:
        return "echo is not configured"

    def config_hint(self) -> str:
        return "the echo stand-in's URL"

    def settings_account(self, settings: Settings) -> tuple[str, str] | None:
        return None

    def default_api_url(self, settings: Settings) -> str | None:
        return self.base_url

    async def check(self, settings: Settings, http: httpx.AsyncClient,
                    account: AccountAccess | None = None, where: str = "") -> Check:
        """`GET /me`: authenticated, changes nothing."""
        try:
            response = await http.get(f"{self.base_url}/me",
                                      headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError as exc:
            return unreachable(NAME, "the echo URL", self.base_url, exc)
        if response.status_code == 200:
            return passed(NAME, f"echo token accepted for {response.json()['id']}")
        return failed(NAME, f"echo refused the token (HTTP {response.status_code})", "give the echo token")

    def open_client(self, settings: Settings, purpose: Purpose,
                    account: AccountAccess | None = None) -> Client | None:
        if purpose not in ("send", "media"):
            return None
        return EchoClient(self.base_url, self.token) if account is None else EchoClient(
            account.api_url, account.token)

    async def send(self, client: Client | None, channel: str, provider_id: str, parts: list[str],
                   batch_id: str, *, resume: bool, policy: SendPolicy) -> Sent:
        if not isinstance(client, EchoClient):
            raise SendFailed("channel_not_configured", [], [])
        sent = Sent([])
        for part in parts:
            attempt = 0
            while True:
                attempt += 1
                response = await client.http.post("/messages", json={"to": provider_id, "text": part})
                if response.status_code == 200:
                    sent.parts.append(part)
                    sent.ids.append(str(response.json()["id"]))
                    break
                retryable = response.status_code == 429 or response.status_code >= 500
                if not retryable or attempt >= policy.attempts:
                    raise SendFailed(f"http_{response.status_code}", sent.parts, sent.ids)
                await policy.sleep(policy.delay(attempt, None))
        return sent

    async def fetch_history(self, client: Client | None, provider_id: str, *,
                            stop_before: datetime | None, max_pages: int,
                            notice: Notice | None) -> tuple[list[HistoryItem], int]:
        raise ProviderFailure("no_history", "echo has no history")

    async def fetch_media(self, client: Client | None, channel: str, media_ref: str, *,
                          policy: MediaPolicy, download_url: DownloadUrl) -> bytes:
        if not isinstance(client, EchoClient):
            raise ProviderFailure("not_configured", "echo is not configured")
        response = await client.http.get(f"/media/{media_ref}")
        if response.status_code != 200:
            status = response.status_code
            raise ProviderFailure(f"http_{status}", f"echo media answered {status}")
        if len(response.content) > policy.max_bytes:
            raise ProviderFailure("too_large", f"more than {policy.max_bytes} bytes")
        return response.content


# ------------------------------------------------------------------------------ the schema symbol


def with_echo_schemas(source: Path, target: Path) -> list[str]:
    """Copies schemas/ to `target`, adds the `echo` Channel symbol and releases it (the guide's
    step 3, on a copy); returns the snapshots the release wrote."""
    shutil.copytree(source, target)
    channel_file = target / "watistream.Channel.avsc"
    schema: dict[str, Any] = json.loads(channel_file.read_text(encoding="utf-8"))
    schema["symbols"].append(NAME)
    channel_file.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    return release(target)
