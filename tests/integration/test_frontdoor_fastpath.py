"""The front door's fast path (threadline/fastpath.py), over real sockets on loopback.

What a service receives and what a visitor gets back, byte for byte where it matters; pipelined,
trickled and pipelined-then-handed-over connections; hostile input (always a 4xx from aiohttp's
parser, never a 5xx, the door still serving afterwards); a service that answers `100 Continue`,
dies mid-answer or is gone.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from threadline import fastpath
from threadline.frontdoor import APP_KEY_UPSTREAMS, FrontdoorSite, build_frontdoor
from threadline.natsserver import free_port

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawService:
    """A service on a raw socket: records each request as received, answers with `answer`."""

    port: int
    seen: list[bytes] = field(default_factory=list)
    answer: bytes | Handler = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
                body = await reader.readexactly(int(length[1])) if length else b""
                self.seen.append(head + body)
                if isinstance(self.answer, bytes):
                    writer.write(self.answer)
                    await writer.drain()
                else:
                    await self.answer(head + body, reader, writer)
                    if writer.is_closing():
                        return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@dataclass
class Door:
    port: int
    site: FrontdoorSite
    runner: web.AppRunner

    async def exchange(self, raw: bytes, *, until_close: bool = False, timeout: float = 5.0) -> bytes:
        """Send `raw` on a new connection; the first whole response (or all until closed)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(raw)
            if until_close:
                return await asyncio.wait_for(reader.read(), timeout)
            return await asyncio.wait_for(read_response(reader), timeout)
        finally:
            writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response (Content-Length, chunked or none), as the bytes that carried it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
    if status in (204, 304) or 100 <= status < 200:
        return head
    if length:
        return head + await reader.readexactly(int(length[1]))
    if re.search(rb"(?im)^transfer-encoding: *chunked\r$", head):
        body = b""
        while True:
            line = await reader.readuntil(b"\r\n")
            body += line
            size = int(line.strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return head + body
    return head + await reader.read()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def dechunk(data: bytes) -> bytes:
    body = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert data == b"\r\n"
            return body
        body, data = body + data[:size], data[size + 2:]


def header(response: bytes, name: str) -> list[bytes]:
    head = response.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return [m[1] for m in re.finditer(rb"(?im)^" + name.encode() + rb": *(.*?)\r$", head)]


@pytest.fixture
async def service() -> AsyncIterator[RawService]:
    svc = RawService(free_port())
    server = await asyncio.start_server(svc.serve, "127.0.0.1", svc.port)
    yield svc
    server.close()


async def open_door(upstreams: dict[str, str]) -> Door:
    runner = web.AppRunner(build_frontdoor(upstreams))
    await runner.setup()
    port = free_port()
    site = FrontdoorSite(runner, "127.0.0.1", port)
    await site.start()
    return Door(port, site, runner)


@pytest.fixture
async def door(service: RawService) -> AsyncIterator[Door]:
    opened = await open_door({"conversations": f"http://127.0.0.1:{service.port}",
                              "whatsapp": f"http://127.0.0.1:{service.port}"})
    yield opened
    await opened.runner.cleanup()


async def test_the_service_receives_the_visitors_request_with_the_doors_forwarding_headers(
        service: RawService, door: Door) -> None:
    response = await door.exchange(
        b"POST /webhooks/whatsapp/abc?x=1&y=%20 HTTP/1.1\r\n"
        b"Host: door.example:8080\r\n"
        b"Content-Type: application/json\r\n"
        b"X-Hub-Signature-256: sha256=00ff\r\n"
        b"x-forwarded-for: 198.51.100.7\r\n"
        b"X-Forwarded-For: 203.0.113.1, 203.0.113.2\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"x-forwarded-host: evil.example\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
        b"X-Note: caf\xc3\xa9 \xff\r\n"
        b"Cookie: a=1\r\nCookie: b=2\r\n"
        b"Content-Length: 2\r\n\r\n{}")
    assert status_of(response) == 200 and body_of(response) == b"ok"
    assert service.seen == [
        b"POST /webhooks/whatsapp/abc?x=1&y=%20 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + str(service.port).encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"X-Hub-Signature-256: sha256=00ff\r\n"
        b"X-Note: caf\xc3\xa9 \xff\r\n"
        b"Cookie: a=1\r\nCookie: b=2\r\n"
        # What the visitor wrote first, then the address the door saw: services believe the chain
        # from the right, up to the first hop that is not a trusted proxy.
        b"X-Forwarded-For: 198.51.100.7, 203.0.113.1, 203.0.113.2, 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: door.example:8080\r\n"
        b"Content-Length: 2\r\n\r\n{}"]
    # An empty query is not passed on; GET without a body gets no Content-Length, PUT gets 0.
    await door.exchange(b"GET /v2/apps? HTTP/1.1\r\nHost: h\r\n\r\n")
    await door.exchange(b"PUT /v2/apps HTTP/1.1\r\nHost: h\r\n\r\n")
    assert service.seen[1].startswith(b"GET /v2/apps HTTP/1.1\r\n")
    assert b"Content-Length" not in service.seen[1]
    assert service.seen[2].endswith(b"Content-Length: 0\r\n\r\n")


async def test_answers_come_back_as_the_service_gave_them(service: RawService, door: Door) -> None:
    answers = {
        b"204": (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", 204, b""),
        b"304": (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", 304, b""),
        b"chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/x\r\n\r\n"
                     b"2\r\nhi\r\n3;ext=1\r\n th\r\n0\r\nX-Trailer: 1\r\n\r\n", 200, b"hi th"),
        b"early-hints": (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                         201, b"{}"),
        b"untyped": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", 200, b"abc"),
        b"cookie": (b"HTTP/1.1 302 Found\r\nLocation: /x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n", 302, b""),
    }

    async def answer(request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = request.split(b" ", 2)[1].rsplit(b"/", 1)[1]
        writer.write(answers[name][0])
        if b"Connection: close" in answers[name][0]:
            writer.close()

    service.answer = answer
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    try:
        for name, (_raw, status, body) in answers.items():  # all on one kept-alive connection
            writer.write(b"GET /v2/" + name + b" HTTP/1.1\r\nHost: h\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 5)
            assert status_of(response) == status, name
            assert header(response, "Date") and header(response, "Server")
            assert not header(response, "Connection")
            if name == b"chunked":
                assert header(response, "Transfer-Encoding") == [b"chunked"]
                assert header(response, "Content-Type") == [b"text/x"]
                assert dechunk(body_of(response)) == body
            else:
                assert body_of(response) == body, name
            if name in (b"204", b"304"):
                assert not header(response, "Content-Length") and not header(response, "Transfer-Encoding")
            if name == b"untyped":  # as aiohttp's responses
                assert header(response, "Content-Type") == [b"application/octet-stream"]
            if name == b"cookie":
                assert header(response, "Set-Cookie") == [b"a=1", b"b=2"]
                assert header(response, "Content-Length") == [b"0"]
    finally:
        writer.close()
    assert not any(b"Cookie" in request for request in service.seen)  # never replayed by the door


async def test_close_delimited_answers_and_connection_close(service: RawService, door: Door) -> None:
    service.answer = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"

    async def close_after(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        writer.close()

    service.answer = close_after
    response = await door.exchange(b"GET /v2/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", until_close=True)
    assert status_of(response) == 200
    assert header(response, "Transfer-Encoding") == [b"chunked"] and header(response, "Connection") == [b"close"]
    assert body_of(response) == b"d\r\nuntil the end\r\n0\r\n\r\n"


async def test_pipelined_and_trickled_requests(service: RawService, door: Door) -> None:
    async def echo(request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = request.split(b"\r\n\r\n", 1)[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))

    service.answer = echo
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    try:
        writer.write(b"".join(b"POST /v2/%d HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nreq-%d" % (i, i)
                              for i in range(5)))
        for i in range(5):
            assert body_of(await asyncio.wait_for(read_response(reader), 5)) == b"req-%d" % i
        for byte in b"POST /v2/slow HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nslow":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        assert body_of(await asyncio.wait_for(read_response(reader), 5)) == b"slow"
        assert len(door.site.door.connections) == 1 if door.site.door else False  # still on the fast path
    finally:
        writer.close()


async def test_a_connection_is_handed_to_aiohttp_for_what_the_fast_path_does_not_take() -> None:
    """/healthz, a chunked body, a WebSocket: aiohttp serves them, on the connection the fast path
    served first, and then serves the rest of that connection."""
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "body": (await request.text())})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        await ws.close()
        return ws

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.router.add_get("/sdk/socket", socket)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    door = await open_door({"conversations": f"http://127.0.0.1:{upstream_port}",
                            "web": f"http://127.0.0.1:{upstream_port}"})
    assert door.site.door is not None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"POST /v2/one HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\none")
        assert json.loads(body_of(await read_response(reader))) == {"path": "/v2/one", "body": "one"}
        assert len(door.site.door.connections) == 1
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        health = await asyncio.wait_for(read_response(reader), 5)
        assert status_of(health) == 200 and json.loads(body_of(health))["status"] == "ok"
        assert not door.site.door.connections  # aiohttp's now
        writer.write(b"POST /v2/two HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
                     b"GET /v2/three HTTP/1.1\r\nHost: h\r\n\r\n")
        assert json.loads(body_of(await read_response(reader))) == {"path": "/v2/two", "body": "two"}
        assert json.loads(body_of(await read_response(reader))) == {"path": "/v2/three", "body": ""}
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(b"GET /v2/first HTTP/1.1\r\nHost: h\r\n\r\n")
        assert status_of(await read_response(reader)) == 200
        writer.write(b"GET /sdk/socket HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        upgraded = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert status_of(upgraded) == 101
        frame = await asyncio.wait_for(reader.readexactly(7), 5)
        assert frame == b"\x81\x05hello"  # a text frame from the service, through the door
        writer.close()
    finally:
        await door.runner.cleanup()
        await runner.cleanup()


HOSTILE = [
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    b"POST /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc",
    b"POST /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v2/a HTTP/1.1\r\nHost: h\r\nContent-Length: 1 2\r\n\r\nabc",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX: \x7f\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX : b\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\n:novalue\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX: a\r\n  folded\r\n\r\n",
    b"GET /v2/a HTTP/1.1\nHost: h\n\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\nX: 1\r\n\r\n",
    b"GET /v2/\xc3\xa9t\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX\xc3\xa9: 1\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"FOO /v2/a HTTP/1.1\r\nHost: h\r\n\r\n",
    b"get /v2/a HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nExpect: something-else\r\n\r\n",
    b"GET /v2/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n",
]


@pytest.mark.parametrize("raw", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
async def test_hostile_input_is_answered_4xx_never_5xx(raw: bytes, service: RawService, door: Door) -> None:
    response = await door.exchange(raw)
    assert 400 <= status_of(response) < 500, response[:200]
    assert service.seen == []  # nothing of it reached a service
    response = await door.exchange(b"GET /v2/after HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status_of(response) == 200 and service.seen[-1].startswith(b"GET /v2/after HTTP/1.1\r\n")


@pytest.mark.parametrize("site", [web.TCPSite, FrontdoorSite], ids=["aiohttp", "fastpath"])
async def test_expect_continue_never_leaves_an_answer_for_the_next_visitor(site: type[web.TCPSite]) -> None:
    """`Expect: 100-continue` (curl sends it for big bodies): the service's interim answer is not
    taken for its answer, so its real answer is never left on a pooled connection, for another
    visitor's request to read."""
    count = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal count
        count += 1
        return web.Response(text=f"answer {count} to {await request.text()}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    upstream_port, door_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    door = web.AppRunner(build_frontdoor({"conversations": f"http://127.0.0.1:{upstream_port}"}))
    await door.setup()
    await site(door, "127.0.0.1", door_port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", door_port)
        writer.write(b"POST /v2/a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert status_of(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)) == 100
        writer.write(b"alice")
        first = await asyncio.wait_for(read_response(reader), 5)
        assert status_of(first) == 200 and body_of(first) == b"answer 1 to alice"
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", door_port)
        writer.write(b"POST /v2/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nbob")
        second = await asyncio.wait_for(read_response(reader), 5)
        assert body_of(second) == b"answer 2 to bob"
        writer.close()
    finally:
        await door.cleanup()
        await runner.cleanup()


async def test_a_service_dying_mid_answer(service: RawService, door: Door) -> None:
    """Before the visitor got a byte, a 503; once a streamed answer began, the visitor's connection
    is cut (never an answer that looks whole)."""
    async def die(request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if b"/v2/buffered" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        writer.close()

    service.answer = die
    assert status_of(await door.exchange(b"GET /v2/buffered HTTP/1.1\r\nHost: h\r\n\r\n")) == 503
    streamed = await door.exchange(b"GET /v2/streamed HTTP/1.1\r\nHost: h\r\n\r\n", until_close=True)
    assert status_of(streamed) == 200 and body_of(streamed) == b"3\r\nabc\r\n"  # no last chunk: cut
    service.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert body_of(await door.exchange(b"GET /v2/after HTTP/1.1\r\nHost: h\r\n\r\n")) == b"ok"


async def test_an_unreadable_answer_or_a_service_gone_is_a_503_in_suncos_format(service: RawService) -> None:
    gone = free_port()
    door = await open_door({"conversations": f"http://127.0.0.1:{gone}",
                            "whatsapp": f"http://127.0.0.1:{service.port}"})
    service.answer = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
    try:
        for target in (b"/v2/a", b"/webhooks/whatsapp/x"):
            response = await door.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
            assert status_of(response) == 503
            assert header(response, "Content-Type") == [b"application/json"]
            assert json.loads(body_of(response)) == {
                "errors": [{"code": "service_unavailable", "title": "Service unavailable, try again"}]}
    finally:
        await door.runner.cleanup()


async def test_a_visitor_leaving_mid_request_leaves_nothing_for_the_next(service: RawService, door: Door) -> None:
    release = asyncio.Event()

    async def slow(request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if b"/v2/slow" in request:
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nfor the first")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nfor the second")

    service.answer = slow
    _reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    writer.write(b"GET /v2/slow HTTP/1.1\r\nHost: h\r\n\r\n")
    while not service.seen:
        await asyncio.sleep(0.01)
    writer.close()
    await asyncio.sleep(0.05)
    release.set()
    for _ in range(3):
        assert body_of(await door.exchange(b"GET /v2/next HTTP/1.1\r\nHost: h\r\n\r\n")) == b"for the second"


async def test_stopping_answers_what_is_in_flight(service: RawService) -> None:
    async def slow(_request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")

    service.answer = slow
    door = await open_door({"conversations": f"http://127.0.0.1:{service.port}"})
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", door.port)
    in_flight = asyncio.create_task(door.exchange(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n"))
    while not service.seen:
        await asyncio.sleep(0.01)
    await door.runner.cleanup()
    assert body_of(await in_flight) == b"late"
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # the idle connection was closed
    idle_writer.close()


async def test_a_big_answer_streams_to_a_slow_reader(service: RawService, door: Door) -> None:
    big = bytes(range(256)) * 32768  # 8 MiB: streamed, the service paused while the visitor lags

    async def answer(request: bytes, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if b"/v2/big" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                         % len(big))
            for start in range(0, len(big), 1 << 20):
                writer.write(big[start:start + (1 << 20)])
                await writer.drain()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")

    service.answer = answer
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port, limit=1 << 16)
    try:
        writer.write(b"GET /v2/big HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert header(head, "Content-Length") == [str(len(big)).encode()]
        received = bytearray()
        while len(received) < len(big):
            received += await asyncio.wait_for(reader.read(1 << 16), 5)
            if len(received) < (1 << 20):
                await asyncio.sleep(0.01)  # a slow start: the door's buffers fill
        assert received == big
        for _ in range(2):  # the same connections carry the next requests
            writer.write(b"GET /v2/small HTTP/1.1\r\nHost: h\r\n\r\n")
            assert body_of(await asyncio.wait_for(read_response(reader), 5)) == b"small"
    finally:
        writer.close()


CANNED_ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: svc\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/x\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 404 Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 \r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nhi",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited",
]


@pytest.mark.parametrize("canned", CANNED_ANSWERS, ids=[f"answer-{i}" for i in range(len(CANNED_ANSWERS))])
async def test_the_visitor_gets_what_the_aiohttp_path_gives(canned: bytes) -> None:
    """The same answer through both paths: the same status line, headers (in any order, the Date
    aside) and body."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(canned)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    answers = []
    for site in (web.TCPSite, FrontdoorSite):
        runner = web.AppRunner(build_frontdoor({"conversations": upstream}))
        await runner.setup()
        port = free_port()
        await site(runner, "127.0.0.1", port).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")
            answer = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
        finally:
            await runner.cleanup()
        head, body = answer.split(b"\r\n\r\n", 1)
        status, *lines = head.split(b"\r\n")
        answers.append((status, sorted(line for line in lines if not line.startswith(b"Date: ")), body))
    server.close()
    assert answers[0] == answers[1]


async def test_the_routes_follow_a_service_moved_to_another_port(service: RawService, door: Door) -> None:
    """The app's upstream mapping is read at each request (a restarted service may listen on a new
    port, as in the test harness)."""
    moved = RawService(free_port(), answer=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nmoved")
    server = await asyncio.start_server(moved.serve, "127.0.0.1", moved.port)
    try:
        assert body_of(await door.exchange(b"GET /v2/a HTTP/1.1\r\nHost: h\r\n\r\n")) == b"ok"
        door.runner.app[APP_KEY_UPSTREAMS]["conversations"] = f"http://127.0.0.1:{moved.port}"
        assert body_of(await door.exchange(b"GET /v2/b HTTP/1.1\r\nHost: h\r\n\r\n")) == b"moved"
        assert [request.split(b" ")[1] for request in moved.seen] == [b"/v2/b"]
        del door.runner.app[APP_KEY_UPSTREAMS]["conversations"]  # no such service: aiohttp's 404
        assert status_of(await door.exchange(b"GET /v2/c HTTP/1.1\r\nHost: h\r\n\r\n")) == 404
    finally:
        server.close()


async def test_a_visitor_that_never_reads_cannot_make_the_door_hold_more_than_a_bound(
        service: RawService, door: Door) -> None:
    """Pipelining requests while never reading the answers: once the door cannot write, it
    stops reading the socket (the kernel's buffers then push back on the visitor) instead of
    buffering whatever is sent."""
    service.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + b"x" * 65536
    request = b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n"
    padding = b"GET /v2/pad HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    sent = 0
    try:
        for _ in range(8):
            writer.write(request)
        for _ in range(4000):  # up to 16 MB, far past what the door may hold
            writer.write(padding)
            sent += len(padding)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break  # the door stopped reading: the visitor is pushed back
        assert door.site.door is not None
        held = max((len(conn.buffer) for conn in door.site.door.connections), default=0)
        assert held <= 1 << 20, f"the door buffers {held} bytes of a visitor that does not read"
        assert sent < 16_000_000, "the door kept reading a visitor it could not answer"
        # Reading again gets every answer, in order, and the connection keeps working.
        for _ in range(3):
            response = await asyncio.wait_for(read_response(reader), 5)
            assert status_of(response) == 200 and len(body_of(response)) == 65536
    finally:
        writer.transport.abort()  # gone: what it had left to send is never sent
    assert status_of(await door.exchange(b"GET /v2/after HTTP/1.1\r\nHost: h\r\n\r\n")) == 200
    # The door noticed the visitor left: nothing of it is held.
    await _until(lambda: len(door.site.door.connections) <= 1, 2.0)
    assert len(door.site.door.connections) <= 1  # at most the exchange's own, closing


async def _stop_reading(door: Door) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A visitor that asks for large answers and pipelines more requests, reading nothing: the
    door's writes to it stall, and then its reads."""
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    for _ in range(16):
        writer.write(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n")
    padding = b"GET /v2/pad HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    for _ in range(4000):
        writer.write(padding)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            break
    assert door.site.door is not None
    assert any(conn.write_paused and conn.read_paused for conn in door.site.door.connections)
    return reader, writer


async def _until_dropped(reader: asyncio.StreamReader) -> int:
    """Read what the door had sent until it ends the connection; how many bytes came."""
    received = 0
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
            received += len(chunk)
    except ConnectionResetError:
        pass
    return received


async def test_closing_the_door_drops_a_visitor_that_stopped_reading_once_the_grace_is_over(
        service: RawService, door: Door) -> None:
    """A close waits for answers in flight up to its grace, then drops the connections still
    open: one whose visitor stopped reading would otherwise stay open as long as it is (a
    close first sends what is buffered)."""
    service.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1048576
    reader, writer = await _stop_reading(door)
    assert door.site.door is not None
    try:
        await asyncio.wait_for(door.site.door.close(timeout=0.2), 5)
        assert not door.site.door.connections
        assert await _until_dropped(reader) < 16 * 1048576
    finally:
        writer.transport.abort()


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll `condition` until it holds or `seconds` pass (the caller asserts it then)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


async def _until_no_connections(door: Door) -> None:
    assert door.site.door is not None
    connections = door.site.door.connections
    await _until(lambda: not connections)
    assert not connections, f"the door still holds {len(connections)} connection(s)"


async def test_a_visitor_that_reads_nothing_past_the_idle_time_is_dropped(
        service: RawService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeper drops a connection whose visitor has read nothing of an answer for the idle
    time, whatever it still sends; one that keeps reading, however slowly, is kept."""
    monkeypatch.setattr(fastpath, "CLIENT_IDLE_SECONDS", 3600.0)  # not while the scene is set up
    monkeypatch.setattr(fastpath, "SWEEP_SECONDS", 0.05)
    service.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1048576
    door = await open_door({"conversations": f"http://127.0.0.1:{service.port}"})
    assert door.site.door is not None
    connections = door.site.door.connections
    try:
        reader, writer = await _stop_reading(door)
        try:
            monkeypatch.setattr(fastpath, "CLIENT_IDLE_SECONDS", 0.3)
            await _until_no_connections(door)
            assert await _until_dropped(reader) < 16 * 1048576
        finally:
            writer.transport.abort()

        # Reading nothing, but sending a byte now and then (which the door reads: it holds
        # far less than its pipelining bound): dropped all the same.
        monkeypatch.setattr(fastpath, "CLIENT_IDLE_SECONDS", 3600.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            writer.write(b"GET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n" * 8)
            await _until(lambda: any(conn.write_paused for conn in connections))
            assert any(conn.write_paused for conn in connections)
            monkeypatch.setattr(fastpath, "CLIENT_IDLE_SECONDS", 0.3)
            for _ in range(100):
                if not door.site.door.connections:
                    break
                writer.write(b" ")
                await asyncio.sleep(0.05)
            assert not door.site.door.connections, "a trickle of bytes kept a visitor that reads nothing"
        finally:
            writer.transport.abort()

        # A visitor that reads: an answer streaming for longer than the idle time, its writes
        # paused for a moment now (as a reader's are, again and again), is kept.
        monkeypatch.setattr(fastpath, "CLIENT_IDLE_SECONDS", 1.0)
        size = 8 * 1048576
        service.answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"y" * size
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            writer.write(b"GET /v2/long HTTP/1.1\r\nHost: h\r\n\r\n")
            await _until(lambda: any(conn.write_paused for conn in connections))
            (conn,) = connections
            assert conn.write_paused
            conn.last_seen -= 3600  # its request came long ago
            await asyncio.sleep(0.3)  # several sweeps
            assert conn in door.site.door.connections, "the door dropped a visitor whose answer was long"
            received = 0
            while received < size:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
                assert chunk
                received += len(chunk)
            assert received >= size
        finally:
            writer.transport.abort()
    finally:
        await door.runner.cleanup()
