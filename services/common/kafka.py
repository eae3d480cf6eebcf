"""Topics, the producer every service uses, and the dead-letter helper.

Every topic is created here (unless KAFKA_CREATE_TOPICS=false: then it must exist), with its
configured partition count, before any service subscribes:
a faust worker silently ignores a source topic that did not exist when it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, fields
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from . import codec, logs, metrics
from .config import ConfigError, Settings
from .logs import event
from .timeparse import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """Topic names. All keyed by customer key and co-partitioned (same partition count)."""

    inbound: str
    agent_activity: str
    replies: str
    context_commands: str
    responder_requests: str
    vision_requests: str
    image_classified: str
    audit: str
    dead_letter: str
    responder_state: str
    dead_letter_replays: str  # which dead letters were replayed (services/common/deadletters.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        p = settings.topic_prefix
        return cls(**{f.name: p + f.name.replace("_", "-") for f in fields(cls)})

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


COMPACTED = {"responder_state", "dead_letter_replays"}

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def client_security(settings: Settings) -> dict[str, Any]:
    """aiokafka's security keyword arguments (the same for producers, consumers and the admin client).

    Empty for PLAINTEXT, so an unsecured broker sees exactly the clients it saw before. Raises
    ConfigError naming the setting when the combination cannot work (it would otherwise surface as
    an opaque connection failure). The SASL password is registered as a secret for the logs.
    """
    protocol = settings.kafka_security_protocol.strip().upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(
            f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}, "
            f"got {settings.kafka_security_protocol!r}"
        )
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        mechanism = settings.kafka_sasl_mechanism.strip().upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                f"got {settings.kafka_sasl_mechanism!r}"
            )
        if not settings.kafka_sasl_username or not settings.kafka_sasl_password:
            raise ConfigError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        logs.register_secret(settings.kafka_sasl_password)
        options.update(
            sasl_mechanism=mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password,
        )
    if protocol.endswith("SSL"):
        options["ssl_context"] = _ssl_context(settings)
    return options


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the broker's certificate and host name (system CAs unless KAFKA_SSL_CA_FILE)."""
    if settings.kafka_ssl_key_file and not settings.kafka_ssl_cert_file:
        raise ConfigError("KAFKA_SSL_KEY_FILE is set but KAFKA_SSL_CERT_FILE is empty")
    try:
        return create_ssl_context(
            cafile=settings.kafka_ssl_ca_file or None,
            certfile=settings.kafka_ssl_cert_file or None,
            keyfile=settings.kafka_ssl_key_file or None,
        )
    except (OSError, ssl.SSLError) as exc:
        names = "KAFKA_SSL_CA_FILE / KAFKA_SSL_CERT_FILE / KAFKA_SSL_KEY_FILE"
        raise ConfigError(f"cannot load the Kafka TLS files ({names}): {exc}") from exc


def client_options(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers plus security: the keyword arguments every Kafka client is built with."""
    return {"bootstrap_servers": settings.kafka_bootstrap_servers, **client_security(settings)}


def make_consumer(settings: Settings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """An aiokafka consumer on the configured cluster; `options` are the caller's consumer knobs."""
    return AIOKafkaConsumer(*topics, **client_options(settings), **options)


def make_admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    """An admin client on the configured cluster (topic listing and creation)."""
    return AIOKafkaAdminClient(**client_options(settings), **options)


async def check_kafka_auth(settings: Settings, timeout: float = 10.0) -> str | None:
    """None when a bootstrap server accepts a connection with the configured security, else why not.

    Connects directly (aiokafka's own bootstrap only says "Unable to bootstrap"), so a wrong
    password, an untrusted certificate or a protocol mismatch each get their own sentence, naming
    the setting to change. Tried in order over KAFKA_BOOTSTRAP_SERVERS; the first success wins.
    """
    if not settings.kafka_bootstrap_servers.strip():
        return "KAFKA_BOOTSTRAP_SERVERS is empty"
    try:
        security = client_security(settings)
    except ConfigError as exc:
        return str(exc)
    reasons: list[str] = []
    for server in (s.strip() for s in settings.kafka_bootstrap_servers.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            return f"KAFKA_BOOTSTRAP_SERVERS entry {server!r} is not host:port"
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), request_timeout_ms=int(timeout * 1000), **security),
                timeout,
            )
        except Exception as exc:  # each failure becomes a sentence; nothing escapes a check
            reasons.append(f"{server}: {_auth_failure(settings, exc)}")
            continue
        conn.close()
        return None
    return "; ".join(reasons)


def _auth_failure(settings: Settings, exc: BaseException) -> str:
    """One operator-facing sentence for a failed connection, naming what to change."""
    protocol = settings.kafka_security_protocol.strip().upper()
    if isinstance(exc, SaslAuthenticationFailed):
        return (
            f"the broker rejected user {settings.kafka_sasl_username!r} with "
            f"{settings.kafka_sasl_mechanism} (wrong KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD, "
            f"or the user has no {settings.kafka_sasl_mechanism} credentials): {exc}"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism} is not enabled on the broker: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the broker's TLS certificate is not trusted ({exc.verify_message}); set KAFKA_SSL_CA_FILE "
            "to the CA that signed it, and check the host name in KAFKA_BOOTSTRAP_SERVERS matches it"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc}); does the listener speak {protocol}?"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return (
            "no answer in time: the broker is unreachable, or KAFKA_SECURITY_PROTOCOL="
            f"{protocol} does not match the listener (TLS vs plain, SASL or not)"
        )
    if isinstance(exc, ConnectionError | OSError):
        return f"cannot connect ({exc}); is the broker running and the address right?"
    if isinstance(exc, KafkaError):
        return (
            f"connection failed ({type(exc).__name__}: {exc}); check that KAFKA_SECURITY_PROTOCOL="
            f"{protocol} matches the listener"
        )
    return f"connection failed ({type(exc).__name__}: {exc})"


async def ensure_topics(settings: Settings, attempts: int = 30) -> Topics:
    """Creates every topic that does not exist yet; safe to call from every process at start."""
    topics = Topics.from_settings(settings)
    wanted = [
        NewTopic(
            name=getattr(topics, f.name),
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication,
            topic_configs={"cleanup.policy": "compact"} if f.name in COMPACTED else {},
        )
        for f in fields(topics)
    ]
    for attempt in range(attempts):
        admin = make_admin(settings)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t.name not in existing]
            if missing and not settings.kafka_create_topics:
                raise ConfigError(
                    "missing topics (KAFKA_CREATE_TOPICS=false): " + ", ".join(t.name for t in missing)
                    + f"; create them with {settings.topic_partitions} partitions"
                )
            if missing:
                # another process may create them meanwhile
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(missing)
            return topics
        except KafkaError as exc:
            if attempt == attempts - 1:
                raise
            event(log, "topics_retry", logging.WARNING, error=type(exc).__name__)
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        finally:
            await admin.close()
    return topics


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all and idempotence: a retried send never duplicates; linger lets requests share batches."""
    options: dict[str, Any] = {
        **client_options(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        "request_timeout_ms": 10_000,
        "retry_backoff_ms": 100,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def send_record(
    producer: AIOKafkaProducer, topic: str, key: str, schema: str, value: dict[str, Any]
) -> None:
    """Encodes and produces one value, waiting for the broker's ack."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await producer.send_and_wait(topic, codec.encode(schema, value), key=key.encode())
    _produce_latency(topic).observe(loop.time() - start)


_produce_latency = metrics.Children(metrics.produce_latency_seconds)


async def dead_letter(
    producer: AIOKafkaProducer,
    topics: Topics,
    *,
    service: str,
    reason: str,
    error: str,
    source_topic: str | None = None,
    partition: int = -1,
    offset: int = -1,
    key: bytes | None = None,
    payload: bytes | None = None,
    customer_key: str | None = None,
    batch_id: str | None = None,
    tenant: str | None = None,
) -> None:
    """Puts a message the service could not handle on the dead-letter topic, with the reason.

    `tenant`: the metric's tenant label when the key does not carry it (ingest's raw payloads are
    keyed by provider); by default the customer key's (or the Kafka key's) tenant, bounded."""
    record = {
        "service": service, "reason": reason, "error": error[:2000], "source_topic": source_topic,
        "partition": partition, "offset": offset, "key": key, "payload": payload,
        "customer_key": customer_key, "batch_id": batch_id, "failed_at": utcnow(),
    }
    await producer.send_and_wait(
        topics.dead_letter, codec.encode("DeadLetter", record),
        key=(customer_key or (key.decode(errors="replace") if key else "unknown")).encode(),
    )
    label = metrics.tenant_label(tenant) if tenant is not None else metrics.key_tenant(customer_key or key)
    metrics.dead_letters_total.labels(service, reason, label).inc()
    event(log, "dead_lettered", logging.WARNING, service=service, reason=reason,
          customer=customer_key or "-", batch_id=batch_id, source_topic=source_topic)
