"""Telegram Bot API logic on decoded values: webhook checks, `Update` normalization, send bodies, errors.

Nothing here touches NATS; `app.py` wires it to the bus and HTTP. Wire formats follow the
platform reference §4 (setWebhook + secret token, `Update` JSON, deep links, sendMessage, errors).

Identifiers:
- a Telegram `message_id` is unique only within one chat, so the provider message id of a
  message is `"<chat id>:<message id>"` (what `quoted_provider_message_id` uses too), and a
  button press is `"callback:<callback query id>"`;
- the JetStream de-duplication id adds the integration (`telegram:<integration>:<provider id>`),
  because two bots share chat ids (a private chat's id is the user's id).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from shared import outbound, render
from shared.ingress import WebhookShapeError
from shared.messages.channel import InboundMessage, OutboundSend, Postback
from shared.records import IntegrationRecord
from shared.sunco import (
    Action,
    BuyAction,
    CarouselContent,
    Content,
    FileContent,
    FormContent,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    LocationContent,
    LocationCoordinates,
    LocationInfo,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TextContent,
    UnsupportedContent,
    WebviewAction,
)
from shared.untrusted import decode_json, secrets_equal

CHANNEL = "telegram"
DEFAULT_BASE_URL = "https://api.telegram.org"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_WEBHOOK_BODY = 256 * 1024
# Limits from python-telegram-bot's `telegram.constants` (platform reference §4.1, §4.4).
TEXT_MAX = 4096
CAPTION_MAX = 1024
CALLBACK_DATA_MAX_BYTES = 64
BUTTON_TEXT_MAX = 64
# What the gateway asks Telegram to deliver: customer messages and button presses.
ALLOWED_UPDATES = ("message", "callback_query")
# The DeliveryStatus.error_code of a send refused with 403 Forbidden (the user blocked the bot,
# deleted their account, or the bot was removed from the group): the client can no longer be
# reached, and `conversations` may mark it `blocked`.
BLOCKED_ERROR_CODE = "telegram_403_blocked"

SECRET_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
DEEP_LINK_PAYLOAD_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_START_RE = re.compile(r"^/start(?:@(?P<bot>[A-Za-z0-9_]+))?(?:[ \t\n]+(?P<payload>.*))?$", re.DOTALL)


# --- integration credentials ---------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """The fields of a telegram integration record the service needs."""

    integration_id: str
    app_id: str
    token: str
    webhook_secret: str
    base_url: str
    username: str = ""
    bot_id: str = ""

    @classmethod
    def from_record(cls, record: IntegrationRecord) -> Credentials | None:
        """Credentials of a usable telegram integration, or None (wrong type, inactive, no token)."""
        if record.type != CHANNEL or record.status not in ("active", ""):
            return None
        cfg = record.config
        token = cfg.get("token")
        if not isinstance(token, str) or not token:
            return None
        secret = cfg.get("webhookSecret")
        bot_id = cfg.get("botId")
        return cls(
            integration_id=record.id,
            app_id=record.app_id,
            token=token,
            webhook_secret=secret if isinstance(secret, str) else "",
            base_url=str(cfg.get("baseUrl") or DEFAULT_BASE_URL).rstrip("/"),
            username=str(cfg.get("username") or ""),
            bot_id=str(bot_id) if isinstance(bot_id, str | int) and bot_id != "" else token.split(":", 1)[0],
        )

    def method_url(self, method: str) -> str:
        """`{base}/bot{token}/{method}` (platform reference §4.1)."""
        return f"{self.base_url}/bot{self.token}/{method}"

    def file_url(self, file_path: str) -> str:
        """Where the bytes of a file returned by `getFile` are downloaded."""
        return f"{self.base_url}/file/bot{self.token}/{file_path}"

    @property
    def secret_usable(self) -> bool:
        """True when the webhook secret is one Telegram accepts as `secret_token`."""
        return bool(SECRET_TOKEN_RE.match(self.webhook_secret))


def secret_ok(creds: Credentials, header: str | None) -> bool:
    """Constant-time check of `X-Telegram-Bot-Api-Secret-Token`; never true without a usable secret."""
    if not creds.secret_usable or header is None:
        return False
    return secrets_equal(creds.webhook_secret, header)


def webhook_url(public_base_url: str, integration_id: str) -> str:
    """The public URL Telegram posts the integration's updates to."""
    return f"{public_base_url.rstrip('/')}/webhooks/telegram/{integration_id}"


def set_webhook_params(creds: Credentials, url: str) -> dict[str, Any]:
    """The `setWebhook` parameters (platform reference §4.2)."""
    return {"url": url, "secret_token": creds.webhook_secret, "allowed_updates": list(ALLOWED_UPDATES)}


@dataclass(frozen=True)
class WebhookRegistration:
    """What a `setWebhook` call registered; a change of any field means calling it again."""

    base_url: str
    token: str
    url: str
    secret: str

    @classmethod
    def of(cls, creds: Credentials, public_base_url: str) -> WebhookRegistration:
        """The registration an integration needs."""
        return cls(creds.base_url, creds.token, webhook_url(public_base_url, creds.integration_id),
                   creds.webhook_secret)


def media_signature(token: str, integration_id: str, file_id: str) -> str:
    """A short HMAC that makes a gateway media URL unguessable without the bot token."""
    return hmac.new(token.encode(), f"{integration_id}:{file_id}".encode(), hashlib.sha256).hexdigest()[:32]


def media_url(public_base_url: str, creds: Credentials, file_id: str) -> str:
    """The gateway URL that serves a Telegram file (the Bot API file URL holds the token)."""
    sig = media_signature(creds.token, creds.integration_id, file_id)
    return f"{public_base_url}/webhooks/telegram/{creds.integration_id}/media/{file_id}?sig={sig}"


def file_id_of(url: str, public_base_url: str, creds: Credentials) -> str | None:
    """The file id of a gateway media URL of this integration (`media_url`), or None."""
    prefix = f"{public_base_url}/webhooks/telegram/{creds.integration_id}/media/"
    file_id = url[len(prefix):].split("?", 1)[0] if url.startswith(prefix) else ""
    return file_id if file_id and "/" not in file_id else None


# --- Update wire schema (platform reference §4.3) ---------------------------------------------------

class _User(msgspec.Struct):
    id: int
    is_bot: bool = False
    first_name: str = ""
    last_name: str | None = None
    username: str | None = None
    language_code: str | None = None


class _Chat(msgspec.Struct):
    id: int
    type: str = "private"
    title: str | None = None
    username: str | None = None
    first_name: str | None = None
    last_name: str | None = None


class _Entity(msgspec.Struct):
    type: str
    offset: int
    length: int


class _PhotoSize(msgspec.Struct):
    file_id: str
    file_unique_id: str = ""
    width: int = 0
    height: int = 0
    file_size: int | None = None


class _File(msgspec.Struct):
    file_id: str
    file_name: str | None = None
    mime_type: str | None = None
    file_size: int | None = None


class _Location(msgspec.Struct):
    latitude: float
    longitude: float


class _Venue(msgspec.Struct):
    title: str = ""
    address: str = ""


class _Replied(msgspec.Struct):
    message_id: int


class _Message(msgspec.Struct):
    message_id: int
    date: int
    chat: _Chat
    from_: _User | None = msgspec.field(default=None, name="from")
    text: str | None = None
    caption: str | None = None
    entities: list[_Entity] = []
    photo: list[_PhotoSize] = []
    document: _File | None = None
    video: _File | None = None
    audio: _File | None = None
    voice: _File | None = None
    location: _Location | None = None
    venue: _Venue | None = None
    reply_to_message: _Replied | None = None
    reply_markup: dict[str, Any] | None = None


class _CallbackQuery(msgspec.Struct):
    id: str
    from_: _User = msgspec.field(name="from")
    chat_instance: str = ""
    message: _Message | None = None
    data: str | None = None


class _Update(msgspec.Struct):
    update_id: int
    message: _Message | None = None
    callback_query: _CallbackQuery | None = None


@dataclass
class Normalized:
    """What one update carries: at most one inbound message, and a callback query to answer."""

    update_id: int
    message: InboundMessage | None = None
    callback_query_id: str | None = None


def parse_update(raw: bytes) -> tuple[_Update, dict[str, Any]]:
    """Decode and validate an `Update` (raises WebhookShapeError); also returns the raw JSON object."""
    try:
        doc = decode_json(raw)
        if not isinstance(doc, dict):
            raise WebhookShapeError("an Update is a JSON object")
        update = msgspec.convert(doc, _Update)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WebhookShapeError(f"not a Telegram Update: {exc}") from exc
    if update.update_id < 0:
        raise WebhookShapeError("bad update_id")
    return update, doc


def normalize_update(raw: bytes, creds: Credentials, public_base_url: str) -> Normalized:
    """The inbound message of a verified update (None for kinds the gateway does not handle)."""
    update, doc = parse_update(raw)
    out = Normalized(update_id=update.update_id)
    if update.message is not None:
        out.message = _from_message(update.message, doc["message"], creds, public_base_url)
    elif update.callback_query is not None:
        out.message = _from_callback(update.callback_query, doc["callback_query"], creds)
        out.callback_query_id = update.callback_query.id
    # edited messages, channel posts, member updates, …: acknowledged, nothing to queue.
    return out


def provider_message_id(chat_id: int | str, message_id: int | str) -> str:
    """The provider id of a Telegram message (message ids are unique per chat only)."""
    return f"{chat_id}:{message_id}"


def _display_name(user: _User | None, chat: _Chat) -> str | None:
    if chat.type != "private" and chat.title:
        return chat.title
    first = (user.first_name if user else chat.first_name) or ""
    last = (user.last_name if user else chat.last_name) or ""
    name = f"{first} {last}".strip()
    return name or None


def _client_info(user: _User | None, chat: _Chat, creds: Credentials) -> dict[str, Any]:
    info: dict[str, Any] = {"chat_id": chat.id, "chat_type": chat.type, "bot_id": creds.bot_id}
    if user is not None:
        info["user_id"] = user.id
        for key in ("username", "first_name", "last_name", "language_code"):
            value = getattr(user, key)
            if value:
                info[key] = value
    if chat.title:
        info["chat_title"] = chat.title
    return info


def _timestamp(value: int) -> float:
    ts = float(value)
    if not math.isfinite(ts) or ts < 0:
        raise WebhookShapeError(f"bad date {value!r}")
    return ts


def start_payload(text: str, entities: list[_Entity], bot_username: str) -> str | None:
    """The deep-link payload of `/start <payload>` (§4.4), or None.

    Only a leading `bot_command` entity counts (typing "/start x" in a caption or mid-text does
    not), `/start@<bot>` must name this bot, and the payload must be what `t.me/<bot>?start=`
    can carry: 1-64 characters of `[A-Za-z0-9_-]`.
    """
    if not any(e.type == "bot_command" and e.offset == 0 for e in entities):
        return None
    match = _START_RE.match(text)
    if match is None:
        return None
    addressed = match.group("bot")
    if addressed and bot_username and addressed.lower() != bot_username.lower():
        return None
    payload = (match.group("payload") or "").strip()
    return payload if DEEP_LINK_PAYLOAD_RE.match(payload) else None


def _from_message(message: _Message, raw: dict[str, Any], creds: Credentials, public_base_url: str) -> InboundMessage:
    referral = None
    if message.text is not None:
        content: Content = TextContent(text=message.text)
        referral = start_payload(message.text, message.entities, creds.username)
    elif message.photo:
        largest = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        content = ImageContent(media_url=media_url(public_base_url, creds, largest.file_id),
                               media_type="image/jpeg", text=message.caption or None)
    elif (media := message.document or message.video or message.audio or message.voice) is not None:
        content = FileContent(media_url=media_url(public_base_url, creds, media.file_id), media_type=media.mime_type,
                              media_size=media.file_size, alt_text=media.file_name, text=message.caption or None)
    elif message.location is not None:
        loc = message.location
        if not (math.isfinite(loc.latitude) and math.isfinite(loc.longitude)):
            raise WebhookShapeError("bad coordinates")
        venue = message.venue
        place = LocationInfo(name=venue.title or None, address=venue.address or None) if venue is not None else None
        content = LocationContent(coordinates=LocationCoordinates(lat=loc.latitude, long=loc.longitude),
                                  location=place)
    else:
        # Stickers, contacts, polls, service messages, …: kept, never dropped.
        kind = next((k for k in raw if k not in _COMMON_MESSAGE_KEYS), "message")
        content = UnsupportedContent(channel_type=kind, raw=raw)
    chat = message.chat
    return InboundMessage(
        app_id=creds.app_id,
        integration_id=creds.integration_id,
        channel=CHANNEL,
        client_type="telegram",
        channel_user_id=str(chat.id),
        provider_message_id=provider_message_id(chat.id, message.message_id),
        received_at=_timestamp(message.date),
        content=content,
        display_name=_display_name(message.from_, chat),
        client_info=_client_info(message.from_, chat, creds),
        raw=raw,
        quoted_provider_message_id=(provider_message_id(chat.id, message.reply_to_message.message_id)
                                    if message.reply_to_message else None),
        referral=referral,
    )


_COMMON_MESSAGE_KEYS = frozenset({
    "message_id", "message_thread_id", "from", "sender_chat", "date", "chat", "forward_origin", "is_topic_message",
    "reply_to_message", "via_bot", "edit_date", "has_protected_content", "author_signature", "entities",
    "caption", "caption_entities", "reply_markup", "link_preview_options", "business_connection_id",
})


def _button_text(markup: dict[str, Any] | None, data: str) -> str | None:
    """The label of the inline button whose callback_data is `data` (Telegram does not send it)."""
    rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    for row in rows if isinstance(rows, list) else []:
        for button in row if isinstance(row, list) else []:
            if isinstance(button, dict) and button.get("callback_data") == data and isinstance(button.get("text"), str):
                return str(button["text"])
    return None


def _from_callback(query: _CallbackQuery, raw: dict[str, Any], creds: Credentials) -> InboundMessage:
    if query.data is None:
        raise WebhookShapeError("callback query without data (games are not supported)")
    chat = query.message.chat if query.message is not None else _Chat(id=query.from_.id, type="private")
    label = _button_text(query.message.reply_markup, query.data) if query.message else None
    text = label or query.data
    return InboundMessage(
        app_id=creds.app_id,
        integration_id=creds.integration_id,
        channel=CHANNEL,
        client_type="telegram",
        channel_user_id=str(chat.id),
        provider_message_id=f"callback:{query.id}",
        received_at=time.time(),  # callback queries carry no date
        content=TextContent(text=text, payload=query.data),
        display_name=_display_name(query.from_, chat),
        client_info=_client_info(query.from_, chat, creds),
        raw=raw,
        postback=Postback(payload=query.data, text=text),
        quoted_provider_message_id=(provider_message_id(chat.id, query.message.message_id)
                                    if query.message is not None else None),
    )


def inbound_msg_id(message: InboundMessage) -> str:
    """JetStream de-duplication id of an inbound message (a Telegram retry is not a second message)."""
    return f"{CHANNEL}:{message.integration_id}:{message.provider_message_id}"


# --- sending ---------------------------------------------------------------------------------------

# One Bot API call: the method and its JSON parameters.
MethodCall = tuple[str, dict[str, Any]]

# Schemes Telegram accepts in an inline keyboard's `url` button (others: BUTTON_URL_INVALID).
URL_BUTTON_SCHEMES = ("http://", "https://", "tg://")
# python-telegram-bot's `InlineKeyboardMarkupLimit.TOTAL_BUTTON_NUMBER`.
INLINE_BUTTONS_MAX = 100
# The button of a location request without a label of its own.
LOCATION_BUTTON_TEXT = "Share location"


class UnsendableContent(outbound.UnsendableContent):
    """The content has no Telegram representation (a permanent failure)."""


class _NoNativeForm(Exception):
    """A part of the content Telegram cannot carry as is (a payload over 64 bytes, a `mailto:`
    link): the whole content goes as `render.fallback` text instead."""


def text_length(text: str) -> int:
    """The length Telegram's limits are checked against, read strictly: UTF-16 code units (what
    its entity offsets count), so a character outside the BMP counts twice."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _prefix(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` UTF-16 units."""
    used = 0
    for index, ch in enumerate(text):
        used += 2 if ord(ch) > 0xFFFF else 1
        if used > limit:
            return text[:index]
    return text


def _clip(text: str, limit: int) -> str:
    return text if text_length(text) <= limit else _prefix(text, limit - 1) + "…"


def split_text(text: str, limit: int = TEXT_MAX) -> list[str]:
    """`text` as messages of at most `limit` (UTF-16 units), cut at a paragraph, line or word
    break where one is near the end; no part is empty (Telegram refuses empty text)."""
    parts: list[str] = []
    rest = text.strip()
    while rest:
        if text_length(rest) <= limit:
            parts.append(rest)
            break
        head = _prefix(rest, limit)
        cut = len(head)
        for sep in ("\n\n", "\n", " "):
            at = head.rfind(sep)
            if at > len(head) // 2:
                cut = at
                break
        part, rest = rest[:cut].rstrip(), rest[cut:].lstrip()
        if part:
            parts.append(part)
    return parts


def chat_id_of(recipient: str) -> int | str:
    """The `chat_id` parameter: an integer id, or an `@channelusername` as is."""
    try:
        return int(recipient)
    except ValueError:
        return recipient


def _label(text: str | None, otherwise: str) -> str:
    return _clip((text or "").strip() or otherwise, BUTTON_TEXT_MAX)


def inline_button(action: Action, label: str | None = None) -> dict[str, Any] | None:
    """One SunCo action as an inline keyboard button: reply/postback → `callback_data` (the
    payload, else the text), link/webview/buy → `url`; None for what has no inline form (a
    location request, a buy without a link). _NoNativeForm when the action does not fit (a
    payload that is not 1-64 bytes, a link Telegram does not open)."""
    if isinstance(action, ReplyAction | PostbackAction):
        data = action.payload or action.text
        if not data or len(data.encode()) > CALLBACK_DATA_MAX_BYTES:
            raise _NoNativeForm(f"button payload must be 1-{CALLBACK_DATA_MAX_BYTES} bytes on Telegram")
        return {"text": label or _label(action.text, data), "callback_data": data}
    if isinstance(action, LinkAction | WebviewAction | BuyAction):
        if not action.uri:
            return None
        if not action.uri.lower().startswith(URL_BUTTON_SCHEMES):
            raise _NoNativeForm("Telegram's url buttons open http(s) and tg links only")
        text = action.text
        if isinstance(action, BuyAction) and action.currency:
            text = f"{action.text} ({action.amount / 100:.2f} {action.currency.upper()})"
        return {"text": label or _label(text, action.uri), "url": action.uri}
    return None


def _inline_markup(rows: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    if len(rows) > INLINE_BUTTONS_MAX:
        raise _NoNativeForm(f"more than {INLINE_BUTTONS_MAX} buttons")
    return {"inline_keyboard": rows} if rows else None


def inline_keyboard(actions: list[Action] | None) -> dict[str, Any] | None:
    """Actions as an inline keyboard, one button per row (None when no action has an inline form)."""
    rows = [[button] for action in actions or [] if (button := inline_button(action)) is not None]
    return _inline_markup(rows)


def location_keyboard(actions: list[Action] | None) -> dict[str, Any] | None:
    """A location request as a reply keyboard with a `request_location` button (the customer's
    location comes back as a message with `location`), or None without one."""
    request = next((a for a in actions or [] if isinstance(a, LocationRequestAction)), None)
    if request is None:
        return None
    return {"keyboard": [[{"text": _label(request.text, LOCATION_BUTTON_TEXT), "request_location": True}]],
            "one_time_keyboard": True, "resize_keyboard": True}


def _messages(chat_id: int | str, text: str, markup: dict[str, Any] | None = None) -> list[MethodCall]:
    """`sendMessage` calls carrying `text` (split at 4096), the markup on the last one."""
    calls: list[MethodCall] = [("sendMessage", {"chat_id": chat_id, "text": part}) for part in split_text(text)]
    if not calls:
        raise UnsendableContent("empty text")
    if markup is not None:
        calls[-1][1]["reply_markup"] = markup
    return calls


def _media(method: str, kind: str, chat_id: int | str, url: str, caption: str | None,
           markup: dict[str, Any] | None = None) -> MethodCall:
    params: dict[str, Any] = {"chat_id": chat_id, kind: url}
    if caption and caption.strip():
        params["caption"] = _clip(caption.strip(), CAPTION_MAX)
    if markup is not None:
        params["reply_markup"] = markup
    return method, params


def _with_actions(calls: list[MethodCall], chat_id: int | str, actions: list[Action] | None) -> list[MethodCall]:
    """Put a message's buttons on its last call: the inline keyboard, and the location request's
    reply keyboard — on a prompt of its own when both exist (a message has one reply_markup)."""
    inline = inline_keyboard(actions)
    location = location_keyboard(actions)
    if inline is not None:
        calls[-1][1]["reply_markup"] = inline
    if location is not None:
        if inline is None:
            calls[-1][1]["reply_markup"] = location
        else:
            calls += _messages(chat_id, render.LOCATION_PROMPT, location)
    return calls


def _item_text(item: Item) -> str:
    return "\n".join(x for x in (item.title.strip(), (item.description or "").strip()) if x)


def _card(chat_id: int | str, item: Item) -> list[MethodCall]:
    """A carousel item: a photo with the title and description as caption (or a text message
    when it has no image), with its actions as an inline keyboard."""
    markup = inline_keyboard(list(item.actions))
    if item.media_url:
        return [_media("sendPhoto", "photo", chat_id, item.media_url, _item_text(item), markup)]
    return _messages(chat_id, _item_text(item) or "…", markup)


def _list_message(chat_id: int | str, content: ListContent) -> list[MethodCall]:
    """A list: one message naming every item, an inline keyboard with one row per item action
    (named after its item where labels repeat), then the list's own actions."""
    text = "\n\n".join(_item_text(item) for item in content.items)
    labelled = [(item, action) for item in content.items for action in item.actions]
    labels = [action.text.strip() for _item, action in labelled]
    rows: list[list[dict[str, Any]]] = []
    for (item, action), label in zip(labelled, labels, strict=True):
        named = f"{item.title.strip()}: {label}" if label and labels.count(label) > 1 else None
        button = inline_button(action, _label(named, label) if named else None)
        if button is not None:
            rows.append([button])
    rows += [[button] for action in content.actions or [] if (button := inline_button(action)) is not None]
    return _messages(chat_id, text, _inline_markup(rows))


def _native(content: Content, chat_id: int | str) -> list[MethodCall]:
    """The calls that show `content` as Telegram does (_NoNativeForm where a part does not fit)."""
    if isinstance(content, TextContent):
        if not content.text.strip():
            raise UnsendableContent("empty text")
        return _with_actions(_messages(chat_id, content.text), chat_id, content.actions)
    if isinstance(content, ImageContent):
        if not content.media_url:
            raise UnsendableContent("image without mediaUrl")
        return _with_actions([_media("sendPhoto", "photo", chat_id, content.media_url, content.text)], chat_id,
                             content.actions)
    if isinstance(content, FileContent):
        if not content.media_url:
            raise UnsendableContent("file without mediaUrl")
        return [_media("sendDocument", "document", chat_id, content.media_url, content.text)]
    if isinstance(content, LocationContent):
        where: dict[str, Any] = {"chat_id": chat_id, "latitude": content.coordinates.lat,
                                 "longitude": content.coordinates.long}
        name = (content.location.name or "").strip() if content.location else ""
        address = (content.location.address or "").strip() if content.location else ""
        if name and address:  # a named place: Telegram's venue (both are required there)
            return [("sendVenue", {**where, "title": name, "address": address})]
        return [("sendLocation", where)]
    if isinstance(content, CarouselContent):
        if not content.items:
            raise UnsendableContent("carousel without items")
        calls = _messages(chat_id, content.text) if content.text and content.text.strip() else []
        for item in content.items:
            calls += _card(chat_id, item)
        return calls
    if isinstance(content, ListContent):
        if not content.items:
            raise UnsendableContent("list without items")
        return _list_message(chat_id, content)
    if isinstance(content, FormContent):
        return _messages(chat_id, render.fallback(content).text)
    # A formResponse is the customer's own answer; templates are WhatsApp's.
    raise UnsendableContent(f"{content.__class__.__name__} cannot be sent on Telegram")


def _fallback(content: Content, chat_id: int | str) -> list[MethodCall]:
    """`content` as readable text with numbered choices (`render.fallback`: the customer's
    numbered answer maps back to the payload), keeping an image and a location request."""
    try:
        text = render.fallback(content)
    except render.NoFallback as exc:
        raise UnsendableContent(str(exc)) from exc
    actions = content.actions if isinstance(content, TextContent | ImageContent) else None
    if isinstance(content, ImageContent) and content.media_url:
        if text_length(text.text) <= CAPTION_MAX:
            calls = [_media("sendPhoto", "photo", chat_id, content.media_url, text.text)]
        else:
            calls = [_media("sendPhoto", "photo", chat_id, content.media_url, None), *_messages(chat_id, text.text)]
    else:
        calls = _messages(chat_id, text.text)
    location = location_keyboard(actions)
    if location is not None:
        calls[-1][1]["reply_markup"] = location
    return calls


def build_requests(send: OutboundSend) -> list[MethodCall]:
    """The Bot API calls that carry an outbound message, in order (platform reference §4.5).

    Natively where Telegram has a form (inline keyboards, a reply keyboard for a location
    request, a carousel as one message per card, a list as one message with a keyboard), as
    `render.fallback` text where a part does not fit Telegram's limits; UnsendableContent for
    content with no Telegram form at all. A quoted message is replied to by the first call.
    """
    chat_id = chat_id_of(send.recipient)
    try:
        calls = _native(send.content, chat_id)
    except _NoNativeForm:
        calls = _fallback(send.content, chat_id)
    if send.quoted_provider_message_id:
        _chat, sep, quoted = send.quoted_provider_message_id.rpartition(":")
        if sep and quoted.isdigit():
            calls[0][1]["reply_parameters"] = {"message_id": int(quoted), "allow_sending_without_reply": True}
    return calls


def build_request(send: OutboundSend) -> MethodCall:
    """The first (main) call of an outbound message: the one that replies to a quoted message."""
    return build_requests(send)[0]


def chat_action_request(recipient: str, activity: str) -> MethodCall | None:
    """The `sendChatAction` call that shows a business activity: typing; None for what a bot
    cannot show (typing stopping ends with the next message or after 5 s; bots send no read
    receipts)."""
    if activity != "typing:start":
        return None
    return "sendChatAction", {"chat_id": chat_id_of(recipient), "action": "typing"}


@dataclass
class SendFailure(outbound.SendFailure):
    """A call the Bot API refused (or that never reached it)."""

    http_status: int
    error_code: int | None
    description: str
    retry_after: float | None = None
    migrate_to_chat_id: int | None = None
    transient: bool = False
    # Reported instead of `code` (a failure of ours rather than the Bot API's).
    reported_code: str | None = None

    def __str__(self) -> str:
        return f"HTTP {self.http_status}: {self.description}"

    @property
    def code(self) -> str:
        """The DeliveryStatus error code: `telegram_403_blocked`, `telegram_<status>`, `telegram_unreachable`."""
        if self.http_status == 403:
            return BLOCKED_ERROR_CODE
        if self.http_status == 0:
            return "telegram_unreachable"
        return f"telegram_{self.error_code or self.http_status}"

    def status_error(self) -> tuple[str, str, str | None]:
        return self.reported_code or self.code, self.description, failure_details(self)


def classify_error(http_status: int, body: bytes) -> SendFailure:
    """Turn a failed Bot API answer (§4.6) into a SendFailure, deciding whether a retry can help."""
    description = f"HTTP {http_status}"
    error_code: int | None = None
    retry_after: float | None = None
    migrate: int | None = None
    try:
        doc = decode_json(body)
    except msgspec.DecodeError:
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("description"), str) and doc["description"]:
            description = doc["description"]
        if isinstance(doc.get("error_code"), int):
            error_code = doc["error_code"]
        parameters = doc.get("parameters")
        if isinstance(parameters, dict):
            raw_retry = parameters.get("retry_after")
            if isinstance(raw_retry, int | float) and not isinstance(raw_retry, bool) and raw_retry >= 0:
                retry_after = float(raw_retry)
            raw_migrate = parameters.get("migrate_to_chat_id")
            if isinstance(raw_migrate, int) and not isinstance(raw_migrate, bool):
                migrate = raw_migrate
    # Like python-telegram-bot, `retry_after` decides before the status code does.
    transient = retry_after is not None or http_status == 429 or http_status >= 500 or http_status == 0
    return SendFailure(http_status=http_status, error_code=error_code, description=description,
                       retry_after=retry_after, migrate_to_chat_id=migrate, transient=transient)


def parse_ok_result(body: bytes) -> Any:
    """The `result` of a `{"ok": true, "result": …}` answer (raises a transient SendFailure otherwise)."""
    try:
        doc = decode_json(body)
    except msgspec.DecodeError as exc:
        raise SendFailure(http_status=200, error_code=None, description="unexpected Bot API answer",
                          transient=True) from exc
    if not isinstance(doc, dict) or doc.get("ok") is not True or "result" not in doc:
        raise SendFailure(http_status=200, error_code=None, description="unexpected Bot API answer", transient=True)
    return doc["result"]


def sent_message_id(result: Any) -> str:
    """The provider id of the Message a send method returned."""
    if isinstance(result, dict):
        chat = result.get("chat")
        message_id = result.get("message_id")
        if isinstance(chat, dict) and isinstance(chat.get("id"), int) and isinstance(message_id, int):
            return provider_message_id(chat["id"], message_id)
    raise SendFailure(http_status=200, error_code=None, description="send answer without a message", transient=True)


def failure_details(failure: SendFailure) -> str | None:
    """Extra facts worth reporting with a failure (the new chat id of a migrated group)."""
    if failure.migrate_to_chat_id is not None:
        return f"migrate_to_chat_id={failure.migrate_to_chat_id}"
    return None


def is_group_chat(recipient: str) -> bool:
    """Group and supergroup chat ids are negative (20 messages/min each instead of 1/s)."""
    return recipient.startswith("-")
