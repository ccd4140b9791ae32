"""Files the sandbox's phones send: a photo or a document, uploaded to the sandbox, kept, and then
served by each channel fake the way its platform serves a customer's media.

- `POST /sandbox/uploads` (multipart/form-data, the file as the field `file`; at most 25 MB, a
  photo or a document of the types below, the declared type checked against the file's first
  bytes) answers 201 `{"upload": {id, name, mediaType, size, sha256, width?, height?, url}}`.
- `GET /sandbox/uploads/{id}/{name}` serves it (its id is 144 random bits: the upload's only
  secret, as a CDN link's), `nosniff`, images inline and documents as downloads.
- A phone then sends it with its fake's `/inbound` scripting route, `{"from", "upload": id,
  "caption"?}`: the fake delivers the platform's own webhook for it — a WhatsApp media id
  resolved by the fake Graph media lookup and download, a Messenger attachment URL on the fake's
  CDN path, a Telegram photo or document whose file_id `getFile` and the file download resolve,
  a Twilio MMS whose MediaUrl0 is the fake's Media resource — each serving these bytes.

`MEDIA_RULES` says what each platform takes as a photo and as a document, and up to which size
(the page checks the same before uploading; the fakes check again when the phone sends).

Files live under `<data_dir>/sandbox-uploads/` with an index in `sandbox-uploads.jsonl` (memory
only without a data directory), so what the phones sent survives a sandbox restart like their
threads; at most `MAX_UPLOADS` files and `MAX_TOTAL_BYTES` are kept, the oldest dropped first.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from shared.http import ApiError
from shared.media import MediaRejected, checked, normal_type, safe_filename

from .journal import Journal
from .scripting import sunco_errors

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES: Final = 25 * 1024 * 1024
MAX_UPLOADS: Final = 500
MAX_TOTAL_BYTES: Final = 512 * 1024 * 1024
_CHUNK: Final = 64 * 1024
_MB: Final = 1024 * 1024
_ID_BYTES: Final = 18
_HEAD_BYTES: Final = 256 * 1024

IMAGE_TYPES: Final = ("image/jpeg", "image/png", "image/gif", "image/webp")
DOCUMENT_TYPES: Final = (
    "application/pdf", "text/plain", "text/csv", "application/zip", "application/msword",
    "application/vnd.ms-excel", "application/vnd.ms-powerpoint",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
)
UPLOAD_TYPES: Final = IMAGE_TYPES + DOCUMENT_TYPES


@dataclass(frozen=True)
class MediaRule:
    """What one platform takes from a customer: photo types, document types, and their sizes."""

    label: str
    photo_types: tuple[str, ...]
    document_types: tuple[str, ...]
    max_photo_bytes: int
    max_document_bytes: int

    def kind_of(self, upload: Upload) -> str:
        """"photo" or "document" for an upload this platform carries; ValueError (with what is
        wrong, for the person) otherwise."""
        if upload.media_type in self.photo_types:
            kind, limit = "photo", self.max_photo_bytes
        elif upload.media_type in self.document_types:
            kind, limit = "document", self.max_document_bytes
        else:
            raise ValueError(f"{self.label} does not carry {upload.media_type} files from the phone")
        if upload.size > limit:
            raise ValueError(f"{self.label} takes a {kind} of at most {limit // _MB} MB")
        return kind

    def view(self) -> dict[str, Any]:
        """The rule as the page checks it."""
        return {"photoTypes": list(self.photo_types), "documentTypes": list(self.document_types),
                "maxPhotoBytes": self.max_photo_bytes, "maxDocumentBytes": self.max_document_bytes}


# The platforms' own limits on what a customer sends (WhatsApp: images 5 MB, documents 100 MB;
# Messenger: 25 MB; a bot downloads files of at most 20 MB and photos are at most 10 MB; MMS: 5 MB
# a message), within the sandbox's 25 MB.
MEDIA_RULES: Final = {
    "whatsapp": MediaRule("WhatsApp", ("image/jpeg", "image/png"), DOCUMENT_TYPES, 5 * _MB, MAX_UPLOAD_BYTES),
    "messenger": MediaRule("Messenger", ("image/jpeg", "image/png", "image/gif"), DOCUMENT_TYPES,
                           25 * _MB, 25 * _MB),
    "telegram": MediaRule("Telegram", ("image/jpeg", "image/png", "image/webp"), DOCUMENT_TYPES, 10 * _MB, 20 * _MB),
    "twilio": MediaRule("MMS", ("image/jpeg", "image/png", "image/gif"), ("application/pdf", "text/plain", "text/csv"),
                        5 * _MB, 5 * _MB),
}


@dataclass(frozen=True)
class Upload:
    """A file a phone uploaded."""

    id: str
    name: str
    media_type: str
    size: int
    sha256: str  # hex
    created_at: float
    width: int | None = None
    height: int | None = None

    @property
    def is_image(self) -> bool:
        return self.media_type.startswith("image/")

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "mediaType": self.media_type, "size": self.size,
                "sha256": self.sha256, "createdAt": self.created_at, "width": self.width, "height": self.height}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Upload:
        return cls(id=str(record["id"]), name=str(record["name"]), media_type=str(record["mediaType"]),
                   size=int(record["size"]), sha256=str(record["sha256"]), created_at=float(record["createdAt"]),
                   width=record.get("width"), height=record.get("height"))


def image_size(media_type: str, head: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, WebP or JPEG from its first bytes, when they say it."""
    try:
        if media_type == "image/png" and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return width, height
        if media_type == "image/gif" and len(head) >= 10:
            width, height = struct.unpack("<HH", head[6:10])
            return width, height
        if media_type == "image/webp":
            chunk = head[12:16]
            if chunk == b"VP8X":
                return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
            if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
                width, height = struct.unpack("<HH", head[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L" and head[20:21] == b"\x2f":
                bits = int.from_bytes(head[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            return None
        if media_type == "image/jpeg":
            index = 2
            while index + 9 < len(head):
                if head[index] != 0xFF:
                    return None
                marker = head[index + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    index += 2
                    continue
                length = struct.unpack(">H", head[index + 2:index + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    height, width = struct.unpack(">HH", head[index + 5:index + 9])
                    return width, height
                index += 2 + length
    except struct.error:
        return None
    return None


def declared_type(content_type: str | None, filename: str | None) -> str:
    """The type a file is uploaded as: its part's Content-Type, else what its name says."""
    declared = normal_type(content_type)
    if declared and declared != "application/octet-stream":
        return declared
    guessed = mimetypes.guess_type(filename or "")[0]
    return normal_type(guessed) if guessed else declared


class Uploads:
    """The uploaded files (disk under `directory`, or memory) and their routes."""

    def __init__(self, directory: str | None, index_path: str | None = None, public_url: str = "",
                 max_uploads: int = MAX_UPLOADS, max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
        # Files on disk under `directory` with their index in `index_path` (None: memory only).
        self.directory = directory
        # Where `/sandbox/uploads/...` is reachable from outside (the phones' media previews).
        self.public_url = public_url.rstrip("/")
        self.max_uploads = max_uploads
        self.max_total_bytes = max_total_bytes
        self.uploads: OrderedDict[str, Upload] = OrderedDict()
        self._memory: dict[str, bytes] = {}
        self._journal = Journal(index_path if directory is not None else None)
        lines = self._journal.replay(self._apply)
        self._journal.compact(({"op": "upload", "upload": u.record()} for u in self.uploads.values()), lines)

    def _apply(self, record: dict[str, Any]) -> None:
        if record["op"] == "upload":
            upload = Upload.from_record(record["upload"])
            if self.directory is not None and os.path.exists(self._path(upload.id)):
                self.uploads[upload.id] = upload
        elif record["op"] == "drop":
            self.uploads.pop(str(record["id"]), None)

    def _path(self, upload_id: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, upload_id)

    # --- keeping files ----------------------------------------------------------------------

    async def add(self, chunks: AsyncIterator[bytes], name: str | None, media_type: str) -> Upload:
        """Keep a file (MediaRejected: a type the phones do not send, too large, empty, or its
        first bytes say another type)."""
        if media_type not in UPLOAD_TYPES:
            raise MediaRejected(415, f"Only photos (jpeg, png, gif, webp) and documents (pdf, text, csv, zip, "
                                     f"office) can be sent from the phone, not {media_type or 'this file'}")
        upload_id = secrets.token_urlsafe(_ID_BYTES)
        digest = hashlib.sha256()
        head = b""
        size = 0
        body = bytearray()
        tmp = None
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            tmp = self._path(upload_id) + ".part"
        try:
            with open(tmp, "wb") if tmp is not None else _NullFile() as fh:
                async for chunk in checked(chunks, media_type, MAX_UPLOAD_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    if len(head) < _HEAD_BYTES:
                        head += chunk[:_HEAD_BYTES - len(head)]
                    if tmp is None:
                        body += chunk
                    else:
                        fh.write(chunk)
            if tmp is not None:
                os.replace(tmp, self._path(upload_id))
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        dimensions = image_size(media_type, head)
        upload = Upload(id=upload_id, name=safe_filename(name, media_type), media_type=media_type, size=size,
                        sha256=digest.hexdigest(), created_at=time.time(),
                        width=dimensions[0] if dimensions else None, height=dimensions[1] if dimensions else None)
        if tmp is None:
            self._memory[upload_id] = bytes(body)
        self.uploads[upload_id] = upload
        self._journal.append({"op": "upload", "upload": upload.record()})
        while len(self.uploads) > 1 and (len(self.uploads) > self.max_uploads or
                                         sum(u.size for u in self.uploads.values()) > self.max_total_bytes):
            self.drop(next(iter(self.uploads)))
        return upload

    async def add_bytes(self, data: bytes, name: str | None, media_type: str) -> Upload:
        """`add` for bytes at hand (tests, scripts)."""
        async def chunks() -> AsyncIterator[bytes]:
            yield data
        return await self.add(chunks(), name, media_type)

    def drop(self, upload_id: str) -> None:
        """Forget an upload: the platform URLs that served it stop working."""
        self.uploads.pop(upload_id, None)
        self._memory.pop(upload_id, None)
        if self.directory is not None:
            try:
                os.unlink(self._path(upload_id))
            except OSError:
                pass
        self._journal.append({"op": "drop", "id": upload_id})

    def get(self, upload_id: object) -> Upload | None:
        """The upload with this id, or None."""
        return self.uploads.get(upload_id) if isinstance(upload_id, str) else None

    def url(self, upload: Upload) -> str:
        """Where the upload is served (the phones' previews; the MMS media redirect)."""
        return f"{self.public_url}/uploads/{upload.id}/{quote(upload.name)}"

    def view(self, upload: Upload) -> dict[str, Any]:
        """The upload as the scripting API and the phones show it."""
        out = {k: v for k, v in upload.record().items() if k != "createdAt" and v is not None}
        out["url"] = self.url(upload)
        return out

    def response(self, upload: Upload, *, download_name: bool = True) -> web.StreamResponse:
        """The upload's bytes as a platform's media server answers them."""
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
        if download_name:
            disposition = "inline" if upload.is_image else "attachment"
            headers["Content-Disposition"] = f"{disposition}; filename=\"{upload.name}\""
        if self.directory is None:
            return web.Response(body=self._memory[upload.id], content_type=upload.media_type, headers=headers)
        response = web.FileResponse(self._path(upload.id), headers=headers)
        response.content_type = upload.media_type
        return response

    # --- routes ---------------------------------------------------------------------------------

    def routes(self, prefix: str) -> list[web.RouteDef]:
        """`/sandbox/uploads` routes."""
        base = f"{prefix}/uploads"
        return [
            web.post(base, sunco_errors(self._upload)),
            web.get(f"{base}/{{upload_id}}/{{name}}", self._serve),
        ]

    async def _upload(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES + _MB:
            raise ApiError(413, f"A file sent from the phone is at most {MAX_UPLOAD_BYTES // _MB} MB")
        if request.content_type != "multipart/form-data":
            raise ApiError(415, "Send the file as multipart/form-data, in the field `file`")
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    continue
                media_type = declared_type(part.headers.get("Content-Type"), part.filename)
                upload = await self.add(_part_chunks(part), part.filename, media_type)
                log.info("sandbox upload %s: %s, %d bytes", upload.id, upload.media_type, upload.size)
                return web.json_response({"upload": self.view(upload)}, status=201)
        except MediaRejected as exc:
            raise ApiError(exc.status, str(exc)) from exc
        except ValueError as exc:
            raise ApiError(400, f"Malformed multipart/form-data body: {exc}") from exc
        raise ApiError(400, "No file: send it in the multipart field `file`")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        upload = self.get(request.match_info["upload_id"])
        if upload is None:
            return web.Response(status=404, text="Not Found")
        return self.response(upload)


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_CHUNK):
        yield chunk


def upload_in(uploads: Uploads | None, spec: dict[str, Any]) -> Upload | None:
    """The uploaded file an inbound spec sends (`upload`: its id), or None; ValueError for an
    unknown one."""
    if spec.get("upload") is None:
        return None
    upload = uploads.get(spec["upload"]) if uploads is not None else None
    if upload is None:
        raise ValueError("'upload' must be the id of a file uploaded to /sandbox/uploads")
    return upload


class _NullFile:
    """A file that writes nowhere (memory-only uploads keep their bytes themselves)."""

    def __enter__(self) -> _NullFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def write(self, _data: bytes) -> int:
        return 0
