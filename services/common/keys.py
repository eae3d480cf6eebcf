"""Customer keys: the Kafka key of every topic, so one customer's events share a partition.

`wati:<id>` where id is the waId (phone number) when WATI sends one, else the BSUID;
`manychat:<subscriber id>`. One customer must never get two keys: a WATI contact that has a
phone number is keyed by it even in BSUID-first payloads (which may also carry `waId`), and a
contact without one is keyed by its BSUID for as long as WATI omits the number.
"""

from __future__ import annotations

WATI = "wati"
MANYCHAT = "manychat"
#: key prefixes of the registered providers (services.providers adds each one it registers)
PROVIDER_PREFIXES: set[str] = {WATI, MANYCHAT}


class KeyError_(ValueError):
    """A customer key or provider id is malformed."""


def wati_key(wa_id: str | None, bsuid: str | None = None) -> str:
    ident = (wa_id or "").strip() or (bsuid or "").strip()
    if not ident:
        raise KeyError_("WATI payload has neither waId nor bsuid")
    return f"{WATI}:{ident}"


def manychat_key(subscriber_id: str) -> str:
    ident = str(subscriber_id).strip()
    if not ident:
        raise KeyError_("ManyChat payload has no subscriber id")
    return f"{MANYCHAT}:{ident}"


def split_key(customer_key: str) -> tuple[str, str]:
    """('wati', '5037...') from 'wati:5037...'."""
    provider, sep, ident = customer_key.partition(":")
    if not sep or provider not in PROVIDER_PREFIXES or not ident:
        raise KeyError_(f"not a customer key: {mask(customer_key)}")
    return provider, ident


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
