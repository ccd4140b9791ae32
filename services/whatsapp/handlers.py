"""WhatsApp Cloud API logic on decoded values: webhook parsing/normalization, send bodies, errors.

Nothing here touches NATS; `app.py` wires it to the bus and HTTP. The wire formats follow the
platform reference §1 (webhook envelope, statuses, send API, error envelope).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared import outbound, render
from shared.egress import GRAPH_HOSTS, WHATSAPP_MEDIA_HOSTS, Origin, host_matches, same_origin
from shared.ingress import Rejected, WebhookShapeError, rejected
from shared.messages.channel import (
    DeliveryState,
    DeliveryStatus,
    InboundMessage,
    OutboundActivity,
    OutboundSend,
    Postback,
)
from shared.outbound import CodedSendFailure
from shared.records import IntegrationRecord
from shared.sunco import (
    Action,
    CarouselContent,
    Content,
    FileContent,
    FormContent,
    FormResponseContent,
    ImageContent,
    LinkAction,
    ListContent,
    LocationContent,
    LocationCoordinates,
    LocationInfo,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
    WebviewAction,
)
from shared.untrusted import decode_json

CHANNEL = "whatsapp"
MAX_WEBHOOK_BODY = 100 * 1024
# WhatsApp limits (platform reference §1.7.2, §1.10; Meta's interactive message pages).
MAX_BUTTONS = 3
MAX_LIST_ROWS = 10
BUTTON_TITLE_MAX = 20
BUTTON_ID_MAX = 256
LIST_ROW_ID_MAX = 200
LIST_ROW_TITLE_MAX = 24
LIST_ROW_DESCRIPTION_MAX = 72
LIST_BUTTON_MAX = 20
LIST_SECTION_TITLE_MAX = 24
CTA_DISPLAY_TEXT_MAX = 20
INTERACTIVE_BODY_MAX = 1024
MEDIA_CAPTION_MAX = 1024
TEXT_BODY_MAX = 4096
# Words the gateway adds where WhatsApp requires text the content has none of.
LIST_BUTTON_LABEL = "Options"
LIST_SECTION_TITLE = "Options"
CHOOSE_PROMPT = "Please choose:"
CTA_LABEL = "Open"
LOCATION_REQUEST_PROMPT = "Please share your location."
# `biz_opaque_callback_data` is echoed in status webhooks; it lets a webhook status name our message.
CALLBACK_PREFIX = "tl:"

_BSUID_RE = re.compile(r"^[A-Z]{2}\.[A-Za-z0-9.]{1,160}$")


# --- integration credentials -------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """The fields of a whatsapp integration record the service needs."""

    integration_id: str
    app_id: str
    phone_number_id: str
    access_token: str
    app_secret: str
    verify_token: str
    api_version: str
    base_url: str

    @classmethod
    def from_record(cls, record: IntegrationRecord) -> Credentials | None:
        """Credentials of a usable whatsapp integration, or None (wrong type, inactive, incomplete)."""
        if record.type != CHANNEL or record.status not in ("active", ""):
            return None
        cfg = record.config
        version = str(cfg.get("apiVersion") or "v23.0")
        if not version.startswith("v"):
            version = "v" + version
        values = {
            "phone_number_id": cfg.get("phoneNumberId"),
            "access_token": cfg.get("accessToken"),
            "app_secret": cfg.get("appSecret"),
        }
        if not all(isinstance(v, str) and v for v in values.values()):
            return None
        return cls(
            integration_id=record.id,
            app_id=record.app_id,
            phone_number_id=str(values["phone_number_id"]),
            access_token=str(values["access_token"]),
            app_secret=str(values["app_secret"]),
            verify_token=str(cfg.get("verifyToken") or ""),
            api_version=version,
            base_url=str(cfg.get("baseUrl") or "https://graph.facebook.com").rstrip("/"),
        )

    @property
    def messages_url(self) -> str:
        """The send endpoint of this business number."""
        return f"{self.base_url}/{self.api_version}/{self.phone_number_id}/messages"

    def media_lookup_url(self, media_id: str) -> str:
        """The Graph URL that answers where a media id's bytes are."""
        return f"{self.base_url}/{self.api_version}/{media_id}"


def media_signature(app_secret: str, integration_id: str, media_id: str) -> str:
    """A short HMAC that makes a gateway media URL unguessable without the app secret."""
    mac = hmac.new(app_secret.encode(), f"{integration_id}:{media_id}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


# Where a media download may go (the Graph host itself serves the sandbox's and proxies' media).
MEDIA_HOSTS = WHATSAPP_MEDIA_HOSTS + GRAPH_HOSTS


def media_download_allowed(url: str, base_url: str) -> bool:
    """Whether the integration's bearer token may follow a media lookup's `url`: only to the
    Graph base URL's own origin (the sandbox's fake, an operator's proxy) or, over https, to
    Meta's media CDN — never to whatever host the lookup answer names."""
    if same_origin(url, base_url):
        return True
    origin = Origin.of(url)
    return origin is not None and origin.scheme == "https" and host_matches(origin.host, WHATSAPP_MEDIA_HOSTS)


def media_url(public_base_url: str, creds: Credentials, media_id: str) -> str:
    """The gateway URL that serves a WhatsApp media id (it re-resolves the short-lived Graph URL)."""
    sig = media_signature(creds.app_secret, creds.integration_id, media_id)
    return f"{public_base_url}/webhooks/whatsapp/{creds.integration_id}/media/{media_id}?sig={sig}"


def media_id_of(url: str, public_base_url: str, creds: Credentials) -> str | None:
    """The media id of a gateway media URL of this integration (`media_url`), or None."""
    prefix = f"{public_base_url}/webhooks/whatsapp/{creds.integration_id}/media/"
    media_id = url[len(prefix):].split("?", 1)[0] if url.startswith(prefix) else ""
    return media_id if media_id and "/" not in media_id else None


# --- webhook wire schema -------------------------------------------------------------------------

class _Context(msgspec.Struct):
    id: str = ""


class _TextBody(msgspec.Struct):
    body: str


class _Media(msgspec.Struct):
    id: str = ""
    mime_type: str | None = None
    caption: str | None = None
    filename: str | None = None
    link: str | None = None


class _Reply(msgspec.Struct):
    id: str
    title: str = ""


class _Interactive(msgspec.Struct):
    type: str
    button_reply: _Reply | None = None
    list_reply: _Reply | None = None


class _TemplateButton(msgspec.Struct):
    payload: str = ""
    text: str = ""


class _Location(msgspec.Struct):
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None


class _Message(msgspec.Struct):
    id: str
    timestamp: str | int
    type: str
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: str | None = None
    context: _Context | None = None
    text: _TextBody | None = None
    image: _Media | None = None
    document: _Media | None = None
    video: _Media | None = None
    audio: _Media | None = None
    interactive: _Interactive | None = None
    button: _TemplateButton | None = None
    location: _Location | None = None


class _Profile(msgspec.Struct):
    name: str | None = None
    username: str | None = None


class _Contact(msgspec.Struct):
    profile: _Profile | None = None
    wa_id: str | None = None
    user_id: str | None = None


class _ErrorData(msgspec.Struct):
    details: str | None = None


class _Error(msgspec.Struct):
    code: int | None = None
    title: str | None = None
    message: str | None = None
    error_data: _ErrorData | None = None


class _Status(msgspec.Struct):
    id: str
    status: str
    timestamp: str | int
    recipient_id: str | None = None
    biz_opaque_callback_data: str | None = None
    errors: list[_Error] = []


class _Metadata(msgspec.Struct):
    phone_number_id: str = ""
    display_phone_number: str = ""


# Lists of items are kept raw and each item converted on its own: one malformed item is
# reported (`Normalized.rejected`) without failing its siblings.
class _Value(msgspec.Struct):
    metadata: _Metadata | None = None
    contacts: list[_Contact] = []
    messages: list[Any] = []
    statuses: list[Any] = []


class _Change(msgspec.Struct):
    field: str
    value: dict[str, Any]


class _Entry(msgspec.Struct):
    changes: list[Any] = []
    id: str = ""


class _Envelope(msgspec.Struct):
    object: str
    entry: list[Any]


@dataclass
class Normalized:
    """What one webhook delivery carries, ready to publish (subject, payload, msg id)."""

    messages: list[InboundMessage] = field(default_factory=list)
    statuses: list[DeliveryStatus] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


Resolver = Callable[[str], Credentials | None]


def _timestamp(value: str | int) -> float:
    try:
        ts = float(value)
    except ValueError as exc:
        raise WebhookShapeError(f"bad timestamp {value!r}") from exc
    if not math.isfinite(ts) or ts < 0:
        raise WebhookShapeError(f"bad timestamp {value!r}")
    return ts


def parse_webhook(raw: bytes) -> _Envelope:
    """Decode and validate the notification envelope (raises WebhookShapeError)."""
    try:
        envelope = decode_json(raw, _Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WebhookShapeError(f"not a WhatsApp notification: {exc}") from exc
    if envelope.object != "whatsapp_business_account":
        raise WebhookShapeError(f"unexpected object {envelope.object!r}")
    return envelope


def normalize_webhook(raw: bytes, creds: Credentials, resolve: Resolver, public_base_url: str) -> Normalized:
    """Every well-formed message and status of a verified notification, normalized.

    Raises WebhookShapeError only when the body is not a notification at all; a malformed
    entry, change, message or status goes to `rejected` and its siblings are still normalized
    (Meta retries a refused notification unchanged, so one bad item would hold back the rest).
    `creds` is the integration whose URL received the call; `resolve(phone_number_id)` finds a
    sibling integration when one Meta app's webhook carries several business numbers (it must
    share the app secret, which the signature proved).
    """
    envelope = parse_webhook(raw)
    out = Normalized()
    for e_index, raw_entry in enumerate(envelope.entry):
        try:
            entry = msgspec.convert(raw_entry, _Entry)
        except msgspec.ValidationError as exc:
            out.rejected.append(rejected(f"entry[{e_index}]", exc))
            continue
        for c_index, raw_change in enumerate(entry.changes):
            where = f"entry[{e_index}].changes[{c_index}]"
            try:
                change = msgspec.convert(raw_change, _Change)
                if change.field != "messages":
                    continue  # account/template updates: nothing for the conversation
                value = msgspec.convert(change.value, _Value)
            except msgspec.ValidationError as exc:
                out.rejected.append(rejected(where, exc))
                continue
            target = creds
            phone_id = value.metadata.phone_number_id if value.metadata else ""
            if phone_id and phone_id != creds.phone_number_id:
                sibling = resolve(phone_id)
                if sibling is None or sibling.app_secret != creds.app_secret:
                    continue  # a number this gateway does not serve
                target = sibling
            for index, raw_message in enumerate(value.messages):
                try:
                    message = msgspec.convert(raw_message, _Message)
                    out.messages.append(_inbound(message, raw_message, value.contacts, target, public_base_url))
                except (msgspec.ValidationError, WebhookShapeError) as exc:
                    out.rejected.append(rejected(f"{where}.value.messages[{index}]", exc, raw_message))
            for index, raw_status in enumerate(value.statuses):
                try:
                    normalized = _status(msgspec.convert(raw_status, _Status), raw_status, target)
                except (msgspec.ValidationError, WebhookShapeError) as exc:
                    out.rejected.append(rejected(f"{where}.value.statuses[{index}]", exc, raw_status))
                    continue
                if normalized is not None:
                    out.statuses.append(normalized)
    return out


def _find_contact(contacts: list[_Contact], message: _Message) -> _Contact | None:
    for contact in contacts:
        if message.from_user_id and contact.user_id == message.from_user_id:
            return contact
        if message.from_ and contact.wa_id == message.from_:
            return contact
    return contacts[0] if len(contacts) == 1 else None


def _inbound(message: _Message, raw: dict[str, Any], contacts: list[_Contact], creds: Credentials,
             public_base_url: str) -> InboundMessage:
    contact = _find_contact(contacts, message)
    bsuid = message.from_user_id or (contact.user_id if contact else None)
    wa_id = message.from_ or (contact.wa_id if contact else None)
    user_key = bsuid or wa_id
    if not user_key:
        raise WebhookShapeError(f"message {message.id} has no sender")
    if not message.id:
        raise WebhookShapeError("message without id")
    client_info: dict[str, Any] = {"phone_number_id": creds.phone_number_id}
    if wa_id:
        client_info["wa_id"] = wa_id
    if bsuid:
        client_info["bsuid"] = bsuid
    display_name = None
    if contact and contact.profile:
        display_name = contact.profile.name or None
        if contact.profile.username:
            client_info["username"] = contact.profile.username
    content, postback = _content(message, raw, creds, public_base_url)
    return InboundMessage(
        app_id=creds.app_id,
        integration_id=creds.integration_id,
        channel=CHANNEL,
        client_type="whatsapp",
        channel_user_id=user_key,
        provider_message_id=message.id,
        received_at=_timestamp(message.timestamp),
        content=content,
        display_name=display_name,
        client_info=client_info,
        raw=raw,
        postback=postback,
        quoted_provider_message_id=(message.context.id or None) if message.context else None,
    )


def _content(message: _Message, raw: dict[str, Any], creds: Credentials,
             public_base_url: str) -> tuple[Content, Postback | None]:
    kind = message.type
    if kind == "text" and message.text is not None:
        return TextContent(text=message.text.body), None
    if kind == "image" and message.image is not None and message.image.id:
        image = message.image
        return ImageContent(media_url=media_url(public_base_url, creds, image.id), media_type=image.mime_type,
                            text=image.caption or None), None
    media = {"document": message.document, "video": message.video, "audio": message.audio}.get(kind)
    if media is not None and media.id:
        return FileContent(media_url=media_url(public_base_url, creds, media.id), media_type=media.mime_type,
                           alt_text=media.filename or None, text=media.caption or None), None
    if kind == "interactive" and message.interactive is not None:
        reply = message.interactive.button_reply or message.interactive.list_reply
        if message.interactive.type in ("button_reply", "list_reply") and reply is not None:
            return (TextContent(text=reply.title, payload=reply.id),
                    Postback(payload=reply.id, text=reply.title))
    if kind == "button" and message.button is not None:
        button = message.button
        return (TextContent(text=button.text, payload=button.payload),
                Postback(payload=button.payload, text=button.text))
    if kind == "location" and message.location is not None:
        loc = message.location
        if not (math.isfinite(loc.latitude) and math.isfinite(loc.longitude)):
            raise WebhookShapeError("bad coordinates")
        info = LocationInfo(name=loc.name, address=loc.address) if (loc.name or loc.address) else None
        return LocationContent(coordinates=LocationCoordinates(lat=loc.latitude, long=loc.longitude),
                               location=info), None
    if kind in ("text", "image", "location", "button"):
        raise WebhookShapeError(f"{kind} message {message.id} lacks its {kind} object")
    # Stickers, reactions, orders, contacts, system, unsupported, …: kept, never dropped.
    return UnsupportedContent(channel_type=kind, raw=raw), None


_STATUS_MAP: dict[str, DeliveryState] = {
    "sent": "sent", "delivered": "delivered", "read": "read", "played": "read", "failed": "failed",
}


def _status(status: _Status, raw: dict[str, Any], creds: Credentials) -> DeliveryStatus | None:
    state = _STATUS_MAP.get(status.status)
    if state is None or not status.id:
        return None  # e.g. "deleted"/"warning": not a delivery state the gateway tracks
    error = status.errors[0] if status.errors else None
    message_id, conversation_id = parse_callback_data(status.biz_opaque_callback_data)
    return DeliveryStatus(
        app_id=creds.app_id,
        integration_id=creds.integration_id,
        channel=CHANNEL,
        provider_message_id=status.id,
        status=state,
        timestamp=_timestamp(status.timestamp),
        message_id=message_id,
        conversation_id=conversation_id,
        error_code=str(error.code) if error and error.code is not None else None,
        error_title=(error.title or error.message) if error else None,
        error_details=error.error_data.details if error and error.error_data else None,
        raw=raw,
    )


def callback_data(send: OutboundSend) -> str:
    """The `biz_opaque_callback_data` that lets status webhooks name the message they are about."""
    return f"{CALLBACK_PREFIX}{send.conversation_id}:{send.message_id}"


def parse_callback_data(value: str | None) -> tuple[str | None, str | None]:
    """(message_id, conversation_id) from our own `biz_opaque_callback_data`, else (None, None)."""
    if not value or not value.startswith(CALLBACK_PREFIX):
        return None, None
    conversation_id, sep, message_id = value[len(CALLBACK_PREFIX):].partition(":")
    if not sep or not conversation_id or not message_id:
        return None, None
    return message_id, conversation_id


def inbound_msg_id(message: InboundMessage) -> str:
    """JetStream de-duplication id of an inbound message (a Meta retry must not be a second message)."""
    return f"{CHANNEL}:{message.provider_message_id}"


def status_msg_id(status: DeliveryStatus) -> str:
    """JetStream de-duplication id of a webhook status."""
    return f"{CHANNEL}:{status.provider_message_id}:{status.status}"


# --- sending -------------------------------------------------------------------------------------

class UnsendableContent(outbound.UnsendableContent):
    """The content has no WhatsApp representation (a permanent failure)."""


def is_bsuid(value: str) -> bool:
    """True for a business-scoped user id (`US.1349…`), false for a phone number."""
    return bool(_BSUID_RE.match(value))


def _digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def addressing(send: OutboundSend) -> dict[str, str]:
    """`to` (phone digits) when the recipient's wa_id is known, else `recipient` (the BSUID)."""
    wa_id = send.recipient_info.get("wa_id")
    if isinstance(wa_id, str) and _digits(wa_id):
        return {"to": _digits(wa_id)}
    if is_bsuid(send.recipient):
        return {"recipient": send.recipient}
    return {"to": _digits(send.recipient) or send.recipient}


def build_send_body(send: OutboundSend) -> dict[str, Any]:
    """The Graph API request body for an outbound message (platform reference §1.7)."""
    override = (send.override or {}).get("whatsapp")
    payload = override.get("payload") if isinstance(override, dict) else None
    if isinstance(payload, dict) and payload:
        body = dict(payload)
        body.setdefault("messaging_product", "whatsapp")
        if "to" not in body and "recipient" not in body:
            body.update(addressing(send))
        return body
    body = {"messaging_product": "whatsapp", "recipient_type": "individual", **addressing(send)}
    body.update(content_body(send.content))
    if send.quoted_provider_message_id:
        body["context"] = {"message_id": send.quoted_provider_message_id}
    body["biz_opaque_callback_data"] = callback_data(send)
    return body


def content_body(content: Content) -> dict[str, Any]:
    """The message part of a send body (`type` and its object): WhatsApp's own form of the
    content where it has one that fits its limits, else the readable text of `shared.render`
    (choices numbered, so a customer's "2" still answers). Never a body Meta would refuse;
    UnsendableContent for content with no form at all."""
    if isinstance(content, TextContent):
        return _text_body(content)
    if isinstance(content, ImageContent):
        return _image_body(content)
    if isinstance(content, FileContent):
        return _file_body(content)
    if isinstance(content, LocationContent):
        location: dict[str, Any] = {"latitude": content.coordinates.lat, "longitude": content.coordinates.long}
        if content.location and content.location.name:
            location["name"] = content.location.name
        if content.location and content.location.address:
            location["address"] = content.location.address
        return {"type": "location", "location": location}
    if isinstance(content, CarouselContent | ListContent):
        return _items_body(content)
    if isinstance(content, FormContent):
        return _fallback_text(content)
    if isinstance(content, TemplateContent):
        if not content.template.get("name"):
            raise UnsendableContent("template without name")
        return {"type": "template", "template": content.template}
    if isinstance(content, FormResponseContent):
        raise UnsendableContent("a formResponse is the customer's answer, never sent to a customer")
    raise UnsendableContent(f"{content.__class__.__name__} cannot be sent on WhatsApp")


def _answerable(actions: list[Action]) -> list[ReplyAction | PostbackAction]:
    return [a for a in actions if isinstance(a, ReplyAction | PostbackAction)]


def _others(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, ReplyAction | PostbackAction)]


def _choice_id(action: ReplyAction | PostbackAction) -> str:
    """What a tap sends back (`button_reply.id`, `list_reply.id`): the payload, never clipped
    (the conversations service finds the tapped action by it)."""
    return action.payload or action.text


def _ids_fit(ids: list[str], limit: int) -> bool:
    return all(ids) and all(len(i) <= limit for i in ids) and len(set(ids)) == len(ids)


def _body_text(text: str, default: str) -> str | None:
    """An interactive body (required, ≤ 1024): `text`, else `default`; None when it is too long."""
    body = text if text.strip() else default
    return body if len(body) <= INTERACTIVE_BODY_MAX else None


def _interactive(kind: str, body: str, action: dict[str, Any],
                 header: dict[str, Any] | None = None) -> dict[str, Any]:
    interactive: dict[str, Any] = {"type": kind}
    if header is not None:
        interactive["header"] = header
    interactive["body"] = {"text": body}
    interactive["action"] = action
    return {"type": "interactive", "interactive": interactive}


def _reply_buttons(text: str, actions: list[ReplyAction | PostbackAction],
                   header: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Interactive reply buttons (1-3, unique ids ≤ 256 and unique titles ≤ 20), or None."""
    if not 1 <= len(actions) <= MAX_BUTTONS:
        return None
    ids = [_choice_id(a) for a in actions]
    titles = [_clip(a.text.strip(), BUTTON_TITLE_MAX) for a in actions]
    body = _body_text(text, CHOOSE_PROMPT)
    if body is None or not _ids_fit(ids, BUTTON_ID_MAX) or not all(titles) or len(set(titles)) != len(titles):
        return None
    buttons = [{"type": "reply", "reply": {"id": i, "title": t}} for i, t in zip(ids, titles, strict=True)]
    return _interactive("button", body, {"buttons": buttons}, header)


def _row(row_id: str, title: str, description: str | None) -> dict[str, Any]:
    title = title.strip()
    row: dict[str, Any] = {"id": row_id, "title": _clip(title, LIST_ROW_TITLE_MAX)}
    # A title that had to be clipped is shown whole (as far as it fits) in the description.
    detail = (description or "").strip() or (title if len(title) > LIST_ROW_TITLE_MAX else "")
    if detail:
        row["description"] = _clip(detail, LIST_ROW_DESCRIPTION_MAX)
    return row


def _list(text: str, rows: list[tuple[str, str, str | None]]) -> dict[str, Any] | None:
    """An interactive list (1-10 rows with unique ids ≤ 200 and a title), or None."""
    body = _body_text(text, CHOOSE_PROMPT)
    if body is None or not 1 <= len(rows) <= MAX_LIST_ROWS:
        return None
    if not _ids_fit([r[0] for r in rows], LIST_ROW_ID_MAX) or not all(r[1].strip() for r in rows):
        return None
    section = {"title": LIST_SECTION_TITLE, "rows": [_row(*r) for r in rows]}
    return _interactive("list", body, {"button": LIST_BUTTON_LABEL, "sections": [section]})


def _cta_url(text: str, action: Action, header: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An interactive CTA URL button for one link or webview (http/https), or None."""
    if not isinstance(action, LinkAction | WebviewAction):
        return None
    url = action.uri.strip()
    if not url.lower().startswith(("https://", "http://")):
        return None
    label = action.text.strip()
    body = _body_text(text, label or url)
    if body is None:
        return None
    return _interactive("cta_url", body, {"name": "cta_url", "parameters": {
        "display_text": _clip(label or CTA_LABEL, CTA_DISPLAY_TEXT_MAX), "url": url}}, header)


def _choices_or_fallback(content: TextContent) -> dict[str, Any]:
    """Reply buttons (≤ 3) or a list (≤ 10) for the answerable actions of a text, the text of its
    other actions (links, payments) in the body; the numbered text when they do not fit."""
    actions = list(content.actions or [])
    text = render.fallback(TextContent(text=content.text, actions=_others(actions))).text
    answerable = _answerable(actions)
    native = _reply_buttons(text, answerable)
    if native is None:
        native = _list(text, [(_choice_id(a), a.text, None) for a in answerable])
    return native if native is not None else _fallback_text(content)


def _text_body(content: TextContent) -> dict[str, Any]:
    actions = list(content.actions or [])
    if not actions:
        if not content.text.strip():
            raise UnsendableContent("empty text")
        return {"type": "text", "text": {"body": _clip(content.text, TEXT_BODY_MAX), "preview_url": False}}
    if any(isinstance(a, LocationRequestAction) for a in actions):
        # The location button is WhatsApp's; any other choice is written in the body, numbered.
        only = all(isinstance(a, LocationRequestAction) for a in actions)
        body = _body_text(content.text if only else render.fallback(content).text, LOCATION_REQUEST_PROMPT)
        if body is None:
            return _fallback_text(content)
        return _interactive("location_request_message", body, {"name": "send_location"})
    if _answerable(actions):
        return _choices_or_fallback(content)
    if len(actions) == 1:
        native = _cta_url(content.text, actions[0])
        if native is not None:
            return native
    return _fallback_text(content)


def _image_body(content: ImageContent) -> dict[str, Any]:
    if not content.media_url:
        raise UnsendableContent("image without mediaUrl")
    actions = list(content.actions or [])
    header = {"type": "image", "image": {"link": content.media_url}}
    native: dict[str, Any] | None = None
    if not any(isinstance(a, LocationRequestAction) for a in actions):
        others = _others(actions)
        if _answerable(actions):
            text = render.fallback(TextContent(text=content.text or "", actions=others)).text
            native = _reply_buttons(text or content.alt_text or "", _answerable(actions), header)
        elif len(others) == 1:
            native = _cta_url(content.text or content.alt_text or "", others[0], header)
    if native is not None:
        return native
    # No actions, or more than buttons can carry: the image, its choices numbered in the caption.
    return _media_body("image", {"link": content.media_url}, render.fallback(content).text, content)


def _file_body(content: FileContent) -> dict[str, Any]:
    if not content.media_url:
        raise UnsendableContent("file without mediaUrl")
    document: dict[str, Any] = {"link": content.media_url}
    filename = content.alt_text or content.media_url.rsplit("/", 1)[-1].split("?", 1)[0]
    if filename:
        document["filename"] = filename
    return _media_body("document", document, content.text or "", content)


def _media_body(kind: str, media: dict[str, Any], caption: str, content: Content) -> dict[str, Any]:
    """A media message with `caption` (≤ 1024); a longer caption makes it the fallback text,
    the media as a link."""
    if len(caption) > MEDIA_CAPTION_MAX:
        return _fallback_text(content)
    if caption.strip():
        media = {**media, "caption": caption}
    return {"type": kind, kind: media}


def _items_body(content: CarouselContent | ListContent) -> dict[str, Any]:
    """A carousel or list as an interactive list, one row per item (id: its payload), when every
    item has exactly one action and it answers (reply/postback); else the numbered text."""
    rows: list[tuple[str, str, str | None]] = []
    for item in content.items:
        if len(item.actions) != 1 or not isinstance(item.actions[0], ReplyAction | PostbackAction):
            return _fallback_text(content)
        rows.append((_choice_id(item.actions[0]), item.title, item.description))
    extra = list(content.actions or []) if isinstance(content, ListContent) else []
    if _others(extra):
        return _fallback_text(content)
    rows += [(_choice_id(a), a.text, None) for a in _answerable(extra)]
    text = (content.text or "") if isinstance(content, CarouselContent) else ""
    native = _list(text, rows)
    return native if native is not None else _fallback_text(content)


def _fallback_text(content: Content) -> dict[str, Any]:
    """`content` as the readable text of `shared.render` (media as links first, previewed)."""
    try:
        fallback = render.fallback(content)
    except render.NoFallback as exc:
        raise UnsendableContent(str(exc)) from exc
    media = [url for url in fallback.media_urls if url not in fallback.text]
    text = "\n\n".join([*media, *([fallback.text] if fallback.text.strip() else [])])
    if not text.strip():
        raise UnsendableContent("empty text")
    return {"type": "text", "text": {"body": _clip(text, TEXT_BODY_MAX), "preview_url": bool(fallback.media_urls)}}


def activity_body(activity: OutboundActivity) -> dict[str, Any] | None:
    """The Graph call that shows the business's read state (and typing, which also marks read)
    on the customer's latest message; None when WhatsApp has nothing to show (typing stopped:
    the indicator ends by itself, or with the next message) or no message to show it on."""
    message_id = activity.last_provider_message_id
    if not message_id or activity.activity not in ("conversation:read", "typing:start"):
        return None
    body: dict[str, Any] = {"messaging_product": "whatsapp", "status": "read", "message_id": message_id}
    if activity.activity == "typing:start":
        body["typing_indicator"] = {"type": "text"}
    return body


# Graph error codes worth retrying (platform reference §1.8 and §8): throughput, pair rate,
# app/WABA call limits, unknown error, service unavailable, and Graph's "temporary" code 2.
TRANSIENT_CODES = frozenset({130429, 131056, 131000, 131016, 4, 80007, 2})


class SendFailure(CodedSendFailure):
    """A send the Graph API refused (or that never reached it)."""


def classify_error(http_status: int, body: bytes) -> SendFailure:
    """Turn a non-200 Graph answer into a SendFailure, deciding whether a retry can help."""
    code: int | None = None
    title = f"HTTP {http_status}"
    details: str | None = None
    try:
        doc = decode_json(body)
    except msgspec.DecodeError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        raw_code = error.get("code")
        code = raw_code if isinstance(raw_code, int) else None
        title = str(error.get("error_user_title") or error.get("message") or title)
        error_data = error.get("error_data")
        if isinstance(error_data, dict) and error_data.get("details"):
            details = str(error_data["details"])
        elif error.get("error_user_msg"):
            details = str(error["error_user_msg"])
    transient = (code in TRANSIENT_CODES) or http_status >= 500 or http_status == 429
    return SendFailure(http_status=http_status, code=code, title=title, details=details, transient=transient)


def parse_send_response(body: bytes) -> str:
    """The wamid from a 200 answer of the send API (§1.7.5)."""
    try:
        doc = decode_json(body)
        wamid = doc["messages"][0]["id"]
    except (msgspec.DecodeError, KeyError, IndexError, TypeError) as exc:
        raise SendFailure(http_status=200, code=None, title="unexpected send response", transient=True) from exc
    if not isinstance(wamid, str) or not wamid:
        raise SendFailure(http_status=200, code=None, title="unexpected send response", transient=True)
    return wamid
