"""WATI (WhatsApp): the `wati` channel, keys `wati:<waId or BSUID>`, webhooks at /webhooks/wati.

Sends are session messages split to 4096 characters, each part carrying a `localMessageId` derived
from the batch id. A send resumed after a crash (`resume=True`: the batch was generated, maybe
partly or wholly sent, but `sent` was never recorded) first looks for the batch's parts in the
contact's newest history page by that `localMessageId`, and sends only the parts WATI does not
have: a responder SIGKILLed while WATI was accepting its reply must not send the reply twice
(chaos drill, issue 7). A failed lookup sends anyway: a possible duplicate beats no answer.
History: getMessages pages (the only provider with history). Media: getMedia by path or URL.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

import httpx

from services.common import metrics
from services.common.checks import AccountNames, Check, check_api, failed, passed, unexpected
from services.common.config import Settings
from services.common.records import HistoryItem
from services.common.tenants import serves_tenant_accounts
from services.common.wati import MAX_TEXT_CHARS, WatiClient, WatiError, sent_message_ids
from services.context.history import parse_history
from services.ingest.wati import classify_wati

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
    local_message_id,
)

#: history items searched for the parts of a resumed send (WATI lists the newest first).
RESUME_LOOKUP_ITEMS = 100
#: `watistream check`'s call: authenticated, reads one contact, changes nothing
CHECK_PATH = "/api/v1/getContacts?pageSize=1&pageNumber=1"
#: the settings' account, as `watistream check` names it
SETTINGS_NAMES = AccountNames("wati", "WATI_API_URL", "WATI_API_TOKEN")
#: the longest session message WATI accepts
WATI_LIMIT = MAX_TEXT_CHARS


class WatiProvider:
    name: str = "wati"
    channels: tuple[str, ...] = ("wati",)
    has_history: bool = True
    client_type: type = WatiClient
    audience: str = "WhatsApp"
    title: str = "WATI"
    required_settings: tuple[str, ...] = ("WATI_API_URL", "WATI_API_TOKEN")
    token_setting: str = "WATI_API_TOKEN"  # noqa: S105 - a setting's name, no secret
    checked_for: tuple[Purpose, ...] = ("send", "history", "media")
    tenant_accounts: bool = True
    shared_api_url: bool = False  # the URL includes the WATI tenant: an account is its URL

    def parse_webhook(self, payload: object, received_at: datetime) -> Outcome:
        return classify_wati(payload, received_at)

    def message_limit(self, channel: str) -> int:
        return WATI_LIMIT

    def configured(self, settings: Settings) -> bool:
        """Enabled (CHANNELS) and its settings present."""
        return settings.channel_enabled(self.name) and bool(settings.wati_api_url and settings.wati_api_token)

    def unconfigured_warning(self) -> str:
        return "WATI is not configured: WhatsApp batches will be dead-lettered"

    def config_hint(self) -> str:
        return "WATI_API_URL + WATI_API_TOKEN"

    def settings_account(self, settings: Settings) -> tuple[str, str] | None:
        return (settings.wati_api_url, "WATI_API_TOKEN") if settings.wati_api_url else None

    def default_api_url(self, settings: Settings) -> str | None:
        return None  # each WATI account has its own URL (with its tenant id)

    async def check(self, settings: Settings, http: httpx.AsyncClient,
                    account: AccountAccess | None = None, where: str = "") -> Check:
        """`GET getContacts?pageSize=1`: authenticated, reads one contact, changes nothing."""
        if account is None:
            return await check_api(http, self.name, "WATI_API_URL", settings.wati_api_url, CHECK_PATH,
                                   settings.wati_api_token, judge_wati)
        names = AccountNames.of_tenant(self.name, where)
        return await check_api(http, names.check, names.url, account.api_url, CHECK_PATH,
                               bearer_dropped(account.token), partial(judge_wati, names=names))

    def open_client(self, settings: Settings, purpose: Purpose,
                    account: AccountAccess | None = None) -> WatiClient | None:
        url, token = (settings.wati_api_url, settings.wati_api_token) if account is None else (
            account.api_url, bearer_dropped(account.token))
        if purpose == "history":
            return WatiClient(url, token, timeout=max(1.0, settings.history_timeout_seconds))
        # a tenants file's account is served because its tenant's entry lists it; otherwise the
        # settings enable the channel (CHANNELS, or its token set)
        served = ((account is not None and serves_tenant_accounts(settings))
                  or settings.channel_enabled(self.name))
        if not (served and url and token):
            return None
        if purpose == "media":
            return WatiClient(url, token, timeout=20.0)
        return WatiClient(url, token)

    async def send(self, client: Client | None, channel: str, provider_id: str, parts: list[str],
                   batch_id: str, *, resume: bool, policy: SendPolicy) -> Sent:
        tenant = metrics.key_tenant(batch_id)  # the metrics' tenant label (a batch id starts with the key)
        if not isinstance(client, WatiClient):
            metrics.send_failures_total.labels("wati", "not_configured", tenant).inc()
            raise SendFailed("channel_not_configured", [], [])
        delivered = await _delivered(client, provider_id, batch_id, len(parts)) if resume else {}
        sent = Sent([])
        for index, part in enumerate(parts):
            if index in delivered:  # WATI has it already (sent before a crash): never twice
                sent.parts.append(part)
                sent.ids.extend(delivered[index])
                continue
            attempt = 0
            while True:
                attempt += 1
                try:
                    ids = await client.send_session_message(
                        provider_id, part, local_message_id=local_message_id(batch_id, index)
                    )
                except WatiError as exc:
                    metrics.send_failures_total.labels("wati", exc.reason, tenant).inc()
                    if not exc.retryable or attempt >= policy.attempts:
                        raise SendFailed(exc.reason, sent.parts, sent.ids) from None
                    await policy.sleep(policy.delay(attempt, exc.retry_after))
                    continue
                except ValueError:
                    metrics.send_failures_total.labels("wati", "invalid_text", tenant).inc()
                    raise SendFailed("invalid_text", sent.parts, sent.ids) from None
                sent.parts.append(part)
                sent.ids.extend(ids)
                break
        return sent

    async def fetch_history(self, client: Client | None, provider_id: str, *,
                            stop_before: datetime | None, max_pages: int,
                            notice: Notice | None) -> tuple[list[HistoryItem], int]:
        if not isinstance(client, WatiClient):
            raise ProviderFailure("not_configured", "WATI_API_URL is not configured")
        try:
            raw, pages = await client.fetch_history(provider_id, stop_before=stop_before,
                                                    max_pages=max_pages, notice=notice)
        except WatiError as exc:
            raise ProviderFailure(exc.reason, str(exc), status=exc.status, retry_after=exc.retry_after,
                                  retryable=exc.retryable) from None
        return parse_history(raw), pages

    async def fetch_media(self, client: Client | None, channel: str, media_ref: str, *,
                          policy: MediaPolicy, download_url: DownloadUrl) -> bytes:
        if not isinstance(client, WatiClient):
            raise ProviderFailure("not_configured", "WATI_API_URL is not configured")
        for attempt in range(policy.attempts):
            try:
                data, _declared = await client.get_media(media_ref, max_bytes=policy.max_bytes)
                return data
            except WatiError as exc:
                if exc.reason == "too_large" or not exc.retryable or attempt == policy.attempts - 1:
                    raise ProviderFailure(exc.reason, str(exc), status=exc.status) from None
                await policy.sleep(min(exc.retry_after if exc.retry_after is not None
                                       else 0.25 * 2 ** attempt, policy.retry_cap_seconds))
        raise AssertionError("unreachable")


def judge_wati(status: int, body: Any, names: AccountNames = SETTINGS_NAMES) -> Check:
    """getContacts' answer: 200 proves URL, tenant and token; 401 the token, 404 the tenant part."""
    name, url, token = names.check, names.url, names.token
    if status == 200 and isinstance(body, dict) and body.get("result") not in (False, "error"):
        return passed(name, f"{url} and {token} accepted (getContacts)")
    if status in (401, 403):
        return failed(name, f"WATI refused {token} (HTTP {status})",
                      f"copy the token from WATI's API page into {token} (with or without `Bearer `)")
    if status == 404:
        return failed(name, f"{url} not found (HTTP 404)",
                      f"{url} is the API endpoint of WATI's API page, including the tenant id, "
                      "e.g. https://live-mt-server.wati.io/123456")
    return unexpected(name, status, body, url)


def bearer_dropped(token: str) -> str:
    """A WATI token as the API wants it: a `Bearer ` pasted in front (as WATI's dashboard shows
    it) is dropped, as WATI_API_TOKEN's is."""
    token = token.strip()
    return token[7:].strip() if token[:7].lower() == "bearer " else token


async def _delivered(client: WatiClient, contact_id: str, batch_id: str, count: int) -> dict[int, list[str]]:
    """Part index → ids of the parts of this batch already in WATI's history (by localMessageId)."""
    wanted = {local_message_id(batch_id, index): index for index in range(count)}
    try:
        page = await client.get_messages_page(contact_id, 1, RESUME_LOOKUP_ITEMS)
    except WatiError as exc:
        metrics.send_failures_total.labels("wati", f"resume_lookup_{exc.reason}",
                                          metrics.key_tenant(batch_id)).inc()
        return {}
    found: dict[int, list[str]] = {}
    for item in page.items:
        local_id = item.get("localMessageId")
        if isinstance(local_id, str) and local_id in wanted:
            found[wanted[local_id]] = sent_message_ids({"message": item}, local_id)
    return found
