"""Shared fixtures: one real Apache Kafka per test session, unique topics per test module."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.broker import EmbeddedKafka, SecuredListener
from services.common.config import Settings


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the session's embedded broker (started through the product's code)."""
    broker = EmbeddedKafka(tmp_path_factory.mktemp("kafka"), partitions=4)
    try:
        yield broker.start()
    finally:
        broker.stop()


#: The SASL users of the secured broker (each has SCRAM-SHA-256/512 and PLAIN credentials).
SECURED_USERS = {"watistream": "s3cret-watistream-pw", "other": "other-pw-0000"}


@pytest.fixture(scope="session")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A second embedded broker whose only client listener is SASL_SSL, with a CA made here.

    Yields the client settings that reach it (SCRAM-SHA-512 as user `watistream`); started only
    by the tests that ask for it.
    """
    from tests.tls import make_pki  # cryptography: only the secured-Kafka tests need it

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    broker = EmbeddedKafka(
        tmp_path_factory.mktemp("secured-kafka"), partitions=4,
        secured=SecuredListener(pki.cert_file, pki.key_file, pki.ca_file, SECURED_USERS),
    )
    try:
        bootstrap = broker.start()
        yield Settings(
            kafka_bootstrap_servers=bootstrap, kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="watistream",
            kafka_sasl_password=SECURED_USERS["watistream"], kafka_ssl_ca_file=str(pki.ca_file),
        )
    finally:
        broker.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[type[EmbeddedKafka]]:
    """For outage drills: brokers of a test's own that it may kill and restart."""
    started: list[EmbeddedKafka] = []

    class OwnBroker(EmbeddedKafka):
        def __init__(self, **kw: object) -> None:
            super().__init__(data_dir=tmp_path / f"broker{len(started)}", **kw)  # type: ignore[arg-type]
            started.append(self)

    yield OwnBroker
    for broker in started:
        broker.stop()


def unique_prefix(name: str) -> str:
    return f"t{uuid.uuid4().hex[:8]}.{re.sub(r'[^A-Za-z0-9]+', '-', name)[-40:]}."


@pytest.fixture(scope="module")
def settings(kafka: str, request: pytest.FixtureRequest) -> Settings:
    """Settings for one test module: its own topics on the session broker, test-sized timeouts."""
    return Settings(
        kafka_bootstrap_servers=kafka,
        topic_prefix=unique_prefix(request.module.__name__),
        topic_partitions=4,
        webhook_token="test-webhook-token",
        web_token="test-web-token",
        openai_api_key="sk-test-key-000000",
        wati_api_token="wati-test-token",
        manychat_api_token="manychat-test-token",
        broker_session_timeout_seconds=10,
        context_store="memory",
    )
