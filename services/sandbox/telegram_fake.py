"""A wire-accurate fake of the Telegram Bot API plus a scriptable customer phone.

`FakeTelegram` needs no NATS: register bots with `add_bot(...)` (the sandbox does it from the
integrations whose `baseUrl` is `…/sandbox/telegram-api`), mount `routes(prefix)`, and it behaves
like Telegram towards a gateway (platform reference §4):

- the Bot API at `{prefix}/telegram-api/bot<token>/<method>` (GET or POST; query string, JSON,
  form-urlencoded with JSON-valued fields as python-telegram-bot sends them, or multipart):
  getMe, setWebhook, deleteWebhook, getWebhookInfo, getUpdates (409 while a webhook is set),
  sendMessage, sendPhoto, sendDocument, sendLocation, sendVenue, sendChatAction,
  answerCallbackQuery, getFile, and file downloads at
  `{prefix}/telegram-api/file/bot<token>/<file_path>`; answers in Telegram's envelopes
  (`{"ok": true, "result": …}` / `{"ok": false, "error_code", "description", "parameters"?}`),
  unknown token → 401 Unauthorized, malformed token or method → 404 Not Found;
- sends are checked as the Bot API checks them, answering `400 Bad Request: …`: a known chat,
  non-empty text of at most 4096 and captions of at most 1024 (counted in UTF-16 units),
  `reply_markup` as exactly one of an inline keyboard (non-empty text per button, exactly one
  kind per button, `callback_data` 1-64 bytes, `url` http(s)/tg, at most 100 buttons and 8 a
  row), a reply keyboard (buttons with text and at most one `request_*`), `remove_keyboard` or
  `force_reply`; a venue needs a title and an address, a chat action one of Telegram's;
- webhooks: each `Update` is POSTed to the URL given to `setWebhook`, with
  `Content-Type: application/json` and `X-Telegram-Bot-Api-Secret-Token`; `update_id` grows
  monotonically per bot; updates that arrive while no webhook is set wait and are delivered
  once one is;
- scripting (`{prefix}/telegram/{integrationId}/...`, errors in SunCo's shape): `inbound`
  (`{"from": <user id>, "text": "hi"}`, or `"start": "<payload>"` for a deep link, or
  `"callbackData": "<data>"` for an inline-button press, or `"photo": {"caption": …}`, or
  `"upload": "<id>"` (a file the phone uploaded: a `photo` or a `document` whose file_id
  `getFile` and the file download resolve to its bytes; `caption` optional), or
  `"location": {"latitude", "longitude"}` as a `request_location` button sends it),
  `outbox?to=<chat id>`, `thread?to=` (with the `chatAction` the chat shows now), `fail-next`
  (e.g. 429 with `retryAfter`), `block` (the user blocks the bot: sends get 403), and the
  account itself.

Flood control: with `flood_per_chat` set, more than that many sends to one chat within a second
get `429 Too Many Requests: retry after 1`.

With a `store_path` users, chats (with their message ids), files, blocks and each bot's webhook
and next `update_id` survive a restart (JSON lines, replayed and compacted when the fake is
created), so a restarted sandbox neither loses the phone's history nor repeats ids the gateway
has already seen. Updates still waiting for a webhook are not kept.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import mimetypes
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind

from services.sandbox.scripting import read_json_object, sunco_errors
from services.sandbox.uploads import MEDIA_RULES, Upload, Uploads, upload_in
from shared.http import ApiError
from shared.records import IntegrationRecord
from shared.tasks import cancel_and_wait
from shared.telemetry import inject_headers, tracer
from shared.untrusted import decode_json, secrets_equal

from .journal import Journal

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_BODY = 1024 * 1024
TEXT_MAX = 4096
CAPTION_MAX = 1024
CALLBACK_DATA_MAX_BYTES = 64
SEND_METHODS = frozenset({"sendmessage", "sendphoto", "senddocument", "sendlocation", "sendvenue"})
# python-telegram-bot's `InlineKeyboardMarkupLimit` (TOTAL_BUTTON_NUMBER, BUTTONS_PER_ROW).
INLINE_BUTTONS_MAX = 100
BUTTONS_PER_ROW_MAX = 8
INLINE_BUTTON_KINDS = ("callback_data", "url", "switch_inline_query", "switch_inline_query_current_chat",
                       "switch_inline_query_chosen_chat", "web_app", "login_url", "copy_text", "pay",
                       "callback_game")
KEYBOARD_BUTTON_REQUESTS = ("request_location", "request_contact", "request_poll", "request_users",
                            "request_chat", "web_app")
# `sendChatAction` actions (`telegram.constants.ChatAction`); one is shown for 5 s at most.
CHAT_ACTIONS = frozenset({"typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
                          "upload_document", "choose_sticker", "find_location", "record_video_note",
                          "upload_video_note"})
CHAT_ACTION_SECONDS = 5.0
# Parameters whose values python-telegram-bot sends JSON-encoded inside form bodies (§4.1).
JSON_FIELDS = frozenset({"reply_markup", "allowed_updates", "reply_parameters", "link_preview_options",
                         "entities", "caption_entities"})
TOKEN_RE = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{1,100}$")
SECRET_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_FAKE_PATH = re.compile(r"/sandbox/telegram-api/?$")
# A 1x1 PNG served for customer photos.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


def points_at_sandbox(base_url: str) -> bool:
    """True when a Bot API base URL is the sandbox's fake (`…/sandbox/telegram-api`)."""
    return bool(_FAKE_PATH.search(base_url))


class BotApiError(Exception):
    """An error the fake answers in the Bot API envelope."""

    def __init__(self, error_code: int, description: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters

    def response(self) -> web.Response:
        """`{"ok": false, "error_code": N, "description": "…", "parameters"?: {…}}` with HTTP status N."""
        body: dict[str, Any] = {"ok": False, "error_code": self.error_code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return web.json_response(body, status=self.error_code)


def text_length(text: str) -> int:
    """A text's length as the limits are checked here: UTF-16 code units (what Telegram's entity
    offsets count), the stricter reading, so a gateway that passes the fake passes Telegram."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def bad_request(reason: str) -> BotApiError:
    """A 400 worded like Telegram's (`Bad Request: …`)."""
    return BotApiError(400, f"Bad Request: {reason}")


def _ok(result: Any, description: str | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": True, "result": result}
    if description:
        body["description"] = description
    return web.json_response(body)


@dataclass
class Bot:
    """One simulated bot (one telegram integration)."""

    integration_id: str
    token: str
    bot_id: int
    username: str
    first_name: str = "Threadline"
    webhook_url: str = ""
    secret_token: str = ""
    allowed_updates: list[str] | None = None
    last_error: tuple[int, str] | None = None
    next_update_id: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.next_update_id:
            # Telegram starts a bot's update ids at an arbitrary large number.
            self.next_update_id = 100_000_000 + int(hashlib.sha256(self.token.encode()).hexdigest()[:6], 16)

    def user(self) -> dict[str, Any]:
        """The bot as a Telegram `User`."""
        return {"id": self.bot_id, "is_bot": True, "first_name": self.first_name, "username": self.username}


@dataclass
class TgUser:
    """A simulated Telegram user (a private chat's id is the user's id)."""

    id: int
    first_name: str
    last_name: str = ""
    username: str = ""
    language_code: str = "en"

    def user(self) -> dict[str, Any]:
        """As a Telegram `User`."""
        out: dict[str, Any] = {"id": self.id, "is_bot": False, "first_name": self.first_name}
        if self.last_name:
            out["last_name"] = self.last_name
        if self.username:
            out["username"] = self.username
        out["language_code"] = self.language_code
        return out

    def chat(self) -> dict[str, Any]:
        """The private chat with this user, as a Telegram `Chat`."""
        out: dict[str, Any] = {"id": self.id, "first_name": self.first_name}
        if self.last_name:
            out["last_name"] = self.last_name
        if self.username:
            out["username"] = self.username
        out["type"] = "private"
        return out


@dataclass
class ChatEntry:
    """One message in a chat, either direction."""

    direction: str  # "in" (customer → bot) or "out" (bot → customer)
    message: dict[str, Any]  # the Telegram Message object
    at: float
    method: str = ""  # for "out": the Bot API method
    params: dict[str, Any] = field(default_factory=dict)  # for "out": the parameters as received
    callback: dict[str, Any] | None = None  # for a button press: the callback query
    # A file the phone sent (the upload's view: what the phone shows of it).
    media: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """JSON shape for the scripting API and the phone page."""
        out: dict[str, Any] = {"direction": self.direction, "at": self.at, "message": self.message}
        if self.media:
            out["media"] = self.media
        if self.method:
            out["method"] = self.method
            out["params"] = self.params
        if self.callback is not None:
            out["callbackQuery"] = self.callback
        return out


@dataclass
class InjectedError:
    """A scripted error for the next sends of a bot."""

    error_code: int
    description: str
    remaining: int
    retry_after: int | None = None


@dataclass
class UpdateDelivery:
    """A webhook the fake posted, with the gateway's answer (0: unreachable)."""

    integration_id: str
    url: str
    body: bytes
    headers: dict[str, str]
    status: int

    @property
    def update(self) -> dict[str, Any]:
        """The `Update` JSON that was posted."""
        value: dict[str, Any] = json.loads(self.body)
        return value


class FakeTelegram:
    """The fake Bot API; see the module docstring. Implements the sandbox's `ChannelFake`."""

    integration_type = "telegram"

    def __init__(self, public_url: str = "", *, flood_per_chat: int | None = None,
                 store_path: str | None = None, uploads: Uploads | None = None) -> None:
        # Where `routes(prefix)` is reachable from outside (for the account's deep link only).
        self.public_url = public_url.rstrip("/")
        # The files the phones uploaded (`{"upload": id}` in an inbound spec).
        self.uploads = uploads
        self.flood_per_chat = flood_per_chat
        self.bots: dict[str, Bot] = {}
        self.users: dict[int, TgUser] = {}
        self.chats: dict[tuple[str, int], list[ChatEntry]] = {}
        self.message_ids: dict[tuple[str, int], int] = {}
        self.blocked: set[tuple[str, int]] = set()
        self.files: dict[str, dict[str, Any]] = {}
        self.callbacks: dict[str, dict[str, Any]] = {}  # callback query id → {integration_id, answered}
        # The latest `sendChatAction` per chat: (action, time.time() it was sent).
        self.chat_actions: dict[tuple[str, int], tuple[str, float]] = {}
        self.injected: dict[str, list[InjectedError]] = {}
        self.requests: list[dict[str, Any]] = []
        self.deliveries: list[UpdateDelivery] = []
        self._recent_sends: dict[tuple[str, int], list[float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._delivery_locks: dict[str, asyncio.Lock] = {}
        # Webhook settings and update ids of bots, by integration id, as last journaled: a bot
        # registered again with the same token picks them up.
        self._saved_bots: dict[str, dict[str, Any]] = {}
        self.store_path = store_path
        self._journal = Journal(store_path)
        lines = self._journal.replay(self._apply)
        self._journal.compact(self._snapshot(), lines)  # after the replay: the live state

    # --- persistence -----------------------------------------------------------------------------

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "user":
            self.users[int(record["id"])] = TgUser(
                id=int(record["id"]), first_name=str(record["firstName"]), last_name=str(record.get("lastName") or ""),
                username=str(record.get("username") or ""), language_code=str(record.get("languageCode") or "en"))
        elif kind == "chat":
            self.chats.setdefault((record["integrationId"], int(record["chatId"])), [])
        elif kind == "entry":
            key = (record["integrationId"], int(record["chatId"]))
            entry = ChatEntry(record["direction"], dict(record["message"]), float(record["at"]),
                              method=str(record.get("method") or ""), params=dict(record.get("params") or {}),
                              callback=record.get("callback"), media=list(record.get("media") or []))
            self.chats.setdefault(key, []).append(entry)
            self.message_ids[key] = max(self.message_ids.get(key, 0), int(entry.message.get("message_id") or 0))
        elif kind == "file":
            info = dict(record["info"])
            if "data" in info:  # an uploaded file is kept by the sandbox's uploads, not here
                info["data"] = base64.b64decode(info["data"])
            self.files[info["file_id"]] = info
        elif kind == "block":
            key = (str(record["integrationId"]), int(record["user"]))
            if record["blocked"]:
                self.blocked.add(key)
            else:
                self.blocked.discard(key)
        elif kind == "bot":
            self._saved_bots[record["integrationId"]] = record

    def _snapshot(self) -> list[dict[str, Any]]:
        records = [self._user_record(u) for u in self.users.values()]
        records += [{"kind": "file", "info": self._file_info(info)} for info in self.files.values()]
        records += [{"kind": "block", "integrationId": iid, "user": user, "blocked": True}
                    for iid, user in self.blocked]
        records += list(self._saved_bots.values())
        for (integration_id, chat_id), entries in self.chats.items():
            records.append({"kind": "chat", "integrationId": integration_id, "chatId": chat_id})
            records += [self._entry_record(integration_id, chat_id, e) for e in entries]
        return records

    @staticmethod
    def _user_record(user: TgUser) -> dict[str, Any]:
        return {"kind": "user", "id": user.id, "firstName": user.first_name, "lastName": user.last_name,
                "username": user.username, "languageCode": user.language_code}

    @staticmethod
    def _file_info(info: dict[str, Any]) -> dict[str, Any]:
        if "data" not in info:
            return dict(info)
        return {**info, "data": base64.b64encode(info["data"]).decode()}

    @staticmethod
    def _entry_record(integration_id: str, chat_id: int, entry: ChatEntry) -> dict[str, Any]:
        return {"kind": "entry", "integrationId": integration_id, "chatId": chat_id, "direction": entry.direction,
                "message": entry.message, "at": entry.at, "method": entry.method, "params": entry.params,
                "callback": entry.callback, "media": entry.media}

    def _save_bot(self, bot: Bot) -> None:
        record = {"kind": "bot", "integrationId": bot.integration_id, "token": bot.token,
                  "webhookUrl": bot.webhook_url, "secretToken": bot.secret_token,
                  "allowedUpdates": bot.allowed_updates, "nextUpdateId": bot.next_update_id}
        self._saved_bots[bot.integration_id] = record
        self._journal.append(record)

    def _add_entry(self, integration_id: str, chat_id: int, entry: ChatEntry) -> None:
        self.chats.setdefault((integration_id, chat_id), []).append(entry)
        self._journal.append(self._entry_record(integration_id, chat_id, entry))

    def _open_chat(self, integration_id: str, chat_id: int) -> list[ChatEntry]:
        key = (integration_id, chat_id)
        if key not in self.chats:
            self.chats[key] = []
            self._journal.append({"kind": "chat", "integrationId": integration_id, "chatId": chat_id})
        return self.chats[key]

    # --- lifecycle and accounts ----------------------------------------------------------------

    async def close(self) -> None:
        """Cancel pending deliveries and close the HTTP client."""
        await cancel_and_wait(list(self._tasks))
        if self._session is not None:
            await self._session.close()
            self._session = None

    def add_bot(self, integration_id: str, token: str, username: str = "", bot_id: int | None = None,
                first_name: str = "Threadline") -> Bot:
        """Register (or update) a bot; its webhook settings survive an update with the same token."""
        if not TOKEN_RE.match(token):
            raise ValueError("a bot token looks like '<bot id>:<secret>'")
        bot_id = bot_id if bot_id is not None else int(token.split(":", 1)[0])
        username = username or f"bot{bot_id}_bot"
        old = self.bots.get(integration_id)
        bot = Bot(integration_id=integration_id, token=token, bot_id=bot_id, username=username, first_name=first_name)
        if old is not None and old.token == token:
            bot.webhook_url, bot.secret_token, bot.allowed_updates = old.webhook_url, old.secret_token, \
                old.allowed_updates
            bot.next_update_id, bot.pending, bot.last_error = old.next_update_id, old.pending, old.last_error
        elif old is None and (saved := self._saved_bots.get(integration_id)) and saved.get("token") == token:
            # The sandbox restarted: the gateway registered this webhook before and will not again.
            bot.webhook_url, bot.secret_token = str(saved.get("webhookUrl") or ""), str(saved.get("secretToken") or "")
            allowed = saved.get("allowedUpdates")
            bot.allowed_updates = list(allowed) if isinstance(allowed, list) else None
            bot.next_update_id = max(bot.next_update_id, int(saved.get("nextUpdateId") or 0))
        self.bots[integration_id] = bot
        return bot

    def remove_bot(self, integration_id: str) -> None:
        """Forget a bot."""
        self.bots.pop(integration_id, None)

    def bot_by_token(self, token: str) -> Bot | None:
        """The bot a token belongs to."""
        return next((b for b in self.bots.values() if secrets_equal(b.token, token)), None)

    def sync(self, records: Sequence[IntegrationRecord]) -> None:
        """Make the bots match the telegram integrations whose Bot API is this fake."""
        seen: set[str] = set()
        for record in records:
            cfg = record.config
            token = cfg.get("token")
            if record.type != "telegram" or not points_at_sandbox(str(cfg.get("baseUrl") or "")):
                continue
            if not isinstance(token, str) or not TOKEN_RE.match(token):
                continue
            raw_id = cfg.get("botId")
            bot_id = int(raw_id) if isinstance(raw_id, int | str) and str(raw_id).isdigit() else None
            username = str(cfg.get("username") or "")
            current = self.bots.get(record.id)
            seen.add(record.id)
            if current is None or (current.token, current.username) != (token, username or current.username) \
                    or (bot_id is not None and bot_id != current.bot_id):
                self.add_bot(record.id, token, username, bot_id, record.display_name or "Threadline")
        for integration_id in [i for i in self.bots if i not in seen]:
            self.remove_bot(integration_id)

    def user(self, user_id: int, name: str | None = None, username: str | None = None) -> TgUser:
        """The simulated user with this id (created on first use)."""
        found = self.users.get(user_id)
        before = None if found is None else self._user_record(found)
        if found is None:
            found = self.users[user_id] = TgUser(id=user_id, first_name=f"User {user_id}")
        if name:
            first, _, last = name.strip().partition(" ")
            found.first_name, found.last_name = first or found.first_name, last
        if username:
            found.username = username
        if self._user_record(found) != before:
            self._journal.append(self._user_record(found))
        return found

    def start_chat(self, integration_id: str, user_id: int, name: str | None = None) -> TgUser:
        """Open the private chat of a user with a bot (as pressing Start does) without sending anything."""
        user = self.user(user_id, name)
        self._open_chat(integration_id, user_id)
        return user

    # --- scripting (Python API; the HTTP scripting routes call these) ---------------------------

    def fail_next(self, integration_id: str, error_code: int, description: str | None = None, count: int = 1,
                  retry_after: int | None = None) -> None:
        """Make the next `count` sends of a bot fail with a Bot API error (429 gets `retry_after`)."""
        if error_code == 429 and retry_after is None:
            retry_after = 1
        default = {400: "Bad Request: chat not found", 403: "Forbidden: bot was blocked by the user",
                   429: f"Too Many Requests: retry after {retry_after}", 500: "Internal Server Error",
                   502: "Bad Gateway"}.get(error_code, "Error")
        self.injected.setdefault(integration_id, []).append(InjectedError(
            error_code=error_code, description=description or default, remaining=count, retry_after=retry_after))

    def block(self, integration_id: str, user_id: int, blocked: bool = True) -> None:
        """The user blocks (or unblocks) the bot: sends to them get 403 Forbidden."""
        key = (integration_id, user_id)
        if blocked == (key in self.blocked):
            return
        if blocked:
            self.blocked.add(key)
        else:
            self.blocked.discard(key)
        self._journal.append({"kind": "block", "integrationId": integration_id, "user": user_id, "blocked": blocked})

    def thread(self, integration_id: str, chat_id: int) -> list[ChatEntry]:
        """Both directions of a chat, oldest first."""
        return list(self.chats.get((integration_id, chat_id), []))

    def outbox(self, integration_id: str, chat_id: int) -> list[dict[str, Any]]:
        """The parameters of every send to a chat, as received (JSON-valued form fields decoded)."""
        return [e.params for e in self.thread(integration_id, chat_id) if e.direction == "out"]

    def _next_message_id(self, integration_id: str, chat_id: int) -> int:
        key = (integration_id, chat_id)
        self.message_ids[key] = self.message_ids.get(key, 0) + 1
        return self.message_ids[key]

    def register_file(self, kind: str, data: bytes = TINY_PNG, mime_type: str = "image/png", *,
                      upload: Upload | None = None) -> dict[str, Any]:
        """Store a file the Bot API can serve (`getFile` + download): `data`, or an uploaded file;
        returns its File fields."""
        unique = base64.urlsafe_b64encode(os.urandom(9)).decode()
        file_id = "AgAC" + base64.urlsafe_b64encode(os.urandom(30)).decode().rstrip("=")
        if upload is not None:
            extension = mimetypes.guess_extension(upload.media_type) or ".bin"
            info = {"file_id": file_id, "file_unique_id": unique, "file_size": upload.size,
                    "file_path": f"{kind}/file_{len(self.files)}{extension}", "mime_type": upload.media_type,
                    "upload": upload.id}
            self.files[file_id] = info
            self._journal.append({"kind": "file", "info": self._file_info(info)})
            return info
        info = {"file_id": file_id, "file_unique_id": unique, "file_size": len(data),
                "file_path": f"{kind}/file_{len(self.files)}.{'png' if mime_type == 'image/png' else 'bin'}",
                "data": data, "mime_type": mime_type}
        self.files[file_id] = info
        self._journal.append({"kind": "file", "info": self._file_info(info)})
        return info

    async def send_inbound(self, integration_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Have a user send something to a bot; returns ids and the gateway's HTTP status.

        `spec`: `from` (user id, required); one of `text`, `start` (deep-link payload: the message
        `/start <payload>`), `callbackData` (press the inline button with that data on the latest
        bot message that has it), `photo` ({caption?}), `location` ({latitude, longitude}: what a
        `request_location` keyboard button sends), `message` (raw Message fields); optional
        `name`, `username`, `replyTo` (message id in the chat).
        """
        bot = self.bots[integration_id]
        upload = upload_in(self.uploads, spec)
        upload_kind = MEDIA_RULES["telegram"].kind_of(upload) if upload is not None else None
        raw_from = spec.get("from")
        if isinstance(raw_from, bool) or not isinstance(raw_from, int | str) or not str(raw_from).isdigit():
            raise ValueError("'from' must be a positive Telegram user id")
        user = self.user(int(raw_from), spec.get("name") if isinstance(spec.get("name"), str) else None,
                         spec.get("username") if isinstance(spec.get("username"), str) else None)
        key = (integration_id, user.id)
        thread = self._open_chat(*key)
        if isinstance(spec.get("callbackData"), str):
            return await self._press_button(bot, user, thread, spec["callbackData"])
        message: dict[str, Any] = {"message_id": self._next_message_id(integration_id, user.id),
                                   "from": user.user(), "chat": user.chat(), "date": int(time.time())}
        reply_to = spec.get("replyTo")
        if isinstance(reply_to, int) and not isinstance(reply_to, bool):
            replied = next((e.message for e in thread if e.message["message_id"] == reply_to), None)
            if replied is None:
                raise ValueError(f"no message {reply_to} in this chat")
            message["reply_to_message"] = replied
        if isinstance(spec.get("start"), str):
            message["text"] = f"/start {spec['start']}".rstrip()
        elif isinstance(spec.get("text"), str) and spec["text"]:
            message["text"] = spec["text"]
        elif upload is not None:
            if upload_kind == "photo":
                stored = self.register_file("photos", upload=upload)
                # The photo as sent (the sandbox makes no smaller sizes): its PhotoSize.
                message["photo"] = [{k: stored[k] for k in ("file_id", "file_unique_id", "file_size")}
                                    | {"width": upload.width or 0, "height": upload.height or 0}]
            else:
                stored = self.register_file("documents", upload=upload)
                message["document"] = {"file_name": upload.name, "mime_type": upload.media_type,
                                       **{k: stored[k] for k in ("file_id", "file_unique_id", "file_size")}}
            if isinstance(spec.get("caption"), str) and spec["caption"].strip():
                message["caption"] = spec["caption"]
        elif "photo" in spec:
            photo = spec["photo"] if isinstance(spec["photo"], dict) else {}
            small = self.register_file("photos")
            large = self.register_file("photos")
            message["photo"] = [
                {k: small[k] for k in ("file_id", "file_unique_id", "file_size")} | {"width": 90, "height": 90},
                {k: large[k] for k in ("file_id", "file_unique_id", "file_size")} | {"width": 800, "height": 800},
            ]
            if isinstance(photo.get("caption"), str) and photo["caption"]:
                message["caption"] = photo["caption"]
        elif "location" in spec:
            where = spec["location"]
            try:
                lat, lon = float(where["latitude"]), float(where["longitude"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError("location needs numeric latitude and longitude") from exc
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError("latitude must be within ±90 and longitude within ±180")
            message["location"] = {"latitude": lat, "longitude": lon}
        elif isinstance(spec.get("message"), dict):
            message.update({k: v for k, v in spec["message"].items() if k not in ("message_id", "chat", "from")})
        else:
            raise ValueError("give one of text, start, callbackData, upload, photo, location, message")
        text = message.get("text")
        if isinstance(text, str) and (command := re.match(r"^/[A-Za-z0-9_]+(@[A-Za-z0-9_]+)?", text)):
            # Telegram marks a leading command with a bot_command entity (§4.4).
            message["entities"] = [{"offset": 0, "length": len(command.group(0)), "type": "bot_command"}]
        media = [self.uploads.view(upload)] if upload is not None and self.uploads is not None else []
        self._add_entry(integration_id, user.id, ChatEntry("in", message, time.time(), media=media))
        status = await self.deliver(bot, {"message": message})
        return {"messageId": message["message_id"], "chatId": user.id, "webhookStatus": status}

    async def _press_button(self, bot: Bot, user: TgUser, thread: list[ChatEntry], data: str) -> dict[str, Any]:
        def has_button(entry: ChatEntry) -> bool:
            markup = entry.message.get("reply_markup") or {}
            return any(isinstance(b, dict) and b.get("callback_data") == data
                       for row in markup.get("inline_keyboard") or [] for b in row)

        outgoing = [e for e in thread if e.direction == "out"]
        entry = next((e for e in reversed(outgoing) if has_button(e)), outgoing[-1] if outgoing else None)
        if entry is None:
            raise ValueError("the bot has sent nothing to press a button on")
        query_id = str(int.from_bytes(os.urandom(8), "big"))
        query = {"id": query_id, "from": user.user(), "message": entry.message,
                 "chat_instance": str(-int(hashlib.sha256(f"{bot.bot_id}:{user.id}".encode()).hexdigest()[:15], 16)),
                 "data": data}
        self.callbacks[query_id] = {"integration_id": bot.integration_id, "answered": False}
        self._add_entry(bot.integration_id, user.id, ChatEntry("in", entry.message, time.time(), callback=query))
        status = await self.deliver(bot, {"callback_query": query})
        return {"callbackQueryId": query_id, "chatId": user.id, "webhookStatus": status}

    # --- webhook delivery ---------------------------------------------------------------------

    async def deliver(self, bot: Bot, content: dict[str, Any]) -> int | None:
        """Give the update its id and POST it to the bot's webhook; the gateway's status (0: unreachable).

        Without a webhook the update waits (None) and goes out when `setWebhook` is called.
        """
        update = {"update_id": bot.next_update_id, **content}
        bot.next_update_id += 1
        self._save_bot(bot)
        if not bot.webhook_url:
            bot.pending.append(update)
            return None
        return await self._post(bot, update)

    async def _post(self, bot: Bot, update: dict[str, Any]) -> int:
        body = json.dumps(update, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if bot.secret_token:
            headers[SECRET_HEADER] = bot.secret_token
        status = 0
        with _tracer.start_as_current_span("POST telegram webhook", kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            try:
                async with self._client().post(bot.webhook_url, data=body, headers=inject_headers(headers)) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("telegram webhook %s unreachable: %s", bot.webhook_url, exc)
            span.set_attribute("http.response.status_code", status)
        bot.last_error = None if 200 <= status < 300 else (int(time.time()), f"Wrong response from the webhook: "
                                                                              f"{status}")
        self.deliveries.append(UpdateDelivery(bot.integration_id, bot.webhook_url, body, headers, status))
        return status

    async def _flush_pending(self, bot: Bot) -> None:
        lock = self._delivery_locks.setdefault(bot.integration_id, asyncio.Lock())
        async with lock:
            while bot.pending and bot.webhook_url:
                await self._post(bot, bot.pending.pop(0))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- Bot API ------------------------------------------------------------------------------

    def routes(self, prefix: str = "/sandbox") -> list[web.RouteDef]:
        """The fake's HTTP routes, mounted under `prefix`."""
        p = prefix.rstrip("/")
        s = sunco_errors
        return [
            web.route("*", f"{p}/telegram-api/bot{{token}}/{{method}}", self._bot_api),
            web.get(f"{p}/telegram-api/file/bot{{token}}/{{file_path:.+}}", self._download),
            web.post(f"{p}/telegram/{{integration_id}}/inbound", s(self._script_inbound)),
            web.post(f"{p}/telegram/{{integration_id}}/fail-next", s(self._script_fail_next)),
            web.post(f"{p}/telegram/{{integration_id}}/block", s(self._script_block)),
            web.get(f"{p}/telegram/{{integration_id}}/outbox", s(self._script_outbox)),
            web.get(f"{p}/telegram/{{integration_id}}/thread", s(self._script_thread)),
            web.get(f"{p}/telegram/{{integration_id}}", s(self._script_account)),
        ]

    async def _bot_api(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"].lower()
        try:
            if not TOKEN_RE.match(token):
                raise BotApiError(404, "Not Found")
            bot = self.bot_by_token(token)
            if bot is None:
                raise BotApiError(401, "Unauthorized")
            handler = self._methods().get(method)
            if handler is None:
                raise BotApiError(404, "Not Found")
            params = await self._params(request)
            self.requests.append({"integration_id": bot.integration_id, "method": method, "params": params,
                                  "at": time.time()})
            response = await handler(bot, params)
            if method in ("setwebhook", "deletewebhook"):
                self._save_bot(bot)
            return response
        except BotApiError as exc:
            return exc.response()

    def _methods(self) -> dict[str, Callable[[Bot, dict[str, Any]], Awaitable[web.Response]]]:
        return {
            "getme": self._get_me, "setwebhook": self._set_webhook, "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info, "getupdates": self._get_updates,
            "sendmessage": partial(self._send, "sendmessage"), "sendphoto": partial(self._send, "sendphoto"),
            "senddocument": partial(self._send, "senddocument"), "sendlocation": partial(self._send, "sendlocation"),
            "sendvenue": partial(self._send, "sendvenue"), "sendchataction": self._send_chat_action,
            "answercallbackquery": self._answer_callback, "getfile": self._get_file,
        }

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        """Parameters from the query string and a JSON, form or multipart body (§4.1)."""
        params: dict[str, Any] = dict(request.query)
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise BotApiError(413, "Request Entity Too Large")
        ctype = request.content_type
        if request.method == "POST" and ctype == "application/json":
            raw = await request.content.read(MAX_BODY + 1)
            if len(raw) > MAX_BODY:
                raise BotApiError(413, "Request Entity Too Large")
            if raw.strip():
                try:
                    doc = decode_json(raw)
                except ValueError as exc:
                    raise bad_request("can't parse JSON") from exc
                if not isinstance(doc, dict):
                    raise bad_request("can't parse JSON object")
                params.update(doc)
        elif request.method == "POST" and ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            try:
                form = await request.post()
            except ValueError as exc:
                raise bad_request("can't parse request body") from exc
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    params[key] = {"upload": value.filename, "size": len(value.file.read())}
                else:
                    params[key] = value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
        for key in JSON_FIELDS & params.keys():
            if isinstance(params[key], str):
                try:
                    params[key] = decode_json(params[key])
                except ValueError as exc:
                    raise bad_request(f"can't parse {key} JSON object") from exc
        return params

    async def _get_me(self, bot: Bot, _params: dict[str, Any]) -> web.Response:
        return _ok({**bot.user(), "can_join_groups": True, "can_read_all_group_messages": False,
                    "supports_inline_queries": False, "can_connect_to_business": False, "has_main_web_app": False})

    async def _set_webhook(self, bot: Bot, params: dict[str, Any]) -> web.Response:
        url = params.get("url", "")
        if not isinstance(url, str):
            raise bad_request("bad webhook: invalid URL")
        secret = params.get("secret_token", "")
        if not isinstance(secret, str) or (secret and not SECRET_TOKEN_RE.match(secret)):
            raise bad_request("secret token contains unallowed characters")
        allowed = params.get("allowed_updates")
        if allowed is not None and not (isinstance(allowed, list) and all(isinstance(a, str) for a in allowed)):
            raise bad_request("can't parse allowed updates")
        if not url:
            bot.webhook_url, bot.secret_token = "", ""
            return _ok(True, "Webhook was deleted")
        # Telegram insists on HTTPS (ports 443, 80, 88, 8443); the sandbox accepts plain http
        # on any port, since the gateway it talks to runs on loopback.
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        unchanged = (bot.webhook_url, bot.secret_token) == (url, secret)
        bot.webhook_url, bot.secret_token = url, secret
        if allowed is not None:
            bot.allowed_updates = list(allowed)
        if params.get("drop_pending_updates") in (True, "true", "True", "1"):
            bot.pending.clear()
        if bot.pending:
            self._spawn(self._flush_pending(bot))
        return _ok(True, "Webhook is already set" if unchanged else "Webhook was set")

    async def _delete_webhook(self, bot: Bot, params: dict[str, Any]) -> web.Response:
        had = bool(bot.webhook_url)
        bot.webhook_url, bot.secret_token = "", ""
        if params.get("drop_pending_updates") in (True, "true", "True", "1"):
            bot.pending.clear()
        return _ok(True, "Webhook was deleted" if had else "Webhook is already deleted")

    async def _get_webhook_info(self, bot: Bot, _params: dict[str, Any]) -> web.Response:
        info: dict[str, Any] = {"url": bot.webhook_url, "has_custom_certificate": False,
                                "pending_update_count": len(bot.pending)}
        if bot.webhook_url:
            info["max_connections"] = 40
            info["ip_address"] = "127.0.0.1"
            if bot.allowed_updates is not None:
                info["allowed_updates"] = bot.allowed_updates
        if bot.last_error is not None:
            info["last_error_date"], info["last_error_message"] = bot.last_error
        return _ok(info)

    async def _get_updates(self, bot: Bot, _params: dict[str, Any]) -> web.Response:
        if bot.webhook_url:
            raise BotApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                   "use deleteWebhook to delete the webhook first")
        updates, bot.pending = bot.pending, []
        return _ok(updates)

    async def _send_chat_action(self, bot: Bot, params: dict[str, Any]) -> web.Response:
        user = self._chat_of(bot, params)
        action = params.get("action")
        if not action:
            raise bad_request("action is empty")
        if action not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        self.chat_actions[(bot.integration_id, user.id)] = (str(action), time.time())
        return _ok(True)

    def chat_action(self, integration_id: str, chat_id: int) -> str | None:
        """The action the chat shows now (`typing`, …): sent within the last 5 s and not ended
        by a message from the bot since, as on Telegram."""
        shown = self.chat_actions.get((integration_id, chat_id))
        if shown is None or time.time() - shown[1] > CHAT_ACTION_SECONDS:
            return None
        later = any(e.direction == "out" and e.at >= shown[1] for e in self.chats.get((integration_id, chat_id), []))
        return None if later else shown[0]

    async def _answer_callback(self, bot: Bot, params: dict[str, Any]) -> web.Response:
        query = self.callbacks.get(str(params.get("callback_query_id", "")))
        if query is None or query["integration_id"] != bot.integration_id or query["answered"]:
            raise bad_request("query is too old and response timeout expired or query ID is invalid")
        query["answered"] = True
        return _ok(True)

    async def _get_file(self, _bot: Bot, params: dict[str, Any]) -> web.Response:
        info = self.files.get(str(params.get("file_id", "")))
        if info is None:
            raise bad_request("invalid file_id")
        return _ok({k: info[k] for k in ("file_id", "file_unique_id", "file_size", "file_path")})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        bot = self.bot_by_token(request.match_info["token"])
        info = next((f for f in self.files.values() if f["file_path"] == request.match_info["file_path"]), None)
        if bot is None or info is None:
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
        if "upload" in info:
            upload = self.uploads.get(info["upload"]) if self.uploads is not None else None
            if upload is None or self.uploads is None:
                return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
            return self.uploads.response(upload, download_name=False)
        return web.Response(body=info["data"], content_type=info["mime_type"])

    # --- sending ------------------------------------------------------------------------------

    def _chat_of(self, bot: Bot, params: dict[str, Any]) -> TgUser:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise bad_request("chat_id is empty")
        try:
            chat_id = int(raw)
        except (TypeError, ValueError) as exc:
            raise bad_request("chat not found") from exc
        user = self.users.get(chat_id)
        if user is None or (bot.integration_id, chat_id) not in self.chats:
            raise bad_request("chat not found")
        if (bot.integration_id, chat_id) in self.blocked:
            raise BotApiError(403, "Forbidden: bot was blocked by the user")
        return user

    def _flood(self, bot: Bot, chat_id: int) -> None:
        if self.flood_per_chat is None:
            return
        now = time.monotonic()
        recent = [t for t in self._recent_sends.get((bot.integration_id, chat_id), []) if now - t < 1.0]
        if len(recent) >= self.flood_per_chat:
            raise BotApiError(429, "Too Many Requests: retry after 1", {"retry_after": 1})
        recent.append(now)
        self._recent_sends[(bot.integration_id, chat_id)] = recent

    def _injected(self, bot: Bot) -> None:
        queue = self.injected.get(bot.integration_id)
        if not queue:
            return
        error = queue[0]
        error.remaining -= 1
        if error.remaining <= 0:
            queue.pop(0)
        parameters = {"retry_after": error.retry_after} if error.retry_after is not None else None
        raise BotApiError(error.error_code, error.description, parameters)

    @staticmethod
    def _markup(params: dict[str, Any]) -> dict[str, Any] | None:
        """Check `reply_markup` as the Bot API does; the inline keyboard a sent Message carries
        (reply keyboards, their removal and force_reply are not part of the Message)."""
        markup = params.get("reply_markup")
        if markup is None:
            return None
        kinds = [k for k in ("inline_keyboard", "keyboard", "remove_keyboard", "force_reply")
                 if isinstance(markup, dict) and k in markup]
        if len(kinds) != 1:
            raise bad_request("can't parse reply keyboard markup JSON object")
        kind = kinds[0]
        if kind in ("remove_keyboard", "force_reply"):
            if markup[kind] is not True:
                raise bad_request(f"field \"{kind}\" must be true")
            return None
        rows = markup[kind]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            owner = "InlineKeyboardMarkup" if kind == "inline_keyboard" else "ReplyKeyboardMarkup"
            raise bad_request(f"field \"{kind}\" of the {owner} should be an Array of Arrays")
        if sum(len(row) for row in rows) > INLINE_BUTTONS_MAX or any(len(row) > BUTTONS_PER_ROW_MAX for row in rows):
            raise bad_request("reply markup is too long")
        if kind == "keyboard":
            if not any(rows):
                raise bad_request("keyboard must be non-empty")
            for row in rows:
                for button in row:
                    FakeTelegram._keyboard_button(button)
            for flag in ("one_time_keyboard", "resize_keyboard", "is_persistent", "selective"):
                if flag in markup and not isinstance(markup[flag], bool):
                    raise bad_request(f"field \"{flag}\" must be of type Boolean")
            return None
        for row in rows:
            for button in row:
                if not isinstance(button, dict) or not isinstance(button.get("text"), str) \
                        or not button["text"].strip():
                    raise bad_request("can't parse inline keyboard button: Text must be non-empty")
                kinds = [k for k in INLINE_BUTTON_KINDS if k in button]
                if len(kinds) != 1:
                    raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in the "
                                      "inline keyboard")
                data = button.get("callback_data")
                if "callback_data" in button and (not isinstance(data, str) or not data
                                                  or len(data.encode()) > CALLBACK_DATA_MAX_BYTES):
                    raise bad_request("BUTTON_DATA_INVALID")
                if "url" in button and not (isinstance(button["url"], str) and re.match(r"^(https?|tg)://\S+$",
                                                                                         button["url"], re.I)):
                    raise bad_request("BUTTON_URL_INVALID")
        return {"inline_keyboard": rows} if any(rows) else None

    @staticmethod
    def _keyboard_button(button: Any) -> None:
        """A reply keyboard's button: a string, or a KeyboardButton with text and at most one request."""
        text = button if isinstance(button, str) else button.get("text") if isinstance(button, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise bad_request("can't parse keyboard button: Text must be non-empty")
        if isinstance(button, dict):
            requests = [k for k in KEYBOARD_BUTTON_REQUESTS if k in button]
            if len(requests) > 1:
                raise bad_request("can't parse keyboard button: a button can request one thing only")
            for flag in ("request_location", "request_contact"):
                if flag in button and not isinstance(button[flag], bool):
                    raise bad_request(f"can't parse keyboard button: field \"{flag}\" must be of type Boolean")

    async def _send(self, method: str, bot: Bot, params: dict[str, Any]) -> web.Response:
        user = self._chat_of(bot, params)
        message: dict[str, Any] = {"message_id": 0, "from": bot.user(), "chat": user.chat(), "date": int(time.time())}
        if method == "sendmessage":
            text = params.get("text")
            if not isinstance(text, str) or not text.strip():
                raise bad_request("message text is empty")
            if text_length(text) > TEXT_MAX:
                raise bad_request("message is too long")
            message["text"] = text
        elif method in ("sendphoto", "senddocument"):
            kind = "photo" if method == "sendphoto" else "document"
            media = params.get(kind)
            if not media:
                raise bad_request(f"there is no {kind} in the request")
            caption = params.get("caption")
            if caption is not None:
                if not isinstance(caption, str):
                    raise bad_request("can't parse caption")
                if text_length(caption) > CAPTION_MAX:
                    raise bad_request("message caption is too long")
            stored = self.register_file(f"{kind}s", mime_type="image/png" if kind == "photo" else
                                        "application/octet-stream")
            ref = {k: stored[k] for k in ("file_id", "file_unique_id", "file_size")}
            if kind == "photo":
                message["photo"] = [ref | {"width": 90, "height": 90}, ref | {"width": 800, "height": 800}]
            else:
                name = media.get("upload") if isinstance(media, dict) else str(media).rsplit("/", 1)[-1]
                message["document"] = ref | {"file_name": str(name or "file"), "mime_type": stored["mime_type"]}
            if caption:
                message["caption"] = caption
        else:  # sendlocation, sendvenue
            try:
                lat, lon = float(params["latitude"]), float(params["longitude"])
            except (KeyError, TypeError, ValueError) as exc:
                raise bad_request("wrong latitude or longitude") from exc
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise bad_request("wrong latitude or longitude")
            message["location"] = {"latitude": lat, "longitude": lon}
            if method == "sendvenue":
                for key in ("title", "address"):
                    if not isinstance(params.get(key), str) or not params[key].strip():
                        raise bad_request(f"venue {key} is empty")
                message["venue"] = {"location": message["location"], "title": params["title"],
                                    "address": params["address"]}
        markup = self._markup(params)
        reply = params.get("reply_parameters")
        thread = self.chats[(bot.integration_id, user.id)]
        if isinstance(reply, dict) and "message_id" in reply:
            replied = next((e.message for e in thread if e.message["message_id"] == reply["message_id"]), None)
            if replied is None and not reply.get("allow_sending_without_reply"):
                raise bad_request("message to be replied not found")
            if replied is not None:
                message["reply_to_message"] = replied
        self._injected(bot)
        self._flood(bot, user.id)
        message["message_id"] = self._next_message_id(bot.integration_id, user.id)
        if markup is not None:
            message["reply_markup"] = markup
        self._add_entry(bot.integration_id, user.id, ChatEntry("out", message, time.time(), method=method,
                                                               params=params))
        return _ok(message)

    # --- scripting routes ---------------------------------------------------------------------

    def _bot_or_404(self, request: web.Request) -> Bot:
        bot = self.bots.get(request.match_info["integration_id"])
        if bot is None:
            raise ApiError(404, "Unknown Telegram integration in the sandbox")
        return bot

    @staticmethod
    def _chat_param(request: web.Request) -> int:
        to = request.query.get("to", "")
        try:
            return int(to)
        except ValueError as exc:
            raise ApiError(400, "need ?to=<chat id>") from exc

    async def _script_inbound(self, request: web.Request) -> web.Response:
        bot = self._bot_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        try:
            result = await self.send_inbound(bot.integration_id, spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, str(exc)) from exc
        return web.json_response(result)

    async def _script_fail_next(self, request: web.Request) -> web.Response:
        bot = self._bot_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        code, count, retry_after = spec.get("errorCode"), spec.get("count", 1), spec.get("retryAfter")
        if not isinstance(code, int) or not 400 <= code <= 599 or not isinstance(count, int) or count < 1:
            raise ApiError(400, "need errorCode (400-599) and count >= 1")
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise ApiError(400, "retryAfter must be a non-negative integer")
        description = spec.get("description") if isinstance(spec.get("description"), str) else None
        self.fail_next(bot.integration_id, code, description, count, retry_after)
        return web.json_response({"queued": sum(e.remaining for e in self.injected[bot.integration_id])})

    async def _script_block(self, request: web.Request) -> web.Response:
        bot = self._bot_or_404(request)
        spec = await read_json_object(request, MAX_BODY)
        user = spec.get("user")
        if isinstance(user, bool) or not isinstance(user, int):
            raise ApiError(400, "need user (a Telegram user id)")
        blocked = spec.get("blocked", True) is not False
        self.block(bot.integration_id, user, blocked)
        return web.json_response({"user": user, "blocked": blocked})

    async def _script_outbox(self, request: web.Request) -> web.Response:
        bot = self._bot_or_404(request)
        return web.json_response({"messages": self.outbox(bot.integration_id, self._chat_param(request))})

    async def _script_thread(self, request: web.Request) -> web.Response:
        bot = self._bot_or_404(request)
        chat_id = self._chat_param(request)
        user = self.users.get(chat_id)
        return web.json_response({"messages": [e.view() for e in self.thread(bot.integration_id, chat_id)],
                                  "user": user.user() if user else None,
                                  "chatAction": self.chat_action(bot.integration_id, chat_id)})

    async def _script_account(self, request: web.Request) -> web.Response:
        bot = self._bot_or_404(request)
        return web.json_response({"integrationId": bot.integration_id, "botId": bot.bot_id,
                                  "username": bot.username, "webhookUrl": bot.webhook_url,
                                  "deepLink": f"https://t.me/{bot.username}",
                                  "pendingUpdates": len(bot.pending)})
