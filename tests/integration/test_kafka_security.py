"""Secured Kafka for real: a SASL_SSL broker (SCRAM + PLAIN, a CA made by the test) and the
project's clients (admin, producer, consumer, `check_kafka_auth`) built from the settings alone."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.config import Settings
from services.common.kafka import (
    check_kafka_auth,
    ensure_topics,
    make_consumer,
    make_producer,
)
from tests.conftest import SECURED_USERS, unique_prefix

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
async def test_check_passes_with_the_right_credentials(secured_kafka: Settings, mechanism: str) -> None:
    assert await check_kafka_auth(dataclasses.replace(secured_kafka, kafka_sasl_mechanism=mechanism)) is None


async def test_a_wrong_password_is_named_as_such(secured_kafka: Settings) -> None:
    wrong = dataclasses.replace(secured_kafka, kafka_sasl_password="not-the-password")
    reason = await check_kafka_auth(wrong)
    assert reason is not None
    assert "rejected user 'watistream' with SCRAM-SHA-512" in reason
    assert "KAFKA_SASL_PASSWORD" in reason
    assert "not-the-password" not in reason


async def test_another_users_password_is_rejected(secured_kafka: Settings) -> None:
    swapped = dataclasses.replace(secured_kafka, kafka_sasl_password=SECURED_USERS["other"])
    assert "rejected user 'watistream'" in str(await check_kafka_auth(swapped))


async def test_an_untrusted_broker_certificate_names_the_ca_setting(secured_kafka: Settings) -> None:
    system_cas = dataclasses.replace(secured_kafka, kafka_ssl_ca_file="")
    reason = str(await check_kafka_auth(system_cas))
    assert "certificate is not trusted" in reason and "KAFKA_SSL_CA_FILE" in reason


async def test_plaintext_against_the_secured_listener_names_the_protocol(secured_kafka: Settings) -> None:
    plain = dataclasses.replace(secured_kafka, kafka_security_protocol="PLAINTEXT")
    reason = str(await check_kafka_auth(plain, timeout=3))
    assert "KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in reason


async def test_sasl_without_tls_against_the_tls_listener_names_the_protocol(secured_kafka: Settings) -> None:
    no_tls = dataclasses.replace(secured_kafka, kafka_security_protocol="SASL_PLAINTEXT")
    reason = str(await check_kafka_auth(no_tls, timeout=3))
    assert "KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT" in reason


async def test_topics_produce_and_consume_through_the_secured_listener(secured_kafka: Settings) -> None:
    """The admin client creates the topics, the producer writes, a consumer reads: all over SASL_SSL."""
    cfg = dataclasses.replace(secured_kafka, topic_prefix=unique_prefix("secured"), topic_partitions=2)
    topics = await ensure_topics(cfg, attempts=2)
    producer = make_producer(cfg)
    await producer.start()
    try:
        await producer.send_and_wait(topics.context_commands, b"secured", key=b"wati:50370000001")
    finally:
        await producer.stop()
    consumer = make_consumer(cfg, topics.context_commands, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"wati:50370000001", b"secured")
