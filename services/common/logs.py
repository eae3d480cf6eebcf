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
_MARKED = _PATTERNS[:4]
_BSUID = _PATTERNS[4][1]
_secrets: list[str] = []  # longest first, so a secret containing another is masked whole

# The last two patterns have no literal marker, and Python's regex engine scans a ~300-character
# line for them in ~10 µs each. For ASCII text a byte translation gives the line's "shape" in
# ~0.3 µs (digit -> '0', A-Z -> 'A', '.' and '+' kept, anything else -> ' '): a BSUID needs "AA."
# in it, a phone-like run needs "0000000" (7+ digits). In non-ASCII text `\d` also matches other
# scripts' digits, so such lines take the regexes.
_SHAPE = bytes(
    0x30 if 0x30 <= b <= 0x39 else 0x41 if 0x41 <= b <= 0x5A else b if b in b".+" else 0x20
    for b in range(256)
)
_DIGIT, _DOT, _PLUS = 0x30, 0x2E, 0x2B


def register_secret(*values: str) -> None:
    """Adds values (tokens, API keys) that must never appear in a log line."""
    _secrets.extend(v for v in values if v and len(v) >= 4 and v not in _secrets)
    _secrets.sort(key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with secrets, phone numbers, BSUIDs, wamid heads, bearer tokens and keys masked.

    Same result as `redact_reference` (a property test holds them equal), without the regex
    scans that cannot match."""
    text = _mask_secrets_and_marked(text, _MARKED)
    if not text.isascii():
        return _unmarked_regexes(text)
    shape = text.encode("ascii").translate(_SHAPE)
    if b"AA." in shape:
        masked = _BSUID.sub("**.***", text)
        if masked != text:
            text = masked
            shape = text.encode("ascii").translate(_SHAPE)
    if b"0000000" in shape:
        text = _mask_digit_runs(text, shape)
    return text


def _unmarked_regexes(text: str) -> str:
    for _, pattern, replacement in _PATTERNS[4:]:
        text = pattern.sub(replacement, text)
    return text


def _mask_digit_runs(text: str, shape: bytes) -> str:
    """The phone pattern's substitution, for ASCII `text` whose shape is `shape`.

    The pattern matches a whole run of 7+ digits (digits before it fail the look-behind, after it
    the look-ahead), not preceded by '.' nor followed by '.', with the '+' before it when that '+'
    is itself not preceded by a digit or '.'; it keeps the first digit (and '+') and the last two.
    """
    pieces: list[str] = []
    done = 0
    end = len(shape)
    start = shape.find(b"0000000")
    while start >= 0:
        stop = start + 7
        while stop < end and shape[stop] == _DIGIT:
            stop += 1
        before = shape[start - 1] if start else 0
        if before != _DOT and (stop == end or shape[stop] != _DOT):
            head = start
            if before == _PLUS and (start == 1 or shape[start - 2] not in (_DIGIT, _DOT)):
                head = start - 1
            pieces += (text[done:head], text[head:start + 1], "*****", text[stop - 2:stop])
            done = stop
        start = shape.find(b"0000000", stop)
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def redact_reference(text: str) -> str:
    """The plain definition of `redact` (every pattern in order), kept to test the fast one."""
    return _mask_secrets_and_marked(text, _PATTERNS)


def _mask_secrets_and_marked(text: str, patterns: list[tuple[str, re.Pattern[str], str]]) -> str:
    """Registered secrets, then each pattern whose marker is in the lower-cased line."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    lowered = text.lower()
    for marker, pattern, replacement in patterns:
        if marker in lowered:
            text = pattern.sub(replacement, text)
    return text


# `json.dumps(doc, default=str, ensure_ascii=False)` builds this encoder on every call.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second: tuple[int, Any, str] | None = None  # (second, converter, its text)

    def _timestamp(self, record: logging.LogRecord) -> str:
        """`formatTime` to the second, cached: most lines of a second share that text."""
        second = int(record.created)
        cached = self._second
        if cached is None or cached[0] != second or cached[1] is not self.converter:
            cached = self._second = (second, self.converter, self.formatTime(record, "%Y-%m-%dT%H:%M:%S"))
        return f"{cached[2]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self._timestamp(record),
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
        return redact(_ENCODER.encode(doc))


def setup(service: str, level: str = "INFO") -> None:
    """Routes every logger to stderr as JSON lines; the asctime converter is UTC."""
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(service)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The JSON lines show none of these record attributes; skipping them (the logging HOWTO's
    # "Optimization" settings) saves a stack walk and three lookups on every line.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "faust", "mode", "httpx", "httpx2", "openai", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs one event; `customer`/`customer_key` fields are masked before formatting."""
    for key in ("customer", "customer_key"):
        if key in fields:
            fields[key] = mask(str(fields[key]))
    log.log(level, name, extra={"fields": fields})
