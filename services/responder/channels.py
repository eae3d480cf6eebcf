"""Sending an answer to the customer's channel, through the channel's provider (services.providers).

The answer is split to the channel's limit (`Provider.message_limit`); the provider sends the
parts with its retries (`SendPolicy`: a few attempts with backoff, Retry-After honoured, capped),
resuming after the parts already delivered, and raises `SendFailed` saying which parts went out.
A send resumed after a crash (`resume=True`) is the provider's to make safe: WATI looks its parts
up in the contact's history first (services/providers/wati.py); ManyChat has no history, so its
resumed sends stay at-least-once.

With `accounts` (the responder's), each customer's answer goes out through the client of ITS
tenant's account (services/providers/accounts.py: the account its key names, one client per account,
reused); the clients given positionally serve callers without tenants (tests, tools).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .. import providers
from ..providers.accounts import AccountClients, NoAccount
from ..providers.base import Client, SendFailed, SendPolicy, Sent, local_message_id
from ..providers.wati import RESUME_LOOKUP_ITEMS
from .splitting import limit_for, split_message

__all__ = ["RESUME_LOOKUP_ITEMS", "ChannelSender", "SendFailed", "Sent", "local_message_id"]

MAX_RETRY_AFTER = 10.0


class ChannelSender:
    """Sends texts through the providers whose clients it was given (`Provider.open_client`), or
    through the customer's account's client (`accounts`); a channel whose provider has no client
    fails the send explicitly (`channel_not_configured`), a customer whose tenant or account is not
    configured with `no_account`."""

    def __init__(
        self,
        *clients: Client | None,
        accounts: AccountClients | None = None,
        attempts: int = 3,
        base_delay: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.clients: dict[str, Client] = {}
        for client in clients:
            if client is not None:
                self.clients[providers.for_client(client).name] = client
        self.accounts = accounts
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self.sleep = sleep

    @property
    def policy(self) -> SendPolicy:
        return SendPolicy(attempts=self.attempts, base_delay=self.base_delay,
                          max_retry_after=MAX_RETRY_AFTER, sleep=self.sleep)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        if self.accounts is not None:
            await self.accounts.aclose()

    async def send(
        self, channel: str, provider_id: str, text: str, batch_id: str, *, resume: bool = False,
        customer_key: str | None = None,
    ) -> Sent:
        try:
            provider = providers.for_channel(channel)
        except providers.UnknownProvider:
            raise SendFailed("unknown_channel", [], []) from None
        parts = split_message(text, limit_for(channel))
        if not parts:
            raise SendFailed("empty_text", [], [])
        client: Client | None = self.clients.get(provider.name)
        if self.accounts is not None and customer_key is not None:
            try:
                client = self.accounts.client(provider, customer_key)
            except NoAccount:
                raise SendFailed("no_account", [], []) from None
        return await provider.send(client, channel, provider_id, parts, batch_id,
                                   resume=resume, policy=self.policy)
