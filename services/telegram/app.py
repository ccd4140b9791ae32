"""The telegram service: webhook registration and ingress, the send loop, media passthrough."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.egress import REFUSED_CODE, TELEGRAM_HOSTS, EgressRefused, EgressSession
from shared.http import ApiError, error_middleware, tracing_middleware
from shared.ingress import WebhookIntake, publish_durably
from shared.media import Download, MediaCopier, relay
from shared.messages.channel import InboundMessage
from shared.outbound import recipient_key
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.service import ServiceApp
from shared.tasks import cancel_and_wait
from shared.telemetry import inject_headers, log_fields, setup_telemetry, tracer
from shared.untrusted import secrets_equal

from . import handlers
from .config import TelegramConfig
from .handlers import Credentials, SendFailure, WebhookRegistration
from .sender import TelegramSender

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

# Chat buckets are dropped once this many exist (full ones only: forgetting them changes nothing).
CHAT_BUCKETS_MAX = 20_000




class WebhookRegistrar:
    """Keeps each telegram integration's webhook registered with `setWebhook`.

    Every change to a telegram integration record (new, new token, new secret, new base URL)
    re-registers it; a record that disappears (or turns inactive) has its webhook deleted. One
    worker per integration converges on the latest wanted state, retrying with back-off while
    the Bot API refuses or cannot be reached. `setWebhook` is idempotent, so every replica (and
    every restart) may call it.
    """

    def __init__(self, service: TelegramService) -> None:
        self.service = service
        self.wanted: dict[str, tuple[Credentials, WebhookRegistration] | None] = {}
        self.applied: dict[str, tuple[Credentials, WebhookRegistration]] = {}
        self.attempts: dict[str, int] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}

    def observe(self, integration_id: str, record: Any | None) -> None:
        """React to the current value of an integration record (None: deleted)."""
        creds = Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None
        if creds is None and integration_id not in self.applied and integration_id not in self.wanted:
            return  # not a telegram integration we ever handled
        if creds is not None and not creds.secret_usable:
            log.error("telegram integration %s has no usable webhookSecret ([A-Za-z0-9_-]{1,256}); "
                      "its webhook is not registered", integration_id)
            creds = None
        target = (creds, WebhookRegistration.of(creds, self.service.common.public_base_url)) if creds else None
        self.wanted[integration_id] = target
        worker = self._workers.get(integration_id)
        if worker is None or worker.done():
            self._workers[integration_id] = asyncio.create_task(self._converge(integration_id),
                                                                name=f"telegram-webhook:{integration_id}")

    def registered(self, integration_id: str) -> WebhookRegistration | None:
        """What `setWebhook` last confirmed for an integration."""
        applied = self.applied.get(integration_id)
        return applied[1] if applied else None

    async def _converge(self, integration_id: str) -> None:
        config = self.service.config
        attempt = 0
        while True:
            target = self.wanted.get(integration_id)
            current = self.applied.get(integration_id)
            if target is None and current is None:
                self.wanted.pop(integration_id, None)
                return
            if target is not None and current is not None and current[1] == target[1]:
                return
            try:
                if target is None:
                    assert current is not None
                    await self.service.call(current[0], "deleteWebhook", {"drop_pending_updates": False})
                    self.applied.pop(integration_id, None)
                    log.info("telegram webhook deleted", extra=log_fields(integration_id=integration_id))
                else:
                    creds, registration = target
                    await self.service.call(creds, "setWebhook", handlers.set_webhook_params(creds, registration.url))
                    self.applied[integration_id] = target
                    log.info("telegram webhook set", extra=log_fields(integration_id=integration_id,
                                                                      url=registration.url))
                attempt = 0
            except EgressRefused as exc:
                # Retrying cannot help until the integration (or the operator's allow-list) changes,
                # and a change of the record starts a new worker.
                log.error("telegram webhook registration of %s not attempted: %s", integration_id, exc,
                          extra=log_fields(integration_id=integration_id, error_code=REFUSED_CODE))
                if target is None:
                    self.applied.pop(integration_id, None)
                self.wanted.pop(integration_id, None)
                return
            except SendFailure as failure:
                if target is None and not failure.transient:
                    # The token was revoked (or the bot deleted): there is no webhook left to remove.
                    log.info("telegram webhook of removed integration %s not deleted: %s", integration_id, failure)
                    self.applied.pop(integration_id, None)
                    continue
                attempt += 1
                self.attempts[integration_id] = self.attempts.get(integration_id, 0) + 1
                delay = failure.retry_after if failure.retry_after is not None else backoff_delay(
                    attempt, config.webhook_retry_base_seconds, config.webhook_retry_max_seconds)
                log.warning("telegram webhook registration of %s failed (%s); retrying in %.1fs",
                            integration_id, failure, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop pending registrations."""
        await cancel_and_wait(list(self._workers.values()))
        self._workers.clear()


class TelegramService(ServiceApp):
    """Webhook ingress (verify → normalize → publish) and send egress (consume → send → status)."""

    name = "telegram"
    # Set by `start`, before HTTP serves (and released by `stop`, in the reverse order).
    session: EgressSession
    media_copier: MediaCopier
    sender: TelegramSender
    bus: Bus
    integrations: KvMirror

    def __init__(self, config: TelegramConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.intake = WebhookIntake(handlers.CHANNEL, "Telegram", self.credentials, handlers.MAX_WEBHOOK_BODY)
        self.webhooks = WebhookRegistrar(self)
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_post("/webhooks/telegram/{integration_id}", self.webhook)
        self.http.router.add_get("/webhooks/telegram/{integration_id}/media/{file_id}", self.media)

    async def start(self) -> None:
        """Connect NATS, mirror the integrations (registering webhooks), start the send loop, serve HTTP."""
        self.session = self.egress_session("platform", hosts=TELEGRAM_HOSTS, timeout=self.config.send.client_timeout())
        self.media_copier = MediaCopier(await self.open_files(), self.common.public_base_url, handlers.CHANNEL)
        self.bus = await self.connect_bus()
        self.sender = TelegramSender(self.bus, self.session, self.config.send, self.credentials,
                                     self.config.bot_messages_per_second, self.config.chat_messages_per_second,
                                     self.config.group_messages_per_minute)
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.on_stop(self.webhooks.close)
        self.integrations.add_listener(self.webhooks.observe)
        for integration_id, record in list(self.integrations.values.items()):
            self.webhooks.observe(integration_id, record)
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.sender.on_outbound,
                               ordering_key=recipient_key, ack_wait=120.0)
        await self.start_http()

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a telegram integration, or None."""
        record = self.integrations.get(integration_id)
        return Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None

    # --- Bot API calls ---------------------------------------------------------------------

    async def call(self, creds: Credentials, method: str, params: dict[str, Any]) -> Any:
        """Call a Bot API method with JSON parameters; its `result`, or SendFailure (EgressRefused
        when the egress policy refuses the integration's base URL)."""
        return await self.sender.call(creds, method, params)

    # --- webhooks --------------------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        """An update from Telegram: answered 200 only once its message is durable in JetStream."""
        integration_id = request.match_info["integration_id"]
        creds = self.intake.integration(request)
        # The secret is checked before the body is read: a forged request costs nothing.
        if not handlers.secret_ok(creds, request.headers.get(handlers.SECRET_HEADER)):
            raise ApiError(401, f"Missing or invalid {handlers.SECRET_HEADER}")
        raw = await self.intake.body(request)
        self.intake.check_content_type(request)
        normalized = self.intake.normalized(lambda: handlers.normalize_update(raw, creds, self.common.public_base_url),
                                            "update")
        message = normalized.message
        if message is not None:
            [message] = await self.media_copier.copied((message,), self.message_media)
            await publish_durably(self.bus, handlers.CHANNEL, (message,), message_id=handlers.inbound_msg_id,
                                  what="update")
        if normalized.callback_query_id is not None:
            # Stops the spinner on the customer's button; the answer must not wait for it.
            self.spawn(self._answer_callback(creds, normalized.callback_query_id), "telegram:answer-callback")
        log.info("telegram update accepted", extra=log_fields(
            integration_id=integration_id, update_id=normalized.update_id, queued=message is not None,
            referral=bool(message and message.referral)))
        return web.Response(status=200)

    async def _answer_callback(self, creds: Credentials, callback_query_id: str) -> None:
        try:
            await self.call(creds, "answerCallbackQuery", {"callback_query_id": callback_query_id})
        except (SendFailure, EgressRefused) as failure:
            log.info("answerCallbackQuery failed: %s", failure)

    async def media(self, request: web.Request) -> web.StreamResponse:
        """Serve a customer's file that was not copied into the object store: `getFile`, then
        stream it (the Bot API file URL holds the token)."""
        integration_id = request.match_info["integration_id"]
        file_id = request.match_info["file_id"]
        creds = self.credentials(integration_id)
        if creds is None or not secrets_equal(
                handlers.media_signature(creds.token, integration_id, file_id), request.query.get("sig", "")):
            raise ApiError(404, "Unknown media")
        try:
            async with self.bot_file(creds, file_id) as download:
                if download is None:
                    raise ApiError(404, "Unknown media")
                return await relay(request, download)
        except EgressRefused:
            raise ApiError(502, "Media download refused by the egress policy") from None
        except (SendFailure, aiohttp.ClientError, TimeoutError, ValueError):
            raise ApiError(502, "Media download failed") from None

    def message_media(self, message: InboundMessage, url: str) -> AbstractAsyncContextManager[Download | None]:
        """The download of a message's file (for the copy into the object store)."""
        creds = self.credentials(message.integration_id)
        file_id = None if creds is None else handlers.file_id_of(url, self.common.public_base_url, creds)
        if creds is None or file_id is None:
            return contextlib.nullcontext(None)
        return self.bot_file(creds, file_id)

    @contextlib.asynccontextmanager
    async def bot_file(self, creds: Credentials, file_id: str) -> AsyncIterator[Download | None]:
        """Download a file id: `getFile`, then the file (None when the Bot API does not know it)."""
        try:
            info = await self.call(creds, "getFile", {"file_id": file_id})
        except SendFailure as failure:
            if failure.http_status == 400:
                yield None
                return
            raise
        file_path = info.get("file_path") if isinstance(info, dict) else None
        if not isinstance(file_path, str) or not file_path or ".." in file_path:
            raise ValueError("unexpected getFile answer")
        with _tracer.start_as_current_span("GET telegram file", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "GET")
            try:
                async with self.session.get(creds.file_url(file_path), headers=inject_headers()) as upstream:
                    span.set_attribute("http.response.status_code", upstream.status)
                    if upstream.status != 200:
                        raise ValueError(f"file download answered {upstream.status}")
                    yield Download(upstream.content_type, file_path.rsplit("/", 1)[-1],
                                   upstream.content.iter_chunked(64 * 1024))
            except EgressRefused:
                span.set_status(Status(StatusCode.ERROR, REFUSED_CODE))
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    # --- sending ---------------------------------------------------------------------------


def create(environ: Mapping[str, str] | None = None) -> TelegramService:
    """Build the telegram service from the environment (os.environ when None)."""
    setup_telemetry("telegram")
    return TelegramService(TelegramConfig.from_env(environ))
