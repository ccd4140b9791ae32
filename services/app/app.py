"""Wiring of the `app` service: the in-app SDK channel (Android and iOS apps) with push.

The app speaks the same SDK protocol as the web messenger (`shared.sdk_service`) under `/app/`,
and registers its install (a device with a push token) under the user's `sdk` client in
`identity`. When the business replies, `conversations` sends the message to this service like to
any channel; the service waits `push_grace_seconds` (a JetStream redelivery, so the wait
survives restarts), then pushes through FCM (android) or APNs (ios) unless an app socket
delivered the message meanwhile (`tl_app_deliveries`, shared by every replica). Dead tokens
(FCM `UNREGISTERED`, APNs 410) are dropped from the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.js.kv import KeyValue

from services.app import handlers
from services.app.config import AppConfig
from services.app.push import PushOutcome, PushSender, push_sender, token_suffix
from shared import metrics, subjects
from shared.bus import Delivery, Retry
from shared.http import ApiError, error_middleware, json_response, read_json, tracing_middleware
from shared.ids import now
from shared.messages import channel, identity
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.outbound import BoundedMemory, decode_send, recipient_key
from shared.records import IntegrationRecord
from shared.retry import backoff_delay
from shared.sdk import SessionClaims
from shared.sdk_service import SdkService, bearer_token
from shared.telemetry import setup_telemetry

log = logging.getLogger(__name__)
DELIVERIES_TTL_SECONDS = 24 * 3600


class AppService(SdkService):
    """The in-app SDK API, its realtime socket, devices and push."""

    name = "app"
    path_root = "app"
    # Set by `start`, before HTTP serves.
    deliveries: KeyValue
    integration_types = handlers.APP_INTEGRATION_TYPES

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config.common, config.sdk, config.keyring)
        self.config = config
        self.senders: dict[str, tuple[IntegrationRecord, PushSender]] = {}
        # (message id, device id) pushed already: a redelivered command does not buzz twice.
        self.pushed: BoundedMemory[tuple[str, str], PushOutcome] = BoundedMemory(50_000)
        self.http.middlewares.extend([tracing_middleware, error_middleware])
        self.http.router.add_put(self.sdk_prefix + "/devices/{guid}", self.put_device)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, mirror integrations, watch events, consume sends for both platforms, serve."""
        self.on_stop(self._close_push_clients)  # after the bus: its consumers push until it stops
        await self.start_sdk()
        bus = self.bus
        self.deliveries = await bus.key_value(subjects.APP_DELIVERIES_BUCKET, ttl=DELIVERIES_TTL_SECONDS)
        for platform in sorted(handlers.APP_INTEGRATION_TYPES):
            await bus.consume(subjects.channel_outbound_consumer(platform), self.on_outbound, batch=50,
                              ordering_key=recipient_key, ack_wait=60.0)
        await self.start_http()

    async def _close_push_clients(self) -> None:
        """The push clients go last: consumers may push until the bus stops."""
        senders = [sender for _record, sender in self.senders.values()]
        self.senders.clear()
        await asyncio.gather(*(sender.close() for sender in senders), return_exceptions=True)

    # --- SDK hooks ----------------------------------------------------------------------------

    async def read_session_body(self, request: web.Request) -> handlers.SessionBody | None:
        if not request.can_read_body:
            return None
        body = await read_json(request, handlers.SessionBody, limit=8192)
        if body.device is not None:
            body = msgspec.structs.replace(body, device=handlers.validate_device(body.device))
        return body

    async def read_start_body(self, request: web.Request) -> handlers.StartBody:
        body = await read_json(request, handlers.StartBody)
        if body.device is not None:
            body = msgspec.structs.replace(body, device=handlers.validate_device(body.device))
        return body

    async def session_created(self, request: web.Request, record: IntegrationRecord, claims: SessionClaims,
                              body: Any) -> None:
        if isinstance(body, handlers.SessionBody | handlers.StartBody) and body.device is not None:
            await self.ask_identity(subjects.IDENTITY_DEVICE_REGISTER,
                                    handlers.register_device(claims, record, body.device))

    def session_info(self, request: web.Request, record: IntegrationRecord, body: Any) -> dict[str, Any]:
        known = body if isinstance(body, handlers.SessionBody | handlers.StartBody) else None
        return handlers.session_client_info(known, record.type)

    async def business_message_delivered(self, claims: SessionClaims, conversation_id: str, message_id: str) -> None:
        try:
            await self.deliveries.put(message_id, claims.client.encode())
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            # Worst case the customer also gets a push for a message they saw.
            log.warning("could not note socket delivery of %s: %s", message_id, exc)

    # --- devices ------------------------------------------------------------------------------

    async def put_device(self, request: web.Request) -> web.Response:
        """Register or update this install (its push token, app version) for the session's user."""
        claims, record = await self.session(request, bearer_token(request.headers.get("Authorization")))
        device = handlers.validate_device(await read_json(request, handlers.DeviceIn, limit=8192),
                                          guid=request.match_info["guid"])
        reply = await self.ask_identity(subjects.IDENTITY_DEVICE_REGISTER,
                                        handlers.register_device(claims, record, device))
        if not isinstance(reply, identity.DeviceReply):
            raise ApiError(503, "Unexpected answer from identity")
        return json_response(handlers.DeviceResponse(device=reply.device))

    # --- push ---------------------------------------------------------------------------------

    def sender(self, record: IntegrationRecord) -> PushSender:
        """The push sender of an integration, rebuilt when its record changed."""
        cached = self.senders.get(record.id)
        if cached is not None and cached[0] == record:
            return cached[1]
        sender = push_sender(record.type, record.config, self.common.egress)
        if cached is not None:
            asyncio.get_running_loop().create_task(cached[1].close())
        self.senders[record.id] = (record, sender)
        return sender

    async def on_outbound(self, data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        """Push a business message to the client's app installs unless a socket delivered it."""
        command = decode_send(data)
        if not isinstance(command, OutboundSend):  # business typing/read reaches apps over their sockets
            return
        waited = now() - command.created_at if command.created_at else self.config.push_grace_seconds
        if waited < self.config.push_grace_seconds:
            raise Retry(self.config.push_grace_seconds - waited, "waiting for a socket delivery")
        if await self._delivered_by_socket(command.message_id):
            await self._report(handlers.delivery_status(command, "delivered", now()))
            return
        record = await self.integration(command.integration_id)
        if record is None or record.type not in handlers.APP_INTEGRATION_TYPES:
            log.warning("no app integration %s for message %s", command.integration_id, command.message_id)
            await self._report(handlers.delivery_status(command, "failed", now(), code="integration_not_found",
                                                        title="The app integration no longer exists"))
            return
        try:
            sender = self.sender(record)
        except ValueError as exc:
            await self._report(handlers.delivery_status(command, "failed", now(), code="push_not_configured",
                                                        title=str(exc)))
            return
        devices = await self._devices(command)
        targets = handlers.push_targets(devices, command)
        message = handlers.push_message(command, record)
        outcomes: list[PushOutcome] = []
        for device in targets:
            token = device.push_notification_token
            assert token is not None
            done = self.pushed.get((command.message_id, device.id))
            if done is not None:
                outcomes.append(done)
                continue
            outcome = await sender.send(token, message)
            if outcome.status == "unregistered":
                log.info("push token %s of device %s is gone (%s): dropping it", token_suffix(token), device.id,
                         outcome.code)
                await self._drop_token(command.app_id, device.id, token)
            if outcome.status != "retry":
                self.pushed.remember((command.message_id, device.id), outcome)
            outcomes.append(outcome)
        result = handlers.push_round(outcomes)
        if result.status == "none":
            # No install to push to: the message waits in the conversation's history.
            log.info("message %s: no app install with a push token for client %s", command.message_id,
                     command.client_id)
            return
        if result.status == "retry" and delivery.num_delivered < self.config.max_push_attempts:
            delay = result.retry_after if result.retry_after is not None else backoff_delay(
                delivery.num_delivered, self.config.retry_base_seconds, self.config.retry_max_seconds)
            metrics.message_out(command.channel, "retried")
            raise Retry(delay, f"push {result.code}")
        if result.status == "sent":
            await self._report(handlers.delivery_status(command, "sent", now(), provider_id=result.provider_id))
            return
        await self._report(handlers.delivery_status(command, "failed", now(), code=result.code,
                                                    title=result.reason or "Push failed"))

    async def _delivered_by_socket(self, message_id: str) -> bool:
        try:
            entry = await self.deliveries.get(message_id)
        except nats.js.errors.KeyNotFoundError:
            return False
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise Retry(1.0, f"deliveries bucket unavailable: {exc}") from exc
        return entry.value is not None and entry.operation is None

    async def _devices(self, command: OutboundSend) -> list[handlers.Device]:
        try:
            reply = await self.ask_identity(subjects.IDENTITY_DEVICES_LIST, identity.ListDevices(
                app_id=command.app_id, user_id_or_external_id=command.user_id))
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise Retry(2.0, f"identity: {exc.title}") from exc
        return reply.devices if isinstance(reply, identity.DevicesReply) else []

    async def _drop_token(self, app_id: str, device_id: str, token: str) -> None:
        with contextlib.suppress(ApiError):
            await self.ask_identity(subjects.IDENTITY_DEVICE_DROP_TOKEN, identity.DropPushToken(
                app_id=app_id, device_id=device_id, push_notification_token=token))

    async def _report(self, status: DeliveryStatus) -> None:
        metrics.message_out(status.channel, status.status)
        await self.bus.publish(channel.subject_of(status),
                                  channel.encode(status), msg_id=handlers.status_msg_id(status))


def create(environ: Mapping[str, str] | None = None) -> AppService:
    """The app service, configured from `environ` (`os.environ` when None)."""
    setup_telemetry("app")
    return AppService(AppConfig.from_env(environ))
