"""The handoff service: issue and redeem link codes over NATS, serve QR codes and the app-link page."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping

import msgspec
import nats.errors
import nats.js.errors
import segno
from aiohttp import web

from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.http import ApiError, error_middleware, tracing_middleware
from shared.messages import handoff as msgs
from shared.records import IntegrationRecord
from shared.service import ServiceApp
from shared.telemetry import setup_telemetry

from .config import MAX_CODE_TTL_SECONDS, HandoffConfig
from .handlers import OPEN_PATH, QR_PATH_PREFIX, HandoffHandlers, business_name_of, handoff_error
from .store import NatsKvStore

log = logging.getLogger(__name__)

ENDPOINTS = (subjects.HANDOFF_ISSUE, subjects.HANDOFF_REDEEM)
# Codes and QR pointers must never be cached by a browser or a proxy.
NO_STORE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

OPEN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Continue in the app</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto; padding: 0 1rem; line-height: 1.5; }
h1 { font-size: 1.4rem; }
</style>
</head>
<body>
<h1>Continue in the app</h1>
<p>This link continues your conversation in the business's mobile app.</p>
<p>Open it on the phone where the app is installed: scan the QR code with that phone's camera,
or send the link to it and tap it there. If the app isn't installed yet, install it first,
then open the link again.</p>
<p>Links work once and expire after a few minutes. If this one no longer works, go back to the
chat where you started and tap “Continue on …” again to get a new one.</p>
</body>
</html>
"""


class HandoffService(ServiceApp):
    """Link codes in a JetStream KV bucket; nats.micro endpoints for issue and redeem."""

    name = "handoff"
    # Set by `start`, before NATS and HTTP serve (and released by `stop`, in the reverse order).
    bus: Bus
    integrations: KvMirror
    handlers: HandoffHandlers

    def __init__(self, config: HandoffConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.http.middlewares.extend([tracing_middleware, error_middleware])
        self.http.router.add_get(QR_PATH_PREFIX + "{qr_id}.svg", self.qr_code)
        self.http.router.add_get(OPEN_PATH, self.open_page)

    async def start(self) -> None:
        """Connect NATS, mirror the integrations, open the codes bucket, serve NATS then HTTP."""
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.INTEGRATION_DECODER.decode)
        # The bucket TTL only sweeps old entries; a code's own expiry is in its record.
        codes = await self.bus.key_value(subjects.LINK_CODES_BUCKET, ttl=MAX_CODE_TTL_SECONDS)
        self.handlers = HandoffHandlers(NatsKvStore(codes), self.config, self.lookup_integration, self.business_name)
        await self.bus.serve(subjects.HANDOFF_SERVICE, {subject: self._answer for subject in ENDPOINTS})
        await self.start_http()

    # --- integrations ----------------------------------------------------------------------

    async def lookup_integration(self, integration_id: str) -> IntegrationRecord | None:
        """An integration record: from the mirror, or straight from KV when the mirror lags."""
        record = self.integrations.get(integration_id)
        if isinstance(record, IntegrationRecord):
            return record
        # An integration created a moment ago may not have reached the watcher yet.
        try:
            kv = await self.bus.key_value(subjects.INTEGRATIONS_BUCKET)
            entry = await kv.get(integration_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        if not entry.value:
            return None
        try:
            return records.INTEGRATION_DECODER.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def business_name(self, app_id: str) -> str:
        """The app's name for customers (its web integration's businessName)."""
        return business_name_of(app_id, list(self.integrations.values.values()))

    # --- NATS ------------------------------------------------------------------------------

    async def _answer(self, data: bytes, _headers: Mapping[str, str]) -> bytes:
        try:
            request = msgs.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return msgs.encode(handoff_error(400, f"Invalid request: {str(exc)[:200]}"))
        try:
            reply = await self.handlers.handle(request)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("link code store unavailable: %s", exc)
            return msgs.encode(handoff_error(503, "Link codes are unavailable right now, try again"))
        return msgs.encode(reply)

    # --- HTTP ------------------------------------------------------------------------------

    async def qr_code(self, request: web.Request) -> web.Response:
        """The QR code (SVG) of a live link; 404 for anything else, without saying why."""
        assert self.handlers is not None
        try:
            url = await self.handlers.qr_target(request.match_info["qr_id"])
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Link codes are unavailable right now, try again") from exc
        if url is None:
            raise ApiError(404, "Not found")
        buffer = io.BytesIO()
        segno.make(url, error="m", micro=False).save(buffer, kind="svg", scale=6, border=4,
                                                     title="Scan to continue the conversation")
        return web.Response(body=buffer.getvalue(), content_type="image/svg+xml", headers=NO_STORE_HEADERS)

    async def open_page(self, _request: web.Request) -> web.Response:
        """Where an app's link lands when the app is not installed (or it is opened on a desktop)."""
        return web.Response(text=OPEN_PAGE, content_type="text/html", headers={
            **NO_STORE_HEADERS, "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})


def create(environ: Mapping[str, str] | None = None) -> HandoffService:
    """Build the handoff service from the environment."""
    setup_telemetry("handoff")
    return HandoffService(HandoffConfig.from_env(os.environ if environ is None else environ))
