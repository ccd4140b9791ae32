"""The fake WhatsApp Cloud API for tests (the sandbox's core), plus a standalone server helper."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from services.sandbox.whatsapp_fake import (
    ERRORS,
    Account,
    FakeWhatsApp,
    WebhookDelivery,
    bsuid_for,
    digits,
    signature,
)
from threadline.natsserver import free_port

__all__ = [
    "ERRORS",
    "Account",
    "FakeServer",
    "FakeWhatsApp",
    "WebhookDelivery",
    "bsuid_for",
    "digits",
    "serve_fake",
    "signature",
]


@dataclass
class FakeServer:
    """A FakeWhatsApp served on loopback under `/sandbox`."""

    fake: FakeWhatsApp
    port: int

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>/sandbox`."""
        return f"http://127.0.0.1:{self.port}/sandbox"

    @property
    def graph_url(self) -> str:
        """What an integration's `baseUrl` is set to."""
        return f"{self.base_url}/graph"


@asynccontextmanager
async def serve_fake(fake: FakeWhatsApp | None = None) -> AsyncIterator[FakeServer]:
    """Serve a fake (a new one by default) on a free loopback port for the duration."""
    port = free_port()
    fake = fake or FakeWhatsApp(f"http://127.0.0.1:{port}/sandbox")
    if not fake.public_url:
        fake.public_url = f"http://127.0.0.1:{port}/sandbox"
    app = web.Application()
    app.router.add_routes(fake.routes("/sandbox"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield FakeServer(fake, port)
    finally:
        await fake.close()
        await runner.cleanup()
