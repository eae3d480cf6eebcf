"""What a normaliser concludes about one webhook, and the field checks both normalisers share.

Pure: no I/O. A normaliser returns exactly one outcome; the HTTP shell maps it to a status:
`CustomerMessage` / `BusinessSend` -> produce, then 200; `Ignored` -> 200 without producing;
`Rejected` -> 400 with `code` (a fixed, low-cardinality name also used as the metrics label) and
`reason` (human text naming the offending field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.common.records import AgentActivity, InboundMessage

# No genuine message is this long (WhatsApp caps text at 4096 characters, Messenger at 2000,
# Instagram at 1000). A longer text is a malformed or hostile payload: it is REJECTED (400), not
# truncated, because a truncated text would hand the model words the customer never wrote.
MAX_TEXT_CHARS = 10_000
# Names, ids, emails, usernames.
MAX_FIELD_CHARS = 1_024
# Media paths and URLs (WATI `data`, ManyChat attachment urls).
MAX_URL_CHARS = 4_096


@dataclass(frozen=True)
class CustomerMessage:
    """A customer's message: goes to the inbound topic."""

    record: InboundMessage


@dataclass(frozen=True)
class BusinessSend:
    """Something the business side sent (agent, WATI bot, template, our own API send)."""

    record: AgentActivity


@dataclass(frozen=True)
class Ignored:
    """A valid event that carries no message (delivery status, unhandled event type)."""

    reason: str


@dataclass(frozen=True)
class Rejected:
    """Bad input: answered 400 `{"error": code, "reason": reason}`; nothing is produced."""

    code: str
    reason: str


class Invalid(Exception):
    """Raised inside a normaliser by the field checks; the normaliser turns it into `Rejected`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def rejected(self) -> Rejected:
        return Rejected(self.code, self.reason)


def opt_str(
    doc: dict[str, Any], name: str, *, limit: int = MAX_FIELD_CHARS, where: str = "", numbers: bool = True
) -> str | None:
    """A string field: None when absent, null or blank; numbers are accepted as their text.

    Lenient about shape (WATI sends ids as strings or numbers), strict about type: a list or an
    object where a string belongs is a 400 naming the field. `numbers=False` for names of kinds
    (eventType, type), where a number means a broken payload.
    """
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is str and len(value) <= limit:  # the common case, checked first (hot path)
        return value if value.strip() else None
    label = f"{where}{name}"
    if isinstance(value, bool):
        raise Invalid("bad_field", f"field '{label}' must be a string, got a boolean")
    if isinstance(value, int | float) and numbers:
        value = str(value)
    if not isinstance(value, str):
        raise Invalid("bad_field", f"field '{label}' must be a string, got {json_type(value)}")
    if len(value) > limit:
        code = "text_too_long" if limit >= MAX_TEXT_CHARS else "field_too_long"
        raise Invalid(code, f"field '{label}' is {len(value)} characters long; the limit is {limit}")
    return value if value.strip() else None


def opt_obj(doc: dict[str, Any], name: str, *, where: str = "") -> dict[str, Any] | None:
    """An object field: None when absent or null; anything else that is not an object is a 400."""
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid("bad_field", f"field '{where}{name}' must be an object, got {json_type(value)}")
    return value


def opt_bool(doc: dict[str, Any], name: str) -> bool | None:
    """A boolean field; `"true"`/`"false"` strings are accepted (lenient), other types are a 400."""
    value = doc.get(name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise Invalid("bad_field", f"field '{name}' must be a boolean, got {json_type(value)}")


def json_type(value: object) -> str:
    """The JSON name of a Python value's type, for reasons a webhook sender can understand."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# A fixed table instead of `mimetypes`: the stdlib reads the host's mime.types files, so its answer
# (and the records we produce) would differ between machines.
_MIME_BY_EXTENSION = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
    "gif": "image/gif", "heic": "image/heic", "bmp": "image/bmp",
    "pdf": "application/pdf", "txt": "text/plain", "csv": "text/csv",
    "doc": "application/msword",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xls": "application/vnd.ms-excel",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "ppt": "application/vnd.ms-powerpoint",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "zip": "application/zip",
    "ogg": "audio/ogg", "oga": "audio/ogg", "opus": "audio/ogg", "mp3": "audio/mpeg", "m4a": "audio/mp4",
    "aac": "audio/aac", "amr": "audio/amr", "wav": "audio/wav",
    "mp4": "video/mp4", "3gp": "video/3gpp", "mov": "video/quicktime", "webm": "video/webm",
}


def guess_mime(ref: str | None) -> str | None:
    """The mime type implied by a media path or URL's extension; None when it has none we know.

    Understands WATI's `.../showFile?fileName=data/images/x.jpg` URLs (the name is in the query).
    """
    if not ref:
        return None
    parts = urlsplit(ref)
    names = [parts.path]
    for key in ("fileName", "filename", "file"):
        names.extend(parse_qs(parts.query).get(key, []))
    for name in reversed(names):
        base = name.rsplit("/", 1)[-1]
        if "." in base:
            mime = _MIME_BY_EXTENSION.get(base.rsplit(".", 1)[-1].lower())
            if mime:
                return mime
    return None
