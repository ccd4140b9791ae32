"""Configuration resources: apps, API keys, integrations and their webhooks.

Integrations and webhooks are mirrored to KV buckets (`shared.records`) for the channel
services and `webhooks`; SQLite is the source of truth and the KV write happens inside the
DB transaction, so a failed KV write leaves nothing behind (the API answers 503).

Secrets are sealed (`shared.encryption`) before they are written anywhere: the integration's
`SEALED_CONFIG_FIELDS` and each webhook's secret, in the database and in KV alike (the services
that use them open them with the same keyring). They are opened only to answer the API.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from services.conversations import models
from services.conversations.store import Store, loads
from shared import records
from shared.db import Row
from shared.egress import (
    APNS_HOSTS,
    FCM_HOSTS,
    GOOGLE_OAUTH_HOSTS,
    GRAPH_HOSTS,
    TELEGRAM_HOSTS,
    TWILIO_HOSTS,
    EgressPolicy,
    EgressRefused,
)
from shared.encryption import is_sealed
from shared.http import ApiError
from shared.ids import new_id, new_secret, now

log = logging.getLogger(__name__)

MAX_KEYS_PER_APP = 10
MAX_WEBHOOKS_PER_APP = 10
WEBHOOK_RECORD_DECODER = records.WEBHOOK_DECODER
# Config fields sealed at rest and in KV: every write-only secret, and the verify tokens.
SEALED_CONFIG_FIELDS = models.SECRET_FIELDS | {"verifyToken"}


class ConfigSink(Protocol):
    """Where integration and webhook records are published (KV buckets)."""

    async def put_integration(self, record: records.IntegrationRecord) -> None: ...

    async def delete_integration(self, integration_id: str) -> None: ...

    async def put_webhook(self, record: records.WebhookRecord) -> None: ...

    async def delete_webhook(self, app_id: str, webhook_id: str) -> None: ...

    async def put_app(self, record: records.AppRecord) -> None: ...

    async def delete_app(self, app_id: str) -> None: ...


def new_key_id() -> str:
    """An app key id: `app_` + 24 hex (SunCo's shape)."""
    return f"app_{new_id()}"


def app_out(row: Row) -> models.App:
    return models.App(id=row["id"], display_name=row["display_name"], settings=loads(row["settings"]),
                      metadata=loads(row["metadata"]))


def key_out(row: Mapping[str, Any]) -> models.AppKey:
    """The API form of a key (`Store.get_key`'s row, its secret opened)."""
    return models.AppKey(id=row["id"], display_name=row["display_name"], secret=row["secret"])


def webhook_out(record: records.WebhookRecord) -> models.Webhook:
    """The API form of a webhook record whose secret is opened (`Admin.open_webhook`)."""
    return models.Webhook(id=record.id, version=record.version, target=record.target, triggers=record.triggers,
                          secret=record.secret, include_full_user=record.include_full_user,
                          include_full_source=record.include_full_source)


def switchboard_lock(app_id: str) -> str:
    """What changes to an app's switchboard (and to the integrations in it) serialize on."""
    return f"switchboard:{app_id}"


def member_record(row: Row | Mapping[str, Any]) -> records.SwitchboardIntegrationRecord:
    """A switchboard_integrations row as the apps bucket carries it."""
    return records.SwitchboardIntegrationRecord(
        id=row["id"], name=row["name"], integration_id=row["integration_id"],
        integration_type=row["integration_type"], deliver_standby_events=bool(row["deliver_standby_events"]),
        next_switchboard_integration_id=row["next_switchboard_integration_id"],
        message_history_count=row["message_history_count"])


def _builtins(struct: msgspec.Struct) -> dict[str, Any]:
    data = msgspec.to_builtins(struct)
    assert isinstance(data, dict)
    return {k: v for k, v in data.items() if v is not None}


class Admin:
    """Apps, keys, integrations, webhooks."""

    def __init__(self, store: Store, sink: ConfigSink, egress: EgressPolicy) -> None:
        self.store = store
        self.sink = sink
        self.egress = egress
        self.keyring = store.keyring

    # --- secrets --------------------------------------------------------------------------

    def seal_config(self, integration_id: str, config: dict[str, Any]) -> dict[str, Any]:
        """`config` with its secret fields sealed, as the database and KV hold it."""
        return self.keyring.seal_fields(config, SEALED_CONFIG_FIELDS, records.integration_context(integration_id))

    def open_config(self, row: Row) -> dict[str, Any]:
        """An integration row's config with its secrets opened."""
        config: dict[str, Any] = loads(row["config"])
        return self.keyring.open_fields(config, records.integration_context(row["id"]))

    def new_webhook_secret(self, webhook_id: str) -> str:
        """A new webhook secret, sealed."""
        return self.keyring.seal(new_secret(), records.webhook_secret_context(webhook_id))

    def open_webhook(self, record: records.WebhookRecord) -> records.WebhookRecord:
        """`record` with its secret opened (to answer the API)."""
        return msgspec.structs.replace(
            record, secret=self.keyring.open(record.secret, records.webhook_secret_context(record.id)))

    # --- apps -----------------------------------------------------------------------------

    async def create_app(self, body: models.AppCreateBody) -> models.App:
        if not body.display_name or len(body.display_name) > 100:
            raise ApiError(400, "displayName must be 1 to 100 characters")
        models.check_metadata(body.metadata)
        models.check_notification_settings(body.settings.notifications if body.settings else None)
        app_id = new_id()
        settings = {} if body.settings is None else _builtins(body.settings)
        async with self.store.tx():
            await self.store.add_app(app_id, body.display_name, settings, body.metadata or {}, now())
            await self.publish_app(app_id)
        row = await self.store.get_app(app_id)
        assert row is not None
        return app_out(row)

    async def app_row(self, app_id: str) -> Row:
        row = await self.store.get_app(app_id)
        if row is None:
            raise ApiError(404, "App not found", "app_not_found")
        return row

    async def update_app(self, app_id: str, body: models.AppUpdateBody) -> models.App:
        row = await self.app_row(app_id)
        models.check_metadata(body.metadata)
        if body.display_name is not None and not 1 <= len(body.display_name) <= 100:
            raise ApiError(400, "displayName must be 1 to 100 characters")
        settings = loads(row["settings"])
        if body.settings is not None:
            models.check_notification_settings(body.settings.notifications)
            settings.update(_builtins(body.settings))
        async with self.store.tx():
            await self.store.set_app(app_id, body.display_name or row["display_name"], settings,
                                     loads(row["metadata"]) if body.metadata is None else body.metadata)
            await self.publish_app(app_id)
        return app_out(await self.app_row(app_id))

    async def switchboard_record(self, app_id: str) -> records.SwitchboardRecord | None:
        """The app's switchboard with its integrations, from the database (None: it has none)."""
        row = await self.store.switchboard(app_id)
        if row is None:
            return None
        members = await self.store.switchboard_integrations(row["id"])
        return records.SwitchboardRecord(
            id=row["id"], enabled=bool(row["enabled"]),
            default_switchboard_integration_id=row["default_switchboard_integration_id"],
            integrations=[member_record(m) for m in members])

    async def _app_record(self, row: Row) -> records.AppRecord:
        return records.AppRecord(id=row["id"], display_name=row["display_name"], settings=loads(row["settings"]),
                                 switchboard=await self.switchboard_record(row["id"]))

    async def publish_app(self, app_id: str) -> None:
        """Write the app's record (settings, switchboard) to the apps bucket, as the database has
        it now (call inside the transaction that changed it)."""
        await self.sink.put_app(await self._app_record(await self.app_row(app_id)))

    async def delete_app(self, app_id: str) -> None:
        await self.app_row(app_id)
        integrations, _ = await self.store.list_integrations(app_id)
        webhooks = await self.store.list_webhooks(app_id=app_id)
        async with self.store.tx():
            await self.store.delete_app(app_id)
            for webhook in webhooks:
                await self.sink.delete_webhook(app_id, webhook["id"])
            for integration in integrations:
                await self.sink.delete_integration(integration["id"])
            await self.sink.delete_app(app_id)

    # --- keys -----------------------------------------------------------------------------

    async def create_key(self, app_id: str, body: models.AppKeyCreateBody) -> models.AppKey:
        await self.app_row(app_id)
        if not body.display_name or len(body.display_name) > 100:
            raise ApiError(400, "displayName must be 1 to 100 characters")
        key_id = new_key_id()
        async with self.store.tx():
            await self.store.serialize(f"keys:{app_id}")  # two replicas never both add the last one
            if await self.store.count_keys(app_id) >= MAX_KEYS_PER_APP:
                raise ApiError(400, f"An app can have at most {MAX_KEYS_PER_APP} keys")
            await self.store.add_key(key_id, app_id, body.display_name, new_secret(), now())
        row = await self.store.get_key(key_id)
        assert row is not None
        return key_out(row)

    async def get_key(self, app_id: str, key_id: str) -> models.AppKey:
        row = await self.store.get_key(key_id)
        if row is None or row["app_id"] != app_id:
            raise ApiError(404, "Key not found", "key_not_found")
        return key_out(row)

    async def delete_key(self, app_id: str, key_id: str) -> None:
        async with self.store.tx():
            deleted = await self.store.delete_key(app_id, key_id)
        if not deleted:
            raise ApiError(404, "Key not found", "key_not_found")

    # --- custom integration keys ----------------------------------------------------------

    async def _keyed_integration(self, app_id: str, integration_id: str) -> Row:
        row = await self.integration_row(app_id, integration_id)
        if row["type"] != "custom":
            raise ApiError(400, "Only custom integrations have API keys")
        return row

    async def create_integration_key(self, app_id: str, integration_id: str,
                                     body: models.IntegrationApiKeyBody) -> models.IntegrationApiKey:
        await self._keyed_integration(app_id, integration_id)
        key_id = f"int_{new_id()}"
        async with self.store.tx():
            await self.store.serialize(f"integration-keys:{integration_id}")
            if len(await self.store.integration_keys(integration_id)) >= MAX_KEYS_PER_APP:
                raise ApiError(400, f"A custom integration can have at most {MAX_KEYS_PER_APP} keys")
            await self.store.add_integration_key(key_id, app_id, integration_id, body.display_name, new_secret(),
                                                 now())
        return await self.integration_key(app_id, integration_id, key_id)

    async def integration_keys(self, app_id: str, integration_id: str) -> list[models.IntegrationApiKey]:
        await self._keyed_integration(app_id, integration_id)
        return [models.IntegrationApiKey(id=k["id"], secret=k["secret"], display_name=k["display_name"])
                for k in await self.store.integration_keys(integration_id)]

    async def integration_key(self, app_id: str, integration_id: str, key_id: str) -> models.IntegrationApiKey:
        key = await self.store.integration_key(key_id)
        if key is None or key["app_id"] != app_id or key["integration_id"] != integration_id:
            raise ApiError(404, "Key not found", "key_not_found")
        return models.IntegrationApiKey(id=key["id"], secret=key["secret"], display_name=key["display_name"])

    async def delete_integration_key(self, app_id: str, integration_id: str, key_id: str) -> None:
        await self.integration_key(app_id, integration_id, key_id)
        async with self.store.tx():
            await self.store.delete_integration_key(integration_id, key_id)

    # --- integrations ---------------------------------------------------------------------

    async def integration_row(self, app_id: str, integration_id: str) -> Row:
        row = await self.store.get_integration(app_id, integration_id)
        if row is None:
            raise ApiError(404, "Integration not found", "integration_not_found")
        return row

    async def integration_out(self, row: Row) -> dict[str, Any]:
        """The API form: common fields, the type's fields, never a secret; custom adds its webhooks."""
        out: dict[str, Any] = {"id": row["id"], "type": row["type"], "status": row["status"]}
        if row["display_name"] is not None:
            out["displayName"] = row["display_name"]
        for key, value in self.open_config(row).items():
            if key not in models.SECRET_FIELDS:
                out[key] = value
        if row["type"] == "messenger" and str(out.get("pageId", "")).isdigit():
            out["pageId"] = int(out["pageId"])  # SunCo's wire type
        if row["type"] == "mailgun":
            # SunCo's Mailgun model requires both: an SMTP-only integration takes them from its sender.
            sender = str(out.get("fromAddress") or out.get("incomingAddress") or "")
            if sender and not out.get("incomingAddress"):
                out["incomingAddress"] = sender
            if sender and not out.get("domain"):
                out["domain"] = sender.rpartition("@")[2]
        if row["type"] == "custom":
            out["webhooks"] = [
                msgspec.to_builtins(webhook_out(self.open_webhook(WEBHOOK_RECORD_DECODER.decode(w["record"]))))
                for w in await self.store.list_webhooks(integration_id=row["id"])]
        return out

    async def create_integration(self, app_id: str, body: dict[str, Any]) -> dict[str, Any]:
        await self.app_row(app_id)
        type_ = models.convert(body, models.IntegrationTypeProbe).type
        if type_ not in models.SUPPORTED_INTEGRATIONS:
            raise ApiError(400, f"Integration type {type_} is not supported by this server "
                                f"(supported: {', '.join(models.SUPPORTED_INTEGRATIONS)})")
        fields = models.convert({k: v for k, v in body.items() if k != "type"},
                                models.INTEGRATION_CREATE_BODIES[type_])
        display_name: str | None = getattr(fields, "display_name", None)
        if display_name is not None and len(display_name) > 100:
            raise ApiError(400, "displayName must be at most 100 characters")
        integration_id = new_id()
        webhooks: list[records.WebhookRecord] = []
        if isinstance(fields, models.CustomIntegrationIn):
            if not fields.webhooks:
                raise ApiError(400, "A custom integration needs at least one webhook")
            config: dict[str, Any] = {}
            for hook in fields.webhooks:
                models.check_webhook(hook.target, hook.triggers)
                self._check_target(hook.target)
                webhook_id = new_id()
                webhooks.append(records.WebhookRecord(
                    id=webhook_id, app_id=app_id, integration_id=integration_id, target=hook.target,
                    triggers=list(hook.triggers), secret=self.new_webhook_secret(webhook_id),
                    include_full_user=hook.include_full_user, include_full_source=hook.include_full_source))
        else:
            config = _builtins(fields)
            config.pop("displayName", None)
            if isinstance(fields, models.WhatsappIntegrationIn):
                config.setdefault("hsmFallbackLanguage", "en_US")
                config.setdefault("apiVersion", models.DEFAULT_WHATSAPP_API_VERSION)
                config.setdefault("baseUrl", models.DEFAULT_GRAPH_BASE_URL)
                config.setdefault("verifyToken", new_secret(18))
            elif isinstance(fields, models.MessengerIntegrationIn):
                if "pageId" in config:
                    config["pageId"] = str(config["pageId"])
                config.setdefault("apiVersion", models.DEFAULT_WHATSAPP_API_VERSION)
                config.setdefault("baseUrl", models.DEFAULT_GRAPH_BASE_URL)
                config.setdefault("verifyToken", new_secret(18))
            elif isinstance(fields, models.TelegramIntegrationIn):
                config.setdefault("baseUrl", "https://api.telegram.org")
                # The secret_token Telegram echoes in X-Telegram-Bot-Api-Secret-Token ([A-Za-z0-9_-]).
                config["webhookSecret"] = new_secret(24).replace("=", "")
            elif isinstance(fields, models.TwilioIntegrationIn):
                config.setdefault("baseUrl", "https://api.twilio.com")
            elif isinstance(fields, models.AndroidIntegrationIn):
                config.setdefault("tokenUri", "https://oauth2.googleapis.com/token")
                config.setdefault("baseUrl", "https://fcm.googleapis.com")
            elif isinstance(fields, models.MailgunIntegrationIn):
                config.setdefault("security", "starttls")
                config.setdefault("smtpPort", EMAIL_DEFAULT_PORTS[config["security"]])
                if config.get("domain"):
                    # Mailgun's SMTP relay: smtp.mailgun.org, STARTTLS on 587, login postmaster@<domain>.
                    config.setdefault("smtpHost", MAILGUN_SMTP_HOST)
                    config.setdefault("username", f"postmaster@{config['domain']}")
        _check_push_credentials(type_, config)
        _check_email_settings(type_, config)
        _check_egress(self.egress, type_, config)
        _refuse_sealed_input(config)
        missing = [f.replace("|", " or ") for f in REQUIRED_ON_CREATE.get(type_, ()) if not _has(config, f)]
        if missing:
            raise ApiError(400, f"A {type_} integration needs {', '.join(missing)}")
        status = _status(type_, config)
        config = self.seal_config(integration_id, config)
        record = records.IntegrationRecord(id=integration_id, app_id=app_id, type=type_, status=status,
                                           display_name=display_name, config=config)
        async with self.store.tx():
            await self._claim_incoming_address(type_, integration_id, config)
            if webhooks:
                await self.store.serialize(f"webhooks:{app_id}")
            if webhooks and len(await self.store.list_webhooks(app_id=app_id)) + len(webhooks) > MAX_WEBHOOKS_PER_APP:
                raise ApiError(400, f"An app can have at most {MAX_WEBHOOKS_PER_APP} webhooks")
            await self.store.add_integration(integration_id, app_id, type_, status, display_name, config, now())
            for hook_record in webhooks:
                await self.store.add_webhook(hook_record.id, app_id, integration_id,
                                             records.ENCODER.encode(hook_record).decode(), now())
            await self.sink.put_integration(record)
            for hook_record in webhooks:
                await self.sink.put_webhook(hook_record)
        return await self.integration_out(await self.integration_row(app_id, integration_id))

    async def update_integration(self, app_id: str, integration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        row = await self.integration_row(app_id, integration_id)
        if "type" in body and body["type"] != row["type"]:
            raise ApiError(400, "An integration's type cannot change")
        fields = models.convert({k: v for k, v in body.items() if k != "type"},
                                models.INTEGRATION_UPDATE_BODIES.get(row["type"], models.CustomIntegrationUpdate))
        changes = _builtins(fields)
        display_name = changes.pop("displayName", row["display_name"])
        if display_name is not None and len(display_name) > 100:
            raise ApiError(400, "displayName must be at most 100 characters")
        _refuse_sealed_input(changes)
        config = self.open_config(row)
        config.update(changes)
        _check_push_credentials(row["type"], config)
        _check_email_settings(row["type"], config)
        # Only what this update sets: a value stored before the egress policy existed is
        # refused when it is used (a delivery failure), not on an unrelated change.
        _check_egress(self.egress, row["type"], config, set(changes))
        status = _status(row["type"], config)
        config = self.seal_config(integration_id, config)
        record = records.IntegrationRecord(id=integration_id, app_id=app_id, type=row["type"], status=status,
                                           display_name=display_name, config=config)
        async with self.store.tx():
            await self._claim_incoming_address(row["type"], integration_id, config)
            await self.store.set_integration(integration_id, status, display_name, config)
            await self.sink.put_integration(record)
        return await self.integration_out(await self.integration_row(app_id, integration_id))

    async def _claim_incoming_address(self, type_: str, integration_id: str, config: Mapping[str, Any]) -> None:
        """409 when another integration (of any app) receives at the same `incomingAddress`: mail
        to it would reach one of them only (inside `tx()`, serialized with other claims)."""
        address = config.get("incomingAddress")
        if type_ != "mailgun" or not isinstance(address, str):
            return
        await self.store.serialize("mailgun-incoming-addresses")
        wanted = address.strip().lower()
        for other in await self.store.integrations_of_type("mailgun"):
            if other["id"] != integration_id and str(loads(other["config"]).get("incomingAddress") or "").strip(
                    ).lower() == wanted:
                raise ApiError(409, "incomingAddress is already the address of another e-mail integration",
                               "conflict")

    async def delete_integration(self, app_id: str, integration_id: str) -> None:
        await self.integration_row(app_id, integration_id)
        webhooks = await self.store.list_webhooks(integration_id=integration_id)
        async with self.store.tx():
            await self.store.serialize(switchboard_lock(app_id))  # not while it joins the switchboard
            switchboard = await self.switchboard_record(app_id)
            member = next((m for m in switchboard.integrations if m.integration_id == integration_id),
                          None) if switchboard is not None else None
            if member is not None:
                raise ApiError(400, f"The integration is the switchboard integration {member.name!r}: remove it "
                                    "from the switchboard first")
            await self.store.delete_integration(integration_id)
            for webhook in webhooks:
                await self.sink.delete_webhook(app_id, webhook["id"])
            await self.sink.delete_integration(integration_id)

    # --- webhooks -------------------------------------------------------------------------

    async def _custom_integration(self, app_id: str, integration_id: str) -> Row:
        row = await self.integration_row(app_id, integration_id)
        if row["type"] != "custom":
            raise ApiError(400, "Webhooks can only be attached to custom integrations")
        return row

    async def create_webhook(self, app_id: str, integration_id: str, body: models.WebhookCreateBody) -> models.Webhook:
        await self._custom_integration(app_id, integration_id)
        models.check_webhook(body.target, body.triggers)
        self._check_target(body.target)
        webhook_id = new_id()
        record = records.WebhookRecord(
            id=webhook_id, app_id=app_id, integration_id=integration_id, target=body.target,
            triggers=list(body.triggers), secret=self.new_webhook_secret(webhook_id),
            include_full_user=body.include_full_user, include_full_source=body.include_full_source)
        async with self.store.tx():
            await self.store.serialize(f"webhooks:{app_id}")
            if len(await self.store.list_webhooks(app_id=app_id)) >= MAX_WEBHOOKS_PER_APP:
                raise ApiError(400, f"An app can have at most {MAX_WEBHOOKS_PER_APP} webhooks")
            await self.store.add_webhook(record.id, app_id, integration_id, records.ENCODER.encode(record).decode(),
                                         now())
            await self.sink.put_webhook(record)
        return webhook_out(self.open_webhook(record))

    async def _sealed_webhook(self, app_id: str, integration_id: str, webhook_id: str) -> records.WebhookRecord:
        await self._custom_integration(app_id, integration_id)
        row = await self.store.get_webhook(integration_id, webhook_id)
        if row is None:
            raise ApiError(404, "Webhook not found", "webhook_not_found")
        return WEBHOOK_RECORD_DECODER.decode(row["record"])

    async def webhook_record(self, app_id: str, integration_id: str, webhook_id: str) -> records.WebhookRecord:
        """A webhook of the app's custom integration, its secret opened; 404 when unknown."""
        return self.open_webhook(await self._sealed_webhook(app_id, integration_id, webhook_id))

    async def list_webhooks(self, app_id: str, integration_id: str) -> list[models.Webhook]:
        await self._custom_integration(app_id, integration_id)
        return [webhook_out(self.open_webhook(WEBHOOK_RECORD_DECODER.decode(w["record"])))
                for w in await self.store.list_webhooks(integration_id=integration_id)]

    async def update_webhook(self, app_id: str, integration_id: str, webhook_id: str,
                             body: models.WebhookUpdateBody) -> models.Webhook:
        record = await self._sealed_webhook(app_id, integration_id, webhook_id)
        models.check_webhook(body.target, body.triggers)
        if body.target is not None:
            self._check_target(body.target)
        changes: dict[str, Any] = {}
        if body.target is not None:
            changes["target"] = body.target
        if body.triggers is not None:
            changes["triggers"] = list(body.triggers)
        if body.include_full_user is not None:
            changes["include_full_user"] = body.include_full_user
        if body.include_full_source is not None:
            changes["include_full_source"] = body.include_full_source
        record = msgspec.structs.replace(record, **changes)
        async with self.store.tx():
            await self.store.set_webhook(webhook_id, records.ENCODER.encode(record).decode())
            await self.sink.put_webhook(record)
        return webhook_out(self.open_webhook(record))

    async def delete_webhook(self, app_id: str, integration_id: str, webhook_id: str) -> None:
        await self._sealed_webhook(app_id, integration_id, webhook_id)
        async with self.store.tx():
            await self.store.delete_webhook(webhook_id)
            await self.sink.delete_webhook(app_id, webhook_id)

    def _check_target(self, target: str) -> None:
        """400 for a webhook target the egress policy would never deliver to."""
        try:
            self.egress.check_url(target, purpose="business")
        except EgressRefused as exc:
            raise ApiError(400, f"webhook target: {exc}") from None

    # --- KV is a cache of the DB -----------------------------------------------------------

    async def all_records(self) -> tuple[list[records.IntegrationRecord], list[records.WebhookRecord]]:
        """Every integration and webhook record, as they must appear in KV."""
        rows, _ = await self.store.list_integrations(None, limit=1_000_000)
        integrations = [records.IntegrationRecord(
            id=r["id"], app_id=r["app_id"], type=r["type"], status=r["status"], display_name=r["display_name"],
            config=loads(r["config"])) for r in rows]
        webhooks = [WEBHOOK_RECORD_DECODER.decode(w["record"]) for w in await self.store.list_webhooks()]
        return integrations, webhooks

    async def all_apps(self) -> list[records.AppRecord]:
        """Every app record, as it must appear in the apps KV bucket."""
        rows, _ = await self.store.list_apps(None, None, 1_000_000)
        return [await self._app_record(r) for r in rows]


def _check_push_credentials(type_: str, config: dict[str, Any]) -> None:
    """400 for push credentials that could never work (caught now, not at the first push)."""
    if type_ == "ios" and (config.get("certificate") or config.get("password")):
        raise ApiError(400, "Certificate-based APNs is not supported: give keyId, teamId, bundleId and "
                            "signingKey (the .p8 key) for token-based APNs")
    key = config.get("privateKey") if type_ == "android" else config.get("signingKey") if type_ == "ios" else None
    if key is not None and (not isinstance(key, str) or "-----BEGIN PRIVATE KEY-----" not in key):
        field = "privateKey" if type_ == "android" else "signingKey"
        raise ApiError(400, f"{field} must be a PEM private key (-----BEGIN PRIVATE KEY-----)")


# What SunCo's own models require (the official client cannot parse the integration without them);
# "a|b": either field. A mailgun integration needs a server to send through and a sender address.
REQUIRED_ON_CREATE = {
    "messenger": ("appId",),
    "telegram": ("token",),
    "twilio": ("accountSid",),
    "mailgun": ("smtpHost|domain", "fromAddress|incomingAddress"),
}

# What a channel integration needs before Threadline can talk to its platform.
REQUIRED_FOR_ACTIVE = {
    "whatsapp": ("phoneNumberId", "accessToken"),
    "messenger": ("pageId", "pageAccessToken", "appSecret"),
    "telegram": ("token",),
    "twilio": ("accountSid", "authToken"),
    # Push needs these; without them the app's SDK still chats, and pushes fail visibly.
    "android": ("projectId", "clientEmail", "privateKey"),
    "ios": ("keyId", "teamId", "bundleId", "signingKey"),
    "mailgun": ("smtpHost", "fromAddress|incomingAddress"),
}


def _has(config: dict[str, Any], fields: str) -> bool:
    """Whether `config` has a value for one of the "|"-separated `fields`."""
    return any(config.get(field) for field in fields.split("|"))


def _status(type_: str, config: dict[str, Any]) -> str:
    """A channel integration is `active` only once its credentials are all there."""
    if not all(_has(config, fields) for fields in REQUIRED_FOR_ACTIVE.get(type_, ())):
        return "inactive"
    if type_ == "twilio" and not (config.get("phoneNumber") or config.get("messagingServiceSid")):
        return "inactive"
    return "active"


# The fields of each type that hold a platform API base URL Threadline calls, with the platform's
# own hosts: anything else must be the sandbox's origin or allow-listed by the operator.
PLATFORM_URL_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "whatsapp": {"baseUrl": GRAPH_HOSTS},
    "messenger": {"baseUrl": GRAPH_HOSTS},
    "telegram": {"baseUrl": TELEGRAM_HOSTS},
    "twilio": {"baseUrl": TWILIO_HOSTS},
    "android": {"tokenUri": GOOGLE_OAUTH_HOSTS, "baseUrl": FCM_HOSTS},
    "ios": {"baseUrl": APNS_HOSTS},
}


def _check_egress(egress: EgressPolicy, type_: str, config: dict[str, Any], fields: set[str] | None = None) -> None:
    """400 for a platform base URL or an SMTP server the egress policy refuses (`fields`: only
    those, when an update sets some)."""
    for name, hosts in PLATFORM_URL_FIELDS.get(type_, {}).items():
        value = config.get(name)
        if value is None or (fields is not None and name not in fields):
            continue
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be a URL")
        try:
            egress.check_url(value, purpose="platform", hosts=hosts)
        except EgressRefused as exc:
            raise ApiError(400, f"{name}: {exc}") from None
    host = config.get("smtpHost")
    if type_ == "mailgun" and isinstance(host, str) and (fields is None or fields & {"smtpHost", "smtpPort"}):
        port = config.get("smtpPort") or EMAIL_DEFAULT_PORTS.get(str(config.get("security") or "starttls"), 587)
        try:
            egress.check_host(host, int(port))
        except EgressRefused as exc:
            raise ApiError(400, f"smtpHost: {exc}") from None


# --- the `mailgun` integration (SunCo's e-mail type; Threadline sends it over SMTP) ------------

EMAIL_DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
MAILGUN_SMTP_HOST = "smtp.mailgun.org"
_EMAIL_ADDRESS = re.compile(r"^[^@\s<>\"(),;:]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,253}$")


def _check_email_settings(type_: str, config: dict[str, Any]) -> None:
    """400 for SMTP settings that could never send (caught now, not at the first notification)."""
    if type_ != "mailgun":
        return
    host = config.get("smtpHost")
    if host is not None and (not isinstance(host, str) or not _HOSTNAME.match(host)):
        raise ApiError(400, "smtpHost must be a host name or IP address")
    domain = config.get("domain")
    if domain is not None and (not isinstance(domain, str) or not _EMAIL_ADDRESS.match(f"postmaster@{domain}")):
        raise ApiError(400, "domain must be a domain name (mg.example.com)")
    incoming = config.get("incomingAddress")
    if incoming is not None and (not isinstance(incoming, str) or not _EMAIL_ADDRESS.match(incoming)):
        raise ApiError(400, "incomingAddress must be an e-mail address (name@example.com)")
    secret = config.get("inboundSecret")
    if secret is not None and (not isinstance(secret, str) or not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", secret)):
        # It is a URL path segment, and the only proof a SendGrid post carries.
        raise ApiError(400, "inboundSecret must be 16-128 letters, digits, '-' or '_'")
    port = config.get("smtpPort")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise ApiError(400, "smtpPort must be between 1 and 65535")
    address = config.get("fromAddress")
    if address is not None and (not isinstance(address, str) or not _EMAIL_ADDRESS.match(address)):
        raise ApiError(400, "fromAddress must be an e-mail address (name@example.com)")
    name = config.get("fromName")
    if name is not None and (not isinstance(name, str) or len(name) > 100 or any(c in name for c in "\r\n")):
        raise ApiError(400, "fromName must be at most 100 characters on one line")
    if config.get("username") and not config.get("password"):
        raise ApiError(400, "username needs a password (SMTP AUTH; for Mailgun's relay, the domain's SMTP "
                            "password)")


def _refuse_sealed_input(values: dict[str, Any]) -> None:
    """400 for a secret sent in Threadline's sealed form: it would be stored as if sealed here,
    never open, and stop the next key rotation (which re-seals every stored secret)."""
    for name in SEALED_CONFIG_FIELDS:
        if is_sealed(values.get(name)):
            raise ApiError(400, f"{name} must be the credential itself, not a sealed value")
