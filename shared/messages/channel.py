"""The `channel` family: what channel services publish (inbound, statuses) and consume (sends)."""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from shared import subjects
from shared.messages import tags_of
from shared.sunco import ActivityType, ClientType, Content


class ChannelMessage(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of the channel family."""


class Postback(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A button/quick-reply tap: `payload` is the id the business gave the button."""

    payload: str
    text: str = ""


class InboundMessage(ChannelMessage, tag="channel.inbound.message", kw_only=True):
    """A customer's message, normalized by the channel service that received it."""

    app_id: str
    integration_id: str
    channel: str
    client_type: ClientType
    # The customer's id on the channel (WhatsApp BSUID or wa_id, SDK client id, …).
    channel_user_id: str
    provider_message_id: str
    received_at: float
    content: Content
    display_name: str | None = None
    client_info: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    # Set when the channel already knows who this is (an SDK session).
    user_id: str | None = None
    client_id: str | None = None
    conversation_id: str | None = None
    postback: Postback | None = None
    quoted_provider_message_id: str | None = None
    # A handoff code or deep-link referral carried invisibly by the channel (Telegram start, m.me ref).
    referral: str | None = None
    # What the channel knows of the message that the business may want (SunCo message metadata:
    # flat strings, numbers, booleans), e.g. an e-mail's subject and sender authentication.
    metadata: dict[str, str | int | float | bool] | None = None


class InboundActivity(ChannelMessage, tag="channel.inbound.activity", kw_only=True):
    """Typing or read state from a customer's client."""

    app_id: str
    integration_id: str
    channel: str
    user_id: str
    client_id: str
    conversation_id: str
    activity: ActivityType
    at: float


DeliveryState = Literal["sent", "delivered", "read", "failed"]


class DeliveryStatus(ChannelMessage, tag="channel.delivery.status", kw_only=True):
    """What a platform said about a message the gateway sent."""

    app_id: str
    integration_id: str
    channel: str
    provider_message_id: str
    status: DeliveryState
    timestamp: float
    # Known when the status comes from the send call itself; statuses from webhooks carry
    # only the provider id and `conversations` maps it.
    message_id: str | None = None
    conversation_id: str | None = None
    error_code: str | None = None
    error_title: str | None = None
    error_details: str | None = None
    raw: dict[str, Any] = {}


class OutboundSend(ChannelMessage, tag="channel.outbound.send", kw_only=True):
    """A business message to deliver to one client on one channel."""

    app_id: str
    integration_id: str
    channel: str
    conversation_id: str
    message_id: str
    user_id: str
    client_id: str
    recipient: str
    recipient_info: dict[str, Any] = {}
    content: Content
    schema: str | None = None
    override: dict[str, Any] | None = None
    quoted_provider_message_id: str | None = None
    # When the message was created (unix seconds; 0 = unknown): lets a channel wait relative
    # to it (the app channel pushes only if no socket delivered the message meanwhile).
    created_at: float = 0.0


BusinessActivity = Literal["typing:start", "typing:stop", "conversation:read"]


class OutboundActivity(ChannelMessage, tag="channel.outbound.activity", kw_only=True):
    """The business is typing, stopped, or read the conversation: shown to one client on one
    channel where the platform can show it (best effort: never retried, never reported)."""

    app_id: str
    integration_id: str
    channel: str
    conversation_id: str
    user_id: str
    client_id: str
    recipient: str
    recipient_info: dict[str, Any] = {}
    activity: BusinessActivity
    # The customer's latest message on this channel (WhatsApp marks that one read, and shows
    # typing in reply to it).
    last_provider_message_id: str | None = None
    created_at: float = 0.0


ChannelUnion = InboundMessage | InboundActivity | DeliveryStatus | OutboundSend | OutboundActivity

ENCODER = msgspec.json.Encoder()
DECODER: msgspec.json.Decoder[ChannelUnion] = msgspec.json.Decoder(ChannelUnion)
# The message types this version knows (`shared.bus.refusal`).
TYPES: Final = tags_of(ChannelUnion)


def encode(message: ChannelMessage) -> bytes:
    """Encode a channel-family message."""
    return ENCODER.encode(message)


def decode(data: bytes) -> ChannelUnion:
    """Decode a channel-family message (raises msgspec.ValidationError on a bad one)."""
    return DECODER.decode(data)


def sender_of(message: InboundMessage | InboundActivity) -> str:
    """Who an inbound message is from, as its partition and ordering key use it: the channel's
    user id, else the Threadline user id (SDK activity)."""
    return getattr(message, "channel_user_id", "") or message.user_id or ""


def subject_of(message: ChannelUnion) -> str:
    """The stream subject a channel message is published on (its partition from its ordering key:
    a business activity is ordered with the sends to its recipient)."""
    if isinstance(message, DeliveryStatus):
        return subjects.status_subject(message.channel, message.integration_id, message.provider_message_id)
    if isinstance(message, OutboundSend | OutboundActivity):
        return subjects.outbound_subject(message.channel, message.integration_id, message.recipient)
    return subjects.inbound_subject(message.channel, message.integration_id, sender_of(message))
