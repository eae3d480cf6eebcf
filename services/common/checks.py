"""A start-up check's outcome, and the helpers that judge an HTTP dependency's answer.

Shared by `watistream check` (services/devtools/check.py: Kafka, OpenAI, the prompt) and the
providers (each reaches its own platform's API in `Provider.check`), so every line reads alike:
`ok` or `FAIL`, what was found, and for a failure what to change. Pure except `get_json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Check:
    """One check's outcome: `detail` says what was found (or why it failed), `fix` what to change."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class AccountNames:
    """How a provider check names the account it checked: the line's name, and where the account's
    URL and token are configured (the settings' environment variables, or a tenants-file entry's
    fields), so a failure says exactly what to change."""

    check: str
    url: str
    token: str

    @classmethod
    def of_tenant(cls, provider: str, where: str) -> AccountNames:
        """A tenants-file account, `where` as the file names it (`t03 wati[default]`)."""
        return cls(f"{provider} {where}", f"TENANTS_FILE {where}.api_url", f"TENANTS_FILE {where}.token")


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def body_text(body: Any) -> str:
    """A provider's error message, short, for the reason (never the whole body)."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:200]
        for key in ("message", "info"):
            if isinstance(body.get(key), str):
                return str(body[key])[:200]
    return ""


def unexpected(name: str, status: int, body: Any, what: str) -> Check:
    """An answer none of the judgement's cases expected: its status and message, and what to check."""
    reason = body_text(body)
    return failed(name, f"unexpected HTTP {status}" + (f": {reason}" if reason else ""),
                  f"check {what}; if it persists, the provider may be down")


def unreachable(name: str, setting: str, url: str, exc: Exception) -> Check:
    return failed(name, f"cannot reach {url}: {type(exc).__name__}: {exc}".rstrip(": "),
                  f"check {setting} and this host's network access to it")


async def get_json(http: httpx.AsyncClient, url: str, token: str) -> tuple[int, Any]:
    """GET with a Bearer token: (status, JSON body or None)."""
    response = await http.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    return response.status_code, json_of(response)


async def check_api(
    http: httpx.AsyncClient, name: str, setting: str, base_url: str, path: str, token: str,
    judge: Callable[[int, Any], Check],
) -> Check:
    """One provider's connectivity check: GET `base_url + path` with its token, judged by the
    provider; a network failure names the setting that holds the URL."""
    try:
        return judge(*await get_json(http, base_url.rstrip("/") + path, token))
    except httpx.HTTPError as exc:
        return unreachable(name, setting, base_url, exc)


def json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


__all__ = ["AccountNames", "Check", "body_text", "failed", "get_json", "json_of", "passed", "unexpected",
           "unreachable"]
