"""Vision's pure image checks: which messages are images, magic-byte sniffing, limits, URLs."""

from __future__ import annotations

import contextlib
import struct
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.records import InboundMessage
from services.vision import images
from services.vision.images import ImageRejected


def png_bytes(width: int = 1, height: int = 1) -> bytes:
    """A real (tiny) PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 32 + b"\xff\xd9"
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00" + b"\x00" * 24
GIF_HEAD = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
GIF_FRAME = b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00"
NETSCAPE = b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
GIF_STILL = GIF_HEAD + GIF_FRAME + b";"
GIF_ANIMATED = GIF_HEAD + NETSCAPE + GIF_FRAME + GIF_FRAME + b";"
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"


def message(**over: Any) -> InboundMessage:
    base: dict[str, Any] = {
        "event_id": "e1", "customer_key": "wati:50370000001", "channel": "wati",
        "provider_id": "50370000001", "message_type": "image", "text": None, "caption": None,
        "media_ref": "data/images/a.jpg", "media_mime": "image/jpeg", "sender_name": None,
        "provider_message_ids": [], "provider_time": datetime(2026, 1, 1, tzinfo=UTC),
        "received_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    base.update(over)
    return base  # type: ignore[return-value]


# -- which messages are images --------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "mime", "ref", "expected"), [
    ("image", "image/jpeg", "data/images/a.jpg", True),
    ("sticker", "image/webp", "data/stickers/s.webp", True),
    ("IMAGE", None, "data/images/a.jpg", True),
    ("document", "image/png", "data/documents/receipt.png", True),
    ("document", "application/pdf", "data/documents/x.pdf", False),
    ("document", "image/png", None, False),
    ("document", None, "data/documents/x", False),
    ("text", None, None, False),
    ("video", "video/mp4", "data/videos/v.mp4", False),
    ("audio", "audio/ogg", "data/audios/a.ogg", False),
])
def test_is_image_message(kind: str, mime: str | None, ref: str | None, expected: bool) -> None:
    assert images.is_image_message(message(message_type=kind, media_mime=mime, media_ref=ref)) is expected


def test_images_of_keeps_message_order_and_dedupes_media_refs() -> None:
    msgs = [
        message(event_id="1", message_type="text", media_ref=None, text="hola"),
        message(event_id="2", media_ref="data/images/b.jpg"),
        message(event_id="3", media_ref="data/images/a.jpg"),
        message(event_id="4", media_ref="data/images/b.jpg"),
        message(event_id="5", message_type="document", media_mime="image/png", media_ref="data/d/r.png"),
    ]
    found = images.images_of(msgs)
    assert [r.media_ref for r in found] == ["data/images/b.jpg", "data/images/a.jpg", "data/d/r.png"]
    assert [r.message["event_id"] for r in found] == ["2", "3", "5"]


def test_image_without_media_ref_is_reported_not_ignored() -> None:
    found = images.images_of([message(media_ref=None), message(event_id="2", media_ref="  ")])
    assert [r.media_ref for r in found] == [""]  # one entry: both have no reference


# -- sniffing and validation ---------------------------------------------------------------------
@pytest.mark.parametrize(("data", "mime"), [
    (png_bytes(), "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp"), (GIF_STILL, "image/gif"),
])
def test_supported_images_are_recognised_by_their_bytes(data: bytes, mime: str) -> None:
    assert images.sniff_image_mime(data) == mime
    assert images.validate_image(data, max_bytes=1024) == mime


@pytest.mark.parametrize(("data", "reason", "detail"), [
    (PDF, "not_an_image", "PDF document"),
    (b"<!DOCTYPE html><html><body>Login</body></html>", "not_an_image", "HTML/XML/SVG text"),
    (b'{"result": false, "info": "File not found"}', "not_an_image", "JSON text"),
    (b"", "not_an_image", "empty file"),
    (b"PK\x03\x04" + b"\x00" * 30, "not_an_image", "ZIP/Office document"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not_an_image", "audio/video media"),
    (HEIC, "unsupported_image", "HEIC image"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "unsupported_image", "AVIF image"),
    (b"just some text", "not_an_image", "unrecognised content"),
    (GIF_ANIMATED, "unsupported_image", "animated GIF"),
])
def test_non_images_and_unsupported_images_are_rejected_with_a_reason(
    data: bytes, reason: str, detail: str
) -> None:
    with pytest.raises(ImageRejected) as caught:
        images.validate_image(data, max_bytes=1024)
    assert caught.value.reason == reason
    assert detail in caught.value.detail


def test_declared_type_is_ignored_only_bytes_count() -> None:
    # a PDF named .jpg is still a PDF
    assert images.sniff_image_mime(PDF) is None
    assert images.sniff_image_mime(b"\x89PNX") is None
    assert images.sniff_image_mime(b"RIFF\x00\x00\x00\x00WAVE") is None


def test_size_limit_is_inclusive_and_checked_before_sniffing() -> None:
    data = png_bytes(8, 8)
    assert images.validate_image(data, max_bytes=len(data)) == "image/png"
    with pytest.raises(ImageRejected) as caught:
        images.validate_image(data, max_bytes=len(data) - 1)
    assert caught.value.reason == "image_too_large"
    with pytest.raises(ImageRejected) as too_big_pdf:
        images.validate_image(PDF * 100, max_bytes=100)
    assert too_big_pdf.value.reason == "image_too_large"


def test_gif_frames_are_counted_by_structure() -> None:
    assert images.gif_frame_count(GIF_STILL) == 1
    assert images.gif_frame_count(GIF_ANIMATED) == 2
    # a local colour table and a truncated tail after the first frame
    local = GIF_HEAD + b",\x00\x00\x00\x00\x01\x00\x01\x00\x80" + b"\x00" * 6 + b"\x02\x02D\x01\x00"
    assert images.gif_frame_count(local) == 1
    # no global colour table
    bare = b"GIF87a\x01\x00\x01\x00\x00\x00\x00" + GIF_FRAME + b";"
    assert images.gif_frame_count(bare) == 1


@pytest.mark.parametrize("data", [
    GIF_HEAD + b";",                       # no frame
    GIF_HEAD + b"\x99",                    # unknown block
    GIF_HEAD + b"!\xf9\x04\x01\x00",       # truncated extension
    GIF_HEAD + b",\x00\x00",               # truncated descriptor
    b"GIF89a\x01",                         # truncated header
])
def test_malformed_gifs_are_not_images(data: bytes) -> None:
    with pytest.raises(ValueError):
        images.gif_frame_count(data)
    with pytest.raises(ImageRejected) as caught:
        images.validate_image(data, max_bytes=1024)
    assert caught.value.reason == "not_an_image"


@given(st.binary(max_size=300))
def test_validation_never_fails_other_than_by_rejection(data: bytes) -> None:
    try:
        assert images.validate_image(data, max_bytes=200) in images.EXTENSIONS
    except ImageRejected as exc:
        assert exc.reason in ("not_an_image", "unsupported_image", "image_too_large")


@given(st.binary(max_size=200))
def test_gif_parser_only_raises_value_error(tail: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert images.gif_frame_count(GIF_HEAD + tail) >= 1


def test_upload_file_name_is_content_derived_and_has_the_right_extension() -> None:
    name = images.upload_file_name(JPEG, "image/jpeg")
    assert name.startswith("img-") and name.endswith(".jpg")
    assert name == images.upload_file_name(JPEG, "image/jpeg")
    assert name != images.upload_file_name(JPEG + b"x", "image/jpeg")
    assert images.upload_file_name(WEBP, "image/webp").endswith(".webp")


# -- attachment URLs ----------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "https://scontent.xx.fbcdn.net/v/t1.15752-9/abc.jpg?oh=1&oe=2",
    "http://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1",
    "  https://cdn.example.com/a.png ",
])
def test_public_attachment_urls_pass(url: str) -> None:
    assert images.check_attachment_url(url, allow_private=False) == url.strip()


@pytest.mark.parametrize("url", [
    "ftp://cdn.example.com/a.png", "file:///etc/passwd", "data:image/png;base64,AAAA", "https://",
    "https://user:pw@cdn.example.com/a.png", "http://127.0.0.1:8080/a.png", "http://localhost/a.png",
    "http://10.0.0.5/a.png", "http://169.254.169.254/latest/meta-data", "http://[::1]/a.png",
    "http://192.168.1.10/a.png",
])
def test_unsafe_attachment_urls_are_refused(url: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        images.check_attachment_url(url, allow_private=False)
    assert caught.value.reason == "image_download_failed"


def test_private_addresses_allowed_only_when_asked() -> None:
    assert images.check_attachment_url("http://127.0.0.1:9/a.png", allow_private=True)
    with pytest.raises(ImageRejected):
        images.check_attachment_url("file:///etc/passwd", allow_private=True)
    assert images.is_private_host("http://127.0.0.1:8000")
    assert not images.is_private_host("https://api.manychat.com")
