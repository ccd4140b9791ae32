"""Fixtures shared by every test: a real nats-server with JetStream on a free port, a Bus."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.natsauth import ADMIN_USER
from tests.harness import NATS_PASSWORDS
from threadline.natsserver import NatsServer


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
async def system(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[object]:
    """An empty in-process System (tests start the services they need)."""
    from tests.harness import System

    sys_ = System(nats_server.url, tmp_path / "data")
    try:
        yield sys_
    finally:
        await sys_.close()
