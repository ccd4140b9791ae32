"""Messenger Platform logic on decoded values: webhook normalization, the reply-window policy,
Send API bodies and error classification.

Nothing here touches NATS, HTTP or SQLite; `app.py` wires it. Wire formats follow the platform
reference §2 (envelope `entry[].messaging[]`, m.me `ref`, Send API, window and tags, errors).
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from shared import outbound, render
from shared.ingress import Rejected, WebhookShapeError, rejected
from shared.messages.channel import DeliveryState, DeliveryStatus, InboundMessage, OutboundSend, Postback
from shared.outbound import CodedSendFailure
from shared.records import IntegrationRecord
from shared.sunco import (
    Action,
    BuyAction,
    CarouselContent,
    Content,
    FileContent,
    FormContent,
    FormResponseContent,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    LocationContent,
    LocationCoordinates,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
    WebviewAction,
)
from shared.untrusted import decode_json

CHANNEL = "messenger"
MAX_WEBHOOK_BODY = 100 * 1024
# Send API limits (platform reference §2.4; Meta's Send API reference for quick replies/buttons).
TEXT_MAX = 2000
BUTTON_TEMPLATE_TEXT_MAX = 640
MAX_QUICK_REPLIES = 13
QUICK_REPLY_TITLE_MAX = 20
MAX_BUTTONS = 3
BUTTON_TITLE_MAX = 20
PAYLOAD_MAX = 1000
# Generic template (Meta's Send API reference): up to 10 elements, title and subtitle up to 80.
GENERIC_MAX_ELEMENTS = 10
ELEMENT_TITLE_MAX = 80
ELEMENT_SUBTITLE_MAX = 80
# The text of the button template that carries a list's own links (a button template needs one).
LIST_ACTIONS_TEXT = "More options"
HUMAN_AGENT = "HUMAN_AGENT"
# Non-promotional tags a business may attach itself (it attests the content fits the tag).
UPDATE_TAGS = frozenset({"CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE"})
MESSAGING_TYPES = frozenset({"RESPONSE", "UPDATE", "MESSAGE_TAG"})
# The SunCo actions a Messenger button carries (a payment opens its link).
ButtonAction = PostbackAction | LinkAction | WebviewAction | BuyAction


# --- integration credentials -------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """The fields of a messenger integration record the service needs."""

    integration_id: str
    app_id: str
    page_id: str
    page_access_token: str
    app_secret: str
    verify_token: str
    api_version: str
    base_url: str
    # The operator declares that business replies on this Page are typed by people (a support
    # desk), which makes them eligible for the HUMAN_AGENT tag after the 24 h window.
    human_agent: bool = False

    @classmethod
    def from_record(cls, record: IntegrationRecord) -> Credentials | None:
        """Credentials of a usable messenger integration, or None (wrong type, inactive, incomplete)."""
        if record.type != CHANNEL or record.status not in ("active", ""):
            return None
        cfg = record.config
        values = (cfg.get("pageId"), cfg.get("pageAccessToken"), cfg.get("appSecret"))
        if not all(isinstance(v, str) and v for v in values):
            return None
        version = str(cfg.get("apiVersion") or "v23.0")
        if not version.startswith("v"):
            version = "v" + version
        return cls(
            integration_id=record.id,
            app_id=record.app_id,
            page_id=str(values[0]),
            page_access_token=str(values[1]),
            app_secret=str(values[2]),
            verify_token=str(cfg.get("verifyToken") or ""),
            api_version=version,
            base_url=str(cfg.get("baseUrl") or "https://graph.facebook.com").rstrip("/"),
            human_agent=cfg.get("humanAgent") is True,
        )

    @property
    def messages_url(self) -> str:
        """The Send API endpoint of this Page (the token goes in the Authorization header)."""
        return f"{self.base_url}/{self.api_version}/{self.page_id}/messages"


# --- webhook wire schema -------------------------------------------------------------------------

class _Party(msgspec.Struct):
    id: str


class _QuickReply(msgspec.Struct):
    payload: str = ""


class _ReplyTo(msgspec.Struct):
    mid: str = ""


class _Coordinates(msgspec.Struct):
    lat: float
    long: float


class _AttachmentPayload(msgspec.Struct):
    url: str | None = None
    sticker_id: int | str | None = None
    coordinates: _Coordinates | None = None


class _Attachment(msgspec.Struct):
    type: str
    payload: _AttachmentPayload | None = None
    title: str | None = None


class _Message(msgspec.Struct):
    mid: str
    text: str | None = None
    quick_reply: _QuickReply | None = None
    reply_to: _ReplyTo | None = None
    attachments: list[_Attachment] = []
    is_echo: bool = False


class _Referral(msgspec.Struct):
    ref: str | None = None
    source: str | None = None
    type: str | None = None
    ad_id: str | None = None


class _Postback(msgspec.Struct):
    payload: str = ""
    title: str = ""
    mid: str | None = None
    referral: _Referral | None = None


class _Delivery(msgspec.Struct):
    watermark: int | float
    mids: list[str] = []


class _Read(msgspec.Struct):
    watermark: int | float


class _Reaction(msgspec.Struct):
    mid: str = ""
    action: str = ""


class _Event(msgspec.Struct):
    sender: _Party
    recipient: _Party
    timestamp: int | float
    message: _Message | None = None
    postback: _Postback | None = None
    referral: _Referral | None = None
    delivery: _Delivery | None = None
    read: _Read | None = None
    reaction: _Reaction | None = None


# Lists of items are kept raw and each item converted on its own: one malformed item is
# reported (`Normalized.rejected`) without failing its siblings.
class _Entry(msgspec.Struct):
    id: str
    time: int | float = 0
    messaging: list[Any] = []


class _Envelope(msgspec.Struct):
    object: str
    entry: list[Any]


@dataclass(frozen=True)
class Receipt:
    """A delivery or read receipt: explicit message ids and/or a watermark (ms → seconds here).

    `read` names no message ids: everything sent to the person at or before the watermark was
    read, so the app maps it through the ids it recorded when sending.
    """

    creds: Credentials
    psid: str
    status: Literal["delivered", "read"]
    watermark: float
    mids: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UserAction:
    """A person acted (message, postback, referral): the Page may answer for a while."""

    page_id: str
    psid: str
    at: float


@dataclass
class Normalized:
    """What one webhook delivery carries."""

    messages: list[InboundMessage] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    actions: list[UserAction] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


Resolver = Callable[[str], Credentials | None]


def _seconds(value: int | float, what: str) -> float:
    """Messenger times are Unix milliseconds."""
    ms = float(value)
    if not math.isfinite(ms) or ms < 0:
        raise WebhookShapeError(f"bad {what} {value!r}")
    return ms / 1000.0


def parse_webhook(raw: bytes) -> _Envelope:
    """Decode and validate the notification envelope (raises WebhookShapeError)."""
    try:
        envelope = decode_json(raw, _Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WebhookShapeError(f"not a Messenger notification: {exc}") from exc
    if envelope.object != "page":
        raise WebhookShapeError(f"unexpected object {envelope.object!r}")
    return envelope


def normalize_webhook(raw: bytes, creds: Credentials, resolve: Resolver, now: float | None = None) -> Normalized:
    """Every well-formed event of a verified notification, normalized.

    Raises WebhookShapeError only when the body is not a notification at all; a malformed entry
    or event goes to `rejected` and its siblings are still normalized (Meta retries a refused
    notification unchanged, so one bad event would hold back the rest). `creds` is the
    integration whose URL received the call; `resolve(page_id)` finds a sibling integration
    when one Meta app's webhook carries several Pages (it must share the app secret, which the
    signature proved). Echoes of our own sends and standby events are skipped.
    """
    envelope = parse_webhook(raw)
    current = time.time() if now is None else now
    out = Normalized()
    for e_index, raw_entry in enumerate(envelope.entry):
        try:
            entry = msgspec.convert(raw_entry, _Entry)
        except msgspec.ValidationError as exc:
            out.rejected.append(rejected(f"entry[{e_index}]", exc))
            continue
        target: Credentials | None = creds
        if entry.id != creds.page_id:
            sibling = resolve(entry.id)
            target = sibling if sibling is not None and sibling.app_secret == creds.app_secret else None
        for index, raw_event in enumerate(entry.messaging):
            where = f"entry[{e_index}].messaging[{index}]"
            try:
                event = msgspec.convert(raw_event, _Event)
                if target is None:
                    continue  # a Page this gateway does not serve (validated, then ignored)
                # Into a scratch result first, so a half-normalized event adds nothing.
                one = Normalized()
                _normalize_event(event, raw_event, target, current, one)
            except (msgspec.ValidationError, WebhookShapeError) as exc:
                mid = raw_event.get("message") if isinstance(raw_event, dict) else None
                out.rejected.append(rejected(where, exc, mid, id_key="mid"))
                continue
            out.messages += one.messages
            out.receipts += one.receipts
            out.actions += one.actions
    return out


def _normalize_event(event: _Event, raw: dict[str, Any], creds: Credentials, now: float, out: Normalized) -> None:
    at = _seconds(event.timestamp, "timestamp")
    psid = event.sender.id
    if not psid:
        raise WebhookShapeError("event without sender id")
    if event.message is not None:
        if not event.message.mid:
            raise WebhookShapeError("message without mid")
        if event.message.is_echo or psid == creds.page_id:
            return  # our own outgoing message echoed back
        out.messages.extend(_message(event.message, raw, psid, at, creds))
        out.actions.append(UserAction(creds.page_id, psid, min(at, now)))
    elif event.postback is not None:
        out.messages.append(_postback(event.postback, raw, psid, at, event.timestamp, creds))
        out.actions.append(UserAction(creds.page_id, psid, min(at, now)))
    elif event.referral is not None:
        # Opening an existing thread through m.me?ref= reopens the standard window (§2.3).
        out.actions.append(UserAction(creds.page_id, psid, min(at, now)))
        if event.referral.ref:
            out.messages.append(_inbound(creds, psid, f"referral.{psid}.{event.timestamp}", at, raw,
                                         UnsupportedContent(channel_type="referral", raw=raw),
                                         referral=event.referral.ref))
    elif event.delivery is not None:
        out.receipts.append(Receipt(creds, psid, "delivered", _seconds(event.delivery.watermark, "watermark"),
                                    tuple(m for m in event.delivery.mids if m), raw))
    elif event.read is not None:
        out.receipts.append(Receipt(creds, psid, "read", _seconds(event.read.watermark, "watermark"), (), raw))
    elif event.reaction is not None:
        # Kept, never dropped (the conversation shows it as an unsupported message).
        out.messages.append(_inbound(creds, psid, f"reaction.{psid}.{event.timestamp}", at, raw,
                                     UnsupportedContent(channel_type="reaction", raw=raw)))
    # Other events (optins, handovers, policy enforcement, …) carry nothing for a conversation.


def _inbound(creds: Credentials, psid: str, provider_id: str, at: float, raw: dict[str, Any], content: Content,
             *, postback: Postback | None = None, referral: str | None = None,
             quoted: str | None = None) -> InboundMessage:
    return InboundMessage(
        app_id=creds.app_id,
        integration_id=creds.integration_id,
        channel=CHANNEL,
        client_type="messenger",
        channel_user_id=psid,
        provider_message_id=provider_id,
        received_at=at,
        content=content,
        client_info={"page_id": creds.page_id, "psid": psid},
        raw=raw,
        postback=postback,
        quoted_provider_message_id=quoted,
        referral=referral,
    )


def _message(message: _Message, raw: dict[str, Any], psid: str, at: float,
             creds: Credentials) -> list[InboundMessage]:
    quoted = (message.reply_to.mid or None) if message.reply_to else None
    text = message.text or None
    if message.attachments:
        contents: list[tuple[int, Content]] = []
        stickers: set[str] = set()
        raw_attachments = (raw.get("message") or {}).get("attachments") or []
        for index, attachment in enumerate(message.attachments):
            sticker = attachment.payload.sticker_id if attachment.payload else None
            if sticker is not None:
                # Until Aug 2026 a sticker may come both as `sticker` and as `image` (§2.2).
                if str(sticker) in stickers:
                    continue
                stickers.add(str(sticker))
            raw_attachment = raw_attachments[index] if index < len(raw_attachments) else {}
            contents.append((index, _attachment_content(attachment, raw_attachment, None if contents else text)))
        # SunCo messages hold one content each: one inbound message per attachment. The first
        # keeps Meta's mid, the others get `#<attachment index>` (a redelivery stays the same).
        return [_inbound(creds, psid, message.mid if position == 0 else f"{message.mid}#{index}", at, raw,
                         content, quoted=quoted) for position, (index, content) in enumerate(contents)]
    if text is not None:
        if message.quick_reply is not None and message.quick_reply.payload:
            payload = message.quick_reply.payload
            return [_inbound(creds, psid, message.mid, at, raw, TextContent(text=text, payload=payload),
                             postback=Postback(payload=payload, text=text), quoted=quoted)]
        return [_inbound(creds, psid, message.mid, at, raw, TextContent(text=text), quoted=quoted)]
    return [_inbound(creds, psid, message.mid, at, raw, UnsupportedContent(channel_type="message", raw=raw),
                     quoted=quoted)]


def _attachment_content(attachment: _Attachment, raw: dict[str, Any], text: str | None) -> Content:
    payload = attachment.payload
    url = payload.url if payload and isinstance(payload.url, str) and payload.url.startswith(
        ("https://", "http://")) else None
    kind = attachment.type
    if kind in ("image", "sticker") and url:
        return ImageContent(media_url=url, text=text, alt_text="sticker" if kind == "sticker" else None)
    if kind in ("video", "audio", "file") and url:
        return FileContent(media_url=url, text=text, alt_text=attachment.title or None)
    if kind == "location" and payload is not None and payload.coordinates is not None:
        coords = payload.coordinates
        if math.isfinite(coords.lat) and math.isfinite(coords.long):
            return LocationContent(coordinates=LocationCoordinates(lat=coords.lat, long=coords.long))
    return UnsupportedContent(channel_type=kind, raw=raw)


def _postback(postback: _Postback, raw: dict[str, Any], psid: str, at: float, timestamp: int | float,
              creds: Credentials) -> InboundMessage:
    title = postback.title or postback.payload
    referral = postback.referral.ref if postback.referral and postback.referral.ref else None
    provider_id = postback.mid or f"postback.{psid}.{timestamp}"
    return _inbound(creds, psid, provider_id, at, raw, TextContent(text=title, payload=postback.payload or None),
                    postback=Postback(payload=postback.payload, text=postback.title), referral=referral)


def inbound_msg_id(message: InboundMessage) -> str:
    """JetStream de-duplication id of an inbound message (a Meta retry must not be a second message)."""
    return f"{CHANNEL}:{message.provider_message_id}"


@dataclass(frozen=True)
class SentRef:
    """What the service recorded about a message it sent (to map receipts back to it)."""

    mid: str
    message_id: str | None = None
    conversation_id: str | None = None


def receipt_statuses(receipt: Receipt, sent: list[SentRef]) -> list[DeliveryStatus]:
    """DeliveryStatus per message a receipt covers: its explicit mids plus `sent` (watermark matches)."""
    refs = {ref.mid: ref for ref in sent}
    for mid in receipt.mids:
        refs.setdefault(mid, SentRef(mid))
    state: DeliveryState = receipt.status
    return [DeliveryStatus(app_id=receipt.creds.app_id, integration_id=receipt.creds.integration_id, channel=CHANNEL,
                           provider_message_id=ref.mid, status=state, timestamp=receipt.watermark,
                           message_id=ref.message_id, conversation_id=ref.conversation_id, raw=receipt.raw)
            for ref in refs.values()]


def status_msg_id(status: DeliveryStatus) -> str:
    """JetStream de-duplication id of a receipt status."""
    return f"{CHANNEL}:{status.provider_message_id}:{status.status}"


# --- the reply-window policy ------------------------------------------------------------------------

@dataclass(frozen=True)
class Tagging:
    """How a send declares itself to Meta: `messaging_type` and, for MESSAGE_TAG, the `tag`."""

    messaging_type: str
    tag: str | None = None

    def fields(self) -> dict[str, str]:
        """The Send API body fields."""
        out = {"messaging_type": self.messaging_type}
        if self.tag:
            out["tag"] = self.tag
        return out


@dataclass(frozen=True)
class WindowRefusal:
    """Sending now would break Meta's policy: report the message as failed instead."""

    code: str
    title: str
    details: str


@dataclass(frozen=True)
class ReplyWindowPolicy:
    """Messenger's standard messaging window and the HUMAN_AGENT tag (platform reference §2.5).

    - within `standard_seconds` of the person's last action: `RESPONSE` (or the `UPDATE` the
      business asked for);
    - after that, up to `human_agent_seconds`: `MESSAGE_TAG` + `HUMAN_AGENT`, only for replies
      typed by a person (the integration says so, or the send asks for the tag);
    - a non-promotional update tag the business asks for explicitly is passed through (the
      business attests the content fits it);
    - anything else is refused before it reaches Meta: never a policy violation.
    """

    standard_seconds: float = 24 * 3600
    human_agent_seconds: float = 7 * 24 * 3600

    def decide(self, last_user_at: float | None, now: float, *, human_agent: bool = False,
               requested: Tagging | None = None) -> Tagging | WindowRefusal:
        """The tagging to send with, or why not to send."""
        if requested is not None:
            if requested.messaging_type not in MESSAGING_TYPES:
                return WindowRefusal("invalid_messaging_type", f"Unknown messaging_type {requested.messaging_type!r}",
                                     "Use RESPONSE, UPDATE or MESSAGE_TAG.")
            if requested.messaging_type == "MESSAGE_TAG":
                if requested.tag in UPDATE_TAGS:
                    return requested
                if requested.tag != HUMAN_AGENT:
                    return WindowRefusal("invalid_message_tag", f"Unsupported message tag {requested.tag!r}",
                                         "Use HUMAN_AGENT, CONFIRMED_EVENT_UPDATE, POST_PURCHASE_UPDATE or "
                                         "ACCOUNT_UPDATE.")
                human_agent = True
        if last_user_at is None:
            return WindowRefusal("outside_messaging_window", "The person has not messaged this Page",
                                 "Messenger lets a Page message a person only after the person writes to it "
                                 "(or opens the thread through an m.me link).")
        elapsed = max(0.0, now - last_user_at)
        if elapsed <= self.standard_seconds:
            if requested is not None and requested.messaging_type == "MESSAGE_TAG":
                return Tagging("MESSAGE_TAG", HUMAN_AGENT)
            return Tagging(requested.messaging_type if requested is not None else "RESPONSE")
        if human_agent and elapsed <= self.human_agent_seconds:
            return Tagging("MESSAGE_TAG", HUMAN_AGENT)
        hours = elapsed / 3600
        if human_agent:
            return WindowRefusal("outside_messaging_window",
                                 f"Outside Messenger's {self.human_agent_seconds / 86400:g}-day human agent window",
                                 f"The person last wrote {hours:.1f} h ago; HUMAN_AGENT replies are allowed for "
                                 f"{self.human_agent_seconds / 86400:g} days after the person's last message.")
        return WindowRefusal("outside_messaging_window",
                             f"Outside Messenger's {self.standard_seconds / 3600:g}-hour standard messaging window",
                             f"The person last wrote {hours:.1f} h ago; automated replies are allowed for "
                             f"{self.standard_seconds / 3600:g} h, human agent replies (HUMAN_AGENT tag) for "
                             f"{self.human_agent_seconds / 86400:g} days.")


def _override_payload(send: OutboundSend) -> dict[str, Any] | None:
    override = (send.override or {}).get(CHANNEL)
    payload = override.get("payload") if isinstance(override, dict) else None
    return payload if isinstance(payload, dict) and payload else None


def requested_tagging(send: OutboundSend) -> Tagging | None:
    """The messaging_type/tag the business put in `override.messenger.payload`, if any."""
    payload = _override_payload(send)
    if payload is None or ("messaging_type" not in payload and "tag" not in payload):
        return None
    messaging_type = payload.get("messaging_type")
    tag = payload.get("tag")
    if not isinstance(messaging_type, str):
        messaging_type = "MESSAGE_TAG" if tag else ""
    return Tagging(messaging_type, tag if isinstance(tag, str) and tag else None)


# --- Send API bodies -------------------------------------------------------------------------------

class UnsendableContent(outbound.UnsendableContent):
    """The content has no Messenger representation (a permanent failure)."""


class _OverLimit(Exception):
    """The native form would break a Send API limit Meta enforces: send the readable text
    (`render.fallback`) instead, never a body Meta refuses."""


@dataclass(frozen=True)
class SendPart:
    """One Send API call; `media` parts count against the Page's audio/video rate limit."""

    body: dict[str, Any]
    media: bool = False


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_send_parts(send: OutboundSend, tagging: Tagging) -> list[SendPart]:
    """The Send API calls that deliver one business message, in order (platform reference §2.4).

    SunCo content that Messenger splits (an image with a caption) becomes several calls.
    `override.messenger.payload` with a `message` (or `sender_action`) is sent as is, with the
    recipient and the window's tagging filled in.
    """
    head: dict[str, Any] = {"recipient": {"id": send.recipient}, **tagging.fields()}
    payload = _override_payload(send)
    if payload is not None and ("message" in payload or "sender_action" in payload):
        body = {**head, **{k: v for k, v in payload.items() if k not in ("messaging_type", "tag")}}
        return [SendPart(body, media=_is_media(body.get("message")))]
    messages = content_messages(send.content)
    return [SendPart({**head, "message": message}, media=_is_media(message)) for message in messages]


def _is_media(message: Any) -> bool:
    attachment = message.get("attachment") if isinstance(message, dict) else None
    return isinstance(attachment, dict) and attachment.get("type") in ("audio", "video")


def content_messages(content: Content) -> list[dict[str, Any]]:
    """The Send API `message` objects of one SunCo content, in order.

    Native where Messenger has a form (text, quick replies, button and generic templates,
    attachments); the readable text of `render.fallback` (numbered choices the conversations
    service maps back) where it has none (a form) or where the native form would pass one of
    Meta's limits (the body would be refused). UnsendableContent when neither exists.
    """
    if isinstance(content, FormResponseContent):
        raise UnsendableContent("a formResponse is the customer's answer to a form; it is never sent to them")
    if isinstance(content, TemplateContent | UnsupportedContent):
        raise UnsendableContent(f"{content.__class__.__name__} cannot be sent on Messenger")
    if isinstance(content, TextContent) and not content.text.strip():
        raise UnsendableContent("empty text")
    if isinstance(content, ImageContent | FileContent) and not content.media_url:
        raise UnsendableContent(f"{content.__class__.__name__} without mediaUrl")
    if isinstance(content, FormContent):
        return fallback_messages(content)
    try:
        return _native_messages(content)
    except _OverLimit:
        return fallback_messages(content)


def _native_messages(content: Content) -> list[dict[str, Any]]:
    if isinstance(content, TextContent):
        return [_text_message(content.text, content.actions or [])]
    if isinstance(content, ImageContent | FileContent):
        attachment: dict[str, Any] = {"attachment": _attachment(content)}
        actions = (content.actions or []) if isinstance(content, ImageContent) else []
        if content.text or any(not isinstance(a, ReplyAction) for a in actions):
            # Messenger attachments have no caption: the text (and its buttons) follow as their own message.
            return [attachment, _text_message(content.text or "", actions)]
        replies = _quick_replies(actions)
        if replies:
            attachment["quick_replies"] = replies
        return [attachment]
    if isinstance(content, LocationContent):
        lat, long = content.coordinates.lat, content.coordinates.long
        lines = [x for x in (content.location.name, content.location.address) if x] if content.location else []
        query = urllib.parse.quote(f"{lat},{long}")
        lines.append(f"https://www.google.com/maps/search/?api=1&query={query}")
        return [{"text": _clip("\n".join(lines), TEXT_MAX)}]
    if isinstance(content, CarouselContent):
        ratio = content.display_settings.image_aspect_ratio if content.display_settings else None
        return [_generic_message(content.items, ratio)]
    if isinstance(content, ListContent):
        return _list_messages(content)
    raise UnsendableContent(f"{content.__class__.__name__} cannot be sent on Messenger")


def _attachment(content: ImageContent | FileContent) -> dict[str, Any]:
    kind = "image" if isinstance(content, ImageContent) else _file_kind(content.media_type)
    return {"type": kind, "payload": {"url": content.media_url, "is_reusable": True}}


def _file_kind(media_type: str | None) -> str:
    major = (media_type or "").split("/", 1)[0]
    return {"image": "image", "video": "video", "audio": "audio"}.get(major, "file")


def fallback_messages(content: Content) -> list[dict[str, Any]]:
    """`render.fallback(content)` as Send API messages: its media as attachments, then its text
    in as many text messages as Meta's 2,000-character limit needs (split between lines, so a
    numbered choice is never cut)."""
    try:
        fallback = render.fallback(content)
    except render.NoFallback as exc:
        raise UnsendableContent(str(exc)) from exc
    messages: list[dict[str, Any]] = []
    if isinstance(content, ImageContent | FileContent) and content.media_url in fallback.media_urls:
        messages.append({"attachment": _attachment(content)})
    messages += [{"text": chunk} for chunk in split_text(fallback.text, TEXT_MAX)]
    if not messages:
        raise UnsendableContent(f"{content.__class__.__name__} has nothing to show")
    return messages


def split_text(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut between lines where it can be."""
    pieces: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > limit:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:limit])
            line = line[limit:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= limit:
            current = candidate
        else:
            pieces.append(current)
            current = line
    pieces.append(current)
    return [p.strip("\n") for p in pieces if p.strip()]


def _with_location_prompt(text: str, actions: Sequence[Action]) -> str:
    # Meta removed the location quick reply: ask in words (as render.fallback does).
    if not any(isinstance(a, LocationRequestAction) for a in actions):
        return text
    return f"{text}\n\n{render.LOCATION_PROMPT}" if text.strip() else render.LOCATION_PROMPT


def _buttonable(actions: Sequence[Action]) -> list[ButtonAction]:
    # A payment without a link has nowhere to send the customer (render.fallback drops it too).
    return [a for a in actions if isinstance(a, PostbackAction | LinkAction | WebviewAction)
            or (isinstance(a, BuyAction) and a.uri)]


def _text_message(text: str, actions: Sequence[Action]) -> dict[str, Any]:
    replies = [a for a in actions if isinstance(a, ReplyAction)]
    buttons = _buttonable(actions)
    text = _with_location_prompt(text, actions)
    message: dict[str, Any]
    if buttons:
        if not text.strip() or len(text) > BUTTON_TEMPLATE_TEXT_MAX:
            raise _OverLimit("a button template needs a text of 1 to 640 characters")
        if len(buttons) > MAX_BUTTONS:
            raise _OverLimit("a button template has at most 3 buttons")
        message = {"attachment": {"type": "template", "payload": {
            "template_type": "button", "text": text, "buttons": [_button(a) for a in buttons]}}}
    else:
        if not text.strip():
            raise UnsendableContent("empty text")
        if len(text) > TEXT_MAX:
            raise _OverLimit("a text over 2000 characters goes in several messages")
        message = {"text": text}
    quick = _quick_replies(replies)
    if quick:
        message["quick_replies"] = quick
    return message


def _quick_replies(actions: Sequence[Action]) -> list[dict[str, str]]:
    """Quick replies of reply (and, for a list's own actions, postback) actions, titles clipped
    to 20 characters; more than 13, or a payload over 1,000 characters, cannot be sent so."""
    out: list[dict[str, str]] = []
    for action in actions:
        if not isinstance(action, ReplyAction | PostbackAction) or not action.text.strip():
            continue
        payload = action.payload or action.text
        if len(payload) > PAYLOAD_MAX:
            raise _OverLimit("quick reply payload over 1000 characters")
        reply = {"content_type": "text", "title": _clip(action.text, QUICK_REPLY_TITLE_MAX), "payload": payload}
        if isinstance(action, ReplyAction) and action.icon_url and _web_url(action.icon_url):
            reply["image_url"] = action.icon_url
        out.append(reply)
    if len(out) > MAX_QUICK_REPLIES:
        raise _OverLimit("more than 13 quick replies")
    return out


def _web_url(uri: str | None) -> bool:
    if not uri:
        return False
    parts = urllib.parse.urlsplit(uri)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _button(action: ButtonAction) -> dict[str, Any]:
    if not action.text.strip():
        raise _OverLimit("a button needs a title")
    title = _clip(action.text, BUTTON_TITLE_MAX)
    if isinstance(action, PostbackAction):
        payload = action.payload or action.text
        if len(payload) > PAYLOAD_MAX:
            raise _OverLimit("postback payload over 1000 characters")
        return {"type": "postback", "title": title, "payload": payload}
    if not _web_url(action.uri):
        raise _OverLimit("a URL button needs an http(s) URL")
    if isinstance(action, WebviewAction):
        ratio = {"compact": "compact", "tall": "tall"}.get(action.size or "", "full")
        return {"type": "web_url", "url": action.uri, "title": title, "webview_height_ratio": ratio}
    return {"type": "web_url", "url": action.uri, "title": title}


def _generic_message(items: Sequence[Item], aspect_ratio: str | None = None) -> dict[str, Any]:
    """A generic template (a horizontal carousel of cards) of carousel or list items."""
    if not 1 <= len(items) <= GENERIC_MAX_ELEMENTS:
        raise _OverLimit("a generic template holds 1 to 10 elements")
    payload: dict[str, Any] = {"template_type": "generic", "elements": [_element(item) for item in items]}
    if aspect_ratio in ("horizontal", "square"):
        payload["image_aspect_ratio"] = aspect_ratio
    return {"attachment": {"type": "template", "payload": payload}}


def _element(item: Item) -> dict[str, Any]:
    if not item.title.strip():
        raise _OverLimit("an element needs a title")
    element: dict[str, Any] = {"title": _clip(item.title, ELEMENT_TITLE_MAX)}
    if item.description and item.description.strip():
        element["subtitle"] = _clip(item.description, ELEMENT_SUBTITLE_MAX)
    if item.media_url:
        if (item.media_type and not item.media_type.startswith("image/")) or not _web_url(item.media_url):
            raise _OverLimit("a card shows only an image")
        element["image_url"] = item.media_url
    if any(isinstance(a, ReplyAction | LocationRequestAction) for a in item.actions):
        raise _OverLimit("a card button cannot be a reply or a location request")
    actions = _buttonable(item.actions)
    default = next((a for a in actions if isinstance(a, LinkAction) and a.default and _web_url(a.uri)), None)
    buttons = [a for a in actions if a is not default]
    if len(buttons) > MAX_BUTTONS:
        raise _OverLimit("a card holds at most 3 buttons")
    if buttons:
        element["buttons"] = [_button(a) for a in buttons]
    if default is not None:
        if len(element) > 1:
            # SunCo's `default` link: tapping the card itself opens it.
            element["default_action"] = {"type": "web_url", "url": default.uri}
        else:
            element["buttons"] = [_button(default)]
    if len(element) == 1:
        # Meta: "title and at least one other field (image url, subtitle or buttons) is required".
        raise _OverLimit("an element needs a subtitle, an image or a button besides its title")
    return element


def _list_messages(content: ListContent) -> list[dict[str, Any]]:
    """A list as a generic template; its own postbacks as quick replies, its links (and
    payments) in a following button template."""
    actions = content.actions or []
    if any(isinstance(a, ReplyAction | LocationRequestAction) for a in actions):
        raise _OverLimit("a list's own actions are postbacks, links and payments")
    messages = [_generic_message(content.items)]
    links = [a for a in _buttonable(actions) if not isinstance(a, PostbackAction)]
    if links:
        if len(links) > MAX_BUTTONS:
            raise _OverLimit("a button template holds at most 3 buttons")
        messages.append({"attachment": {"type": "template", "payload": {
            "template_type": "button", "text": LIST_ACTIONS_TEXT, "buttons": [_button(a) for a in links]}}})
    postbacks = [a for a in actions if isinstance(a, PostbackAction)]
    if len(postbacks) > MAX_QUICK_REPLIES:
        raise _OverLimit("at most 13 quick replies")
    quick = _quick_replies(postbacks)
    if quick:
        messages[-1]["quick_replies"] = quick
    return messages


# --- business activity ----------------------------------------------------------------------------

SENDER_ACTIONS: dict[str, str] = {"typing:start": "typing_on", "typing:stop": "typing_off",
                                  "conversation:read": "mark_seen"}


def sender_action_body(recipient: str, activity: str) -> dict[str, Any] | None:
    """The Send API body that shows the business typing, stopping, or having read (§2.4), or
    None when Messenger has no sender action for it (or there is nobody to show it to)."""
    action = SENDER_ACTIONS.get(activity)
    if action is None or not recipient:
        return None
    return {"recipient": {"id": recipient}, "sender_action": action}


# --- Send API answers ---------------------------------------------------------------------------------

# Graph codes worth retrying (platform reference §2.6): unknown/temporary errors and the app,
# user, Page and custom rate limits.
TRANSIENT_CODES = frozenset({1, 2, 4, 17, 32, 613, 1200})


@dataclass
class SendFailure(CodedSendFailure):
    """A send the Graph API refused (or that never reached it)."""

    subcode: int | None = None

    def __str__(self) -> str:
        return f"HTTP {self.http_status} code {self.code}/{self.subcode}: {self.title}"


def classify_error(http_status: int, body: bytes) -> SendFailure:
    """Turn a non-200 Graph answer into a SendFailure, deciding whether a retry can help."""
    code: int | None = None
    subcode: int | None = None
    title = f"HTTP {http_status}"
    details: str | None = None
    try:
        doc = decode_json(body)
    except msgspec.DecodeError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        code = error.get("code") if isinstance(error.get("code"), int) else None
        subcode = error.get("error_subcode") if isinstance(error.get("error_subcode"), int) else None
        title = str(error.get("error_user_title") or error.get("message") or title)
        parts = [f"error_subcode {subcode}" if subcode is not None else "",
                 str(error.get("error_user_msg") or ""),
                 f"fbtrace_id {error['fbtrace_id']}" if error.get("fbtrace_id") else ""]
        details = "; ".join(p for p in parts if p) or None
    transient = code in TRANSIENT_CODES or (code is None and (http_status >= 500 or http_status == 429))
    if error is not None and isinstance(error, dict) and error.get("is_transient") is True:
        transient = True
    return SendFailure(http_status=http_status, code=code, title=title, subcode=subcode, details=details,
                       transient=transient)


def parse_send_response(body: bytes) -> str:
    """The `message_id` of a 200 answer of the Send API (`{"recipient_id", "message_id"}`)."""
    try:
        doc = decode_json(body)
    except msgspec.DecodeError as exc:
        raise SendFailure(http_status=200, code=None, title="unexpected send response", transient=True) from exc
    mid = doc.get("message_id") if isinstance(doc, dict) else None
    if not isinstance(mid, str) or not mid:
        raise SendFailure(http_status=200, code=None, title="unexpected send response", transient=True)
    return mid
