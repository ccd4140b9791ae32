"""REST request bodies and response objects of the business API (SunCo v2 wire shapes).

Request bodies are decoded strictly (enums are Literals, so an invalid value is a 400);
unknown fields are ignored, as SunCo does.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from shared.http import ApiError
from shared.records import NotificationSettings
from shared.render import form_response_text
from shared.sunco import (
    Action,
    ActivityType,
    Author,
    BuyAction,
    CarouselContent,
    Client,
    ClientType,
    Content,
    ConversationType,
    Device,
    FileContent,
    FormContent,
    FormField,
    FormResponseContent,
    ImageContent,
    IntegrationType,
    Item,
    LinkAction,
    ListContent,
    LocationContent,
    LocationRequestAction,
    Message,
    PostbackAction,
    Profile,
    ReplyAction,
    SwitchboardIntegrationRef,
    TextContent,
    User,
    WebviewAction,
    Wire,
)
from shared.untrusted import decode_json, is_email_address

# --- shared pieces ---------------------------------------------------------------------------

WEBHOOK_TRIGGERS = frozenset({
    "client:add", "client:remove", "client:update", "conversation:create", "conversation:join",
    "conversation:leave", "conversation:remove", "conversation:message", "conversation:message:delivery:channel",
    "conversation:message:delivery:failure", "conversation:message:delivery:user", "conversation:postback",
    "conversation:read", "conversation:referral", "passthrough:messaging", "conversation:typing",
    "switchboard:acceptControl", "switchboard:acceptControl:failure", "switchboard:offerControl",
    "switchboard:offerControl:failure", "switchboard:passControl", "switchboard:passControl:failure",
    "switchboard:releaseControl", "user:merge", "user:update", "user:remove",
    # Threadline extension (SunCo v1 names): away notifications sent or failed (`notifications`).
    "notification:delivery:channel", "notification:delivery:failure",
})
AUTHOR_SUBTYPES = frozenset({"AI", "activity"})
MAX_METADATA_BYTES = 4096
# Integration types this server can create (the others are valid SunCo enums, refused with 400).
SUPPORTED_INTEGRATIONS = ("custom", "web", "whatsapp", "messenger", "telegram", "twilio", "android", "ios",
                          "mailgun")
# Secrets never returned by the API (they stay in the DB and the KV record for channel services).
SECRET_FIELDS = frozenset({"accessToken", "appSecret", "accountManagementAccessToken", "pageAccessToken",
                           "token", "webhookSecret", "authToken", "privateKey", "serverKey", "certificate",
                           "password", "signingKey", "apiKey", "webhookSigningKey", "inboundSecret"})
DEFAULT_WHATSAPP_API_VERSION = "v23.0"
DEFAULT_GRAPH_BASE_URL = "https://graph.facebook.com"


class Meta(Wire, kw_only=True):
    has_more: bool
    after_cursor: str | None = None
    before_cursor: str | None = None


class Links(Wire, kw_only=True):
    prev: str | None = None
    next: str | None = None


# --- apps and keys ---------------------------------------------------------------------------

class AppSettings(Wire, kw_only=True):
    # Seconds of inactivity after which a conversation's messages are deleted (0: kept).
    conversation_retention_seconds: Annotated[int, msgspec.Meta(ge=0)] | None = None
    mask_credit_card_numbers: bool | None = None
    use_animal_names: bool | None = None
    echo_postback: bool | None = None
    ignore_auto_conversation_start: bool | None = None
    multi_convo_enabled: bool | None = None
    app_localization_enabled: bool | None = None
    # Threadline extension: away notifications (validated by `check_notification_settings`).
    notifications: NotificationSettings | None = None


class AppCreateBody(Wire, kw_only=True):
    display_name: str
    settings: AppSettings | None = None
    metadata: dict[str, Any] | None = None


class AppUpdateBody(Wire, kw_only=True):
    display_name: str | None = None
    settings: AppSettings | None = None
    metadata: dict[str, Any] | None = None


class App(Wire, kw_only=True):
    id: str
    display_name: str
    settings: dict[str, Any]
    metadata: dict[str, Any] | None = None


class AppKeyCreateBody(Wire, kw_only=True):
    display_name: str


class AppKey(Wire, kw_only=True):
    id: str
    display_name: str
    secret: str


# --- users (forwarded to identity) -----------------------------------------------------------

class UserCreateBody(Wire, kw_only=True):
    external_id: str | None = None
    signed_up_at: str | None = None
    to_be_retained: bool | None = None
    profile: Profile | None = None
    metadata: dict[str, Any] | None = None


class UserUpdateBody(Wire, kw_only=True):
    external_id: str | None = None
    signed_up_at: str | None = None
    to_be_retained: bool | None = None
    profile: Profile | None = None
    metadata: dict[str, Any] | None = None


# --- conversations ---------------------------------------------------------------------------

class ParticipantIn(Wire, kw_only=True):
    user_id: str | None = None
    user_external_id: str | None = None
    subscribe_sdk_client: bool | None = msgspec.field(default=None, name="subscribeSDKClient")


class ConversationCreateBody(Wire, kw_only=True):
    type: ConversationType
    participants: list[ParticipantIn] = []
    display_name: str | None = None
    description: str | None = None
    icon_url: str | None = None
    metadata: dict[str, Any] | None = None


class ConversationUpdateBody(Wire, kw_only=True):
    display_name: str | None = None
    description: str | None = None
    icon_url: str | None = None
    metadata: dict[str, Any] | None = None


class Conversation(Wire, kw_only=True):
    id: str
    type: ConversationType
    is_default: bool
    display_name: str | None = None
    description: str | None = None
    icon_url: str | None = None
    metadata: dict[str, Any] | None = None
    business_last_read: str | None = None
    last_updated_at: str | None = None
    created_at: str | None = None
    active_switchboard_integration: SwitchboardIntegrationRef | None = None
    pending_switchboard_integration: SwitchboardIntegrationRef | None = None


class ClientAssociation(Wire, kw_only=True):
    type: ClientType
    client_id: str


class Participant(Wire, kw_only=True):
    id: str
    user_id: str
    unread_count: int
    client_associations: list[ClientAssociation]
    user_external_id: str | None = None
    last_read: str | None = None


# --- messages and activity -------------------------------------------------------------------

class DestinationIn(Wire, kw_only=True):
    integration_id: str | None = None
    integration_type: str | None = None


MAX_TEXT_LENGTH = 4096  # SunCo's TextMessage limit (text, htmlText, markdownText)


def check_url(value: str | None, name: str) -> None:
    """400 unless `value` (when set) is an absolute http(s) URL.

    Message, author, profile and conversation URLs are rendered as links and images (the
    widget, the sandbox phones, the channels, the business's own agent tools): a `javascript:`
    or `data:` URL stored there would run in whoever opens it.
    """
    if not value:
        return
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ApiError(400, f"{name} must be an http(s) URL") from exc
    # Browsers drop whitespace and control characters from URLs, so `java\tscript:` is refused
    # outright rather than parsed differently here and there.
    if (parts.scheme.lower() not in ("http", "https") or not parts.netloc
            or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)):
        raise ApiError(400, f"{name} must be an http(s) URL")


MAX_ITEMS = 10  # carousel and list items, list actions
MAX_ITEM_ACTIONS = 3
MAX_FORM_FIELDS = 20
MAX_SELECT_OPTIONS = 200
MAX_LABEL_LENGTH = 128
MAX_PAYLOAD_LENGTH = 1000
# The actions a carousel or list may carry (SunCo's ActionSubset): nothing a customer types back.
ITEM_ACTIONS = (PostbackAction, LinkAction, WebviewAction, BuyAction)


def _check_actions(actions: Sequence[Action], where: str, allowed: tuple[type, ...] | None = None) -> None:
    for index, action in enumerate(actions):
        at = f"{where}[{index}]"
        if allowed is not None and not isinstance(action, allowed):
            raise ApiError(400, f"{at}.type {action.__class__.__name__} is not allowed here")
        if not isinstance(action, LocationRequestAction) and not action.text.strip():
            raise ApiError(400, f"{at}.text must not be empty")
        if len(action.text) > MAX_LABEL_LENGTH:
            raise ApiError(400, f"{at}.text exceeds {MAX_LABEL_LENGTH} characters")
        if isinstance(action, LinkAction | WebviewAction):
            check_url(action.uri, f"{at}.uri")
        if isinstance(action, WebviewAction):
            check_url(action.fallback, f"{at}.fallback")
        if isinstance(action, ReplyAction):
            check_url(action.icon_url, f"{at}.iconUrl")
        if isinstance(action, BuyAction):
            # SunCo's buy has no link of its own (its checkout was SunCo's); Threadline's optional
            # `uri` is where the customer pays, shown as a link where there is one.
            check_url(action.uri, f"{at}.uri")
            if action.amount <= 0:
                raise ApiError(400, f"{at}.amount must be a positive number of cents")
        if isinstance(action, ReplyAction | PostbackAction) and not 1 <= len(action.payload) <= MAX_PAYLOAD_LENGTH:
            raise ApiError(400, f"{at}.payload must be 1 to {MAX_PAYLOAD_LENGTH} characters (what a tap sends back)")
        check_metadata(action.metadata)


def _check_items(items: Sequence[Item], where: str) -> None:
    if not 1 <= len(items) <= MAX_ITEMS:
        raise ApiError(400, f"{where} must have 1 to {MAX_ITEMS} items")
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if not item.title.strip() or len(item.title) > MAX_LABEL_LENGTH:
            raise ApiError(400, f"{at}.title must be 1 to {MAX_LABEL_LENGTH} characters")
        if item.description is not None and len(item.description) > MAX_LABEL_LENGTH:
            raise ApiError(400, f"{at}.description exceeds {MAX_LABEL_LENGTH} characters")
        check_url(item.media_url, f"{at}.mediaUrl")
        if not 1 <= len(item.actions) <= MAX_ITEM_ACTIONS:
            raise ApiError(400, f"{at}.actions must have 1 to {MAX_ITEM_ACTIONS} actions")
        _check_actions(item.actions, f"{at}.actions", ITEM_ACTIONS)
        check_metadata(item.metadata)


def _check_form_fields(fields: Sequence[FormField], where: str, answers: bool) -> None:
    if not 1 <= len(fields) <= MAX_FORM_FIELDS:
        raise ApiError(400, f"{where} must have 1 to {MAX_FORM_FIELDS} fields")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ApiError(400, f"{where} names must be unique")
    for index, form_field in enumerate(fields):
        at = f"{where}[{index}]"
        for name in ("name", "label"):
            value = getattr(form_field, name)
            if not value.strip() or len(value) > MAX_LABEL_LENGTH:
                raise ApiError(400, f"{at}.{name} must be 1 to {MAX_LABEL_LENGTH} characters")
        if answers:
            continue
        if any(v is not None for v in (form_field.text, form_field.email, form_field.select,
                                       form_field.quoted_message_id)):
            raise ApiError(400, f"{at}: a form asks; text, email, select and quotedMessageId are for its answer")
        if form_field.type == "select":
            options = form_field.options or []
            if not 1 <= len(options) <= MAX_SELECT_OPTIONS:
                raise ApiError(400, f"{at}.options must have 1 to {MAX_SELECT_OPTIONS} options")
            if len({o.name for o in options}) != len(options) or any(
                    not (1 <= len(o.name) <= MAX_LABEL_LENGTH and 1 <= len(o.label.strip()) <= MAX_LABEL_LENGTH)
                    for o in options):
                raise ApiError(400, f"{at}.options: names unique, names and labels 1 to {MAX_LABEL_LENGTH} characters")
        low, high = form_field.min_size or 1, form_field.max_size or 128
        if not 1 <= low <= high <= 256:
            raise ApiError(400, f"{at}: 1 <= minSize <= maxSize <= 256")




def answer_to_form(answer: FormResponseContent, form: FormContent, form_message_id: str) -> FormResponseContent:
    """`answer` as the form's answer, or 400 unless it is one: every field of the form answered
    once, with its type and a value the form allows (a text of its length, an e-mail address,
    one option it offered). What a person reads — the labels, the option labels and the
    `textFallback` — comes from the form, never from the customer."""
    asked = {f.name: f for f in form.fields}
    given_names = [f.name for f in answer.fields]
    if len(set(given_names)) != len(given_names):
        raise ApiError(400, "content.fields answers a field twice")
    fields: list[FormField] = []
    for index, given in enumerate(answer.fields):
        at = f"content.fields[{index}]"
        field = asked.get(given.name)
        if field is None or field.type != given.type:
            raise ApiError(400, f"{at} ({given.name!r}, {given.type}) is not a field of the form it answers")
        base = FormField(type=field.type, name=field.name, label=field.label, quoted_message_id=form_message_id)
        if given.type == "text":
            low, high = field.min_size or 1, field.max_size or 128
            if given.text is None or not low <= len(given.text) <= high:
                raise ApiError(400, f"{at}.text must be {low} to {high} characters")
            fields.append(msgspec.structs.replace(base, text=given.text))
        elif given.type == "email":
            if given.email is None or not is_email_address(given.email):
                raise ApiError(400, f"{at}.email must be an e-mail address")
            fields.append(msgspec.structs.replace(base, email=given.email))
        else:
            offered = {o.name: o for o in field.options or []}
            if not given.select or len(given.select) != 1 or given.select[0].name not in offered:
                raise ApiError(400, f"{at}.select must be one of the options the form offered")
            fields.append(msgspec.structs.replace(base, select=[offered[given.select[0].name]]))
    missing = sorted(set(asked) - set(given_names))
    if missing:
        raise ApiError(400, f"the form's fields {', '.join(missing)} are not answered")
    normalized = FormResponseContent(fields=fields)
    return msgspec.structs.replace(normalized, text_fallback=form_response_text(normalized))


def check_content(content: Content) -> None:
    """Refuse content SunCo would refuse, rather than storing it and failing at the channel;
    every URL in it must be http(s) (`check_url`)."""
    if isinstance(content, TextContent | ImageContent):
        _check_actions(content.actions or [], "content.actions")
    if isinstance(content, CarouselContent | ListContent):
        _check_items(content.items, "content.items")
    if isinstance(content, ListContent) and content.actions is not None:
        if len(content.actions) > MAX_ITEMS:
            raise ApiError(400, f"content.actions has at most {MAX_ITEMS} actions")
        _check_actions(content.actions, "content.actions", ITEM_ACTIONS)
    if isinstance(content, CarouselContent) and content.text is not None and len(content.text) > MAX_TEXT_LENGTH:
        raise ApiError(400, f"content.text exceeds {MAX_TEXT_LENGTH} characters")
    if isinstance(content, FormContent):
        _check_form_fields(content.fields, "content.fields", answers=False)
    if isinstance(content, LocationContent):
        coordinates = content.coordinates
        if not (math.isfinite(coordinates.lat) and math.isfinite(coordinates.long)
                and -90 <= coordinates.lat <= 90 and -180 <= coordinates.long <= 180):
            raise ApiError(400, "content.coordinates must be a latitude in [-90, 90] and a longitude in [-180, 180]")
    if isinstance(content, FormResponseContent):
        _check_form_fields(content.fields, "content.fields", answers=True)
    if isinstance(content, TextContent):
        if not content.text.strip():
            raise ApiError(400, "content.text must not be empty")
        for name in ("text", "html_text", "markdown_text"):
            value = getattr(content, name)
            if value is not None and len(value) > MAX_TEXT_LENGTH:
                raise ApiError(400, f"content.{name} exceeds {MAX_TEXT_LENGTH} characters")
    elif isinstance(content, ImageContent | FileContent):
        if not content.media_url:
            raise ApiError(400, "content.mediaUrl is required")
        check_url(content.media_url, "content.mediaUrl")
        if content.text is not None and len(content.text) > MAX_TEXT_LENGTH:
            raise ApiError(400, f"content.text exceeds {MAX_TEXT_LENGTH} characters")


class MessagePostBody(Wire, kw_only=True):
    author: Author
    content: Content
    destination: DestinationIn | None = None
    metadata: dict[str, Any] | None = None
    override: dict[str, Any] | None = None
    schema: Literal["whatsapp"] | None = None


class ActivityPostBody(Wire, kw_only=True):
    type: ActivityType
    author: Author


# --- integrations and webhooks ---------------------------------------------------------------

class WebhookCreateBody(Wire, kw_only=True):
    target: str
    triggers: list[str]
    include_full_user: bool = False
    include_full_source: bool = False


class WebhookUpdateBody(Wire, kw_only=True):
    target: str | None = None
    triggers: list[str] | None = None
    include_full_user: bool | None = None
    include_full_source: bool | None = None


class Webhook(Wire, kw_only=True):
    id: str
    version: str
    target: str
    triggers: list[str]
    secret: str
    # Required (not defaulted) so they are always on the wire.
    include_full_user: bool
    include_full_source: bool


class IntegrationTypeProbe(msgspec.Struct):
    """Only the discriminator of an integration body (validated against SunCo's enum)."""

    type: IntegrationType


class PrechatField(Wire, kw_only=True):
    type: str
    name: str
    label: str
    placeholder: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    options: list[dict[str, Any]] | None = None


class PrechatCapture(Wire, kw_only=True):
    avatar_url: str | None = None
    enabled: bool | None = None
    enable_email_linking: bool | None = None
    fields: list[PrechatField] | None = None


class CustomIntegrationIn(Wire, kw_only=True):
    display_name: str | None = None
    webhooks: list[WebhookCreateBody] = []


class CustomIntegrationUpdate(Wire, kw_only=True):
    display_name: str | None = None


class WebIntegrationIn(Wire, kw_only=True):
    display_name: str | None = None
    default_responder_id: str | None = None
    brand_color: str | None = None
    fixed_intro_pane: bool | None = None
    conversation_color: str | None = None
    action_color: str | None = None
    display_style: Literal["button", "tab"] | None = None
    button_icon_url: str | None = None
    button_width: str | None = None
    button_height: str | None = None
    integration_order: list[str] | None = None
    business_name: str | None = None
    business_icon_url: str | None = None
    background_image_url: str | None = None
    origin_whitelist: list[str] | None = None
    prechat_capture: PrechatCapture | None = None
    can_user_see_conversation_list: bool | None = None
    can_user_create_more_conversations: bool | None = None
    attachments_enabled: bool | None = None
    # Threadline: the page hosting the widget, where handoff links back to the web land.
    link_url: str | None = None


class WhatsappIntegrationIn(Wire, kw_only=True):
    """SunCo's WhatsApp fields plus what Threadline needs to call the Cloud API itself."""

    display_name: str | None = None
    default_responder_id: str | None = None
    hsm_fallback_language: str | None = None
    account_id: str | None = None
    account_management_access_token: str | None = None
    phone_number: str | None = None
    phone_number_id: str | None = None
    access_token: str | None = None
    app_secret: str | None = None
    verify_token: str | None = None
    api_version: str | None = None
    base_url: str | None = None


class MessengerIntegrationIn(Wire, kw_only=True):
    """SunCo's Messenger fields plus the webhook verify token and the Graph base/version."""

    display_name: str | None = None
    default_responder_id: str | None = None
    page_access_token: str | None = None
    app_id: str | None = None
    app_secret: str | None = None
    # SunCo's model types it as a number; Graph ids are digit strings. Stored as a string.
    page_id: str | int | None = None
    page_name: str | None = None
    verify_token: str | None = None
    api_version: str | None = None
    base_url: str | None = None
    # The Page has Meta's human_agent permission: replies 24 h–7 days after the customer's last
    # message go out with the HUMAN_AGENT tag instead of being refused.
    human_agent: bool | None = None


class TelegramIntegrationIn(Wire, kw_only=True):
    """SunCo's Telegram fields plus the Bot API base (the webhook secret is generated)."""

    display_name: str | None = None
    default_responder_id: str | None = None
    token: str | None = None
    username: str | None = None
    bot_id: str | None = None
    base_url: str | None = None


class TwilioIntegrationIn(Wire, kw_only=True):
    """SunCo's Twilio fields plus the sending number, the REST base and the public webhook URL
    the operator configured in Twilio (signatures are computed over it)."""

    display_name: str | None = None
    default_responder_id: str | None = None
    account_sid: str | None = None
    auth_token: str | None = None
    phone_number_sid: str | None = None
    messaging_service_sid: str | None = None
    phone_number: str | None = None
    base_url: str | None = None
    webhook_url: str | None = None


class AndroidIntegrationIn(Wire, kw_only=True):
    """SunCo's Android fields (FCM HTTP v1 service account) plus the token and FCM endpoints.

    `serverKey`/`senderId` (FCM's retired legacy API) are kept for SunCo clients but unused.
    """

    display_name: str | None = None
    default_responder_id: str | None = None
    project_id: str | None = None
    client_email: str | None = None
    private_key: str | None = None
    server_key: str | None = None
    sender_id: str | None = None
    token_uri: str | None = None
    base_url: str | None = None
    # Threadline: the app's https universal/app link that handoff links open (`?code=` added).
    universal_link: str | None = None
    can_user_see_conversation_list: bool | None = None
    can_user_create_more_conversations: bool | None = None
    attachments_enabled: bool | None = None


class IosIntegrationIn(Wire, kw_only=True):
    """An iOS app with token-based APNs: the .p8 signing key, its key id, the team and bundle ids.

    SunCo's certificate-based `certificate`/`password` are refused: Apple's token-based auth
    does not expire yearly and is what a new integration should use.
    """

    display_name: str | None = None
    default_responder_id: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    bundle_id: str | None = None
    signing_key: str | None = None
    production: bool | None = None
    base_url: str | None = None
    universal_link: str | None = None
    certificate: str | None = None
    password: str | None = None
    auto_update_badge: bool | None = None
    can_user_see_conversation_list: bool | None = None
    can_user_create_more_conversations: bool | None = None
    attachments_enabled: bool | None = None


class MailgunIntegrationIn(Wire, kw_only=True):
    """SunCo's e-mail integration (`mailgun`), which Threadline sends over SMTP (notifications).

    SunCo's fields: `domain`, `incomingAddress`, `fromAddress`, `hideUnsubscribeLink` and
    `apiKey`. `apiKey` is accepted and kept write-only (like every secret) for compatibility, but
    is never used: Threadline does not call Mailgun's HTTP API, it sends through Mailgun's SMTP
    relay (or any SMTP server). `hideUnsubscribeLink` is stored but the opt-out link stays in
    every notification e-mail, as it is the customer's way to end an e-mail opt-in.

    Threadline extensions, the SMTP server: `smtpHost` (default `smtp.mailgun.org` when a
    `domain` is given), `smtpPort`, `security` ("starttls" (default, port 587), "tls" (implicit
    TLS, 465) or "none" (25)), `username` (default `postmaster@<domain>` when a `domain` is
    given), `password` (write-only), `fromName`. Mail goes out from `fromAddress`, else
    `incomingAddress`.

    E-mail as a channel (the `email` service): customers write to `incomingAddress`, delivered by
    the SMTP receiver, by a Mailgun inbound route signed with `webhookSigningKey` (write-only) or
    by SendGrid's Inbound Parse at a URL ending in `inboundSecret` (write-only, ≥ 16 characters).
    """

    display_name: str | None = None
    api_key: str | None = None
    domain: str | None = None
    incoming_address: str | None = None
    hide_unsubscribe_link: bool | None = None
    from_address: str | None = None
    smtp_host: str | None = None
    smtp_port: int | None = None
    security: Literal["starttls", "tls", "none"] | None = None
    username: str | None = None
    password: str | None = None
    from_name: str | None = None
    webhook_signing_key: str | None = None
    inbound_secret: str | None = None


INTEGRATION_CREATE_BODIES: dict[str, type[Wire]] = {
    "custom": CustomIntegrationIn,
    "web": WebIntegrationIn,
    "whatsapp": WhatsappIntegrationIn,
    "messenger": MessengerIntegrationIn,
    "telegram": TelegramIntegrationIn,
    "twilio": TwilioIntegrationIn,
    "android": AndroidIntegrationIn,
    "ios": IosIntegrationIn,
    "mailgun": MailgunIntegrationIn,
}
INTEGRATION_UPDATE_BODIES: dict[str, type[Wire]] = {
    "custom": CustomIntegrationUpdate,
    "web": WebIntegrationIn,
    "whatsapp": WhatsappIntegrationIn,
    "messenger": MessengerIntegrationIn,
    "telegram": TelegramIntegrationIn,
    "twilio": TwilioIntegrationIn,
    "android": AndroidIntegrationIn,
    "ios": IosIntegrationIn,
    "mailgun": MailgunIntegrationIn,
}


# --- response envelopes (for the OpenAPI document; handlers build them directly) --------------

class AppResponse(Wire, kw_only=True):
    app: App


class AppListResponse(Wire, kw_only=True):
    apps: list[App]
    meta: Meta
    links: Links


class AppKeyResponse(Wire, kw_only=True):
    key: AppKey


class AppKeyListResponse(Wire, kw_only=True):
    keys: list[AppKey]


class UserResponse(Wire, kw_only=True):
    user: User


class ClientListResponse(Wire, kw_only=True):
    clients: list[Client]
    meta: Meta
    links: Links


class LinkRequestsBody(Wire, kw_only=True):
    """Body of `POST …/users/{id}/linkRequests` (Threadline extension)."""

    integration_ids: list[str]
    conversation_id: str | None = None


class DeviceListResponse(Wire, kw_only=True):
    devices: list[Device]


class DeviceResponse(Wire, kw_only=True):
    device: Device


class ConversationResponse(Wire, kw_only=True):
    conversation: Conversation


class ConversationListResponse(Wire, kw_only=True):
    conversations: list[Conversation]
    meta: Meta
    links: Links


class ParticipantListResponse(Wire, kw_only=True):
    participants: list[Participant]
    meta: Meta
    links: Links


class MessagePostResponse(Wire, kw_only=True):
    messages: list[Message]


class MessageListResponse(Wire, kw_only=True):
    messages: list[Message]
    meta: Meta
    links: Links


class Integration(Wire, kw_only=True):
    """An integration as returned: common fields plus the type's own fields (secrets removed)."""

    id: str
    type: IntegrationType
    status: Literal["active", "inactive", "error"]
    display_name: str | None = None


class IntegrationResponse(Wire, kw_only=True):
    integration: Integration


class IntegrationListResponse(Wire, kw_only=True):
    integrations: list[Integration]
    meta: Meta
    links: Links


class WebhookResponse(Wire, kw_only=True):
    webhook: Webhook


class WebhookListResponse(Wire, kw_only=True):
    webhooks: list[Webhook]


# --- switchboards ----------------------------------------------------------------------------

SwitchboardName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
HistoryCount = Annotated[int, msgspec.Meta(ge=1, le=10)]


class Switchboard(Wire, kw_only=True):
    id: str
    enabled: bool
    default_switchboard_integration_id: str | None = None


class SwitchboardUpdateBody(Wire, kw_only=True):
    enabled: bool | None = None
    # Absent: unchanged; null: no default.
    default_switchboard_integration_id: str | msgspec.UnsetType | None = msgspec.UNSET


class SwitchboardResponse(Wire, kw_only=True):
    switchboard: Switchboard


class SwitchboardListResponse(Wire, kw_only=True):
    switchboards: list[Switchboard]


class SwitchboardIntegration(Wire, kw_only=True):
    id: str
    name: str
    # "" for a member named by its integration type only (e.g. `desk`): the official client
    # requires the field.
    integration_id: str
    integration_type: str
    deliver_standby_events: bool
    next_switchboard_integration_id: str | None = None
    message_history_count: int | None = None


class SwitchboardIntegrationCreateBody(Wire, kw_only=True):
    name: SwitchboardName
    integration_id: str | None = None
    integration_type: str | None = None
    deliver_standby_events: bool = False
    next_switchboard_integration_id: str | None = None
    message_history_count: HistoryCount | None = None


class SwitchboardIntegrationUpdateBody(Wire, kw_only=True):
    name: SwitchboardName | None = None
    integration_id: str | None = None
    integration_type: str | None = None
    deliver_standby_events: bool | None = None
    # Absent: unchanged; null: no next.
    next_switchboard_integration_id: str | msgspec.UnsetType | None = msgspec.UNSET
    message_history_count: HistoryCount | None = None


class SwitchboardIntegrationResponse(Wire, kw_only=True):
    switchboard_integration: SwitchboardIntegration


class SwitchboardIntegrationListResponse(Wire, kw_only=True):
    switchboard_integrations: list[SwitchboardIntegration]


class PassControlBody(Wire, kw_only=True):
    # An id, a name or an integration type of the app's switchboard, or `next`.
    switchboard_integration: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    reason: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    metadata: dict[str, Any] | None = None


class OfferControlBody(Wire, kw_only=True):
    switchboard_integration: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    metadata: dict[str, Any] | None = None


class ControlBody(Wire, kw_only=True):
    """acceptControl and releaseControl."""

    reason: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    metadata: dict[str, Any] | None = None


# --- attachments -----------------------------------------------------------------------------

class Attachment(Wire, kw_only=True):
    media_url: str
    media_type: str


class AttachmentResponse(Wire, kw_only=True):
    attachment: Attachment


class AttachmentDeleteBody(Wire, kw_only=True):
    media_url: str


# --- custom integration keys -----------------------------------------------------------------

class IntegrationApiKeyBody(Wire, kw_only=True):
    display_name: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class IntegrationApiKey(Wire, kw_only=True):
    id: str
    secret: str
    display_name: str | None = None


class IntegrationApiKeyResponse(Wire, kw_only=True):
    key: IntegrationApiKey


class IntegrationApiKeyListResponse(Wire, kw_only=True):
    keys: list[IntegrationApiKey]


class ErrorItem(Wire, kw_only=True):
    code: str
    title: str


class ErrorResponse(Wire, kw_only=True):
    errors: list[ErrorItem]


# --- helpers ---------------------------------------------------------------------------------

def convert(data: Any, type_: type[Any]) -> Any:
    """Validate builtins into a struct; a 400 ApiError when they do not fit."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid request body: {exc}") from exc


def check_metadata(metadata: Mapping[str, Any] | None) -> None:
    """SunCo metadata: a flat object of strings, numbers and booleans, at most 4 KB."""
    if metadata is None:
        return
    for key, value in metadata.items():
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ApiError(400, f"metadata.{key} must be a string, number or boolean")
    if len(msgspec.json.encode(metadata)) > MAX_METADATA_BYTES:
        raise ApiError(400, "metadata exceeds 4KB")


def check_webhook(target: str | None, triggers: list[str] | None) -> None:
    """Refuse webhook targets that are not http(s) URLs and unknown triggers."""
    if target is not None and not target.startswith(("http://", "https://")):
        raise ApiError(400, "webhook target must be an http(s) URL")
    if triggers is not None:
        if not triggers:
            raise ApiError(400, "webhook triggers must not be empty")
        unknown = sorted(set(triggers) - WEBHOOK_TRIGGERS)
        if unknown:
            raise ApiError(400, f"unknown webhook trigger(s): {', '.join(unknown)}")


def query_object(query: Mapping[str, str], name: str) -> dict[str, str]:
    """Read an object query parameter in either style SunCo clients send.

    `page[after]=x&page[size]=10` (docs, clients ≤16.x) and `page={"after":"x","size":10}`
    (URL-encoded JSON, client 17.x) both give `{"after": "x", "size": "10"}`.
    """
    result: dict[str, str] = {}
    raw = query.get(name)
    if raw is not None and raw != "":
        try:
            parsed = decode_json(raw)
        except ValueError as exc:
            raise ApiError(400, f"query parameter {name} must be a JSON object") from exc
        if not isinstance(parsed, dict):
            raise ApiError(400, f"query parameter {name} must be a JSON object")
        for key, value in parsed.items():
            if value is not None:
                result[str(key)] = value if isinstance(value, str) else json.dumps(value)
    prefix = f"{name}["
    for key, value in query.items():
        if key.startswith(prefix) and key.endswith("]"):
            result[key[len(prefix):-1]] = value
    return result


class PageParams(msgspec.Struct, frozen=True):
    after: str | None
    before: str | None
    size: int


def page_params(query: Mapping[str, str], default_size: int = 25, *, activity: bool = False) -> PageParams:
    """Validate `page` (after/before cursors are 24-hex ids, or with `activity` the 24-character
    cursors of `activity_cursor`; size 1..100)."""
    page = query_object(query, "page")
    after, before = page.get("after") or None, page.get("before") or None
    if after is not None and before is not None:
        raise ApiError(400, "page.after and page.before are mutually exclusive")
    for cursor in (after, before):
        if cursor is None:
            continue
        if activity:
            activity_keyset(cursor)
        elif len(cursor) != 24 or not all(c in "0123456789abcdef" for c in cursor):
            raise ApiError(400, "page cursors must be 24-character ids")
    size = default_size
    if "size" in page:
        try:
            size = int(page["size"])
        except ValueError as exc:
            raise ApiError(400, "page.size must be an integer") from exc
        if not 1 <= size <= 100:
            raise ApiError(400, "page.size must be between 1 and 100")
    return PageParams(after=after, before=before, size=size)


# --- the app-wide conversation listing (Threadline extension) --------------------------------

# A conversation's place in the listing by activity: `t` + base64url of its `last_updated_at`
# (the 8 bytes of the double, exact) and the first 9 bytes of its id (18 hex digits: the id's
# creation second and 40 random bits, the tie-break). 24 characters like SunCo's cursors (the
# official client checks the length) yet never a 24-hex id, so neither listing takes the other's.
# The cursor holds the position itself, not a row to look up: it stays valid when its
# conversation gets a message (and moves to the top) or is deleted between two pages.
_ACTIVITY_CURSOR = re.compile(r"^t[A-Za-z0-9_-]{23}$")
ACTIVITY_ID_PREFIX = 18


def activity_cursor(last_updated_at: float, conversation_id: str) -> str:
    """The listing's cursor of a conversation at `last_updated_at` (ids are 24-hex)."""
    raw = struct.pack(">d", last_updated_at) + bytes.fromhex(conversation_id[:ACTIVITY_ID_PREFIX])
    return "t" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def activity_keyset(cursor: str) -> tuple[float, str]:
    """(last_updated_at, id prefix) of an `activity_cursor`; 400 for anything else."""
    if _ACTIVITY_CURSOR.match(cursor):
        try:
            raw = base64.urlsafe_b64decode(cursor[1:] + "=")
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 8 + ACTIVITY_ID_PREFIX // 2:
            (at,) = struct.unpack(">d", raw[:8])
            if math.isfinite(at):
                return at, raw[8:].hex()
    raise ApiError(400, "page cursor is not a cursor of this list (use meta.afterCursor / meta.beforeCursor)")


CONVERSATION_TYPES: frozenset[str] = frozenset(get_args(ConversationType))
# `filter[channel]`: an integration type or a client type (`sdk`: any SDK client).
CHANNEL_TYPES: frozenset[str] = frozenset(get_args(IntegrationType)) | frozenset(get_args(ClientType))
# What a switchboard integration's integrationType may be (as switchboard.py checks it).
_SWITCHBOARD_INTEGRATION_TYPE = re.compile(r"^[A-Za-z0-9:_.-]{1,64}$")
_HEX_ID = re.compile(r"^[0-9a-f]{24}$")


class ConversationFilters(msgspec.Struct, frozen=True):
    """The `filter` of `GET /v2/apps/{appId}/conversations`, checked (times in Unix milliseconds)."""

    user_id: str | None = None
    user_external_id: str | None = None
    type: str | None = None
    active_switchboard_integration_id: str | None = None
    active_switchboard_integration_type: str | None = None
    channel: str | None = None
    updated_after: int | None = None
    created_after: int | None = None

    @property
    def by_user(self) -> bool:
        return bool(self.user_id or self.user_external_id)


_CONVERSATION_FILTER_FIELDS = {
    "userId": "user_id", "userExternalId": "user_external_id", "type": "type",
    "activeSwitchboardIntegrationId": "active_switchboard_integration_id",
    "activeSwitchboardIntegrationType": "active_switchboard_integration_type", "channel": "channel",
    "updatedAfter": "updated_after", "createdAfter": "created_after",
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_millis(value: str, name: str) -> int:
    """Unix milliseconds (truncated, exactly) of an ISO 8601 date or date-time (no offset: UTC);
    400 otherwise."""
    try:
        if len(value) > 64:
            raise ValueError(value)
        at = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ApiError(400, f"{name} must be an ISO 8601 timestamp, e.g. 2024-05-01T12:00:00.000Z") from exc
    return ((at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH) // timedelta(milliseconds=1)


def conversation_filters(raw: Mapping[str, str]) -> ConversationFilters:
    """Check a conversation listing's `filter` (from `query_object`): unknown keys, unknown or
    malformed values are a 400. An empty userId/userExternalId counts as absent (as it always did)."""
    unknown = sorted(set(raw) - set(_CONVERSATION_FILTER_FIELDS))
    if unknown:
        raise ApiError(400, f"Unknown filter {', '.join(unknown)}: the filters are "
                            f"{', '.join(_CONVERSATION_FILTER_FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"filter.{key}"
        if key in ("userId", "userExternalId"):
            values[_CONVERSATION_FILTER_FIELDS[key]] = value or None
            continue
        if key == "type" and value not in CONVERSATION_TYPES:
            raise ApiError(400, f"{name} must be one of {', '.join(sorted(CONVERSATION_TYPES))}")
        if key == "activeSwitchboardIntegrationId" and not _HEX_ID.match(value):
            raise ApiError(400, f"{name} must be a switchboard integration id (24 hex characters)")
        if key == "activeSwitchboardIntegrationType" and not _SWITCHBOARD_INTEGRATION_TYPE.match(value):
            raise ApiError(400, f"{name} must be an integration type (1-64 of [A-Za-z0-9:_.-])")
        if key == "channel" and value not in CHANNEL_TYPES:
            raise ApiError(400, f"{name} must be an integration or client type: {', '.join(sorted(CHANNEL_TYPES))}")
        values[_CONVERSATION_FILTER_FIELDS[key]] = (parse_millis(value, name) if key.endswith("After")
                                                    else value)
    return ConversationFilters(**values)


_CLOCK_TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
NOTIFICATION_DELAY_RANGE = (1, 7 * 24 * 3600)
WHATSAPP_TEMPLATE_PARAMETERS = frozenset({"text", "link", "business", "code"})


def check_notification_settings(settings: NotificationSettings | None) -> None:
    """400 for `settings.notifications` that could never work (bad delay, clock time, time zone, template)."""
    if settings is None:
        return
    low, high = NOTIFICATION_DELAY_RANGE
    if settings.delay_seconds is not None and not low <= settings.delay_seconds <= high:
        raise ApiError(400, f"settings.notifications.delaySeconds must be between {low} and {high}")
    quiet = settings.quiet_hours
    if quiet is not None:
        if not (_CLOCK_TIME.match(quiet.start) and _CLOCK_TIME.match(quiet.end)):
            raise ApiError(400, "settings.notifications.quietHours start and end must be HH:MM (24 h)")
        if quiet.start == quiet.end:
            raise ApiError(400, "settings.notifications.quietHours start and end must differ")
        try:
            zoneinfo.ZoneInfo(quiet.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ApiError(400, f"settings.notifications.quietHours.timezone {quiet.timezone!r} is not an IANA "
                                "time zone") from None
    templates = settings.templates
    named = [] if templates is None else [("whatsapp", templates.whatsapp),
                                          ("whatsappOptIn", templates.whatsapp_opt_in)]
    for name, template in named:
        if template is None:
            continue
        if not re.match(r"^[a-z0-9_]{1,512}$", template.name):
            raise ApiError(400, f"settings.notifications.templates.{name}.name must be a WhatsApp template name "
                                "(lowercase letters, digits, _)")
        if not re.match(r"^[a-z]{2,3}(_[A-Z]{2})?$", template.language):
            raise ApiError(400, f"settings.notifications.templates.{name}.language must be a code like en_US")
        unknown = sorted(set(template.parameters or ()) - WHATSAPP_TEMPLATE_PARAMETERS)
        if unknown:
            raise ApiError(400, f"settings.notifications.templates.{name}.parameters: unknown {', '.join(unknown)} "
                                f"(use {', '.join(sorted(WHATSAPP_TEMPLATE_PARAMETERS))})")


# --- direct linking by phone (Clients API) and the Notification API (v1.1) --------------------

class MatchCriteriaIn(Wire, kw_only=True):
    """SunCo `matchCriteria` (oneOf by `type`): whatsapp/twilio/messagebird carry a phone number,
    mailgun an address. whatsapp, twilio and mailgun are served here."""

    type: str
    integration_id: str | None = None
    phone_number: str | None = None
    primary: bool = True
    address: str | None = None
    subject: str | None = None


class ConfirmationMessageIn(Wire, kw_only=True):
    """SunCo `confirmation.message` (a MessagePost): sent to the number, never stored."""

    content: Content
    author: Author | None = None
    schema: Literal["whatsapp"] | None = None


class ConfirmationIn(Wire, kw_only=True):
    type: Literal["immediate", "userActivity", "prompt"]
    message: ConfirmationMessageIn | None = None


class TargetIn(Wire, kw_only=True):
    conversation_id: str


class ClientCreateBody(Wire, kw_only=True):
    """Body of `POST …/users/{id}/clients` (SunCo `ClientCreate`)."""

    match_criteria: MatchCriteriaIn
    confirmation: ConfirmationIn
    target: TargetIn


class ClientResponse(Wire, kw_only=True):
    client: Client


class NotificationDestination(Wire, kw_only=True):
    integration_id: str
    destination_id: str


class NotificationAuthor(Wire, kw_only=True):
    role: str
    name: str | None = None
    avatar_url: str | None = None


class NotificationPostBody(Wire, kw_only=True):
    """Body of SunCo v1.1 `POST /v1.1/apps/{appId}/notifications`: `message` is a v1 message
    (`{type: text|image, text, mediaUrl, actions}`) or, with `messageSchema: "whatsapp"`, a native
    WhatsApp message (`{type: "template", template: {…}}` or `{type: "text", text: {body}}`)."""

    destination: NotificationDestination
    author: NotificationAuthor
    message: dict[str, Any]
    message_schema: Literal["whatsapp"] | None = None
