"""The front door routes by prefix exactly as `shared.routes` says, probes every service, and
forwards WebSockets with their close codes — served by aiohttp alone (`web.TCPSite`) and with the
fast path in front (`FrontdoorSite`, as `threadline up` runs it)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from shared.routes import ROUTES, route_for
from threadline.frontdoor import FrontdoorSite, build_frontdoor
from threadline.natsserver import free_port

Site = type[web.TCPSite]


@pytest.fixture(params=[web.TCPSite, FrontdoorSite], ids=["aiohttp", "fastpath"])
def door_site(request: pytest.FixtureRequest) -> Site:
    site: Site = request.param
    return site


async def start(app: web.Application, port: int, site: Site = web.TCPSite) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await site(runner, "127.0.0.1", port).start()
    return runner


def upstream(name: str) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"service": name, "path": request.path, "query": request.query_string,
                                  "body": (await request.read()).decode(),
                                  "forwardedHost": request.headers.get("X-Forwarded-Host"),
                                  "forwardedFor": request.headers.get("X-Forwarded-For")})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        msg = await ws.receive_str()
        await ws.send_str(f"{name}:{msg}")
        await ws.close(code=4401)
        return ws

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.router.add_get("/healthz", ready)
    app.router.add_get("/sdk/socket", socket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_routes_probes_redirects_and_websockets(door_site: Site) -> None:
    names = sorted({r.service for r in ROUTES})
    ports = {name: free_port() for name in names}
    runners = [await start(upstream(name), port) for name, port in ports.items()]
    door_port = free_port()
    runners.append(await start(build_frontdoor({n: f"http://127.0.0.1:{p}" for n, p in ports.items()}), door_port,
                               door_site))
    base = f"http://127.0.0.1:{door_port}"
    try:
        async with aiohttp.ClientSession() as session:
            for route in ROUTES:
                path = f"{route.prefix}x/y"
                async with session.post(f"{base}{path}?a=1", data=b"hello") as resp:
                    body = await resp.json()
                assert body == {"service": route.service, "path": path, "query": "a=1", "body": "hello",
                                "forwardedHost": f"127.0.0.1:{door_port}", "forwardedFor": "127.0.0.1"}
            # What the client wrote is kept and the address the door saw appended, as proxies do:
            # the services believe the chain from the right, up to the first untrusted hop.
            async with session.get(f"{base}/v2/x", headers={"X-Forwarded-For": "198.51.100.7"}) as resp:
                assert (await resp.json())["forwardedFor"] == "198.51.100.7, 127.0.0.1"
            async with session.get(f"{base}/nowhere") as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "not_found"
            async with session.get(f"{base}/sandbox", allow_redirects=False) as resp:
                assert resp.status == 308 and resp.headers["Location"].endswith("/sandbox/")
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200 and set((await resp.json())["services"]) == set(names)
            for name in names:
                async with session.get(f"{base}/_svc/{name}/readyz") as resp:
                    assert resp.status == 200
            async with session.ws_connect(f"{base}/sdk/socket") as ws:
                await ws.send_str("ping")
                assert await ws.receive_str() == "web:ping"
                closing = await ws.receive()
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 4401
        await runners[0].cleanup()  # one upstream down → /healthz degraded, its routes 503
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 503
            down = next(r for r in ROUTES if r.service == names[0])
            async with session.get(f"{base}{down.prefix}z") as resp:
                assert resp.status == 503
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_bodies_both_ways_and_no_cookie_crosses_between_visitors(door_site: Site) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB: streamed, not buffered

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.query.get("chunked"):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(body), 65536):
                await response.write(body[start:start + 65536])
            await response.write_eof()
            return response
        response = web.Response(body=body, headers={"X-Cookie-Seen": request.headers.get("Cookie", "")})
        response.set_cookie("session", "visitor-a-secret")
        return response

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    upstream_port, door_port = free_port(), free_port()
    runners = [await start(app, upstream_port)]
    runners.append(await start(build_frontdoor({"conversations": f"http://localhost:{upstream_port}"}), door_port,
                               door_site))
    base = f"http://127.0.0.1:{door_port}/v2/echo"
    try:
        async with aiohttp.ClientSession() as visitor_a:
            async with visitor_a.post(base, data=b"small") as resp:
                assert resp.status == 200 and await resp.read() == b"small"
                assert resp.headers["Content-Length"] == "5"
            async with visitor_a.post(base, data=big) as resp:
                assert await resp.read() == big
            async with visitor_a.post(f"{base}?chunked=1", data=big) as resp:
                assert resp.headers.get("Transfer-Encoding") == "chunked" and await resp.read() == big
        # Another visitor: the cookie set for the first is not replayed by the door's own client.
        async with aiohttp.ClientSession() as visitor_b:
            async with visitor_b.get(base) as resp:
                assert resp.status == 200 and resp.headers["X-Cookie-Seen"] == ""
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_header_sent_twice_reaches_the_service_twice(door_site: Site) -> None:
    """Repeated request headers (two Cookie lines, two Accept lines) are all forwarded, on the
    buffered and on the streamed path alike."""
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"repeated": request.headers.getall("X-Repeated", [])})

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    upstream_port, door_port = free_port(), free_port()
    runners = [await start(app, upstream_port)]
    runners.append(await start(build_frontdoor({"conversations": f"http://127.0.0.1:{upstream_port}"}), door_port,
                               door_site))
    headers = CIMultiDict([("X-Repeated", "a"), ("X-Repeated", "b")])
    try:
        async with aiohttp.ClientSession() as client:
            for body in (b"small", b"x" * (2 * 1024 * 1024)):
                async with client.post(f"http://127.0.0.1:{door_port}/v2/echo", data=body, headers=headers) as resp:
                    assert resp.status == 200 and (await resp.json())["repeated"] == ["a", "b"]
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_kept_alive_connections_survive_a_service_restart_and_close_delimited_answers(door_site: Site) -> None:
    seen: list[str] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs} {await request.text()}")
        return web.Response(text=f"hello {len(seen)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    upstream_port, raw_port, door_port = free_port(), free_port(), free_port()
    service = await start(app, upstream_port)

    async def raw_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    raw = await asyncio.start_server(raw_answer, "127.0.0.1", raw_port)
    door = await start(build_frontdoor({"conversations": f"http://127.0.0.1:{upstream_port}",
                                        "sandbox": f"http://127.0.0.1:{raw_port}"}), door_port, door_site)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # one kept-alive connection carries them all
                async with session.post(f"http://127.0.0.1:{door_port}/v2/a?x=1", data=b"body") as resp:
                    assert resp.status == 200
            assert seen == ["POST /v2/a?x=1 body"] * 3
            # The service restarts: the door's pooled connection is dead; the next request still
            # arrives, once.
            await service.cleanup()
            service = await start(app, upstream_port)
            async with session.post(f"http://127.0.0.1:{door_port}/v2/b", data=b"again") as resp:
                assert resp.status == 200 and await resp.text() == "hello 4"
            assert seen[3:] == ["POST /v2/b again"]
            for _ in range(2):
                async with session.get(f"http://127.0.0.1:{door_port}/sandbox/x") as resp:
                    assert resp.status == 200 and await resp.text() == "until the end"
            await service.cleanup()
            async with session.get(f"http://127.0.0.1:{door_port}/v2/c") as resp:
                assert resp.status == 503
                assert (await resp.json())["errors"][0]["title"] == "Service unavailable, try again"
    finally:
        raw.close()
        await door.cleanup()
        await service.cleanup()


def test_longest_prefix_wins() -> None:
    assert route_for("/webhooks/whatsapp/abc") is not None
    assert route_for("/v2/apps") is not None and route_for("/v2/apps").service == "conversations"  # type: ignore[union-attr]
    assert route_for("/v1/apps") is None
