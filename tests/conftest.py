"""Fixtures shared by every test: a real nats-server with JetStream on a free port, a Bus, a
real PostgreSQL server (one per session, a fresh database per test) and database settings for
both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from shared.bus import Bus
from shared.db import DatabaseSettings
from shared.natsauth import ADMIN_USER
from tests.harness import CHROMIUM, CHROMIUM_ARGS, ENGINES, NATS_PASSWORDS, System, new_postgres_database
from tests.s3server import S3Server
from threadline.natsserver import NatsServer
from threadline.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (the pgserver wheel's binaries, loopback, a
    password); tests take a fresh database of their own with `new_postgres_database`."""
    server = PostgresServer(extra_settings={"fsync": "off", "full_page_writes": "off"}).start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real S3-compatible server for the session (`rclone serve s3`); tests take a bucket of
    their own with `new_bucket`."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return await new_postgres_database(postgres_server)


@pytest.fixture(params=ENGINES)
async def engine_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that puts services on each engine: none (their SQLite files), then
    THREADLINE_DATABASE_URL of a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return {}
    return {"THREADLINE_DATABASE_URL": await new_postgres_database(request.getfixturevalue("postgres_server"))}


@pytest.fixture
async def system_on_each_engine(nats_server: NatsServer, tmp_path: Path,
                                engine_env: dict[str, str]) -> AsyncIterator[System]:
    """`system`, once with the services' state on SQLite and once on PostgreSQL (a module opts
    in by defining its `system` fixture as this one)."""
    sys_ = System(nats_server.url, tmp_path / "data", env=engine_env)
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest.fixture
async def system_on_postgres(nats_server: NatsServer, tmp_path: Path, postgres_url: str) -> AsyncIterator[System]:
    """`system` with every service's state in a fresh database of the session's PostgreSQL server."""
    sys_ = System(nats_server.url, tmp_path / "data", env={"THREADLINE_DATABASE_URL": postgres_url})
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest.fixture(params=ENGINES)
async def database_settings(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseSettings:
    """Settings for a service named `svc`, once per engine: a SQLite file under the test's
    folder, then a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return DatabaseSettings(sqlite_path=str(tmp_path / "svc.db"), schema="svc")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return DatabaseSettings(sqlite_path=str(tmp_path / "svc.db"), schema="svc",
                            url=await new_postgres_database(server), pool_size=4)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream per test (starting one costs ~0.1 s).

    It requires a user per service, as `threadline up` does (services started by
    `tests.harness.System` connect as themselves); `url` carries the admin's credentials, for
    tests that look at streams and buckets directly.
    """
    server = NatsServer(store_dir=str(tmp_path / "nats"), passwords=NATS_PASSWORDS, url_user=ADMIN_USER).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A Bus connected to the test's nats-server, streams created."""
    b = await Bus.connect(nats_server.url, "test")
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def system(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[System]:
    """An empty in-process System (tests start the services they need)."""
    sys_ = System(nats_server.url, tmp_path / "data")
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for the test (closed after it)."""
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()
