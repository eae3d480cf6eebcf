"""services/common/config.py: `.env` read like docker compose reads it, typed and range-checked
settings, secrets from files, the WATI token's `Bearer `, and which channels are enabled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.config import ConfigError, Settings, parse_dotenv, read_dotenv


def settings_from(text: str, tmp_path: Path, **environ: str) -> Settings:
    dotenv = tmp_path / ".env"
    dotenv.write_text(text, encoding="utf-8")
    return Settings.from_env(environ=environ, dotenv=dotenv)


# ------------------------------------------------------------------ .env like compose


def test_inline_comment_after_a_space_is_not_part_of_the_value() -> None:
    # the reported bug: the old parser made "gpt-4o # note" the model name
    assert parse_dotenv("OPENAI_MODEL=gpt-4o # note\n", {}) == {"OPENAI_MODEL": "gpt-4o"}


def test_hash_without_a_space_before_it_stays_in_an_unquoted_value() -> None:
    assert parse_dotenv("FALLBACK_TEXT=a#b\n", {}) == {"FALLBACK_TEXT": "a#b"}


def test_quotes_export_and_escapes() -> None:
    text = (
        "export A=1\n"
        "B='two words # not a comment'\n"
        'C="line\\nbreak \\"quoted\\""  # comment\n'
        "D=  spaced  \n"
        "# a comment line\n"
        "\n"
        "E=\n"
    )
    assert parse_dotenv(text, {}) == {
        "A": "1", "B": "two words # not a comment", "C": 'line\nbreak "quoted"', "D": "spaced", "E": "",
    }


def test_variables_expand_except_in_single_quotes() -> None:
    text = "BASE=/srv\nA=${BASE}/a\nB=\"${HOME_DIR}/b\"\nC='${BASE}/c'\nD=${MISSING:-dflt}\n"
    assert parse_dotenv(text, {"HOME_DIR": "/home/x"}) == {
        "BASE": "/srv", "A": "/srv/a", "B": "/home/x/b", "C": "${BASE}/c", "D": "dflt",
    }


def test_a_line_that_cannot_be_parsed_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="line 2"):
        parse_dotenv("A=1\nthis is not a setting\n", {})


def test_absent_dotenv_is_empty(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "none") == {}


def test_real_environment_wins_over_dotenv(tmp_path: Path) -> None:
    settings = settings_from("OPENAI_MODEL=from-file # note\nTOPIC_PREFIX=acme.\n", tmp_path,
                             OPENAI_MODEL="from-env")
    assert settings.openai_model == "from-env"
    assert settings.topic_prefix == "acme."


# ------------------------------------------------------------------ types and ranges


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("INGEST_PORT", "99999", "INGEST_PORT must be <= 65535"),
        ("INGEST_PORT", "0", "INGEST_PORT must be >= 1"),
        ("CONTEXT_WEB_PORT", "eighty", "CONTEXT_WEB_PORT must be a whole number"),
        ("TOPIC_PARTITIONS", "0", "TOPIC_PARTITIONS must be >= 1"),
        ("TOPIC_REPLICATION", "0", "TOPIC_REPLICATION must be >= 1"),
        ("RESPONDER_CONCURRENCY", "0", "RESPONDER_CONCURRENCY must be >= 1"),
        ("OPENAI_MAX_ATTEMPTS", "0", "OPENAI_MAX_ATTEMPTS must be >= 1"),
        ("QUIET_WINDOW_SECONDS", "-1", "QUIET_WINDOW_SECONDS must be >= 0"),
        ("QUIET_WINDOW_SECONDS", "nan", "finite"),
        ("FLUSH_SCAN_INTERVAL_SECONDS", "0", "FLUSH_SCAN_INTERVAL_SECONDS must be > 0"),
        ("OPENAI_BASE_URL", "api.openai.com/v1", "OPENAI_BASE_URL must be an http(s) URL"),
        ("WATI_API_URL", "ftp://live.wati.io/1", "WATI_API_URL must be an http(s) URL"),
        ("MANYCHAT_API_URL", "https://api.manychat.com:99999", "MANYCHAT_API_URL has a malformed port"),
        ("CONTEXT_STORE", "redis", "CONTEXT_STORE must be one of rocksdb, memory"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of"),
        ("KAFKA_CREATE_TOPICS", "maybe", "KAFKA_CREATE_TOPICS must be true or false"),
        ("CHANNELS", "wati,telegram", "CHANNELS: unknown channel"),
    ],
)
def test_out_of_range_or_malformed_values_are_refused_naming_the_variable(
    tmp_path: Path, name: str, raw: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(environ={name: raw}, dotenv=tmp_path / "none")


def test_every_bad_value_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ={"INGEST_PORT": "99999", "TOPIC_PARTITIONS": "0", "CONTEXT_WEB_PORT": "x"},
                          dotenv=tmp_path / "none")
    message = str(caught.value)
    assert "INGEST_PORT" in message and "TOPIC_PARTITIONS" in message and "CONTEXT_WEB_PORT" in message


def test_direct_construction_and_replace_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="TOPIC_PARTITIONS"):
        Settings(topic_partitions=0)
    with pytest.raises(ConfigError, match="INGEST_PORT"):
        dataclasses.replace(Settings(), ingest_port=70000)


def test_values_at_the_edges_are_accepted(tmp_path: Path) -> None:
    settings = Settings.from_env(
        environ={"INGEST_PORT": "65535", "CONTEXT_WEB_PORT": "1", "HUMAN_HOLD_SECONDS": "0",
                 "OPENAI_MAX_OUTPUT_TOKENS": "0", "KAFKA_CREATE_TOPICS": "False", "LOG_LEVEL": " DEBUG "},
        dotenv=tmp_path / "none",
    )
    assert (settings.ingest_port, settings.context_web_port, settings.human_hold_seconds) == (65535, 1, 0)
    assert settings.kafka_create_topics is False
    assert settings.log_level == "DEBUG"


# ------------------------------------------------------------------ secrets


def test_secret_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "openai"
    secret.write_text("sk-from-file\n", encoding="utf-8")
    settings = Settings.from_env(environ={"OPENAI_API_KEY_FILE": str(secret), "OPENAI_API_KEY": ""},
                                 dotenv=tmp_path / "none")
    assert settings.openai_api_key == "sk-from-file"


def test_secret_file_and_value_both_set_or_file_unreadable_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="WEB_TOKEN and WEB_TOKEN_FILE are both set"):
        Settings.from_env(environ={"WEB_TOKEN_FILE": str(secret), "WEB_TOKEN": "y"}, dotenv=tmp_path / "n")
    with pytest.raises(ConfigError, match=r"WEBHOOK_TOKEN_FILE=.*cannot be read"):
        Settings.from_env(environ={"WEBHOOK_TOKEN_FILE": str(tmp_path / "absent")}, dotenv=tmp_path / "n")


def test_file_variant_is_only_for_secrets(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_text("other", encoding="utf-8")
    settings = Settings.from_env(environ={"OPENAI_MODEL_FILE": str(path)}, dotenv=tmp_path / "none")
    assert settings.openai_model == Settings().openai_model


@pytest.mark.parametrize("pasted", ["Bearer eyJabc", "bearer eyJabc", "  Bearer   eyJabc ", "eyJabc"])
def test_wati_token_pasted_with_bearer_is_tolerated(tmp_path: Path, pasted: str) -> None:
    settings = Settings.from_env(environ={"WATI_API_TOKEN": pasted}, dotenv=tmp_path / "none")
    assert settings.wati_api_token == "eyJabc"


# ------------------------------------------------------------------ channels


def test_channels_default_to_those_with_a_token() -> None:
    assert Settings().enabled_channels == ()
    assert Settings(wati_api_token="w").enabled_channels == ("wati",)
    assert Settings(manychat_api_token="m").enabled_channels == ("manychat",)
    assert Settings(wati_api_token="w", manychat_api_token="m").enabled_channels == ("wati", "manychat")


def test_explicit_channels_win_and_require_their_settings() -> None:
    only = Settings(channels="ManyChat", wati_api_token="w", manychat_api_token="m")
    assert only.enabled_channels == ("manychat",)
    assert not only.channel_enabled("wati")
    only.require_channels()
    with pytest.raises(ConfigError, match="WATI_API_URL"):
        Settings(channels="wati", wati_api_token="w").require_channels()
    with pytest.raises(ConfigError, match="no channel enabled"):
        Settings().require_channels()
