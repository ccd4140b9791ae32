"""The web service's logic on decoded values: auth, validation, bus messages, socket frames.

Nothing here touches NATS or sockets, so it is unit-tested directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from shared.http import ApiError
from shared.ids import iso
from shared.messages import conversation as conv
from shared.messages.channel import InboundActivity, InboundMessage
from shared.records import IntegrationRecord
from shared.sdk import (
    MAX_CLIENT_MESSAGE_ID_LENGTH,
    MAX_TEXT_LENGTH,
    DeliveryFrame,
    Frame,
    HistoryEntry,
    IntegrationConfig,
    MessageFrame,
    MessagesPage,
    PostActivity,
    PostMessage,
    ReadFrame,
    SessionClaims,
    TypingFrame,
    sdk_message,
)
from shared.sunco import TextContent

WEB_CHANNEL = "web"
SDK_CLIENT_TYPE: Final = "sdk"
_CLIENT_MESSAGE_ID = re.compile(rf"^[A-Za-z0-9_-]{{8,{MAX_CLIENT_MESSAGE_ID_LENGTH}}}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- authentication --------------------------------------------------------------------------

def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(secret: str, token: str | None, app_id: str) -> SessionClaims:
    """The session behind `token`, which must be authentic and for `app_id` (else 401)."""
    if not token:
        raise ApiError(401, "A session token is required (Authorization: Bearer <sessionToken>)")
    claims = SessionClaims.from_token(secret, token)
    if claims is None or claims.app != app_id:
        raise ApiError(401, "Invalid session token")
    return claims


def web_integration(record: IntegrationRecord | None, app_id: str) -> IntegrationRecord:
    """The record when it is an active web integration of `app_id`, else 404 (no detail leaked)."""
    if record is None or record.app_id != app_id or record.type != "web" or record.status != "active":
        raise ApiError(404, "Integration not found")
    return record


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case with the default port dropped; None when unparsable."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_allowed(record: IntegrationRecord, origin: str | None) -> bool:
    """Whether a request from `origin` may use this integration.

    Without an `originWhitelist` every origin may. With one, a browser's Origin must be listed;
    a request without Origin (not a browser, which could send any Origin anyway) is let through.
    """
    whitelist = record.config.get("originWhitelist")
    if not whitelist or origin is None:
        return True
    if not isinstance(whitelist, list):
        return False
    wanted = normalize_origin(origin)
    return wanted is not None and any(
        isinstance(entry, str) and normalize_origin(entry) == wanted for entry in whitelist)


def check_origin(record: IntegrationRecord, origin: str | None) -> None:
    """403 unless `origin_allowed`."""
    if not origin_allowed(record, origin):
        raise ApiError(403, "Origin not allowed for this integration")


def public_config(record: IntegrationRecord) -> IntegrationConfig:
    """What the widget may know about its integration (no secrets)."""

    def text(key: str) -> str | None:
        value = record.config.get(key)
        return value if isinstance(value, str) and value else None

    return IntegrationConfig(
        integration_id=record.id,
        display_name=record.display_name or text("displayName"),
        business_name=text("businessName"),
        business_icon_url=text("businessIconUrl"),
        brand_color=text("brandColor"),
    )


# --- requests --------------------------------------------------------------------------------

def parse_cursor(raw: str | None, name: str = "after") -> int | None:
    """A non-negative integer cursor from a query parameter (absent/empty → None, bad → 400)."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, f"{name} must be a non-negative integer cursor")
    return int(raw)


def parse_limit(raw: str | None, maximum: int) -> int:
    """A page size between 1 and `maximum` (absent → maximum)."""
    if raw is None or raw == "":
        return maximum
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise ApiError(400, f"limit must be an integer between 1 and {maximum}")
    return int(raw)


def validate_post_message(body: PostMessage) -> PostMessage:
    """400 for an unusable client message id or text (empty, or over 4096 characters)."""
    if not _CLIENT_MESSAGE_ID.match(body.client_message_id):
        raise ApiError(400, "clientMessageId must be 8-128 characters of [A-Za-z0-9_-] (a UUID)")
    if not body.text.strip():
        raise ApiError(400, "text must not be empty")
    if len(body.text) > MAX_TEXT_LENGTH:
        raise ApiError(400, f"text must be at most {MAX_TEXT_LENGTH} characters")
    return body


def inbound_msg_id(client_message_id: str) -> str:
    """The Nats-Msg-Id of a customer message: a retried POST is de-duplicated by JetStream."""
    return f"{WEB_CHANNEL}:{client_message_id}"


def inbound_message(claims: SessionClaims, conversation_id: str, body: PostMessage, now: float,
                    client_info: dict[str, Any] | None = None) -> InboundMessage:
    """The normalized inbound message for a customer's post."""
    return InboundMessage(
        app_id=claims.app, integration_id=claims.integration, channel=WEB_CHANNEL,
        client_type=SDK_CLIENT_TYPE, channel_user_id=claims.channel_user_id,
        provider_message_id=body.client_message_id, received_at=now,
        content=TextContent(text=body.text), client_info=client_info or {},
        user_id=claims.user, client_id=claims.client, conversation_id=conversation_id,
    )


def inbound_activity(claims: SessionClaims, conversation_id: str, body: PostActivity, now: float) -> InboundActivity:
    """The normalized typing/read activity for a customer's post."""
    return InboundActivity(
        app_id=claims.app, integration_id=claims.integration, channel=WEB_CHANNEL,
        user_id=claims.user, client_id=claims.client, conversation_id=conversation_id,
        activity=body.type, at=now,
    )


# --- replies from conversations --------------------------------------------------------------

def conversation_reply(data: bytes) -> conv.ConversationRequestUnion:
    """Decode a reply of `conversations`; a ConversationError becomes the matching ApiError."""
    try:
        reply = conv.decode_request(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError(503, "Unexpected answer from conversations") from exc
    if isinstance(reply, conv.ConversationError):
        status = reply.status if 400 <= reply.status < 600 else 503
        raise ApiError(status, reply.title, reply.code)
    return reply


def history_entries(page: conv.HistoryPage) -> list[HistoryEntry]:
    """The page's messages as the SDK shows them, oldest first."""
    entries = [HistoryEntry(cursor=m.cursor, message=sdk_message(m.message)) for m in page.messages]
    entries.sort(key=lambda e: e.cursor)
    return entries


def business_last_read(page: conv.HistoryPage) -> str | None:
    """When the business last read the conversation (ISO), if it did."""
    return iso(page.business_last_read) if page.business_last_read is not None else None


def messages_page(page: conv.HistoryPage) -> MessagesPage:
    """The HTTP answer for a history page."""
    return MessagesPage(messages=history_entries(page), has_more=page.has_more,
                        business_last_read=business_last_read(page))


# --- socket frames ---------------------------------------------------------------------------

_DELIVERY_STATUS = {"channel": "sent", "user": "delivered", "failure": "failed"}


def event_frame(event: conv.ConversationUnion) -> Frame | None:
    """The socket frame for a conversation event, or None when the widget need not see it.

    The customer's own typing/read activity is not echoed back; only the business's is.
    """
    if isinstance(event, conv.MessageCreated):
        return MessageFrame(cursor=event.cursor, message=sdk_message(event.message))
    if isinstance(event, conv.ActivityPosted):
        author = event.activity.author
        if author is not None and author.type != "business":
            return None
        if event.activity.type == "conversation:read":
            return ReadFrame(at=iso(event.created_at), author=author)
        return TypingFrame(active=event.activity.type == "typing:start", author=author)
    if isinstance(event, conv.DeliveryReported):
        status = "read" if event.read else _DELIVERY_STATUS[event.kind]
        return DeliveryFrame(message_id=event.message_id, status=status)  # type: ignore[arg-type]
    return None


@dataclass
class CursorWatermark:
    """De-duplicates message frames by cursor: every cursor at or below `high` was sent.

    Events of one conversation are published in cursor order, so a watermark is enough and
    costs one integer per socket.
    """

    high: int = 0

    def admit(self, cursor: int) -> bool:
        """True (and advance) when `cursor` was not sent yet."""
        if cursor <= self.high:
            return False
        self.high = cursor
        return True
