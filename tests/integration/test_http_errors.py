"""`shared.http.error_middleware` over real HTTP: what a database outage, a conflict with another
replica's transaction and a bug look like to an API client (SunCo's error body, never a leak)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from shared.http import error_middleware


async def deadlock(_request: web.Request) -> web.Response:
    raise asyncpg.DeadlockDetectedError("deadlock detected")


async def serialization(_request: web.Request) -> web.Response:
    raise asyncpg.SerializationError("could not serialize access due to concurrent update")


async def outage(_request: web.Request) -> web.Response:
    raise asyncpg.CannotConnectNowError("the database system is starting up")


async def bug(_request: web.Request) -> web.Response:
    raise RuntimeError("secret internal detail")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = web.Application(middlewares=[error_middleware])
    for path, handler in (("/deadlock", deadlock), ("/serialization", serialization), ("/outage", outage),
                          ("/bug", bug)):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/deadlock", "/serialization", "/outage"])
async def test_a_lost_conflict_or_an_outage_is_a_503_to_retry(base_url: str, path: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(base_url + path) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
    assert set(body) == {"errors"} and body["errors"][0]["code"] == "service_unavailable"


async def test_a_bug_is_a_500_that_tells_nothing(base_url: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(base_url + "/bug") as resp:
        assert resp.status == 500
        text = await resp.text()
    assert "secret" not in text and "RuntimeError" not in text
