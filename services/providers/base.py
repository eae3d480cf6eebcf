"""What every provider (a messaging platform: WATI, ManyChat, ...) offers the services.

A provider is one module implementing `Provider` and registered in `services.providers` (the one
registry). The services never switch on a channel's name: ingest parses webhooks with
`parse_webhook`, the responder sends with `send` (split to `message_limit`), vision downloads media
with `fetch_media`, the context service reads history with `fetch_history` when `has_history`.
The configuration asks it too: CHANNELS and its required settings (`required_settings`,
`token_setting`), `watistream check`'s reach of its API (`check`), and the tenants file's section of
its accounts (`tenant_accounts`, `settings_account`, `default_api_url`).
Adding a provider is described in docs/providers.md.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

import httpx

from services.common.checks import Check
from services.common.config import Settings
from services.common.records import HistoryItem
from services.ingest.outcomes import BusinessSend, CustomerMessage, Ignored, Rejected

#: what a webhook body becomes: a customer message, a business-side send, nothing, or a refusal
Outcome = CustomerMessage | BusinessSend | Ignored | Rejected
#: downloads an attachment URL with the vision service's safety checks (private hosts, size, retries)
DownloadUrl = Callable[[str], Awaitable[bytes]]
#: what a client tells its caller it absorbed (a retried 429, a truncated history), for metrics
Notice = Callable[[str], None]

#: why a client is opened: each service opens only what it uses, with its own timeouts
Purpose = str  # "send" (responder) | "media" (vision) | "history" (context)


@dataclass(frozen=True)
class AccountAccess:
    """One tenant's account on a provider, resolved: its API base URL and its token (the secret,
    read from the tenant's `env:`/`file:` reference; never shown by `repr`)."""

    api_url: str
    token: str = field(repr=False)


class Client(Protocol):
    """A provider's API client, as the services hold it: opened by the provider, closed by them."""

    async def aclose(self) -> None: ...


class SendFailed(Exception):
    """The answer (or part of it) could not be sent; `reason` is a short code safe to log."""

    def __init__(self, reason: str, sent_parts: list[str], ids: list[str]) -> None:
        super().__init__(f"send failed: {reason} after {len(sent_parts)} part(s)")
        self.reason = reason
        self.sent_parts = sent_parts
        self.ids = ids


@dataclass
class Sent:
    """The parts delivered, and the provider's ids for them (when it gives any)."""

    parts: list[str]
    ids: list[str] = field(default_factory=list)


class ProviderFailure(Exception):
    """A history or media call failed; `reason` is a short code safe to log (`too_large`, ...)."""

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None,
                 retry_after: float | None = None, retryable: bool = False) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.retryable = retryable


def local_message_id(batch_id: str, index: int) -> str:
    """Deterministic per (batch, part): a resend of the same part carries the same id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"watistream:{batch_id}:{index}"))


@dataclass(frozen=True)
class SendPolicy:
    """How a send retries retryable failures (429, 5xx, timeouts): attempts and backoff."""

    attempts: int = 3
    base_delay: float = 0.5
    max_retry_after: float = 10.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """The provider's Retry-After (capped), else exponential backoff."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return float(self.base_delay * 2 ** (attempt - 1))


@dataclass(frozen=True)
class MediaPolicy:
    """How a media download retries: attempts, the longest pause, the size limit."""

    max_bytes: int
    attempts: int = 3
    retry_cap_seconds: float = 2.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


@runtime_checkable
class Provider(Protocol):
    """One messaging platform. Pure parts (parsing, limits) and thin async parts (clients)."""

    #: key prefix (`<name>:<id>` customer keys) and webhook route segment (`/webhooks/<name>`)
    name: str
    #: the Avro `Channel` symbols this provider answers on (WATI: wati; ManyChat: facebook, instagram)
    channels: tuple[str, ...]
    #: whether `fetch_history` works (the context service reads history only where it does)
    has_history: bool
    #: the type of the client `open_client` returns (a sender given clients finds their provider)
    client_type: type
    #: who writes on it, for messages ("WhatsApp"); `title` names the platform ("WATI")
    audience: str
    title: str
    #: the env names of the settings it needs once enabled (CHANNELS names it, or its token is set)
    required_settings: tuple[str, ...]
    #: the setting whose value enables it when CHANNELS is empty ("": only CHANNELS enables it)
    token_setting: str
    #: the purposes a service uses its API for: a service checks it at start when it has one of them
    checked_for: tuple[Purpose, ...]
    #: whether the tenants file lists a tenant's accounts of it, in the section named `name`
    #: (False: the settings' account serves the default tenant only)
    tenant_accounts: bool
    #: whether one API URL serves every account (the token tells them apart); else an account's URL
    #: belongs to one tenant
    shared_api_url: bool

    def parse_webhook(self, payload: object, received_at: datetime) -> Outcome:
        """One webhook body (parsed JSON) → outcome. Pure; never raises for bad input."""
        ...

    def message_limit(self, channel: str) -> int:
        """The longest message (characters) the channel accepts; longer answers are split."""
        ...

    def configured(self, settings: Settings) -> bool:
        """Whether the settings let the responder answer on this provider."""
        ...

    def unconfigured_warning(self) -> str:
        """The responder's start-up warning when the provider is not configured."""
        ...

    def config_hint(self) -> str:
        """The settings that configure it, for the "no channel configured" error."""
        ...

    def settings_account(self, settings: Settings) -> tuple[str, str] | None:
        """(API URL, env name of its token) of the account the settings describe — the default
        tenant's without a tenants file — or None when they describe none."""
        ...

    def default_api_url(self, settings: Settings) -> str | None:
        """The API URL a tenants-file account omitting `api_url` gets (None: it must be given)."""
        ...

    async def check(self, settings: Settings, http: httpx.AsyncClient,
                    account: AccountAccess | None = None, where: str = "") -> Check:
        """`watistream check`: one harmless authenticated call with the settings' account — or with
        `account`, a tenant's account, which `where` names as the tenants file does
        (`t03 wati[default]`) — judged (`ok`, or `FAIL` with what to change). Never raises."""
        ...

    def open_client(self, settings: Settings, purpose: Purpose,
                    account: AccountAccess | None = None) -> Client | None:
        """A client for `purpose` (send / media / history) of `account` (a tenant's account; None:
        the account the settings describe), or None when not configured/needed."""
        ...

    async def send(self, client: Client | None, channel: str, provider_id: str, parts: list[str],
                   batch_id: str, *, resume: bool, policy: SendPolicy) -> Sent:
        """Sends the parts in order; raises SendFailed saying which parts went out."""
        ...

    async def fetch_history(self, client: Client | None, provider_id: str, *,
                            stop_before: datetime | None, max_pages: int,
                            notice: Notice | None) -> tuple[list[HistoryItem], int]:
        """(parsed history items, pages read); raises ProviderFailure."""
        ...

    async def fetch_media(self, client: Client | None, channel: str, media_ref: str, *,
                          policy: MediaPolicy, download_url: DownloadUrl) -> bytes:
        """The media's bytes; raises ProviderFailure (`too_large`, ...) or what download_url raises."""
        ...
