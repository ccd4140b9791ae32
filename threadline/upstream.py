"""A lean HTTP/1.1 client for the front door's hop to the services.

The front door forwards every public request to a Threadline service on loopback. aiohttp's
client did that with a cost per request (session, request and response objects, timeouts,
payload machinery) that made the proxy hop a quarter of the whole pipeline's CPU under
`bench/e2e.py --via-frontdoor`. This client keeps idle keep-alive connections per service and
writes a request in one piece; it reads any response a service sends (`Content-Length`,
`chunked`, or close-delimited).

Only the front door uses it, only towards its own services: the responses it parses come from
Threadline, not from the internet (the request it sends was already parsed by aiohttp's server).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

# An idle connection older than this is not reused: aiohttp's server closes keep-alive
# connections after 75 s, and a request written just as it closes one would be lost.
IDLE_REUSE_SECONDS = 30.0
MAX_IDLE_PER_UPSTREAM = 256
MAX_HEAD_BYTES = 64 * 1024


class UpstreamClosed(ConnectionError):
    """The service closed the connection before answering (or answered something unreadable)."""


@dataclass
class UpstreamResponse:
    """A response's head, and its body: whole (`body`) or to be read with `chunks()`."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None
    chunked: bool
    body: bytes | None = None
    keep_alive: bool = True
    # HTTP/1.1 without `Connection: close`: the connection outlives this response.
    persistent: bool = True
    _reader: asyncio.StreamReader | None = field(default=None, repr=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (for bodies not read whole)."""
        reader = self._reader
        assert reader is not None
        if self.chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        elif self.content_length is not None:
            left = self.content_length
            while left:
                data = await reader.read(min(left, 65536))
                if not data:
                    raise UpstreamClosed("body cut short")
                left -= len(data)
                yield data
        else:
            while data := await reader.read(65536):
                yield data


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Upstream:
    """Keep-alive connections to one service at `host:port`."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._idle: list[Connection] = []

    async def _connect(self) -> Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout=5)
        return Connection(reader, writer)

    def _reusable(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_REUSE_SECONDS and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    def release(self, conn: Connection, response: UpstreamResponse) -> None:
        """Give a connection whose response was read to the end back to the pool (or close it,
        when the response said it ends there)."""
        if not response.keep_alive or len(self._idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def close(self) -> None:
        """Close the idle connections."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def request(self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
                      *, buffer_up_to: int) -> tuple[UpstreamResponse, Connection]:
        """Send one request and read the response head; a body of up to `buffer_up_to` bytes with
        a known length is read whole. A pooled connection the service had closed is replaced
        once: nothing of the request reached the service on it (no answer began)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.authority}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"Content-Length: {len(body)}")
        # aiohttp's server decoded the client's header bytes as UTF-8 with surrogateescape: the
        # same encoding gives the service exactly the bytes the client sent.
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        conn = self._reusable()
        reused = conn is not None
        written = False
        while True:
            if conn is None:
                conn = await self._connect()
                written = False
            if not written:
                conn.writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.writer.write(body)
                written = True
            try:
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
                if reused and not partial:
                    conn, reused = None, False
                    continue
                raise UpstreamClosed(str(exc) or type(exc).__name__) from exc
            except asyncio.LimitOverrunError as exc:
                conn.close()
                raise UpstreamClosed("response head too long") from exc
            response = _parse_head(raw)
            if 100 <= response.status < 200 and response.status != 101:
                # An interim answer (`100 Continue`, `103 Early Hints`): the final one follows on
                # this connection. Taken for the answer, it would leave the real one unread on a
                # pooled connection, for the next visitor's request to read.
                reused = False
                continue
            break
        if method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
            response.content_length, response.chunked, response.body = 0, False, b""
            response.keep_alive = response.persistent and response.status != 101  # 101: no longer HTTP
        elif (not response.chunked and response.content_length is not None
              and response.content_length <= buffer_up_to):
            try:
                response.body = await conn.reader.readexactly(response.content_length)
            except asyncio.IncompleteReadError as exc:
                conn.close()
                raise UpstreamClosed("body cut short") from exc
        response._reader = conn.reader
        return response, conn


def _parse_head(raw: bytes) -> UpstreamResponse:
    try:
        text = raw.decode("latin-1")
        status_line, *header_lines = text[:-4].split("\r\n")
        version, status, *reason = status_line.split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(status_line)
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        persistent = version == "HTTP/1.1"
        for line in header_lines:
            name, _, value = line.partition(":")
            name, value = name.strip(), value.strip()
            lowered = name.lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif lowered == "connection" and "close" in value.lower():
                persistent = False
            headers.append((name, value))
        # Without a length or chunks the body ends when the service closes the connection.
        return UpstreamResponse(status=int(status), reason=reason[0] if reason else "", headers=headers,
                                content_length=None if chunked else length, chunked=chunked,
                                keep_alive=persistent and (chunked or length is not None), persistent=persistent)
    except ValueError as exc:
        raise UpstreamClosed(f"unreadable response head: {exc}") from exc
