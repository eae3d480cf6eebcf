"""Operator accounts, password hashes, signed session cookies and CSRF tokens. Pure.

Accounts: `name:hash` entries from CONSOLE_USERS (comma-separated) and CONSOLE_USERS_FILE (one a
line, `#` comments); `name:hash:tenant+tenant` limits the operator to those tenants (the README's
"Operator console"; without the third field, every tenant). A hash is
`scrypt$<n>$<r>$<p>$<salt hex>$<key hex>` (hashlib.scrypt), made by `hash_password` /
`watistream console --hash-password`. A session is a cookie
`<name>|<expiry>|<nonce>|<hmac>` signed with CONSOLE_SESSION_SECRET; its CSRF token is an HMAC of
the session, so a form posted from another site (which cannot read the cookie) cannot carry it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError
from services.common.keys import SLUG_PATTERN

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
COOKIE = "console_session"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, key = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(bytes.fromhex(key)), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), key)


# A hash to compare against when the name is unknown, so a wrong name costs the same time.
_DUMMY = hash_password("not a password", salt=b"\0" * 16)


@dataclass(frozen=True)
class Accounts:
    """The operators: `hashes` by name, and `tenants`: the tenants of each operator limited to some
    (an operator not in it sees every tenant)."""

    hashes: dict[str, str]
    tenants: dict[str, frozenset[str]]


def parse_accounts(inline: str, file_text: str = "") -> Accounts:
    """The accounts of CONSOLE_USERS and the file's lines; a malformed entry is a ConfigError."""
    users: dict[str, str] = {}
    limited: dict[str, frozenset[str]] = {}
    entries = [e.strip() for e in inline.split(",")] + [ln.strip() for ln in file_text.splitlines()]
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        name, sep, rest = entry.partition(":")
        if not sep or not name or not set(name) <= NAME_CHARS:
            raise ConfigError("console users: each entry must be name:hash or name:hash:tenant+tenant "
                              "(name of letters, digits, ._@-)")
        hashed, limit, tenant_list = rest.partition(":")
        if not hashed.startswith("scrypt$") or hashed.count("$") != 5:
            raise ConfigError(f"console users: {name}'s hash is not an scrypt$... hash "
                              "(make one with `watistream console --hash-password`)")
        users[name] = hashed
        limited.pop(name, None)  # a later entry of the same name replaces the earlier one whole
        if limit:
            tenants = tenant_list.split("+")
            if not all(re.fullmatch(SLUG_PATTERN, t) for t in tenants):
                raise ConfigError(f"console users: {name}'s tenants must be tenant ids joined by + "
                                  f"(e.g. hotel-a+shop-b), got {tenant_list!r}")
            limited[name] = frozenset(tenants)
    return Accounts(users, limited)


def parse_users(inline: str, file_text: str = "") -> dict[str, str]:
    """{name: hash} from CONSOLE_USERS and the file's lines; a malformed entry is a ConfigError."""
    return parse_accounts(inline, file_text).hashes


def load_accounts(inline: str, file: str) -> Accounts:
    text = ""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"CONSOLE_USERS_FILE {file}: {exc.strerror}") from exc
    return parse_accounts(inline, text)


def load_users(inline: str, file: str) -> dict[str, str]:
    return load_accounts(inline, file).hashes


def check_login(users: dict[str, str], name: str, password: str) -> bool:
    stored = users.get(name)
    ok = verify_password(password, stored or _DUMMY)
    return ok and stored is not None


@dataclass(frozen=True)
class Session:
    user: str
    expires: int
    nonce: str
    csrf: str  # the token every form of this session carries


class Sessions:
    """Issues and checks session cookies and their CSRF tokens with one secret."""

    def __init__(self, secret: str, lifetime_seconds: float) -> None:
        self.key = (secret or secrets.token_urlsafe(32)).encode()
        self.lifetime = int(lifetime_seconds)

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, user: str, now: float) -> str:
        body = f"{user}|{int(now) + self.lifetime}|{secrets.token_hex(8)}"
        return f"{body}|{self._sign(body)}"

    def check(self, cookie: str | None, now: float) -> Session | None:
        """The session of a valid, unexpired cookie, else None."""
        if not cookie or cookie.count("|") != 3:
            return None
        user, expires, nonce, signature = cookie.split("|")
        if not hmac.compare_digest(self._sign(f"{user}|{expires}|{nonce}"), signature):
            return None
        try:
            if int(expires) < now:
                return None
        except ValueError:
            return None
        return Session(user, int(expires), nonce, self._sign(f"csrf|{cookie}"))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf, str(token))


class LoginThrottle:
    """At most `limit` failed logins per key (an operator name) in `window` seconds; then that key
    is refused until the window has passed. Memory: bounded by `max_keys`."""

    def __init__(self, limit: int = 5, window: float = 900.0, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.failures: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        kept = [at for at in self.failures.get(key, []) if now - at < self.window]
        if kept:
            self.failures[key] = kept
        else:
            self.failures.pop(key, None)
        return kept

    def blocked(self, keys: tuple[str, ...], now: float) -> bool:
        return any(len(self._recent(k, now)) >= self.limit for k in keys)

    def failed(self, keys: tuple[str, ...], now: float) -> None:
        if len(self.failures) >= self.max_keys:
            self.failures.clear()  # a flood of names: forget rather than grow
        for key in keys:
            self.failures.setdefault(key, []).append(now)

    def succeeded(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self.failures.pop(key, None)
