"""Log lines never carry a phone number, BSUID, wamid head, token or API key."""

from __future__ import annotations

import base64
import json
import logging

import pytest

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
