"""The messenger service: wiring of the webhook endpoints, the reply-window store and the send loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import aiohttp
import msgspec
from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import metrics, records, subjects
from shared.bus import Bus, Delivery, KvMirror, Poison, Retry
from shared.egress import GRAPH_HOSTS, REFUSED_CODE, EgressRefused, EgressSession
from shared.http import ApiError, error_middleware, read_body, tracing_middleware
from shared.ingress import publish_all, published_message, report_rejected
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.outbound import recipient_key
from shared.ratelimit import BucketMap
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.service import ServiceApp
from shared.signing import META_SIGNATURE_HEADER, meta_signature_ok
from shared.telemetry import inject_headers, log_fields, setup_telemetry, tracer

from . import handlers
from .config import MessengerConfig
from .handlers import Credentials, ReplyWindowPolicy, SendFailure, WindowRefusal
from .store import Store

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

PRUNE_INTERVAL_SECONDS = 3600.0




class MessengerService(ServiceApp):
    """Webhook ingress (verify → normalize → publish) and send egress (window → send → status)."""

    name = "messenger"

    def __init__(self, config: MessengerConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.policy = ReplyWindowPolicy(standard_seconds=config.window_hours * 3600,
                                        human_agent_seconds=config.human_agent_days * 86400)
        self.bus: Bus | None = None
        self.integrations: KvMirror | None = None
        self.store: Store | None = None
        self.session: EgressSession | None = None
        # Page-level Send API limits (§2.7): one bucket per Page for text, one for audio/video.
        self.buckets = BucketMap(config.calls_per_second)
        self.media_buckets = BucketMap(config.media_calls_per_second)
        self._pruner: asyncio.Task[None] | None = None
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_get("/webhooks/messenger/{integration_id}", self.handshake)
        self.http.router.add_post("/webhooks/messenger/{integration_id}", self.webhook)
        self.add_database_check(lambda: None if self.store is None else self.store.db)

    async def start(self) -> None:
        """Open the store, connect NATS, mirror the integrations, start the send loop, serve HTTP."""
        self.store = await Store.open(self.config.database)
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.session = self.common.egress.http_session(
            "platform", hosts=GRAPH_HOSTS, timeout=aiohttp.ClientTimeout(total=self.config.send_timeout_seconds))
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.on_outbound,
                               ordering_key=recipient_key)
        self._pruner = asyncio.create_task(self._prune_loop(), name="messenger:prune")
        await self.start_http()

    async def stop(self) -> None:
        """Stop HTTP, then the bus, then the outgoing HTTP session and the database."""
        await self.stop_http()
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        if self.integrations is not None:
            await self.integrations.stop()
        if self.bus is not None:
            await self.bus.close()
        if self.session is not None:
            await self.session.close()
        if self.store is not None:
            await self.store.close()

    async def _prune_loop(self) -> None:
        while True:
            try:
                removed = await self._store().prune(time.time() - self.config.sent_retention_days * 86400)
                if removed:
                    log.info("forgot %d old sent message ids", removed)
            except Exception:  # never let housekeeping kill the service
                log.exception("pruning sent message ids failed")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a messenger integration, or None."""
        record = self.integrations.get(integration_id) if self.integrations else None
        return Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None

    def by_page_id(self, page_id: str) -> Credentials | None:
        """The messenger integration of a Page (one Meta app's webhook may carry several Pages)."""
        if self.integrations is None:
            return None
        for record in list(self.integrations.values.values()):
            if (isinstance(record, IntegrationRecord) and record.type == handlers.CHANNEL
                    and record.config.get("pageId") == page_id):
                creds = Credentials.from_record(record)
                if creds is not None:
                    return creds
        return None

    # --- webhooks --------------------------------------------------------------------------

    async def handshake(self, request: web.Request) -> web.Response:
        """Meta's subscription check: echo `hub.challenge` when `hub.verify_token` matches."""
        creds = self.credentials(request.match_info["integration_id"])
        q = request.query
        challenge = handlers.verify_handshake(creds, q.get("hub.mode"), q.get("hub.verify_token"),
                                              q.get("hub.challenge"))
        if challenge is None:
            return web.Response(status=403, text="Forbidden", content_type="text/plain")
        return web.Response(status=200, text=challenge, content_type="text/plain")

    async def webhook(self, request: web.Request) -> web.Response:
        """A signed notification: answered 200 only once all its well-formed content is durable;
        its malformed events are reported, never a reason to refuse the others."""
        integration_id = request.match_info["integration_id"]
        creds = self.credentials(integration_id)
        if creds is None:
            raise ApiError(404, "Unknown Messenger integration")
        raw = await read_body(request, handlers.MAX_WEBHOOK_BODY)
        header = request.headers.get(META_SIGNATURE_HEADER)
        if not header:
            raise ApiError(401, "Missing X-Hub-Signature-256")
        if not meta_signature_ok(creds.app_secret, raw, header):
            log.warning("webhook signature mismatch", extra=log_fields(integration_id=integration_id,
                                                                      body_bytes=len(raw)))
            raise ApiError(403, "Invalid X-Hub-Signature-256")
        if request.content_type != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {request.content_type}")
        try:
            normalized = handlers.normalize_webhook(raw, creds, self.by_page_id)
        except handlers.WebhookShapeError as exc:
            metrics.message_in(handlers.CHANNEL, "rejected")
            raise ApiError(400, f"Invalid Messenger notification: {exc}") from exc
        report_rejected(log, handlers.CHANNEL, integration_id, normalized.rejected)
        store = self._store()
        bus = self._bus()
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
        publishes = [
            published_message(handlers.CHANNEL, bus.publish(channel.subject_of(m), channel.encode(m),
                                                            msg_id=handlers.inbound_msg_id(m)))
            for m in normalized.messages
        ] + [
            bus.publish(channel.subject_of(s), channel.encode(s),
                        msg_id=handlers.status_msg_id(s))
            for _receipt, found in statuses for s in found
        ]
        failures = await publish_all(publishes)
        if failures:
            log.warning("publishing a webhook failed (%d of %d): %s", len(failures), len(publishes), failures[0])
            raise ApiError(503, "Could not store the notification, retry later")
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

    async def on_outbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Apply the reply window, send through the Send API, report the outcome as a DeliveryStatus."""
        try:
            command = channel.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Poison(f"undecodable outbound command: {exc}") from exc
        if not isinstance(command, OutboundSend):
            return
        creds = self.credentials(command.integration_id)
        if creds is None:
            # The KV mirror may lag behind a just-created integration: retry a while first.
            await self._retry_or_fail(command, delivery, SendFailure(
                http_status=0, code=None, title="Unknown or inactive Messenger integration", transient=True))
            return
        store = self._store()
        last_user_at = await store.last_user_at(creds.page_id, command.recipient)
        decision = self.policy.decide(last_user_at, time.time(), human_agent=creds.human_agent,
                                      requested=handlers.requested_tagging(command))
        if isinstance(decision, WindowRefusal):
            log.info("not sending message %s: %s", command.message_id, decision.title,
                     extra=log_fields(integration_id=command.integration_id, message_id=command.message_id))
            await self._report(handlers.failed_status(command, decision.code, decision.title, decision.details))
            return
        try:
            parts = handlers.build_send_parts(command, decision)
        except handlers.UnsendableContent as exc:
            await self._report(handlers.failed_status(command, "unsupported_content", str(exc)))
            return
        # Parts accepted on an earlier delivery are not sent twice (the customer sees each once).
        done = await store.sent_parts(command.message_id)
        for index, part in enumerate(parts):
            if index in done:
                continue
            await (self.media_buckets if part.media else self.buckets).get(creds.page_id).acquire()
            started = time.time()
            try:
                mid = await self._post_message(creds, part.body)
            except EgressRefused as exc:
                await self._report(handlers.failed_status(command, REFUSED_CODE, str(exc)))
                return
            except SendFailure as failure:
                await self._retry_or_fail(command, delivery, failure)
                return
            await store.record_sent(command.message_id, index, creds.page_id, command.recipient, mid,
                                    command.conversation_id, started)
            done[index] = mid
        await self._report(handlers.sent_status(command, done[0]))

    async def _retry_or_fail(self, command: OutboundSend, delivery: Delivery, failure: SendFailure) -> None:
        if failure.transient and delivery.num_delivered < self.config.max_send_attempts:
            metrics.message_out(command.channel, "retried")
            raise Retry(backoff_delay(delivery.num_delivered, self.config.retry_base_seconds,
                                      self.config.retry_max_seconds), str(failure))
        log.warning("giving up on message %s: %s", command.message_id, failure)
        await self._report(handlers.failed_status(command, handlers.failure_code(failure), failure.title,
                                                  failure.details))

    async def _post_message(self, creds: Credentials, body: dict[str, object]) -> str:
        session = self._session()
        headers = inject_headers({"Authorization": f"Bearer {creds.page_access_token}",
                                  "Content-Type": "application/json"})
        with _tracer.start_as_current_span("POST graph page messages", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", creds.base_url)
            span.set_attribute("threadline.messenger.page_id", creds.page_id)
            try:
                async with session.post(creds.messages_url, data=msgspec.json.encode(body), headers=headers) as resp:
                    payload = await resp.read()
                    span.set_attribute("http.response.status_code", resp.status)
                    if resp.status != 200:
                        failure = handlers.classify_error(resp.status, payload)
                        span.set_status(Status(StatusCode.ERROR, str(failure)))
                        raise failure
                    return handlers.parse_send_response(payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise SendFailure(http_status=0, code=None, title=f"Graph API unreachable: {exc!r}",
                                  transient=True) from exc

    async def _report(self, status: DeliveryStatus) -> None:
        metrics.message_out(status.channel, status.status)
        await self._bus().publish(channel.subject_of(status),
                                  channel.encode(status), msg_id=handlers.send_status_msg_id(status))

    def _bus(self) -> Bus:
        if self.bus is None:
            raise ApiError(503, "Not connected")
        return self.bus

    def _store(self) -> Store:
        if self.store is None:
            raise ApiError(503, "Not started")
        return self.store

    def _session(self) -> EgressSession:
        if self.session is None:
            raise ApiError(503, "Not started")
        return self.session


def create(environ: Mapping[str, str] | None = None) -> MessengerService:
    """Build the messenger service from the environment (os.environ when None)."""
    setup_telemetry("messenger")
    return MessengerService(MessengerConfig.from_env(environ))
