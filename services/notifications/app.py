"""Wiring of the `notifications` service: away notifications, reply-window policies, opt-ins.

- a durable consumer on the conversation events (`events.*.*.<partition>`) schedules a
  notification when the business replies (one row per conversation in its database, committed
  before the event is acked) and cancels it when the customer reads or writes;
- a timer fires the rows that fell due (`handlers.Notifier.fire`), sending on the channel
  services' outbound subjects (or by e-mail) with ids `ntf_…` that are also the Nats-Msg-Id;
- a durable consumer on `status.>` follows those sends and publishes
  `notification:delivery:channel|failure` events (the existing events → webhooks path);
- `nats.micro` endpoints serve the widget's opt-ins; `GET /notifications/v1/optout` the e-mail
  opt-out link.
"""

from __future__ import annotations

import asyncio
import functools
import html
import logging
from collections.abc import Iterable, Mapping

from aiohttp import web

from services.notifications.config import NotificationsConfig
from services.notifications.handlers import Lookups, Notifier
from services.notifications.store import Store
from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.http import error_middleware, tracing_middleware
from shared.mailsend import send_email
from shared.messages import sdk_presence
from shared.presence import PresenceIndex
from shared.records import AppRecord, IntegrationRecord
from shared.service import ServiceApp
from shared.telemetry import setup_telemetry

log = logging.getLogger(__name__)

# Nobody waits on this service's handling of an event (a notification is due the app's delay
# after the reply, 5 minutes by default, and a customer's message cancels it), so its consumer
# of every conversation event takes bigger batches than the bus's default pause gives: at 500
# msg/s offered its CPU per message went from ~300 to ~145 µs, the whole system's down by 9 %
# (`bench/e2e.py --rate 500`).
EVENTS_PULL_PAUSE_SECONDS = 0.025

OPTIN_ENDPOINTS = (subjects.NOTIFICATIONS_OPTIN_START, subjects.NOTIFICATIONS_OPTIN_CONFIRM,
                   subjects.NOTIFICATIONS_OPTIN_LIST, subjects.NOTIFICATIONS_OPTIN_STOP)
OPTOUT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto; padding: 0 1rem">
<h1 style="font-size: 1.3rem">{title}</h1><p>{text}</p></body></html>
"""


class NotificationsService(ServiceApp):
    """Away notifications and opt-ins."""

    name = "notifications"
    # Set by `start`, before NATS and HTTP serve (and released by `stop`, in the reverse order).
    store: Store
    bus: Bus
    notifier: Notifier

    def __init__(self, config: NotificationsConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.http.middlewares.extend([tracing_middleware, error_middleware])
        self.http.router.add_get("/notifications/v1/optout", self.optout)
        self.add_database_check(lambda: self.store.db)
        self.presence = PresenceIndex()

    async def start(self) -> None:
        """Open the store, connect, mirror apps/integrations/presence, consume, serve, start the timer."""
        self.store = await Store.open(self.config.database)
        self.on_stop(self.store.close)
        self.bus = await self.connect_bus()
        apps = await self.mirror_bucket(self.bus, subjects.APPS_BUCKET, records.APP_DECODER.decode)
        integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                records.integration_decoder(self.config.keyring))
        # Sockets count while their replica's heartbeat is fresh (a crashed replica's vanish).
        await self.bus.key_value(subjects.SDK_PRESENCE_BUCKET, ttl=subjects.SDK_PRESENCE_TTL_SECONDS)
        presence = KvMirror(self.bus, subjects.SDK_PRESENCE_BUCKET, sdk_presence.DECODER.decode)
        presence.add_listener(self.presence.apply)
        await presence.start()
        self.on_stop(presence.stop)

        def all_integrations() -> Iterable[IntegrationRecord]:
            return list(integrations.values.values())

        def app(app_id: str) -> AppRecord | None:
            return apps.get(app_id)  # type: ignore[no-any-return]

        def integration(integration_id: str) -> IntegrationRecord | None:
            return integrations.get(integration_id)  # type: ignore[no-any-return]

        self.notifier = Notifier(self.store, self.bus, self.config, Lookups(
            app=app, integration=integration, integrations=all_integrations,
            connected=self.presence.connected),
            email_sender=functools.partial(send_email, policy=self.common.egress))
        await self.bus.consume(subjects.NOTIFICATIONS_EVENTS, self.notifier.on_event,
                               on_acquire=self.notifier.acquire, on_release=self.notifier.release,
                               pause=EVENTS_PULL_PAUSE_SECONDS)
        await self.bus.consume(subjects.NOTIFICATIONS_STATUS, self.notifier.on_status)
        await self.bus.serve(subjects.NOTIFICATIONS_SERVICE,
                             {**dict.fromkeys(OPTIN_ENDPOINTS, self.notifier.answer_optin),
                              subjects.NOTIFICATIONS_USER_EXPORT: self.notifier.answer_export})
        self.spawn(self._run_timer(), "notifications-timer")
        await self.start_http()

    async def _run_timer(self) -> None:
        while True:
            try:
                await self.notifier.fire_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notification timer round failed")
            await asyncio.sleep(self.config.tick_seconds)

    async def optout(self, request: web.Request) -> web.Response:
        """The opt-out link of a notification e-mail."""
        token = request.query.get("token", "")
        if len(token) > 200 or not await self.notifier.optout(token):
            return web.Response(status=400, content_type="text/html", text=OPTOUT_PAGE.format(
                title="This link is not valid", text=html.escape("Check that you opened the whole link.")))
        return web.Response(content_type="text/html", text=OPTOUT_PAGE.format(
            title="You're unsubscribed", text="You won't get e-mails about this conversation any more."))


def create(environ: Mapping[str, str] | None = None) -> NotificationsService:
    """The notifications service, configured from `environ` (`os.environ` when None)."""
    setup_telemetry("notifications")
    return NotificationsService(NotificationsConfig.from_env(environ))
