"""services/common/provider_http.py: every provider client of a process — WATI, ManyChat and the
OpenAI SDK's clients of every tenant account — shares one verifying TLS context."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx
import openai

from services.common.config import Settings
from services.common.manychat import ManyChatClient
from services.common.openai_accounts import OpenAIAccount
from services.common.provider_http import ProviderClient, shared_tls_context
from services.common.wati import WatiClient
from services.responder.ai import make_client
from services.vision.main import Vision


def _tls_context_of(client: ProviderClient | openai.AsyncOpenAI) -> ssl.SSLContext:
    if isinstance(client, openai.AsyncOpenAI):  # the SDK's HTTP client is its own httpx fork's
        transport: Any = client._client._transport
    else:
        transport = client._http._transport
        assert isinstance(transport, httpx.AsyncHTTPTransport)
    context: ssl.SSLContext = transport._pool._ssl_context  # httpcore keeps it here
    return context


def test_clients_of_many_accounts_share_one_tls_context() -> None:
    """A worker opens a client per tenant account: they must not each load the CA bundle again."""

    async def main() -> None:
        clients = [
            WatiClient("https://live-server-1.wati.io/101", "token-a"),
            WatiClient("https://live-server-2.wati.io/202", "token-b"),
            ManyChatClient("https://api.manychat.com", "page-key"),
        ]
        try:
            contexts = {id(_tls_context_of(c)) for c in clients}
            assert contexts == {id(shared_tls_context())}
        finally:
            for client in clients:
                await client.aclose()

    asyncio.run(main())


def test_openai_clients_of_many_accounts_share_the_same_tls_context() -> None:
    """Tenants with their own OpenAI keys: the responder's and vision's client per account too."""

    async def main() -> None:
        vision = Vision(Settings(openai_api_key="sk-deploy-0000"))
        clients = [
            make_client("sk-tenant-a", "https://api.openai.com/v1", 30.0),
            make_client("sk-tenant-b", "https://api.openai.com/v1", 30.0, project="proj_b"),
            vision.openai_clients.get(OpenAIAccount("sk-tenant-a")),
            vision.openai_clients.get(OpenAIAccount("sk-tenant-b", "proj_b")),
        ]
        try:
            assert len({id(client) for client in clients}) == 4
            assert {id(_tls_context_of(c)) for c in clients} == {id(shared_tls_context())}
        finally:
            for client in clients:
                await client.close()

    asyncio.run(main())


def test_the_shared_context_verifies_certificates_and_host_names() -> None:
    context = shared_tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0  # a CA bundle is loaded
