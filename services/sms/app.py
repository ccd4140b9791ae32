"""The sms service: Twilio webhook ingress (verify → normalize → publish) and send egress."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from urllib.parse import urlencode

import aiohttp
import msgspec
from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import metrics, records, subjects
from shared.bus import Bus, Delivery, KvMirror, Poison, Retry
from shared.egress import REFUSED_CODE, TWILIO_HOSTS, EgressRefused, EgressSession
from shared.http import ApiError, basic_auth_header, error_middleware, read_body, tracing_middleware
from shared.ingress import published_message
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.outbound import BoundedMemory, recipient_key
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.service import ServiceApp
from shared.telemetry import inject_headers, log_fields, setup_telemetry, tracer
from shared.twilio_wire import (
    EMPTY_TWIML,
    FORM_CONTENT_TYPE,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    twilio_signature_ok,
)

from . import handlers
from .config import SmsConfig
from .handlers import Credentials, Form, SegmentBucket, SendFailure

log = logging.getLogger(__name__)
_tracer = tracer(__name__)





def twiml_ok() -> web.Response:
    """Twilio's "no reply" answer: an empty TwiML document."""
    return web.Response(status=200, text=EMPTY_TWIML, content_type="text/xml")


class SmsService(ServiceApp):
    """Twilio webhooks in, Messages.json out, per-sender segment throttling."""

    name = "sms"

    def __init__(self, config: SmsConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.bus: Bus | None = None
        self.integrations: KvMirror | None = None
        self.session: EgressSession | None = None
        self.buckets: dict[str, SegmentBucket] = {}
        self.sent: BoundedMemory[str, str] = BoundedMemory()
        # Provider SID → (message id, conversation id), so a status callback can name its message.
        self.sids: BoundedMemory[str, tuple[str, str]] = BoundedMemory()
        self.in_flight: set[str] = set()
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_post("/webhooks/twilio/{integration_id}", self.inbound_webhook)
        self.http.router.add_post("/webhooks/twilio/{integration_id}/status", self.status_webhook)

    async def start(self) -> None:
        """Connect NATS, mirror the integrations, start the send loop, then serve HTTP."""
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.session = self.common.egress.http_session(
            "platform", hosts=TWILIO_HOSTS, timeout=aiohttp.ClientTimeout(total=self.config.send_timeout_seconds))
        # Small batches and a long ack wait: sends may wait for their sender's 1 segment/s.
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.on_outbound, batch=20,
                               ordering_key=recipient_key, ack_wait=self.config.ack_wait_seconds)
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

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a twilio integration, or None."""
        record = self.integrations.get(integration_id) if self.integrations else None
        if not isinstance(record, IntegrationRecord):
            return None
        return Credentials.from_record(record, self.common.public_base_url)

    # --- webhooks --------------------------------------------------------------------------

    async def _signed_form(self, request: web.Request, creds: Credentials, url: str, kind: str) -> Form:
        """The form of a webhook whose `X-Twilio-Signature` matches the public `url` (else 403)."""
        raw = await read_body(request, handlers.MAX_WEBHOOK_BODY)
        if request.content_type != FORM_CONTENT_TYPE:
            raise ApiError(415, f"Content-Type must be {FORM_CONTENT_TYPE}, got {request.content_type}")
        try:
            form = handlers.parse_form(raw)
        except handlers.WebhookShapeError as exc:
            raise ApiError(400, f"Invalid Twilio {kind} webhook: {exc}") from exc
        header = request.headers.get(SIGNATURE_HEADER)
        if not twilio_signature_ok(creds.auth_token, url, form, header):
            self._log_signature_failure(request, creds, url, form, header, kind)
            raise ApiError(403, "Missing or invalid X-Twilio-Signature")
        return form

    def _log_signature_failure(self, request: web.Request, creds: Credentials, url: str, form: Form,
                               header: str | None, kind: str) -> None:
        """Say what was checked and what would have matched, so a URL mismatch is easy to spot
        (Twilio signs the URL configured in its console; behind a proxy the pod sees another)."""
        seen = {"url as this service received it": str(request.url)}
        proto, host = request.headers.get("X-Forwarded-Proto"), request.headers.get("X-Forwarded-Host")
        if proto and host:
            seen["url as the proxy received it"] = f"{proto}://{host}{request.rel_url}"
        matches = [label + f" ({candidate})" for label, candidate in seen.items()
                   if candidate != url and twilio_signature_ok(creds.auth_token, candidate, form, header)]
        if not header:
            hint = "the request carries no X-Twilio-Signature header"
        elif matches:
            hint = (f"the signature matches the {matches[0]}: set the integration's webhookUrl (or "
                    f"THREADLINE_PUBLIC_BASE_URL) to the URL configured in Twilio")
        elif request.headers.get(SIGNATURE_SETTINGS_HEADER):
            hint = (f"the request is signed with a SharedKey ({request.headers[SIGNATURE_SETTINGS_HEADER]}), "
                    f"which this gateway does not verify; sign with the Auth Token")
        else:
            hint = ("no known URL matches: check that the Auth Token is the account's current one and that "
                    "the URL configured in Twilio is exactly the one checked (scheme, host, port, path, query)")
        names = sorted({name for name, _ in form})
        log.warning("twilio %s webhook refused (403): signature check failed for integration %s over %s "
                    "with params %s; %s", kind, creds.integration_id, url, names, hint,
                    extra=log_fields(integration_id=creds.integration_id, signed_url=url, param_names=names,
                                     signature_present=bool(header), hint=hint))

    async def inbound_webhook(self, request: web.Request) -> web.Response:
        """A customer's SMS/MMS: answered with empty TwiML only once it is durable in JetStream."""
        integration_id = request.match_info["integration_id"]
        creds = self.credentials(integration_id)
        if creds is None:
            raise ApiError(404, "Unknown Twilio integration")
        form = await self._signed_form(request, creds, creds.webhook_url, "message")
        try:
            messages = handlers.normalize_inbound(form, creds)
        except handlers.WebhookShapeError as exc:
            metrics.message_in(handlers.CHANNEL, "rejected")
            raise ApiError(400, f"Invalid Twilio message webhook: {exc}") from exc
        bus = self._bus()
        results = await asyncio.gather(*(
            published_message(handlers.CHANNEL, bus.publish(channel.subject_of(m), channel.encode(m),
                                                             msg_id=handlers.inbound_msg_id(m)))
            for m in messages), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.warning("publishing a twilio message failed (%d of %d): %s", len(failures), len(results),
                        failures[0])
            raise ApiError(503, "Could not store the message, retry later")
        log.info("twilio message accepted: %s (%d part(s))", messages[0].provider_message_id, len(messages),
                 extra=log_fields(integration_id=integration_id, provider_message_id=messages[0].provider_message_id,
                                  parts=len(messages)))
        return twiml_ok()

    async def status_webhook(self, request: web.Request) -> web.Response:
        """A status callback for a message the gateway sent (signed over the StatusCallback URL)."""
        integration_id = request.match_info["integration_id"]
        creds = self.credentials(integration_id)
        if creds is None:
            raise ApiError(404, "Unknown Twilio integration")
        form = await self._signed_form(request, creds, creds.status_url, "status")
        sid = next((value for name, value in form if name in ("MessageSid", "SmsSid")), "")
        try:
            status = handlers.normalize_status(form, creds, self.sids.get(sid))
        except handlers.WebhookShapeError as exc:
            raise ApiError(400, f"Invalid Twilio status callback: {exc}") from exc
        if status is not None:
            try:
                await self._bus().publish(channel.subject_of(status),
                                          channel.encode(status), msg_id=handlers.status_msg_id(status))
            except Exception as exc:
                log.warning("publishing a twilio status failed: %s", exc)
                raise ApiError(503, "Could not store the status, retry later") from exc
        return twiml_ok()

    # --- sending ---------------------------------------------------------------------------

    async def on_outbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Send one command to Messages.json and report the outcome as a DeliveryStatus."""
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
        if command.message_id in self.in_flight:
            # A redelivery while the first delivery still waits or sends: never text twice.
            raise Retry(1.0, "already being sent")
        creds = self.credentials(command.integration_id)
        if creds is None:
            # The KV mirror may lag behind a just-created integration: retry a while first.
            await self._retry_or_fail(command, delivery, SendFailure(
                http_status=0, code=None, title="Unknown or inactive Twilio integration", transient=True))
            return
        try:
            form = handlers.build_send_form(command, creds)
        except handlers.UnsendableContent as exc:
            await self._report(handlers.failed_status(command, "unsupported_content", str(exc)))
            return
        bucket = self._bucket(creds)
        wait = bucket.reserve(handlers.send_cost(form), self.config.max_rate_wait_seconds)
        if wait is None:
            # The sender's queue is long: come back later rather than hold the ack.
            raise Retry(self.config.max_rate_wait_seconds, f"sender {creds.sender_key} is busy")
        self.in_flight.add(command.message_id)
        try:
            if wait > 0:
                await asyncio.sleep(wait)
            sid = await self._post_message(creds, form)
        except EgressRefused as exc:
            await self._report(handlers.failed_status(command, REFUSED_CODE, str(exc)))
            return
        except SendFailure as failure:
            await self._retry_or_fail(command, delivery, failure)
            return
        finally:
            self.in_flight.discard(command.message_id)
        self._remember(command, sid)
        await self._report(handlers.sent_status(command, sid))

    async def _retry_or_fail(self, command: OutboundSend, delivery: Delivery, failure: SendFailure) -> None:
        if failure.transient and delivery.num_delivered < self.config.max_send_attempts:
            metrics.message_out(command.channel, "retried")
            raise Retry(backoff_delay(delivery.num_delivered, self.config.retry_base_seconds,
                                      self.config.retry_max_seconds), str(failure))
        log.warning("giving up on message %s: %s", command.message_id, failure)
        await self._report(handlers.failed_status(command, handlers.failure_code(failure), failure.title,
                                                  failure.details))

    async def _post_message(self, creds: Credentials, form: Form) -> str:
        session = self._session()
        headers = inject_headers({**basic_auth_header(creds.account_sid, creds.auth_token),
                                  "Content-Type": FORM_CONTENT_TYPE, "Accept": "application/json"})
        with _tracer.start_as_current_span("POST twilio Messages.json", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", creds.base_url)
            span.set_attribute("threadline.twilio.sender", creds.sender_key)
            try:
                async with session.post(creds.messages_url, data=urlencode(form).encode(), headers=headers) as resp:
                    payload = await resp.read()
                    span.set_attribute("http.response.status_code", resp.status)
                    if not 200 <= resp.status < 300:
                        failure = handlers.classify_error(resp.status, payload)
                        span.set_status(Status(StatusCode.ERROR, str(failure)))
                        raise failure
                    return handlers.parse_send_response(payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise SendFailure(http_status=0, code=None, title=f"Twilio API unreachable: {exc!r}",
                                  transient=True) from exc

    async def _report(self, status: DeliveryStatus) -> None:
        metrics.message_out(status.channel, status.status)
        await self._bus().publish(channel.subject_of(status),
                                  channel.encode(status), msg_id=handlers.send_status_msg_id(status))

    def _remember(self, command: OutboundSend, sid: str) -> None:
        self.sent.remember(command.message_id, sid)
        self.sids.remember(sid, (command.message_id, command.conversation_id))

    def _bucket(self, creds: Credentials) -> SegmentBucket:
        rate = creds.segments_per_second or self.config.segments_per_second
        key = f"{creds.account_sid}:{creds.sender_key}"
        bucket = self.buckets.get(key)
        if bucket is None or bucket.rate != rate:
            bucket = self.buckets[key] = SegmentBucket(rate, burst=1.0)
        return bucket

    def _bus(self) -> Bus:
        if self.bus is None:
            raise ApiError(503, "Not connected")
        return self.bus

    def _session(self) -> EgressSession:
        if self.session is None:
            raise ApiError(503, "Not started")
        return self.session


def create(environ: Mapping[str, str] | None = None) -> SmsService:
    """Build the sms service from the environment (os.environ when None)."""
    setup_telemetry("sms")
    return SmsService(SmsConfig.from_env(environ))
