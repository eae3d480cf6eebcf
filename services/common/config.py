"""All configuration, from environment variables (a `.env` file is read if present).

Every setting has a documented default here and in the README's configuration table; the names of
docs/design.md's "Outer contract" are fixed because operators' scripts rely on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def read_dotenv(path: Path) -> dict[str, str]:
    """Parses a `.env` file: `KEY=VALUE` lines, `#` comments, optional quotes, no interpolation."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


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


def _env_field(default: Any, env: str, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """The process's settings. Build with `Settings.from_env()`; tests pass overrides."""

    kafka_bootstrap_servers: str = _env_field(
        "", "KAFKA_BOOTSTRAP_SERVERS", "Kafka bootstrap servers; empty = embedded broker (dev/demo)"
    )
    topic_prefix: str = _env_field("watistream.", "TOPIC_PREFIX", "prefix of every topic name")
    topic_partitions: int = _env_field(
        8, "TOPIC_PARTITIONS", "partitions of every co-partitioned topic"
    )
    topic_replication: int = _env_field(1, "TOPIC_REPLICATION", "replication factor of topics")
    ingest_host: str = _env_field("127.0.0.1", "INGEST_HOST", "bind address of the webhook service")
    ingest_port: int = _env_field(8080, "INGEST_PORT", "port of the webhook service")
    webhook_token: str = _env_field("", "WEBHOOK_TOKEN", "shared secret the webhooks must present")
    max_body_bytes: int = _env_field(256 * 1024, "MAX_BODY_BYTES", "largest webhook body accepted")
    produce_timeout_seconds: float = _env_field(
        5.0, "PRODUCE_TIMEOUT_SECONDS", "ingest answers 503 when the broker has not acked by then"
    )
    wati_api_url: str = _env_field("", "WATI_API_URL", "WATI API base incl. tenant id")
    wati_api_token: str = _env_field("", "WATI_API_TOKEN", "WATI Bearer token")
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
    openai_timeout_seconds: float = _env_field(60.0, "OPENAI_TIMEOUT_SECONDS", "per OpenAI call")
    openai_max_attempts: int = _env_field(5, "OPENAI_MAX_ATTEMPTS", "tries per OpenAI call")
    openai_max_output_tokens: int = _env_field(
        1000, "OPENAI_MAX_OUTPUT_TOKENS", "cap on a reply's tokens (counts against rate limits); 0 = none"
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
        "this bounds the look-again while recovering)"
    )
    missed_gap_seconds: float = _env_field(
        300.0, "MISSED_GAP_SECONDS", "customer silence that triggers the history check"
    )
    missed_lookback_seconds: float = _env_field(
        86400.0, "MISSED_LOOKBACK_SECONDS", "history window when the bot never replied"
    )
    missed_max_items: int = _env_field(
        200, "MISSED_MAX_ITEMS", "cap on injected items; the OLDEST are dropped and the block says so"
    )
    history_max_pages: int = _env_field(10, "HISTORY_MAX_PAGES", "getMessages pages per fetch")
    history_timeout_seconds: float = _env_field(
        20.0, "HISTORY_TIMEOUT_SECONDS", "a history fetch gives up after this (answer without it)"
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
        2.0, "RECONCILE_RATE_PER_SECOND", "getMessages calls per second the sweep may spend"
    )
    context_web_host: str = _env_field("127.0.0.1", "CONTEXT_WEB_HOST", "bind address of views")
    context_web_port: int = _env_field(6066, "CONTEXT_WEB_PORT", "port of the context web views")
    web_token: str = _env_field("", "WEB_TOKEN", "token the web views require (Bearer)")
    context_store: str = _env_field("rocksdb", "CONTEXT_STORE", "table store: rocksdb or memory")
    data_dir: str = _env_field("var", "DATA_DIR", "local state: table stores, embedded broker data")
    broker_session_timeout_seconds: float = _env_field(
        30.0, "BROKER_SESSION_TIMEOUT_SECONDS", "consumer group session timeout"
    )
    responder_concurrency: int = _env_field(
        32, "RESPONDER_CONCURRENCY", "customers answered at once per responder process"
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
    image_max_bytes: int = _env_field(10 * 1024 * 1024, "IMAGE_MAX_BYTES", "largest image")
    image_categories: str = _env_field(
        "payment_proof,general_inquiry,other", "IMAGE_CATEGORIES", "image classes"
    )
    log_level: str = _env_field("INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING")
    # -- exact context (issue 14): when the context service reads WATI's history ---------------
    missed_history: str = _env_field(
        "every_batch", "MISSED_HISTORY",
        "every_batch: read WATI history for every batch (no blind spot); gap: only after "
        "MISSED_GAP_SECONDS of silence — for accounts whose real-time agent webhooks flow, and "
        "only with RECONCILE_INTERVAL_SECONDS > 0 (the sweep then recovers undelivered messages)"
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

    # --- Tenants (issue 17): several businesses in one deployment (services/common/tenants.py,
    # --- docs/tenants.md). Empty = one tenant, `default`, from the variables above (unchanged).
    tenants_file: str = _env_field(
        "", "TENANTS_FILE", "JSON file of tenants (docs/tenants.md); empty = one tenant from these settings"
    )

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
        env: dict[str, str] = read_dotenv(dotenv if dotenv is not None else Path(".env"))
        env.update(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if f.name in overrides or name not in env:
                continue
            values[f.name] = _coerce(name, env[name], type(f.default))
        values.update(overrides)
        settings = cls(**values)
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
        return [(f.metadata["env"], str(f.default), f.metadata["doc"]) for f in fields(cls)]


def _coerce(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {raw!r}") from exc
    return raw
