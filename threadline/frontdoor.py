"""The public front door of `threadline up`: a reverse proxy routing by path prefix.

It routes exactly `shared.routes.ROUTES` (what the Kubernetes Ingress routes), forwards
WebSockets, streams bodies, and adds `X-Forwarded-*` so services can rebuild public URLs
(Twilio-style signatures are computed over the public URL, not the internal one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from shared.http import error_response
from shared.routes import ROUTES, SERVICE_PROBE_PREFIX, route_for

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})
BUFFERED_BODY_BYTES = 1024 * 1024
APP_KEY_UPSTREAMS = web.AppKey("upstreams", dict)
APP_KEY_SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_frontdoor(upstreams: Mapping[str, str]) -> web.Application:
    """An aiohttp app proxying to `upstreams` (service name → base URL like http://127.0.0.1:8081)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[APP_KEY_UPSTREAMS] = dict(upstreams)

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


def _target(request: web.Request) -> str | None:
    upstreams: dict[str, str] = request.app[APP_KEY_UPSTREAMS]
    path = request.rel_url.raw_path
    if path.startswith(SERVICE_PROBE_PREFIX):
        # /_svc/<service>/healthz → that service's own /healthz
        rest = path[len(SERVICE_PROBE_PREFIX):]
        name, _, probe = rest.partition("/")
        if name in upstreams and probe in ("healthz", "readyz"):
            return f"{upstreams[name]}/{probe}"
        return None
    route = route_for(path)
    if route is None or route.service not in upstreams:
        return None
    query = f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
    return f"{upstreams[route.service]}{path}{query}"


def _forward_headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    # Append, as every proxy does: the services believe the chain only up to the first address
    # that is not a trusted proxy (shared/clientip.py), so what a client wrote there is ignored.
    chain = [*request.headers.getall("X-Forwarded-For", []), request.remote or ""]
    headers["X-Forwarded-For"] = ", ".join(hop.strip() for hop in chain if hop.strip())
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return headers


async def _proxy(request: web.Request) -> web.StreamResponse:
    target = _target(request)
    if target is None:
        if any(route.prefix == request.path + "/" for route in ROUTES):  # `/sandbox` → `/sandbox/`
            raise web.HTTPPermanentRedirect(request.rel_url.with_path(request.path + "/"))
        return error_response(404, f"No route for {request.path}")
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _proxy_websocket(request, target)
    session = request.app[APP_KEY_SESSION]
    # A small body of known length (every webhook and API call) goes in one piece with its
    # length: streaming it cost a chunked upstream request and a write per chunk.
    body: bytes | aiohttp.StreamReader | None = None
    if request.can_read_body:
        length = request.content_length
        body = await request.read() if length is not None and length <= BUFFERED_BODY_BYTES else request.content
    try:
        async with session.request(
            request.method, target, headers=_forward_headers(request), data=body, allow_redirects=False,
        ) as upstream:
            headers = [(key, value) for key, value in upstream.headers.items() if key.lower() not in HOP_BY_HOP]
            length = upstream.content_length
            if length is not None and length <= BUFFERED_BODY_BYTES:
                return web.Response(status=upstream.status, reason=upstream.reason, body=await upstream.read(),
                                    headers=CIMultiDict(headers))
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in headers:
                response.headers.add(key, value)
            if length is not None:
                response.content_length = length
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
    headers = {k: v for k, v in _forward_headers(request).items()
               if not k.lower().startswith("sec-websocket")}
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
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await upstream.close()
    # Keep the service's close code (e.g. 4401 for a bad token) for the browser.
    await downstream.close(code=upstream.close_code or 1000)
    return downstream


__all__ = ["ROUTES", "build_frontdoor"]
