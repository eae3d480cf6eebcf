"""All configuration, from environment variables (a `.env` file is read if present).

Every setting has a documented default here and in the README's configuration table (both generated
from `Settings.documented()`); the env names are fixed because operators' scripts rely on them.

What "cannot surprise" means here, and how:
- `.env` is parsed like docker compose parses it, by python-dotenv's parser (a kept library):
  quotes, inline ` #` comments, `export ` prefixes, escapes in double quotes; `${VAR}` is expanded
  in unquoted and double-quoted values and NOT in single-quoted ones, exactly as compose does
  (python-dotenv alone would expand inside single quotes too, so the expansion is applied here).
  A line neither can parse is an error naming its line number, not a silently dropped setting.
- Every value is typed and range-checked when a `Settings` is built (also by tests and
  `dataclasses.replace`): ports 1-65535 (`*_PORT`), durations >= 0 (`*_SECONDS`), URLs parsed
  (`*_URL`: http(s) with a host), and per field `ge`/`gt`/`choices`. Errors name the env variable.
- Every secret (`*_TOKEN`, `*_KEY`, `*_PASSWORD`) can instead come from a file, `NAME_FILE=/path`
  (Docker / Kubernetes secrets); setting both is an error. A `Bearer ` pasted in front of the WATI
  token (WATI's API page shows it that way) is dropped.

Why not pydantic-settings' BaseSettings: `Settings` is a frozen dataclass that dozens of call sites
(services, tests, bench) build directly and copy with `dataclasses.replace`, and that other modules
enumerate with `dataclasses.fields` (env names in field metadata). A BaseSettings model would change
all of them; its secret files are a directory of files named after fields rather than the
`NAME_FILE` convention of Docker images; and its errors name Python fields where an operator set env
variables. The parts a library does better (the `.env` grammar) come from python-dotenv, which
pydantic-settings itself uses for the same job; the checks are a few lines over plain metadata.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv.parser import parse_stream
from dotenv.variables import parse_variables

#: `=1` does what `--skip-checks` does, for process managers that start the services (`watistream dev`).
SKIP_CHECKS_ENV = "WATISTREAM_SKIP_CHECKS"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


_SINGLE_QUOTED = re.compile(r"^\s*(?:export\s+)?[^=]*=\s*'")


def parse_dotenv(text: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `KEY=VALUE` pairs of a `.env` text, as docker compose reads them (see the module doc).

    `${VAR}` / `${VAR:-default}` resolve against earlier lines, then `environ` (the process's).
    A bare `KEY` line (compose: "take it from the shell") is skipped here: the process's own
    environment is read anyway.
    """
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            line = binding.original.string.strip()
            raise ConfigError(f".env line {binding.original.line} cannot be parsed: {line[:60]!r}")
        if binding.key is None or binding.value is None:
            continue
        value = binding.value
        if not _SINGLE_QUOTED.match(binding.original.string):
            scope = {**env, **values}
            value = "".join(atom.resolve(dict(scope)) or "" for atom in parse_variables(value))
        values[binding.key] = value
    return values


def read_dotenv(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`parse_dotenv` of a file; an absent file is empty."""
    if not path.is_file():
        return {}
    return parse_dotenv(path.read_text(encoding="utf-8"), environ)


def is_secret_name(name: str) -> bool:
    """Tokens, API keys and passwords: no default, never logged, also readable from `NAME_FILE`."""
    return name.endswith(("_TOKEN", "_KEY", "_PASSWORD"))


@dataclass(frozen=True)
class GapPolicy:
    """Per-customer thresholds: a customer's own entry wins over its group's, then the default.

    Configured by `CUSTOMER_OVERRIDES` as JSON, e.g.
    `{"groups": {"vip": {"missed_gap_seconds": 60, "human_hold_seconds": 300}},
      "customers": {"wati:50370000000": "vip", "wati:50371111111": {"missed_gap_seconds": 30}}}`.
    """

    default_gap_seconds: float
    default_hold_seconds: float
    groups: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    customers: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def _value(self, customer_key: str, name: str, default: float) -> float:
        own = self.customers.get(customer_key, {})
        if name in own:
            return float(own[name])
        group = self.groups.get(str(own.get("group", "")), {})
        return float(group.get(name, default))

    def gap_seconds(self, customer_key: str) -> float:
        return self._value(customer_key, "missed_gap_seconds", self.default_gap_seconds)

    def hold_seconds(self, customer_key: str) -> float:
        return self._value(customer_key, "human_hold_seconds", self.default_hold_seconds)

    @classmethod
    def parse(cls, raw: str, default_gap: float, default_hold: float) -> GapPolicy:
        if not raw.strip():
            return cls(default_gap, default_hold)
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"CUSTOMER_OVERRIDES is not valid JSON: {exc.msg}") from exc
        if not isinstance(doc, dict):
            raise ConfigError("CUSTOMER_OVERRIDES must be a JSON object")
        groups = {str(k): dict(v) for k, v in dict(doc.get("groups", {})).items()}
        customers: dict[str, dict[str, Any]] = {}
        for key, value in dict(doc.get("customers", {})).items():
            if isinstance(value, str):
                if value not in groups:
                    raise ConfigError(f"CUSTOMER_OVERRIDES: {key} names unknown group {value!r}")
                customers[str(key)] = {"group": value}
            elif isinstance(value, dict):
                customers[str(key)] = dict(value)
            else:
                raise ConfigError(f"CUSTOMER_OVERRIDES: entry for {key} must be a group or object")
        return cls(default_gap, default_hold, groups, customers)


def _env_field(
    default: Any, env: str, doc: str, *, ge: float | None = None, gt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """One setting: its default, env name, one-line meaning, and the checks beyond its name's rule."""
    return field(default=default, metadata={"env": env, "doc": doc, "ge": ge, "gt": gt, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """The process's settings. Build with `Settings.from_env()`; tests pass overrides."""

    kafka_bootstrap_servers: str = _env_field(
        "", "KAFKA_BOOTSTRAP_SERVERS", "Kafka bootstrap servers; empty = embedded broker (dev/demo)"
    )
    topic_prefix: str = _env_field("watistream.", "TOPIC_PREFIX", "prefix of every topic name")
    topic_partitions: int = _env_field(
        8, "TOPIC_PARTITIONS", "partitions of every co-partitioned topic", ge=1
    )
    topic_replication: int = _env_field(1, "TOPIC_REPLICATION", "replication factor of topics", ge=1)
    ingest_host: str = _env_field("127.0.0.1", "INGEST_HOST", "bind address of the webhook service")
    ingest_port: int = _env_field(8080, "INGEST_PORT", "port of the webhook service")
    webhook_token: str = _env_field("", "WEBHOOK_TOKEN", "shared secret the webhooks must present")
    max_body_bytes: int = _env_field(256 * 1024, "MAX_BODY_BYTES", "largest webhook body accepted", ge=1)
    produce_timeout_seconds: float = _env_field(
        5.0, "PRODUCE_TIMEOUT_SECONDS", "ingest answers 503 when the broker has not acked by then", gt=0
    )
    wati_api_url: str = _env_field("", "WATI_API_URL", "WATI API base incl. tenant id")
    wati_api_token: str = _env_field(
        "", "WATI_API_TOKEN", "WATI Bearer token (a leading `Bearer ` is dropped)"
    )
    manychat_api_url: str = _env_field(
        "https://api.manychat.com", "MANYCHAT_API_URL", "ManyChat API base"
    )
    manychat_api_token: str = _env_field("", "MANYCHAT_API_TOKEN", "ManyChat page API key")
    openai_api_key: str = _env_field("", "OPENAI_API_KEY", "OpenAI API key")
    openai_base_url: str = _env_field(
        "https://api.openai.com/v1", "OPENAI_BASE_URL", "OpenAI API base URL"
    )
    openai_model: str = _env_field("gpt-4.1-mini", "OPENAI_MODEL", "model for replies")
    vision_model: str = _env_field("", "VISION_MODEL", "model for image classification (= OPENAI_MODEL)")
    openai_timeout_seconds: float = _env_field(60.0, "OPENAI_TIMEOUT_SECONDS", "per OpenAI call", gt=0)
    openai_max_attempts: int = _env_field(5, "OPENAI_MAX_ATTEMPTS", "tries per OpenAI call", ge=1)
    openai_max_output_tokens: int = _env_field(
        1000, "OPENAI_MAX_OUTPUT_TOKENS", "cap on a reply's tokens (counts against rate limits); 0 = none",
        ge=0,
    )
    quiet_window_seconds: float = _env_field(
        30.0, "QUIET_WINDOW_SECONDS", "a burst ends after this much customer silence"
    )
    max_batch_wait_seconds: float = _env_field(
        120.0, "MAX_BATCH_WAIT_SECONDS", "a batch is flushed at the latest this long after it opened"
    )
    flush_scan_interval_seconds: float = _env_field(
        0.2, "FLUSH_SCAN_INTERVAL_SECONDS",
        "longest sleep of the context worker's flush loop (a batch is flushed at its due time; "
        "this bounds the look-again while recovering)", gt=0,
    )
    missed_gap_seconds: float = _env_field(
        300.0, "MISSED_GAP_SECONDS", "customer silence that triggers the history check"
    )
    missed_lookback_seconds: float = _env_field(
        86400.0, "MISSED_LOOKBACK_SECONDS", "history window when the bot never replied"
    )
    missed_max_items: int = _env_field(
        200, "MISSED_MAX_ITEMS", "cap on injected items; the OLDEST are dropped and the block says so", ge=1,
    )
    history_max_pages: int = _env_field(10, "HISTORY_MAX_PAGES", "getMessages pages per fetch", ge=1)
    history_timeout_seconds: float = _env_field(
        20.0, "HISTORY_TIMEOUT_SECONDS", "a history fetch gives up after this (answer without it)", gt=0
    )
    human_hold_seconds: float = _env_field(
        900.0, "HUMAN_HOLD_SECONDS", "bot stays silent this long after a human agent wrote; 0 = off"
    )
    customer_overrides: str = _env_field(
        "", "CUSTOMER_OVERRIDES", "JSON: per-customer / per-group gap and hold thresholds"
    )
    reconcile_interval_seconds: float = _env_field(
        0.0, "RECONCILE_INTERVAL_SECONDS", "history reconciliation sweep period; 0 = off"
    )
    reconcile_window_seconds: float = _env_field(
        3600.0, "RECONCILE_WINDOW_SECONDS", "sweep customers active within this window"
    )
    reconcile_rate_per_second: float = _env_field(
        2.0, "RECONCILE_RATE_PER_SECOND", "getMessages calls per second the sweep may spend per WATI account",
        ge=0,
    )
    context_web_host: str = _env_field("127.0.0.1", "CONTEXT_WEB_HOST", "bind address of views")
    context_web_port: int = _env_field(6066, "CONTEXT_WEB_PORT", "port of the context web views")
    web_token: str = _env_field("", "WEB_TOKEN", "token the web views require (Bearer)")
    context_store: str = _env_field("rocksdb", "CONTEXT_STORE", "table store: rocksdb or memory",
                                    choices=("rocksdb", "memory"))
    data_dir: str = _env_field("var", "DATA_DIR", "local state: table stores, embedded broker data")
    broker_session_timeout_seconds: float = _env_field(
        30.0, "BROKER_SESSION_TIMEOUT_SECONDS", "consumer group session timeout", gt=0
    )
    responder_concurrency: int = _env_field(
        32, "RESPONDER_CONCURRENCY", "customers answered at once per responder process", ge=1
    )
    responder_web_port: int = _env_field(8081, "RESPONDER_WEB_PORT", "responder health/metrics port")
    vision_web_port: int = _env_field(8082, "VISION_WEB_PORT", "vision health/metrics port")
    ops_web_host: str = _env_field(
        "127.0.0.1", "OPS_WEB_HOST", "bind address of the responder's and vision's health/metrics endpoints"
    )
    system_prompt_file: str = _env_field("", "SYSTEM_PROMPT_FILE", "file with the instructions")
    prompt_locale: str = _env_field("es", "PROMPT_LOCALE", "labels of the missed-message block")
    fallback_text: str = _env_field(
        "", "FALLBACK_TEXT", "sent when no answer could be produced; empty = send nothing"
    )
    image_max_bytes: int = _env_field(10 * 1024 * 1024, "IMAGE_MAX_BYTES", "largest image", ge=1)
    image_categories: str = _env_field(
        "payment_proof,general_inquiry,other", "IMAGE_CATEGORIES", "image classes"
    )
    log_level: str = _env_field(
        "INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    # -- exact context (issue 14): when the context service reads WATI's history ---------------
    missed_history: str = _env_field(
        "every_batch", "MISSED_HISTORY",
        "every_batch: read WATI history for every batch (no blind spot); gap: only after "
        "MISSED_GAP_SECONDS of silence — for accounts whose real-time agent webhooks flow, and "
        "only with RECONCILE_INTERVAL_SECONDS > 0 (the sweep then recovers undelivered messages)",
        choices=("every_batch", "gap"),
    )

    # --- Secured Kafka (SASL / TLS). Every client (aiokafka producers, consumers, admin, faust)
    # --- gets these through services.common.kafka.client_options(); PLAINTEXT keeps the old behaviour.
    kafka_security_protocol: str = _env_field(
        "PLAINTEXT", "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: str = _env_field(
        "PLAIN", "KAFKA_SASL_MECHANISM", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)"
    )
    kafka_sasl_username: str = _env_field("", "KAFKA_SASL_USERNAME", "SASL user (SASL_* protocols)")
    kafka_sasl_password: str = _env_field("", "KAFKA_SASL_PASSWORD", "SASL password (SASL_* protocols)")
    kafka_ssl_ca_file: str = _env_field(
        "", "KAFKA_SSL_CA_FILE", "PEM CA that signed the broker's certificate; empty = system CAs"
    )
    kafka_ssl_cert_file: str = _env_field(
        "", "KAFKA_SSL_CERT_FILE", "PEM client certificate (mutual TLS); empty = none"
    )
    kafka_ssl_key_file: str = _env_field(
        "", "KAFKA_SSL_KEY_FILE", "PEM private key of KAFKA_SSL_CERT_FILE"
    )


    # --- channels and start-up checks (issue 16) ---
    channels: str = _env_field(
        "", "CHANNELS", "enabled channels, comma-separated: wati, manychat; empty = each channel "
        "whose API token is set"
    )
    kafka_create_topics: bool = _env_field(
        True, "KAFKA_CREATE_TOPICS", "create missing topics at start (false: they must exist, e.g. "
        "a managed Kafka whose ACLs forbid creating topics)"
    )

    # --- operator console (services/console): its own web service and store
    console_host: str = _env_field("127.0.0.1", "CONSOLE_HOST", "bind address of the operator console")
    console_port: int = _env_field(8083, "CONSOLE_PORT", "port of the operator console")
    console_users: str = _env_field(
        "", "CONSOLE_USERS",
        "operator accounts: comma-separated name:hash, or name:hash:tenant+tenant to limit the operator to "
        "those tenants (hash from `watistream console --hash-password`)"
    )
    console_users_file: str = _env_field(
        "", "CONSOLE_USERS_FILE",
        "file of operator accounts, one name:hash[:tenant+tenant] per line (adds to CONSOLE_USERS)"
    )
    console_session_secret: str = _env_field(
        "", "CONSOLE_SESSION_SECRET", "key signing console sessions; empty = random (logins end on restart)"
    )
    console_session_hours: float = _env_field(12.0, "CONSOLE_SESSION_HOURS", "console login lifetime")
    console_retention_hours: float = _env_field(
        168.0, "CONSOLE_RETENTION_HOURS", "console store keeps this much (= the topics' retention)"
    )

    # --- Tenants (issue 17): several businesses in one deployment (services/common/tenants.py,
    # --- docs/tenants.md). Empty = one tenant, `default`, from the variables above (unchanged).
    tenants_file: str = _env_field(
        "", "TENANTS_FILE", "JSON file of tenants (docs/tenants.md); empty = one tenant from these settings"
    )

    # --- One OpenAI call per batch across rebalances (issue 13, point 4; services/responder/worker.py):
    # --- a batch's OpenAI work is cut off after OPENAI_DEADLINE_SECONDS, and its claim holds other
    # --- responders off (they wait instead of calling OpenAI again) that long, then for its send.
    openai_deadline_seconds: float = _env_field(
        360.0, "OPENAI_DEADLINE_SECONDS",
        "max time of a batch's OpenAI calls with retries; other responders wait this long on its claim",
        gt=0,
    )
    responder_send_hold_seconds: float = _env_field(
        60.0, "RESPONDER_SEND_HOLD_SECONDS",
        "once a batch's answer is generated, other responders wait this long for its send", gt=0,
    )
    # --- Per-tenant clients (issue 17, fair share): history fetches run at once PER channel account
    # --- (services/context/fetcher.py), so one tenant's slow WATI never holds another's slots.
    history_fetches_per_account: int = _env_field(
        8, "HISTORY_FETCHES_PER_ACCOUNT", "history fetches running at once per WATI account, per worker",
        ge=1,
    )
    # --- Fair share of the responder's and vision's slots (issue 17; services/common/fair_share.py):
    # --- one tenant holds at most this many of a worker's RESPONDER_CONCURRENCY slots.
    responder_concurrency_per_tenant: int = _env_field(
        0, "RESPONDER_CONCURRENCY_PER_TENANT",
        "of a responder's (and vision's) RESPONDER_CONCURRENCY slots, most one tenant may hold; "
        "0 = all with one tenant, half with several",
        ge=0,
    )
    # --- Backpressure per tenant (issue 17, fair share; services/common/backpressure.py): the
    # --- responder's and vision's consumer keeps at most RECORDS_PER_TENANT records of one tenant in
    # --- memory; a tenant's further records are read past (offset kept, uncommitted) and read again
    # --- when it has room, so its backlog never pauses another tenant's records on its partition.
    partition_pause_above: int = _env_field(
        1000, "PARTITION_PAUSE_ABOVE",
        "a responder/vision partition is paused above this many unfinished records of tenants under "
        "their RECORDS_PER_TENANT (resumed below half)", ge=1,
    )
    records_per_tenant: int = _env_field(
        0, "RECORDS_PER_TENANT",
        "fetched, unfinished records of one tenant a responder/vision worker keeps in memory, the rest "
        "read again later; 0 = no cap with one tenant, half of PARTITION_PAUSE_ABOVE with several", ge=0,
    )
    partition_unfinished_max: int = _env_field(
        20000, "PARTITION_UNFINISHED_MAX",
        "a responder/vision partition is paused above this many unfinished records whatever their "
        "tenant, those read past included (at least PARTITION_PAUSE_ABOVE)", ge=1,
    )

    def __post_init__(self) -> None:
        """Types and ranges of every field, the WATI token's `Bearer ` dropped (module doc).

        Every bad value is named in the one ConfigError, not only the first."""
        problems: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                checked = _check(f.metadata, value if not isinstance(value, str) else value.strip())
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            if checked != value:
                object.__setattr__(self, f.name, checked)
        if problems:
            raise ConfigError("; ".join(problems))
        token = self.wati_api_token
        if token[:7].lower() == "bearer ":
            object.__setattr__(self, "wati_api_token", token[7:].strip())
        self.enabled_channels  # noqa: B018 - validate CHANNELS early

    @property
    def enabled_channels(self) -> tuple[str, ...]:
        """The channels this deployment serves (see CHANNELS); their settings are required."""
        if self.channels.strip():
            names = channel_names()
            named = tuple(dict.fromkeys(c.strip().lower() for c in self.channels.split(",") if c.strip()))
            unknown = [c for c in named if c not in names]
            if unknown:
                raise ConfigError(f"CHANNELS: unknown channel(s) {', '.join(unknown)}; known: "
                                  + ", ".join(names))
            return named
        return tuple(p.name for p in configurable_providers() if getattr(self, p.token_setting.lower()))

    def channel_enabled(self, channel: str) -> bool:
        return channel in self.enabled_channels

    def require_channels(self) -> None:
        """Raises ConfigError unless at least one channel is enabled and each has its settings."""
        enabled = self.enabled_channels
        if not enabled:
            raise ConfigError("no channel enabled: set " + " and/or ".join(
                f"{p.config_hint()} ({p.audience})" for p in configurable_providers())
                + ", or name them in CHANNELS")
        needs = {p.name: p.required_settings for p in configurable_providers()}
        self.require(*(name for c in enabled for name in needs[c]))

    def value_of(self, env_name: str) -> str:
        """The value of the setting read from `env_name`, as text ("" when unset)."""
        return str(getattr(self, env_name.lower()))

    @property
    def gap_policy(self) -> GapPolicy:
        return GapPolicy.parse(
            self.customer_overrides, self.missed_gap_seconds, self.human_hold_seconds
        )

    @property
    def vision_model_name(self) -> str:
        return self.vision_model or self.openai_model

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, dotenv: Path | None = None, **overrides: Any
    ) -> Settings:
        """Reads the environment (the process's by default) over a `.env` file in the cwd."""
        real = os.environ if environ is None else environ
        env: dict[str, str] = read_dotenv(dotenv if dotenv is not None else Path(".env"), real)
        env.update(real)
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            name = f.metadata["env"]
            if f.name in overrides:
                continue
            try:
                raw = _raw_value(name, env)
                if raw is not None:
                    values[f.name] = _coerce(name, raw, type(f.default))
            except ConfigError as exc:
                problems.append(str(exc))
        values.update(overrides)
        try:
            settings = cls(**values)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        settings.gap_policy  # noqa: B018 - validate CUSTOMER_OVERRIDES early
        return settings

    def require(self, *names: str) -> None:
        """Raises ConfigError naming every listed env variable that is empty."""
        by_env = {f.metadata["env"]: f.name for f in fields(self)}
        missing = [n for n in names if not str(getattr(self, by_env[n]))]
        if missing:
            raise ConfigError("missing required setting(s): " + ", ".join(missing))

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(env name, default, meaning) of every setting, for the README and `.env.example`."""
        return [(f.metadata["env"], _render(f.default), f.metadata["doc"]) for f in fields(cls)]


def configurable_providers() -> tuple[Any, ...]:
    """The registered providers configured by settings of their own (`Provider.token_setting`):
    the channels CHANNELS names. Each declares its required settings (docs/providers.md); a
    provider without settings (a test's stand-in) is enabled by its registration alone.

    Looked up when asked, not imported with this module: the providers import this module."""
    from services import providers

    return providers.configurable()


def channel_names() -> tuple[str, ...]:
    """The names CHANNELS accepts, in registration order."""
    from services import providers

    return providers.configurable_names()


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _render(default: Any) -> str:
    """A default as written in `.env` (booleans as compose and YAML users write them)."""
    return str(default).lower() if isinstance(default, bool) else str(default)


def _raw_value(name: str, env: Mapping[str, str]) -> str | None:
    """NAME's value, or for a secret the content of the file NAME_FILE names; None when unset."""
    path = env.get(f"{name}_FILE", "").strip() if is_secret_name(name) else ""
    if not path:
        return env.get(name)
    if env.get(name, "").strip():
        raise ConfigError(f"{name} and {name}_FILE are both set: keep one")
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{name}_FILE={path} cannot be read: {exc.strerror}") from exc


def _coerce(name: str, raw: str, kind: type) -> Any:
    """The env text as the field's type; ConfigError names the variable."""
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError as exc:
        kind_name = "whole number" if kind is int else "number"
        raise ConfigError(f"{name} must be a {kind_name}, got {raw!r}") from exc
    return raw


def _check(meta: Mapping[str, Any], value: Any) -> Any:
    """`value` if it is valid for the setting `meta` describes (see the module doc), else ConfigError."""
    name: str = meta["env"]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        low, high = meta.get("ge"), None
        if name.endswith("_PORT"):
            low, high = 1, 65535
        elif name.endswith("_SECONDS") and low is None:
            low = 0
        if low is not None and value < low:
            raise ConfigError(f"{name} must be >= {low:g}, got {value:g}")
        if high is not None and value > high:
            raise ConfigError(f"{name} must be <= {high}, got {value:g}")
        gt = meta.get("gt")
        if gt is not None and value <= gt:
            raise ConfigError(f"{name} must be > {gt:g}, got {value:g}")
        return value
    if isinstance(value, str):
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if name.endswith("_URL") and value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{name} must be an http(s) URL with a host, got {value!r}")
            try:
                parts.port  # noqa: B018 - raises on a malformed port
            except ValueError as exc:
                raise ConfigError(f"{name} has a malformed port: {value!r}") from exc
    return value
