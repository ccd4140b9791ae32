"""The widget's "Notify me" opt-in, web side: which channels the customer may choose, the SDK
bodies and answers of the opt-in endpoints, and the mapping to the `notifications` requests.

`notifications` owns the opt-ins (codes, confirmation, STOP); `web` only authenticates the
session, validates the input and relays. Pure functions on decoded values (unit-testable).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, Literal

from shared.http import ApiError
from shared.ids import iso
from shared.messages import notification
from shared.records import IntegrationRecord
from shared.sunco import Wire

# Integration types a customer may be notified on, in the order the widget offers them; the
# widget names each by its opt-in channel (`mailgun` → `email`, see notification.channel_of).
NOTIFY_TYPES: Final = ("mailgun", "twilio", "whatsapp")
MAX_ADDRESS_LENGTH: Final = 254
MAX_CODE_LENGTH: Final = 12
MAX_ORIGIN_LENGTH: Final = 256
_EMAIL = re.compile(r"^[^@\s<>\"(),;:]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+$")
_PHONE_SEPARATORS = re.compile(r"[\s().-]")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_OPT_IN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NotifyChannel(Wire, kw_only=True):
    """One channel the widget offers under "Notify me"; `type` is the opt-in channel (`email`,
    `twilio`, `whatsapp`), what the widget sends back as `channel`."""

    integration_id: str
    type: str
    display_name: str | None = None


class OptInBody(Wire, kw_only=True):
    """Body of `POST …/conversations/{id}/notificationOptIns`."""

    channel: Literal["email", "whatsapp", "twilio", "sms"]
    address: str
    integration_id: str | None = None


class ConfirmBody(Wire, kw_only=True):
    """Body of `POST …/notificationOptIns/{optInId}/confirm`."""

    code: str


def notify_channels(app_id: str, records: Iterable[object]) -> list[NotifyChannel]:
    """The app's active integrations a customer may be notified on (NOTIFY_TYPES order, then id)."""
    found = [r for r in records if isinstance(r, IntegrationRecord) and r.app_id == app_id
             and r.status == "active" and r.type in NOTIFY_TYPES]
    found.sort(key=lambda r: (NOTIFY_TYPES.index(r.type), r.id))
    return [NotifyChannel(integration_id=r.id, type=notification.channel_of(r.type), display_name=r.display_name)
            for r in found]


def normalized_address(channel: str, address: str) -> str:
    """The address in the form `notifications` expects (lower-case e-mail, E.164 number); 400 if unusable."""
    value = address.strip()
    if not value or len(value) > MAX_ADDRESS_LENGTH:
        raise ApiError(400, "address must be 1 to 254 characters")
    if channel == "email":
        if not _EMAIL.match(value):
            raise ApiError(400, "address must be an e-mail address (name@example.com)")
        local, _, domain = value.rpartition("@")
        return f"{local}@{domain.lower()}"
    number = _PHONE_SEPARATORS.sub("", value)
    if number.startswith("00"):
        number = "+" + number[2:]
    if not _E164.match(number):
        raise ApiError(400, "address must be a phone number with its country code (+15551234567)")
    return number


def start_request(app_id: str, user_id: str, conversation_id: str, source_integration_id: str,
                  body: OptInBody, records: Iterable[object], *, client_ip: str | None = None,
                  origin: str | None = None) -> notification.StartOptIn:
    """The StartOptIn for a validated body; 404 when the named integration is not a notify channel.

    `client_ip` and `origin` name the request's source, which `notifications` rate-limits."""
    channel: notification.OptInChannel = "twilio" if body.channel == "sms" else body.channel
    offered = [c for c in notify_channels(app_id, records) if c.type == channel]
    if body.integration_id is not None and body.integration_id not in {c.integration_id for c in offered}:
        raise ApiError(404, f"Integration {body.integration_id} not found")
    if not offered:
        raise ApiError(400, f"This app cannot notify by {channel}")
    return notification.StartOptIn(
        app_id=app_id, user_id=user_id, conversation_id=conversation_id, channel=channel,
        address=normalized_address(channel, body.address), integration_id=body.integration_id,
        source_integration_id=source_integration_id, client_ip=client_ip, origin=origin)


def check_code(body: ConfirmBody) -> str:
    """The confirmation code, stripped; 400 when empty or absurdly long."""
    code = body.code.strip().replace(" ", "")
    if not code or len(code) > MAX_CODE_LENGTH:
        raise ApiError(400, "code must be the code you received")
    return code


def check_opt_in_id(opt_in_id: str) -> str:
    """404 for an id that cannot exist (never sent on to `notifications`)."""
    if not _OPT_IN_ID.match(opt_in_id):
        raise ApiError(404, "Opt-in not found")
    return opt_in_id


def opt_in_wire(state: notification.OptInState) -> dict[str, Any]:
    """An opt-in as the widget sees it (camelCase, ISO expiry)."""
    out: dict[str, Any] = {"id": state.opt_in_id, "channel": state.channel, "maskedAddress": state.masked_address,
                           "status": state.status}
    if state.expires_at is not None:
        out["expiresAt"] = iso(state.expires_at)
    return out


def reply_or_error(reply: notification.NotificationUnion) -> notification.NotificationUnion:
    """`reply` unless it is a NotificationError, which becomes the matching ApiError."""
    if isinstance(reply, notification.NotificationError):
        status = reply.status if 400 <= reply.status < 600 else 503
        headers = {"Retry-After": str(reply.retry_after)} if reply.retry_after else None
        raise ApiError(status, reply.title, reply.code, headers)
    return reply
