"""Which messages carry images, and whether downloaded bytes are an image OpenAI can read.

Pure functions, no I/O. We trust the bytes, never the provider's declared content type: WATI and
CDNs label files loosely, and an HTML error page served with status 200 must not reach OpenAI as an
"image". OpenAI reads PNG, JPEG, WEBP and non-animated GIF (docs/openai.md); everything else
is rejected here with a reason code that ends up in the dead-letter topic:

- `not_an_image`       the bytes are no image at all (PDF, HTML, empty, unknown);
- `unsupported_image`  an image OpenAI cannot read (animated GIF, HEIC/AVIF);
- `image_too_large`    more than `IMAGE_MAX_BYTES`.

Documents whose declared mime type is `image/*` count as images: customers often send receipts
"as a document" to keep the quality, and those are exactly the payment proofs we must recognise.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common.records import InboundMessage

#: message types whose media is an image whatever the declared mime type.
IMAGE_MESSAGE_TYPES = frozenset({"image", "sticker"})

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


class ImageRejected(Exception):
    """The media cannot be given to OpenAI; `reason` is a dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageRef:
    """One image of a batch: its media reference and the message that brought it."""

    media_ref: str
    message: InboundMessage


def is_image_message(message: InboundMessage) -> bool:
    """True for image/sticker messages, and for documents declared as `image/*`."""
    kind = (message.get("message_type") or "").strip().lower()
    if kind in IMAGE_MESSAGE_TYPES:
        return True
    mime = (message.get("media_mime") or "").strip().lower()
    return kind == "document" and mime.startswith("image/") and bool(message.get("media_ref"))


def images_of(messages: Iterable[InboundMessage]) -> list[ImageRef]:
    """The batch's images in message order, one per distinct media reference.

    An image message without a media reference still yields an entry (media_ref ""), so that it is
    reported as unreadable rather than silently ignored.
    """
    seen: set[str] = set()
    found: list[ImageRef] = []
    for message in messages:
        if not is_image_message(message):
            continue
        ref = (message.get("media_ref") or "").strip()
        if ref in seen:
            continue
        seen.add(ref)
        found.append(ImageRef(ref, message))
    return found


def sniff_image_mime(data: bytes) -> str | None:
    """The mime type of the image formats OpenAI reads, from magic bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def describe_non_image(data: bytes) -> str:
    """A short, content-free name for bytes that are no readable image (for logs and dead letters)."""
    head = data[:64].lstrip().lower()
    if not data:
        return "empty file"
    if data.startswith(b"%PDF"):
        return "PDF document"
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return "HTML/XML/SVG text"
    if head.startswith((b"{", b"[")):
        return "JSON text"
    if data.startswith(b"PK\x03\x04"):
        return "ZIP/Office document"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace")
        if brand in ("heic", "heix", "hevc", "heim", "heis", "mif1", "msf1"):
            return "HEIC image"
        if brand in ("avif", "avis"):
            return "AVIF image"
        return "MP4/QuickTime media"
    if data.startswith((b"OggS", b"ID3", b"RIFF")):
        return "audio/video media"
    return "unrecognised content"


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a GIF data sub-block chain (ends with a zero-length block)."""
    while True:
        if pos >= len(data):
            raise ValueError("truncated GIF data block")
        size = data[pos]
        pos += 1
        if size == 0:
            return pos
        pos += size


def gif_frame_count(data: bytes, stop_after: int = 2) -> int:
    """Number of image frames of a GIF (counting stops at `stop_after`); ValueError if malformed.

    Walks the block structure (GIF89a spec): header, logical screen descriptor, optional global
    colour table, then extensions (0x21) and image descriptors (0x2C) up to the trailer (0x3B).
    A file truncated after its first frame counts the frames seen.
    """
    if len(data) < 13 or data[:6] not in (b"GIF87a", b"GIF89a"):
        raise ValueError("not a GIF")
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 0x07) + 1) if flags & 0x80 else 0)
    frames = 0
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:
            break
        if block == 0x21:
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:
            frames += 1
            if frames >= stop_after:
                return frames
            if pos + 10 > len(data):
                raise ValueError("truncated GIF image descriptor")
            local = data[pos + 9]
            pos += 10 + (3 * 2 ** ((local & 0x07) + 1) if local & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # +1: LZW minimum code size
        else:
            raise ValueError(f"unexpected GIF block 0x{block:02x}")
    if frames == 0:
        raise ValueError("GIF without an image")
    return frames


def validate_image(data: bytes, max_bytes: int) -> str:
    """The sniffed mime type of an image OpenAI can read; raises ImageRejected otherwise."""
    if len(data) > max_bytes:
        raise ImageRejected("image_too_large", f"{len(data)} bytes, limit {max_bytes}")
    mime = sniff_image_mime(data)
    if mime is None:
        kind = describe_non_image(data)
        reason = "unsupported_image" if kind in ("HEIC image", "AVIF image") else "not_an_image"
        raise ImageRejected(reason, kind)
    if mime == "image/gif":
        try:
            frames = gif_frame_count(data)
        except ValueError as exc:
            raise ImageRejected("not_an_image", f"malformed GIF ({exc})") from None
        if frames > 1:
            raise ImageRejected("unsupported_image", "animated GIF")
    return mime


def upload_file_name(data: bytes, mime: str) -> str:
    """A content-derived file name for the Files API: never the customer's own file name."""
    return f"img-{hashlib.sha256(data).hexdigest()[:24]}.{EXTENSIONS.get(mime, 'bin')}"


def is_private_host(url: str) -> bool:
    """True when the URL's host is a loopback/private/link-local literal address or `localhost`."""
    host = (urlsplit(url).hostname or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_link_local or address.is_reserved


def check_attachment_url(url: str, *, allow_private: bool) -> str:
    """Validates a ManyChat attachment URL before we fetch it; returns it stripped.

    ManyChat attachments are public https URLs on Facebook's CDN. We refuse other schemes, URLs
    with credentials, and (unless `allow_private`, for local stand-in setups) loopback, private and
    link-local literal addresses, so a forged payload cannot make us probe the internal network.
    Host names are not resolved here; the fetcher re-checks every redirect target the same way.
    """
    value = url.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ImageRejected("image_download_failed", "attachment URL is not an http(s) URL")
    if parts.username or parts.password:
        raise ImageRejected("image_download_failed", "attachment URL carries credentials")
    if not allow_private and is_private_host(value):
        raise ImageRejected("image_download_failed", "attachment URL points to a private address")
    return value
