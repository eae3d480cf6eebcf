"""Structured logs: one JSON line per event, with phone numbers and secrets masked.

Services call `event(log, "batch_flushed", customer=key, ...)`. The formatter masks, in every
line whatever its origin (our code, faust, aiokafka): runs of 7+ digits (phone numbers, waIds),
BSUIDs, WhatsApp message ids (wamids, which embed the phone number), bearer tokens, `sk-` keys
and every secret registered with `register_secret`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from .keys import mask

# (marker that must be in the lower-cased line for the pattern to possibly match, pattern, replacement):
# the cheap substring test skips most regex passes on a hot path (one line per webhook).
_PATTERNS = [
    # a wamid's head is the customer's phone number in base64: keep only its tail
    ("wamid.", re.compile(r"wamid\.[A-Za-z0-9+/_=-]*?([A-Za-z0-9+/_=-]{8})\b"), r"wamid.…\1"),
    ("bearer", re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    ("sk-", re.compile(r"sk-[A-Za-z0-9_-]{6,}"), "sk-***"),
    ("token=", re.compile(r"(?i)(token=)[^&\s\"']+"), r"\1***"),
    (".", re.compile(r"\b[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{6,}\b"), "**.***"),  # BSUIDs
    ("", re.compile(r"(?<![\d.])(\+?\d)\d{4,}(\d{2})(?![\d.])"), r"\1*****\2"),  # phone-like runs
]
_secrets: list[str] = []  # longest first, so a secret containing another is masked whole


def register_secret(*values: str) -> None:
    """Adds values (tokens, API keys) that must never appear in a log line."""
    _secrets.extend(v for v in values if v and len(v) >= 4 and v not in _secrets)
    _secrets.sort(key=len, reverse=True)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    lowered = text.lower()
    for marker, pattern, replacement in _PATTERNS:
        if marker in lowered:
            text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc["event"] = record.getMessage()
            doc.update(fields)
        else:
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, default=str, ensure_ascii=False))


def setup(service: str, level: str = "INFO") -> None:
    """Routes every logger to stderr as JSON lines; the asctime converter is UTC."""
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(service)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "faust", "mode", "httpx", "httpx2", "openai", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs one event; `customer`/`customer_key` fields are masked before formatting."""
    for key in ("customer", "customer_key"):
        if key in fields:
            fields[key] = mask(str(fields[key]))
    log.log(level, name, extra={"fields": fields})
