"""ManyChat (Facebook Messenger, Instagram): channels `facebook` and `instagram`, keys
`manychat:<subscriber id>`, webhooks (External Requests) at /webhooks/manychat.

Sends are sendContent calls (≤ 10 messages each) split to 2000 characters; a partly failed call
resumes after the messages ManyChat took. ManyChat has no history to read, so resumed sends stay
at-least-once and the context service never fetches history for its customers. Media are the
attachment URLs of the webhook, downloaded with the vision service's URL checks.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

import httpx

from services.common import metrics
from services.common.checks import AccountNames, Check, check_api, failed, passed, unexpected
from services.common.config import Settings
from services.common.manychat import MAX_TEXT_CHARS, ManyChatClient, ManyChatError
from services.common.records import HistoryItem
from services.common.tenants import serves_tenant_accounts
from services.ingest.manychat import normalise_manychat
from services.ingest.outcomes import CustomerMessage, Rejected

from .base import (
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

#: the longest message ManyChat's sendContent accepts
MANYCHAT_LIMIT = MAX_TEXT_CHARS
#: `watistream check`'s call: authenticated, changes nothing, names the page
CHECK_PATH = "/fb/page/getInfo"
#: the settings' account, as `watistream check` names it
SETTINGS_NAMES = AccountNames("manychat", "MANYCHAT_API_URL", "MANYCHAT_API_TOKEN")


class ManyChatProvider:
    name: str = "manychat"
    channels: tuple[str, ...] = ("facebook", "instagram")
    has_history: bool = False
    client_type: type = ManyChatClient
    audience: str = "Facebook/Instagram"
    title: str = "ManyChat"
    required_settings: tuple[str, ...] = ("MANYCHAT_API_URL", "MANYCHAT_API_TOKEN")
    token_setting: str = "MANYCHAT_API_TOKEN"  # noqa: S105 - a setting's name, no secret
    checked_for: tuple[Purpose, ...] = ("send",)  # media are attachment URLs; no history API
    tenant_accounts: bool = True
    shared_api_url: bool = True  # one ManyChat API URL serves every page; the token tells them apart

    def parse_webhook(self, payload: object, received_at: datetime) -> Outcome:
        result = normalise_manychat(payload, received_at)
        return result if isinstance(result, Rejected) else CustomerMessage(result)

    def message_limit(self, channel: str) -> int:
        return MANYCHAT_LIMIT

    def configured(self, settings: Settings) -> bool:
        """Enabled (CHANNELS) and its settings present."""
        return settings.channel_enabled(self.name) and bool(
            settings.manychat_api_url and settings.manychat_api_token)

    def unconfigured_warning(self) -> str:
        return "ManyChat is not configured: Facebook/Instagram batches will be dead-lettered"

    def config_hint(self) -> str:
        return "MANYCHAT_API_TOKEN"

    def settings_account(self, settings: Settings) -> tuple[str, str] | None:
        return (settings.manychat_api_url, "MANYCHAT_API_TOKEN") if settings.manychat_api_token else None

    def default_api_url(self, settings: Settings) -> str | None:
        return settings.manychat_api_url

    async def check(self, settings: Settings, http: httpx.AsyncClient,
                    account: AccountAccess | None = None, where: str = "") -> Check:
        """`GET /fb/page/getInfo`: authenticated, changes nothing, names the page."""
        if account is None:
            return await check_api(http, self.name, "MANYCHAT_API_URL", settings.manychat_api_url,
                                   CHECK_PATH, settings.manychat_api_token, judge_manychat)
        names = AccountNames.of_tenant(self.name, where)
        return await check_api(http, names.check, names.url, account.api_url, CHECK_PATH, account.token,
                               partial(judge_manychat, names=names))

    def open_client(self, settings: Settings, purpose: Purpose,
                    account: AccountAccess | None = None) -> ManyChatClient | None:
        # media are attachment URLs; there is no history API. A tenants file's account is served
        # because its tenant's entry lists it; otherwise the settings enable the channel
        served = ((account is not None and serves_tenant_accounts(settings))
                  or settings.channel_enabled(self.name))
        if purpose != "send" or not served:
            return None
        url, token = (settings.manychat_api_url, settings.manychat_api_token) if account is None else (
            account.api_url, account.token)
        return ManyChatClient(url, token) if url and token else None

    async def send(self, client: Client | None, channel: str, provider_id: str, parts: list[str],
                   batch_id: str, *, resume: bool, policy: SendPolicy) -> Sent:
        tenant = metrics.key_tenant(batch_id)  # the metrics' tenant label (a batch id starts with the key)
        if not isinstance(client, ManyChatClient):
            metrics.send_failures_total.labels(channel, "not_configured", tenant).inc()
            raise SendFailed("channel_not_configured", [], [])
        instagram = channel == "instagram"
        remaining = list(parts)
        delivered: list[str] = []
        attempt = 0
        while remaining:
            attempt += 1
            try:
                await client.send_content(provider_id, remaining, instagram=instagram)
            except ManyChatError as exc:
                metrics.send_failures_total.labels(channel, exc.reason, tenant).inc()
                done = max(0, min(exc.sent_messages, len(remaining)))
                delivered.extend(remaining[:done])
                remaining = remaining[done:]
                if not exc.retryable or attempt >= policy.attempts:
                    raise SendFailed(exc.reason, delivered, []) from None
                await policy.sleep(policy.delay(attempt, None))
                continue
            except ValueError:
                metrics.send_failures_total.labels(channel, "invalid_text", tenant).inc()
                raise SendFailed("invalid_text", delivered, []) from None
            delivered.extend(remaining)
            remaining = []
        return Sent(delivered, [])

    async def fetch_history(self, client: Client | None, provider_id: str, *,
                            stop_before: datetime | None, max_pages: int,
                            notice: Notice | None) -> tuple[list[HistoryItem], int]:
        raise ProviderFailure("no_history", "ManyChat has no conversation history API")

    async def fetch_media(self, client: Client | None, channel: str, media_ref: str, *,
                          policy: MediaPolicy, download_url: DownloadUrl) -> bytes:
        return await download_url(media_ref)


def judge_manychat(status: int, body: Any, names: AccountNames = SETTINGS_NAMES) -> Check:
    """page/getInfo's answer: 200 proves the token and names the page."""
    name, url, token = names.check, names.url, names.token
    if status == 200 and isinstance(body, dict) and body.get("status") == "success":
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        page = f"page {data.get('name')!r} ({data.get('id')})" if data else "its page"
        return passed(name, f"{token} accepted for {page}")
    if status in (401, 403):
        return failed(name, f"ManyChat refused {token} (HTTP {status})",
                      f"create an API key in ManyChat (Settings > API) and put it in {token}")
    if status == 404:
        return failed(name, f"{url} has no ManyChat API (HTTP 404)",
                      f"set {url}=https://api.manychat.com (the default)")
    return unexpected(name, status, body, url)
