"""Where files live: attachments a business uploads, files a customer sends from the widget or the
app, and media copied from the platforms. Two engines behind one interface:

- **local disk** under the data directory (the embedded default of `threadline up`; with several
  replicas the folder must be a shared volume);
- an **S3-compatible object store** (AWS S3, MinIO, Ceph, R2, …) when
  `THREADLINE_OBJECT_STORE_URL=s3://bucket[/prefix]` is set, through aiobotocore; this is what a
  deployment with replicas on several machines uses.

Keys are `<app id>/<token>`: a folder per app on disk, a prefix per app in a bucket. An object is
written whole or not at all (a temporary file renamed into place; an S3 multipart upload
completed or aborted), so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from opentelemetry.trace import SpanKind

from shared.config import ObjectStoreSettings, S3Settings
from shared.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

CHUNK_BYTES = 256 * 1024
# S3 parts are at least 5 MiB but the last; larger parts mean fewer requests for big videos.
S3_PART_BYTES = 8 * 1024 * 1024
# Segments never start with a dot: no `..`, no hidden files.
_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,69}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,69})*$")


class ObjectStoreError(Exception):
    """The store could not be reached or refused an operation (worth retrying later)."""


def check_key(key: str) -> str:
    """`key` when it is safe as a path and an S3 key (segments of letters, digits, `._-`, never
    starting with a dot)."""
    if not _KEY.match(key):
        raise ValueError(f"unsafe object key {key!r}")
    return key


@dataclass
class StoredObject:
    """An object opened for reading. `path` is set on local disk (served with sendfile)."""

    size: int
    media_type: str
    path: Path | None = None
    _body: Any = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The object's bytes, a chunk at a time."""
        if self.path is not None:
            handle = await asyncio.to_thread(open, self.path, "rb")
            try:
                while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                    yield chunk
            finally:
                await asyncio.to_thread(handle.close)
            return
        async with self._body as body:
            async for chunk in body.iter_chunks(CHUNK_BYTES):
                yield chunk[0] if isinstance(chunk, tuple) else chunk

    async def read(self) -> bytes:
        """The whole object (for small objects only)."""
        return b"".join([chunk async for chunk in self.chunks()])


class ObjectStore(Protocol):
    """Whole objects by key; see the module docstring."""

    description: str

    async def put(self, key: str, chunks: AsyncIterator[bytes], media_type: str) -> int:
        """Store what `chunks` yields under `key` (replacing it); the size. If `chunks` raises,
        nothing is stored and the exception goes on."""

    async def open(self, key: str) -> StoredObject | None:
        """The object under `key`, or None."""

    async def delete(self, keys: list[str]) -> None:
        """Delete these objects (missing ones are no error)."""

    def older_than(self, prefix: str, cutoff: float) -> AsyncIterator[list[str]]:
        """Keys under `prefix` (`<app id>/`, or "" for every app) last written before `cutoff`
        (epoch seconds), in batches."""


async def put_bytes(store: ObjectStore, key: str, data: bytes, media_type: str) -> int:
    """Store `data` under `key`."""
    async def once() -> AsyncIterator[bytes]:
        yield data
    return await store.put(key, once(), media_type)


# --- local disk ------------------------------------------------------------------------------------

class LocalObjectStore:
    """Objects as files `<root>/<key>`. A file does not carry its media type (the caller's record
    of the object does), so `open` says `application/octet-stream`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"local disk ({root})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, chunks: AsyncIterator[bytes], media_type: str) -> int:
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        size = 0
        handle = await asyncio.to_thread(open, partial, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                await asyncio.to_thread(handle.write, chunk)
        except BaseException:
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(_unlink, partial)
            raise
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(os.replace, partial, path)
        return size

    async def open(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            return None
        return StoredObject(size=size, media_type="application/octet-stream", path=path)

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            await asyncio.to_thread(_unlink, self._path(key))

    async def older_than(self, prefix: str, cutoff: float) -> AsyncIterator[list[str]]:
        folders = [self.root / prefix.rstrip("/")] if prefix else await asyncio.to_thread(_children, self.root)
        for folder in folders:
            files = await asyncio.to_thread(_children, folder)
            # Uploads cut short (`.part`) and anything else that is no key are old junk too.
            old = [f"{folder.name}/{file.name}" for file in files if _mtime(file) < cutoff]
            for start in range(0, len(old), 500):
                yield old[start:start + 500]

    async def close(self) -> None:
        """Nothing to release."""


def _children(directory: Path) -> list[Path]:
    try:
        return [child for child in directory.iterdir() if not child.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        path.unlink()


# --- S3 ----------------------------------------------------------------------------------------------

class S3ObjectStore:
    """Objects in a bucket, under an optional prefix; one aiobotocore client for the process."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.description = f"s3://{settings.bucket}/{settings.prefix}" + (
            f" at {settings.endpoint_url}" if settings.endpoint_url else "")
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def start(self) -> S3ObjectStore:
        """Open the client (credentials from the settings, else the default AWS chain)."""
        settings = self.settings
        config = AioConfig(s3={"addressing_style": settings.addressing_style}, retries={"max_attempts": 3,
                           "mode": "standard"}, connect_timeout=10, read_timeout=60,
                           # Checksums on every request are what AWS wants and some compatible
                           # servers refuse; only when an operation requires one.
                           request_checksum_calculation="when_required",
                           response_checksum_validation="when_required")
        self._client = await self._stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
            aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
            config=config))
        return self

    async def close(self) -> None:
        """Close the client."""
        await self._stack.aclose()

    def _key(self, key: str) -> str:
        return f"{self.prefix}{check_key(key)}"

    async def put(self, key: str, chunks: AsyncIterator[bytes], media_type: str) -> int:
        full = self._key(key)
        with _tracer.start_as_current_span("S3 PutObject", kind=SpanKind.CLIENT) as span:
            span.set_attribute("aws.s3.bucket", self.bucket)
            buffer = bytearray()
            upload_id: str | None = None
            parts: list[dict[str, Any]] = []
            size = 0
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    buffer += chunk
                    if len(buffer) >= S3_PART_BYTES:
                        if upload_id is None:
                            upload_id = (await self._call("create_multipart_upload", Bucket=self.bucket,
                                                          Key=full, ContentType=media_type))["UploadId"]
                        parts.append(await self._part(full, upload_id, len(parts) + 1, bytes(buffer)))
                        buffer.clear()
                if upload_id is None:
                    await self._call("put_object", Bucket=self.bucket, Key=full, Body=bytes(buffer),
                                     ContentType=media_type)
                else:
                    if buffer:
                        parts.append(await self._part(full, upload_id, len(parts) + 1, bytes(buffer)))
                    await self._call("complete_multipart_upload", Bucket=self.bucket, Key=full,
                                     UploadId=upload_id, MultipartUpload={"Parts": parts})
            except BaseException:
                if upload_id is not None:
                    with contextlib.suppress(Exception):
                        await self._call("abort_multipart_upload", Bucket=self.bucket, Key=full,
                                         UploadId=upload_id)
                raise
            span.set_attribute("aws.s3.size", size)
            return size

    async def _part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        answer = await self._call("upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id,
                                  PartNumber=number, Body=data)
        return {"ETag": answer["ETag"], "PartNumber": number}

    async def open(self, key: str) -> StoredObject | None:
        with _tracer.start_as_current_span("S3 GetObject", kind=SpanKind.CLIENT):
            try:
                answer = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise ObjectStoreError(f"S3 GetObject failed: {exc}") from exc
            except Exception as exc:
                raise ObjectStoreError(f"S3 GetObject failed: {exc}") from exc
        return StoredObject(size=int(answer["ContentLength"]),
                            media_type=str(answer.get("ContentType") or "application/octet-stream"),
                            _body=answer["Body"])

    async def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start:start + 1000]]
            if batch:
                await self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    async def older_than(self, prefix: str, cutoff: float) -> AsyncIterator[list[str]]:
        paginator = self._client.get_paginator("list_objects_v2")
        limit = dt.datetime.fromtimestamp(min(cutoff, 32503680000.0), dt.UTC)  # year 3000 at most
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{prefix}"):
                keys = [str(item["Key"])[len(self.prefix):] for item in page.get("Contents", [])
                        if item["LastModified"] < limit]
                if keys:
                    yield keys
        except Exception as exc:
            raise ObjectStoreError(f"S3 ListObjectsV2 failed: {exc}") from exc

    async def _call(self, operation: str, **params: Any) -> Any:
        try:
            return await getattr(self._client, operation)(**params)
        except Exception as exc:
            raise ObjectStoreError(f"S3 {operation} failed: {exc}") from exc


@contextlib.asynccontextmanager
async def open_object_store(settings: ObjectStoreSettings) -> AsyncIterator[ObjectStore]:
    """The store the settings name, open for the lifetime of the context."""
    if settings.s3 is None:
        yield LocalObjectStore(settings.local_root)
        return
    store = await S3ObjectStore(settings.s3).start()
    log.info("files are kept in %s", store.description)
    try:
        yield store
    finally:
        await store.close()


def epoch_now() -> float:
    """Seconds since the epoch (the clock objects' ages are measured by)."""
    return time.time()
