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

from shared import outbound
from shared.ingress import WebhookShapeError
from shared.messages.channel import InboundMessage, OutboundSend, Postback
from shared.records import IntegrationRecord
from shared.sunco import (
    Content,
    FileContent,
    ImageContent,
    LinkAction,
    LocationContent,
    LocationCoordinates,
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
        content = LocationContent(coordinates=LocationCoordinates(lat=loc.latitude, long=loc.longitude))
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

class UnsendableContent(outbound.UnsendableContent):
    """The content has no Telegram representation (a permanent failure)."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chat_id_of(recipient: str) -> int | str:
    """The `chat_id` parameter: an integer id, or an `@channelusername` as is."""
    try:
        return int(recipient)
    except ValueError:
        return recipient


def inline_keyboard(content: TextContent | ImageContent) -> dict[str, Any] | None:
    """SunCo actions as an inline keyboard, one button per row.

    reply/postback → `callback_data` (the action's payload, else its text; 1-64 bytes),
    link/webview → `url`. Location requests have no inline form and are left out.
    """
    rows: list[list[dict[str, Any]]] = []
    for action in content.actions or []:
        label = _clip(action.text or "", BUTTON_TEXT_MAX)
        if isinstance(action, ReplyAction | PostbackAction):
            data = action.payload or action.text
            if not data or len(data.encode()) > CALLBACK_DATA_MAX_BYTES:
                raise UnsendableContent(f"button payload must be 1-{CALLBACK_DATA_MAX_BYTES} bytes on Telegram")
            rows.append([{"text": label or data, "callback_data": data}])
        elif isinstance(action, LinkAction | WebviewAction) and action.uri:
            rows.append([{"text": label or action.uri, "url": action.uri}])
    return {"inline_keyboard": rows} if rows else None


def build_request(send: OutboundSend) -> tuple[str, dict[str, Any]]:
    """The Bot API method and JSON parameters for an outbound message (platform reference §4.5)."""
    params: dict[str, Any] = {"chat_id": chat_id_of(send.recipient)}
    content = send.content
    if isinstance(content, TextContent):
        if not content.text.strip():
            raise UnsendableContent("empty text")
        method = "sendMessage"
        params["text"] = _clip(content.text, TEXT_MAX)
        keyboard = inline_keyboard(content)
    elif isinstance(content, ImageContent):
        if not content.media_url:
            raise UnsendableContent("image without mediaUrl")
        method = "sendPhoto"
        params["photo"] = content.media_url
        if content.text:
            params["caption"] = _clip(content.text, CAPTION_MAX)
        keyboard = inline_keyboard(content)
    elif isinstance(content, FileContent):
        if not content.media_url:
            raise UnsendableContent("file without mediaUrl")
        method = "sendDocument"
        params["document"] = content.media_url
        if content.text:
            params["caption"] = _clip(content.text, CAPTION_MAX)
        keyboard = None
    elif isinstance(content, LocationContent):
        method = "sendLocation"
        params["latitude"] = content.coordinates.lat
        params["longitude"] = content.coordinates.long
        keyboard = None
    else:
        raise UnsendableContent(f"{content.__class__.__name__} cannot be sent on Telegram")
    if keyboard is not None:
        params["reply_markup"] = keyboard
    if send.quoted_provider_message_id:
        _chat, sep, quoted = send.quoted_provider_message_id.rpartition(":")
        if sep and quoted.isdigit():
            params["reply_parameters"] = {"message_id": int(quoted), "allow_sending_without_reply": True}
    return method, params


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
