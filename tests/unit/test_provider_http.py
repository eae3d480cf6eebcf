"""services/common/provider_http.py: every provider client of a process — WATI, ManyChat and the
OpenAI SDK's clients of every tenant account — shares one verifying TLS context."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx
import openai
import pytest

from services.common.config import Settings
from services.common.manychat import ManyChatClient
from services.common.openai_accounts import OpenAIAccount, openai_http_client, openai_tls_context
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
            assert {id(_tls_context_of(c)) for c in clients} == {id(openai_tls_context())}
        finally:
            for client in clients:
                await client.close()

    asyncio.run(main())


def test_sharing_keeps_what_the_sdk_would_do_by_itself() -> None:
    """The same trusted CAs, limits, redirects, proxies from the environment and timeouts as the SDK
    gives a client of its own; vision's hooks kept."""

    async def main() -> None:
        own = openai.AsyncOpenAI(api_key="sk-own", base_url="https://api.openai.com/v1", timeout=30.0)
        ours = make_client("sk-ours", "https://api.openai.com/v1", 30.0)
        vision = Vision(Settings(openai_api_key="sk-deploy-0000"))
        vision_client = vision.openai_clients.get(OpenAIAccount("sk-v"))
        try:
            shared, sdks_own = _tls_context_of(ours), _tls_context_of(own)
            assert shared is not sdks_own and shared.get_ca_certs() == sdks_own.get_ca_certs()
            assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
            for attribute in ("timeout", "follow_redirects", "trust_env"):
                assert getattr(ours._client, attribute) == getattr(own._client, attribute), attribute
            own_pool, our_pool = own._client._transport._pool, ours._client._transport._pool  # type: ignore[attr-defined]
            assert (our_pool._max_connections, our_pool._max_keepalive_connections) == (
                own_pool._max_connections, own_pool._max_keepalive_connections)
            assert ours.timeout == 30.0 and ours.max_retries == 0
            hooks = vision_client._client.event_hooks
            assert hooks["request"] and hooks["response"]
        finally:
            for client in (own, ours, vision_client):
                await client.close()

    asyncio.run(main())


def test_an_http2_openai_client_is_refused_as_it_would_change_the_shared_context() -> None:
    with pytest.raises(ValueError, match="HTTP/2"):
        openai_http_client(http2=True)


def test_the_shared_context_verifies_certificates_and_host_names() -> None:
    context = shared_tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0  # a CA bundle is loaded
