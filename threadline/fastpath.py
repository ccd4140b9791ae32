"""The front door's fast path: plain HTTP/1.1 requests proxied without aiohttp's server machinery.

Under `bench/e2e.py --via-frontdoor` most of the front door's CPU went to aiohttp's server side
of the hop (a request object, a stream reader, a handler task, a response object per request)
rather than to the hop itself. This module serves the common request in a bare
`asyncio.Protocol`, with no task or coroutine per request: a well-formed `HTTP/1.1` request with
a `Content-Length` body of at most 1 MiB (or none) whose path is one of `shared.routes.ROUTES`
is forwarded byte for byte (minus hop-by-hop headers, plus `X-Forwarded-*`) on a kept-alive
connection to its service, and the service's answer written back in one piece.

Anything else — WebSockets and other upgrades, chunked or large request bodies, `Expect`,
`HEAD`, HTTP/1.0, targets or headers outside the strict grammar below, oversized heads, the
door's own routes (`/healthz`, `/_svc/…`, redirects, 404s) — is handed over, at a request
boundary, to the aiohttp application of `threadline.frontdoor` on the same connection, which
serves that request and the rest of the connection exactly as before. The fast path never
answers an error of its own except 503 when a service is unreachable (the same body as the
aiohttp path); hostile input goes to aiohttp's parser.

Request smuggling: a request is either taken whole under an unambiguous framing (exactly one
`Content-Length` of digits, no `Transfer-Encoding`) or not touched at all; the request sent to
the service carries a `Content-Length` the door computed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import cast

from aiohttp.http import SERVER_SOFTWARE
from yarl import URL

from shared.http import error_response
from shared.routes import ROUTES

log = logging.getLogger("threadline.frontdoor")

BUFFERED_BODY_BYTES = 1024 * 1024
# aiohttp's own limits (max_line_size, max_headers): anything larger goes to its parser.
MAX_HEAD_BYTES = 8190
MAX_HEADERS = 100
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# A client that sends pipelined requests while one is in flight is not read further past this.
MAX_PIPELINED_BYTES = 256 * 1024
# aiohttp's server closes a connection idle for this long (its keepalive_timeout).
CLIENT_IDLE_SECONDS = 3630.0
SWEEP_SECONDS = 30.0
# As threadline/upstream.py: an idle upstream connection older than this is not reused.
UPSTREAM_IDLE_REUSE_SECONDS = 30.0
MAX_IDLE_PER_UPSTREAM = 256
CONNECT_TIMEOUT = 5.0

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# Request line and header lines as the fast path takes them: a method of its own, an
# origin-form target of visible ASCII without a fragment, HTTP/1.1; `name: value` lines whose
# values hold no control character but HTAB (obs-text, bytes 0x80–0xFF, passes as aiohttp lets
# it: the service gets the client's bytes). No obs-fold, no bare CR or LF.
_REQUEST = re.compile(
    rb"(GET|POST|PUT|PATCH|DELETE|OPTIONS) (/[\x21\x22\x24-\x7e]*) HTTP/1\.1\r\n"
    rb"((?:" + _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
)
_REQUEST_START = re.compile(rb"(?:GET|POST|PUT|PATCH|DELETE|OPTIONS) /")
# The request headers the door reads or drops (hop-by-hop, and the X-Forwarded-* it writes).
_REQUEST_SPECIAL = re.compile(
    rb"^(host|content-length|transfer-encoding|upgrade|expect|connection|keep-alive|te|trailers"
    rb"|proxy-authenticate|proxy-authorization|x-forwarded-for|x-forwarded-proto|x-forwarded-host)"
    rb":[ \t]*([^\r\n]*)\r\n",
    re.MULTILINE | re.IGNORECASE,
)
_HANDOFF_HEADERS = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\r\n]*))?\r\n")
_RESPONSE_HEADERS = re.compile(rb"(?:" + _TCHAR + rb"+:[^\r\n]*\r\n)*")
# The response headers not passed on (hop-by-hop, and the length the door writes itself).
_RESPONSE_HOP_BY_HOP = re.compile(
    rb"^(connection|keep-alive|proxy-authenticate|proxy-authorization|te|trailers|transfer-encoding|upgrade"
    rb"|host|content-length):[ \t]*([^\r\n]*)\r\n",
    re.MULTILINE | re.IGNORECASE,
)
_SERVER_LINE = f"Server: {SERVER_SOFTWARE}\r\n".encode()
_NO_BODY_STATUSES = frozenset({204, 304})


def _unavailable_body() -> bytes:
    body = error_response(503, "Service unavailable, try again").body
    assert isinstance(body, bytes)
    return body


_UNAVAILABLE_BODY = _unavailable_body()
_date_second = -1
_date_line = b""


def _date() -> bytes:
    """`Date: …\\r\\n`, formatted once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        _date_second = now
    return _date_line


@dataclass(frozen=True, slots=True)
class _ResponseHead:
    """A service's response head, read; `head` is the visitor's (without its closing CRLF)."""

    status: int
    persistent: bool
    length: int | None  # None: chunked, or until the service closes
    chunked: bool
    head: bytes


# Services answer with a handful of distinct heads per second (the Date changes each second):
# each is read once.
_RESPONSE_HEADS: dict[bytes, _ResponseHead] = {}
_RESPONSE_HEADS_KEPT = 256


def _response_head(raw: bytes) -> _ResponseHead | None:
    """Read a response head (None for an interim 1xx); ValueError when it is unreadable.

    As aiohttp's responses did: hop-by-hop headers and the length dropped, the service's
    other headers kept, a length written unless the status has none (chunked when unknown),
    `application/octet-stream` for a body of no stated type, Date and Server when missing."""
    cached = _RESPONSE_HEADS.get(raw)
    if cached is not None:
        return cached
    status_line = _STATUS_LINE.match(raw)
    if status_line is None:
        raise ValueError("unreadable status line")
    status = int(status_line[2])
    if status < 200:
        if status == 101:
            raise ValueError("unexpected 101 Switching Protocols")
        return None
    persistent = status_line[1] == b"1"
    block = raw[status_line.end():-2]
    if _RESPONSE_HEADERS.fullmatch(block) is None:
        raise ValueError("unreadable header line")
    # One pass: [kept, name, value, kept, name, value, …, kept].
    pieces = _RESPONSE_HOP_BY_HOP.split(block)
    parts = [b"HTTP/1.1 " + status_line[2] + b" " + (status_line[3] or b"") + b"\r\n", *pieces[::3]]
    length: int | None = None
    chunked = False
    for index in range(1, len(pieces), 3):
        name, value = pieces[index].lower(), pieces[index + 1].rstrip(b" \t").lower()
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise ValueError("bad Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            if value.rsplit(b",", 1)[-1].strip() != b"chunked":
                raise ValueError("unsupported Transfer-Encoding")
            chunked = True
        elif name == b"connection" and b"close" in value:
            persistent = False
    bodyless = status in _NO_BODY_STATUSES
    if bodyless:
        length, chunked = 0, False
    elif chunked:
        length = None
    lowered = b"\n" + block.lower()
    dated = b"\ndate:" in lowered
    if not dated:
        parts.append(_date())
    if b"\nserver:" not in lowered:
        parts.append(_SERVER_LINE)
    if length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif not bodyless:
        parts.append(b"Content-Length: %d\r\n" % length)
    if b"\ncontent-type:" not in lowered and length != 0 and not bodyless:
        parts.append(b"Content-Type: application/octet-stream\r\n")
    head = _ResponseHead(status, persistent, length, chunked, b"".join(parts))
    if dated:  # a head the door dated itself is not the same a second later
        if len(_RESPONSE_HEADS) >= _RESPONSE_HEADS_KEPT:
            _RESPONSE_HEADS.clear()
        _RESPONSE_HEADS[raw] = head
    return head


class _Handoff(Exception):
    """This request is not for the fast path: aiohttp serves it (and the rest of the connection)."""


class UpstreamPool:
    """Kept-alive connections to one service."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self.idle: list[_UpstreamConnection] = []

    def take(self) -> _UpstreamConnection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.usable() and now - conn.idle_since < UPSTREAM_IDLE_REUSE_SECONDS:
                return conn
            conn.close()
        return None

    def release(self, conn: _UpstreamConnection) -> None:
        if len(self.idle) >= MAX_IDLE_PER_UPSTREAM or not conn.usable():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    async def connect(self) -> _UpstreamConnection:
        _transport, conn = await asyncio.wait_for(
            self.loop.create_connection(lambda: _UpstreamConnection(self), self.host, self.port),
            timeout=CONNECT_TIMEOUT)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


# States of a response being read from a service.
_HEAD, _WHOLE, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)
# What a response head leads to.
_INTERIM, _DONE, _BODY = range(3)


class _UpstreamConnection(asyncio.Protocol):
    """One kept-alive connection to a service; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: _ClientConnection | None = None
        self.buffer = bytearray()
        self.state = _HEAD
        self.remaining = 0
        self.persistent = True
        self.received = False  # any byte of the current response
        self.read_paused = False  # while the visitor reads a streamed answer slower than it comes
        self.lost = False
        self.idle_since = time.monotonic()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        client, self.client = self.client, None
        if client is None:
            return
        if self.state == _UNTIL_CLOSE and exc is None:  # the end of a close-delimited answer
            self.buffer.clear()
            client.stream_end()
        else:
            client.upstream_failed(self, exc or ConnectionResetError("the service closed the connection"),
                                   retry=not self.received)

    def data_received(self, data: bytes) -> None:
        if self.client is None:  # nothing was asked: never pool a connection out of step
            self.close()
            return
        self.received = True
        self.buffer += data
        try:
            self._advance()
        except (ValueError, OverflowError) as exc:
            self._fail(exc)

    def pause_writing(self) -> None:  # requests are at most 1 MiB, written whole
        pass

    def resume_writing(self) -> None:
        pass

    # the exchange

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def send(self, client: _ClientConnection, request: bytes) -> None:
        assert self.transport is not None
        self.client = client
        self.buffer.clear()
        self.state = _HEAD
        self.received = False
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.transport.write(request)

    def close(self) -> None:
        self.client = None
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """The visitor went away: this connection's answer is never read to the end."""
        self.client = None
        self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _fail(self, exc: BaseException) -> None:
        client, self.client = self.client, None
        self.close()
        if client is not None:
            client.upstream_failed(self, exc, retry=False)

    def _done(self, client: _ClientConnection) -> None:
        """The response was read to its end."""
        self.client = None
        if self.buffer or not self.persistent:
            self.close()  # a byte past the response, or the service said it closes
        else:
            self.pool.release(self)
        client.stream_end()

    def _advance(self) -> None:
        buffer = self.buffer
        while self.client is not None:
            client = self.client
            state = self.state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD_BYTES:
                        raise ValueError("response head too long")
                    return
                head = bytes(buffer[:end + 4])
                del buffer[:end + 4]
                if self._head(client, head) == _DONE:
                    return
            elif state == _WHOLE:
                if len(buffer) < self.remaining:
                    return
                body = bytes(buffer[:self.remaining])
                del buffer[:self.remaining]
                client.respond_body(body)
                self._done(client)
                return
            elif state == _LENGTH:
                if not buffer:
                    return
                chunk = bytes(buffer[:self.remaining])
                del buffer[:len(chunk)]
                self.remaining -= len(chunk)
                client.stream_data(chunk)
                if not self.remaining:
                    self._done(client)
                    return
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 4096:
                        raise ValueError("chunk size line too long")
                    return
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[:end + 2]
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise ValueError("bad chunk size")
                self.remaining = int(size_text, 16)
                self.state = _CHUNK_DATA if self.remaining else _TRAILERS
            elif state == _CHUNK_DATA:
                if not buffer:
                    return
                chunk = bytes(buffer[:self.remaining])
                del buffer[:len(chunk)]
                self.remaining -= len(chunk)
                client.stream_chunk(chunk)
                if not self.remaining:
                    self.state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                del buffer[:2]
                self.state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD_BYTES:
                        raise ValueError("trailers too long")
                    return
                del buffer[:end + 2]
                if end == 0:
                    self._done(client)
                    return
            else:  # _UNTIL_CLOSE
                if buffer:
                    chunk = bytes(buffer)
                    buffer.clear()
                    client.stream_chunk(chunk)
                return

    def _head(self, client: _ClientConnection, raw: bytes) -> int:
        """Read a response head: _INTERIM (a 1xx: the final one follows), _DONE (no body) or _BODY."""
        head = _response_head(raw)
        if head is None:
            return _INTERIM
        self.persistent = head.persistent
        if head.status in _NO_BODY_STATUSES or (head.length == 0 and not head.chunked):
            client.respond_head(head.head)
            client.respond_body(b"")
            self._done(client)
            return _DONE
        if head.chunked:
            self.state = _CHUNK_SIZE
            client.respond_head(head.head, stream=True, chunked=True)
        elif head.length is None:
            self.state = _UNTIL_CLOSE
            self.persistent = False
            client.respond_head(head.head, stream=True, chunked=True)
        elif head.length <= BUFFERED_BODY_BYTES:
            self.state = _WHOLE
            self.remaining = head.length
            client.respond_head(head.head)
        else:
            self.state = _LENGTH
            self.remaining = head.length
            client.respond_head(head.head, stream=True)
        return _BODY


class Door:
    """What a front door site's fast connections share: routes, upstream pools, the fallback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, upstreams: Mapping[str, str],
                 fallback: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.fallback = fallback
        # Read at each request, as the aiohttp path does: the app's mapping may be pointed at a
        # restarted service's new port.
        self.upstreams = upstreams
        self.routes = tuple((route.prefix.encode(), route.service)
                            for route in sorted(ROUTES, key=lambda r: len(r.prefix), reverse=True))
        self.pools: dict[str, UpstreamPool | None] = {}  # by base URL; None: not plain http://host:port
        self.connections: set[_ClientConnection] = set()
        self.closing = False
        self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    def route(self, path: bytes) -> UpstreamPool | None:
        """The connections to the service whose route is the longest prefix of `path` (None: the
        aiohttp path serves this path)."""
        for prefix, service in self.routes:
            if path.startswith(prefix):
                return self.pool(service)
        return None

    def pool(self, service: str) -> UpstreamPool | None:
        """The kept-alive connections to `service` (None: the aiohttp path serves it)."""
        base = self.upstreams.get(service)
        if base is None:
            return None
        try:
            return self.pools[base]
        except KeyError:
            pass
        url = URL(base)
        pool = None
        if url.scheme == "http" and url.host is not None and url.path in ("", "/") and not url.query_string:
            pool = UpstreamPool(self.loop, url.host, url.port or 80)
        self.pools[base] = pool
        return pool

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.write_paused:
                # Writes resume once the visitor has read a part of what the kernel holds for it
                # (up to a third of the socket's send buffer): paused this long, it reads nothing.
                if now - conn.write_paused_at > CLIENT_IDLE_SECONDS:
                    conn.abort()
            elif not conn.busy and now - conn.last_seen > CLIENT_IDLE_SECONDS:
                conn.close()
        self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    async def close(self, timeout: float) -> None:
        """Close idle connections now, busy ones once answered; drop those still open after
        `timeout` (an answer its visitor is not reading)."""
        self.closing = True
        self._sweeper.cancel()
        deadline = self.loop.time() + timeout
        while True:
            for conn in list(self.connections):
                if not conn.busy:
                    conn.close()
            if not self.connections or self.loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        for pool in self.pools.values():
            if pool is not None:
                pool.close()


# (end of head, end of body, path, the head sent to the service, its pool, close after answering)
_Pending = tuple[int, int, bytes, bytes, UpstreamPool, bool]


def fast_connection(door: Door) -> asyncio.Protocol:
    """The protocol of a new connection to the front door."""
    return _ClientConnection(door)


class _ClientConnection(asyncio.Protocol):
    """A visitor's connection, while its requests are for the fast path."""

    def __init__(self, door: Door) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.remote = b""
        self.buffer = bytearray()
        self.busy = False  # a request is being answered
        self.close_after = False
        self.write_paused = False
        self.write_paused_at = 0.0  # since when the visitor has taken nothing of what is written
        self.read_paused = False
        self.lost = False
        self.handed_off = False
        self.head_sent = False
        self.chunked = False
        self.upstream: _UpstreamConnection | None = None
        self.pool: UpstreamPool | None = None
        self.request = b""
        self.request_path = b""
        self.may_retry = False
        self.head = b""  # of an answer written with its body
        self.pending: _Pending | None = None  # a request whose head was read, waiting for its body
        self.last_seen = door.loop.time()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.remote = str(peer[0]).encode()
        self.door.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.door.connections.discard(self)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abandon()

    def data_received(self, data: bytes) -> None:
        if self.handed_off:  # not reached: the transport speaks to aiohttp now
            return
        self.buffer += data
        self.last_seen = self.door.loop.time()
        if self.busy or self.write_paused:
            # Not taking requests now: what the visitor pipelines meanwhile is held up to a
            # bound, then the socket is not read until the door can answer again.
            if len(self.buffer) > MAX_PIPELINED_BYTES and not self.read_paused:
                self.read_paused = True
                self._transport.pause_reading()
            return
        self._next()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.door.loop.time()
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_seen = self.door.loop.time()  # the visitor reads: not idle
        if self.upstream is not None:
            self.upstream.resume_reading()
        elif not self.busy:
            self._resume_reading()
            if self.buffer:
                self._next()

    @property
    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now: `close()` first sends what is buffered, which a visitor
        that stopped reading never lets happen."""
        if self.transport is not None:
            self.transport.abort()
        self.door.connections.discard(self)

    # requests

    def _next(self) -> None:
        """Take the next request in the buffer, if it is whole."""
        if self.busy or self.lost or self.handed_off or self.write_paused:
            return
        if self.door.closing:
            self.close()
            return
        pending = self.pending
        if pending is None:
            handoff = False
            try:
                pending = self.pending = self._read_head()
            except _Handoff:
                handoff = True  # outside this block: aiohttp's own errors must not chain to it
            if handoff:
                self._handoff()
                return
            if pending is None:
                return
        head_end, total, path, forwarded_head, pool, close = pending
        buffer = self.buffer
        if len(buffer) < total:
            return
        self.pending = None
        body = bytes(buffer[head_end:total])
        del buffer[:total]
        self.busy = True
        self.head_sent = False
        self.close_after = close
        self.request = forwarded_head + body
        self.request_path = path
        self.pool = pool
        conn = pool.take()
        # A pooled connection the service closed meanwhile is replaced once, as in
        # threadline/upstream.py; a new one is not.
        self.may_retry = conn is not None
        if conn is not None:
            self.upstream = conn
            conn.send(self, self.request)
        else:
            self._connect()

    def _read_head(self) -> _Pending | None:
        """Parse the head at the start of the buffer into what `_next` forwards (None: not all
        there yet); `_Handoff` when the request is not for the fast path."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            # Not all there yet. What cannot become a fast-path request (another method, TLS,
            # HTTP/2's preface, bare LF line ends, …) goes to aiohttp's parser now, which answers
            # it at once rather than once the door has waited for more.
            if (len(buffer) > MAX_HEAD_BYTES or (len(buffer) >= 9 and not _REQUEST_START.match(buffer))
                    or buffer.count(b"\n") != buffer.count(b"\r\n")):
                raise _Handoff
            return None
        head_end = end + 4
        if head_end > MAX_HEAD_BYTES:
            raise _Handoff
        match = _REQUEST.fullmatch(buffer, 0, head_end)
        if match is None:
            raise _Handoff
        method, target, block = match.group(1, 2, 3)
        if block.count(b"\r\n") > MAX_HEADERS:
            raise _Handoff
        path, _, query = target.partition(b"?")
        pool = self.door.route(path)
        if pool is None:
            raise _Handoff  # the door's own routes, redirects, 404s, a base URL of another form
        host: bytes | None = None
        length: int | None = None
        close = False
        forwarded_for: list[bytes] = []
        # One pass: [kept, name, value, kept, name, value, …, kept].
        pieces = _REQUEST_SPECIAL.split(block)
        for index in range(1, len(pieces), 3):
            lowered = pieces[index].lower()
            value = pieces[index + 1].rstrip(b" \t")
            if lowered == b"host":
                if host is not None:
                    raise _Handoff
                host = value
            elif lowered == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 9:
                    raise _Handoff
                length = int(value)
            elif lowered == b"x-forwarded-for":
                if value:
                    forwarded_for.append(value)
            elif lowered == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                if b"upgrade" in tokens:
                    raise _Handoff
                close = b"close" in tokens
            elif lowered in _HANDOFF_HEADERS:
                raise _Handoff
        if not host:
            raise _Handoff
        length = length or 0
        if length > BUFFERED_BODY_BYTES:
            raise _Handoff
        # Append, as every proxy does (see threadline.frontdoor._forward_headers): the services
        # believe the chain only up to the first address that is not a trusted proxy.
        if self.remote:
            forwarded_for.append(self.remote)
        parts = [method, b" ", target if query else path, b" HTTP/1.1\r\nHost: ", pool.authority, b"\r\n",
                 b"".join(pieces[::3]), b"X-Forwarded-For: ", b", ".join(forwarded_for),
                 b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ", host, b"\r\n"]
        if length or method not in (b"GET", b"DELETE", b"OPTIONS"):
            parts.append(b"Content-Length: %d\r\n" % length)
        parts.append(b"\r\n")
        return head_end, head_end + length, path, b"".join(parts), pool, close

    def _connect(self) -> None:
        pool = self.pool
        assert pool is not None
        task = self.door.loop.create_task(pool.connect())
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[_UpstreamConnection]) -> None:
        if task.cancelled():
            self._unavailable(asyncio.CancelledError())
            return
        exc = task.exception()
        if exc is not None:
            self._unavailable(exc)
            return
        conn = task.result()
        if self.lost:
            assert self.pool is not None
            if self.door.closing:
                conn.close()
            else:
                self.pool.release(conn)  # nothing was sent on it
            return
        self.upstream = conn
        conn.send(self, self.request)

    def upstream_failed(self, conn: _UpstreamConnection, exc: BaseException, *, retry: bool) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        if self.lost:
            return
        if self.head_sent:
            self.close()  # cut short mid-answer: the visitor must not take it for whole
            return
        if retry and self.may_retry:
            # A pooled connection the service had closed: nothing of the request was answered.
            self.may_retry = False
            self._connect()
            return
        self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> None:
        if self.lost:
            return
        pool = self.pool
        assert pool is not None
        log.warning("upstream %s unavailable: %s", f"http://{pool.authority.decode()}{self.request_path.decode()}",
                    str(exc) or type(exc).__name__)
        self.respond_head(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n" + _date()
                          + _SERVER_LINE + b"Content-Length: %d\r\n" % len(_UNAVAILABLE_BODY))
        self.respond_body(_UNAVAILABLE_BODY)
        self.stream_end()

    # the answer (called by the upstream connection)

    def respond_head(self, head: bytes, *, stream: bool = False, chunked: bool = False) -> None:
        """The head of the answer: written now when `stream`, else with the body by `respond_body`."""
        self.chunked = chunked
        head += b"Connection: close\r\n\r\n" if self.close_after else b"\r\n"
        self.request = b""
        if not stream:
            self.head = head
            return
        self.head_sent = True
        if not self.lost:
            self._transport.write(head)

    def respond_body(self, body: bytes) -> None:
        head, self.head = self.head, b""
        self.head_sent = True
        if self.lost:
            return
        if len(body) < 65536:
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))

    def stream_data(self, data: bytes) -> None:
        if not self.lost:
            self._transport.write(data)

    def stream_chunk(self, data: bytes) -> None:
        if data and not self.lost:
            self._transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    def stream_end(self) -> None:
        """The answer is complete: take the next request."""
        self.upstream = None
        if self.lost:
            return
        if self.chunked:
            self._transport.write(b"0\r\n\r\n")
            self.chunked = False
        self.busy = False
        self.last_seen = self.door.loop.time()
        if self.close_after:
            self.close()
            return
        if not self.write_paused:  # else resume_writing picks up from here
            self._resume_reading()
            if self.buffer:
                self._next()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.lost:
            self.read_paused = False
            self._transport.resume_reading()

    def _handoff(self) -> None:
        """Give the connection, with what it has sent so far, to aiohttp's server."""
        transport = self._transport
        self.handed_off = True
        self.door.connections.discard(self)
        handler = self.door.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data = bytes(self.buffer)
        self.buffer.clear()
        if data:
            handler.data_received(data)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
