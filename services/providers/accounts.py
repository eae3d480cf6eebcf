"""Which account answers a customer: the tenant and account of its key, and one client per account.

A customer key names its tenant and channel account (`hotel-playa/reception/wati:5037…`; the short
form is the `default` tenant's `default` account, services/common/keys.py). The responder sends,
vision downloads media and the context service reads history through THAT account — its API URL and
its token — never through another tenant's (docs/tenants.md).

`account_of` is the pure part: the tenant's account of a key, `NoAccount` (a reason safe to log:
ids only) when the key's tenant or account is not configured — a tenant or account removed from
TENANTS_FILE while its customers' records were in flight. The `default` tenant's `default` account
without an account of that provider is not an error: it is today's "channel not configured"
(`None`), so a deployment configured by environment variables behaves exactly as before.

`AccountClients` is the thin shell: one client per (tenant, account, provider) for one purpose
(send / media / history), opened on first use through `Provider.open_client(…, account=)`, reused for
every later customer of that account and closed at stop. It holds at most one client per account of
the tenants file: keys of unknown tenants or accounts are refused before anything is opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.common import metrics
from services.common.config import ConfigError, Settings
from services.common.keys import DEFAULT_ACCOUNT, CustomerKey, KeyError_, parse_key
from services.common.logs import event, register_secret
from services.common.tenants import (
    ChannelAccount,
    Tenant,
    Tenants,
    account_providers,
    load_tenants,
    settings_environ,
)

from .base import AccountAccess, Client, Provider, Purpose

log = logging.getLogger(__name__)

def tenant_account_providers() -> frozenset[str]:
    """The providers whose accounts a tenant lists (`Provider.tenant_accounts`: the tenants file's
    `wati` / `manychat` sections); any other registered provider has one account, the settings',
    for the default tenant's default account."""
    return frozenset(p.name for p in account_providers())


class NoAccount(LookupError):
    """The key's tenant or account is not configured; `reason` names ids only (safe to log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AccountChoice:
    """A customer's tenant and its account on the key's provider.

    `account` None: the default tenant's default account has no account of that provider (not
    configured), or the provider is one tenants do not list accounts of (the settings' account)."""

    tenant: Tenant
    account: ChannelAccount | None
    key: CustomerKey


def account_of(tenants: Tenants, customer_key: str) -> AccountChoice:
    """The tenant and account a customer is served from; NoAccount when there is none to use."""
    try:
        key = parse_key(customer_key)
    except KeyError_:
        raise NoAccount("malformed customer key") from None
    tenant = tenants.get(key.tenant)
    if tenant is None:
        raise NoAccount(f"tenant {key.tenant!r} is not configured ({tenants.source})")
    if key.provider not in tenant_account_providers():
        if key.is_default:
            return AccountChoice(tenant, None, key)
        raise NoAccount(f"tenant {key.tenant!r}: {key.provider} has accounts only for the default tenant")
    account = tenant.account(key.provider, key.account)
    if account is None and not key.is_default:
        raise NoAccount(f"tenant {key.tenant!r} has no {key.provider} account {key.account!r} "
                        f"({tenants.source})")
    return AccountChoice(tenant, account, key)


def request_account_problem(tenants: Tenants, customer_key: str) -> str | None:
    """Why a customer cannot be answered from its own account (None: it can be, or its channel is
    simply not configured — the provider's `channel_not_configured`)."""
    try:
        account_of(tenants, customer_key)
    except NoAccount as exc:
        return exc.reason
    return None


class AccountClients:
    """One provider client per tenant account for `purpose`, opened on first use and reused.

    `environ`: where `env:` references are read (default: the process environment with the
    settings' values, as `settings_environ`); `read_file` reads `file:` references (tests)."""

    def __init__(
        self,
        settings: Settings,
        tenants: Tenants,
        purpose: Purpose,
        *,
        environ: Mapping[str, str] | None = None,
        read_file: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        self.tenants = tenants
        self.purpose = purpose
        self.environ = settings_environ(settings) if environ is None else dict(environ)
        self.read_file = read_file
        self._clients: dict[tuple[str, str, str], Client | None] = {}

    def __len__(self) -> int:
        """Clients opened so far (at most one per account of the tenants file)."""
        return len(self._clients)

    def client(self, provider: Provider, customer_key: str) -> Client | None:
        """The client of the customer's account (None: not configured); NoAccount when the key's
        tenant or account is not configured."""
        choice = account_of(self.tenants, customer_key)
        account_id = choice.account.id if choice.account is not None else DEFAULT_ACCOUNT
        slot = (choice.tenant.id, account_id, provider.name)
        if slot not in self._clients:
            self._clients[slot] = self._open(provider, choice)
        return self._clients[slot]

    def _open(self, provider: Provider, choice: AccountChoice) -> Client | None:
        if choice.account is None:
            if provider.tenant_accounts:
                return None  # the default tenant has no account of this provider: not configured
            return provider.open_client(self.settings, self.purpose)  # the settings' account
        try:
            token = choice.account.token.resolve(self.environ, self.read_file)
        except ValueError as exc:
            event(log, "account_token_missing", logging.WARNING, tenant=choice.tenant.id,
                  account=choice.account.id, provider=provider.name, error=str(exc))
            return None
        return provider.open_client(self.settings, self.purpose,
                                    AccountAccess(choice.account.api_url, token))

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            if client is not None:
                await client.aclose()


def account_token_problems(tenants: Tenants, environ: Mapping[str, str],
                           read_file: Callable[[str], str] | None = None, *,
                           openai_keys: bool = False) -> list[str]:
    """Every account token (and with `openai_keys` every tenant's own OpenAI key) of the tenants
    file that does not resolve: a service refuses to start on them. The default tenant built from
    the environment keeps today's behaviour instead (a channel without a token is "not configured")."""
    if tenants.source == "environment":
        return []
    fields = {f"{channel}[{a.id}].token" for t in tenants for channel in sorted(tenant_account_providers())
              for a in t.accounts(channel)}
    if openai_keys:
        fields.add("openai.api_key")
    return tenants.secret_problems(environ, read_file, only=fields)


def register_tenant_secrets(tenants: Tenants, environ: Mapping[str, str],
                            read_file: Callable[[str], str] | None = None) -> None:
    """Registers every tenant secret that resolves for log redaction (no token or key of any
    tenant ever reaches a log line)."""
    values = []
    for tenant in tenants:
        for _path, ref in tenant.secret_refs():
            try:
                values.append(ref.resolve(environ, read_file))
            except ValueError:
                continue
    register_secret(*values)


def load_served_tenants(
    settings: Settings, *, what: str, openai_keys: bool = False,
) -> tuple[Tenants, dict[str, str]]:
    """The tenants a service serves, with the environment their secrets resolve in: refuses to start
    (ConfigError naming tenant and field) when an account token — or, with `openai_keys`, a
    tenant's own OpenAI key — does not resolve; registers every secret for log redaction and bounds
    the metrics' tenant label to these tenants."""
    tenants = load_tenants(settings)
    environ = settings_environ(settings)
    problems = account_token_problems(tenants, environ, openai_keys=openai_keys)
    if problems:
        raise ConfigError(f"{what}:\n  " + "\n  ".join(problems))
    register_tenant_secrets(tenants, environ)
    metrics.bound_tenants(tenants.by_id)
    return tenants, environ


__all__ = [
    "AccountChoice",
    "AccountClients",
    "NoAccount",
    "account_of",
    "account_token_problems",
    "load_served_tenants",
    "register_tenant_secrets",
    "request_account_problem",
    "tenant_account_providers",
]
