"""Which OpenAI account a tenant's customers are answered (and their images classified) with.

A tenant may bring its own OpenAI key and project (docs/tenants.md, `openai.api_key` as a reference,
`openai.project`); else the deployment's OPENAI_API_KEY is used. Conversations and uploaded files
live in the project of the key that made them, so every call for a customer — the responder's
conversation and answer, vision's upload and classification — goes through its tenant's account.

`openai_account` is the plain part (the tenant's key resolved, its project); `OpenAIClients` keeps
ONE client per account (key + project), made by the service's own factory (each service sets its
own retries and hooks), so tenants sharing the deployment's key share one client and the number of
clients is bounded by the tenants file. Every such client's HTTP client comes from
`openai_http_client`, which shares the process's one TLS context for OpenAI.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx2
import openai

from services.common.config import Settings
from services.common.tenants import Tenant

C = TypeVar("C")


@dataclass(frozen=True)
class OpenAIAccount:
    """An OpenAI API key (never shown by `repr`) and the project its calls are made in (None: the
    key's default project)."""

    api_key: str = field(repr=False)
    project: str | None = None


@functools.cache
def openai_tls_context() -> ssl.SSLContext:
    """The one TLS context of every OpenAI SDK client of the process, made as the SDK makes each
    client's by itself (its HTTP library, httpx2): the same trusted CAs — the system's store, or
    SSL_CERT_FILE / SSL_CERT_DIR — so sharing changes what is trusted in no way. Left to itself the
    SDK makes one per client, loading the CA store again (~30 ms of the event loop) on every tenant
    account's first call. A service's first client, made at its start, builds it."""
    return httpx2.create_ssl_context()


def openai_http_client(**options: Any) -> openai.DefaultAsyncHttpxClient:
    """The HTTP client of one OpenAI SDK client: the SDK's defaults (limits, timeouts, proxies from
    the environment), `options` added, on `openai_tls_context`. HTTP/1.1 only: an HTTP/2 client
    sets its protocols on the context it connects with, which every client shares."""
    if options.get("http2"):
        raise ValueError("OpenAI clients share one TLS context: HTTP/2 would change it for all")
    return openai.DefaultAsyncHttpxClient(verify=openai_tls_context(), **options)


def openai_account(
    tenant: Tenant, settings: Settings, environ: Mapping[str, str],
    read_file: Callable[[str], str] | None = None,
) -> OpenAIAccount:
    """The tenant's own key (its reference resolved; ValueError if it does not) or the deployment's,
    with the tenant's project."""
    ref = tenant.openai.api_key
    key = ref.resolve(environ, read_file) if ref is not None else settings.openai_api_key
    return OpenAIAccount(key, tenant.openai.project)


class OpenAIClients(Generic[C]):
    """One client per OpenAI account, made by `factory` on first use and kept."""

    def __init__(self, factory: Callable[[OpenAIAccount], C]) -> None:
        self.factory = factory
        self._clients: dict[OpenAIAccount, C] = {}

    def get(self, account: OpenAIAccount) -> C:
        client = self._clients.get(account)
        if client is None:
            client = self._clients[account] = self.factory(account)
        return client

    def __len__(self) -> int:
        return len(self._clients)

    def all(self) -> list[C]:
        return list(self._clients.values())

    def clear(self) -> None:
        self._clients.clear()
