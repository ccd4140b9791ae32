"""The conversations service: wiring and lifecycle."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from services.conversations.admin import SEALED_CONFIG_FIELDS, Admin
from services.conversations.api import Api, add_routes
from services.conversations.attachments import Attachments
from services.conversations.config import ConversationsConfig
from services.conversations.desk_bridge import DeskBridge, add_desk_routes
from services.conversations.handlers import Conversations, IdentityClient
from services.conversations.store import Store
from services.conversations.switchboard import Switchboards
from shared import records, subjects
from shared.bus import Bus, KvMirror
from shared.config import ConfigError
from shared.encryption import SecretsError
from shared.http import error_middleware, tracing_middleware
from shared.messages import identity as ident
from shared.service import ServiceApp
from shared.telemetry import log_fields, setup_telemetry

log = logging.getLogger(__name__)


class _InboundKeyProbe(msgspec.Struct):
    integration_id: str = ""
    channel_user_id: str = ""
    user_id: str = ""


class _StatusKeyProbe(msgspec.Struct):
    integration_id: str = ""
    provider_message_id: str = ""


_INBOUND_PROBE = msgspec.json.Decoder(_InboundKeyProbe)
_STATUS_PROBE = msgspec.json.Decoder(_StatusKeyProbe)


def inbound_ordering_key(subject: str, data: bytes) -> str:
    """One customer's messages are handled in order; different customers concurrently. The
    integration is the subject's (`inbound.<channel>.<integration>.<partition>`), which only the
    channel's own service may publish on: a message on another channel's subject cannot name
    (and hold back) this integration's customers."""
    try:
        probe = _INBOUND_PROBE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return subject
    named = subjects.channel_of_subject(subject)
    integration_id = named[1] if named is not None else probe.integration_id
    return subjects.inbound_key(integration_id, probe.channel_user_id or probe.user_id)


def status_ordering_key(subject: str, data: bytes) -> str:
    """Statuses of one provider message in order (sent before delivered before read)."""
    try:
        probe = _STATUS_PROBE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return subject
    return f"{probe.integration_id}:{probe.provider_message_id}"


class KvSink:
    """Publishes integration and webhook records to their KV buckets."""

    def __init__(self, integrations: KeyValue, webhooks: KeyValue, apps: KeyValue | None = None,
                 apps_mirror: KvMirror | None = None) -> None:
        self.integrations = integrations
        self.webhooks = webhooks
        self.apps = apps
        # This replica reads its own writes at once (others when their watchers see them).
        self.apps_mirror = apps_mirror

    async def put_integration(self, record: records.IntegrationRecord) -> None:
        await self.integrations.put(record.id, records.ENCODER.encode(record))

    async def delete_integration(self, integration_id: str) -> None:
        await self.integrations.delete(integration_id)

    async def put_webhook(self, record: records.WebhookRecord) -> None:
        await self.webhooks.put(records.webhook_key(record.app_id, record.id), records.ENCODER.encode(record))

    async def delete_webhook(self, app_id: str, webhook_id: str) -> None:
        await self.webhooks.delete(records.webhook_key(app_id, webhook_id))

    async def put_app(self, record: records.AppRecord) -> None:
        if self.apps is not None:
            await self.apps.put(record.id, records.ENCODER.encode(record))
        if self.apps_mirror is not None:
            self.apps_mirror.values[record.id] = record

    async def delete_app(self, app_id: str) -> None:
        if self.apps is not None:
            await self.apps.delete(app_id)
        if self.apps_mirror is not None:
            self.apps_mirror.values.pop(app_id, None)


async def _remove_stale_keys(js: JetStreamContext, bucket: str, kv: KeyValue, wanted: set[str]) -> None:
    """Delete the live keys of a KV bucket that `wanted` does not name.

    The keys come from the bucket's stream (every subject that holds an entry), not from
    nats-py's `keys()`, which answers "no keys" when its watcher's entries are still on the way
    as it reads the consumer's pending count (it did under load: a stale key stayed)."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    for key in (subject[len(prefix):] for subject in info.state.subjects or {}):
        if key in wanted:
            continue
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):  # deleted or purged already
            await kv.get(key)
            await kv.delete(key)


SWEEPER_PARTITION = 0


class ConversationsService(ServiceApp):
    """The business API plus the inbound/status consumers and the history/start endpoints."""

    name = "conversations"
    # Set by `start`, before NATS and HTTP serve (and released by `stop`, in the reverse order).
    store: Store
    bus: Bus
    conversations: Conversations
    admin: Admin
    apps: KvMirror
    attachments: Attachments

    def __init__(self, config: ConversationsConfig) -> None:
        super().__init__(config.common)
        self.config = config
        self.http.middlewares.extend([tracing_middleware, error_middleware])
        self.add_database_check(lambda: self.store.db)

    async def start(self) -> None:
        """Open the database (its secrets resealed), connect, republish the KV caches, consume,
        serve NATS, start the sweeper, then HTTP."""
        self.store = await Store.open(self.config.database, self.config.keyring)
        try:
            await self._reseal_secrets()
        except ConfigError:
            await self.store.close()
            raise
        self.on_stop(self.store.close)
        self.bus = await self.connect_bus()
        apps_bucket = await self.bus.key_value(subjects.APPS_BUCKET, replicas=self.common.stream_replicas)
        self.apps = await self.mirror_bucket(self.bus, subjects.APPS_BUCKET, records.APP_DECODER.decode)
        sink = KvSink(await self.bus.key_value(subjects.INTEGRATIONS_BUCKET, replicas=self.common.stream_replicas),
                      await self.bus.key_value(subjects.WEBHOOKS_BUCKET, replicas=self.common.stream_replicas),
                      apps_bucket, self.apps)
        identity = IdentityClient(self.bus, timeout=self.config.identity_timeout)
        # A merge or a deletion done through another replica: its cached resolutions go at once.
        ended_users = await self.mirror_bucket(self.bus, subjects.ENDED_USERS_BUCKET, ident.USER_ENDED_DECODER.decode)
        ended_users.add_listener(lambda user_id, _ended: identity.forget_user(user_id))
        self.conversations = Conversations(self.store, self.bus, identity, self.config.handoff_recap_count,
                                           streams=self.bus, jwt_policy=self.config.jwt_policy, apps=self._app,
                                           public_base_url=self.common.public_base_url)
        self.admin = Admin(self.store, sink, self.common.egress)
        switchboards = Switchboards(self.store, self.admin, self.conversations)
        await self._republish(sink)
        files = await self.open_files()
        self.attachments = attachments = Attachments(self.store, files, self.common.public_base_url)
        api = Api(self.store, self.admin, self.conversations, switchboards, attachments, self.config.account_key_id,
                  self.config.account_key_secret, self.common.public_base_url, self.config.jwt_policy)
        add_routes(self.http, api)
        add_desk_routes(self.http, api, self.bus)
        inbound = await self.bus.consume(subjects.CONVERSATIONS_INBOUND, self.conversations.handle_inbound,
                                         ordering_key=inbound_ordering_key,
                                         on_acquire=self.conversations.take_inbound,
                                         on_release=self.conversations.release_inbound)
        await self.bus.consume(subjects.CONVERSATIONS_STATUS, self.conversations.handle_status,
                               ordering_key=status_ordering_key)
        await self.bus.serve(subjects.CONVERSATIONS_SERVICE, {
            subjects.CONVERSATIONS_START: self.conversations.answer,
            subjects.CONVERSATIONS_HISTORY: self.conversations.answer,
            subjects.CONVERSATIONS_PARTICIPANTS: self.conversations.answer,
            subjects.CONVERSATIONS_SDK_LINK: self.conversations.answer,
            subjects.CONVERSATIONS_SDK_LOGIN: self.conversations.answer,
            subjects.CONVERSATIONS_CLIENT_LINK: self.conversations.phone_links.answer,
            subjects.CONVERSATIONS_DESK: DeskBridge(self.conversations, switchboards, self.admin).answer,
        })
        # Pending direct links by phone expire (client:remove linkFailed) even if the number stays silent.
        # One replica sweeps (the holder of the inbound stream's partition 0): two would expire
        # the same link twice.
        self.spawn(self.conversations.sweep_forever(is_sweeper=lambda: SWEEPER_PARTITION in inbound.owned),
                   "conversations:sweep")
        self.spawn(attachments.sweep_forever(is_sweeper=lambda: SWEEPER_PARTITION in inbound.owned),
                   "conversations:attachments")
        await self.start_http()

    def _app(self, app_id: str) -> records.AppRecord | None:
        app = self.apps.get(app_id)
        return app if isinstance(app, records.AppRecord) else None

    async def _reseal_secrets(self) -> None:
        """Seal secrets still in plaintext (an older data directory) or sealed under an older key
        (a rotation), before anything is published; refuse to start when one does not open."""
        try:
            done = await self.store.reseal_secrets(SEALED_CONFIG_FIELDS)
        except SecretsError as exc:
            raise ConfigError(f"a stored secret does not open with THREADLINE_SECRETS_KEY ({exc}); "
                              "keep the key that sealed it in the keyring") from exc
        if done.app_keys or done.integrations or done.webhooks:
            log.warning("sealed secrets under key %s: %d app keys, %d integrations, %d webhooks",
                        self.config.keyring.primary_id, done.app_keys, done.integrations, done.webhooks,
                        extra=log_fields(key_id=self.config.keyring.primary_id, app_keys=done.app_keys,
                                         integrations=done.integrations, webhooks=done.webhooks))

    async def _republish(self, sink: KvSink) -> None:
        """KV is a cache of the DB: write every record, remove keys the DB no longer has."""
        integrations, webhooks = await self.admin.all_records()
        for integration in integrations:
            await sink.put_integration(integration)
        for webhook in webhooks:
            await sink.put_webhook(webhook)
        await _remove_stale_keys(self.bus.js, subjects.INTEGRATIONS_BUCKET, sink.integrations,
                                 {i.id for i in integrations})
        await _remove_stale_keys(self.bus.js, subjects.WEBHOOKS_BUCKET, sink.webhooks,
                                 {records.webhook_key(w.app_id, w.id) for w in webhooks})
        log.info("published %d integrations and %d webhooks to KV", len(integrations), len(webhooks))
        if sink.apps is not None:
            apps = await self.admin.all_apps()
            for app in apps:
                await sink.put_app(app)
            await _remove_stale_keys(self.bus.js, subjects.APPS_BUCKET, sink.apps, {a.id for a in apps})


def create(environ: Mapping[str, str] | None = None) -> ConversationsService:
    """Build the conversations service from the environment."""
    setup_telemetry("conversations")
    return ConversationsService(ConversationsConfig.from_env(os.environ if environ is None else environ))
