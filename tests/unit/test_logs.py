"""Log lines never carry a phone number, BSUID, wamid head, token or API key."""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import logs
from services.common.keys import mask


@pytest.mark.parametrize(("raw", "secret"), [
    ("customer 50376000111 wrote", "50376000111"),
    ("to +50376000111", "50376000111"),
    ("Authorization: Bearer abcDEF123456", "abcDEF123456"),
    ("key sk-proj-ABCDEF123456", "ABCDEF123456"),
    ("GET /webhooks/wati?token=s3cr3t-value&x=1", "s3cr3t-value"),
    ("bsuid US.123124141512 and HK.ENT.xxxxxx99", "123124141512"),
])
def test_redact_masks_identifiers_and_secrets(raw: str, secret: str) -> None:
    assert secret not in logs.redact(raw)


def test_redact_keeps_only_the_tail_of_a_wamid() -> None:
    wamid = "wamid." + base64.b64encode(b"\x0c\x0b50376000111\x15\x02\x00\x12\x18 26FE4AEB").decode()
    head = wamid[6:20]
    redacted = logs.redact(f"ids={[wamid]}")
    assert head not in redacted and wamid[-8:] in redacted


def test_registered_secrets_are_masked_wherever_they_appear() -> None:
    logs.register_secret("wati-tenant-token-xyz")
    assert "wati-tenant-token-xyz" not in logs.redact("token wati-tenant-token-xyz leaked?")


def test_event_lines_are_json_with_the_customer_masked(caplog: pytest.LogCaptureFixture) -> None:
    formatter = logs.JsonFormatter("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "batch_flushed", None, None)
    record.fields = {"customer": mask("wati:50376000111"), "count": 3}
    doc = json.loads(formatter.format(record))
    assert doc["event"] == "batch_flushed" and doc["count"] == 3
    assert "50376000111" not in json.dumps(doc)


def test_mask_keeps_provider_and_tail() -> None:
    assert mask("wati:50376000111") == "wati:********111"
    assert mask(None) == "-"


# --- the fast redaction equals the plain one -------------------------------------------------------

# Pieces that make every pattern's edge cases likely: digit runs around the 7-digit threshold, '+'
# and '.' next to them, BSUID heads, markers of the marked patterns, non-ASCII digits and letters.
_PIECES = st.sampled_from([
    "0", "1", "5", "9", "12", "503", "7000", "76000111", "+", ".", "..", "+5", "US.", "HK.ENT.", "ENT.",
    "AB", "Zz", "abc123", "x", " ", '"', ":", ",", "=", "&", "/", "-", "_", "\n", "wamid.", "WAMID.",
    "HBgL", "Bearer ", "bearer\t", "sk-", "token=", "TOKEN=", "?token=", "٣", "٤٥٦", "…", "é", "ü",
    "২", "\u00b2", "\U0001d7d8",
])
_LINES = st.one_of(
    st.lists(_PIECES, max_size=30).map("".join),
    st.text(alphabet="0123456789.+ AZaz\"", max_size=60),
    st.text(max_size=60),
)


@settings(max_examples=3000, deadline=None)
@given(_LINES)
def test_redact_equals_the_reference_redaction(text: str) -> None:
    assert logs.redact(text) == logs.redact_reference(text)


@pytest.mark.parametrize("text", [
    "1234567", "123456", "+1234567", "x+1234567", "5+1234567", ".+1234567", "1.1234567", "1234567.5",
    "1234567.", "+1234567+7654321", "1234567 7654321", "a1234567b", "12345678901234567890", "+", "",
    "US.123456", "US.12345", "XUS.123456", "US.ENT.abcdef", "..1234567", "1234567+", "++1234567",
    '{"event_ref": "0000000000001A2F", "customer": "wati:********001", "ms": 3.2}',
])
def test_redact_edge_cases_equal_the_reference(text: str) -> None:
    assert logs.redact(text) == logs.redact_reference(text)


def test_redact_masks_registered_secrets_before_the_patterns() -> None:
    logs.register_secret("s3cret-12345678")
    line = "token s3cret-12345678 and 50376000111"
    assert logs.redact(line) == logs.redact_reference(line) == "token *** and 5*****11"


def test_formatted_lines_keep_the_stdlib_json_layout() -> None:
    """The encoder is built once; the line is still `json.dumps(doc, default=str, ensure_ascii=False)`,
    which other services' tests and log readers match (`"event": "..."`)."""
    formatter = logs.JsonFormatter("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "batch_done", None, None)
    record.fields = {"when": datetime(2026, 1, 2, tzinfo=UTC), "names": ["ñ", 1.5], "n": None}
    line = formatter.format(record)
    doc = json.loads(line)
    assert '"event": "batch_done"' in line and '"names": ["ñ", 1.5]' in line
    assert doc["when"] == "2026-01-02 00:00:00+00:00"  # default=str
    assert line == json.dumps(doc, ensure_ascii=False)


def test_the_timestamp_cache_gives_formattime_text() -> None:
    formatter = logs.JsonFormatter("test")
    formatter.converter = time.gmtime
    for created in (1764238453.001, 1764238453.999, 1764238454.5, 1764238453.25, 0.5):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"
        assert json.loads(formatter.format(record))["ts"] == expected
    formatter.converter = time.localtime  # a changed converter is not served from the cache
    record.created = 1764238453.25
    assert json.loads(formatter.format(record))["ts"].startswith(
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1764238453.25)))
