"""The whatsapp service: wiring of the webhook endpoints and the send loop."""

from __future__ import annotations

import logging
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
from shared.outbound import BoundedMemory, recipient_key
from shared.ratelimit import BucketMap
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.service import ServiceApp
from shared.signing import META_SIGNATURE_HEADER, meta_signature_ok
from shared.telemetry import inject_headers, log_fields, setup_telemetry, tracer
from shared.untrusted import decode_json, secrets_equal

from . import handlers
from .config import WhatsAppConfig
from .handlers import Credentials, SendFailure

log = logging.getLogger(__name__)
_tracer = tracer(__name__)





class WhatsAppService(ServiceApp):
    """Webhook ingress (verify → normalize → publish) and send egress (consume → send → status)."""

    name = "whatsapp"

    def __init__(self, config: WhatsAppConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.bus: Bus | None = None
        self.integrations: KvMirror | None = None
        self.session: EgressSession | None = None
        # Graph API throughput per business number.
        self.buckets = BucketMap(config.messages_per_second)
        self.sent: BoundedMemory[str, str] = BoundedMemory()
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_get("/webhooks/whatsapp/{integration_id}", self.handshake)
        self.http.router.add_post("/webhooks/whatsapp/{integration_id}", self.webhook)
        self.http.router.add_get("/webhooks/whatsapp/{integration_id}/media/{media_id}", self.media)

    async def start(self) -> None:
        """Connect NATS, mirror the integrations, start the send loop, then serve HTTP."""
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.session = self.common.egress.http_session(
            "platform", hosts=GRAPH_HOSTS, timeout=aiohttp.ClientTimeout(total=self.config.send_timeout_seconds))
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.on_outbound,
                               ordering_key=recipient_key)
        await self.start_http()

    async def stop(self) -> None:
        """Stop HTTP, then the bus, then the outgoing HTTP session."""
        await self.stop_http()
        if self.integrations is not None:
            await self.integrations.stop()
        if self.bus is not None:
            await self.bus.close()
        if self.session is not None:
            await self.session.close()

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a whatsapp integration, or None."""
        record = self.integrations.get(integration_id) if self.integrations else None
        return Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None

    def by_phone_number_id(self, phone_number_id: str) -> Credentials | None:
        """The whatsapp integration of a business number (for multi-number Meta apps)."""
        if self.integrations is None:
            return None
        for record in list(self.integrations.values.values()):
            if (isinstance(record, IntegrationRecord) and record.type == handlers.CHANNEL
                    and record.config.get("phoneNumberId") == phone_number_id):
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
        """A signed notification: answered 200 only once all its well-formed content is durable in
        JetStream; its malformed items are reported, never a reason to refuse the others."""
        creds = self.credentials(request.match_info["integration_id"])
        if creds is None:
            raise ApiError(404, "Unknown WhatsApp integration")
        raw = await read_body(request, handlers.MAX_WEBHOOK_BODY)
        if not meta_signature_ok(creds.app_secret, raw, request.headers.get(META_SIGNATURE_HEADER)):
            raise ApiError(401, "Missing or invalid X-Hub-Signature-256")
        if request.content_type != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {request.content_type}")
        try:
            normalized = handlers.normalize_webhook(raw, creds, self.by_phone_number_id, self.common.public_base_url)
        except handlers.WebhookShapeError as exc:
            metrics.message_in(handlers.CHANNEL, "rejected")
            raise ApiError(400, f"Invalid WhatsApp notification: {exc}") from exc
        report_rejected(log, handlers.CHANNEL, request.match_info["integration_id"], normalized.rejected)
        bus = self._bus()
        publishes = [
            published_message(handlers.CHANNEL, bus.publish(channel.subject_of(m), channel.encode(m),
                                                            msg_id=handlers.inbound_msg_id(m)))
            for m in normalized.messages
        ] + [
            bus.publish(channel.subject_of(s), channel.encode(s),
                        msg_id=handlers.status_msg_id(s))
            for s in normalized.statuses
        ]
        failures = await publish_all(publishes)
        if failures:
            log.warning("publishing a webhook failed (%d of %d): %s", len(failures), len(publishes), failures[0])
            raise ApiError(503, "Could not store the notification, retry later")
        log.info("webhook accepted: %d message(s), %d status(es)", len(normalized.messages),
                 len(normalized.statuses), extra=log_fields(
                     integration_id=request.match_info["integration_id"], messages=len(normalized.messages),
                     statuses=len(normalized.statuses), rejected=len(normalized.rejected)))
        return web.Response(status=200, text="ok", content_type="text/plain")

    async def media(self, request: web.Request) -> web.StreamResponse:
        """Serve a customer's media: resolve the Graph media id to its short-lived URL and stream it.

        The integration's bearer token goes only to its Graph base URL and to the URL the lookup
        returns when that is Meta's media CDN or the Graph origin itself (the sandbox's fake);
        any other URL, or an address the egress policy refuses, is never fetched.
        """
        integration_id = request.match_info["integration_id"]
        media_id = request.match_info["media_id"]
        creds = self.credentials(integration_id)
        sig = request.query.get("sig", "")
        if creds is None or not secrets_equal(
                handlers.media_signature(creds.app_secret, integration_id, media_id), sig):
            raise ApiError(404, "Unknown media")
        session = self._session()
        auth = {"Authorization": f"Bearer {creds.access_token}"}
        with _tracer.start_as_current_span("GET graph media", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "GET")
            try:
                async with session.get(creds.media_lookup_url(media_id), headers=inject_headers(auth)) as resp:
                    if resp.status != 200:
                        raise ApiError(404, "Unknown media")
                    info = decode_json(await resp.read())
                url = info.get("url") if isinstance(info, dict) else None
                if not isinstance(url, str) or not handlers.media_download_allowed(url, creds.base_url):
                    log.warning("media lookup of integration %s answered a URL off Meta's hosts: not fetched",
                                integration_id, extra=log_fields(integration_id=integration_id, event="egress_refused",
                                                                 reason="media URL off the Graph and CDN hosts"))
                    raise ApiError(502, "Unexpected media lookup answer")
                async with session.get(url, headers=inject_headers(auth),
                                       hosts=handlers.MEDIA_HOSTS) as upstream:
                    if upstream.status != 200:
                        raise ApiError(502, "Media download failed")
                    response = web.StreamResponse(status=200)
                    response.content_type = upstream.content_type or "application/octet-stream"
                    response.headers["Cache-Control"] = "private, max-age=300"
                    await response.prepare(request)
                    async for chunk in upstream.content.iter_chunked(64 * 1024):
                        await response.write(chunk)
                    await response.write_eof()
                    return response
            except EgressRefused as exc:
                span.set_status(Status(StatusCode.ERROR, REFUSED_CODE))
                raise ApiError(502, "Media download refused by the egress policy") from exc
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise ApiError(502, "Media download failed") from exc

    # --- sending ---------------------------------------------------------------------------

    async def on_outbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Send one command to the Graph API and report the outcome as a DeliveryStatus."""
        try:
            command = channel.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Poison(f"undecodable outbound command: {exc}") from exc
        if not isinstance(command, OutboundSend):
            return
        done = self.sent.get(command.message_id)
        if done is not None:
            await self._report(handlers.sent_status(command, done))
            return
        creds = self.credentials(command.integration_id)
        if creds is None:
            # The KV mirror may lag behind a just-created integration: retry a while first.
            await self._retry_or_fail(command, delivery, SendFailure(
                http_status=0, code=None, title="Unknown or inactive WhatsApp integration", transient=True))
            return
        try:
            body = handlers.build_send_body(command)
        except handlers.UnsendableContent as exc:
            await self._report(handlers.failed_status(command, "unsupported_content", str(exc)))
            return
        await self.buckets.get(creds.phone_number_id).acquire()
        try:
            wamid = await self._post_message(creds, body)
        except EgressRefused as exc:
            await self._report(handlers.failed_status(command, REFUSED_CODE, str(exc)))
            return
        except SendFailure as failure:
            await self._retry_or_fail(command, delivery, failure)
            return
        self.sent.remember(command.message_id, wamid)
        await self._report(handlers.sent_status(command, wamid))

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
        headers = inject_headers({"Authorization": f"Bearer {creds.access_token}",
                                  "Content-Type": "application/json"})
        with _tracer.start_as_current_span("POST graph messages", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", creds.base_url)
            span.set_attribute("threadline.whatsapp.phone_number_id", creds.phone_number_id)
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

    def _session(self) -> EgressSession:
        if self.session is None:
            raise ApiError(503, "Not started")
        return self.session


def create(environ: Mapping[str, str] | None = None) -> WhatsAppService:
    """Build the whatsapp service from the environment (os.environ when None)."""
    setup_telemetry("whatsapp")
    return WhatsAppService(WhatsAppConfig.from_env(environ))
