"""Configuration records that `conversations` owns and publishes to KV buckets for other services.

Channel services read integration credentials, and `webhooks` reads webhook targets, from an
in-memory mirror of these buckets (`shared.bus.KvMirror`), so the hot path never asks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec

from shared.encryption import Keyring, SecretsError, is_sealed
from shared.sunco import IntegrationType, SwitchboardIntegrationRef

log = logging.getLogger(__name__)


class IntegrationRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One channel integration as the channel services need it.

    `config` holds the type's fields in SunCo camelCase, secrets included, e.g. for
    `whatsapp`: phoneNumberId, phoneNumber, accessToken, appSecret, verifyToken, apiVersion,
    baseUrl (the Graph API base; the sandbox's fake in the sandbox). In KV (and in the
    database) the secrets are sealed (`shared.encryption`); `integration_decoder` opens them.
    """

    id: str
    app_id: str
    type: IntegrationType
    status: str = "active"
    display_name: str | None = None
    config: dict[str, Any] = {}


class WebhookRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One business webhook: where to POST which triggers, with which secret (sealed in KV and
    in the database; `webhook_decoder` opens it)."""

    id: str
    app_id: str
    integration_id: str
    target: str
    triggers: list[str]
    secret: str
    version: str = "v2"
    include_full_user: bool = False
    include_full_source: bool = False


def webhook_key(app_id: str, webhook_id: str) -> str:
    """KV key of a webhook record (app first, so one app's webhooks share a prefix)."""
    return f"{app_id}.{webhook_id}"


INTEGRATION_DECODER = msgspec.json.Decoder(IntegrationRecord)
WEBHOOK_DECODER = msgspec.json.Decoder(WebhookRecord)
ENCODER = msgspec.json.Encoder()


def integration_context(integration_id: str) -> str:
    """What an integration's sealed config fields are bound to (plus `:<field>`)."""
    return f"integration:{integration_id}"


def webhook_secret_context(webhook_id: str) -> str:
    """What a webhook's sealed secret is bound to."""
    return f"webhook:{webhook_id}:secret"


def open_integration(record: IntegrationRecord, keyring: Keyring) -> IntegrationRecord:
    """`record` with its sealed config fields opened.

    A field that does not open is left out (and logged unless the keyring is empty: a service
    given no key, such as `web`, needs no secret), so a send fails on a missing credential
    rather than with ciphertext.
    """
    if not any(is_sealed(v) for v in record.config.values()):
        return record
    context = integration_context(record.id)
    config: dict[str, Any] = {}
    for name, value in record.config.items():
        if not is_sealed(value):
            config[name] = value
            continue
        try:
            config[name] = keyring.open(value, f"{context}:{name}")
        except SecretsError as exc:
            if keyring.keys:
                log.error("integration %s: %s does not open: %s", record.id, name, exc)
    return msgspec.structs.replace(record, config=config)


def integration_decoder(keyring: Keyring) -> Callable[[bytes], IntegrationRecord]:
    """Decode an integrations KV value and open its secrets with `keyring`."""

    def decode(data: bytes) -> IntegrationRecord:
        return open_integration(INTEGRATION_DECODER.decode(data), keyring)

    return decode


def webhook_decoder(keyring: Keyring) -> Callable[[bytes], WebhookRecord]:
    """Decode a webhooks KV value and open its secret with `keyring` (raises SecretsError when
    it does not open: a webhook delivered without its secret would be unverifiable)."""

    def decode(data: bytes) -> WebhookRecord:
        record = WEBHOOK_DECODER.decode(data)
        if not is_sealed(record.secret):
            return record
        return msgspec.structs.replace(record, secret=keyring.open(record.secret, webhook_secret_context(record.id)))

    return decode


# --- apps (written by `conversations` to `subjects.APPS_BUCKET`, read by `notifications`) --------

class QuietHours(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """No notification between `start` and `end` ("HH:MM", local time of `timezone`, an IANA
    name); one that falls due then is postponed to `end`. `start` > `end` spans midnight."""

    start: str
    end: str
    timezone: str = "UTC"


class WhatsappTemplate(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """An approved WhatsApp template. `parameters` names what fills the body's {{1}}, {{2}}, …:
    `text` (the reply, truncated), `link` (back into the conversation), `business`, `code` (an
    opt-in's confirmation code)."""

    name: str
    language: str = "en_US"
    namespace: str | None = None
    parameters: list[str] | None = None


class NotificationTemplates(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    # Used outside WhatsApp's 24 h window for away notifications.
    whatsapp: WhatsappTemplate | None = None
    # Used to send an opt-in's confirmation code on WhatsApp (default: `whatsapp` with the code).
    whatsapp_opt_in: WhatsappTemplate | None = None


class NotificationSettings(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """Threadline extension `settings.notifications` of an app (away notifications).

    `delaySeconds` None = the service's default (THREADLINE_NOTIFY_DEFAULT_DELAY_SECONDS).
    """

    enabled: bool = True
    delay_seconds: int | None = None
    quiet_hours: QuietHours | None = None
    templates: NotificationTemplates | None = None


class SwitchboardIntegrationRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One member of an app's switchboard: the integration (custom, by id) or integration type
    (e.g. `desk`) that handles a conversation while it is in control."""

    id: str
    name: str
    integration_type: str
    integration_id: str | None = None
    deliver_standby_events: bool = False
    next_switchboard_integration_id: str | None = None
    message_history_count: int | None = None

    def ref(self) -> SwitchboardIntegrationRef:
        """How a conversation's `activeSwitchboardIntegration` names it."""
        return SwitchboardIntegrationRef(id=self.id, name=self.name, integration_id=self.integration_id,
                                         integration_type=self.integration_type)


class SwitchboardRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An app's switchboard: who gets a conversation's events, and who starts in control."""

    id: str
    enabled: bool = False
    default_switchboard_integration_id: str | None = None
    integrations: list[SwitchboardIntegrationRecord] = []

    def integration(self, switchboard_integration_id: str | None) -> SwitchboardIntegrationRecord | None:
        """The member with this id, if there is one."""
        return next((i for i in self.integrations if i.id == switchboard_integration_id), None)

    def has_member_of_type(self, integration_type: str) -> bool:
        """Whether a member is of this integration type (e.g. `desk`)."""
        return any(member.integration_type == integration_type for member in self.integrations)

    def ref(self, switchboard_integration_id: str) -> SwitchboardIntegrationRef:
        """How a conversation names a member: in full, or by its id alone once it is deleted."""
        member = self.integration(switchboard_integration_id)
        return member.ref() if member is not None else SwitchboardIntegrationRef(id=switchboard_integration_id)


class AppRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One app as other services need it: its name, its settings (SunCo camelCase keys) and
    its switchboard."""

    id: str
    display_name: str
    settings: dict[str, Any] = {}
    switchboard: SwitchboardRecord | None = None

    def active_switchboard(self) -> SwitchboardRecord | None:
        """The app's switchboard when it routes events (enabled), else None."""
        return self.switchboard if self.switchboard is not None and self.switchboard.enabled else None

    def notification_settings(self) -> NotificationSettings:
        """The app's `settings.notifications` (defaults when absent or unreadable)."""
        raw = self.settings.get("notifications")
        if not isinstance(raw, dict):
            return NotificationSettings()
        try:
            return msgspec.convert(raw, NotificationSettings)
        except msgspec.ValidationError:
            return NotificationSettings()


APP_DECODER = msgspec.json.Decoder(AppRecord)


def integrations_where(values: Iterable[object], integration_type: str, field: str, value: str,
                       ) -> Iterator[IntegrationRecord]:
    """The integration records of `integration_type` whose config `field` is `value` (a Meta
    app's webhook names its Page or business number, not our integration)."""
    for record in list(values):
        if (isinstance(record, IntegrationRecord) and record.type == integration_type
                and record.config.get(field) == value):
            yield record
