"""Attachments (SunCo v2 `POST /v2/apps/{appId}/attachments` and `…/attachments/remove`): files
a business uploads to send as image or file messages, kept under the data directory and served at
an unguessable public URL, `/attachments/v1/{appId}/{token}/{filename}`.

What is accepted is what a channel can carry and a browser cannot be made to run: images,
documents, audio and video of the types below (never HTML, SVG or scripts), at most 50 MB
(SunCo's limit), the declared type checked against the file's first bytes where they tell.
The name a file arrives with is reduced to a safe one (no path, no control characters).
Served with `X-Content-Type-Options: nosniff`, as an attachment unless it is an image, audio or
video, and with a sandboxing Content-Security-Policy.

Files are on the local disk: with several `conversations` replicas they need a shared volume
(an S3-compatible store is the next step, see the README). An attachment goes with its
conversation, its user and its app; `sweep` deletes the files left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from aiohttp import BodyPartReader, web
from multidict import MultiMapping

from services.conversations import models
from services.conversations.store import Store
from shared.http import ApiError
from shared.ids import now

log = logging.getLogger(__name__)

MAX_ATTACHMENT_BYTES = 50 * 1024 * 1024
# Files with no attachment row are deleted by the sweep once older than this (an upload records
# its row right after its file).
ORPHAN_GRACE_SECONDS = 600.0
SWEEP_INTERVAL_SECONDS = 300.0
PATH_PREFIX = "/attachments/v1"
_CHUNK = 256 * 1024
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
_APP_ID = re.compile(r"^[0-9a-f]{24}$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_FILENAME = 128

# The types a business may send (what the channels carry), with the first bytes that prove them
# where a format has some.
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


def content_matches(media_type: str, head: bytes) -> bool:
    """Whether the file's first bytes fit its declared type (types without a signature pass)."""
    signatures = ALLOWED_TYPES[media_type]
    if not signatures:
        return True
    if media_type == "image/webp":
        return head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    return any(head.startswith(signature) for signature in signatures)


@dataclass(frozen=True)
class Upload:
    """Where an upload is going: its app, and the conversation it is for (if named)."""

    app_id: str
    conversation_id: str | None


class Attachments:
    """Upload, remove and serve attachments kept under `root`."""

    def __init__(self, store: Store, root: Path, public_base_url: str) -> None:
        self.store = store
        self.root = root
        self.public_base_url = public_base_url.rstrip("/")

    def _path(self, app_id: str, token: str) -> Path:
        return self.root / app_id / token

    def media_url(self, app_id: str, token: str, filename: str) -> str:
        return f"{self.public_base_url}{PATH_PREFIX}/{app_id}/{token}/{quote(filename)}"

    async def check_upload(self, app_id: str, query: MultiMapping[str]) -> Upload:
        """400 unless the query asks for what SunCo offers: public access, for a message, in a
        conversation of this app when one is named."""
        if query.get("access") != "public":
            raise ApiError(400, "access must be public (private attachments are not supported)")
        if query.get("for") not in (None, "message"):
            raise ApiError(400, "for must be message")
        conversation_id = query.get("conversationId")
        if conversation_id is not None and await self.store.get_conversation(app_id, conversation_id) is None:
            raise ApiError(404, "Conversation not found", "conversation_not_found")
        return Upload(app_id, conversation_id)

    async def upload(self, upload: Upload, request: web.Request) -> models.Attachment:
        """Store the multipart `source` file (streamed to disk, never whole in memory)."""
        if not request.content_type.startswith("multipart/form-data"):
            raise ApiError(415, "Content-Type must be multipart/form-data with the file as `source`")
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and (not isinstance(part, BodyPartReader) or part.name != "source"):
            part = await reader.next()
        if part is None or not isinstance(part, BodyPartReader):
            raise ApiError(400, "The file must be sent as the multipart field `source`")
        media_type = (part.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media_type not in ALLOWED_TYPES:
            raise ApiError(415, f"Files of type {media_type or 'unknown'} cannot be attached; allowed: images "
                                "(jpeg, png, gif, webp), pdf, audio, video, text, office documents")
        filename = safe_filename(part.filename, media_type)
        token = secrets.token_urlsafe(24)
        path = self._path(upload.app_id, token)
        size = await self._write(part, path, media_type)
        try:
            async with self.store.tx():
                await self.store.add_attachment(token, upload.app_id, filename, media_type, size,
                                                upload.conversation_id, now())
        except BaseException:
            await asyncio.to_thread(_unlink, path)
            raise
        return models.Attachment(media_url=self.media_url(upload.app_id, token, filename), media_type=media_type)

    async def _write(self, part: BodyPartReader, path: Path, media_type: str) -> int:
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        size = 0
        head = b""
        handle = await asyncio.to_thread(open, partial, "wb")
        try:
            while chunk := await part.read_chunk(_CHUNK):
                size += len(chunk)
                if size > MAX_ATTACHMENT_BYTES:
                    raise ApiError(413, f"An attachment is at most {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MB")
                if len(head) < 16:
                    head += chunk[:16 - len(head)]
                await asyncio.to_thread(handle.write, chunk)
            if size == 0:
                raise ApiError(400, "The file is empty")
            if not content_matches(media_type, head):
                raise ApiError(400, f"The file is not a {media_type} (its content says otherwise)")
        except BaseException:
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(_unlink, partial)
            raise
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(os.replace, partial, path)
        return size

    def _token_of(self, app_id: str, media_url: str) -> str | None:
        prefix = f"{self.public_base_url}{PATH_PREFIX}/{app_id}/"
        if not media_url.startswith(prefix):
            return None
        token = media_url[len(prefix):].split("/", 1)[0]
        return token if _TOKEN.match(token) else None

    async def remove(self, app_id: str, media_url: str) -> None:
        """Delete an attachment of this app by its URL; 404 when it names none."""
        token = self._token_of(app_id, media_url)
        if token is None or await self.store.attachment(app_id, token) is None:
            raise ApiError(404, "Attachment not found", "attachment_not_found")
        async with self.store.tx():
            await self.store.delete_attachment(app_id, token)
        await asyncio.to_thread(_unlink, self._path(app_id, token))

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """GET an attachment by its public URL (no credentials: the token is the secret)."""
        app_id, token = request.match_info["app_id"], request.match_info["token"]
        row = (await self.store.attachment(app_id, token)
               if _APP_ID.match(app_id) and _TOKEN.match(token) else None)
        path = self._path(app_id, token) if row is not None else None
        if row is None or path is None or not await asyncio.to_thread(path.is_file):
            raise web.HTTPNotFound(text="Not found")
        media_type = str(row["media_type"])
        disposition = "inline" if media_type.startswith(INLINE_PREFIXES) else "attachment"
        return web.FileResponse(path, headers={
            "Content-Type": media_type,
            "Content-Disposition": f"{disposition}; filename=\"{row['filename']}\"",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "public, max-age=3600",
        })


    async def sweep(self, older_than: float = ORPHAN_GRACE_SECONDS) -> int:
        """Delete the files whose attachment is gone (removed with its conversation, its user or
        its app, or a removal cut short), and uploads abandoned half-way; the number deleted.
        A file younger than `older_than` seconds may be an upload still being recorded: kept."""
        removed = 0
        for app_dir in await asyncio.to_thread(_children, self.root):
            if not _APP_ID.match(app_dir.name):
                continue
            cutoff = time.time() - older_than
            files = [f for f in await asyncio.to_thread(_children, app_dir) if _mtime(f) < cutoff]
            for batch in (files[i:i + 500] for i in range(0, len(files), 500)):
                kept = await self.store.attachment_ids(app_dir.name, [f.name for f in batch])
                for file in batch:
                    if file.name not in kept:
                        await asyncio.to_thread(_unlink, file)
                        removed += 1
        return removed

    async def sweep_forever(self, interval: float = SWEEP_INTERVAL_SECONDS,
                            is_sweeper: Callable[[], bool] = lambda: True) -> None:
        """`sweep` now and every `interval` seconds while this replica is the sweeper."""
        while True:
            if is_sweeper():
                try:
                    removed = await self.sweep()
                    if removed:
                        log.info("removed %d attachment files no longer attached", removed)
                except Exception:
                    log.exception("attachment sweep failed")
            await asyncio.sleep(interval)


def _children(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
