"""What the WATI and ManyChat clients share: one httpx client per provider, bearer-authenticated.

Redirects are not followed (a provider API that redirects is misconfigured, and following would
carry the token elsewhere); `transport` lets tests route to a stand-in without a socket.
"""

from __future__ import annotations

import functools
import ssl
from typing import Self

import httpx


@functools.cache
def shared_tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every provider client of the process (httpx's defaults).

    A worker opens one client per tenant account on first use; each creating its own context loaded
    the CA bundle again — ~30 ms of the event loop per account (50 tenants' first messages waited
    2-4 s for it in the tenants benchmark's warm-up). One context is safe to share between clients."""
    return httpx.create_ssl_context()


class ProviderClient:
    """Base of the provider API clients: the base URL, the HTTP client, async context manager."""

    def __init__(
        self,
        provider: str,
        base_url: str,
        token: str,
        *,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        if not base_url:
            raise ValueError(f"{provider} base URL is empty")
        self._base = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            timeout=timeout, transport=transport, follow_redirects=False, verify=shared_tls_context(),
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
