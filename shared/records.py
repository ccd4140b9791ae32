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
