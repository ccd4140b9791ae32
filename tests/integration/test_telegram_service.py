"""The telegram service against real NATS and the sandbox's fake Bot API, through the front door."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from telegram import InlineKeyboardMarkup, KeyboardButton, ReplyKeyboardMarkup
from telegram.constants import InlineKeyboardButtonLimit, MessageLimit

from services.sandbox.app import SandboxService
from services.sandbox.telegram_fake import FakeTelegram
from services.telegram.app import TelegramService
from services.telegram.handlers import media_url
from shared import records, subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.media import object_key, parse_attachment_url
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, InboundMessage, OutboundActivity, OutboundSend
from shared.records import IntegrationRecord
from shared.sunco import (
    BuyAction,
    CarouselContent,
    Content,
    FileContent,
    FormContent,
    FormField,
    FormOption,
    FormResponseContent,
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
    TemplateContent,
    TextContent,
    WebviewAction,
)
from tests.fakes.whatsapp_env import eventually, stream_messages
from tests.harness import System

TOKEN = "7000000001:AAE-fake_bot_token_0123456789abcdef"
SECRET = "tg-webhook-secret_0123456789abcdef"
USER = 111222333
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
FAST = {"TELEGRAM_RETRY_BASE_SECONDS": "0.05", "TELEGRAM_CHAT_MESSAGES_PER_SECOND": "100",
        "TELEGRAM_WEBHOOK_RETRY_BASE_SECONDS": "0.05"}


def telegram_record(base_url: str, **config: Any) -> IntegrationRecord:
    """A telegram integration whose Bot API is the sandbox's fake."""
    return IntegrationRecord(id=new_id(), app_id=new_id(), type="telegram", display_name="Telegram", config={
        "token": TOKEN, "username": "gw_test_bot", "botId": "7000000001", "webhookSecret": SECRET,
        "baseUrl": f"{base_url}/sandbox/telegram-api", **config,
    })


@dataclass
class TgEnv:
    """telegram + sandbox behind the front door, one telegram integration pointing at the fake."""

    system: System
    bus: Bus
    record: IntegrationRecord

    @property
    def integration_id(self) -> str:
        return self.record.id

    @property
    def service(self) -> TelegramService:
        return self.system.service("telegram")  # type: ignore[no-any-return]

    @property
    def sandbox(self) -> SandboxService:
        return self.system.service("sandbox")  # type: ignore[no-any-return]

    @property
    def fake(self) -> FakeTelegram:
        return next(f for f in self.sandbox.channel_fakes if isinstance(f, FakeTelegram))

    @property
    def webhook_url(self) -> str:
        return f"{self.system.base_url}/webhooks/telegram/{self.integration_id}"

    async def inbound(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.INBOUND,
                                     subjects.integration_subjects("inbound", "telegram", self.integration_id))

    async def statuses(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.STATUS,
                                     subjects.integration_subjects("status", "telegram", self.integration_id))

    async def script(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"{self.system.base_url}/sandbox/telegram/{self.integration_id}") as c:
            resp = await c.post(path, json=body)
            assert resp.status_code == 200, resp.text
            result: dict[str, Any] = resp.json()
            return result

    async def put(self, record: IntegrationRecord) -> None:
        kv = await self.bus.key_value(subjects.INTEGRATIONS_BUCKET)
        await kv.put(record.id, records.ENCODER.encode(record))


async def start_telegram(system: System, bus: Bus, env: dict[str, str] | None = None) -> TgEnv:
    """Start telegram + sandbox, add one integration, wait until its webhook is registered with the fake."""
    await system.start("telegram", "sandbox", env={**FAST, **(env or {})})
    tg = TgEnv(system, bus, telegram_record(system.base_url))
    await tg.put(tg.record)

    async def registered() -> bool:
        bot = tg.fake.bots.get(tg.record.id)
        return bot is not None and bot.webhook_url == tg.webhook_url

    await eventually(registered)
    return tg


@pytest.fixture
async def tg(system: System, bus: Bus) -> AsyncIterator[TgEnv]:
    yield await start_telegram(system, bus)


# --- webhook registration ------------------------------------------------------------------------

async def test_set_webhook_on_new_and_changed_integration_delete_on_removal(tg: TgEnv) -> None:
    bot = tg.fake.bots[tg.integration_id]
    assert bot.secret_token == SECRET and bot.allowed_updates == ["message", "callback_query"]
    [set_call] = [r for r in tg.fake.requests if r["method"] == "setwebhook"]
    assert set_call["params"] == {"url": tg.webhook_url, "secret_token": SECRET,
                                  "allowed_updates": ["message", "callback_query"]}
    # Same record again (e.g. conversations republishing at start): no new call.
    await tg.put(tg.record)
    changed = telegram_record(tg.system.base_url, webhookSecret="rotated_secret-0123456789")
    changed.id, changed.app_id = tg.record.id, tg.record.app_id
    await tg.put(changed)
    await eventually(lambda: _async(tg.fake.bots[tg.integration_id].secret_token == "rotated_secret-0123456789"))
    assert len([r for r in tg.fake.requests if r["method"] == "setwebhook"]) == 2
    # The old secret no longer opens the door; the new one does.
    async with httpx.AsyncClient() as http:
        body = json.dumps({"update_id": 1}).encode()
        old = await http.post(tg.webhook_url, content=body, headers={"Content-Type": "application/json",
                                                                      SECRET_HEADER: SECRET})
        new = await http.post(tg.webhook_url, content=body, headers={"Content-Type": "application/json",
                                                                      SECRET_HEADER: "rotated_secret-0123456789"})
    assert (old.status_code, new.status_code) == (401, 200)
    # Removing the integration deletes the webhook (the fake forgets the bot too: both are fine).
    kv = await tg.bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.delete(tg.integration_id)
    await eventually(lambda: _async(tg.service.webhooks.registered(tg.integration_id) is None))


async def test_integration_present_at_start_is_registered_and_again_after_restart(system: System, bus: Bus) -> None:
    tg = TgEnv(system, bus, telegram_record(system.base_url))
    await tg.put(tg.record)
    # (Not one service after the other: the harness's front-door restart would cut a setWebhook in flight.)
    await system.start("telegram", "sandbox", env=FAST)

    def set_calls() -> int:
        return len([r for r in tg.fake.requests if r["method"] == "setwebhook"])

    await eventually(lambda: _async(set_calls() == 1))
    assert tg.fake.bots[tg.integration_id].webhook_url == tg.webhook_url
    await system.stop_service("telegram")
    await system.start_service("telegram", env=FAST)
    await eventually(lambda: _async(set_calls() == 2))  # idempotent: every start (and replica) calls it


async def _async(value: bool) -> bool:
    return value


# --- inbound ---------------------------------------------------------------------------------------

async def test_text_message_becomes_one_inbound_message(tg: TgEnv) -> None:
    sent = await tg.script("/inbound", {"from": USER, "text": "hi there", "name": "Ada Lovelace",
                                        "username": "ada"})
    assert sent["webhookStatus"] == 200
    [message] = await tg.inbound()
    assert isinstance(message, InboundMessage)
    assert message.channel == "telegram" and message.client_type == "telegram"
    assert message.app_id == tg.record.app_id and message.integration_id == tg.integration_id
    assert message.channel_user_id == str(USER)
    assert message.provider_message_id == f"{USER}:{sent['messageId']}"
    assert message.content == TextContent(text="hi there")
    assert message.display_name == "Ada Lovelace"
    assert message.client_info["username"] == "ada" and message.client_info["user_id"] == USER
    assert message.client_info["chat_type"] == "private"
    assert message.referral is None and message.received_at > 1_700_000_000
    assert message.raw["text"] == "hi there"


async def test_start_payload_becomes_referral(tg: TgEnv) -> None:
    good = await tg.script("/inbound", {"from": USER, "start": "ref_abc-123"})
    too_long = await tg.script("/inbound", {"from": USER, "start": "x" * 65})
    bad_chars = await tg.script("/inbound", {"from": USER, "start": "a+b"})
    bare = await tg.script("/inbound", {"from": USER, "text": "/start"})
    by_id = {m.provider_message_id: m for m in await tg.inbound()}
    assert len(by_id) == 4  # none dropped
    linked = by_id[f"{USER}:{good['messageId']}"]
    assert linked.referral == "ref_abc-123" and linked.content == TextContent(text="/start ref_abc-123")
    for other in (too_long, bad_chars, bare):
        assert by_id[f"{USER}:{other['messageId']}"].referral is None


async def test_button_press_is_a_postback_and_is_answered(tg: TgEnv) -> None:
    send = outbound(tg, TextContent(text="Pick one", actions=[ReplyAction(text="Yes please", payload="yes")]))
    await publish(tg, send)
    await statuses_of(tg, send.message_id, 1)
    pressed = await tg.script("/inbound", {"from": USER, "callbackData": "yes"})
    assert pressed["webhookStatus"] == 200
    [message] = await tg.inbound()
    assert message.postback is not None and message.postback.payload == "yes"
    assert message.postback.text == "Yes please"
    assert message.content == TextContent(text="Yes please", payload="yes")
    assert message.provider_message_id == f"callback:{pressed['callbackQueryId']}"
    assert message.channel_user_id == str(USER)
    query = tg.fake.callbacks[pressed["callbackQueryId"]]
    await eventually(lambda: _async(query["answered"]))


async def test_photo_is_copied_into_the_object_store_and_the_gateway_still_serves_it(tg: TgEnv) -> None:
    await tg.script("/inbound", {"from": USER, "photo": {"caption": "look"}})
    [message] = await tg.inbound()
    assert isinstance(message.content, ImageContent) and message.content.text == "look"
    assert message.content.media_url and TOKEN not in message.content.media_url
    ref = parse_attachment_url(tg.system.base_url, message.content.media_url)
    assert ref is not None and ref.app_id == message.app_id and ref.filename.endswith(".png")
    service: TelegramService = tg.system.service("telegram")
    stored = await service.media_copier.store.open(object_key(ref.app_id, ref.token))
    assert stored is not None
    copied = await stored.read()
    assert copied.startswith(b"\x89PNG")
    creds = service.credentials(tg.integration_id)
    assert creds is not None
    passthrough = media_url(tg.system.base_url, creds, message.raw["photo"][-1]["file_id"])
    assert TOKEN not in passthrough
    async with httpx.AsyncClient() as http:
        fetched = await http.get(passthrough)
        assert fetched.status_code == 200 and fetched.content == copied
        forged = await http.get(passthrough.split("?")[0] + "?sig=00")
        assert forged.status_code == 404


async def test_an_update_kind_the_gateway_does_not_handle_is_acknowledged(tg: TgEnv) -> None:
    body = json.dumps({"update_id": 5, "edited_message": {"message_id": 1}}).encode()
    async with httpx.AsyncClient() as http:
        ignored = await http.post(tg.webhook_url, content=body,
                                  headers={"Content-Type": "application/json", SECRET_HEADER: SECRET})
    assert ignored.status_code == 200  # else Telegram would retry it for a day
    assert await tg.inbound() == []


# --- outbound --------------------------------------------------------------------------------------

def outbound(tg: TgEnv, content: Content, **extra: Any) -> OutboundSend:
    return OutboundSend(app_id=tg.record.app_id, integration_id=tg.integration_id, channel="telegram",
                        conversation_id=new_id(), message_id=new_id(), user_id=new_id(), client_id=new_id(),
                        recipient=str(USER), recipient_info={"chat_id": USER}, content=content, **extra)


async def publish(tg: TgEnv, send: OutboundSend) -> None:
    if (tg.integration_id, USER) not in tg.fake.chats:
        tg.fake.start_chat(tg.integration_id, USER)
    await tg.bus.publish(channel.subject_of(send), channel.encode(send))


async def statuses_of(tg: TgEnv, message_id: str, count: int) -> list[DeliveryStatus]:
    async def probe() -> list[DeliveryStatus] | None:
        found = [s for s in await tg.statuses() if s.message_id == message_id]
        return found if len(found) >= count else None

    return await eventually(probe)


def sends(tg: TgEnv, text: str) -> list[dict[str, Any]]:
    return [r for r in tg.fake.requests if r["method"].startswith("send") and r["params"].get("text") == text]


async def test_outbound_text_with_inline_keyboard_and_sent_status(tg: TgEnv) -> None:
    send = outbound(tg, TextContent(text="Pick one", actions=[
        ReplyAction(text="Yes please", payload="yes"), PostbackAction(text="No", payload="no"),
        LinkAction(text="Docs", uri="https://example.com/docs")]))
    await publish(tg, send)
    [sent] = await statuses_of(tg, send.message_id, 1)
    [body] = tg.fake.outbox(tg.integration_id, USER)
    assert body == {"chat_id": USER, "text": "Pick one", "reply_markup": {"inline_keyboard": [
        [{"text": "Yes please", "callback_data": "yes"}], [{"text": "No", "callback_data": "no"}],
        [{"text": "Docs", "url": "https://example.com/docs"}]]}}
    message_id = tg.fake.thread(tg.integration_id, USER)[-1].message["message_id"]
    assert sent.status == "sent" and sent.provider_message_id == f"{USER}:{message_id}"
    assert sent.conversation_id == send.conversation_id and sent.channel == "telegram"


async def test_outbound_photo_and_quoted_reply(tg: TgEnv) -> None:
    await tg.script("/inbound", {"from": USER, "text": "question"})
    [question] = await tg.inbound()
    image = outbound(tg, ImageContent(media_url="https://example.com/a.jpg", text="our shop",
                                      actions=[ReplyAction(text="Buy", payload="buy")]),
                     quoted_provider_message_id=question.provider_message_id)
    await publish(tg, image)
    await statuses_of(tg, image.message_id, 1)
    [body] = tg.fake.outbox(tg.integration_id, USER)
    assert body == {"chat_id": USER, "photo": "https://example.com/a.jpg", "caption": "our shop",
                    "reply_markup": {"inline_keyboard": [[{"text": "Buy", "callback_data": "buy"}]]},
                    "reply_parameters": {"message_id": 1, "allow_sending_without_reply": True}}
    assert tg.fake.thread(tg.integration_id, USER)[-1].message["reply_to_message"]["text"] == "question"


async def test_429_waits_retry_after_then_sends(tg: TgEnv) -> None:
    await tg.script("/fail-next", {"errorCode": 429, "retryAfter": 1})
    send = outbound(tg, TextContent(text="flooded"))
    await publish(tg, send)
    [sent] = await statuses_of(tg, send.message_id, 1)
    assert sent.status == "sent"
    first, second = [r["at"] for r in sends(tg, "flooded")]
    # Telegram's retry_after (1 s), not the 0.05 s back-off, decided the second attempt.
    assert second - first >= 0.9
    assert len(tg.fake.outbox(tg.integration_id, USER)) == 1


async def test_blocked_user_fails_with_blocked_code_without_retry(tg: TgEnv) -> None:
    tg.fake.start_chat(tg.integration_id, USER)
    await tg.script("/block", {"user": USER})
    send = outbound(tg, TextContent(text="are you there"))
    await publish(tg, send)
    [failed] = await statuses_of(tg, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "telegram_403_blocked"
    assert failed.error_title == "Forbidden: bot was blocked by the user"
    probe = outbound(tg, TextContent(text="next"))
    await tg.script("/block", {"user": USER, "blocked": False})
    await publish(tg, probe)
    await statuses_of(tg, probe.message_id, 1)
    assert len(sends(tg, "are you there")) == 1


async def test_bad_request_is_permanent_and_5xx_is_retried(tg: TgEnv) -> None:
    await tg.script("/fail-next", {"errorCode": 400, "description": "Bad Request: chat not found"})
    doomed = outbound(tg, TextContent(text="doomed"))
    await publish(tg, doomed)
    [failed] = await statuses_of(tg, doomed.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "telegram_400"
    assert failed.error_title == "Bad Request: chat not found"
    await tg.script("/fail-next", {"errorCode": 502, "count": 2})
    later = outbound(tg, TextContent(text="eventually"))
    await publish(tg, later)
    [sent] = await statuses_of(tg, later.message_id, 1)
    assert sent.status == "sent"
    assert len(sends(tg, "doomed")) == 1 and len(sends(tg, "eventually")) == 3


@pytest.mark.parametrize("content", [
    FormResponseContent(fields=[FormField(type="text", name="n", label="Name", text="Ada")]),
    TemplateContent(template={"name": "hello_world"}),
    TextContent(text="   "),
])
async def test_content_without_a_telegram_form_fails_at_once(tg: TgEnv, content: Content) -> None:
    send = outbound(tg, content)
    await publish(tg, send)
    [failed] = await statuses_of(tg, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "unsupported_content"
    assert tg.fake.outbox(tg.integration_id, USER) == []


async def test_one_message_per_second_per_chat(system: System, bus: Bus) -> None:
    tg = await start_telegram(system, bus, env={"TELEGRAM_CHAT_MESSAGES_PER_SECOND": "1"})
    burst = [outbound(tg, TextContent(text=f"burst {i}")) for i in range(3)]
    for send in burst:
        await publish(tg, send)
    for send in burst:
        await statuses_of(tg, send.message_id, 1)
    times = [sends(tg, f"burst {i}")[0]["at"] for i in range(3)]
    assert [b["text"] for b in tg.fake.outbox(tg.integration_id, USER)] == ["burst 0", "burst 1", "burst 2"]
    assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 0.9


# --- every SunCo message type ------------------------------------------------------------------------

def ptb_checked(body: dict[str, Any]) -> dict[str, Any]:
    """`body` after python-telegram-bot (an independent client, platform reference §9) has read
    its markup: every field known to it, nothing lost on the way back to JSON."""
    markup = body.get("reply_markup")
    if markup is not None and "inline_keyboard" in markup:
        parsed = InlineKeyboardMarkup.de_json(markup, None)
        assert parsed.to_dict() == markup and not parsed.api_kwargs
        assert all(not b.api_kwargs for row in parsed.inline_keyboard for b in row)
        assert all(len(b.callback_data.encode()) <= InlineKeyboardButtonLimit.MAX_CALLBACK_DATA
                   for row in parsed.inline_keyboard for b in row if isinstance(b.callback_data, str))
    elif markup is not None:
        reply = ReplyKeyboardMarkup.de_json(markup, None)
        assert reply.to_dict() == markup and not reply.api_kwargs
        assert all(not KeyboardButton.de_json(b, None).api_kwargs for row in markup["keyboard"] for b in row)
    if "text" in body:
        assert 1 <= len(body["text"]) <= MessageLimit.MAX_TEXT_LENGTH
    if "caption" in body:
        assert len(body["caption"]) <= MessageLimit.CAPTION_LENGTH
    return body


async def sent_bodies(tg: TgEnv, content: Content, **extra: Any) -> tuple[DeliveryStatus, list[dict[str, Any]]]:
    """Send `content`; its status and the calls that reached the fake (checked with PTB)."""
    if (tg.integration_id, USER) not in tg.fake.chats:
        tg.fake.start_chat(tg.integration_id, USER)
    before = len(tg.fake.outbox(tg.integration_id, USER))
    send = outbound(tg, content, **extra)
    await publish(tg, send)
    [status] = await statuses_of(tg, send.message_id, 1)
    assert status.status == "sent", status
    return status, [ptb_checked(b) for b in tg.fake.outbox(tg.integration_id, USER)[before:]]


def methods(tg: TgEnv) -> list[str]:
    return [e.method for e in tg.fake.thread(tg.integration_id, USER) if e.direction == "out"]


LOCATION_KEYBOARD = {"keyboard": [[{"text": "Send my location", "request_location": True}]],
                     "one_time_keyboard": True, "resize_keyboard": True}


async def test_location_request_is_a_reply_keyboard_and_the_shared_location_comes_back(tg: TgEnv) -> None:
    _status, [body] = await sent_bodies(tg, TextContent(text="Where should we deliver?", actions=[
        LocationRequestAction(text="Send my location")]))
    assert body == {"chat_id": USER, "text": "Where should we deliver?", "reply_markup": LOCATION_KEYBOARD}
    # The customer taps the button: Telegram sends an ordinary message with `location`.
    shared = await tg.script("/inbound", {"from": USER, "location": {"latitude": 52.52, "longitude": 13.405}})
    assert shared["webhookStatus"] == 200
    [message] = await tg.inbound()
    assert message.content == LocationContent(coordinates=LocationCoordinates(lat=52.52, long=13.405))
    assert message.provider_message_id == f"{USER}:{shared['messageId']}" and message.postback is None


async def test_buttons_and_a_location_request_are_two_messages(tg: TgEnv) -> None:
    status, [first, prompt] = await sent_bodies(tg, TextContent(text="Pick up or delivery?", actions=[
        ReplyAction(text="Pick up", payload="PICKUP"), WebviewAction(text="Map", uri="https://x.test/map",
                                                                     fallback="https://x.test"),
        BuyAction(text="Pay", amount=1250, currency="eur", uri="https://pay.test/1"),
        LocationRequestAction(text="Send my location")]))
    assert first == {"chat_id": USER, "text": "Pick up or delivery?", "reply_markup": {"inline_keyboard": [
        [{"text": "Pick up", "callback_data": "PICKUP"}], [{"text": "Map", "url": "https://x.test/map"}],
        [{"text": "Pay (12.50 EUR)", "url": "https://pay.test/1"}]]}}
    assert prompt == {"chat_id": USER, "text": "Reply with your address, or share your location.",
                      "reply_markup": LOCATION_KEYBOARD}
    # The message's id is its first part's (the one a quote or a button press refers to).
    first_id = tg.fake.thread(tg.integration_id, USER)[-2].message["message_id"]
    assert status.provider_message_id == f"{USER}:{first_id}"


async def test_carousel_is_its_text_then_one_card_per_item(tg: TgEnv) -> None:
    status, bodies = await sent_bodies(tg, CarouselContent(text="Our picks", items=[
        Item(title="Blue mug", description="350 ml, stoneware", media_url="https://x.test/mug.jpg",
             actions=[PostbackAction(text="Buy", payload="BUY_MUG"), LinkAction(text="Details",
                                                                             uri="https://x.test/mug")]),
        Item(title="Green tea", description="50 g", actions=[PostbackAction(text="Buy", payload="BUY_TEA")]),
    ]))
    assert bodies == [
        {"chat_id": USER, "text": "Our picks"},
        {"chat_id": USER, "photo": "https://x.test/mug.jpg", "caption": "Blue mug\n350 ml, stoneware",
         "reply_markup": {"inline_keyboard": [[{"text": "Buy", "callback_data": "BUY_MUG"}],
                                              [{"text": "Details", "url": "https://x.test/mug"}]]}},
        {"chat_id": USER, "text": "Green tea\n50 g",
         "reply_markup": {"inline_keyboard": [[{"text": "Buy", "callback_data": "BUY_TEA"}]]}},
    ]
    assert methods(tg) == ["sendmessage", "sendphoto", "sendmessage"]
    first_id = tg.fake.thread(tg.integration_id, USER)[0].message["message_id"]
    assert status.provider_message_id == f"{USER}:{first_id}"
    # A card's button press is the item's postback, whichever card it is on.
    pressed = await tg.script("/inbound", {"from": USER, "callbackData": "BUY_TEA"})
    assert pressed["webhookStatus"] == 200
    [press] = await tg.inbound()
    assert press.postback is not None and (press.postback.payload, press.postback.text) == ("BUY_TEA", "Buy")


async def test_a_carousel_refused_midway_resumes_without_repeating_a_card(tg: TgEnv) -> None:
    tg.fake.flood_per_chat = 1  # the second call within a second gets 429 retry_after 1
    items = [Item(title=f"Card {i}", actions=[PostbackAction(text="Pick", payload=f"P{i}")]) for i in range(3)]
    _status, bodies = await sent_bodies(tg, CarouselContent(items=items))
    assert [b["text"] for b in bodies] == ["Card 0", "Card 1", "Card 2"]
    refused = [r for r in tg.fake.requests if r["method"] == "sendmessage"]
    assert len(refused) > 3  # Telegram did refuse some, and none was shown twice


async def test_list_is_one_message_with_a_row_per_item_action(tg: TgEnv) -> None:
    _status, [body] = await sent_bodies(tg, ListContent(items=[
        Item(title="Small", description="8 oz", media_url="https://x.test/s.jpg",
             actions=[PostbackAction(text="Choose", payload="SIZE_S")]),
        Item(title="Large", description="16 oz", actions=[PostbackAction(text="Choose", payload="SIZE_L"),
                                                         LinkAction(text="Nutrition", uri="https://x.test/l")]),
    ], actions=[PostbackAction(text="More sizes", payload="MORE")]))
    assert body == {"chat_id": USER, "text": "Small\n8 oz\n\nLarge\n16 oz", "reply_markup": {"inline_keyboard": [
        [{"text": "Small: Choose", "callback_data": "SIZE_S"}], [{"text": "Large: Choose", "callback_data": "SIZE_L"}],
        [{"text": "Nutrition", "url": "https://x.test/l"}], [{"text": "More sizes", "callback_data": "MORE"}]]}}


async def test_form_is_text_and_locations_file_and_venue_are_native(tg: TgEnv) -> None:
    _status, [form] = await sent_bodies(tg, FormContent(fields=[
        FormField(type="text", name="name", label="Your name"),
        FormField(type="select", name="size", label="Size", options=[FormOption(name="s", label="Small"),
                                                                    FormOption(name="l", label="Large")])]))
    assert form == {"chat_id": USER, "text": "Please reply with:\nYour name\nSize (Small, Large)"}
    _status, [venue] = await sent_bodies(tg, LocationContent(
        coordinates=LocationCoordinates(lat=48.8584, long=2.2945),
        location=LocationInfo(name="Our shop", address="5 Av. Anatole France")))
    assert venue == {"chat_id": USER, "latitude": 48.8584, "longitude": 2.2945, "title": "Our shop",
                     "address": "5 Av. Anatole France"}
    _status, [point] = await sent_bodies(tg, LocationContent(coordinates=LocationCoordinates(lat=1.5, long=2.5),
                                                             location=LocationInfo(name="Only a name")))
    assert point == {"chat_id": USER, "latitude": 1.5, "longitude": 2.5}
    _status, [document] = await sent_bodies(tg, FileContent(media_url="https://x.test/menu.pdf", text="Menu"))
    assert document == {"chat_id": USER, "document": "https://x.test/menu.pdf", "caption": "Menu"}
    assert methods(tg) == ["sendmessage", "sendvenue", "sendlocation", "senddocument"]
    assert tg.fake.thread(tg.integration_id, USER)[1].message["venue"]["title"] == "Our shop"


# --- limits: clipped, or written as numbered text ----------------------------------------------------

async def test_a_payload_over_64_bytes_falls_back_to_numbered_text(tg: TgEnv) -> None:
    long_payload = "é" * 33  # 66 bytes
    _status, [body] = await sent_bodies(tg, TextContent(text="Pick one", actions=[
        ReplyAction(text="Yes", payload="YES"), PostbackAction(text="Tell me more", payload=long_payload),
        LinkAction(text="Docs", uri="https://x.test/docs"), LocationRequestAction(text="Send my location")]))
    # The customer answers "2"; conversations maps the number back to the payload.
    assert body == {"chat_id": USER, "text": "Pick one\n\n1. Yes\n2. Tell me more\nDocs: https://x.test/docs\n"
                                             "Reply with your address, or share your location.",
                    "reply_markup": LOCATION_KEYBOARD}


async def test_a_link_telegram_cannot_open_falls_back_to_text(tg: TgEnv) -> None:
    _status, [photo] = await sent_bodies(tg, ImageContent(media_url="https://x.test/a.jpg", text="Questions?",
                                                          actions=[LinkAction(text="Mail us", uri="mailto:a@x.test"),
                                                                   ReplyAction(text="No", payload="NO")]))
    assert photo == {"chat_id": USER, "photo": "https://x.test/a.jpg",
                     "caption": "Questions?\n\nMail us: mailto:a@x.test\n1. No"}


async def test_a_fallback_too_long_for_a_caption_follows_the_photo(tg: TgEnv) -> None:
    text = "x" * 1020  # fits a caption alone, not with its numbered choice
    _status, [photo, rest] = await sent_bodies(tg, ImageContent(
        media_url="https://x.test/a.jpg", text=text, actions=[ReplyAction(text="Ok", payload="p" * 65)]))
    assert photo == {"chat_id": USER, "photo": "https://x.test/a.jpg"}
    assert rest == {"chat_id": USER, "text": f"{text}\n\n1. Ok"}


async def test_a_carousel_with_a_payload_over_64_bytes_is_one_numbered_text(tg: TgEnv) -> None:
    _status, [body] = await sent_bodies(tg, CarouselContent(items=[
        Item(title="A", media_url="https://x.test/a.jpg", actions=[PostbackAction(text="Pick A", payload="A")]),
        Item(title="B", description="bee", actions=[PostbackAction(text="Pick B", payload="B" * 65)])]))
    assert body == {"chat_id": USER, "text": "A\nhttps://x.test/a.jpg\n1. Pick A\n\nB — bee\n2. Pick B"}


async def test_text_captions_and_buttons_are_kept_within_telegram_limits(tg: TgEnv) -> None:
    # Text over 4096 (a long fallback) is cut at a line break into messages, the keyboard on the last.
    items = [Item(title=f"Item {i}", description="d" * 900, actions=[PostbackAction(text="Pick", payload="x" * 70)])
             for i in range(10)]
    _status, parts = await sent_bodies(tg, ListContent(items=items))
    assert len(parts) == 3 and all(p["text"] and len(p["text"]) <= 4096 for p in parts)
    assert "\n\n".join(p["text"] for p in parts).count("Pick") == 10
    # A caption over 1024 is clipped; a button label over 64 too (the payload never is).
    _status, [photo] = await sent_bodies(tg, ImageContent(
        media_url="https://x.test/a.jpg", text="c" * 2000, actions=[ReplyAction(text="L" * 100, payload="ok")]))
    assert len(photo["caption"]) == 1024 and photo["caption"].endswith("…")
    [[button]] = photo["reply_markup"]["inline_keyboard"]
    assert len(button["text"]) == 64 and button["callback_data"] == "ok"
    # Emoji are two UTF-16 units each: 3000 of them are two messages, never one Telegram refuses.
    _status, emoji = await sent_bodies(tg, TextContent(text="😀" * 3000))
    assert [len(p["text"]) for p in emoji] == [2048, 952]


async def test_quoted_carousel_replies_with_its_first_part(tg: TgEnv) -> None:
    await tg.script("/inbound", {"from": USER, "text": "what do you have?"})
    [question] = await tg.inbound()
    _status, [text, card] = await sent_bodies(tg, CarouselContent(text="This:", items=[Item(title="Mug")]),
                                              quoted_provider_message_id=question.provider_message_id)
    assert text["reply_parameters"] == {"message_id": 1, "allow_sending_without_reply": True}
    assert "reply_parameters" not in card


# --- business activity --------------------------------------------------------------------------------

def activity(tg: TgEnv, kind: Any) -> OutboundActivity:
    return OutboundActivity(app_id=tg.record.app_id, integration_id=tg.integration_id, channel="telegram",
                            conversation_id=new_id(), user_id=new_id(), client_id=new_id(), recipient=str(USER),
                            activity=kind, created_at=time.time())


async def test_typing_is_send_chat_action_and_stop_and_read_send_nothing(tg: TgEnv) -> None:
    tg.fake.start_chat(tg.integration_id, USER)
    # Sent in order to one recipient: once typing:start arrives, the two before it were handled.
    for kind in ("typing:stop", "conversation:read", "typing:start"):
        await tg.bus.publish(channel.subject_of(activity(tg, kind)), channel.encode(activity(tg, kind)))

    async def shown() -> list[dict[str, Any]] | None:
        calls = [r for r in tg.fake.requests if r["method"] == "sendchataction"]
        return calls or None

    [call] = await eventually(shown)
    assert call["params"] == {"chat_id": USER, "action": "typing"}
    assert tg.fake.chat_actions[(tg.integration_id, USER)][0] == "typing"
    assert [r["method"] for r in tg.fake.requests if r["method"].startswith("send")] == ["sendchataction"]
    # Showing typing is not a message: no status, nothing in the chat.
    assert await tg.statuses() == [] and tg.fake.outbox(tg.integration_id, USER) == []
