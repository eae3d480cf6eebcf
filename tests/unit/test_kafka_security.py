"""The one place Kafka security settings become client arguments: what each protocol yields, which
combinations are refused (naming the setting), and faust getting the same thing."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import faust
import pytest

from services.common import logs
from services.common.config import ConfigError, Settings
from services.common.kafka import check_kafka_auth, client_options, client_security
from services.context.app import broker_credentials
from tests.tls import make_pki

SASL: dict[str, Any] = {"kafka_sasl_username": "svc", "kafka_sasl_password": "pw-unit-0001"}


def test_plaintext_adds_nothing_to_the_clients() -> None:
    settings = Settings(kafka_bootstrap_servers="k:9092")
    assert client_security(settings) == {}
    assert client_options(settings) == {"bootstrap_servers": "k:9092"}
    assert broker_credentials(settings) is None


def test_sasl_plaintext_passes_mechanism_and_login_without_tls() -> None:
    settings = Settings(
        kafka_security_protocol="sasl_plaintext", kafka_sasl_mechanism="scram-sha-256", **SASL
    )
    assert client_security(settings) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc", "sasl_plain_password": "pw-unit-0001",
    }


def test_sasl_ssl_trusts_the_configured_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                        kafka_ssl_ca_file=str(pki.ca_file), **SASL)
    options = client_security(settings)
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "watistream test CA"),),)]
    credentials = broker_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-512"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)


def test_ssl_with_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(pki.ca_file),
                        kafka_ssl_cert_file=str(pki.cert_file), kafka_ssl_key_file=str(pki.key_file))
    assert client_security(settings)["security_protocol"] == "SSL"
    assert isinstance(broker_credentials(settings), faust.SSLCredentials)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI", **SASL},
         "KAFKA_SASL_MECHANISM"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "svc"}, "KAFKA_SASL_PASSWORD"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_password": "pw"}, "KAFKA_SASL_USERNAME"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.pem"}, "KAFKA_SSL_CA_FILE"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_key_file": "/k.pem"}, "KAFKA_SSL_CERT_FILE"),
    ],
)
def test_unusable_combinations_name_the_setting(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        client_security(Settings(**overrides))  # type: ignore[arg-type]


async def test_check_reports_configuration_errors_without_connecting() -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_security_protocol="SASL_SSL")
    assert "KAFKA_SASL_USERNAME" in str(await check_kafka_auth(settings))
    assert await check_kafka_auth(Settings()) == "KAFKA_BOOTSTRAP_SERVERS is empty"


async def test_check_names_an_unreachable_broker() -> None:
    from services.common.broker import free_port

    closed = Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    reason = str(await check_kafka_auth(closed, timeout=3))
    assert reason.startswith(f"{closed.kafka_bootstrap_servers}: cannot connect")
    assert "is the broker running and the address right?" in reason
    assert await check_kafka_auth(Settings(kafka_bootstrap_servers="no-port")) == (
        "KAFKA_BOOTSTRAP_SERVERS entry 'no-port' is not host:port"
    )


def test_the_sasl_password_is_masked_in_logs() -> None:
    client_security(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="svc",
                             kafka_sasl_password="hunter2-sasl-pw"))
    assert "hunter2-sasl-pw" not in logs.redact("login failed with hunter2-sasl-pw")
