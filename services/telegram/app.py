"""The telegram service: webhook registration and ingress, the send loop, media passthrough."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import metrics, records, subjects
from shared.bus import Bus, Delivery, KvMirror, Poison, Retry
from shared.egress import REFUSED_CODE, TELEGRAM_HOSTS, EgressRefused, EgressSession
from shared.http import ApiError, error_middleware, read_body, tracing_middleware
from shared.ingress import published_message
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.outbound import BoundedMemory, recipient_key
from shared.ratelimit import BucketMap, TokenBucket
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.service import ServiceApp
from shared.telemetry import inject_headers, log_fields, setup_telemetry, tracer
from shared.untrusted import secrets_equal

from . import handlers
from .config import TelegramConfig
from .handlers import Credentials, SendFailure, WebhookRegistration

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
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._workers.clear()


class TelegramService(ServiceApp):
    """Webhook ingress (verify → normalize → publish) and send egress (consume → send → status)."""

    name = "telegram"

    def __init__(self, config: TelegramConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.bus: Bus | None = None
        self.integrations: KvMirror | None = None
        self.session: EgressSession | None = None
        self.webhooks = WebhookRegistrar(self)
        self.bot_buckets = BucketMap(config.bot_messages_per_second)
        self.chat_buckets = BucketMap(config.chat_messages_per_second, burst=1.0)
        self.group_buckets = BucketMap(config.group_messages_per_minute / 60.0, burst=1.0)
        # Chats Telegram told to wait (429 retry_after): monotonic time until which nothing is sent.
        self.paused_until: dict[str, float] = {}
        self.sent: BoundedMemory[str, str] = BoundedMemory()
        self._background: set[asyncio.Task[None]] = set()
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_post("/webhooks/telegram/{integration_id}", self.webhook)
        self.http.router.add_get("/webhooks/telegram/{integration_id}/media/{file_id}", self.media)

    async def start(self) -> None:
        """Connect NATS, mirror the integrations (registering webhooks), start the send loop, serve HTTP."""
        self.bus = await self.connect_bus()
        self.session = self.common.egress.http_session(
            "platform", hosts=TELEGRAM_HOSTS, timeout=aiohttp.ClientTimeout(total=self.config.send_timeout_seconds))
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     records.integration_decoder(self.config.keyring))
        self.integrations.add_listener(self.webhooks.observe)
        for integration_id, record in list(self.integrations.values.items()):
            self.webhooks.observe(integration_id, record)
        await self.bus.consume(subjects.channel_outbound_consumer(handlers.CHANNEL), self.on_outbound,
                               ordering_key=recipient_key, ack_wait=120.0)
        await self.start_http()

    async def stop(self) -> None:
        """Stop HTTP, then registrations and the bus, then the outgoing HTTP session."""
        await self.stop_http()
        await self.webhooks.close()
        if self.integrations is not None:
            await self.integrations.stop()
        if self.bus is not None:
            await self.bus.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.session is not None:
            await self.session.close()

    # --- integrations ----------------------------------------------------------------------

    def credentials(self, integration_id: str) -> Credentials | None:
        """The usable credentials of a telegram integration, or None."""
        record = self.integrations.get(integration_id) if self.integrations else None
        return Credentials.from_record(record) if isinstance(record, IntegrationRecord) else None

    # --- Bot API calls ---------------------------------------------------------------------

    async def call(self, creds: Credentials, method: str, params: dict[str, Any]) -> Any:
        """Call a Bot API method with JSON parameters; its `result`, or SendFailure (EgressRefused
        when the egress policy refuses the integration's base URL)."""
        session = self._session()
        headers = inject_headers({"Content-Type": "application/json"})
        with _tracer.start_as_current_span(f"POST telegram {method}", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("server.address", creds.base_url)
            span.set_attribute("threadline.telegram.method", method)
            try:
                async with session.post(creds.method_url(method), data=msgspec.json.encode(params),
                                        headers=headers) as resp:
                    payload = await resp.read()
                    span.set_attribute("http.response.status_code", resp.status)
                    if resp.status != 200:
                        failure = handlers.classify_error(resp.status, payload)
                        span.set_status(Status(StatusCode.ERROR, str(failure)))
                        raise failure
                    return handlers.parse_ok_result(payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Never put the exception text in spans, logs or statuses: the URL holds the token.
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise SendFailure(http_status=0, error_code=None,
                                  description=f"Bot API unreachable ({type(exc).__name__})", transient=True) from None

    # --- webhooks --------------------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        """An update from Telegram: answered 200 only once its message is durable in JetStream."""
        integration_id = request.match_info["integration_id"]
        creds = self.credentials(integration_id)
        if creds is None:
            raise ApiError(404, "Unknown Telegram integration")
        # The secret is checked before the body is read: a forged request costs nothing.
        if not handlers.secret_ok(creds, request.headers.get(handlers.SECRET_HEADER)):
            raise ApiError(401, f"Missing or invalid {handlers.SECRET_HEADER}")
        raw = await read_body(request, handlers.MAX_WEBHOOK_BODY)
        if request.content_type != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {request.content_type}")
        try:
            normalized = handlers.normalize_update(raw, creds, self.common.public_base_url)
        except handlers.WebhookShapeError as exc:
            metrics.message_in(handlers.CHANNEL, "rejected")
            raise ApiError(400, f"Invalid Telegram update: {exc}") from exc
        message = normalized.message
        if message is not None:
            try:
                await published_message(handlers.CHANNEL, self._bus().publish(
                    channel.subject_of(message), channel.encode(message), msg_id=handlers.inbound_msg_id(message)))
            except Exception as exc:
                log.warning("publishing a telegram update failed: %s", exc)
                raise ApiError(503, "Could not store the update, retry later") from exc
        if normalized.callback_query_id is not None:
            # Stops the spinner on the customer's button; the answer must not wait for it.
            self._spawn(self._answer_callback(creds, normalized.callback_query_id))
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
        """Serve a customer's file: `getFile`, then stream it (the Bot API file URL holds the token)."""
        integration_id = request.match_info["integration_id"]
        file_id = request.match_info["file_id"]
        creds = self.credentials(integration_id)
        if creds is None or not secrets_equal(
                handlers.media_signature(creds.token, integration_id, file_id), request.query.get("sig", "")):
            raise ApiError(404, "Unknown media")
        try:
            info = await self.call(creds, "getFile", {"file_id": file_id})
        except EgressRefused:
            raise ApiError(502, "Media lookup refused by the egress policy") from None
        except SendFailure as failure:
            raise ApiError(404 if failure.http_status == 400 else 502, "Media lookup failed") from None
        file_path = info.get("file_path") if isinstance(info, dict) else None
        if not isinstance(file_path, str) or not file_path or ".." in file_path:
            raise ApiError(502, "Unexpected getFile answer")
        with _tracer.start_as_current_span("GET telegram file", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "GET")
            try:
                async with self._session().get(creds.file_url(file_path), headers=inject_headers()) as upstream:
                    span.set_attribute("http.response.status_code", upstream.status)
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
            except EgressRefused:
                span.set_status(Status(StatusCode.ERROR, REFUSED_CODE))
                raise ApiError(502, "Media download refused by the egress policy") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise ApiError(502, "Media download failed") from None

    # --- sending ---------------------------------------------------------------------------

    async def on_outbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Send one command with the Bot API and report the outcome as a DeliveryStatus."""
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
                http_status=0, error_code=None, description="Unknown or inactive Telegram integration",
                transient=True), code="telegram_unknown_integration")
            return
        try:
            method, params = handlers.build_request(command)
        except handlers.UnsendableContent as exc:
            await self._report(handlers.failed_status(command, "unsupported_content", str(exc)))
            return
        chat_key = f"{command.integration_id}:{command.recipient}"
        paused = self.paused_until.get(chat_key, 0.0) - time.monotonic()
        if paused > 0:
            raise Retry(paused, "chat paused by a 429")
        await self._chat_bucket(chat_key, command.recipient).acquire()
        await self.bot_buckets.get(command.integration_id).acquire()
        try:
            result = await self.call(creds, method, params)
        except EgressRefused as exc:
            await self._report(handlers.failed_status(command, REFUSED_CODE, str(exc)))
            return
        except SendFailure as failure:
            if failure.retry_after is not None:
                self.paused_until[chat_key] = time.monotonic() + failure.retry_after
            await self._retry_or_fail(command, delivery, failure)
            return
        self.paused_until.pop(chat_key, None)
        try:
            provider_id = handlers.sent_message_id(result)
        except SendFailure:
            provider_id = ""  # sent all the same: never send it twice
        self.sent.remember(command.message_id, provider_id)
        await self._report(handlers.sent_status(command, provider_id))

    async def _retry_or_fail(self, command: OutboundSend, delivery: Delivery, failure: SendFailure,
                             code: str | None = None) -> None:
        if failure.transient and delivery.num_delivered < self.config.max_send_attempts:
            metrics.message_out(command.channel, "retried")
            delay = failure.retry_after if failure.retry_after is not None else backoff_delay(
                delivery.num_delivered, self.config.retry_base_seconds, self.config.retry_max_seconds)
            raise Retry(delay, str(failure))
        log.warning("giving up on message %s: %s", command.message_id, failure)
        await self._report(handlers.failed_status(command, code or failure.code, failure.description,
                                                  handlers.failure_details(failure)))

    def _chat_bucket(self, chat_key: str, recipient: str) -> TokenBucket:
        buckets = self.group_buckets if handlers.is_group_chat(recipient) else self.chat_buckets
        if len(buckets.buckets) > CHAT_BUCKETS_MAX:
            now = buckets.clock()
            for key in [k for k, b in buckets.buckets.items()
                        if b.tokens + (now - b.updated) * b.rate >= b.burst and not b._lock.locked()]:
                del buckets.buckets[key]
            self.paused_until = {k: t for k, t in self.paused_until.items() if t > time.monotonic()}
        return buckets.get(chat_key)

    async def _report(self, status: DeliveryStatus) -> None:
        metrics.message_out(status.channel, status.status)
        await self._bus().publish(channel.subject_of(status),
                                  channel.encode(status), msg_id=handlers.send_status_msg_id(status))


    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _bus(self) -> Bus:
        if self.bus is None:
            raise ApiError(503, "Not connected")
        return self.bus

    def _session(self) -> EgressSession:
        if self.session is None:
            raise ApiError(503, "Not started")
        return self.session


def create(environ: Mapping[str, str] | None = None) -> TelegramService:
    """Build the telegram service from the environment (os.environ when None)."""
    setup_telemetry("telegram")
    return TelegramService(TelegramConfig.from_env(environ))
