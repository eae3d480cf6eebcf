"""Customer keys: the Kafka key of every topic, so one customer's events share a partition.

Format (docs/tenants.md "Customer keys"):

    <provider>:<ident>                       the default tenant's default account (single-tenant keys)
    <tenant>/<account>/<provider>:<ident>    any other tenant or account

`provider` is the provider's key prefix (`wati`, `manychat`); `ident` is, for WATI, the waId (phone
number) when WATI sends one, else the BSUID, and for ManyChat the subscriber id. `tenant` and
`account` are slugs (`SLUG_PATTERN`): they hold no `/` or `:`, so the first `:` ends the head and the
ident may contain anything. The short form is the ONLY form of (`default`, `default`):
`default/default/wati:…` is rejected, so one customer never has two keys, and every key written
before tenants existed keeps its meaning — the same customer of the same account — with no rewrite
(tests/unit/test_keys.py).

One customer must never get two keys: a WATI contact that has a phone number is keyed by it even in
BSUID-first payloads (which may also carry `waId`), and a contact without one is keyed by its BSUID
for as long as WATI omits the number. The same phone number writing to two tenants (or two accounts
of one tenant) is two customers, with two keys: two conversations, two states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WATI = "wati"
MANYCHAT = "manychat"
#: key prefixes of the registered providers (services.providers adds each one it registers)
PROVIDER_PREFIXES: set[str] = {WATI, MANYCHAT}
DEFAULT_TENANT = "default"
DEFAULT_ACCOUNT = "default"
SLUG_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?"
"""Tenant and account ids: lowercase letters, digits and inner hyphens, 1-40 characters (URL-safe)."""
_SLUG = re.compile(SLUG_PATTERN)


class KeyError_(ValueError):
    """A customer key or provider id is malformed."""


@dataclass(frozen=True)
class CustomerKey:
    """A customer key's parts; `str()` is the key (the canonical form)."""

    tenant: str
    account: str
    provider: str  # the key prefix (`wati`, `manychat`); the records' `channel` is finer
    ident: str

    def __str__(self) -> str:
        return format_key(self.tenant, self.account, self.provider, self.ident)

    @property
    def is_default(self) -> bool:
        """The default tenant's default account: the single-tenant key form."""
        return self.tenant == DEFAULT_TENANT and self.account == DEFAULT_ACCOUNT


def format_key(tenant: str, account: str, provider: str, ident: str) -> str:
    """The customer key of `ident` at `provider` on the tenant's account (short form for the default)."""
    ident = str(ident).strip()
    if provider not in PROVIDER_PREFIXES:
        raise KeyError_(f"unknown provider {provider!r}")
    if not ident:
        raise KeyError_(f"{provider} customer key needs an id")
    for what, slug in (("tenant", tenant), ("account", account)):
        if not _SLUG.fullmatch(slug):
            raise KeyError_(f"{what} id {slug!r} is not a slug ({SLUG_PATTERN})")
    if tenant == DEFAULT_TENANT and account == DEFAULT_ACCOUNT:
        return f"{provider}:{ident}"
    return f"{tenant}/{account}/{provider}:{ident}"


def parse_key(customer_key: str) -> CustomerKey:
    """The parts of a customer key of either form; KeyError_ (the key masked) if malformed."""
    head, sep, ident = customer_key.partition(":")
    parts = head.split("/")
    if len(parts) == 1:
        tenant, account, provider = DEFAULT_TENANT, DEFAULT_ACCOUNT, parts[0]
    elif len(parts) == 3:
        tenant, account, provider = parts
    else:
        raise KeyError_(f"not a customer key: {mask(customer_key)}")
    if (not sep or provider not in PROVIDER_PREFIXES or not ident or ident != ident.strip()
            or not _SLUG.fullmatch(tenant) or not _SLUG.fullmatch(account)):
        raise KeyError_(f"not a customer key: {mask(customer_key)}")
    if len(parts) == 3 and tenant == DEFAULT_TENANT and account == DEFAULT_ACCOUNT:
        raise KeyError_(f"not a canonical customer key (the default account is written "
                        f"{provider}:…): {mask(customer_key)}")
    return CustomerKey(tenant, account, provider, ident)


def wati_key(
    wa_id: str | None, bsuid: str | None = None, *,
    tenant: str = DEFAULT_TENANT, account: str = DEFAULT_ACCOUNT,
) -> str:
    ident = (wa_id or "").strip() or (bsuid or "").strip()
    if not ident:
        raise KeyError_("WATI payload has neither waId nor bsuid")
    return format_key(tenant, account, WATI, ident)


def manychat_key(
    subscriber_id: str, *, tenant: str = DEFAULT_TENANT, account: str = DEFAULT_ACCOUNT
) -> str:
    ident = str(subscriber_id).strip()
    if not ident:
        raise KeyError_("ManyChat payload has no subscriber id")
    return format_key(tenant, account, MANYCHAT, ident)


def in_account(customer_key: str, tenant: str, account: str) -> str:
    """The key a normaliser's single-tenant key (`wati:<id>`) has on the tenant's account.

    The normalisers know nothing of tenants; ingest's route does, and scopes their key with this.
    """
    key = parse_key(customer_key)
    if not key.is_default:
        raise KeyError_(f"already scoped to a tenant: {mask(customer_key)}")
    return format_key(tenant, account, key.provider, key.ident)


def split_key(customer_key: str) -> tuple[str, str]:
    """('wati', '5037...') from 'wati:5037...' or 'acme/main/wati:5037...' (provider and ident)."""
    key = parse_key(customer_key)
    return key.provider, key.ident


def mask(value: str | None) -> str:
    """Masks a phone number, BSUID or id for logs: keeps the provider and the last 3 characters."""
    if not value:
        return "-"
    prefix, sep, ident = value.rpartition(":")
    keep = ident[-3:] if len(ident) > 4 else ""
    return f"{prefix}{sep}{'*' * max(3, len(ident) - len(keep))}{keep}"


def record_key_problem(kafka_key: bytes | None, customer_key: object) -> tuple[str, str] | None:
    """(dead-letter reason, error) when a record's Kafka key is not its customer key, else None.

    Every topic is keyed by customer: a record under no key or another key sits on a partition where
    it is handled out of order with (and possibly concurrently to) that customer's other records.
    """
    if not kafka_key:
        return "missing_key", "record has no Kafka key"
    if bytes(kafka_key).decode("utf-8", errors="replace") != customer_key:
        return "key_mismatch", "Kafka key differs from the record's customer_key"
    return None
