"""The whatsapp service: wiring of the webhook endpoints and the send loop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.egress import GRAPH_HOSTS, REFUSED_CODE, EgressRefused, EgressSession
from shared.http import ApiError, error_middleware, tracing_middleware
from shared.ingress import WebhookIntake, meta_handshake, publish_durably, report_rejected
from shared.media import Download, MediaCopier, relay
from shared.messages.channel import InboundMessage
from shared.outbound import recipient_key
from shared.records import IntegrationRecord
from shared.service import ServiceApp
from shared.signing import META_SIGNATURE_HEADER, meta_signature_ok
from shared.telemetry import inject_headers, log_fields, setup_telemetry, tracer
from shared.untrusted import decode_json, secrets_equal

from . import handlers
from .config import WhatsAppConfig
from .handlers import Credentials
from .sender import WhatsAppSender

log = logging.getLogger(__name__)
_tracer = tracer(__name__)


class WhatsAppService(ServiceApp):
    """Webhook ingress (verify → normalize → publish) and send egress (consume → send → status)."""

    name = "whatsapp"
    # Set by `start`, before HTTP serves (and released by `stop`, in the reverse order).
    session: EgressSession
    bus: Bus
    integrations: KvMirror
    sender: WhatsAppSender
    media_copier: MediaCopier

    def __init__(self, config: WhatsAppConfig) -> None:
        super().__init__(config.common)
        self.config = config
        # integration id → (the mirror's record, its credentials): a changed record is a new object.
        self._credentials: dict[str, tuple[IntegrationRecord, Credentials | None]] = {}
        self.intake = WebhookIntake(handlers.CHANNEL, "WhatsApp", self.credentials, handlers.MAX_WEBHOOK_BODY)
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_get("/webhooks/whatsapp/{integration_id}", self.handshake)
        self.http.router.add_post("/webhooks/whatsapp/{integration_id}", self.webhook)
        self.http.router.add_get("/webhooks/whatsapp/{integration_id}/media/{media_id}", self.media)

    async def start(self) -> None:
        """Open the Graph API session, connect NATS, mirror the integrations, start the send
        loop, then serve HTTP."""
        self.session = self.egress_session("platform", hosts=GRAPH_HOSTS, timeout=self.config.send.client_timeout())
        self.media_copier = MediaCopier(await self.open_files(), self.common.public_base_url, handlers.CHANNEL)
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.sender = WhatsAppSender(self.bus, self.session, self.config.send, self.credentials,
                                     self.config.messages_per_second)
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.sender.on_outbound,
                               ordering_key=recipient_key)
        await self.start_http()

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a whatsapp integration, or None (built once per version of
        its record: every webhook asks)."""
        record = self.integrations.get(integration_id)
        if not isinstance(record, IntegrationRecord):
            self._credentials.pop(integration_id, None)  # deleted since: its secrets go too
            return None
        built = self._credentials.get(integration_id)
        if built is None or built[0] is not record:
            built = (record, Credentials.from_record(record))
            self._credentials[integration_id] = built
        return built[1]

    def by_phone_number_id(self, phone_number_id: str) -> Credentials | None:
        """The whatsapp integration of a business number (for multi-number Meta apps)."""
        usable = (Credentials.from_record(record) for record in records.integrations_where(
            self.integrations.values.values(), handlers.CHANNEL, "phoneNumberId", phone_number_id))
        return next((creds for creds in usable if creds is not None), None)

    # --- webhooks --------------------------------------------------------------------------

    async def handshake(self, request: web.Request) -> web.Response:
        """Meta's subscription check: echo `hub.challenge` when `hub.verify_token` matches."""
        creds = self.credentials(request.match_info["integration_id"])
        return meta_handshake(creds.verify_token if creds else None, request.query)

    async def webhook(self, request: web.Request) -> web.Response:
        """A signed notification: answered 200 only once all its well-formed content is durable in
        JetStream; its malformed items are reported, never a reason to refuse the others."""
        creds = self.intake.integration(request)
        raw = await self.intake.body(request)
        if not meta_signature_ok(creds.app_secret, raw, request.headers.get(META_SIGNATURE_HEADER)):
            raise ApiError(401, "Missing or invalid X-Hub-Signature-256")
        self.intake.check_content_type(request)
        normalized = self.intake.normalized(lambda: handlers.normalize_webhook(
            raw, creds, self.by_phone_number_id, self.common.public_base_url))
        report_rejected(log, handlers.CHANNEL, request.match_info["integration_id"], normalized.rejected)
        messages = await self.media_copier.copied(normalized.messages, self.message_media)
        await publish_durably(self.bus, handlers.CHANNEL, messages, normalized.statuses,
                              message_id=handlers.inbound_msg_id, status_id=handlers.status_msg_id)
        log.info("webhook accepted: %d message(s), %d status(es)", len(normalized.messages),
                 len(normalized.statuses), extra=log_fields(
                     integration_id=request.match_info["integration_id"], messages=len(normalized.messages),
                     statuses=len(normalized.statuses), rejected=len(normalized.rejected)))
        return web.Response(status=200, text="ok", content_type="text/plain")

    async def media(self, request: web.Request) -> web.StreamResponse:
        """Serve a customer's media that was not copied into the object store: resolve the Graph
        media id to its short-lived URL and stream it."""
        integration_id = request.match_info["integration_id"]
        media_id = request.match_info["media_id"]
        creds = self.credentials(integration_id)
        sig = request.query.get("sig", "")
        if creds is None or not secrets_equal(
                handlers.media_signature(creds.app_secret, integration_id, media_id), sig):
            raise ApiError(404, "Unknown media")
        try:
            async with self.graph_media(creds, media_id) as download:
                if download is None:
                    raise ApiError(404, "Unknown media")
                return await relay(request, download)
        except EgressRefused as exc:
            raise ApiError(502, "Media download refused by the egress policy") from exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ApiError(502, "Media download failed") from exc

    def message_media(self, message: InboundMessage, url: str) -> AbstractAsyncContextManager[Download | None]:
        """The download of a message's media (for the copy into the object store)."""
        creds = self.credentials(message.integration_id)
        media_id = None if creds is None else handlers.media_id_of(url, self.common.public_base_url, creds)
        if creds is None or media_id is None:
            return contextlib.nullcontext(None)
        return self.graph_media(creds, media_id)

    @contextlib.asynccontextmanager
    async def graph_media(self, creds: Credentials, media_id: str) -> AsyncIterator[Download | None]:
        """Download a media id: None when Graph does not know it.

        The integration's bearer token goes only to its Graph base URL and to the URL the lookup
        returns when that is Meta's media CDN or the Graph origin itself (the sandbox's fake);
        any other URL, or an address the egress policy refuses, is never fetched (ValueError,
        EgressRefused).
        """
        session = self.session
        auth = {"Authorization": f"Bearer {creds.access_token}"}
        with _tracer.start_as_current_span("GET graph media", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "GET")
            try:
                async with session.get(creds.media_lookup_url(media_id), headers=inject_headers(auth)) as resp:
                    info = decode_json(await resp.read()) if resp.status == 200 else None
                if info is None:
                    yield None
                    return
                url = info.get("url") if isinstance(info, dict) else None
                if not isinstance(url, str) or not handlers.media_download_allowed(url, creds.base_url):
                    log.warning("media lookup of integration %s answered a URL off Meta's hosts: not fetched",
                                creds.integration_id, extra=log_fields(
                                    integration_id=creds.integration_id, event="egress_refused",
                                    reason="media URL off the Graph and CDN hosts"))
                    raise ValueError("media lookup answered a URL off the Graph and CDN hosts")
                async with session.get(url, headers=inject_headers(auth), hosts=handlers.MEDIA_HOSTS) as upstream:
                    span.set_attribute("http.response.status_code", upstream.status)
                    if upstream.status != 200:
                        raise ValueError(f"media download answered {upstream.status}")
                    yield Download(upstream.content_type, None, upstream.content.iter_chunked(64 * 1024))
            except EgressRefused:
                span.set_status(Status(StatusCode.ERROR, REFUSED_CODE))
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise


def create(environ: Mapping[str, str] | None = None) -> WhatsAppService:
    """Build the whatsapp service from the environment (os.environ when None)."""
    setup_telemetry("whatsapp")
    return WhatsAppService(WhatsAppConfig.from_env(environ))
