"""The server side of the SDK protocol (`shared.sdk`), shared by the `web` and `app` services.

`SdkService` serves sessions, history, message and activity posts, file uploads and the
realtime socket under a path prefix; a subclass says which integrations it serves, what it
checks on each request (the web checks Origin), what a session body carries (the app registers
a device) and what to do when a business message reached a socket (the app skips the push).

One core NATS subscription on every conversation event per process (`EventHub`, held while a
socket listens) fans events out to the sockets of their conversation; a socket replays history
from its `after` cursor first, de-duplicating by cursor, so a reconnecting client gets every
missed message once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import re
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from shared import metrics, subjects
from shared.bus import Bus, KvMirror, RequestFailed
from shared.clientip import Network, client_ip, env_trusted_proxies, source_key
from shared.config import CommonConfig, ConfigError, Rate, env_float, env_int, env_rates, env_secret, env_str
from shared.encryption import Keyring
from shared.http import (
    ApiError,
    Handler,
    error_response,
    is_websocket_upgrade,
    json_response,
    read_json,
    server_span,
)
from shared.ids import iso, new_id, now
from shared.media import (
    ALLOWED_TYPES,
    MAX_ATTACHMENT_BYTES,
    attachment_url,
    normal_type,
    parse_attachment_url,
    safe_filename,
)
from shared.messages import channel, identity, sdk_presence
from shared.messages import conversation as conv
from shared.messages.channel import InboundActivity, InboundMessage, Postback
from shared.objectstore import ObjectStore
from shared.presence import PresenceBoard
from shared.ratelimit import SharedLimiter
from shared.records import INTEGRATION_DECODER, IntegrationRecord, integration_decoder, open_integration
from shared.render import form_response_text
from shared.sdk import (
    HISTORY_PAGE_LIMIT,
    MAX_ALT_TEXT_LENGTH,
    MAX_CLIENT_MESSAGE_ID_LENGTH,
    MAX_FORM_EMAIL_LENGTH,
    MAX_FORM_FIELDS,
    MAX_FORM_LABEL_LENGTH,
    MAX_FORM_TEXT_LENGTH,
    MAX_LOCATION_TEXT_LENGTH,
    MAX_MEDIA_URL_LENGTH,
    MAX_PAYLOAD_LENGTH,
    MAX_TEXT_LENGTH,
    AttachmentUploaded,
    ChannelFrame,
    DeliveryFrame,
    ErrorFrame,
    Frame,
    HistoryEntry,
    LoginBody,
    LoginResult,
    MessageAccepted,
    MessageFrame,
    MessagesPage,
    PostActivity,
    PostFormResponse,
    PostLocation,
    PostMedia,
    PostMessage,
    ReadFrame,
    ReadyFrame,
    RefreshBody,
    SessionBody,
    SessionClaims,
    SessionCreated,
    SessionStarted,
    TokenType,
    TypingFrame,
    UploadedAttachment,
    encode_frame,
    ping_frame,
    sdk_message,
)
from shared.service import ServiceApp
from shared.sunco import (
    Content,
    FileContent,
    FormField,
    FormResponseContent,
    ImageContent,
    LocationContent,
    LocationCoordinates,
    LocationInfo,
    TextContent,
)
from shared.tasks import cancel_and_wait
from shared.telemetry import extract_context, log_fields, tracer
from shared.untrusted import is_email_address
from shared.uploads import receive_source

log = logging.getLogger(__name__)
PostMessageT = TypeVar("PostMessageT", bound=PostMessage)
_tracer = tracer(__name__)

SDK_CLIENT_TYPE: Final = "sdk"
SANDBOX_SDK_TOKEN_SECRET: Final = "sandbox-sdk-token-secret-not-for-production"
# Close codes a client should not retry with the same session (4000 + HTTP status).
SOCKET_CLOSE_BASE: Final = 4000
# What a socket's client sent when the connection ends.
_SOCKET_ENDS: Final = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})
# The idle-socket pinger wakes this often and pings the slice of sockets due.
PING_TICK_SECONDS: Final = 0.1
# How long the event hub stays subscribed after its last socket closed (`EventHub`).
HUB_LINGER_SECONDS: Final = 60.0
MAX_SOCKET_QUERY_FIELDS: Final = 16
_CLIENT_MESSAGE_ID = re.compile(rf"^[A-Za-z0-9_-]{{8,{MAX_CLIENT_MESSAGE_ID_LENGTH}}}$")
_KV_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Error code of a pending session's calls that need its conversation (409).
NOT_STARTED: Final = "conversation_not_started"
MAX_ORIGIN_KEY_LENGTH: Final = 256


# --- settings --------------------------------------------------------------------------------

# What a customer may upload by default (`THREADLINE_SDK_MAX_UPLOAD_BYTES`).
DEFAULT_SDK_MAX_UPLOAD_BYTES: Final = 25 * 1024 * 1024

# Limits are counted in `subjects.SDK_LIMITS_BUCKET`, whose entries live this long: no window
# may be longer.
MAX_LIMIT_WINDOW_SECONDS: Final = 24 * 3600


def env_limit(name: str, default: str, env: Mapping[str, str]) -> tuple[Rate, ...]:
    """A rate limit such as `20/m,200/h` (`off`: no limit); windows up to 24 hours."""
    if env_str(name, default, env).strip().lower() == "off":
        return ()
    rates = env_rates(name, default, env)
    if any(rate.window_seconds > MAX_LIMIT_WINDOW_SECONDS for rate in rates):
        raise ConfigError(f"{name}: windows may be at most 24h")
    return rates


@dataclass(frozen=True)
class SdkLimits:
    """How often new sessions and link requests may come, per source and per app.

    A session costs nothing until its first message creates a user, but each one can create
    one: sessions are the budget for anonymous users. Per client address (`client_ip`, behind
    trusted proxies only), per (app, Origin) — a request without Origin is one more origin —
    and per app; link requests per session user as well.
    """

    sessions_per_ip: tuple[Rate, ...] = ()
    sessions_per_origin: tuple[Rate, ...] = ()
    sessions_per_app: tuple[Rate, ...] = ()
    links_per_user: tuple[Rate, ...] = ()
    links_per_ip: tuple[Rate, ...] = ()
    links_per_origin: tuple[Rate, ...] = ()
    links_per_app: tuple[Rate, ...] = ()
    # Files the customer uploads (`POST …/attachments`): per session client, address and app.
    uploads_per_client: tuple[Rate, ...] = ()
    uploads_per_ip: tuple[Rate, ...] = ()
    uploads_per_app: tuple[Rate, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SdkLimits:
        """`THREADLINE_SDK_SESSIONS_PER_IP|_PER_ORIGIN|_PER_APP`, `THREADLINE_SDK_LINKS_PER_USER|_PER_IP|…`,
        `THREADLINE_SDK_UPLOADS_PER_CLIENT|_PER_IP|_PER_APP`."""
        return cls(
            sessions_per_ip=env_limit("THREADLINE_SDK_SESSIONS_PER_IP", "30/m,300/h", env),
            sessions_per_origin=env_limit("THREADLINE_SDK_SESSIONS_PER_ORIGIN", "600/m,10000/h", env),
            sessions_per_app=env_limit("THREADLINE_SDK_SESSIONS_PER_APP", "1200/m,30000/h", env),
            links_per_user=env_limit("THREADLINE_SDK_LINKS_PER_USER", "5/m,30/h", env),
            links_per_ip=env_limit("THREADLINE_SDK_LINKS_PER_IP", "20/m,200/h", env),
            links_per_origin=env_limit("THREADLINE_SDK_LINKS_PER_ORIGIN", "300/m,5000/h", env),
            links_per_app=env_limit("THREADLINE_SDK_LINKS_PER_APP", "600/m,10000/h", env),
            uploads_per_client=env_limit("THREADLINE_SDK_UPLOADS_PER_CLIENT", "10/m,100/h", env),
            uploads_per_ip=env_limit("THREADLINE_SDK_UPLOADS_PER_IP", "30/m,300/h", env),
            uploads_per_app=env_limit("THREADLINE_SDK_UPLOADS_PER_APP", "600/m,20000/h", env),
        )


@dataclass(frozen=True)
class SdkSettings:
    """What an SDK service needs to run the protocol."""

    # Signs session tokens (THREADLINE_SDK_TOKEN_SECRET, shared by web and app); rotating it
    # logs every SDK client out.
    token_secret: str
    # Seconds between heartbeat pings on each socket.
    ping_interval: float
    # Frames a slow socket may have queued before it is closed (the client resumes by cursor).
    socket_queue_size: int
    # Seconds to wait for identity / conversations to answer.
    request_timeout: float
    # Lifetimes: a session token (bearer, in socket URLs) lives `token_ttl`; the refresh token
    # that renews it `refresh_ttl` (renewed by each refresh: a visitor who comes back within it
    # keeps the session); `session_max_age` > 0 ends every session that long after it started.
    token_ttl: float = 24 * 3600
    refresh_ttl: float = 30 * 86400
    session_max_age: float = 0
    limits: SdkLimits = SdkLimits()
    # Proxies whose X-Forwarded-For names the client (THREADLINE_TRUSTED_PROXIES).
    trusted_proxies: tuple[Network, ...] = ()
    # The largest file a customer may upload (THREADLINE_SDK_MAX_UPLOAD_BYTES; at most the 50 MB
    # of any attachment).
    max_upload_bytes: int = DEFAULT_SDK_MAX_UPLOAD_BYTES

    @classmethod
    def from_env(cls, common: CommonConfig, prefix: str, env: Mapping[str, str]) -> SdkSettings:
        """Read `THREADLINE_SDK_*` (token secret and lifetimes, limits, upload size),
        `THREADLINE_TRUSTED_PROXIES` and `<prefix>_PING_INTERVAL|_SOCKET_QUEUE|_REQUEST_TIMEOUT`."""
        settings = cls(
            token_secret=env_secret("THREADLINE_SDK_TOKEN_SECRET", sandbox=common.sandbox,
                                    default=SANDBOX_SDK_TOKEN_SECRET, environ=env),
            ping_interval=env_float(f"{prefix}_PING_INTERVAL", 20.0, env),
            socket_queue_size=env_int(f"{prefix}_SOCKET_QUEUE", 256, env),
            request_timeout=env_float(f"{prefix}_REQUEST_TIMEOUT", 5.0, env),
            token_ttl=env_float("THREADLINE_SDK_TOKEN_TTL_SECONDS", 24 * 3600.0, env),
            refresh_ttl=env_float("THREADLINE_SDK_REFRESH_TTL_SECONDS", 30 * 86400.0, env),
            session_max_age=env_float("THREADLINE_SDK_SESSION_MAX_AGE_SECONDS", 0.0, env),
            limits=SdkLimits.from_env(env),
            trusted_proxies=env_trusted_proxies(env),
            max_upload_bytes=env_int("THREADLINE_SDK_MAX_UPLOAD_BYTES", DEFAULT_SDK_MAX_UPLOAD_BYTES, env),
        )
        if not 1 <= settings.max_upload_bytes <= MAX_ATTACHMENT_BYTES:
            raise ConfigError(f"THREADLINE_SDK_MAX_UPLOAD_BYTES must be between 1 and {MAX_ATTACHMENT_BYTES} (50 MB)")
        if not 0.05 <= settings.ping_interval <= 300:
            raise ConfigError(f"{prefix}_PING_INTERVAL must be between 0.05 and 300 seconds")
        if settings.socket_queue_size < 8:
            raise ConfigError(f"{prefix}_SOCKET_QUEUE must be at least 8")
        if settings.request_timeout <= 0:
            raise ConfigError(f"{prefix}_REQUEST_TIMEOUT must be positive")
        if not 60 <= settings.token_ttl <= 30 * 86400:
            raise ConfigError("THREADLINE_SDK_TOKEN_TTL_SECONDS must be between 60 and 2592000 (30 days)")
        if not settings.token_ttl <= settings.refresh_ttl <= 366 * 86400:
            raise ConfigError("THREADLINE_SDK_REFRESH_TTL_SECONDS must be at least the token TTL and at most 366 days")
        if settings.session_max_age != 0 and settings.session_max_age < settings.token_ttl:
            raise ConfigError("THREADLINE_SDK_SESSION_MAX_AGE_SECONDS must be 0 (no limit) or at least the token TTL")
        return settings


# --- authentication and requests -------------------------------------------------------------

def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


SESSION_EXPIRED: Final = "session_expired"


def authenticate(secret: str, token: str | None, app_id: str, at: float,
                 typ: TokenType = "session") -> SessionClaims:
    """The session behind `token`, which must be an authentic, unexpired `typ` token for `app_id`
    (else 401; an expired one with code `session_expired`, so the client knows to refresh)."""
    if not token:
        raise ApiError(401, "A session token is required (Authorization: Bearer <sessionToken>)")
    claims = SessionClaims.from_token(secret, token)
    if claims is None or claims.app != app_id or claims.typ != typ:
        raise ApiError(401, "Invalid session token" if typ == "session" else "Invalid refresh token")
    if claims.exp <= at:
        if typ == "refresh":
            raise ApiError(401, "The refresh token expired: start a new session", SESSION_EXPIRED)
        raise ApiError(401, "The session token expired: get a new one with POST …/sessions/refresh",
                       SESSION_EXPIRED)
    return claims


def issue_tokens(settings: SdkSettings, claims: SessionClaims, at: float) -> SessionCreated:
    """A new session token and refresh token for `claims`' session (ids and start kept)."""
    issued = int(at)
    end = claims.sst + int(settings.session_max_age) if settings.session_max_age else None
    session_exp = issued + int(settings.token_ttl)
    refresh_exp = issued + int(settings.refresh_ttl)
    if end is not None:
        session_exp, refresh_exp = min(session_exp, end), min(refresh_exp, end)
    session = msgspec.structs.replace(claims, typ="session", iat=issued, exp=session_exp)
    refresh = msgspec.structs.replace(claims, typ="refresh", iat=issued, exp=refresh_exp)
    return SessionCreated(
        session_token=session.to_token(settings.token_secret),
        refresh_token=refresh.to_token(settings.token_secret),
        expires_at=iso(session_exp),
        app_user_id=claims.user or None, client_id=claims.client or None,
        conversation_id=claims.conversation or None)


def new_session_claims(app_id: str, integration_id: str, channel_user_id: str, at: float, *, user: str = "",
                       client: str = "", conversation: str = "") -> SessionClaims:
    """The claims of a session that starts now (times are set by `issue_tokens`)."""
    started = int(at)
    return SessionClaims(typ="session", app=app_id, integration=integration_id, channel_user_id=channel_user_id,
                         user=user, client=client, conversation=conversation, iat=started, exp=started,
                         sst=started)


def parse_cursor(raw: str | None, name: str = "after") -> int | None:
    """A non-negative integer cursor from a query parameter (absent/empty → None, bad → 400)."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, f"{name} must be a non-negative integer cursor")
    return int(raw)


def socket_query(query_string: str) -> dict[str, str]:
    """A socket URL's query parameters (first value of each). Parsed here rather than with
    `request.query`, whose parsed copy would stay cached for the socket's whole life."""
    try:
        return dict(reversed(parse_qsl(query_string, max_num_fields=MAX_SOCKET_QUERY_FIELDS)))
    except ValueError as exc:
        raise ApiError(400, "Too many query parameters") from exc


def parse_limit(raw: str | None, maximum: int) -> int:
    """A page size between 1 and `maximum` (absent → maximum)."""
    if raw is None or raw == "":
        return maximum
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise ApiError(400, f"limit must be an integer between 1 and {maximum}")
    return int(raw)


def validate_post_message(body: PostMessageT) -> PostMessageT:
    """400 unless the body is one usable customer message: a client message id, and exactly one
    of a text (1-4096 characters; with `payload`, a button tap), a `location`, a `formResponse`,
    an `image` or a `file` (whose `text`, if any, is its caption), each of the shape
    `inbound_message` turns into SunCo content. Whether an image's or a file's URL is one of the
    app's uploads is the service's check (`SdkService.check_media`), which knows the app."""
    if not _CLIENT_MESSAGE_ID.match(body.client_message_id):
        raise ApiError(400, "clientMessageId must be 8-128 characters of [A-Za-z0-9_-] (a UUID)")
    if len(body.text) > MAX_TEXT_LENGTH:
        raise ApiError(400, f"text must be at most {MAX_TEXT_LENGTH} characters")
    media = [name for name, given in (("image", body.image), ("file", body.file)) if given is not None]
    kinds = [name for name, given in (("text", bool(body.text.strip()) and not media),
                                      ("location", body.location is not None),
                                      ("formResponse", body.form_response is not None)) if given] + media
    if not kinds:
        raise ApiError(400, "text must not be empty")
    if len(kinds) > 1:
        raise ApiError(400, "A message is one of text, location, formResponse, image or file, not "
                            f"{' and '.join(kinds)}")
    if body.payload is not None:
        if kinds != ["text"]:
            raise ApiError(400, "payload is a button tap: it comes with the button's text only")
        if not body.payload or len(body.payload) > MAX_PAYLOAD_LENGTH:
            raise ApiError(400, f"payload must be 1-{MAX_PAYLOAD_LENGTH} characters")
    if body.location is not None:
        _check_location(body.location)
    if body.form_response is not None:
        _check_form_response(body.form_response)
    if body.image is not None:
        _check_media(body.image, "image")
    if body.file is not None:
        _check_media(body.file, "file")
    return body


def _check_media(media: PostMedia, at: str) -> None:
    if not media.media_url or len(media.media_url) > MAX_MEDIA_URL_LENGTH:
        raise ApiError(400, f"{at}.mediaUrl must be the mediaUrl POST …/attachments answered")
    media_type = normal_type(media.media_type)
    if media_type not in ALLOWED_TYPES or (at == "image" and not media_type.startswith("image/")):
        raise ApiError(400, f"{at}.mediaType must be the mediaType POST …/attachments answered"
                            + (" (an image/… type)" if at == "image" else ""))
    if media.alt_text is not None and len(media.alt_text) > MAX_ALT_TEXT_LENGTH:
        raise ApiError(400, f"{at}.altText must be at most {MAX_ALT_TEXT_LENGTH} characters")


def is_own_upload(public_base_url: str, app_id: str, url: str) -> bool:
    """Whether `url` is an attachment URL of `app_id` exactly as Threadline makes them (the name
    already a safe one, no query, no fragment): what `POST …/attachments` answered."""
    ref = parse_attachment_url(public_base_url, url)
    return (ref is not None and ref.app_id == app_id
            and url == attachment_url(public_base_url, app_id, ref.token, ref.filename)
            and ref.filename == safe_filename(ref.filename, ""))


def _check_location(location: PostLocation) -> None:
    if not (math.isfinite(location.lat) and -90 <= location.lat <= 90):
        raise ApiError(400, "location.lat must be a latitude between -90 and 90")
    if not (math.isfinite(location.long) and -180 <= location.long <= 180):
        raise ApiError(400, "location.long must be a longitude between -180 and 180")
    for name in ("name", "address"):
        value = getattr(location, name)
        if value is not None and len(value) > MAX_LOCATION_TEXT_LENGTH:
            raise ApiError(400, f"location.{name} must be at most {MAX_LOCATION_TEXT_LENGTH} characters")


def _check_label(value: str, at: str) -> None:
    if not value.strip() or len(value) > MAX_FORM_LABEL_LENGTH:
        raise ApiError(400, f"{at} must be 1-{MAX_FORM_LABEL_LENGTH} characters")


def _check_form_response(answer: PostFormResponse) -> None:
    """The shape of a form answer; whether it answers its form (names, types, options, the
    form's lengths) is `conversations`' check, which knows the form."""
    if not _KV_KEY.match(answer.quoted_message_id):
        raise ApiError(400, "formResponse.quotedMessageId must name the form message it answers")
    if not 1 <= len(answer.fields) <= MAX_FORM_FIELDS:
        raise ApiError(400, f"formResponse.fields must have 1-{MAX_FORM_FIELDS} fields")
    if len({f.name for f in answer.fields}) != len(answer.fields):
        raise ApiError(400, "formResponse.fields must answer each field once (names are unique)")
    for index, given in enumerate(answer.fields):
        at = f"formResponse.fields[{index}]"
        _check_label(given.name, f"{at}.name")
        _check_label(given.label, f"{at}.label")
        values = {"text": given.text, "email": given.email, "select": given.select}
        if [key for key, value in values.items() if value is not None] != [given.type]:
            raise ApiError(400, f"{at} answers a {given.type} field: it has {given.type} and nothing else")
        if given.type == "text":
            assert given.text is not None
            if not given.text.strip() or len(given.text) > MAX_FORM_TEXT_LENGTH:
                raise ApiError(400, f"{at}.text must be 1-{MAX_FORM_TEXT_LENGTH} characters")
        elif given.type == "email":
            assert given.email is not None
            if len(given.email) > MAX_FORM_EMAIL_LENGTH or not is_email_address(given.email):
                raise ApiError(400, f"{at}.email must be an e-mail address of at most {MAX_FORM_EMAIL_LENGTH} "
                                    "characters")
        else:
            assert given.select is not None
            if len(given.select) != 1:
                raise ApiError(400, f"{at}.select must be exactly one option")
            _check_label(given.select[0].name, f"{at}.select[0].name")
            _check_label(given.select[0].label, f"{at}.select[0].label")


def inbound_msg_id(channel_name: str, client_message_id: str) -> str:
    """The Nats-Msg-Id of a customer message: a retried POST is de-duplicated by JetStream."""
    return f"{channel_name}:{client_message_id}"


def message_content(body: PostMessage) -> Content:
    """The SunCo content of a (validated) customer message: a text (a tap's carries its
    button's payload), a location, a formResponse naming its form in every field, with SunCo's
    `textFallback`, or an image or a file (its text the caption)."""
    if body.location is not None:
        where = body.location
        info = LocationInfo(name=where.name or None, address=where.address or None)
        return LocationContent(coordinates=LocationCoordinates(lat=where.lat, long=where.long),
                               location=info if info.name or info.address else None)
    caption = body.text if body.text.strip() else None
    if body.image is not None:
        image = body.image
        return ImageContent(media_url=image.media_url, media_type=normal_type(image.media_type),
                            alt_text=image.alt_text or None, text=caption)
    if body.file is not None:
        file = body.file
        return FileContent(media_url=file.media_url, media_type=normal_type(file.media_type),
                           alt_text=file.alt_text or None, text=caption)
    if body.form_response is not None:
        form_id = body.form_response.quoted_message_id
        answer = FormResponseContent(fields=[
            FormField(type=f.type, name=f.name, label=f.label, text=f.text, email=f.email, select=f.select,
                      quoted_message_id=form_id) for f in body.form_response.fields])
        return msgspec.structs.replace(answer, text_fallback=form_response_text(answer))
    return TextContent(text=body.text, payload=body.payload)


def inbound_message(claims: SessionClaims, conversation_id: str, body: PostMessage, now: float,
                    channel_name: str, client_info: dict[str, Any] | None = None) -> InboundMessage:
    """The normalized inbound message for a customer's post on SDK channel `channel_name`; a
    button tap (`payload`) carries its `Postback` (`conversations` tells a reply from a postback
    by the business's button)."""
    return InboundMessage(
        app_id=claims.app, integration_id=claims.integration, channel=channel_name,
        client_type=SDK_CLIENT_TYPE, channel_user_id=claims.channel_user_id,
        provider_message_id=body.client_message_id, received_at=now,
        content=message_content(body), client_info=client_info or {},
        user_id=claims.user, client_id=claims.client, conversation_id=conversation_id,
        postback=Postback(payload=body.payload, text=body.text) if body.payload is not None else None,
    )


def inbound_activity(claims: SessionClaims, conversation_id: str, body: PostActivity, now: float,
                     channel_name: str) -> InboundActivity:
    """The normalized typing/read activity for a customer's post."""
    return InboundActivity(
        app_id=claims.app, integration_id=claims.integration, channel=channel_name,
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
    """The socket frame for a conversation event, or None when the SDK need not see it.

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
    linked = (isinstance(event, conv.ClientAdded) and event.reason == "channelLinking"
              and event.client.status == "active")
    confirmed = isinstance(event, conv.ClientUpdated) and event.reason == "confirmed"
    if isinstance(event, conv.ClientAdded | conv.ClientUpdated) and (linked or confirmed) and event.primary:
        return ChannelFrame(status="moved", client_type=event.client.type, integration_id=event.client.integration_id)
    if isinstance(event, conv.ClientRemoved) and event.reason in ("linkFailed", "theft"):
        return ChannelFrame(status="failed", client_type=event.client.type, integration_id=event.client.integration_id,
                            message=event.error.message if event.error is not None else None)
    return None


@dataclass(slots=True)
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


class QueuedFrame(msgspec.Struct, frozen=True):
    """A frame waiting for its socket: its text (none: nothing but a protocol ping), its cursor
    (message frames), for a business message the message id (so the service can note that a
    socket delivered it), and whether a WebSocket ping goes out with it (`ws_ping`)."""

    text: str
    cursor: int | None = None
    business_message_id: str | None = None
    ws_ping: bool = False


def queued_frame(frame: Frame) -> QueuedFrame:
    """Encode a frame once for every socket that gets it."""
    if isinstance(frame, MessageFrame):
        business = frame.message.id if frame.message.author.type == "business" else None
        return QueuedFrame(encode_frame(frame), frame.cursor, business)
    return QueuedFrame(encode_frame(frame))


# --- fan-out ---------------------------------------------------------------------------------

class SocketListener:
    """One socket's frames pushed by the hub, sent in order with de-duplication by cursor.

    Frames offered while the socket still replays history wait in `pending`; once `go_live` is
    called, a short-lived sender task (`drain`) sends what is pending and ends. An idle socket
    holds no task and no queue of its own: 50,000 of them cost only what they must.
    """

    __slots__ = ("claims", "conversation_id", "drain", "heard", "last_sent", "limit", "live", "overflowed",
                 "pending", "pinged", "sender", "transport", "watermark", "ws")

    def __init__(self, limit: int, drain: Callable[[SocketListener], Coroutine[Any, Any, None]] | None = None, *,
                 ws: web.WebSocketResponse | None = None, claims: SessionClaims | None = None,
                 conversation_id: str = "", after: int = 0, transport: asyncio.Transport | None = None,
                 now: float = 0.0) -> None:
        self.limit = limit
        self.drain = drain
        self.ws = ws
        self.transport = transport
        self.claims = claims
        self.conversation_id = conversation_id
        self.watermark = CursorWatermark(after)
        self.pending: deque[QueuedFrame] | None = None
        self.live = False
        self.overflowed = False
        self.sender: asyncio.Task[None] | None = None
        self.last_sent = now
        # When the client was last heard from (any frame, a pong included), and when the
        # WebSocket ping it has not answered yet was sent (0: none outstanding).
        self.heard = now
        self.pinged = 0.0

    def offer(self, frame: QueuedFrame) -> None:
        """Queue a frame without waiting; more than `limit` waiting marks the socket for closing."""
        if self.pending is None:
            self.pending = deque()
        if len(self.pending) >= self.limit:
            self.overflowed = True
        else:
            self.pending.append(frame)
        self.wake()

    def go_live(self) -> None:
        """History is sent: from now on frames go out as they come."""
        self.live = True
        self.wake()

    def wake(self) -> None:
        """Start the sender when there is something to send and none runs."""
        if (self.live and self.sender is None and self.drain is not None
                and (self.pending or self.overflowed)):
            self.sender = asyncio.create_task(self.drain(self), name="sdk:socket-send")

    async def stop(self) -> None:
        """Stop sending (the socket closed)."""
        self.live = False
        await cancel_and_wait([self.sender])
        self.sender = None


class EventHub:
    """One core NATS subscription on every conversation event, fanned out by conversation.

    The subscription is held only while a socket of this process listens: a replica with no
    socket (an app whose customers use no SDK, a quiet hour) is not sent every event of every
    conversation to drop. The first socket subscribes, and the server has the subscription before
    that socket reads its history; the last one to go leaves it for `linger` seconds more (a
    reconnecting client finds it there).
    """

    def __init__(self, linger: float = HUB_LINGER_SECONDS) -> None:
        # A list per conversation: it has one socket or a few, and a set of one costs 216 B.
        self.listeners: dict[str, list[SocketListener]] = {}
        self.linger = linger
        self._nc: NatsClient | None = None
        self._sub: Subscription | None = None
        self._subscribing = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._leaving: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        """Whether this process is subscribed to the events now."""
        return self._sub is not None

    async def start(self, nc: NatsClient) -> None:
        """Use `nc` (core NATS: live events only; history fills the gaps) once a socket listens."""
        self._nc = nc

    async def stop(self) -> None:
        """Unsubscribe (a socket arriving after this routes nothing)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        await cancel_and_wait([self._leaving])
        async with self._subscribing:
            self._nc = None
            if self._sub is not None:
                sub, self._sub = self._sub, None
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def add(self, conversation_id: str, listener: SocketListener) -> None:
        """Start delivering the conversation's events to `listener` (subscribing first if this
        process was not: on return the server sends every event published from now on)."""
        listeners = self.listeners.setdefault(conversation_id, [])
        if listener not in listeners:
            listeners.append(listener)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._sub is not None or self._nc is None:
            return
        try:
            async with self._subscribing:
                if self._sub is None and self._nc is not None:
                    sub = await self._nc.subscribe(subjects.CONVERSATION_EVENTS_ALL, cb=self._on_message,
                                                   pending_msgs_limit=100_000,
                                                   pending_bytes_limit=128 * 1024 * 1024)
                    try:
                        # nats-py writes a flush's PING ahead of its send buffer: the first flush
                        # hands the SUB to the socket, the second's PONG comes after the server
                        # read it. From then on nothing published is missed.
                        await self._nc.flush()
                        await self._nc.flush()
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        raise
                    self._sub = sub
        except BaseException:
            self.remove(conversation_id, listener)
            raise

    def remove(self, conversation_id: str, listener: SocketListener) -> None:
        """Stop delivering to `listener` (the last one leaves the subscription to `linger`)."""
        listeners = self.listeners.get(conversation_id)
        if listeners is not None:
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                del self.listeners[conversation_id]
        if not self.listeners and self._sub is not None and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(self.linger, self._leave)

    def _leave(self) -> None:
        self._idle = None
        if self._leaving is None or self._leaving.done():
            self._leaving = asyncio.create_task(self._unsubscribe_if_idle(), name="sdk:hub-leave")

    async def _unsubscribe_if_idle(self) -> None:
        async with self._subscribing:
            if self.listeners or self._sub is None:
                return
            # Cleared first: a socket arriving meanwhile subscribes anew once this is done.
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        # Route by subject first: events of conversations nobody watches here are not decoded.
        listeners = self.listeners.get(subjects.conversation_of_event_subject(msg.subject))
        if not listeners:
            return
        token = otel_context.attach(extract_context(msg.headers or {}))
        try:
            with _tracer.start_as_current_span("fanout events", kind=SpanKind.CONSUMER) as span:
                span.set_attribute("messaging.destination.name", msg.subject)
                span.set_attribute("threadline.sockets", len(listeners))
                try:
                    event = conv.decode(msg.data)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    log.warning("undecodable event on %s", msg.subject)
                    return
                frame = event_frame(event)
                if frame is None:
                    return
                queued = queued_frame(frame)
                for listener in list(listeners):
                    listener.offer(queued)
        finally:
            otel_context.detach(token)


# --- the service -----------------------------------------------------------------------------

class SdkService(ServiceApp):
    """SDK endpoints under `/{path_root}/v1/apps/{app_id}` for the integrations of `integration_types`.

    Customers upload files (`POST …/attachments`) into the object store and send them as image
    or file messages.

    Subclasses set `name`, `path_root` and `integration_types`, and may override the hooks
    `check_request`, `session_info`, `read_session_body`, `read_start_body`, `session_created`
    and `business_message_delivered`.
    """

    path_root: str = "sdk"
    integration_types: frozenset[str] = frozenset()
    # Set by `start_sdk`, before HTTP serves (and released by `stop`, in the reverse order).
    bus: Bus
    integrations: KvMirror
    ended_users: KvMirror
    # Socket presence (`SDK_PRESENCE_BUCKET`): this replica's heartbeat and open sockets.
    presence_kv: KeyValue
    # New sessions and link requests, counted in `SDK_LIMITS_BUCKET` (every replica agrees).
    limiter: SharedLimiter
    # Where the files customers upload go (`shared.objectstore`): the store `conversations`
    # serves them from (`<data dir>/attachments`, or THREADLINE_OBJECT_STORE_URL's bucket).
    files: ObjectStore

    def __init__(self, common: CommonConfig, sdk: SdkSettings, keyring: Keyring | None = None) -> None:
        super().__init__(common)
        self.sdk = sdk
        # Opens the integrations' sealed credentials (`app` pushes with them; `web` has none).
        self.keyring = keyring or Keyring()
        self.hub = EventHub()
        self.sockets: dict[web.WebSocketResponse, SocketListener] = {}
        self.presence = PresenceBoard(self.presence_bucket, new_id())
        prefix = self.sdk_prefix
        r = self.http.router
        r.add_post(prefix + "/integrations/{integration_id}/sessions", self.create_session)
        r.add_post(prefix + "/sessions/refresh", self.refresh)
        r.add_post(prefix + "/sessions/login", self.login)
        r.add_post(prefix + "/conversations", self.start_conversation)
        r.add_get(prefix + "/conversations/{conversation_id}/messages", self.get_messages)
        r.add_post(prefix + "/conversations/{conversation_id}/messages", self.post_message)
        r.add_post(prefix + "/conversations/{conversation_id}/activity", self.post_activity)
        r.add_post(prefix + "/attachments", self.upload_attachment)
        self._socket_route = r.add_get(prefix + "/conversations/{conversation_id}/socket", self.socket)
        # First in the list: the outermost middleware (subclasses add theirs after).
        self.http.middlewares.append(self.socket_middleware)

    @property
    def sdk_prefix(self) -> str:
        """The path every SDK endpoint of this service starts with."""
        return f"/{self.path_root}/v1/apps/{{app_id}}"

    # --- hooks --------------------------------------------------------------------------------

    def channel_of(self, record: IntegrationRecord) -> str:
        """The channel name on the bus (and the message source type) for this integration."""
        return record.type

    def check_request(self, record: IntegrationRecord, request: web.Request) -> None:
        """Refuse (ApiError) a request this integration does not accept; default: accept."""

    def session_info(self, request: web.Request, record: IntegrationRecord, body: Any) -> dict[str, Any]:
        """The client `info` a new session's client is created with (`body`: `read_session_body`'s)."""
        return {}

    async def read_session_body(self, request: web.Request) -> Any:
        """The session request's body, validated before anything is created; default: an
        optional `SessionBody` (`linkCode`). A subclass's body carries `linkCode` by extending it."""
        if not request.can_read_body:
            return None
        return await read_json(request, SessionBody, limit=4096)

    async def read_start_body(self, request: web.Request) -> PostMessage:
        """The body of a pending session's first message (`POST …/conversations`); default: the
        message. A subclass's body may carry more (the app's install) by extending it."""
        return await read_json(request, PostMessage)

    async def session_created(self, request: web.Request, record: IntegrationRecord, claims: SessionClaims,
                              body: Any) -> None:
        """Called once a session's user, client and conversation exist (`body`: the link-code
        session's body, the first message's, or None for a login)."""

    async def business_message_delivered(self, claims: SessionClaims, conversation_id: str, message_id: str) -> None:
        """Called when a socket of this service sent a business message to its client."""

    # --- lifecycle ----------------------------------------------------------------------------

    async def start_sdk(self) -> None:
        """Connect the bus, mirror integrations and subscribe to events (call from `start`,
        before `start_http`)."""
        self.files = await self.open_files()
        self.bus = await self.connect_bus()
        self.integrations = await self.mirror_bucket(self.bus, subjects.INTEGRATIONS_BUCKET,
                                                     integration_decoder(self.keyring))
        self.ended_users = await self.mirror_bucket(self.bus, subjects.ENDED_USERS_BUCKET,
                                                    identity.USER_ENDED_DECODER.decode)
        # Keyed with the token secret, which every replica of web and app shares.
        self.limiter = SharedLimiter(await self.bus.key_value(subjects.SDK_LIMITS_BUCKET, ttl=MAX_LIMIT_WINDOW_SECONDS),
                                     hmac.new(self.sdk.token_secret.encode(), b"sdk-limits", "sha256").digest())
        await self.hub.start(self.bus.nc)
        self.on_stop(self.hub.stop)
        try:
            self.presence_kv = await self.bus.key_value(subjects.SDK_PRESENCE_BUCKET,
                                                        ttl=subjects.SDK_PRESENCE_TTL_SECONDS)
            await self.presence.start()
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ConfigError(f"cannot write socket presence to {subjects.SDK_PRESENCE_BUCKET}: {exc}") from exc
        self.on_stop(self.presence.stop)
        self.spawn(self._watch_reconnects(self.bus.nc), f"{self.name}:reconnects")
        self.spawn(self._ping_idle_sockets(), f"{self.name}:socket-pings")

    async def stop(self) -> None:
        """Close sockets (clients resume by cursor elsewhere), then release the rest: HTTP, the
        background tasks, presence, the event hub, the mirrors, the bus."""
        await self.close_sockets(WSCloseCode.SERVICE_RESTART, b"service restarting")
        await super().stop()

    async def close_sockets(self, code: int, message: bytes) -> None:
        """Close every open socket (their clients reconnect and resume from their cursor)."""
        sockets = list(self.sockets)
        await asyncio.gather(*(ws.close(code=code, message=message) for ws in sockets),
                             return_exceptions=True)

    async def _watch_reconnects(self, nc: NatsClient) -> None:
        # Core NATS drops what is published while disconnected: after a reconnect, every
        # socket is closed so that its client resumes from its cursor through history.
        seen = nc.stats["reconnects"]
        while True:
            await asyncio.sleep(1.0)
            if nc.stats["reconnects"] != seen:
                seen = nc.stats["reconnects"]
                log.warning("nats reconnected: closing %d sockets so they resync", len(self.sockets))
                await self.close_sockets(WSCloseCode.TRY_AGAIN_LATER, b"resync")

    # --- bus helpers --------------------------------------------------------------------------

    async def ask(self, subject: str, data: bytes, service: str) -> bytes:
        """A request to another service; its unavailability becomes a 503."""
        try:
            return await self.bus.request(subject, data, timeout=self.sdk.request_timeout)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise ApiError(503, f"{service} is unavailable, try again") from exc
        except RequestFailed as exc:
            log.warning("%s failed: %s", subject, exc)
            raise ApiError(503, f"{service} failed, try again") from exc
        except nats.errors.Error as exc:
            raise ApiError(503, "Message bus unavailable, try again") from exc

    async def ask_identity(self, subject: str, request: identity.IdentityMessage) -> identity.IdentityUnion:
        """An identity request; its refusals become the matching ApiError."""
        try:
            reply = identity.decode(await self.ask(subject, identity.encode(request), "identity"))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ApiError(503, "Unexpected answer from identity") from exc
        if isinstance(reply, identity.IdentityError):
            raise ApiError(reply.status, reply.title, reply.code)
        return reply

    async def integration(self, integration_id: str) -> IntegrationRecord | None:
        """The integration record: from the mirror, else (just created?) from the bucket itself."""
        record = self.integrations.get(integration_id)
        if record is not None:
            return record  # type: ignore[no-any-return]
        if not _KV_KEY.match(integration_id):
            return None
        try:
            kv = await self.bus.key_value(subjects.INTEGRATIONS_BUCKET)
            entry = await kv.get(integration_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Message bus unavailable, try again") from exc
        if not entry.value:
            return None
        try:
            return open_integration(INTEGRATION_DECODER.decode(entry.value), self.keyring)
        except msgspec.ValidationError:
            return None

    def served_integration(self, record: IntegrationRecord | None, app_id: str) -> IntegrationRecord:
        """The record when this service serves it for `app_id`, else 404 (no detail leaked)."""
        if (record is None or record.app_id != app_id or record.type not in self.integration_types
                or record.status == "error"):
            raise ApiError(404, "Integration not found")
        return record

    async def history(self, claims: SessionClaims, conversation_id: str, after: int | None,
                      limit: int) -> conv.HistoryPage:
        """A page of the conversation's history, as its participant `claims.user` may read it."""
        request = conv.GetHistory(app_id=claims.app, conversation_id=conversation_id, user_id=claims.user,
                                  after=after, limit=limit)
        reply = conversation_reply(
            await self.ask(subjects.CONVERSATIONS_HISTORY, conv.ENCODER.encode(request), "conversations"))
        if not isinstance(reply, conv.HistoryPage):
            raise ApiError(503, "Unexpected answer from conversations")
        return reply

    async def session(self, request: web.Request, token: str | None, *,
                      pending_ok: bool = False) -> tuple[SessionClaims, IntegrationRecord]:
        """The authentic, unexpired session behind `token` and its (still served) integration; a
        pending session (no first message yet) is a 409 unless `pending_ok`."""
        claims = authenticate(self.sdk.token_secret, token, request.match_info["app_id"], now())
        record = await self.live_session(request, claims)
        if claims.pending and not pending_ok:
            raise ApiError(409, "This session has no conversation yet: its first message starts it "
                                "(POST …/conversations)", NOT_STARTED)
        return claims, record

    async def live_session(self, request: web.Request, claims: SessionClaims) -> IntegrationRecord:
        """The session's integration, when the session has not ended (401 otherwise)."""
        app_id = request.match_info["app_id"]
        if claims.user and self.ended_users.get(claims.user) is not None:
            # The visitor was merged into another user (SDK login, channel link) or deleted.
            raise ApiError(401, "This session has ended; start a new one")
        try:
            record = self.served_integration(await self.integration(claims.integration), app_id)
        except ApiError as exc:
            raise ApiError(401, "Invalid session token (integration removed)") from exc
        self.check_request(record, request)
        return record

    async def authorize(self, request: web.Request, token: str | None) -> tuple[SessionClaims, str]:
        """The session and the conversation of the path, which the session's user may access."""
        claims, _record, conversation_id = await self.authorized(request, token)
        return claims, conversation_id

    async def authorized(self, request: web.Request, token: str | None, *,
                         confirm: bool = False) -> tuple[SessionClaims, IntegrationRecord, str]:
        """`authorize`, plus the session's integration record. The session's own conversation is
        taken on trust unless `confirm` (it may have been deleted since the token was issued)."""
        claims, record = await self.session(request, token)
        conversation_id = request.match_info["conversation_id"]
        if confirm or conversation_id != claims.conversation:
            # `conversations` knows whether the conversation exists and the user is in it.
            try:
                await self.history(claims, conversation_id, None, 1)
            except ApiError as exc:
                if exc.status >= 500:
                    raise
                raise ApiError(404, "Conversation not found", "conversation_not_found") from exc
        return claims, record, conversation_id

    # --- rate limits --------------------------------------------------------------------------

    def client_address(self, request: web.Request) -> str | None:
        """The client's IP address (X-Forwarded-For believed from trusted proxies only)."""
        return client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), self.sdk.trusted_proxies)

    async def limit(self, request: web.Request, action: str, app_id: str,
                    checks: Sequence[tuple[str, str, tuple[Rate, ...]]]) -> None:
        """Count one `action` against each (scope, subject, rates) check; 429 with Retry-After
        (and nothing counted further) at the first that is over its limit."""
        for scope, subject, rates in checks:
            if not rates:
                continue
            try:
                wait = await self.limiter.take(f"{action}-{scope}", subject, rates)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                raise ApiError(503, "Rate limits unavailable, try again") from exc
            if wait > 0:
                retry_after = max(1, math.ceil(wait))
                log.warning("%s refused: over the per-%s limit", action, scope, extra=log_fields(
                    app_id=app_id, action=action, scope=scope, client_ip=self.client_address(request),
                    origin=request.headers.get("Origin"), retry_after=retry_after))
                raise ApiError(429, f"Too many {action.replace('-', ' ')} (per {scope}); retry in {retry_after} s",
                               "too_many_requests", headers={"Retry-After": str(retry_after)})

    def source_checks(self, request: web.Request, app_id: str, per_ip: tuple[Rate, ...],
                      per_origin: tuple[Rate, ...],
                      per_app: tuple[Rate, ...]) -> list[tuple[str, str, tuple[Rate, ...]]]:
        """The per-address, per-(app, Origin) and per-app checks of a request, most specific first."""
        address = self.client_address(request)
        origin = (request.headers.get("Origin") or "-").strip().lower()[:MAX_ORIGIN_KEY_LENGTH]
        return [("ip", source_key(address) if address else "unknown", per_ip),
                ("origin", f"{app_id} {origin}", per_origin),
                ("app", app_id, per_app)]

    # --- HTTP endpoints -----------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        """A new session: pending (nothing is created until its first message), or, with a
        `linkCode`, joined to the code's user and conversation. Limited per source and app."""
        app_id = request.match_info["app_id"]
        integration_id = request.match_info["integration_id"]
        record = self.served_integration(await self.integration(integration_id), app_id)
        self.check_request(record, request)
        body = await self.read_session_body(request)
        limits = self.sdk.limits
        await self.limit(request, "new-sessions", app_id, self.source_checks(
            request, app_id, limits.sessions_per_ip, limits.sessions_per_origin, limits.sessions_per_app))
        if isinstance(body, SessionBody) and body.link_code is not None:
            return await self.linked_session(request, record, body, body.link_code)
        claims = new_session_claims(app_id, integration_id, new_id(), now())
        return json_response(issue_tokens(self.sdk, claims, now()), status=201)

    async def linked_session(self, request: web.Request, record: IntegrationRecord, body: SessionBody,
                             code: str) -> web.Response:
        """A session that redeems a handoff link code: a new `sdk` client of the code's user, on the
        code's conversation (`conversations` redeems and links; the business gets `client:add`
        and `conversation:referral`). A refused code is a 4xx whose title is the handoff's
        message for the customer, and nothing is created."""
        app_id = record.app_id
        channel_user_id = new_id()
        link = conv.LinkSdkClient(app_id=app_id, integration_id=record.id, channel=self.channel_of(record),
                                  channel_user_id=channel_user_id, code=code,
                                  info=self.session_info(request, record, body))
        linked = conversation_reply(
            await self.ask(subjects.CONVERSATIONS_SDK_LINK, conv.ENCODER.encode(link), "conversations"))
        if not isinstance(linked, conv.SdkClientLinked):
            raise ApiError(503, "Unexpected answer from conversations")
        claims = new_session_claims(app_id, record.id, channel_user_id, now(), user=linked.user.id,
                                    client=linked.client.id, conversation=linked.conversation.id)
        await self.session_created(request, record, claims, body)
        return json_response(issue_tokens(self.sdk, claims, now()), status=201)

    async def materialize(self, request: web.Request, record: IntegrationRecord, claims: SessionClaims,
                          body: Any) -> SessionClaims:
        """Create a pending session's user, `sdk` client and default conversation (its first
        message, or a login, is about to use them). Idempotent: the token's `channel_user_id`
        always resolves to the same client, so a retried first message finds what the first
        try created. A client that meanwhile became an identified user's (a login, a merge) is
        not handed to this old token: 401."""
        resolved = await self.ask_identity(subjects.IDENTITY_RESOLVE, identity.ResolveClient(
            app_id=claims.app, integration_id=claims.integration, client_type=SDK_CLIENT_TYPE,
            channel_user_id=claims.channel_user_id, info=self.session_info(request, record, body)))
        if not isinstance(resolved, identity.Resolved):
            raise ApiError(503, "Unexpected answer from identity")
        if not resolved.client_created and resolved.user.external_id is not None:
            raise ApiError(401, "This session has ended; start a new one")
        start = conv.StartConversation(app_id=claims.app, integration_id=claims.integration,
                                       user_id=resolved.user.id, client_id=resolved.client.id)
        started = conversation_reply(
            await self.ask(subjects.CONVERSATIONS_START, conv.ENCODER.encode(start), "conversations"))
        if not isinstance(started, conv.ConversationStarted):
            raise ApiError(503, "Unexpected answer from conversations")
        started_claims = msgspec.structs.replace(claims, user=resolved.user.id, client=resolved.client.id,
                                                 conversation=started.conversation.id)
        await self.session_created(request, record, started_claims, body)
        return started_claims

    async def start_conversation(self, request: web.Request) -> web.Response:
        """A pending session's first message: its user, client and conversation are created, the
        message is queued, and the answer (201) carries the session's new tokens (the pending
        ones can do nothing else). Retrying with the same token and `clientMessageId` is safe."""
        claims, record = await self.session(request, bearer_token(request.headers.get("Authorization")),
                                            pending_ok=True)
        if not claims.pending:
            raise ApiError(409, "This session's conversation has started: post to …/conversations/"
                                f"{claims.conversation}/messages", "conversation_started")
        body = self.check_media(claims, validate_post_message(await self.read_start_body(request)))
        started = await self.materialize(request, record, claims, body)
        accepted = await self.queue_message(started, record, started.conversation, body)
        tokens = issue_tokens(self.sdk, started, now())
        log.info("sdk conversation started", extra=log_fields(
            app_id=started.app, user_id=started.user, conversation_id=started.conversation,
            integration_id=started.integration))
        return json_response(SessionStarted(
            **msgspec.structs.asdict(tokens), client_message_id=accepted.client_message_id,
            duplicate=accepted.duplicate), status=201)

    async def refresh(self, request: web.Request) -> web.Response:
        """New tokens for a session, from its refresh token (valid or not yet expired session
        token alike): the same ids, the session token's lifetime and the refresh token's again."""
        body = await read_json(request, RefreshBody, limit=8192)
        claims = authenticate(self.sdk.token_secret, body.refresh_token, request.match_info["app_id"], now(),
                              typ="refresh")
        await self.live_session(request, claims)
        return json_response(issue_tokens(self.sdk, claims, now()))

    async def login(self, request: web.Request) -> web.Response:
        """`Threadline.login(externalId, jwt)`: the session's user logs in with a user JWT.

        The visitor becomes identified, or is merged into the user who has `externalId`; either
        way a new session token names the user that remains, on the same conversation. A bad JWT
        is a 401 (`invalid_auth`) and changes nothing; a session whose user already has another
        externalId is a 409. A pending session's visitor is created first (then identified, or
        merged into the account: it has nothing yet).
        """
        claims, record = await self.session(request, bearer_token(request.headers.get("Authorization")),
                                            pending_ok=True)
        body = await read_json(request, LoginBody, limit=16384)
        if claims.pending:
            claims = await self.materialize(request, record, claims, None)
        login = conv.SdkLogin(app_id=claims.app, user_id=claims.user, client_id=claims.client,
                              integration_id=record.id, conversation_id=claims.conversation,
                              external_id=body.external_id, jwt=body.jwt)
        reply = conversation_reply(
            await self.ask(subjects.CONVERSATIONS_SDK_LOGIN, conv.ENCODER.encode(login), "conversations"))
        if not isinstance(reply, conv.SdkLoggedIn):
            raise ApiError(503, "Unexpected answer from conversations")
        renewed = msgspec.structs.replace(claims, user=reply.user.id, conversation=reply.conversation_id)
        tokens = issue_tokens(self.sdk, renewed, now())
        return json_response(LoginResult(**msgspec.structs.asdict(tokens), external_id=body.external_id,
                                         outcome=reply.outcome))

    async def get_messages(self, request: web.Request) -> web.Response:
        """History: messages with cursor > `after` (oldest first), or the latest page."""
        claims, conversation_id = await self.authorize(request, bearer_token(request.headers.get("Authorization")))
        after = parse_cursor(request.query.get("after"))
        limit = parse_limit(request.query.get("limit"), HISTORY_PAGE_LIMIT)
        page = await self.history(claims, conversation_id, after, limit)
        return json_response(messages_page(page))

    async def post_message(self, request: web.Request) -> web.Response:
        """Queue a customer message durably; 202 once JetStream acked it. The conversation is
        confirmed with `conversations` first: one the business deleted is a 404, not a 202 for a
        message the consumer could only drop."""
        claims, record, conversation_id = await self.authorized(
            request, bearer_token(request.headers.get("Authorization")), confirm=True)
        body = self.check_media(claims, validate_post_message(await read_json(request, PostMessage)))
        accepted = await self.queue_message(claims, record, conversation_id, body)
        return json_response(accepted, status=202)

    def check_media(self, claims: SessionClaims, body: PostMessageT) -> PostMessageT:
        """400 unless the image or file a (validated) message carries is one of this app's
        uploads: a customer sends what `POST …/attachments` answered, never a URL of elsewhere
        (which the business's tools and the other channels would fetch or show)."""
        for name, media in (("image", body.image), ("file", body.file)):
            if media is not None and not is_own_upload(self.common.public_base_url, claims.app, media.media_url):
                raise ApiError(400, f"{name}.mediaUrl must be the mediaUrl POST …/attachments answered")
        return body

    async def upload_attachment(self, request: web.Request) -> web.Response:
        """A file the customer will send (multipart/form-data, the file as `source`), streamed
        into the object store: 201 `{"attachment": {"mediaUrl", "mediaType"}}`, the URL to send
        in an image or a file message (which attaches the file to the conversation). A pending
        session may upload (its first message may be the file). At most
        THREADLINE_SDK_MAX_UPLOAD_BYTES (413), of the types `shared.media` allows (415), the
        content what its type says (400); limited per client, address and app (429); 503 when
        the store is unavailable."""
        claims, _record = await self.session(request, bearer_token(request.headers.get("Authorization")),
                                             pending_ok=True)
        limits = self.sdk.limits
        await self.limit(request, "uploads", claims.app, [
            ("client", f"{claims.app} {claims.channel_user_id}", limits.uploads_per_client),
            *self.source_checks(request, claims.app, limits.uploads_per_ip, (), limits.uploads_per_app)])
        stored = await receive_source(request, self.files, self.common.public_base_url, claims.app,
                                      self.sdk.max_upload_bytes)
        log.info("sdk upload stored", extra=log_fields(app_id=claims.app, user_id=claims.user or None,
                                                       integration_id=claims.integration,
                                                       media_type=stored.media_type, size=stored.size))
        return json_response(AttachmentUploaded(attachment=UploadedAttachment(
            media_url=stored.url, media_type=stored.media_type)), status=201)

    async def queue_message(self, claims: SessionClaims, record: IntegrationRecord, conversation_id: str,
                            body: PostMessage) -> MessageAccepted:
        """Publish a customer message on the inbound stream (de-duplicated by clientMessageId)."""
        channel_name = self.channel_of(record)
        message = inbound_message(claims, conversation_id, body, now(), channel_name)
        try:
            subject = channel.subject_of(message)
            ack = await self.bus.publish(subject, channel.encode(message),
                                            msg_id=inbound_msg_id(channel_name, body.client_message_id))
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Could not queue the message, retry with the same clientMessageId") from exc
        metrics.message_in_acked(channel_name, ack.duplicate)
        return MessageAccepted(client_message_id=body.client_message_id, duplicate=bool(ack.duplicate))

    async def post_activity(self, request: web.Request) -> web.Response:
        """Typing or read state from the customer."""
        claims, record, conversation_id = await self.authorized(
            request, bearer_token(request.headers.get("Authorization")))
        body = await read_json(request, PostActivity, limit=4096)
        channel_name = self.channel_of(record)
        activity = inbound_activity(claims, conversation_id, body, now(), channel_name)
        try:
            await self.bus.publish(
                channel.subject_of(activity),
                channel.encode(activity))
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise ApiError(503, "Could not queue the activity, try again") from exc
        return web.Response(status=202)

    # --- the socket ---------------------------------------------------------------------------

    def socket_response(self) -> web.WebSocketResponse:
        """A socket's response, before its handshake."""
        # No permessage-deflate: a browser always offers it, and each socket would then hold a
        # zlib compressor (~260 KiB) for its whole life to shrink frames of a few hundred bytes.
        # No heartbeat or autoping of aiohttp's: its heartbeat is a timer per socket (which also
        # kept the handshake's trace context alive); `_ping_idle_sockets` pings every socket
        # instead and drops one whose client stopped answering, and `serve_socket` answers the
        # client's pings.
        return web.WebSocketResponse(autoping=False, max_msg_size=4096, compress=False)

    @web.middleware
    def socket_middleware(self, request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        """The outermost middleware: a handshake that can become a socket goes straight to
        `serve_socket`, which answers its own errors; every other request goes down the chain.

        A socket's handler runs for the socket's whole life, and every middleware that awaits it
        keeps a coroutine frame (~300 B) per socket for as long; this one is a plain function
        that hands over the handler's coroutine, so it keeps none.
        """
        if request.match_info.route is self._socket_route and is_websocket_upgrade(request):
            ws = self.socket_response()
            if ws.can_prepare(request).ok:
                return self.serve_socket(request, ws)
        return handler(request)

    async def socket(self, request: web.Request) -> web.StreamResponse:
        """Realtime: history after `after`, then live frames of the conversation.

        Reached through the middlewares only by a request that cannot become a socket (a 400
        once its session is checked); a handshake goes to `serve_socket` straight
        (`socket_middleware`).
        """
        return await self.serve_socket(request, self.socket_response())

    async def serve_socket(self, request: web.Request, ws: web.WebSocketResponse) -> web.StreamResponse:
        """Realtime: history after `after`, then live frames of the conversation.

        Auth failures on an upgrade are reported in-band (an `error` frame, then close code
        4000 + HTTP status) because browsers cannot read a refused handshake's status.
        """
        upgrade = ws.can_prepare(request).ok
        # The request's span covers the handshake and the history replay, not the socket's life.
        with server_span(request) if is_websocket_upgrade(request) else contextlib.nullcontext():
            try:
                claims, conversation_id, after = await self._socket_session(request)
            except ApiError as exc:
                if not upgrade:
                    raise
                await ws.prepare(request)
                await ws.send_str(encode_frame(ErrorFrame(status=exc.status, code=exc.code, title=exc.title)))
                await ws.close(code=SOCKET_CLOSE_BASE + exc.status, message=exc.code.encode()[:100])
                return ws
            except Exception:
                if not upgrade:
                    raise
                # What error_middleware answers, which a handshake passes by (socket_middleware).
                log.exception("unhandled error on %s %s", request.method, request.path)
                return error_response(500, "Internal error")
            if not upgrade:
                raise ApiError(400, "Expected a WebSocket upgrade")
            await ws.prepare(request)
            listener = SocketListener(self.sdk.socket_queue_size, self._drain_socket, ws=ws, claims=claims,
                                      conversation_id=conversation_id, after=after or 0,
                                      transport=request.transport, now=asyncio.get_running_loop().time())
            self.sockets[ws] = listener
            metrics.websocket_opened(self.name)
            socket_id = new_id()
            self.presence.open(socket_id, self.socket_presence(claims, conversation_id))
            try:
                # Listen before reading history so nothing published in between is lost.
                try:
                    await self.hub.add(conversation_id, listener)
                except (nats.errors.Error, TimeoutError) as exc:  # NATS away: the client comes back
                    log.warning("socket not followed, NATS unavailable: %s", exc)
                    await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"try again")
                    live = False
                else:
                    live = await self._replay(listener, after)
            except BaseException:
                await self._forget_socket(listener, socket_id)
                raise
        try:
            if live:
                listener.go_live()
                # `receive` rather than `async for`, whose `__anext__` would be one more frame
                # kept for the socket's life.
                while (msg := await ws.receive()).type not in _SOCKET_ENDS:
                    # Clients only listen: what they send only shows that they are there (a
                    # pong answers `_ping_idle_sockets`), and their pings are answered.
                    listener.heard = asyncio.get_running_loop().time()
                    listener.pinged = 0.0
                    if msg.type is WSMsgType.PING:
                        await ws.pong(msg.data)
        finally:
            await self._forget_socket(listener, socket_id)
        return ws

    async def _socket_session(self, request: web.Request) -> tuple[SessionClaims, str, int | None]:
        """The socket's session, its conversation and its `after` cursor. The parsed query (the
        token with it) is dropped on return, not kept by the socket's frame for its whole life;
        the ids every socket of an app shares are interned, and the conversation id is the path's."""
        query = socket_query(request.rel_url.raw_query_string)
        claims, conversation_id = await self.authorize(request, query.get("token"))
        after = parse_cursor(query.get("after"))
        claims = msgspec.structs.replace(
            claims, typ="session", app=sys.intern(claims.app), integration=sys.intern(claims.integration),
            conversation=conversation_id if claims.conversation == conversation_id else claims.conversation)
        return claims, conversation_id, after

    async def _forget_socket(self, listener: SocketListener, socket_id: str) -> None:
        await listener.stop()
        self.presence.close(socket_id)
        self.hub.remove(listener.conversation_id, listener)
        if listener.ws is not None and self.sockets.pop(listener.ws, None) is not None:
            metrics.websocket_closed(self.name)

    async def _send_message(self, listener: SocketListener, frame: QueuedFrame) -> None:
        assert listener.ws is not None and listener.claims is not None
        if frame.ws_ping:
            await listener.ws.ping()
        if not frame.text:
            return
        listener.last_sent = asyncio.get_running_loop().time()
        await listener.ws.send_str(frame.text)
        if frame.business_message_id is not None:
            await self.business_message_delivered(listener.claims, listener.conversation_id,
                                                  frame.business_message_id)

    async def _replay(self, listener: SocketListener, after: int | None) -> bool:
        """History after `after` (or the latest page), then the ready frame; False when the
        socket was closed instead (its session ended, or history failed)."""
        ws, claims, watermark = listener.ws, listener.claims, listener.watermark
        assert ws is not None and claims is not None
        try:
            last_read: str | None = None
            while True:
                page = await self.history(claims, listener.conversation_id,
                                          watermark.high if after is not None else None, HISTORY_PAGE_LIMIT)
                last_read = business_last_read(page)
                entries = history_entries(page)
                for entry in entries:
                    if watermark.admit(entry.cursor):
                        await self._send_message(listener, queued_frame(
                            MessageFrame(cursor=entry.cursor, message=entry.message)))
                # Without `after` only the latest page is replayed; with it, every page.
                if after is None or not page.has_more or not entries:
                    break
            await ws.send_str(encode_frame(ReadyFrame(cursor=watermark.high, ping_interval=self.sdk.ping_interval,
                                                      business_last_read=last_read)))
            listener.last_sent = asyncio.get_running_loop().time()
            return True
        except ApiError as exc:
            with contextlib.suppress(Exception):
                await ws.send_str(encode_frame(ErrorFrame(status=exc.status, code=exc.code, title=exc.title)))
                code = SOCKET_CLOSE_BASE + exc.status if exc.status < 500 else WSCloseCode.TRY_AGAIN_LATER
                await ws.close(code=code, message=exc.code.encode()[:100])
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("socket history replay failed")
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
        return False

    async def _drain_socket(self, listener: SocketListener) -> None:
        """Send a live socket's pending frames in order, then end (`SocketListener.wake`)."""
        ws = listener.ws
        assert ws is not None
        try:
            while not ws.closed:
                if listener.overflowed:
                    await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow, resume by cursor")
                    return
                if not listener.pending:
                    return
                frame = listener.pending.popleft()
                if frame.cursor is not None and not listener.watermark.admit(frame.cursor):
                    continue
                await self._send_message(listener, frame)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("socket send failed")
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
        finally:
            listener.sender = None
            if not listener.pending:
                listener.pending = None

    async def _ping_idle_sockets(self) -> None:
        """One task pings every socket, visiting a slice of them every PING_TICK seconds (each
        socket about once per interval): no burst, and no timer per socket.

        - A `ping` frame to every socket that sent nothing for half a ping interval, so clients
          can tell a live connection from a dead one.
        - A WebSocket ping to every socket whose client was not heard from for a ping interval
          (at least a second; browsers answer it by themselves), and the connection dropped when
          that ping is still unanswered half an interval later: the socket of a client that
          vanished without closing is not held for ever (what aiohttp's heartbeat did, with a
          timer per socket).
        """
        interval = self.sdk.ping_interval
        liveness = max(interval, 1.0)
        tick = min(PING_TICK_SECONDS, interval / 4)
        loop = asyncio.get_running_loop()
        visiting: list[SocketListener] = []
        while True:
            await asyncio.sleep(tick)
            if not visiting:
                visiting = list(self.sockets.values())
                visiting.reverse()  # popped from the end: oldest first
            at = loop.time()
            text = encode_frame(ping_frame(now()))
            frames = {(True, False): QueuedFrame(text), (False, True): QueuedFrame("", ws_ping=True),
                      (True, True): QueuedFrame(text, ws_ping=True)}
            for _ in range(min(len(visiting), math.ceil(len(self.sockets) * tick / interval) + 1)):
                listener = visiting.pop()
                if not listener.live:
                    continue
                if listener.pinged and at - listener.pinged >= liveness / 2:
                    listener.live = False
                    if listener.transport is not None:
                        listener.transport.abort()  # its socket's handler ends with the connection
                    continue
                ping_text = at - listener.last_sent >= interval / 2
                ws_ping = not listener.pinged and at - listener.heard >= liveness
                if ping_text or ws_ping:
                    if ping_text:
                        listener.last_sent = at
                    if ws_ping:
                        listener.pinged = at
                    listener.offer(frames[ping_text, ws_ping])

    # --- socket presence ----------------------------------------------------------------------

    async def presence_bucket(self) -> KeyValue:
        """The presence KV bucket (opened, with its TTL, by `start_sdk`)."""
        return self.presence_kv

    def socket_presence(self, claims: SessionClaims, conversation_id: str) -> sdk_presence.SocketPresence:
        """The presence entry of a socket of `claims` on `conversation_id`."""
        record = self.integrations.get(claims.integration)
        channel_name = self.channel_of(record) if isinstance(record, IntegrationRecord) else self.name
        return sdk_presence.SocketPresence(
            app_id=claims.app, user_id=claims.user, client_id=claims.client, conversation_id=conversation_id,
            integration_id=claims.integration, channel=channel_name, replica_id=self.presence.replica_id,
            written_at=now())
