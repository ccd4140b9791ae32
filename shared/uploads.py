"""Receiving an uploaded file: a `multipart/form-data` request with the file in the field
`source` (as SunCo's attachment upload), streamed into the object store by
`shared.media.store_file` — never whole in memory, its type and first bytes checked as it comes
in — and answered with SunCo's error body when refused.

The SDK services' `POST …/attachments` (`shared.sdk_service`) use it; the business API's upload
(`services/conversations/attachments.py`) reads the same form.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web

from shared.http import ApiError
from shared.media import MediaRejected, StoredFile, normal_type, store_file
from shared.objectstore import ObjectStore, ObjectStoreError

log = logging.getLogger(__name__)

SOURCE_FIELD = "source"
CHUNK_BYTES = 256 * 1024
# What a multipart body may carry besides the file: the boundaries, the part headers, a small
# field or two. A body declared larger than the file limit plus this is refused before it is read.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Parts looked at before `source` (each read and dropped, counted against the limit).
MAX_PARTS = 8


def describe_size(size: int) -> str:
    """`25 MB`, `1.5 MB`, `64 KB`, `100 bytes` (binary units, as the limits are set; rounded
    down, so a file of the size said is never refused)."""
    for unit, name in ((1024 * 1024, "MB"), (1024, "KB")):
        if size >= unit:
            tenths = size * 10 // unit
            return f"{tenths // 10}{f'.{tenths % 10}' if tenths % 10 else ''} {name}"
    return f"{size} bytes"


def too_large(max_bytes: int) -> ApiError:
    """The 413 of a file over `max_bytes`."""
    return ApiError(413, f"A file is at most {describe_size(max_bytes)}")


async def receive_source(request: web.Request, files: ObjectStore, public_base_url: str, app_id: str,
                         max_bytes: int) -> StoredFile:
    """Store the request's multipart `source` file for `app_id` (at most `max_bytes`). Refused:
    415 not multipart or a type that may not be kept, 413 too large, 400 no `source`, an empty
    file or one whose first bytes are not its declared type; 503 when the store is unavailable."""
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"Content-Type must be multipart/form-data with the file as `{SOURCE_FIELD}`")
    if request.content_length is not None and request.content_length > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise too_large(max_bytes)
    try:
        part = await _source_part(request, max_bytes)
        media_type = normal_type(part.headers.get("Content-Type"))
        return await store_file(files, public_base_url, app_id, _chunks(part), media_type, part.filename,
                                max_bytes=max_bytes)
    except MediaRejected as exc:
        raise (too_large(max_bytes) if exc.status == 413 else ApiError(exc.status, str(exc))) from exc
    except ConnectionError:
        raise  # the client went away: no one to answer
    except (ObjectStoreError, OSError) as exc:  # OSError: the local disk (read-only, full)
        log.error("upload not stored: %s", exc)
        raise ApiError(503, "The file store is unavailable; try again") from exc
    except ValueError as exc:  # aiohttp's multipart parser: no or a wrong boundary, a cut body
        raise ApiError(400, f"Malformed multipart/form-data body: {exc}") from exc


async def _source_part(request: web.Request, max_bytes: int) -> BodyPartReader:
    """The `source` part; the parts before it are read and dropped (counted against the limit)."""
    reader = await request.multipart()
    skipped = 0
    for _ in range(MAX_PARTS):
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "A nested multipart body is not a file")
        if part.name == SOURCE_FIELD:
            return part
        while chunk := await part.read_chunk(CHUNK_BYTES):
            skipped += len(chunk)
            if skipped > MULTIPART_OVERHEAD_BYTES:
                raise too_large(max_bytes)
    raise ApiError(400, f"The file must be sent as the multipart field `{SOURCE_FIELD}`")


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_BYTES):
        yield chunk
