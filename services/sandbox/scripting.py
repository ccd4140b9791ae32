"""Helpers for the sandbox's own scripting API (`/sandbox/<channel>/<integrationId>/…`), which
every channel fake serves the same way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shared.http import ApiError, error_response
from shared.untrusted import decode_json

Handler = Callable[[web.Request], Awaitable[web.Response]]


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object body (empty body: `{}`); 413 past `limit` bytes, 400 otherwise."""
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, f"Request body exceeds {limit} bytes")
    try:
        body = decode_json(raw or b"{}")
    except ValueError as exc:
        raise ApiError(400, "body must be JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def sunco_errors(handler: Handler) -> Handler:
    """Answer `ApiError` with SunCo's body even where no `error_middleware` is installed (tests)."""
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.title, exc.code)
    return wrapped
