"""Wiring of the `webhooks` service: events in from JetStream, rows into the database, POSTs out."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import msgspec
from aiohttp import web
from nats.aio.msg import Msg

from services.webhooks.config import SERVICE_NAME, WebhooksConfig
from services.webhooks.delivery import Dispatcher
from services.webhooks.handlers import deliveries_for
from services.webhooks.store import DeliveryStore
from shared import fencing, records, subjects
from shared.bus import Bus, Delivery, KvMirror, Retry, refusal
from shared.egress import EgressSession
from shared.http import error_middleware, json_response, tracing_middleware
from shared.messages import conversation
from shared.records import WebhookRecord
from shared.service import ServiceApp
from shared.telemetry import inject_headers, setup_telemetry

# An event whose partition was taken over while this replica handled it goes back unacknowledged,
# to be redelivered after this delay to whichever replica pulls the partition: the new owner
# (which has it already when it restarted the partition's consumer at its ack floor).
TAKEN_OVER_RETRY_SECONDS = 1.0


class WebhooksService(ServiceApp):
    """Consumes conversation events and delivers them to the businesses' webhooks."""

    name = SERVICE_NAME
    # Set by `start`, before HTTP serves (and released by `stop`, in the reverse order).
    store: DeliveryStore
    session: EgressSession
    dispatcher: Dispatcher
    bus: Bus
    mirror: KvMirror
    apps: KvMirror

    def __init__(self, config: WebhooksConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.http.middlewares.append(tracing_middleware)
        self.http.middlewares.append(error_middleware)
        self.http.router.add_get("/stats", self._stats)
        self.add_database_check(lambda: self.store.db)

    async def start(self) -> None:
        """Open the database, start the dispatcher, connect, consume events, serve HTTP (stopped
        the other way round: the consumers before the dispatcher, its attempts before the
        database)."""
        self.store = await DeliveryStore.open(self.config.database)
        self.on_stop(self.store.close)
        self.session = self.egress_session("business", limit=256, ttl_dns_cache=300)
        self.dispatcher = Dispatcher(self.store, self.webhook, self.session, self.config)
        await self.dispatcher.start()
        self.on_stop(self.dispatcher.stop)
        self.bus = await self.connect_bus()
        self.mirror = await self.mirror_bucket(self.bus, subjects.WEBHOOKS_BUCKET,
                                               records.webhook_decoder(self.config.keyring))
        # Apps carry their switchboards: who of the subscribers is in control of a conversation.
        self.apps = await self.mirror_bucket(self.bus, subjects.APPS_BUCKET, records.APP_DECODER.decode)
        await self.bus.nc.subscribe(subjects.WEBHOOKS_ERASURES, cb=self._on_erasure)
        await self.bus.consume(subjects.WEBHOOKS_EVENTS, self._on_event, on_acquire=self.dispatcher.acquire,
                               on_release=self.dispatcher.release)
        await self.start_http()

    def webhook(self, app_id: str, webhook_id: str) -> WebhookRecord | None:
        """The current configuration of a webhook (None once deleted)."""
        record = self.mirror.get(records.webhook_key(app_id, webhook_id))
        return record if isinstance(record, WebhookRecord) else None

    async def _on_event(self, data: bytes, _headers: Mapping[str, str], _delivery: Delivery) -> None:
        try:
            event = conversation.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # One of a type this version does not know waits for a newer replica, its
            # conversation's later events behind it.
            raise refusal(data, exc, conversation.TYPES, "conversation event") from exc
        forget = conversation.erasure(event)
        if forget is not None:  # before its own delivery (user:remove) is stored
            await self.dispatcher.forget(forget)
            # The user's other conversations may be in partitions other replicas hold, their
            # rows queued in those replicas' memory: tell them (the database rows are gone).
            await self.bus.nc.publish(subjects.WEBHOOKS_ERASURES, data)
        # The consumer span is current: its context is stored so the delivery continues the trace.
        app = self.apps.get(event.app_id)
        switchboard = app.active_switchboard() if isinstance(app, records.AppRecord) else None
        rows = deliveries_for(event, list(self.mirror.values.values()), inject_headers(), time.time(), switchboard)
        if not rows:
            return
        # Durable before the ack (the bus acks when this returns); the dispatcher only sees
        # committed rows.
        try:
            await self.dispatcher.insert(rows)
        except fencing.StaleEpoch as exc:
            # Another replica took the partition over while this one was stalled: not stored,
            # not acknowledged.
            raise Retry(TAKEN_OVER_RETRY_SECONDS, str(exc)) from exc

    async def _on_erasure(self, msg: Msg) -> None:
        """Another replica handled a privacy event: drop what it names from this one's queues."""
        try:
            forget = conversation.erasure(conversation.decode(msg.data))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        if forget is not None:
            self.dispatcher.forget_queued(forget)

    async def _stats(self, _request: web.Request) -> web.Response:
        return json_response(self.dispatcher.stats())


def create(environ: Mapping[str, str] | None = None) -> ServiceApp:
    """Build the service from the environment (os.environ when None)."""
    setup_telemetry(SERVICE_NAME)
    return WebhooksService(WebhooksConfig.from_env(os.environ if environ is None else environ))
