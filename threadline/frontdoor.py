"""The public front door of `threadline up`: a reverse proxy routing by path prefix.

It routes exactly `shared.routes.ROUTES` (what the Kubernetes Ingress routes), forwards
WebSockets, streams bodies, and adds `X-Forwarded-*` so services can rebuild public URLs
(Twilio-style signatures are computed over the public URL, not the internal one).

Served on a `FrontdoorSite`, a connection's plain requests (small bodies of known length to a
routed prefix) take the fast path of `threadline.fastpath`; everything else is served by the
aiohttp application below, which also serves every request when the app runs on a plain
`web.TCPSite`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from shared.http import error_response
from shared.routes import ROUTES, SERVICE_PROBE_PREFIX, route_for
from shared.tasks import cancel_and_wait
from threadline.fastpath import Door, fast_connection
from threadline.upstream import Upstream, UpstreamClosed

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})
# Written by the door itself: what a client sends under these names is not passed on.
FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
BUFFERED_BODY_BYTES = 1024 * 1024
APP_KEY_UPSTREAMS = web.AppKey("upstreams", dict)
APP_KEY_SESSION = web.AppKey("session", aiohttp.ClientSession)
APP_KEY_LEAN = web.AppKey("lean_upstreams", dict)


def build_frontdoor(upstreams: Mapping[str, str]) -> web.Application:
    """An aiohttp app proxying to `upstreams` (service name → base URL like http://127.0.0.1:8081)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[APP_KEY_UPSTREAMS] = dict(upstreams)
    app[APP_KEY_LEAN] = {}

    async def on_startup(app: web.Application) -> None:
        # No cookie jar: one session serves every visitor, and a cookie an upstream set for one
        # must never ride along on another's request.
        app[APP_KEY_SESSION] = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def on_cleanup(app: web.Application) -> None:
        await app[APP_KEY_SESSION].close()
        for lean in app[APP_KEY_LEAN].values():
            lean.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


async def _healthz(request: web.Request) -> web.Response:
    upstreams: dict[str, str] = request.app[APP_KEY_UPSTREAMS]
    session = request.app[APP_KEY_SESSION]

    async def probe(name: str, base: str) -> tuple[str, bool]:
        try:
            async with session.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return name, resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return name, False

    results = dict(await asyncio.gather(*(probe(n, b) for n, b in upstreams.items())))
    ok = all(results.values())
    return web.json_response({"status": "ok" if ok else "degraded", "services": results},
                             status=200 if ok else 503)


def _route(request: web.Request) -> tuple[str, str] | None:
    """The service a request goes to and the path (with query) it asks of it."""
    upstreams: dict[str, str] = request.app[APP_KEY_UPSTREAMS]
    path = request.rel_url.raw_path
    if path.startswith(SERVICE_PROBE_PREFIX):
        # /_svc/<service>/healthz → that service's own /healthz
        rest = path[len(SERVICE_PROBE_PREFIX):]
        name, _, probe = rest.partition("/")
        if name in upstreams and probe in ("healthz", "readyz"):
            return name, f"/{probe}"
        return None
    route = route_for(path)
    if route is None or route.service not in upstreams:
        return None
    query = f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
    return route.service, f"{path}{query}"


def _forward_headers(request: web.Request) -> CIMultiDict[str]:
    # A multidict: a header the visitor sent twice (Cookie, Accept) is forwarded twice.
    headers = CIMultiDict((k, v) for k, v in request.headers.items()
                          if k.lower() not in HOP_BY_HOP and k.lower() not in FORWARDED)
    # Append, as every proxy does: the services believe the chain only up to the first address
    # that is not a trusted proxy (shared/clientip.py), so what a client wrote there is ignored.
    chain = [*request.headers.getall("X-Forwarded-For", []), request.remote or ""]
    headers["X-Forwarded-For"] = ", ".join(hop.strip() for hop in chain if hop.strip())
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return headers


async def _proxy(request: web.Request) -> web.StreamResponse:
    routed = _route(request)
    if routed is None:
        if any(route.prefix == request.path + "/" for route in ROUTES):  # `/sandbox` → `/sandbox/`
            raise web.HTTPPermanentRedirect(request.rel_url.with_path(request.path + "/"))
        return error_response(404, f"No route for {request.path}")
    service, path = routed
    target = f"{request.app[APP_KEY_UPSTREAMS][service]}{path}"
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _proxy_websocket(request, target)
    length = request.content_length if request.can_read_body else 0
    if length is None or length > BUFFERED_BODY_BYTES:
        return await _proxy_streaming(request, target)
    # Every webhook and API call: a body of known, small length, sent in one piece on a kept-alive
    # connection by the lean client (threadline/upstream.py).
    body = await request.read() if length else b""
    upstream = _lean_upstream(request.app, target)
    # The body is in hand: the service has no `100 Continue` to send.
    headers = [(k, v) for k, v in _forward_headers(request).items() if k.lower() != "expect"]
    try:
        response, conn = await upstream.request(request.method, path, headers, body,
                                                buffer_up_to=BUFFERED_BODY_BYTES)
    except (UpstreamClosed, OSError, TimeoutError) as exc:
        log.warning("upstream %s unavailable: %s", target.split("?", 1)[0], exc)
        return error_response(503, "Service unavailable, try again")
    kept = CIMultiDict((key, value) for key, value in response.headers if key.lower() not in HOP_BY_HOP)
    if response.body is not None:
        upstream.release(conn, response)
        return web.Response(status=response.status, reason=response.reason, body=response.body, headers=kept)
    streamed = web.StreamResponse(status=response.status, reason=response.reason, headers=kept)
    if response.content_length is not None:
        streamed.content_length = response.content_length
    try:
        await streamed.prepare(request)
        async for chunk in response.chunks():
            await streamed.write(chunk)
        await streamed.write_eof()
    except BaseException:
        conn.close()
        raise
    upstream.release(conn, response)
    return streamed


def _lean_upstream(app: web.Application, target: str) -> Upstream:
    """The connection pool for the service `target` is on (keyed by address: the routes may be
    pointed at a restarted service's new port)."""
    url = URL(target)
    key = f"{url.host}:{url.port}"
    pools: dict[str, Upstream] = app[APP_KEY_LEAN]
    pool = pools.get(key)
    if pool is None:
        pool = pools[key] = Upstream(url.host or "127.0.0.1", url.port or 80)
    return pool


async def _proxy_streaming(request: web.Request, target: str) -> web.StreamResponse:
    """A body too big to hold, or of unknown length: streamed both ways by aiohttp's client."""
    session = request.app[APP_KEY_SESSION]
    try:
        async with session.request(
            request.method, target, headers=_forward_headers(request),
            data=request.content if request.can_read_body else None, allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientConnectionError as exc:
        log.warning("upstream %s unavailable: %s", target.split("?", 1)[0], exc)
        return error_response(503, "Service unavailable, try again")


async def _proxy_websocket(request: web.Request, target: str) -> web.StreamResponse:
    session = request.app[APP_KEY_SESSION]
    headers = CIMultiDict((k, v) for k, v in _forward_headers(request).items()
                          if not k.lower().startswith("sec-websocket"))
    try:
        upstream = await session.ws_connect(target.replace("http://", "ws://", 1), headers=headers,
                                            heartbeat=None, autoping=False)
    except (aiohttp.ClientError, aiohttp.WSServerHandshakeError) as exc:
        # Never log the query: SDK sockets carry their session token there.
        log.warning("websocket upstream %s unavailable: %s", target.split("?", 1)[0], type(exc).__name__)
        return error_response(503, "Service unavailable, try again")
    downstream = web.WebSocketResponse(autoping=False)
    await downstream.prepare(request)

    async def pump(src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
                   dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse) -> None:
        async for msg in src:
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                await dst.ping(msg.data)
            elif msg.type == WSMsgType.PONG:
                await dst.pong(msg.data)
            else:
                break

    tasks = [asyncio.create_task(pump(upstream, downstream)), asyncio.create_task(pump(downstream, upstream))]
    _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    await cancel_and_wait(pending)
    await upstream.close()
    # Keep the service's close code (e.g. 4401 for a bad token) for the browser.
    await downstream.close(code=upstream.close_code or 1000)
    return downstream


class FrontdoorSite(web.TCPSite):
    """A TCP site for the front door's `AppRunner`: connections start on the fast path, and
    anything the fast path does not take is served by the runner's aiohttp application."""

    def __init__(self, runner: web.AppRunner, host: str | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.door: Door | None = None

    async def start(self) -> None:
        if self._ssl_context is not None:  # the fast path speaks plain HTTP only
            await super().start()
            return
        # As TCPSite.start, with the fast path's protocol in front of aiohttp's.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        upstreams: dict[str, str] = runner.app[APP_KEY_UPSTREAMS]
        door = self.door = Door(loop, upstreams, runner.server)
        self._server = await loop.create_server(
            lambda: fast_connection(door), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    async def stop(self) -> None:
        # Stop listening, answer what is in flight on the fast path, then let the runner stop
        # aiohttp's connections (those handed over) as it does for any site.
        if self._server is not None:
            self._server.close()
        if self.door is not None:
            await self.door.close(timeout=10.0)
        await super().stop()


__all__ = ["ROUTES", "FrontdoorSite", "build_frontdoor"]
