"""Local stand-ins for WATI, ManyChat and OpenAI: the project's own HTTP servers for tests and demo.

Production clients reach them through a different base URL, so tests exercise the real client code.
They are steered from Python (state, faults, latency):

    async with StandIns.running() as s:
        s.wati_url, s.manychat_url, s.openai_url      # base URLs for the settings
        s.wati.add_message(...); s.openai.fail_next(429)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._base import DEFAULT_MANYCHAT_TOKEN, DEFAULT_OPENAI_KEY, DEFAULT_WATI_TOKEN
from .manychat import ManyChatSent, ManyChatStandIn
from .openai import OpenAIStandIn, ResponseRecord
from .wati import WatiSent, WatiStandIn

__all__ = [
    "ManyChatSent",
    "ManyChatStandIn",
    "OpenAIStandIn",
    "ResponseRecord",
    "StandIns",
    "WatiSent",
    "WatiStandIn",
]


class StandIns:
    """The three stand-ins together, started on loopback ports."""

    def __init__(
        self,
        *,
        wati_token: str = DEFAULT_WATI_TOKEN,
        manychat_token: str = DEFAULT_MANYCHAT_TOKEN,
        openai_key: str = DEFAULT_OPENAI_KEY,
        tenant: str = "tenant123",
    ) -> None:
        self.wati = WatiStandIn(wati_token, tenant=tenant)
        self.manychat = ManyChatStandIn(manychat_token)
        self.openai = OpenAIStandIn(openai_key)

    async def start(self, base_port: int = 0, host: str = "127.0.0.1") -> None:
        """Starts all three: on base_port, +1, +2 — or free ports when base_port is 0."""
        servers = (self.wati, self.manychat, self.openai)
        try:
            for offset, server in enumerate(servers):
                await server.start(base_port + offset if base_port else 0, host)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for server in (self.wati, self.manychat, self.openai):
            await server.stop()

    @classmethod
    @asynccontextmanager
    async def running(
        cls,
        *,
        base_port: int = 0,
        wati_token: str = DEFAULT_WATI_TOKEN,
        manychat_token: str = DEFAULT_MANYCHAT_TOKEN,
        openai_key: str = DEFAULT_OPENAI_KEY,
        tenant: str = "tenant123",
    ) -> AsyncIterator[StandIns]:
        stand_ins = cls(wati_token=wati_token, manychat_token=manychat_token, openai_key=openai_key,
                        tenant=tenant)
        await stand_ins.start(base_port)
        try:
            yield stand_ins
        finally:
            await stand_ins.stop()

    @property
    def wati_url(self) -> str:
        return self.wati.url

    @property
    def manychat_url(self) -> str:
        return self.manychat.url

    @property
    def openai_url(self) -> str:
        return self.openai.url

    def env(self) -> dict[str, str]:
        """The environment variables that point the services at these stand-ins."""
        return {
            "WATI_API_URL": self.wati_url,
            "WATI_API_TOKEN": self.wati.token,
            "MANYCHAT_API_URL": self.manychat_url,
            "MANYCHAT_API_TOKEN": self.manychat.token,
            "OPENAI_BASE_URL": self.openai_url,
            "OPENAI_API_KEY": self.openai.api_key,
        }

    def reset(self) -> None:
        """Forgets all state, faults and latencies (the servers keep running)."""
        self.wati.reset()
        self.manychat.reset()
        self.openai.reset()
