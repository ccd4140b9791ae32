"""Files in messages: what may be kept and served, under which names and URLs, and the copy of a
customer's media from a platform into Threadline's object store.

Every file Threadline keeps — a business's upload, a file a customer sends from the widget or the
app, a photo that arrived on WhatsApp — is an object `<app id>/<token>` in the object store
(`shared.objectstore`) and is served by `conversations` at
`<public base URL>/attachments/v1/<app id>/<token>/<file name>`. The token (192 random bits) is the
only secret of that URL. `conversations` records an attachment for every such URL it sees in a
message, so the file goes with its conversation, its user and its app, and a file that no message
or upload ever claimed is swept.

What is kept is what a channel can carry and a browser cannot be made to run: images, documents,
audio and video of the types below (never HTML, SVG or scripts), the declared type checked
against the file's first bytes where the format has a signature.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import msgspec
from aiohttp import web

from shared.messages.channel import InboundMessage
from shared.metrics import media_copied
from shared.objectstore import ObjectStore
from shared.sunco import FileContent, ImageContent

log = logging.getLogger(__name__)

MAX_ATTACHMENT_BYTES = 50 * 1024 * 1024
PATH_PREFIX = "/attachments/v1"
TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
APP_ID = re.compile(r"^[0-9a-f]{24}$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_FILENAME = 128
_HEAD_BYTES = 16

# The types a file in a message may have (what the channels carry), with the first bytes that
# prove them where a format has some.
ALLOWED_TYPES: dict[str, tuple[bytes, ...]] = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
    "application/pdf": (b"%PDF-",),
    "audio/mpeg": (),
    "audio/ogg": (b"OggS",),
    "audio/aac": (),
    "audio/mp4": (),
    "audio/amr": (b"#!AMR",),
    "video/mp4": (),
    "video/3gpp": (),
    "text/plain": (),
    "text/csv": (),
    "application/zip": (b"PK\x03\x04",),
    "application/msword": (b"\xd0\xcf\x11\xe0",),
    "application/vnd.ms-excel": (b"\xd0\xcf\x11\xe0",),
    "application/vnd.ms-powerpoint": (b"\xd0\xcf\x11\xe0",),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": (b"PK\x03\x04",),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": (b"PK\x03\x04",),
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": (b"PK\x03\x04",),
}
INLINE_PREFIXES = ("image/", "audio/", "video/")
ALLOWED_DESCRIPTION = "images (jpeg, png, gif, webp), pdf, audio, video, text, csv, zip, office documents"
# What a platform's file of another type is kept as: downloadable, never rendered.
OPAQUE_TYPE = "application/octet-stream"

class MediaRejected(ValueError):
    """A file that may not be kept: `status` is the HTTP status to answer (400, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def normal_type(media_type: str | None) -> str:
    """`type/subtype` lower-cased, without parameters."""
    return (media_type or "").split(";", 1)[0].strip().lower()


def safe_filename(name: str | None, media_type: str) -> str:
    """The name to keep and serve: its last path segment, letters, digits, `._ -` only, at most
    128 characters, never empty nor hidden."""
    # Percent-decoded first (some clients encode the name), so an encoded path is a path too.
    base = unquote(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE_NAME.sub("_", base).strip(" ._")[:MAX_FILENAME].strip(" ._")
    if not base:
        base = "file" if "/" not in media_type else media_type.split("/", 1)[0]
    return base


def named_file(name: str | None, media_type: str) -> str:
    """`safe_filename`, with the extension of its type when it has none: a photo that came
    without a name is `image.jpg`."""
    safe = safe_filename(name, media_type)
    extension = mimetypes.guess_extension(media_type) if media_type != OPAQUE_TYPE else None
    return safe if "." in safe or not extension else safe + extension


def content_matches(media_type: str, head: bytes) -> bool:
    """Whether the file's first bytes fit its declared type (types without a signature pass)."""
    signatures = ALLOWED_TYPES.get(media_type, ())
    if not signatures:
        return True
    if media_type == "image/webp":
        return head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    return any(head.startswith(signature) for signature in signatures)


def check_type(media_type: str) -> str:
    """`media_type` when a file of it may be kept; MediaRejected(415) otherwise."""
    if media_type not in ALLOWED_TYPES:
        raise MediaRejected(415, f"Files of type {media_type or 'unknown'} cannot be attached; allowed: "
                                 f"{ALLOWED_DESCRIPTION}")
    return media_type


async def checked(chunks: AsyncIterator[bytes], media_type: str,
                  max_bytes: int = MAX_ATTACHMENT_BYTES) -> AsyncIterator[bytes]:
    """`chunks`, passed on while they stay within `max_bytes` (else MediaRejected 413) and their
    first bytes fit `media_type` (else 400); an empty file is a 400."""
    size = 0
    head = b""
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise MediaRejected(413, f"An attachment is at most {max_bytes // (1024 * 1024)} MB")
        if len(head) < _HEAD_BYTES:
            head += chunk[:_HEAD_BYTES - len(head)]
            if len(head) >= _HEAD_BYTES and not content_matches(media_type, head):
                raise MediaRejected(400, f"The file is not a {media_type} (its content says otherwise)")
        yield chunk
    if size == 0:
        raise MediaRejected(400, "The file is empty")
    if not content_matches(media_type, head):
        raise MediaRejected(400, f"The file is not a {media_type} (its content says otherwise)")


def new_token() -> str:
    """A fresh attachment token (192 random bits)."""
    return secrets.token_urlsafe(24)


def object_key(app_id: str, token: str) -> str:
    """The object store key of an attachment."""
    return f"{app_id}/{token}"


def attachment_url(public_base_url: str, app_id: str, token: str, filename: str) -> str:
    """The public URL of an attachment."""
    return f"{public_base_url.rstrip('/')}{PATH_PREFIX}/{app_id}/{token}/{quote(filename)}"


@dataclass(frozen=True)
class AttachmentRef:
    """What an attachment URL names."""

    app_id: str
    token: str
    filename: str


def parse_attachment_url(public_base_url: str, url: str) -> AttachmentRef | None:
    """The attachment a URL of ours names, or None for any other URL."""
    prefix = f"{public_base_url.rstrip('/')}{PATH_PREFIX}/"
    if not url.startswith(prefix):
        return None
    parts = urlsplit(url[len(prefix):]).path.split("/")
    if len(parts) != 3 or not APP_ID.match(parts[0]) or not TOKEN.match(parts[1]) or not parts[2]:
        return None
    return AttachmentRef(parts[0], parts[1], unquote(parts[2]))


@dataclass(frozen=True)
class StoredFile:
    """A file kept: its public URL, type and size."""

    url: str
    media_type: str
    size: int


async def store_file(store: ObjectStore, public_base_url: str, app_id: str, chunks: AsyncIterator[bytes],
                     media_type: str, filename: str | None, max_bytes: int = MAX_ATTACHMENT_BYTES) -> StoredFile:
    """Keep a file of an allowed type, checked as it streams in (MediaRejected otherwise)."""
    check_type(media_type)
    name = safe_filename(filename, media_type)
    token = new_token()
    size = await store.put(object_key(app_id, token), checked(chunks, media_type, max_bytes), media_type)
    return StoredFile(attachment_url(public_base_url, app_id, token, name), media_type, size)


# --- copying a customer's media from a platform ------------------------------------------------------

@dataclass
class Download:
    """A platform file being downloaded: its declared type and name, and its bytes."""

    media_type: str | None
    filename: str | None
    chunks: AsyncIterator[bytes]


SERVED_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


def served_type(media_type: str | None) -> str:
    """The type a file is served as: its own when it may be kept, else an opaque download (a
    customer's HTML or SVG never renders on the gateway's origin)."""
    declared = normal_type(media_type)
    return declared if declared in ALLOWED_TYPES else OPAQUE_TYPE


def disposition(media_type: str, filename: str | None = None) -> str:
    """`inline` for images, audio and video, else `attachment` (with the safe name, if any)."""
    kind = "inline" if media_type.startswith(INLINE_PREFIXES) else "attachment"
    return f'{kind}; filename="{safe_filename(filename, media_type)}"' if filename else kind


async def relay(request: web.Request, download: Download) -> web.StreamResponse:
    """Stream a platform download to the client (a channel's media passthrough URL), with the
    same protections as an attachment: an allowed type or a download, nosniff, a sandbox."""
    media_type = served_type(download.media_type)
    response = web.StreamResponse(status=200, headers={
        **SERVED_HEADERS, "Content-Disposition": disposition(media_type, download.filename),
        "Cache-Control": "private, max-age=300"})
    response.content_type = media_type
    await response.prepare(request)
    async for chunk in download.chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


# A channel's download of a message's media URL: a context that yields the download (None when
# the platform no longer has the file) and closes the connection when left.
Downloader = Callable[[InboundMessage, str], AbstractAsyncContextManager[Download | None]]


class MediaCopier:
    """Copies the media of a channel's inbound messages into the object store before they are
    published, so that history keeps the file after the platform's URL expires.

    A copy is bounded in time and size; when it fails (the platform is slow, the file is too big
    or of a type that may not be kept), the message goes on with the platform's URL — a customer
    message is never held back or dropped for its attachment — and the failure is counted."""

    def __init__(self, store: ObjectStore, public_base_url: str, channel: str, *, timeout: float = 15.0,
                 max_bytes: int = MAX_ATTACHMENT_BYTES) -> None:
        self.store = store
        self.public_base_url = public_base_url
        self.channel = channel
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def copied(self, messages: Sequence[InboundMessage], download: Downloader) -> list[InboundMessage]:
        """`messages`, those with an image or a file pointing to the copy (in the same order)."""
        if not any(_media_of(message) for message in messages):
            return list(messages)
        return list(await asyncio.gather(*(self._copy(message, download) for message in messages)))

    async def _copy(self, message: InboundMessage, download: Downloader) -> InboundMessage:
        content = _media_of(message)
        if content is None or content.media_url is None:
            return message
        try:
            async with asyncio.timeout(self.timeout), download(message, content.media_url) as fetched:
                if fetched is None:
                    media_copied(self.channel, "unavailable")
                    return message
                # The download's type, else the webhook's (a CDN may answer octet-stream).
                kept_type = next((candidate for candidate in (normal_type(fetched.media_type),
                                                              normal_type(content.media_type))
                                  if candidate in ALLOWED_TYPES), OPAQUE_TYPE)
                name = named_file(content.alt_text or fetched.filename, kept_type)
                token = new_token()
                await self.store.put(object_key(message.app_id, token),
                                     _bounded(fetched.chunks, self.max_bytes), kept_type)
        except Exception as exc:  # whatever went wrong, the message goes on
            outcome = "too_large" if isinstance(exc, MediaRejected) else "failed"
            media_copied(self.channel, outcome)
            log.warning("%s media of message %s not copied (%s): kept the platform's URL", self.channel,
                        message.provider_message_id, exc)
            return message
        media_copied(self.channel, "copied")
        url = attachment_url(self.public_base_url, message.app_id, token, name)
        return msgspec.structs.replace(message, content=msgspec.structs.replace(
            content, media_url=url, media_type=kept_type))


def _media_of(message: InboundMessage) -> ImageContent | FileContent | None:
    content = message.content
    return content if isinstance(content, ImageContent | FileContent) and content.media_url else None


async def _bounded(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise MediaRejected(413, f"larger than {max_bytes // (1024 * 1024)} MB")
        yield chunk
