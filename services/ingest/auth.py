"""The webhook secret: `Authorization: Bearer <WEBHOOK_TOKEN>` or `?token=<WEBHOOK_TOKEN>`.

The query form exists because WATI lets users configure only a URL. Pure functions, so the rules
are unit-tested without HTTP.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def presented_token(authorization: str | None, query: Mapping[str, str]) -> str | None:
    """The token the caller presented: a Bearer header wins over the query parameter."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    token = query.get("token")
    return token if token else None


def check_token(presented: str | None, expected: str) -> str | None:
    """None when the caller may pass, else the reason for the 401 (never echoes either token)."""
    if not expected:
        # make_app/main refuse to start without a secret; this guards any other caller
        return "the service has no webhook secret configured"
    if presented is None:
        return "missing webhook secret: send 'Authorization: Bearer <token>' or '?token=<token>'"
    # constant time, so the response time does not reveal how much of a guess was right
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        return "wrong webhook secret"
    return None
