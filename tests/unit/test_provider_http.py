"""services/common/provider_http.py: every provider client of a process shares one verifying TLS context."""

from __future__ import annotations

import asyncio
import ssl

import httpx

from services.common.manychat import ManyChatClient
from services.common.provider_http import shared_tls_context
from services.common.wati import WatiClient


def _tls_context_of(client: WatiClient | ManyChatClient) -> ssl.SSLContext:
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


def test_the_shared_context_verifies_certificates_and_host_names() -> None:
    context = shared_tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0  # a CA bundle is loaded
