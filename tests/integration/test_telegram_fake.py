"""The sandbox's fake Telegram Bot API, proven with python-telegram-bot 22.8 (platform reference §9).

`telegram.Bot(base_url=…)` talks to the fake (getMe, sendMessage with an inline or a reply keyboard,
sendPhoto, sendVenue, sendChatAction, setWebhook, getFile + download, errors and the limits the
Bot API enforces), and every `Update` the fake posts is parsed by `telegram.Update.de_json`.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiohttp import web
from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    KeyboardButton,
    Message,
    ReplyKeyboardMarkup,
    Update,
)
from telegram.constants import ChatAction, MessageLimit
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, RetryAfter
from telegram.helpers import create_deep_linked_url

from services.sandbox.telegram_fake import FakeTelegram, points_at_sandbox
from threadline.natsserver import free_port

TOKEN = "7000000001:AAE-fake_bot_token_0123456789abcdef"
INTEGRATION = "66aa00000000000000000001"
USER = 111222333
SECRET = "tg-secret_0123456789"
# PTB 22 warns (from inside RetryAfter) that `retry_after` will become a timedelta.
pytestmark = pytest.mark.filterwarnings("ignore:.*retry_after.*")


@dataclass
class Served:
    fake: FakeTelegram
    port: int
    received: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/sandbox/telegram-api"

    @property
    def receiver_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/receiver"

    def bot(self, token: str = TOKEN) -> Bot:
        return Bot(token, base_url=f"{self.api}/bot", base_file_url=f"{self.api}/file/bot")


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """The fake on loopback, plus a webhook receiver that records what the fake posts."""
    port = free_port()
    fake = FakeTelegram(f"http://127.0.0.1:{port}/sandbox")
    fake.add_bot(INTEGRATION, TOKEN, "gw_test_bot")
    state = Served(fake, port)

    async def receive(request: web.Request) -> web.Response:
        state.received.append((await request.read(), dict(request.headers)))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_routes(fake.routes("/sandbox"))
    app.router.add_post("/receiver", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield state
    finally:
        await fake.close()
        await runner.cleanup()


async def test_get_me_send_message_with_inline_keyboard(served: Served) -> None:
    served.fake.start_chat(INTEGRATION, USER, "Ada Lovelace")
    async with served.bot() as bot:  # initialize() calls getMe
        assert bot.id == 7000000001 and bot.username == "gw_test_bot"
        keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Yes", callback_data="y")],
                                         [InlineKeyboardButton("Docs", url="https://example.com/docs")]])
        sent = await bot.send_message(chat_id=USER, text="hello", reply_markup=keyboard)
        assert sent.text == "hello" and sent.chat.id == USER and sent.from_user is not None
        assert sent.from_user.is_bot and sent.message_id == 1
        assert sent.reply_markup == keyboard
        photo = await bot.send_photo(chat_id=USER, photo="https://example.com/a.jpg", caption="our shop")
        assert photo.caption == "our shop" and photo.photo and photo.message_id == 2
    # PTB posts form bodies with JSON-valued fields; the fake keeps them decoded.
    [text_params, photo_params] = served.fake.outbox(INTEGRATION, USER)
    assert text_params["chat_id"] == str(USER) and text_params["text"] == "hello"
    assert text_params["reply_markup"] == {"inline_keyboard": [[{"text": "Yes", "callback_data": "y"}],
                                                               [{"text": "Docs", "url": "https://example.com/docs"}]]}
    assert photo_params["photo"] == "https://example.com/a.jpg"


async def test_webhook_set_info_and_get_updates_conflict(served: Served) -> None:
    async with served.bot() as bot:
        assert await bot.set_webhook(served.receiver_url, secret_token=SECRET, allowed_updates=["message"])
        info = await bot.get_webhook_info()
        assert info.url == served.receiver_url and info.allowed_updates == ("message",)
        assert info.pending_update_count == 0
        with pytest.raises(Conflict):
            await bot.get_updates()
        with pytest.raises(BadRequest):
            await bot.set_webhook(served.receiver_url, secret_token="not allowed!")
        assert await bot.delete_webhook()
        assert (await bot.get_webhook_info()).url == ""
        assert await bot.get_updates() == ()


async def test_errors_retry_after_forbidden_bad_request_invalid_token(served: Served) -> None:
    served.fake.start_chat(INTEGRATION, USER)
    async with served.bot() as bot:
        served.fake.fail_next(INTEGRATION, 429, retry_after=7)
        with pytest.raises(RetryAfter) as flood:
            await bot.send_message(chat_id=USER, text="too fast")
        assert flood.value.retry_after in (7, dtm.timedelta(seconds=7))
        served.fake.block(INTEGRATION, USER)
        with pytest.raises(Forbidden, match=r"(?i)blocked by the user"):
            await bot.send_message(chat_id=USER, text="blocked")
        served.fake.block(INTEGRATION, USER, blocked=False)
        with pytest.raises(BadRequest, match=r"(?i)chat not found"):
            await bot.send_message(chat_id=999, text="nobody")
        with pytest.raises(BadRequest, match=r"(?i)message text is empty"):
            await bot.send_message(chat_id=USER, text=" ")
        with pytest.raises(BadRequest, match=r"(?i)button_data_invalid"):
            await bot.send_message(chat_id=USER, text="x", reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton("Long", callback_data="d" * 65)]]))
        assert (await bot.send_message(chat_id=USER, text="fine now")).text == "fine now"
    with pytest.raises(InvalidToken):
        async with served.bot("7000000002:AAE-unknown_token_0123456789") as _unknown:
            pass
    assert served.fake.outbox(INTEGRATION, USER) == [
        {"chat_id": str(USER), "text": "fine now"}]


async def test_flood_simulation_answers_retry_after(served: Served) -> None:
    served.fake.flood_per_chat = 2
    served.fake.start_chat(INTEGRATION, USER)
    async with served.bot() as bot:
        await bot.send_message(chat_id=USER, text="1")
        await bot.send_message(chat_id=USER, text="2")
        with pytest.raises(RetryAfter):
            await bot.send_message(chat_id=USER, text="3")


async def test_every_update_the_fake_sends_parses_with_de_json(served: Served) -> None:
    fake = served.fake
    link = create_deep_linked_url("gw_test_bot", "ref_abc-123")
    payload = parse_qs(urlsplit(link).query)["start"][0]
    assert len(payload) <= MessageLimit.DEEP_LINK_LENGTH
    async with served.bot() as bot:
        # Sent while no webhook is set: kept, then delivered once setWebhook is called.
        early = await fake.send_inbound(INTEGRATION, {"from": USER, "text": "early bird", "name": "Ada Lovelace",
                                                      "username": "ada"})
        assert early["webhookStatus"] is None
        assert (await bot.get_webhook_info()).pending_update_count == 1
        await bot.set_webhook(served.receiver_url, secret_token=SECRET)
        await _wait_for(lambda: len(served.received) == 1)
        await fake.send_inbound(INTEGRATION, {"from": USER, "start": payload})
        await fake.send_inbound(INTEGRATION, {"from": USER, "photo": {"caption": "look"}})
        await bot.send_message(chat_id=USER, text="pick", reply_markup=InlineKeyboardMarkup(
            [[InlineKeyboardButton("Yes", callback_data="y"), InlineKeyboardButton("No", callback_data="n")]]))
        pressed = await fake.send_inbound(INTEGRATION, {"from": USER, "callbackData": "y"})
        await fake.send_inbound(INTEGRATION, {"from": USER, "text": "re", "replyTo": 1})
        assert pressed["webhookStatus"] == 200
        assert len(served.received) == len(fake.deliveries) == 5

        updates = []
        for body, headers in served.received:
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Telegram-Bot-Api-Secret-Token"] == SECRET
            update = Update.de_json(json.loads(body), bot)
            assert update is not None
            updates.append(update)
        ids = [u.update_id for u in updates]
        assert ids == sorted(ids) and len(set(ids)) == 5

        first, start, photo, press, reply = updates
        assert first.message is not None and first.message.text == "early bird"
        assert first.effective_user is not None and first.effective_user.full_name == "Ada Lovelace"
        assert first.effective_user.username == "ada" and first.effective_chat is not None
        assert first.effective_chat.type == "private" and first.effective_chat.id == USER
        assert start.message is not None and start.message.text == "/start ref_abc-123"
        [entity] = start.message.entities
        assert entity.type == "bot_command" and entity.offset == 0 and entity.length == 6
        assert photo.message is not None and photo.message.caption == "look" and len(photo.message.photo) == 2
        query = press.callback_query
        assert query is not None and query.data == "y" and query.from_user.id == USER
        assert isinstance(query.message, Message) and query.message.text == "pick"
        assert reply.message is not None and reply.message.reply_to_message is not None
        assert reply.message.reply_to_message.text == "early bird"

        # The button press can be answered once; the photo can be fetched like on Telegram.
        assert await bot.answer_callback_query(query.id)
        with pytest.raises(BadRequest, match=r"(?i)query is too old"):
            await bot.answer_callback_query(query.id)
        largest = photo.message.photo[-1]
        telegram_file = await bot.get_file(largest.file_id)
        data = await telegram_file.download_as_bytearray()
        assert bytes(data).startswith(b"\x89PNG")


def test_points_at_sandbox() -> None:
    assert points_at_sandbox("http://127.0.0.1:8080/sandbox/telegram-api")
    assert points_at_sandbox("https://tl.example.com/sandbox/telegram-api/")
    assert not points_at_sandbox("https://api.telegram.org")


async def _wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_reply_keyboard_venue_and_chat_action_through_ptb(served: Served) -> None:
    fake = served.fake
    fake.start_chat(INTEGRATION, USER)
    keyboard = ReplyKeyboardMarkup([[KeyboardButton("Send my location", request_location=True)]],
                                   one_time_keyboard=True, resize_keyboard=True)
    async with served.bot() as bot:
        asked = await bot.send_message(chat_id=USER, text="Where are you?", reply_markup=keyboard)
        # A reply keyboard is shown under the input, never part of the Message.
        assert asked.text == "Where are you?" and asked.reply_markup is None
        assert await bot.send_chat_action(chat_id=USER, action=ChatAction.TYPING)
        assert fake.chat_action(INTEGRATION, USER) == "typing"
        venue = await bot.send_venue(chat_id=USER, latitude=48.8584, longitude=2.2945, title="Our shop",
                                     address="5 Av. Anatole France")
        assert venue.venue is not None and venue.venue.title == "Our shop" and venue.location is not None
        # A message from the bot ends the typing it showed, as on Telegram.
        assert fake.chat_action(INTEGRATION, USER) is None
        assert await bot.send_chat_action(chat_id=USER, action=ChatAction.TYPING)
    shown, at = fake.chat_actions[(INTEGRATION, USER)]
    fake.chat_actions[(INTEGRATION, USER)] = (shown, at - 6)
    assert fake.chat_action(INTEGRATION, USER) is None  # it lasts 5 s at most
    [asked_params, _venue] = fake.outbox(INTEGRATION, USER)
    assert asked_params["reply_markup"] == {"keyboard": [[{"text": "Send my location", "request_location": True}]],
                                            "one_time_keyboard": True, "resize_keyboard": True}
    assert [r["method"] for r in fake.requests if r["method"] == "sendchataction"] == ["sendchataction"] * 2


async def test_the_fake_refuses_what_the_bot_api_refuses(served: Served) -> None:
    served.fake.start_chat(INTEGRATION, USER)
    inline = [[InlineKeyboardButton("Yes", callback_data="y")]]
    async with served.bot() as bot:
        refused = {  # what the description says → the call
            "wrong parameter action": bot.send_chat_action(chat_id=USER, action="dancing"),
            "chat not found": bot.send_chat_action(chat_id=999, action=ChatAction.TYPING),
            "BUTTON_URL_INVALID": bot.send_message(chat_id=USER, text="x", reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton("Mail", url="mailto:a@x.test")]])),
            "Text must be non-empty": bot.send_message(chat_id=USER, text="x", reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton(" ", callback_data="y")]])),
            "reply markup is too long": bot.send_message(chat_id=USER, text="x", reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton(str(i), callback_data=str(i))] for i in range(101)])),
            "markup is too long": bot.send_message(chat_id=USER, text="x", reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton(str(i), callback_data=str(i)) for i in range(9)]])),
            "request one thing only": bot.send_message(chat_id=USER, text="x", reply_markup=ReplyKeyboardMarkup(
                [[KeyboardButton("Both", request_location=True, request_contact=True)]])),
            "message is too long": bot.send_message(chat_id=USER, text="a" * 4097),
            "is too long": bot.send_message(chat_id=USER, text="😀" * 2049),  # 4098 UTF-16 units
            "caption is too long": bot.send_photo(chat_id=USER, photo="https://x.test/a.jpg", caption="c" * 1025),
            "venue title is empty": bot.send_venue(chat_id=USER, latitude=1.0, longitude=2.0, title=" ",
                                                   address="Main St"),
        }
        for expected, call in refused.items():
            with pytest.raises(BadRequest, match=f"(?i){re.escape(expected)}"):
                await call
        assert (await bot.send_message(chat_id=USER, text="a" * 4096)).text == "a" * 4096
        assert (await bot.send_message(chat_id=USER, text="😀" * 2048)).text == "😀" * 2048
        assert (await bot.send_message(chat_id=USER, text="ok", reply_markup=InlineKeyboardMarkup(inline)))
    # Both keyboards at once: what a client cannot even build is still refused, in Telegram's envelope.
    async with httpx.AsyncClient() as http:
        both = await http.post(f"{served.api}/bot{TOKEN}/sendMessage", json={
            "chat_id": USER, "text": "x", "reply_markup": {"inline_keyboard": [[{"text": "Y", "callback_data": "y"}]],
                                                           "keyboard": [[{"text": "Y"}]]}})
    assert both.status_code == 400
    assert both.json() == {"ok": False, "error_code": 400,
                           "description": "Bad Request: can't parse reply keyboard markup JSON object"}
    assert len(served.fake.outbox(INTEGRATION, USER)) == 3


async def test_a_shared_location_is_an_update_ptb_reads(served: Served) -> None:
    async with served.bot() as bot:
        await bot.set_webhook(served.receiver_url, secret_token=SECRET)
        sent = await served.fake.send_inbound(INTEGRATION, {"from": USER, "location": {"latitude": 52.52,
                                                                                       "longitude": 13.405}})
        assert sent["webhookStatus"] == 200
        [(body, _headers)] = served.received
        update = Update.de_json(json.loads(body), bot)
        assert update is not None and update.message is not None and update.message.location is not None
        assert (update.message.location.latitude, update.message.location.longitude) == (52.52, 13.405)
    with pytest.raises(ValueError, match="latitude"):
        await served.fake.send_inbound(INTEGRATION, {"from": USER, "location": {"latitude": 91, "longitude": 0}})
