"""Tenants: the businesses one deployment serves, each with its own accounts, prompt and thresholds.

A tenant is one business: its WATI account(s) and/or ManyChat page(s) — in general its accounts of
each registered provider whose `tenant_accounts` is set, in the file's section named after the
provider (services/providers, docs/providers.md) — its system prompt file, its
thresholds (with per-customer-group overrides, as `CUSTOMER_OVERRIDES` / `GapPolicy`), its OpenAI
model (optionally its own key and project) and the secret its webhooks must present.

Tenants come from the JSON file named by `TENANTS_FILE` (format: docs/tenants.md). Without it, ONE
tenant, `default`, is built from the existing environment variables: the zero-change default. A tenant
named `default` with an account named `default` keeps the single-tenant customer keys (`wati:<waId>`,
services/common/keys.py), so an existing deployment's state stays valid when it moves to a file.

Secrets are never written in the file: a secret field holds a reference, `env:NAME` (an environment
variable) or `file:/absolute/path` (e.g. a Docker/Kubernetes secret). Parsing is pure and checks the
shape of everything; `secret_problems` then resolves every reference (reads the environment and the
files) so a missing variable or unreadable file is reported at start, naming tenant and field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from services.common.config import ConfigError, GapPolicy, Settings
from services.common.keys import DEFAULT_ACCOUNT, DEFAULT_TENANT, SLUG_PATTERN, parse_key
from services.common.metrics import OTHER_TENANT

SLUG = re.compile(SLUG_PATTERN)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_FORMS = "a reference: env:NAME or file:/absolute/path"  # noqa: S105 - a hint, no secret

THRESHOLD_FIELDS = (
    "quiet_window_seconds",
    "max_batch_wait_seconds",
    "missed_gap_seconds",
    "human_hold_seconds",
    "missed_lookback_seconds",
)
"""Threshold fields a tenant may set; each omitted one takes the deployment's setting of that name."""
OVERRIDE_FIELDS = ("missed_gap_seconds", "human_hold_seconds")
"""What a customer-group or customer override may set (GapPolicy)."""
ZERO_ALLOWED = frozenset({"missed_gap_seconds", "human_hold_seconds"})  # 0 = check always / hold off


@dataclass(frozen=True)
class SecretRef:
    """Where a secret is read from: `env:NAME` or `file:/path`; `str()` shows the reference only."""

    kind: str  # "env" | "file"
    target: str  # variable name or absolute path

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    @classmethod
    def parse(cls, raw: object) -> SecretRef:
        """The reference in `raw`; ValueError (saying why, never echoing the value) otherwise."""
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"must be {SECRET_FORMS}")
        kind, sep, target = raw.strip().partition(":")
        if sep and kind == "env":
            if not ENV_NAME.fullmatch(target):
                raise ValueError(f"env reference needs a variable name (env:ACME_TOKEN); {SECRET_FORMS}")
            return cls("env", target)
        if sep and kind == "file":
            if not target.startswith("/"):
                raise ValueError(f"file reference needs an absolute path (file:/run/x); {SECRET_FORMS}")
            return cls("file", target)
        raise ValueError(f"inline secrets are not allowed: write {SECRET_FORMS}")

    def resolve(self, environ: Mapping[str, str], read_file: Callable[[str], str] | None = None) -> str:
        """The secret's value (a file's trailing newline removed); ValueError if absent or empty."""
        if self.kind == "env":
            value = environ.get(self.target, "")
            if not value:
                raise ValueError(f"{self} is not set or empty")
            return value
        reader = read_file or _read_text
        try:
            value = reader(self.target).rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{self} cannot be read: {exc.strerror or type(exc).__name__}") from exc
        if not value:
            raise ValueError(f"{self} is empty")
        return value


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def account_providers() -> list[Any]:
    """The registered providers a tenant lists accounts of (`Provider.tenant_accounts`), in
    registration order; each one's section of a tenant entry is named after it.

    Looked up when asked, not imported with this module: the providers import this module."""
    from services import providers

    return [p for p in providers.providers() if p.tenant_accounts]


@dataclass(frozen=True)
class ChannelAccount:
    """One account of a tenant on a provider (a WATI account, a ManyChat page); `id` is the account
    part of customer keys."""

    id: str
    api_url: str
    token: SecretRef


@dataclass(frozen=True)
class OpenAIChoice:
    """The tenant's model; its own key (a reference) and project, or None for the deployment's."""

    model: str
    api_key: SecretRef | None = None
    project: str | None = None


@dataclass(frozen=True)
class Thresholds:
    """The tenant's batching/history/hold thresholds; `policy` carries gap, hold and overrides."""

    quiet_window_seconds: float
    max_batch_wait_seconds: float
    missed_lookback_seconds: float
    policy: GapPolicy

    @property
    def missed_gap_seconds(self) -> float:
        return self.policy.default_gap_seconds

    @property
    def human_hold_seconds(self) -> float:
        return self.policy.default_hold_seconds


@dataclass(frozen=True)
class Tenant:
    """One business. `channel_accounts`: its accounts on each provider (by provider name; a provider
    it has none of is absent)."""

    id: str
    channel_accounts: Mapping[str, tuple[ChannelAccount, ...]] = field(hash=False)
    system_prompt_file: str
    webhook_secret: SecretRef
    openai: OpenAIChoice
    thresholds: Thresholds

    def accounts(self, channel: str) -> tuple[ChannelAccount, ...]:
        """Its accounts on the provider named `channel` (possibly none)."""
        return self.channel_accounts.get(channel, ())

    def account(self, channel: str, account_id: str | None = None) -> ChannelAccount | None:
        """The named account, or with no name the tenant's only (or `default`) account of the channel."""
        accounts = self.accounts(channel)
        if account_id is not None:
            return next((a for a in accounts if a.id == account_id), None)
        if len(accounts) == 1:
            return accounts[0]
        return next((a for a in accounts if a.id == DEFAULT_ACCOUNT), None)

    def secret_refs(self) -> list[tuple[str, SecretRef]]:
        """(field path, reference) of every secret of the tenant, for checks."""
        refs = [("webhook_secret", self.webhook_secret)]
        for channel, accounts in self.channel_accounts.items():
            refs += [(f"{channel}[{a.id}].token", a.token) for a in accounts]
        if self.openai.api_key is not None:
            refs.append(("openai.api_key", self.openai.api_key))
        return refs


@dataclass(frozen=True)
class Tenants:
    """Every tenant of the deployment, by id; `source` names where they came from (for messages)."""

    by_id: Mapping[str, Tenant]
    source: str = "environment"

    def __iter__(self) -> Iterator[Tenant]:
        return iter(self.by_id.values())

    def get(self, tenant_id: str) -> Tenant | None:
        return self.by_id.get(tenant_id)

    @property
    def default(self) -> Tenant | None:
        """The tenant the single-tenant routes and keys mean (the one named `default`), if any."""
        return self.by_id.get(DEFAULT_TENANT)

    def for_key(self, customer_key: str) -> Tenant | None:
        """The tenant a customer key belongs to (None: no such tenant); KeyError_ if malformed."""
        return self.by_id.get(parse_key(customer_key).tenant)

    def secret_problems(
        self, environ: Mapping[str, str], read_file: Callable[[str], str] | None = None,
        only: Collection[str] | None = None,
    ) -> list[str]:
        """Every reference that does not resolve, and webhook secrets two tenants share, as messages.

        Two tenants with one webhook secret could post into each other's routes: isolation needs
        each tenant's own. `only`: the field paths to check (e.g. ingest needs `webhook_secret`).
        """
        problems: list[str] = []
        secrets_seen: dict[str, str] = {}
        for tenant in self.by_id.values():
            for path, ref in tenant.secret_refs():
                if only is not None and path not in only:
                    continue
                try:
                    value = ref.resolve(environ, read_file)
                except ValueError as exc:
                    problems.append(f"{self.source}: tenant {tenant.id!r}: {path}: {exc}")
                    continue
                if path == "webhook_secret":
                    other = secrets_seen.setdefault(value, tenant.id)
                    if other != tenant.id:
                        problems.append(
                            f"{self.source}: tenant {tenant.id!r}: webhook_secret: same secret as "
                            f"tenant {other!r}; each tenant needs its own"
                        )
        return problems


# -- the zero-change default ------------------------------------------------------------------------

def settings_environ(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment with every setting's value as Settings read it (incl. `.env`), so `env:NAME`
    references of the default tenant resolve to exactly what the single-tenant code used."""
    env = dict(os.environ if environ is None else environ)
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("env") and value not in ("", None):
            env[f.metadata["env"]] = str(value)
    return env


def thresholds_from_settings(settings: Settings) -> Thresholds:
    return Thresholds(
        quiet_window_seconds=settings.quiet_window_seconds,
        max_batch_wait_seconds=settings.max_batch_wait_seconds,
        missed_lookback_seconds=settings.missed_lookback_seconds,
        policy=settings.gap_policy,
    )


def default_tenant(settings: Settings) -> Tenant:
    """The one tenant the environment variables describe (no TENANTS_FILE): today's behaviour."""
    accounts: dict[str, tuple[ChannelAccount, ...]] = {}
    for provider in account_providers():
        described = provider.settings_account(settings)
        if described is not None:
            url, token_env = described
            accounts[provider.name] = (ChannelAccount(DEFAULT_ACCOUNT, url, SecretRef("env", token_env)),)
    return Tenant(
        id=DEFAULT_TENANT,
        channel_accounts=accounts,
        system_prompt_file=settings.system_prompt_file,
        webhook_secret=SecretRef("env", "WEBHOOK_TOKEN"),
        openai=OpenAIChoice(settings.openai_model),
        thresholds=thresholds_from_settings(settings),
    )


def load_tenants(settings: Settings) -> Tenants:
    """The deployment's tenants: TENANTS_FILE's, else the default tenant. ConfigError lists problems."""
    path = settings.tenants_file.strip()
    if not path:
        return Tenants({DEFAULT_TENANT: default_tenant(settings)})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"TENANTS_FILE {path}: cannot be read: {exc.strerror or exc}") from exc
    return parse_tenants_json(text, settings, source=f"TENANTS_FILE {path}")


def serves_tenant_accounts(settings: Settings) -> bool:
    """Whether a tenant's account of a channel is served because its tenants-file entry lists it
    (with TENANTS_FILE), rather than because the settings enable the channel (without: unchanged)."""
    return bool(settings.tenants_file.strip())


def served_channels(settings: Settings, tenants: Tenants) -> tuple[str, ...]:
    """The channels the deployment serves. Without TENANTS_FILE, the settings' (CHANNELS, or each
    channel whose API token is set: unchanged); with one, each tenant's channels are those its entry
    lists accounts of, and the deployment serves every channel some tenant lists — the deployment's
    WATI_* / MANYCHAT_* settings and CHANNELS are then not needed."""
    if not serves_tenant_accounts(settings):
        return settings.enabled_channels
    return tuple(p.name for p in account_providers() if any(t.accounts(p.name) for t in tenants))


def channel_problems(settings: Settings, tenants: Tenants) -> list[str]:
    """Why the deployment's channels cannot be served as configured, one line each (empty: fine).

    Without TENANTS_FILE: the settings' rule (a channel enabled needs its settings; one at least).
    With one: CHANNELS, if set, must name every channel a tenant lists accounts of — a tenant's
    account is never silently left unserved."""
    if not serves_tenant_accounts(settings):
        try:
            settings.require_channels()
        except ConfigError as exc:
            return [str(exc)]
        return []
    problems: list[str] = []
    if settings.channels.strip():
        allowed = settings.enabled_channels
        for tenant in tenants:
            for channel in (p.name for p in account_providers()):
                if tenant.accounts(channel) and channel not in allowed:
                    problems.append(
                        f"{tenants.source}: tenant {tenant.id!r}: {channel}: has accounts, but "
                        f"CHANNELS={settings.channels} leaves {channel} out (with a tenants file the "
                        f"tenants' entries decide: unset CHANNELS, or remove the accounts)")
    if not served_channels(settings, tenants):
        problems.append(f"{tenants.source}: no tenant has a channel account")
    return problems


def require_served_channels(settings: Settings, tenants: Tenants) -> tuple[str, ...]:
    """The served channels (`served_channels`); ConfigError naming every `channel_problems` line."""
    problems = channel_problems(settings, tenants)
    if problems:
        raise ConfigError("; ".join(problems))
    return served_channels(settings, tenants)


def tenant_problems(
    settings: Settings, environ: Mapping[str, str] | None = None,
    read_file: Callable[[str], str] | None = None,
) -> list[str]:
    """Everything wrong with the deployment's tenants, one line each (empty: all good), for
    `watistream check` and the services' start: the file (shape and values), every secret reference,
    and each tenant's system-prompt file (readable, not empty)."""
    try:
        tenants = load_tenants(settings)
    except ConfigError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:]] or [str(exc)]
    problems = tenants.secret_problems(settings_environ(settings, environ), read_file)
    if serves_tenant_accounts(settings):  # without a file the settings' check says it ("channels")
        problems += channel_problems(settings, tenants)
    reader = read_file or _read_text
    for tenant in tenants.by_id.values():
        if not tenant.system_prompt_file:
            continue
        try:
            empty = not reader(tenant.system_prompt_file).strip()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            problems.append(f"{tenants.source}: tenant {tenant.id!r}: system_prompt_file: "
                            f"{tenant.system_prompt_file} cannot be read: {reason}")
            continue
        if empty:
            problems.append(f"{tenants.source}: tenant {tenant.id!r}: system_prompt_file: "
                            f"{tenant.system_prompt_file} is empty")
    return problems


# -- the file ---------------------------------------------------------------------------------------

TOP_FIELDS = frozenset({"tenants"})
#: a tenant's fields besides its accounts' sections (one per provider: `tenant_fields`)
TENANT_FIELDS = frozenset({
    "id", "system_prompt_file", "webhook_secret", "openai", "thresholds", "customer_overrides",
})
ACCOUNT_FIELDS = frozenset({"id", "api_url", "token"})
OPENAI_FIELDS = frozenset({"model", "api_key", "project"})


class _Problems:
    """Collects every problem of the file, each naming its tenant and field, then raises them at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{self.source}: {where}: {message}")

    def unknown(self, where: str, doc: Mapping[str, Any], allowed: frozenset[str]) -> None:
        for name in sorted(set(doc) - allowed):
            self.add(where, f"unknown field {name!r} (allowed: {', '.join(sorted(allowed))})")

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError("invalid tenants configuration:\n  " + "\n  ".join(self.messages))


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate field {key!r}")
        doc[key] = value
    return doc


def parse_tenants_json(text: str, settings: Settings, source: str = "tenants file") -> Tenants:
    """Parses the file's text (JSON; a field written twice is an error, not a silent overwrite)."""
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return parse_tenants(doc, settings, source)


def parse_tenants(doc: object, settings: Settings, source: str = "tenants file") -> Tenants:
    """The tenants of a decoded file; omitted thresholds/model take the deployment's settings."""
    problems = _Problems(source)
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: must be a JSON object with a 'tenants' list")
    problems.unknown("top level", doc, TOP_FIELDS)
    raw_tenants = doc.get("tenants")
    if not isinstance(raw_tenants, list) or not raw_tenants:
        problems.add("tenants", "must be a non-empty list of tenants")
        problems.raise_if_any()
        raise AssertionError("unreachable")
    tenants: dict[str, Tenant] = {}
    urls: dict[tuple[str, str], str] = {}
    for index, raw in enumerate(raw_tenants):
        tenant = _parse_tenant(raw, index, settings, problems)
        if tenant is None:
            continue
        if tenant.id in tenants:
            problems.add(f"tenant {tenant.id!r}", "id used by another tenant")
            continue
        tenants[tenant.id] = tenant
        for provider in account_providers():
            if provider.shared_api_url:
                continue  # one API URL serves every account (ManyChat's pages); the token tells them apart
            channel = provider.name
            for account in tenant.accounts(channel):
                owner = urls.setdefault((channel, account.api_url.rstrip("/")), f"{tenant.id}/{account.id}")
                if owner != f"{tenant.id}/{account.id}":
                    problems.add(
                        f"tenant {tenant.id!r}: {channel}[{account.id}].api_url",
                        f"same {provider.title} account as {owner} (an account belongs to one tenant)",
                    )
    problems.raise_if_any()
    return Tenants(tenants, source)


def _parse_tenant(raw: object, index: int, settings: Settings, problems: _Problems) -> Tenant | None:
    if not isinstance(raw, dict):
        problems.add(f"tenants[{index}]", "must be an object")
        return None
    tenant_id = raw.get("id")
    if not isinstance(tenant_id, str) or not SLUG.fullmatch(tenant_id):
        problems.add(f"tenants[{index}].id", f"must be a slug matching {SLUG_PATTERN} (got {tenant_id!r})")
        return None
    if tenant_id == OTHER_TENANT:
        problems.add(f"tenants[{index}].id", f"{OTHER_TENANT!r} is reserved: it is the metrics' label of "
                                             "every unknown tenant")
        return None
    where = f"tenant {tenant_id!r}"
    before = len(problems.messages)
    sections = account_providers()
    problems.unknown(where, raw, TENANT_FIELDS | {p.name for p in sections})

    accounts_from = len(problems.messages)
    accounts: dict[str, tuple[ChannelAccount, ...]] = {}
    for provider in sections:
        parsed = _parse_accounts(raw.get(provider.name), provider.name, where, problems,
                                 provider.default_api_url(settings))
        if parsed:
            accounts[provider.name] = parsed
    if not accounts and len(problems.messages) == accounts_from:
        problems.add(where, "needs at least one channel account: "
                     + " and/or ".join(repr(p.name) for p in sections))

    prompt = raw.get("system_prompt_file", "")
    if not isinstance(prompt, str):
        problems.add(f"{where}: system_prompt_file", "must be a path (string)")
        prompt = ""

    secret = _secret(raw.get("webhook_secret"), f"{where}: webhook_secret", problems)
    openai = _parse_openai(raw.get("openai", {}), settings, where, problems)
    thresholds = _parse_thresholds(raw, tenant_id, settings, where, problems)
    if len(problems.messages) > before or secret is None or openai is None or thresholds is None:
        return None
    return Tenant(tenant_id, accounts, prompt, secret, openai, thresholds)


def _secret(raw: object, where: str, problems: _Problems) -> SecretRef | None:
    try:
        return SecretRef.parse(raw)
    except ValueError as exc:
        problems.add(where, str(exc) if raw is not None else f"missing; must be {SECRET_FORMS}")
        return None


def _http_url(raw: object) -> bool:
    if not isinstance(raw, str):
        return False
    parts = urlsplit(raw)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _parse_accounts(
    raw: object, channel: str, where: str, problems: _Problems, default_url: str | None = None
) -> tuple[ChannelAccount, ...]:
    if raw is None:
        return ()
    if isinstance(raw, dict):
        raw = [raw]  # one account may be written without the list
    if not isinstance(raw, list):
        problems.add(f"{where}: {channel}", "must be an account object or a list of them")
        return ()
    accounts: list[ChannelAccount] = []
    for index, item in enumerate(raw):
        at = f"{where}: {channel}[{index}]"
        if not isinstance(item, dict):
            problems.add(at, "must be an object")
            continue
        problems.unknown(at, item, ACCOUNT_FIELDS)
        account_id = item.get("id", DEFAULT_ACCOUNT if len(raw) == 1 else None)
        if not isinstance(account_id, str) or not SLUG.fullmatch(account_id):
            problems.add(f"{at}.id", f"must be a slug matching {SLUG_PATTERN} (required when the tenant "
                                     f"has several {channel} accounts; got {account_id!r})")
            continue
        at = f"{where}: {channel}[{account_id}]"
        if any(a.id == account_id for a in accounts):
            problems.add(f"{at}.id", "used by another account of this tenant")
            continue
        url = item.get("api_url", default_url)
        if not _http_url(url):
            problems.add(f"{at}.api_url", f"must be an http(s) URL (got {url!r})")
            continue
        token = _secret(item.get("token"), f"{at}.token", problems)
        if token is not None:
            accounts.append(ChannelAccount(account_id, str(url), token))
    return tuple(accounts)


def _parse_openai(raw: object, settings: Settings, where: str, problems: _Problems) -> OpenAIChoice | None:
    if not isinstance(raw, dict):
        problems.add(f"{where}: openai", "must be an object")
        return None
    problems.unknown(f"{where}: openai", raw, OPENAI_FIELDS)
    model = raw.get("model", settings.openai_model)
    if not isinstance(model, str) or not model.strip():
        problems.add(f"{where}: openai.model", "must be a model name")
        return None
    key = None
    if "api_key" in raw:
        key = _secret(raw["api_key"], f"{where}: openai.api_key", problems)
        if key is None:
            return None
    project = raw.get("project")
    if project is not None and (not isinstance(project, str) or not project.strip()):
        problems.add(f"{where}: openai.project", "must be a project id (string)")
        return None
    return OpenAIChoice(model.strip(), key, project)


def _parse_thresholds(
    raw: Mapping[str, Any], tenant_id: str, settings: Settings, where: str, problems: _Problems
) -> Thresholds | None:
    given = raw.get("thresholds", {})
    if not isinstance(given, dict):
        problems.add(f"{where}: thresholds", "must be an object")
        return None
    problems.unknown(f"{where}: thresholds", given, frozenset(THRESHOLD_FIELDS))
    values: dict[str, float] = {}
    ok = True
    for name in THRESHOLD_FIELDS:
        value = given.get(name, getattr(settings, name))
        low_ok = (lambda v: v >= 0) if name in ZERO_ALLOWED else (lambda v: v > 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low_ok(value):
            bound = ">= 0" if name in ZERO_ALLOWED else "> 0"
            problems.add(f"{where}: thresholds.{name}", f"must be a number {bound} (seconds), got {value!r}")
            ok = False
            continue
        values[name] = float(value)
    overrides = raw.get("customer_overrides", {})
    if not isinstance(overrides, dict):
        problems.add(f"{where}: customer_overrides", "must be an object with 'groups' and/or 'customers'")
        return None
    if not ok:
        return None
    try:
        policy = GapPolicy.parse(
            json.dumps(overrides), values["missed_gap_seconds"], values["human_hold_seconds"]
        )
    except (ConfigError, TypeError, ValueError) as exc:
        problems.add(f"{where}: customer_overrides", str(exc).removeprefix("CUSTOMER_OVERRIDES: "))
        return None
    for where_in, entries in (("groups", policy.groups), ("customers", policy.customers)):
        for name, entry in entries.items():
            for field_name, value in entry.items():
                if where_in == "customers" and field_name == "group":
                    continue
                if field_name not in OVERRIDE_FIELDS:
                    problems.add(f"{where}: customer_overrides.{where_in}",
                                 f"unknown field {field_name!r} (allowed: {', '.join(OVERRIDE_FIELDS)})")
                elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    shown = name if where_in == "groups" else name.split(":", 1)[0] + ":…"
                    problems.add(f"{where}: customer_overrides.{where_in}",
                                 f"{shown}: {field_name} must be a number >= 0 (seconds), got {value!r}")
    for key in policy.customers:
        try:
            owner = parse_key(key).tenant
        except ValueError as exc:
            problems.add(f"{where}: customer_overrides.customers", str(exc))
            continue
        if owner != tenant_id:
            problems.add(f"{where}: customer_overrides.customers",
                         f"{key.split(':', 1)[0]}:… belongs to tenant {owner!r}, not this one")
    return Thresholds(values["quiet_window_seconds"], values["max_batch_wait_seconds"],
                      values["missed_lookback_seconds"], policy)


__all__ = [
    "ChannelAccount", "OpenAIChoice", "SecretRef", "Tenant", "Tenants", "Thresholds",
    "default_tenant", "load_tenants", "parse_tenants", "parse_tenants_json", "settings_environ",
    "tenant_problems", "thresholds_from_settings",
]
