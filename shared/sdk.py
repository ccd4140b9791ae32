"""The SDK wire protocol: what the web widget (and a future in-app SDK) exchanges with Threadline.

HTTP request/response bodies and WebSocket frames are camelCase JSON, like the business API.
Session and refresh tokens are `shared.signing.sign_token` over `SessionClaims`, so the SDK
services stay stateless. `services/web/README.md` documents the endpoints that use these shapes.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.ids import iso
from shared.signing import sign_token, verify_token
from shared.sunco import ActivityType, Author, FormFieldType, FormOption, Message, Wire, api_content

# Limits the SDK endpoints enforce.
MAX_TEXT_LENGTH = 4096
MAX_CLIENT_MESSAGE_ID_LENGTH = 128
MAX_PAYLOAD_LENGTH = 1000  # a button's payload (the business API's limit)
MAX_LOCATION_TEXT_LENGTH = 256  # a shared location's name, its address
MAX_FORM_FIELDS = 20
MAX_FORM_LABEL_LENGTH = 128  # a form field's name and label, an option's name and label
MAX_FORM_TEXT_LENGTH = 256
MAX_FORM_EMAIL_LENGTH = 128
MAX_MEDIA_URL_LENGTH = 2048  # an image's or a file's URL (one of Threadline's attachment URLs)
MAX_ALT_TEXT_LENGTH = 512  # an image's or a file's altText (the widget sends the file's name)
HISTORY_PAGE_LIMIT = 100


# --- session ---------------------------------------------------------------------------------

TokenType = Literal["session", "refresh"]


class SessionClaims(msgspec.Struct, kw_only=True, frozen=True):
    """What a session token proves: this browser is `user`/`client` of `app` via `integration`.

    A session starts *pending*: `user`, `client` and `conversation` are empty until its first
    message creates them (a pending session can do nothing else), so opening the widget creates
    nobody. `conversation` is the conversation the session was created for (a fast path for
    access checks; other conversations of the user are checked with `conversations`).

    `typ` tells the short-lived bearer token (`session`, on every request and the socket URL)
    from the long-lived `refresh` token (only ever in the body of `POST …/sessions/refresh`).
    `iat`/`exp` are the token's own times, `sst` when the session started (kept by refreshes and
    logins, for the optional absolute session age). All are integers (seconds since the epoch).
    """

    typ: TokenType
    app: str
    integration: str
    channel_user_id: str
    user: str = ""
    client: str = ""
    conversation: str = ""
    iat: int
    exp: int
    sst: int

    @property
    def pending(self) -> bool:
        """True until the session's first message created its user, client and conversation."""
        return not self.user

    def to_token(self, secret: str) -> str:
        """Sign the claims into a token."""
        return sign_token(secret, msgspec.structs.asdict(self))

    @classmethod
    def from_token(cls, secret: str, token: str) -> SessionClaims | None:
        """The claims of an authentic token, or None (forged, malformed, missing fields, or a
        field of the wrong type: a string `exp` is refused, not ignored)."""
        fields = verify_token(secret, token)
        if fields is None:
            return None
        try:
            return msgspec.convert(fields, cls, strict=True)
        except msgspec.ValidationError:
            return None


class SessionCreated(Wire, kw_only=True):
    """Answer of `POST .../integrations/{integrationId}/sessions` (and of every call that gives
    the client a new session: its first message, a login, a refresh).

    `sessionToken` expires at `expiresAt`; `refreshToken` gets a new pair before or after that
    (`POST …/sessions/refresh`). A pending session has no `appUserId`/`clientId`/`conversationId`
    yet: its first message (`POST …/conversations`) creates them.
    """

    session_token: str
    refresh_token: str
    expires_at: str
    app_user_id: str | None = None
    client_id: str | None = None
    conversation_id: str | None = None


class SessionBody(Wire, kw_only=True):
    """Body of `POST .../integrations/{integrationId}/sessions` (optional, every SDK).

    `linkCode`: a handoff code (the web page's `threadline_code`, the app's universal link
    `code`) to redeem: the session then joins the code's user and conversation.
    """

    link_code: str | None = None


class RefreshBody(Wire, kw_only=True):
    """Body of `POST .../sessions/refresh`."""

    refresh_token: str


class LoginBody(Wire, kw_only=True):
    """Body of `POST .../sessions/login`: the SDK user logs in (`Threadline.login`)."""

    external_id: str
    jwt: str


class LoginResult(SessionCreated, kw_only=True):
    """Answer of `POST .../sessions/login`: a new session for the user that survived.

    `outcome`: `identified` (the visitor took the externalId), `merged` (the visitor was merged
    into the user who had it), `unchanged` (the visitor was that user already) or `separated`
    (the visitor's user also held clients the JWT does not prove, such as a channel whose link
    this browser opened: this session alone moved to the account, on the account's conversation).
    """

    external_id: str
    outcome: str


class IntegrationConfig(Wire, kw_only=True):
    """Public settings of a web integration (what the widget may show)."""

    integration_id: str
    display_name: str | None = None
    business_name: str | None = None
    business_icon_url: str | None = None
    brand_color: str | None = None
    # The largest file the widget may upload (`POST …/attachments`), in bytes.
    max_upload_bytes: int | None = None


# --- messages and activity -------------------------------------------------------------------

class PostLocation(Wire, kw_only=True):
    """A location the customer shares (`PostMessage.location`): coordinates, and optionally
    the place's name and address."""

    lat: float
    long: float
    name: str | None = None
    address: str | None = None


class PostFormField(Wire, kw_only=True):
    """One answered field of a form (`PostMessage.formResponse.fields`): the form field's
    `type`, `name` and `label`, and its value in `text`, `email` or `select` (one option)."""

    type: FormFieldType
    name: str
    label: str
    text: str | None = None
    email: str | None = None
    select: list[FormOption] | None = None


class PostFormResponse(Wire, kw_only=True):
    """The customer's answer to the form message `quotedMessageId` (`PostMessage.formResponse`)."""

    quoted_message_id: str
    fields: list[PostFormField]


class PostMedia(Wire, kw_only=True):
    """An image or a file the customer sends (`PostMessage.image`, `PostMessage.file`): what
    `POST .../attachments` answered (`mediaUrl`, `mediaType`), and its `altText` (the widget and
    the sandbox app send the file's name, as SunCo's file messages carry it)."""

    media_url: str
    media_type: str
    alt_text: str | None = None


class PostMessage(Wire, kw_only=True):
    """Body of `POST .../conversations/{conversationId}/messages` (and of a session's first
    message, `POST .../conversations`).

    `clientMessageId` is chosen by the client (a UUID) and makes retries idempotent; it comes
    back as `message.source.originalMessageId`.

    The message is exactly one of: a `text`; a tap on a business's reply or postback button
    (`payload`: the button's payload, `text`: its label); a shared `location`; a
    `formResponse` to a form message (`text` empty for these two); or an `image` or a `file`
    uploaded with `POST .../attachments` (`text`, if any, is its caption).
    """

    client_message_id: str
    text: str = ""
    payload: str | None = None
    location: PostLocation | None = None
    form_response: PostFormResponse | None = None
    image: PostMedia | None = None
    file: PostMedia | None = None


class UploadedAttachment(Wire, kw_only=True):
    """A file the customer uploaded: its public URL and type, to send as an image or a file."""

    media_url: str
    media_type: str


class AttachmentUploaded(Wire, kw_only=True):
    """Answer (201) of `POST .../attachments` (the shape of SunCo's attachment upload)."""

    attachment: UploadedAttachment


class MessageAccepted(Wire, kw_only=True):
    """Answer (202) of a message post: the message is durably queued."""

    client_message_id: str
    duplicate: bool = False


class SessionStarted(SessionCreated, kw_only=True):
    """Answer (201) of a pending session's first message (`POST .../conversations`): the user,
    client and conversation it created, the session's new tokens, and the message, queued."""

    client_message_id: str
    duplicate: bool = False


class PostActivity(Wire, kw_only=True):
    """Body of `POST .../conversations/{conversationId}/activity`."""

    type: ActivityType


class HistoryEntry(Wire, kw_only=True):
    """A message with its position in the conversation's history."""

    cursor: int
    message: Message


class MessagesPage(Wire, kw_only=True):
    """Answer of `GET .../conversations/{conversationId}/messages`."""

    messages: list[HistoryEntry]
    has_more: bool
    business_last_read: str | None = None


def sdk_message(message: Message) -> Message:
    """A message as the SDK shows it (unsupported content rendered as text)."""
    return msgspec.structs.replace(message, content=api_content(message.content))


# --- socket frames (server → client) ---------------------------------------------------------

class Frame(Wire, tag_field="type", kw_only=True):
    """Base of the frames the SDK socket sends."""


class MessageFrame(Frame, tag="message", kw_only=True):
    """A message in the conversation (history replay and live)."""

    cursor: int
    message: Message


class TypingFrame(Frame, tag="typing", kw_only=True):
    """The business started (`active`) or stopped typing."""

    active: bool
    author: Author | None = None


class ReadFrame(Frame, tag="read", kw_only=True):
    """The business read the conversation at `at` (ISO time)."""

    at: str
    author: Author | None = None


DeliveryFrameStatus = Literal["sent", "delivered", "read", "failed"]


class DeliveryFrame(Frame, tag="delivery", kw_only=True):
    """A delivery report about a message of the conversation."""

    message_id: str
    status: DeliveryFrameStatus


class ReadyFrame(Frame, tag="ready", kw_only=True):
    """Sent once the history replay is complete; live frames follow.

    `cursor` is the highest cursor sent so far (resume with `after=` it); `pingInterval` the
    seconds between server pings (a client that hears nothing for ~2.5 intervals reconnects).
    """

    cursor: int
    ping_interval: float
    business_last_read: str | None = None


class PingFrame(Frame, tag="ping", kw_only=True):
    """Heartbeat (browsers cannot see WebSocket-level pings)."""

    at: str


class ChannelFrame(Frame, tag="channel", kw_only=True):
    """The conversation moved to another channel (`moved`: the customer continues there), or a
    link to one was refused (`failed`, with the reason to show)."""

    status: Literal["moved", "failed"]
    client_type: str
    integration_id: str | None = None
    message: str | None = None


class ErrorFrame(Frame, tag="error", kw_only=True):
    """Sent before the server closes the socket with code 4000 + `status`."""

    status: int
    code: str
    title: str


FrameUnion = (
    MessageFrame | TypingFrame | ReadFrame | DeliveryFrame | ReadyFrame | PingFrame | ErrorFrame | ChannelFrame
)

_FRAME_ENCODER = msgspec.json.Encoder()
_FRAME_DECODER: msgspec.json.Decoder[FrameUnion] = msgspec.json.Decoder(FrameUnion)


def encode_frame(frame: Frame) -> str:
    """A frame as the JSON text sent on the socket."""
    return _FRAME_ENCODER.encode(frame).decode()


def decode_frame(data: str | bytes) -> FrameUnion:
    """Decode a socket frame (clients and tests)."""
    return _FRAME_DECODER.decode(data)


def ping_frame(now: float) -> PingFrame:
    """A heartbeat frame stamped with `now` (unix seconds)."""
    return PingFrame(at=iso(now))
