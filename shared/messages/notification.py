"""The `notification` family: request/reply with the `notifications` service.

Opt-ins: from the widget a customer asks to be notified by e-mail, SMS or WhatsApp when the
business replies while they are away. A one-time code is sent to the address and typed back in
the widget to confirm it; STOP on the channel (or the opt-out link) ends it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

OptInChannel = Literal["email", "whatsapp", "twilio"]
OptInStatus = Literal["pending", "confirmed", "stopped"]
# The integration type a notification channel goes out through, where the names differ: e-mail
# uses SunCo's e-mail integration type, `mailgun` (Threadline sends it over SMTP).
CHANNEL_INTEGRATION_TYPES: dict[str, str] = {"email": "mailgun"}
INTEGRATION_CHANNELS: dict[str, str] = {v: k for k, v in CHANNEL_INTEGRATION_TYPES.items()}


def integration_type_of(channel: str) -> str:
    """The integration type a notification channel is sent through (`email` → `mailgun`)."""
    return CHANNEL_INTEGRATION_TYPES.get(channel, channel)


def channel_of(integration_type: str) -> str:
    """The notification channel an integration type serves (`mailgun` → `email`)."""
    return INTEGRATION_CHANNELS.get(integration_type, integration_type)


class NotificationMessage(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of the requests and replies exchanged with `notifications`."""


class StartOptIn(NotificationMessage, tag="notification.optin.start"):
    """Send a confirmation code to `address` (an e-mail address or an E.164 number)."""

    app_id: str
    user_id: str
    conversation_id: str
    channel: OptInChannel
    address: str
    # Integration of that channel to use; None → the app's first active one of that type.
    integration_id: str | None = None
    # The SDK integration the customer asked from (for the link back into the conversation).
    source_integration_id: str | None = None
    # Where the request came from (the client's address behind trusted proxies, the page's
    # normalized Origin): opt-ins are rate-limited per source. None when the caller has none.
    client_ip: str | None = None
    origin: str | None = None


class ConfirmOptIn(NotificationMessage, tag="notification.optin.confirm"):
    app_id: str
    user_id: str
    opt_in_id: str
    code: str
    # The SDK client that typed the code: it proved it reads this address (an SDK login keeps
    # such a client with the session, shared/messages/identity.LoginUser).
    client_id: str | None = None


class ListOptIns(NotificationMessage, tag="notification.optin.list"):
    app_id: str
    user_id: str


class StopOptIn(NotificationMessage, tag="notification.optin.stop"):
    app_id: str
    user_id: str
    opt_in_id: str


class OptInState(NotificationMessage, tag="notification.optin.state"):
    """One opt-in as the customer may see it (the address masked, e.g. `+1•••••4567`)."""

    opt_in_id: str
    channel: OptInChannel
    masked_address: str
    status: OptInStatus
    expires_at: float | None = None  # a pending code's expiry (unix seconds)


class OptInsReply(NotificationMessage, tag="notification.optins"):
    opt_ins: list[OptInState]


class NotificationError(NotificationMessage, tag="notification.error"):
    status: int
    code: str
    title: str
    retry_after: int | None = None  # seconds, on a 429 (the HTTP Retry-After)


class ExportUserData(NotificationMessage, tag="notification.user.export"):
    """Everything `notifications` holds about a user, for an access request (answers UserData)."""

    app_id: str
    user_id: str
    # The most recent sends given (notifications and codes sent to the user).
    max_sends: int = 500


class OptInRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An opt-in as stored: the address in full (the export is for its owner)."""

    id: str
    channel: str
    address: str
    status: str
    conversation_id: str
    integration_id: str
    created_at: float
    confirmed_at: float | None = None
    stopped_at: float | None = None


class SendRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A notification or confirmation code sent to the user."""

    id: str
    channel: str
    recipient: str
    kind: str
    status: str
    conversation_id: str
    created_at: float


class UserData(NotificationMessage, tag="notification.user.data"):
    opt_ins: list[OptInRecord] = []
    sends: list[SendRecord] = []
    # More sends exist than were given (`ExportUserData.max_sends`).
    sends_truncated: bool = False


NotificationUnion = (
    StartOptIn | ConfirmOptIn | ListOptIns | StopOptIn | OptInState | OptInsReply | NotificationError
    | ExportUserData | UserData
)
ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[NotificationUnion] = msgspec.json.Decoder(NotificationUnion)


def decode(data: bytes) -> NotificationUnion:
    """Decode a request or reply exchanged with `notifications`."""
    return DECODER.decode(data)


# Sends made by `notifications` (away notifications, opt-in codes) carry message ids with this
# prefix: their delivery statuses are `notifications`' to follow, not a conversation message's.
NOTIFICATION_ID_PREFIX = "ntf_"


def is_notification_id(message_id: str | None) -> bool:
    """True for the message id of a send made by `notifications`."""
    return bool(message_id) and str(message_id).startswith(NOTIFICATION_ID_PREFIX)
