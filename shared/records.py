"""Configuration records that `conversations` owns and publishes to KV buckets for other services.

Channel services read integration credentials, and `webhooks` reads webhook targets, from an
in-memory mirror of these buckets (`shared.bus.KvMirror`), so the hot path never asks.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.sunco import IntegrationType


class IntegrationRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One channel integration as the channel services need it.

    `config` holds the type's fields in SunCo camelCase, secrets included, e.g. for
    `whatsapp`: phoneNumberId, phoneNumber, accessToken, appSecret, verifyToken, apiVersion,
    baseUrl (the Graph API base; the sandbox's fake in the sandbox).
    """

    id: str
    app_id: str
    type: IntegrationType
    status: str = "active"
    display_name: str | None = None
    config: dict[str, Any] = {}


class WebhookRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One business webhook: where to POST which triggers, with which secret."""

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


class AppRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One app as other services need it: its name and its settings (SunCo camelCase keys)."""

    id: str
    display_name: str
    settings: dict[str, Any] = {}

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
