"""The sms service: Twilio webhook ingress (verify → normalize → publish) and send egress."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from opentelemetry.trace import SpanKind
from yarl import URL

from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.egress import TWILIO_HOSTS, TWILIO_MEDIA_HOSTS, EgressSession, same_origin
from shared.http import ApiError, basic_auth_header, error_middleware, tracing_middleware
from shared.ingress import WebhookIntake, publish_durably
from shared.media import Download, MediaCopier
from shared.messages.channel import InboundMessage
from shared.outbound import recipient_key
from shared.records import IntegrationRecord
from shared.service import ServiceApp
from shared.telemetry import log_fields, setup_telemetry, tracer
from shared.twilio_wire import (
    EMPTY_TWIML,
    FORM_CONTENT_TYPE,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    twilio_signature_ok,
)

from . import handlers
from .config import SmsConfig
from .handlers import Credentials, Form
from .sender import SmsSender

log = logging.getLogger(__name__)
_tracer = tracer(__name__)





def twiml_ok() -> web.Response:
    """Twilio's "no reply" answer: an empty TwiML document."""
    return web.Response(status=200, text=EMPTY_TWIML, content_type="text/xml")


class SmsService(ServiceApp):
    """Twilio webhooks in, Messages.json out, per-sender segment throttling."""

    name = "sms"
    # Set by `start`, before HTTP serves (and released by `stop`, in the reverse order).
    session: EgressSession
    bus: Bus
    integrations: KvMirror
    sender: SmsSender
    media_copier: MediaCopier

    def __init__(self, config: SmsConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.intake = WebhookIntake(handlers.CHANNEL, "Twilio", self.credentials, handlers.MAX_WEBHOOK_BODY,
                                    FORM_CONTENT_TYPE)
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_post("/webhooks/twilio/{integration_id}", self.inbound_webhook)
        self.http.router.add_post("/webhooks/twilio/{integration_id}/status", self.status_webhook)

    async def start(self) -> None:
        """Connect NATS, mirror the integrations, start the send loop, then serve HTTP."""
        self.session = self.egress_session("platform", hosts=TWILIO_HOSTS, timeout=self.config.send.client_timeout())
        self.media_copier = MediaCopier(await self.open_files(), self.common.public_base_url, handlers.CHANNEL)
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.sender = SmsSender(self.bus, self.session, self.config.send, self.credentials,
                                self.config.segments_per_second, self.config.max_rate_wait_seconds)
        # Small batches and a long ack wait: sends may wait for their sender's 1 segment/s.
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.sender.on_outbound, batch=20,
                               ordering_key=recipient_key, ack_wait=self.config.ack_wait_seconds)
        await self.start_http()

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a twilio integration, or None."""
        record = self.integrations.get(integration_id)
        if not isinstance(record, IntegrationRecord):
            return None
        return Credentials.from_record(record, self.common.public_base_url)

    # --- webhooks --------------------------------------------------------------------------

    async def _signed_form(self, request: web.Request, creds: Credentials, url: str, kind: str) -> Form:
        """The form of a webhook whose `X-Twilio-Signature` matches the public `url` (else 403)."""
        raw = await self.intake.body(request)
        self.intake.check_content_type(request)
        form = self.intake.normalized(lambda: handlers.parse_form(raw), f"{kind} webhook", counts_as_message=False)
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
        creds = self.intake.integration(request)
        form = await self._signed_form(request, creds, creds.webhook_url, "message")
        messages = self.intake.normalized(lambda: handlers.normalize_inbound(form, creds), "message webhook")
        messages = await self.media_copier.copied(messages, self.message_media)
        await publish_durably(self.bus, handlers.CHANNEL, messages, message_id=handlers.inbound_msg_id,
                              what="message")
        log.info("twilio message accepted: %s (%d part(s))", messages[0].provider_message_id, len(messages),
                 extra=log_fields(integration_id=integration_id, provider_message_id=messages[0].provider_message_id,
                                  parts=len(messages)))
        return twiml_ok()

    async def status_webhook(self, request: web.Request) -> web.Response:
        """A status callback for a message the gateway sent (signed over the StatusCallback URL)."""
        creds = self.intake.integration(request)
        form = await self._signed_form(request, creds, creds.status_url, "status")
        sid = next((value for name, value in form if name in ("MessageSid", "SmsSid")), "")
        status = self.intake.normalized(lambda: handlers.normalize_status(form, creds, self.sender.sids.get(sid)),
                                        "status callback", counts_as_message=False)
        if status is not None:
            await publish_durably(self.bus, handlers.CHANNEL, (), (status,), status_id=handlers.status_msg_id,
                                  what="status")
        return twiml_ok()

    # --- sending ---------------------------------------------------------------------------


    @contextlib.asynccontextmanager
    async def message_media(self, message: InboundMessage, url: str) -> AsyncIterator[Download | None]:
        """Download an MMS media file. The account's credentials go only to the integration's
        Twilio origin; Twilio answers with a redirect to its media CDN, followed once, without
        credentials, only to Twilio's hosts."""
        creds = self.credentials(message.integration_id)
        auth = (basic_auth_header(creds.account_sid, creds.auth_token)
                if creds is not None and same_origin(url, creds.base_url) else {})
        with _tracer.start_as_current_span("GET twilio media", kind=SpanKind.CLIENT) as span:
            async with self.session.get(url, headers=auth) as first:
                span.set_attribute("http.response.status_code", first.status)
                location = first.headers.get("Location") if first.status in (301, 302, 303, 307, 308) else None
                if location is None:
                    if first.status == 404:
                        yield None
                        return
                    if first.status != 200:
                        raise ValueError(f"media download answered {first.status}")
                    yield Download(first.content_type, None, first.content.iter_chunked(64 * 1024))
                    return
            target = str(first.url.join(URL(location)))
            async with self.session.get(target, hosts=TWILIO_MEDIA_HOSTS) as upstream:
                span.set_attribute("http.response.status_code", upstream.status)
                if upstream.status != 200:
                    raise ValueError(f"media download answered {upstream.status}")
                yield Download(upstream.content_type, None, upstream.content.iter_chunked(64 * 1024))


def create(environ: Mapping[str, str] | None = None) -> SmsService:
    """Build the sms service from the environment (os.environ when None)."""
    setup_telemetry("sms")
    return SmsService(SmsConfig.from_env(environ))
