"""The rules for files in messages (`shared.media`): names, URLs, type and size checks, and the
copy of platform media, which never holds a message back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.media import (
    Download,
    MediaCopier,
    MediaRejected,
    attachment_url,
    checked,
    named_file,
    object_key,
    parse_attachment_url,
)
from shared.messages.channel import InboundMessage
from shared.objectstore import LocalObjectStore, check_key
from shared.sunco import ImageContent, TextContent

BASE = "https://chat.example.com"
APP = "6b1601853b3c55ef40c1a41d"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def test_attachment_urls_round_trip_and_nothing_else_parses() -> None:
    url = attachment_url(BASE, APP, "A" * 32, "my photo.png")
    ref = parse_attachment_url(BASE, url)
    assert ref is not None and (ref.app_id, ref.token, ref.filename) == (APP, "A" * 32, "my photo.png")
    for other in (f"https://evil.example/attachments/v1/{APP}/{'A' * 32}/x.png",
                  f"{BASE}/attachments/v1/{APP}/../x.png", f"{BASE}/attachments/v1/{APP[:-1]}/{'A' * 32}/x",
                  f"{BASE}/attachments/v1/{APP}/{'A' * 32}", f"{BASE}/attachments/v1/{APP}/short/x.png"):
        assert parse_attachment_url(BASE, other) is None, other


def test_names_get_an_extension_and_keys_stay_inside_the_store() -> None:
    assert named_file(None, "image/png") == "image.png"
    assert named_file("sticker", "image/webp") == "sticker.webp"
    assert named_file("../../etc/passwd", "application/pdf") == "passwd.pdf"
    assert named_file("report.final.pdf", "application/pdf") == "report.final.pdf"
    for bad in ("../x", "a/../b", ".hidden", "a//b", "/abs", "a\\b"):
        with pytest.raises(ValueError):
            check_key(bad)
    assert check_key(object_key(APP, "tok_en-1.part")) == f"{APP}/tok_en-1.part"


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_checked_refuses_lies_oversize_and_empty_files() -> None:
    assert b"".join([c async for c in checked(_chunks(PNG[:4], PNG[4:]), "image/png")]) == PNG
    for chunks, media_type, status in ((_chunks(b"<html><script>x</script>"), "image/png", 400),
                                       (_chunks(PNG, b"\x00" * 100), "image/png", 413),
                                       (_chunks(), "application/pdf", 400)):
        with pytest.raises(MediaRejected) as refused:
            async for _ in checked(chunks, media_type, max_bytes=64):
                pass
        assert refused.value.status == status


def _message(provider_id: str, content: ImageContent | TextContent) -> InboundMessage:
    return InboundMessage(app_id=APP, integration_id="i" * 24, channel="whatsapp", client_type="whatsapp",
                          channel_user_id="15551234567", provider_message_id=provider_id, received_at=1.0,
                          content=content)


async def test_the_copier_rewrites_copied_media_and_keeps_the_platform_url_when_a_copy_fails(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    copier = MediaCopier(store, BASE, "whatsapp", max_bytes=1024)

    @contextlib.asynccontextmanager
    async def download(message: InboundMessage, url: str) -> AsyncIterator[Download | None]:
        if url.endswith("/gone"):
            yield None
        elif url.endswith("/broken"):
            raise ConnectionResetError("platform hung up")
        elif url.endswith("/huge"):
            yield Download("image/png", None, _chunks(PNG, b"\x00" * 2048))
        else:
            yield Download("text/html", "evil.html", _chunks(PNG))  # the CDN lies about the type

    messages = [_message(f"m{index}", ImageContent(media_url=f"https://cdn.example/{tail}", media_type="image/png"))
                for index, tail in enumerate(("ok", "gone", "broken", "huge"))]
    messages.append(_message("text", TextContent(text="hi")))
    copied = await copier.copied(messages, download)
    assert [m.provider_message_id for m in copied] == ["m0", "m1", "m2", "m3", "text"]
    first = copied[0].content
    assert isinstance(first, ImageContent) and first.media_type == "image/png"  # never text/html
    ref = parse_attachment_url(BASE, first.media_url or "")
    assert ref is not None and ref.filename == "evil.html"
    stored = await store.open(object_key(APP, ref.token))
    assert stored is not None and await stored.read() == PNG
    assert [m.content for m in copied[1:]] == [m.content for m in messages[1:]]
    # Nothing half-written is left of the oversized download.
    assert sorted(p.name for p in (tmp_path / APP).iterdir()) == [ref.token]
