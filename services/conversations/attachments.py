"""Attachments (SunCo v2 `POST /v2/apps/{appId}/attachments` and `…/attachments/remove`): files
a business uploads to send as image or file messages, kept in the object store
(`shared.objectstore`: local disk, or an S3-compatible bucket) and served at an unguessable public
URL, `/attachments/v1/{appId}/{token}/{filename}` — as are the files customers send from the
widget and the app and the media copied from the platforms (`shared.media`).

What is accepted is what `shared.media` allows, at most 50 MB (SunCo's limit). Served with
`X-Content-Type-Options: nosniff`, as an attachment unless it is an image, audio or video, and
with a sandboxing Content-Security-Policy. An attachment goes with its conversation, its user and
its app; `sweep` deletes the files no attachment row claims.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from multidict import MultiMapping

from services.conversations import models
from services.conversations.store import Store
from shared.http import ApiError
from shared.ids import now
from shared.media import (
    APP_ID,
    MAX_ATTACHMENT_BYTES,
    PATH_PREFIX,
    SERVED_HEADERS,
    TOKEN,
    disposition,
    object_key,
    parse_attachment_url,
)
from shared.objectstore import ObjectStore, ObjectStoreError, epoch_now
from shared.uploads import receive_source

log = logging.getLogger(__name__)

__all__ = ["MAX_ATTACHMENT_BYTES", "PATH_PREFIX", "Attachments", "Upload"]

# Files with no attachment row are deleted by the sweep once older than this. A message's files
# are recorded when conversations handles the message, which may wait in the stream while
# conversations is down or behind: a day covers any outage JetStream is sized for.
ORPHAN_GRACE_SECONDS = 24 * 3600.0
SWEEP_INTERVAL_SECONDS = 300.0


class Upload:
    """Where an upload is going: its app, and the conversation it is for (if named)."""

    def __init__(self, app_id: str, conversation_id: str | None) -> None:
        self.app_id = app_id
        self.conversation_id = conversation_id


class Attachments:
    """Upload, remove and serve the attachments kept in `files`."""

    def __init__(self, store: Store, files: ObjectStore, public_base_url: str) -> None:
        self.store = store
        self.files = files
        self.public_base_url = public_base_url.rstrip("/")

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
        """Store the multipart `source` file (streamed to the store, never whole in memory)."""
        stored = await receive_source(request, self.files, self.public_base_url, upload.app_id,
                                      MAX_ATTACHMENT_BYTES)
        await self.record(upload.app_id, stored.url, stored.media_type, stored.size, upload.conversation_id)
        return models.Attachment(media_url=stored.url, media_type=stored.media_type)

    async def record(self, app_id: str, url: str, media_type: str, size: int | None,
                     conversation_id: str | None) -> bool:
        """Record the attachment a URL of ours names (once; a second record changes nothing);
        whether it was one of this app's."""
        ref = parse_attachment_url(self.public_base_url, url)
        if ref is None or ref.app_id != app_id:
            return False
        async with self.store.tx():
            await self.store.add_attachment(ref.token, app_id, ref.filename, media_type, size or 0,
                                            conversation_id, now())
        return True

    async def remove(self, app_id: str, media_url: str) -> None:
        """Delete an attachment of this app by its URL; 404 when it names none."""
        ref = parse_attachment_url(self.public_base_url, media_url)
        if ref is None or ref.app_id != app_id or await self.store.attachment(app_id, ref.token) is None:
            raise ApiError(404, "Attachment not found", "attachment_not_found")
        async with self.store.tx():
            await self.store.delete_attachment(app_id, ref.token)
        try:
            await self.files.delete([object_key(app_id, ref.token)])
        except ObjectStoreError as exc:  # the sweep deletes it later: the row is gone
            log.warning("attachment file not deleted yet: %s", exc)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """GET an attachment by its public URL (no credentials: the token is the secret)."""
        app_id, token = request.match_info["app_id"], request.match_info["token"]
        row = (await self.store.attachment(app_id, token)
               if APP_ID.match(app_id) and TOKEN.match(token) else None)
        try:
            stored = await self.files.open(object_key(app_id, token)) if row is not None else None
        except ObjectStoreError as exc:
            log.error("attachment not served: %s", exc)
            raise web.HTTPServiceUnavailable(text="The file store is unavailable") from exc
        if row is None or stored is None:
            raise web.HTTPNotFound(text="Not found")
        media_type = str(row["media_type"])
        headers = {**SERVED_HEADERS, "Content-Type": media_type,
                   "Content-Disposition": disposition(media_type, str(row["filename"])),
                   "Cache-Control": "public, max-age=3600"}
        if stored.path is not None:
            return web.FileResponse(stored.path, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_length = stored.size
        await response.prepare(request)
        async for chunk in stored.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def sweep(self, older_than: float = ORPHAN_GRACE_SECONDS) -> int:
        """Delete the files whose attachment is gone (removed with its conversation, its user or
        its app, or a removal cut short) or never came (an upload abandoned half-way, a copy of a
        message that was never stored); the number deleted. A file younger than `older_than`
        seconds may belong to a message still on its way: kept."""
        removed = 0
        async for keys in self.files.older_than("", epoch_now() - older_than):
            by_app: dict[str, list[str]] = {}
            for key in keys:
                app_id, _, token = key.partition("/")
                by_app.setdefault(app_id, []).append(token)
            for app_id, tokens in by_app.items():
                valid = [token for token in tokens if TOKEN.match(token)] if APP_ID.match(app_id) else []
                kept = await self.store.attachment_ids(app_id, valid) if valid else set()
                doomed = [f"{app_id}/{token}" for token in tokens if token not in kept]
                await self.files.delete(doomed)
                removed += len(doomed)
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


