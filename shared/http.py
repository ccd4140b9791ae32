"""HTTP helpers: SunCo-style error bodies, msgspec JSON responses, bounded bodies, error middleware."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from shared.db import CONFLICT_ERRORS, UNAVAILABLE_ERRORS
from shared.telemetry import extract_context, tracer
from shared.untrusted import decode_json

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

MAX_JSON_BODY = 100 * 1024  # SunCo: 100 KB JSON bodies
T = TypeVar("T")
_ENCODER = msgspec.json.Encoder()

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    423: "locked",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered with SunCo's body: `{"errors": [{"code", "title"}]}`."""

    def __init__(self, status: int, title: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.code = code or ERROR_CODES.get(status, "error")
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429


def error_response(status: int, title: str, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """A SunCo-shaped error response."""
    body = {"errors": [{"code": code or ERROR_CODES.get(status, "error"), "title": title}]}
    return web.Response(status=status, body=_ENCODER.encode(body), content_type="application/json",
                        headers=headers)


def json_response(data: Any, status: int = 200) -> web.Response:
    """Encode `data` (structs, dicts, lists) with msgspec."""
    return web.Response(status=status, body=_ENCODER.encode(data), content_type="application/json")


async def read_body(request: web.Request, limit: int = MAX_JSON_BODY) -> bytes:
    """Read the raw body, refusing (413) anything over `limit` bytes without buffering it all."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, type_: type[T], limit: int = MAX_JSON_BODY) -> T:
    """Read and validate a JSON body into `type_`; 415/400/413 with a clear title otherwise.

    Decoding goes through `shared.untrusted.decode_json`, so deep nesting is a 400 too.
    """
    ctype = request.content_type
    if ctype not in ("application/json", "") and not ctype.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, got {ctype}")
    raw = await read_body(request, limit)
    if not raw:
        raise ApiError(400, "Request body is required")
    try:
        return decode_json(raw, type_)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"Malformed JSON: {exc}") from exc


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn ApiError and aiohttp HTTP errors into SunCo bodies; never leak a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.title, exc.code, exc.headers)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return error_response(exc.status, exc.reason or "error")
        raise
    except UNAVAILABLE_ERRORS as exc:
        # The database is down or failing over: the caller (a platform, a business) retries.
        log.warning("database unavailable on %s %s: %s", request.method, route_of(request), type(exc).__name__)
        return error_response(503, "Service temporarily unavailable, retry later", headers={"Retry-After": "1"})
    except CONFLICT_ERRORS as exc:
        # Another replica's transaction won a conflict over the same rows; nothing was written.
        log.warning("database conflict on %s %s: %s", request.method, route_of(request), type(exc).__name__)
        return error_response(503, "Concurrent update, retry", headers={"Retry-After": "1"})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, route_of(request))
        return error_response(500, "Internal error")


def route_of(request: web.Request) -> str:
    """The route template `request` matched (`/webhooks/sendgrid/{integration_id}/{secret}`), what
    logs and spans name: a path may carry a secret (SendGrid's inbound URL does)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


@contextlib.contextmanager
def server_span(request: web.Request) -> Iterator[Span]:
    """A SERVER span for `request`, continuing a `traceparent` the caller sent (current while open)."""
    route = route_of(request)
    with _tracer.start_as_current_span(f"{request.method} {route}", context=extract_context(request.headers),
                                       kind=SpanKind.SERVER) as span:
        span.set_attribute("http.request.method", request.method)
        span.set_attribute("http.route", route)
        yield span


def is_websocket_upgrade(request: web.Request) -> bool:
    """Whether `request` asks to become a WebSocket."""
    return request.headers.get("Upgrade", "").lower() == "websocket"


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Open a SERVER span per request (`server_span`). A WebSocket's handler opens its own around
    the handshake: a span as long as the socket (hours) says nothing, and costs memory per socket."""
    if is_websocket_upgrade(request):
        return await handler(request)
    with server_span(request) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    """An `Authorization: Basic …` header (aiohttp's BasicAuth helper is deprecated)."""
    import base64

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
