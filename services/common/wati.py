"""WATI API client: conversation history, session messages, media (docs/wati.md).

Read leniently, fail explicitly: every failure is a `WatiError` with a short `reason` code that is
safe to log (never a response body, a phone number or the token), and `retryable` tells the caller
whether trying again later can help. The client never logs; callers log with `logs.event`.

Choices:
- `send_session_message` sends `messageText` (and `localMessageId`) as form fields, which WATI
  accepts like query parameters, so a 4096-character text never hits URL-length limits and the
  customer's text stays out of proxies' access logs.
- A 200 whose body is not the expected JSON is `bad_response`: retryable for reads, NOT retryable
  for sends (the message may have gone out; retrying could send it twice).
- `get_media` uses only the `fileName` of a media reference and always our configured base URL, so
  the Bearer token is never sent to a host taken from a webhook payload.
"""

from __future__ import annotations

import asyncio
import email.utils
import mimetypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from .provider_http import ProviderClient
from .timeparse import first_time

MAX_TEXT_CHARS = 4096
RETRY_AFTER_CAP_SECONDS = 10.0


class WatiError(Exception):
    """A WATI call failed; `reason` is a short code safe to log."""

    def __init__(
        self, reason: str, *, status: int | None = None, retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"WATI {reason}" + (f" (HTTP {status})" if status is not None else ""))
        self.reason = reason
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class HistoryPage:
    """One getMessages page: raw items (order as WATI sent them) and whether more pages exist."""

    items: list[dict[str, Any]]
    has_more: bool


def item_time(item: dict[str, Any]) -> datetime | None:
    """When a history item happened: `created`, else `timestamp` (any WATI format), aware UTC."""
    return first_time(item.get("created"), item.get("timestamp"))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date); None if absent/garbage."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def media_file_name(media_ref: str) -> str:
    """`data/images/x.jpg` from a path or a `.../showFile?fileName=...` / `getMedia?fileName=` URL."""
    ref = media_ref.strip()
    if not ref:
        raise WatiError("bad_media_ref")
    if ref.lower().startswith(("http://", "https://")):
        names = parse_qs(urlsplit(ref).query).get("fileName")
        if not names or not names[0].strip():
            raise WatiError("bad_media_ref")
        ref = names[0].strip()
    return ref.lstrip("/")


def _status_error(response: httpx.Response) -> WatiError:
    status = response.status_code
    if status == 429:
        return WatiError("rate_limited", status=status, retryable=True,
                         retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status >= 500:
        return WatiError("server_error", status=status, retryable=True)
    if status in (401, 403):
        return WatiError("unauthorized", status=status)
    if status == 404:
        return WatiError("not_found", status=status)
    if status == 408:
        return WatiError("timeout", status=status, retryable=True)
    return WatiError("client_error", status=status)


def _is_false(value: object) -> bool:
    """WATI's business failures: `result: false` / `"false"` / `"error"` / `"failed"`."""
    if value is False:
        return True
    return isinstance(value, str) and value.strip().lower() in ("false", "error", "failed", "failure")


def parse_history_page(doc: object, page_number: int, page_size: int) -> HistoryPage:
    """Validates a getMessages body; raises WatiError(bad_response / result_false)."""
    if not isinstance(doc, dict):
        raise WatiError("bad_response", status=200, retryable=True)
    if _is_false(doc.get("result")) or doc.get("ok") is False:
        raise WatiError("result_false", status=200)
    messages = doc.get("messages")
    if not isinstance(messages, dict):
        raise WatiError("bad_response", status=200, retryable=True)
    items = messages.get("items")
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise WatiError("bad_response", status=200, retryable=True)
    if not items:
        return HistoryPage([], False)
    total = messages.get("total")
    link = doc.get("link")
    if isinstance(total, int) and not isinstance(total, bool):
        has_more = page_number * page_size < total
    elif isinstance(link, dict) and "nextPage" in link:
        has_more = bool(link.get("nextPage"))
    else:
        has_more = len(items) >= page_size
    return HistoryPage(list(items), has_more)


def sent_message_ids(doc: dict[str, Any], local_message_id: str | None) -> list[str]:
    """Ids of a sent message, read leniently: message.id / whatsappMessageId / localMessageId."""
    found: list[str] = []
    message = doc.get("message")
    sources: list[dict[str, Any]] = [message] if isinstance(message, dict) else []
    sources.append(doc)
    for source in sources:
        for key in ("id", "whatsappMessageId", "localMessageId", "messageId"):
            if source is doc and key == "id":
                continue
            value = source.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                found.append(str(value).strip())
    if local_message_id:
        found.append(local_message_id)
    return list(dict.fromkeys(found))


class WatiClient(ProviderClient):
    """One tenant's WATI API; `base_url` includes the tenant (`https://live-server-X.wati.io/123`)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_after_cap: float = RETRY_AFTER_CAP_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__("WATI", base_url, token, timeout=timeout, transport=transport)
        self._retry_after_cap = retry_after_cap
        self._sleep = sleep

    def _url(self, path: str) -> str:
        return f"{self._base}/api/v1/{path}"

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise WatiError("timeout", retryable=True) from None
        except httpx.HTTPError:
            raise WatiError("connection_error", retryable=True) from None

    # -- history -----------------------------------------------------------------------------
    async def get_messages_page(self, contact_id: str, page_number: int, page_size: int = 100) -> HistoryPage:
        """One page of a contact's history (waId or BSUID)."""
        if page_number < 1 or page_size < 1:
            raise ValueError("page_number and page_size start at 1")
        response = await self._request(
            "GET", self._url(f"getMessages/{quote(contact_id, safe='')}"),
            params={"pageSize": page_size, "pageNumber": page_number},
        )
        if response.status_code != 200:
            raise _status_error(response)
        try:
            doc = response.json()
        except ValueError:
            raise WatiError("bad_response", status=200, retryable=True) from None
        return parse_history_page(doc, page_number, page_size)

    async def fetch_history(
        self,
        contact_id: str,
        *,
        stop_before: datetime | None,
        max_pages: int = 10,
        max_429_retries: int = 5,
        page_size: int = 100,
        notice: Callable[[str], None] | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """Raw items of every page fetched, and how many pages that took.

        Pages until a page holds an item older than `stop_before` (everything further back is
        older still), or there are no more pages, or `max_pages`. Items repeated across pages
        (history shifting while we page) are kept once, by `id`/`whatsappMessageId`. HTTP 429 is
        retried after Retry-After (capped) up to `max_429_retries` times in total; any other
        failure raises WatiError.

        `notice` hears what the result alone cannot tell, so the caller can count it (this client
        keeps no metrics): "rate_limited" before each 429 retry, "max_pages" when the page cap
        ended the fetch although WATI had more pages within the window (history truncated).
        """
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        retries_left = max_429_retries
        pages = 0
        page_number = 1
        while page_number <= max_pages:
            try:
                page = await self.get_messages_page(contact_id, page_number, page_size)
            except WatiError as exc:
                if exc.reason != "rate_limited" or retries_left <= 0:
                    raise
                if notice is not None:
                    notice("rate_limited")
                await self._sleep(self._backoff(exc.retry_after, max_429_retries - retries_left))
                retries_left -= 1
                continue
            pages += 1
            reached_cutoff = False
            for item in page.items:
                ident = item.get("whatsappMessageId") or item.get("id")
                if ident:
                    if str(ident) in seen:
                        continue
                    seen.add(str(ident))
                items.append(item)
                when = item_time(item)
                if stop_before is not None and when is not None and when < stop_before:
                    reached_cutoff = True
            if reached_cutoff or not page.has_more:
                break
            page_number += 1
        else:  # the cap, not the window or the end of the history, stopped the fetch
            if notice is not None and pages:
                notice("max_pages")
        return items, pages

    def _backoff(self, retry_after: float | None, attempt: int) -> float:
        if retry_after is not None:
            return min(retry_after, self._retry_after_cap)
        return min(0.5 * (2 ** attempt), self._retry_after_cap)

    # -- sending -----------------------------------------------------------------------------
    async def send_session_message(
        self, contact_id: str, text: str, *, local_message_id: str | None = None
    ) -> list[str]:
        """Sends one text (≤ 4096 characters; splitting is the caller's job); returns its ids."""
        if not text or not text.strip():
            raise ValueError("empty message text")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"message text longer than {MAX_TEXT_CHARS} characters")
        form = {"messageText": text}
        if local_message_id:
            form["localMessageId"] = local_message_id
        response = await self._request(
            "POST", self._url(f"sendSessionMessage/{quote(contact_id, safe='')}"), data=form
        )
        if response.status_code != 200:
            raise _status_error(response)
        try:
            doc = response.json()
        except ValueError:
            raise WatiError("bad_response", status=200) from None
        if not isinstance(doc, dict):
            raise WatiError("bad_response", status=200)
        if _is_false(doc.get("result")) or doc.get("ok") is False:
            raise WatiError("result_false", status=200)
        return sent_message_ids(doc, local_message_id)

    # -- media -------------------------------------------------------------------------------
    async def get_media(self, media_ref: str, *, max_bytes: int) -> tuple[bytes, str]:
        """Downloads a media file (bytes, content type); larger than max_bytes → `too_large`."""
        file_name = media_file_name(media_ref)
        request = self._http.build_request("GET", self._url("getMedia"), params={"fileName": file_name})
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException:
            raise WatiError("timeout", retryable=True) from None
        except httpx.HTTPError:
            raise WatiError("connection_error", retryable=True) from None
        try:
            if response.status_code != 200:
                raise _status_error(response)
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise WatiError("too_large", status=200)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            chunks: list[bytes] = []
            size = 0
            try:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise WatiError("too_large", status=200)
                    chunks.append(chunk)
            except httpx.TimeoutException:
                raise WatiError("timeout", retryable=True) from None
            except httpx.HTTPError:
                raise WatiError("connection_error", retryable=True) from None
        finally:
            await response.aclose()
        data = b"".join(chunks)
        if content_type == "application/json":
            raise WatiError("media_error", status=200)  # WATI answered an error document, not a file
        if not data:
            raise WatiError("empty_media", status=200)
        if not content_type or content_type == "application/octet-stream":
            content_type = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
        return data, content_type
