"""The service runner: lifecycle, HTTP probes and signal handling common to every service.

A service module provides a `ServiceApp` subclass (in `app.py`) whose `start()` acquires its
resources through the base (`egress_session`, `connect_bus`, `mirror_bucket`, `on_stop`, `spawn`, then
`start_http`): each is released by `stop()` in the reverse order, so the order is declared once,
by the order of acquisition. `run_service` runs it until SIGINT/SIGTERM. Every service serves
`/healthz` (process alive), `/readyz` (dependencies connected) and `/metrics` (Prometheus,
`shared.metrics`) on its own port, besides whatever routes it adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from shared import metrics
from shared.bus import Bus, KvMirror
from shared.config import CommonConfig
from shared.db import Database
from shared.egress import EgressSession, Purpose
from shared.objectstore import ObjectStore, open_object_store
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]


class ServiceApp:
    """Base class for a service: owns an aiohttp app and its runner."""

    name: str = "service"

    def __init__(self, common: CommonConfig) -> None:
        self.common = common
        self.http = web.Application(client_max_size=1024 * 1024)
        self.http.router.add_get("/healthz", self._healthz)
        self.http.router.add_get("/readyz", self._readyz)
        self.http.router.add_get("/metrics", self._metrics)
        self._ready_checks: list[ReadyCheck] = []
        self._runner: web.AppRunner | None = None
        self.port: int = common.http_port
        # What `start` acquired, released by `stop` last-in first-out.
        self.resources = contextlib.AsyncExitStack()
        self._background: set[asyncio.Task[Any]] = set()

    def on_stop(self, release: Callable[[], Awaitable[object]]) -> None:
        """Have `stop()` await `release` (after what was acquired later, before what earlier)."""
        self.resources.push_async_callback(release)

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `work` in the background until it ends or `stop()` cancels it (right after HTTP
        stops serving, before anything it may use is released)."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_background(self) -> None:
        await cancel_and_wait(list(self._background))

    def egress_session(self, purpose: Purpose, *, hosts: Sequence[str] = (),
                       timeout: aiohttp.ClientTimeout | None = None, limit: int = 100,
                       ttl_dns_cache: int | None = 10) -> EgressSession:
        """An HTTP session under the egress policy (`EgressPolicy.http_session`), closed by `stop()`."""
        session = self.common.egress.http_session(purpose, hosts=hosts, timeout=timeout, limit=limit,
                                                  ttl_dns_cache=ttl_dns_cache)
        self.on_stop(session.close)
        return session

    def add_ready_check(self, check: ReadyCheck) -> None:
        """Register a check that must pass for /readyz to answer 200."""
        self._ready_checks.append(check)

    def add_database_check(self, database: Callable[[], Database | None]) -> None:
        """/readyz answers 503 while the service's database (once opened) does not answer: a
        PostgreSQL server down or failing over takes the replica out of its Service's endpoints."""
        async def database_answers() -> bool:
            db = database()
            return db is not None and await db.ping()

        self.add_ready_check(database_answers)

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": self.name})

    async def _readyz(self, _request: web.Request) -> web.Response:
        for check in self._ready_checks:
            try:
                ok = await check()
            except Exception:
                ok = False
            if not ok:
                return web.json_response({"status": "not ready", "service": self.name}, status=503)
        return web.json_response({"status": "ready", "service": self.name})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def open_files(self) -> ObjectStore:
        """The object store of `THREADLINE_OBJECT_STORE_URL` (else the data directory), open until
        `stop()`."""
        return await self.resources.enter_async_context(open_object_store(self.common.file_store))

    async def connect_bus(self) -> Bus:
        """Connect to NATS, create the streams, and make /readyz follow the connection."""
        bus = await Bus.connect(self.common.nats_url, self.name, user=self.common.nats_user,
                                password=self.common.nats_password, tls_ca_file=self.common.nats_tls_ca_file,
                                replica=self.common.replica_id)
        self.on_stop(bus.close)
        await bus.ensure_streams(self.common.stream_replicas)

        async def connected() -> bool:
            return bus.nc.is_connected

        self.add_ready_check(connected)
        return bus

    async def mirror_bucket(self, bus: Bus, bucket: str, decode: Callable[[bytes], Any]) -> KvMirror:
        """Start an in-memory mirror of a KV bucket; /readyz waits for its initial values."""
        mirror = KvMirror(bus, bucket, decode)
        await mirror.start()
        self.on_stop(mirror.stop)

        async def loaded() -> bool:
            return mirror.ready.is_set()

        self.add_ready_check(loaded)
        return mirror

    async def start_http(self) -> None:
        """Start serving HTTP; with port 0 the chosen port is stored in `self.port`."""
        self._runner = web.AppRunner(self.http, access_log=None, handle_signals=False, shutdown_timeout=10)
        await self._runner.setup()
        self.on_stop(self._cancel_background)
        self.on_stop(self.stop_http)
        site = web.TCPSite(self._runner, self.common.http_host, self.common.http_port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("%s listening on http://%s:%d", self.name, self.common.http_host, self.port)

    async def stop_http(self) -> None:
        """Stop serving HTTP (in-flight requests get the shutdown timeout to finish)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def start(self) -> None:
        """Connect dependencies and start serving. Subclasses extend this."""
        await self.start_http()

    async def stop(self) -> None:
        """Release what `start` acquired, the last acquired first (HTTP before the bus's
        consumers, those before the sessions and stores they use)."""
        await self.resources.aclose()


# Young-generation collections every 20,000 net allocations of container objects instead of 700:
# a service allocates a few hundred per message, so the default ran the cyclic collector (and
# walked everything start-up left in the young generations) several times per consumer batch,
# ~10 % of conversations' CPU under bench/e2e.py. Cycles are still collected, just in bigger batches.
GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Once a process has started: collect, move every object that start-up left (modules,
    config, caches) to the permanent generation so collections no longer walk them, and collect
    the young generation less often (`GC_YOUNG_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_service(factory: Callable[[], ServiceApp]) -> None:
    """Run a service until SIGINT/SIGTERM, then stop it cleanly."""
    # What the service writes (databases, journals) is readable by its owner only.
    os.umask(0o077)

    async def main() -> None:
        service = factory()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await service.start()
        settle_garbage_collector()
        try:
            await stop.wait()
        finally:
            log.info("%s stopping", service.name)
            await service.stop()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
