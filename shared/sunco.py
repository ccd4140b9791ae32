"""Sunshine Conversations v2 wire models (camelCase on the wire) that cross service boundaries.

These are the exact shapes the business API returns and the business webhooks carry, so that
the official `sunshine-conversations-client` parses them. REST-only request bodies live in the
`conversations` service; what more than one service needs lives here.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

ClientType = Literal[
    "apple", "gbm", "googlercs", "instagram", "kakao", "line", "mailgun", "messagebird", "messenger",
    "slackconnect", "sdk", "telegram", "twilio", "twitter", "viber", "wechat", "whatsapp",
]
ClientStatus = Literal["active", "blocked", "inactive", "pending"]
IntegrationType = Literal[
    "android", "apple", "custom", "instagram", "ios", "line", "mailgun", "messagebird", "messenger",
    "telegram", "twilio", "twitter", "unity", "viber", "web", "whatsapp",
]
ConversationType = Literal["personal", "sdkGroup"]
AuthorType = Literal["business", "user"]
ActivityType = Literal["conversation:read", "typing:start", "typing:stop"]


class Wire(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """Base for SunCo wire structs: camelCase keys, unset optionals omitted."""


# --- message content -------------------------------------------------------------------------

class ActionBase(Wire, tag_field="type"):
    text: str = ""
    metadata: dict[str, Any] | None = None


class PostbackAction(ActionBase, tag="postback", kw_only=True):
    payload: str = ""


class ReplyAction(ActionBase, tag="reply", kw_only=True):
    payload: str = ""
    icon_url: str | None = None


class LinkAction(ActionBase, tag="link", kw_only=True):
    uri: str = ""
    default: bool | None = None


class WebviewAction(ActionBase, tag="webview", kw_only=True):
    uri: str = ""
    fallback: str = ""
    size: str | None = None


class LocationRequestAction(ActionBase, tag="locationRequest", kw_only=True):
    pass


class BuyAction(ActionBase, tag="buy", kw_only=True):
    amount: int = 0  # in cents
    currency: str | None = None
    uri: str | None = None


Action = PostbackAction | ReplyAction | LinkAction | WebviewAction | LocationRequestAction | BuyAction


class ContentBase(Wire, tag_field="type"):
    pass


class TextContent(ContentBase, tag="text", kw_only=True):
    text: str = ""
    html_text: str | None = None
    markdown_text: str | None = None
    actions: list[Action] | None = None
    payload: str | None = None


class ImageContent(ContentBase, tag="image", kw_only=True):
    media_url: str = ""
    media_type: str | None = None
    alt_text: str | None = None
    text: str | None = None
    actions: list[Action] | None = None


class FileContent(ContentBase, tag="file", kw_only=True):
    media_url: str = ""
    media_type: str | None = None
    media_size: int | None = None
    alt_text: str | None = None
    text: str | None = None


class LocationCoordinates(Wire, kw_only=True):
    lat: float
    long: float


class LocationInfo(Wire, kw_only=True):
    name: str | None = None
    address: str | None = None


class LocationContent(ContentBase, tag="location", kw_only=True):
    coordinates: LocationCoordinates
    location: LocationInfo | None = None


class Item(Wire, kw_only=True):
    """One card of a carousel or row of a list."""

    title: str
    description: str | None = None
    media_url: str | None = None
    media_type: str | None = None
    alt_text: str | None = None
    size: str | None = None
    actions: list[Action] = []
    metadata: dict[str, Any] | None = None


class CarouselDisplaySettings(Wire, kw_only=True):
    image_aspect_ratio: str | None = None


class CarouselContent(ContentBase, tag="carousel", kw_only=True):
    items: list[Item]
    text: str | None = None  # the fallback where a channel has no carousel
    block_chat_input: bool | None = None
    display_settings: CarouselDisplaySettings | None = None


class ListContent(ContentBase, tag="list", kw_only=True):
    items: list[Item]
    actions: list[Action] | None = None
    block_chat_input: bool | None = None


class FormOption(Wire, kw_only=True):
    name: str
    label: str


FormFieldType = Literal["text", "email", "select"]


class FormField(Wire, kw_only=True):
    """A field of a form (what to ask) or of a formResponse (what was answered: `text`,
    `email` or `select`)."""

    type: FormFieldType
    name: str
    label: str
    placeholder: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    options: list[FormOption] | None = None
    text: str | None = None
    email: str | None = None
    select: list[FormOption] | None = None
    quoted_message_id: str | None = None


class FormContent(ContentBase, tag="form", kw_only=True):
    fields: list[FormField]
    submitted: bool | None = None
    block_chat_input: bool | None = None


class FormResponseContent(ContentBase, tag="formResponse", kw_only=True):
    fields: list[FormField]
    text_fallback: str | None = None


class TemplateContent(ContentBase, tag="template", kw_only=True):
    """A WhatsApp template in the native WhatsApp schema (SunCo `schema: "whatsapp"`)."""

    template: dict[str, Any]


class UnsupportedContent(ContentBase, tag="unsupported", kw_only=True):
    """A message type Threadline cannot represent; kept with the platform's raw payload.

    Never sent on the SunCo wire as is: the API renders it as text (see `api_content`).
    """

    channel_type: str = ""
    raw: dict[str, Any] = {}


Content = (TextContent | ImageContent | FileContent | LocationContent | CarouselContent | ListContent | FormContent
           | FormResponseContent | TemplateContent | UnsupportedContent)


def api_content(content: Content) -> Content:
    """The content as the SunCo API shows it: unsupported content becomes a descriptive text."""
    if isinstance(content, UnsupportedContent):
        return TextContent(text=f"[unsupported {content.channel_type or 'message'} message]")
    return content


# --- messages --------------------------------------------------------------------------------

class Author(Wire, kw_only=True):
    type: AuthorType
    subtypes: list[str] | None = None
    user_id: str | None = None
    user_external_id: str | None = None
    display_name: str | None = None
    avatar_url: str | None = None


class SourceClient(Wire, kw_only=True):
    id: str
    type: ClientType
    integration_id: str | None = None
    external_id: str | None = None


class Source(Wire, kw_only=True):
    type: str
    integration_id: str | None = None
    original_message_id: str | None = None
    original_message_timestamp: str | None = None
    client: SourceClient | None = None


class QuotedMessage(Wire, kw_only=True):
    # No default: omit_defaults would drop it, and the official client needs it to parse.
    type: Literal["message", "externalMessageId"]
    external_message_id: str | None = None


class Message(Wire, kw_only=True):
    id: str
    received: str
    author: Author
    content: Content
    source: Source | None = None
    metadata: dict[str, Any] | None = None
    quoted_message: QuotedMessage | None = None
    deleted: bool | None = None


# --- users and clients -----------------------------------------------------------------------

class Profile(Wire, kw_only=True):
    given_name: str | None = None
    surname: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    locale: str | None = None


class User(Wire, kw_only=True):
    id: str
    external_id: str | None = None
    signed_up_at: str | None = None
    authenticated: bool = False
    profile: Profile = msgspec.field(default_factory=Profile)
    metadata: dict[str, Any] = {}
    identities: list[dict[str, Any]] = []


class Client(Wire, kw_only=True):
    id: str
    type: ClientType
    status: ClientStatus
    integration_id: str | None = None
    external_id: str | None = None
    last_seen: str | None = None
    linked_at: str | None = None
    display_name: str | None = None
    avatar_url: str | None = None
    info: dict[str, Any] | None = None
    raw: dict[str, Any] | None = None


DeviceType = Literal["android", "ios", "web"]
DeviceStatus = Literal["active", "inactive"]


class Device(Wire, kw_only=True):
    """An SDK install under the user's `sdk` client (SunCo's Device)."""

    id: str
    type: DeviceType
    guid: str
    client_id: str
    status: DeviceStatus
    integration_id: str
    last_seen: str | None = None
    push_notification_token: str | None = None
    info: dict[str, Any] | None = None
    app_version: str | None = None


# --- conversations ---------------------------------------------------------------------------

class SwitchboardIntegrationRef(Wire, kw_only=True):
    """A switchboard integration as a conversation names it (SunCo's SwitchboardIntegrationWebhook).
    Events carry only its id; the webhook payload and the API fill in the rest."""

    id: str
    name: str | None = None
    integration_id: str | None = None
    integration_type: str | None = None


class ConversationRef(Wire, kw_only=True):
    id: str
    type: ConversationType
    # The switchboard integration in control of the conversation, and the one offered control.
    active_switchboard_integration: SwitchboardIntegrationRef | None = None
    pending_switchboard_integration: SwitchboardIntegrationRef | None = None


class Activity(Wire, kw_only=True):
    type: ActivityType
    source: Source | None = None
    author: Author | None = None


class Destination(Wire, kw_only=True):
    type: str
    integration_id: str | None = None


class ExternalMessage(Wire, kw_only=True):
    id: str


class DeliveryError(Wire, kw_only=True):
    code: str
    message: str | None = None
    underlying_error: dict[str, Any] | None = None


class UserRef(Wire, kw_only=True):
    id: str
    external_id: str | None = None


ENCODER = msgspec.json.Encoder()


def to_wire(obj: Any) -> Any:
    """Builtins (dicts, lists) of a wire struct, ready to embed in a JSON body."""
    return msgspec.to_builtins(obj)
