"""The messenger service: wiring of the webhook endpoints, the reply-window store and the send loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from opentelemetry.trace import SpanKind

from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.egress import GRAPH_HOSTS, MESSENGER_MEDIA_HOSTS, EgressSession
from shared.http import ApiError, error_middleware, tracing_middleware
from shared.ingress import WebhookIntake, meta_handshake, publish_durably, report_rejected
from shared.media import Download, MediaCopier
from shared.messages.channel import InboundMessage
from shared.outbound import recipient_key
from shared.records import IntegrationRecord
from shared.service import ServiceApp
from shared.signing import META_SIGNATURE_HEADER, meta_signature_ok
from shared.telemetry import log_fields, setup_telemetry, tracer

from . import handlers
from .config import MessengerConfig
from .handlers import Credentials, ReplyWindowPolicy
from .sender import MessengerSender
from .store import Store

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

PRUNE_INTERVAL_SECONDS = 3600.0




class MessengerService(ServiceApp):
    """Webhook ingress (verify → normalize → publish) and send egress (window → send → status)."""

    name = "messenger"
    # Set by `start`, before HTTP serves (and released by `stop`, in the reverse order).
    store: Store
    session: EgressSession
    bus: Bus
    integrations: KvMirror
    sender: MessengerSender
    media_copier: MediaCopier

    def __init__(self, config: MessengerConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.intake = WebhookIntake(handlers.CHANNEL, "Messenger", self.credentials, handlers.MAX_WEBHOOK_BODY)
        self.policy = ReplyWindowPolicy(standard_seconds=config.window_hours * 3600,
                                        human_agent_seconds=config.human_agent_days * 86400)
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_get("/webhooks/messenger/{integration_id}", self.handshake)
        self.http.router.add_post("/webhooks/messenger/{integration_id}", self.webhook)
        self.add_database_check(lambda: self.store.db)

    async def start(self) -> None:
        """Open the store, connect NATS, mirror the integrations, start the send loop, serve HTTP."""
        self.store = await Store.open(self.config.database)
        self.on_stop(self.store.close)
        self.session = self.egress_session("platform", hosts=GRAPH_HOSTS, timeout=self.config.send.client_timeout())
        self.media_copier = MediaCopier(await self.open_files(), self.common.public_base_url, handlers.CHANNEL)
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.sender = MessengerSender(self.bus, self.session, self.config.send, self.credentials, self.store,
                                      self.policy, self.config.calls_per_second, self.config.media_calls_per_second)
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.sender.on_outbound,
                               ordering_key=recipient_key)
        self.spawn(self._prune_loop(), "messenger:prune")
        await self.start_http()

    async def _prune_loop(self) -> None:
        while True:
            try:
                removed = await self.store.prune(time.time() - self.config.sent_retention_days * 86400)
                if removed:
                    log.info("forgot %d old sent message ids", removed)
            except Exception:  # never let housekeeping kill the service
                log.exception("pruning sent message ids failed")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a messenger integration, or None."""
        record = self.integrations.get(integration_id)
        return Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None

    def by_page_id(self, page_id: str) -> Credentials | None:
        """The messenger integration of a Page (one Meta app's webhook may carry several Pages)."""
        usable = (Credentials.from_record(record) for record in records.integrations_where(
            self.integrations.values.values(), handlers.CHANNEL, "pageId", page_id))
        return next((creds for creds in usable if creds is not None), None)

    # --- webhooks --------------------------------------------------------------------------

    async def handshake(self, request: web.Request) -> web.Response:
        """Meta's subscription check: echo `hub.challenge` when `hub.verify_token` matches."""
        creds = self.credentials(request.match_info["integration_id"])
        return meta_handshake(creds.verify_token if creds else None, request.query)

    async def webhook(self, request: web.Request) -> web.Response:
        """A signed notification: answered 200 only once all its well-formed content is durable;
        its malformed events are reported, never a reason to refuse the others."""
        integration_id = request.match_info["integration_id"]
        creds = self.intake.integration(request)
        raw = await self.intake.body(request)
        header = request.headers.get(META_SIGNATURE_HEADER)
        if not header:
            raise ApiError(401, "Missing X-Hub-Signature-256")
        if not meta_signature_ok(creds.app_secret, raw, header):
            log.warning("webhook signature mismatch", extra=log_fields(integration_id=integration_id,
                                                                      body_bytes=len(raw)))
            raise ApiError(403, "Invalid X-Hub-Signature-256")
        self.intake.check_content_type(request)
        normalized = self.intake.normalized(lambda: handlers.normalize_webhook(raw, creds, self.by_page_id))
        report_rejected(log, handlers.CHANNEL, integration_id, normalized.rejected)
        store = self.store
        bus = self.bus
        try:
            # The window first: a person's message must never be answered as "outside the window".
            await store.touch_windows(normalized.actions)
            receipts = [(receipt, await store.receipt_candidates(
                receipt.status, receipt.creds.page_id, receipt.psid, receipt.watermark, receipt.mids))
                for receipt in normalized.receipts]
        except Exception as exc:
            log.exception("recording a webhook failed")
            raise ApiError(503, "Could not store the notification, retry later") from exc
        statuses = [(receipt, handlers.receipt_statuses(receipt, sent)) for receipt, sent in receipts]
        messages = await self.media_copier.copied(normalized.messages, self.message_media)
        await publish_durably(bus, handlers.CHANNEL, messages,
                              [s for _receipt, found in statuses for s in found],
                              message_id=handlers.inbound_msg_id, status_id=handlers.status_msg_id)
        for receipt, found in statuses:
            # Marked only once published: a retried webhook publishes again (deduplicated by id).
            with contextlib.suppress(Exception):
                await store.mark_receipts(receipt.status, [s.provider_message_id for s in found], receipt.watermark)
        status_count = sum(len(found) for _receipt, found in statuses)
        log.info("webhook accepted: %d message(s), %d status(es)", len(normalized.messages), status_count,
                 extra=log_fields(integration_id=integration_id, messages=len(normalized.messages),
                                  statuses=status_count, rejected=len(normalized.rejected)))
        return web.Response(status=200, text="EVENT_RECEIVED", content_type="text/plain")

    # --- sending ---------------------------------------------------------------------------


    @contextlib.asynccontextmanager
    async def message_media(self, _message: InboundMessage, url: str) -> AsyncIterator[Download | None]:
        """Download an attachment a customer sent (its URL is on Meta's CDN and needs no token;
        it expires, hence the copy)."""
        with _tracer.start_as_current_span("GET messenger attachment", kind=SpanKind.CLIENT) as span:
            async with self.session.get(url, hosts=MESSENGER_MEDIA_HOSTS) as upstream:
                span.set_attribute("http.response.status_code", upstream.status)
                if upstream.status in (403, 404, 410):
                    yield None
                    return
                if upstream.status != 200:
                    raise ValueError(f"attachment download answered {upstream.status}")
                yield Download(upstream.content_type, None, upstream.content.iter_chunked(64 * 1024))


def create(environ: Mapping[str, str] | None = None) -> MessengerService:
    """Build the messenger service from the environment (os.environ when None)."""
    setup_telemetry("messenger")
    return MessengerService(MessengerConfig.from_env(environ))
