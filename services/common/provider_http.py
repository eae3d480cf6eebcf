"""What the WATI and ManyChat clients share: one httpx client per provider, bearer-authenticated.

Redirects are not followed (a provider API that redirects is misconfigured, and following would
carry the token elsewhere); `transport` lets tests route to a stand-in without a socket.
"""

from __future__ import annotations

from typing import Self

import httpx


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
            timeout=timeout, transport=transport, follow_redirects=False,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
