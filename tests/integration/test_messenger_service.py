"""The messenger service against real NATS and the sandbox's fake Messenger Platform, through the
front door: signed webhooks in, m.me referrals, the reply window, Send API bodies, receipts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.messenger.app import MessengerService
from services.sandbox.app import SandboxService
from services.sandbox.messenger_fake import FakeMessenger
from shared import records, subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, InboundMessage, OutboundActivity, OutboundSend
from shared.records import IntegrationRecord
from shared.render import LOCATION_PROMPT
from shared.signing import meta_signature
from shared.sunco import (
    BuyAction,
    CarouselContent,
    CarouselDisplaySettings,
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
    UnsupportedContent,
    WebviewAction,
)
from tests.fakes.whatsapp_env import eventually, stream_messages
from tests.harness import ENGINES, System, new_postgres_database

APP_SECRET = "ms-app-secret-0123456789abcdef"
PAGE_TOKEN = "EAAms-page-token-0123456789"
VERIFY_TOKEN = "ms-verify-token-0123456789"
PAGE_ID = "104857600123456"
PSID = "6543210987654321"


@dataclass
class MsEnv:
    """messenger + sandbox behind the front door, one messenger integration pointing at the fake."""

    system: System
    bus: Bus
    record: IntegrationRecord

    @property
    def integration_id(self) -> str:
        return self.record.id

    @property
    def service(self) -> MessengerService:
        return self.system.service("messenger")  # type: ignore[no-any-return]

    @property
    def sandbox(self) -> SandboxService:
        return self.system.service("sandbox")  # type: ignore[no-any-return]

    @property
    def fake(self) -> FakeMessenger:
        return next(f for f in self.sandbox.channel_fakes if isinstance(f, FakeMessenger))

    @property
    def webhook_url(self) -> str:
        return f"{self.system.base_url}/webhooks/messenger/{self.integration_id}"

    async def inbound(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.INBOUND,
                                     subjects.integration_subjects("inbound", "messenger", self.integration_id))

    async def statuses(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.STATUS,
                                     subjects.integration_subjects("status", "messenger", self.integration_id))

    async def script(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"{self.system.base_url}/sandbox/messenger/{self.integration_id}") as c:
            resp = await c.post(path, json=body)
            assert resp.status_code == 200, resp.text
            result: dict[str, Any] = resp.json()
            return result

    async def outbox(self, psid: str = PSID) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            resp = await http.get(f"{self.system.base_url}/sandbox/messenger/{self.integration_id}/outbox",
                                  params={"to": psid})
            assert resp.status_code == 200, resp.text
            messages: list[dict[str, Any]] = resp.json()["messages"]
            return messages


def messenger_record(base_url: str, **config: Any) -> IntegrationRecord:
    """A messenger integration record whose Graph API is the sandbox's fake."""
    return IntegrationRecord(id=new_id(), app_id=new_id(), type="messenger", display_name="Messenger", config={
        "pageId": PAGE_ID, "pageAccessToken": PAGE_TOKEN, "appSecret": APP_SECRET, "verifyToken": VERIFY_TOKEN,
        "apiVersion": "v23.0", "baseUrl": f"{base_url}/sandbox/messenger-graph", **config,
    })


async def start_messenger(system: System, bus: Bus, env: dict[str, str] | None = None,
                          **config: Any) -> MsEnv:
    """Start messenger + sandbox, register one integration, wait until both services see it."""
    await system.start("messenger", "sandbox", env={"MESSENGER_RETRY_BASE_SECONDS": "0.05", **(env or {})})
    record = messenger_record(system.base_url, **config)
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.put(record.id, records.ENCODER.encode(record))
    ms = MsEnv(system, bus, record)

    async def both_see_it() -> bool:
        ms.sandbox.sync_accounts()
        return ms.service.credentials(record.id) is not None and record.id in ms.fake.accounts

    await eventually(both_see_it)
    return ms


def outbound(ms: MsEnv, content: Content, psid: str = PSID, **extra: Any) -> OutboundSend:
    return OutboundSend(app_id=ms.record.app_id, integration_id=ms.integration_id, channel="messenger",
                        conversation_id=new_id(), message_id=new_id(), user_id=new_id(), client_id=new_id(),
                        recipient=psid, recipient_info={"page_id": PAGE_ID, "psid": psid}, content=content, **extra)


async def publish(ms: MsEnv, send: OutboundSend) -> None:
    await ms.bus.publish(channel.subject_of(send), channel.encode(send))


async def statuses_of(ms: MsEnv, message_id: str, wanted: set[str]) -> list[DeliveryStatus]:
    """The statuses of one send: by its message id, or by the mid its `sent` status named (a
    receipt that Meta sends before the send's record is committed names only the mid, and
    `conversations` maps it by that)."""
    async def probe() -> list[DeliveryStatus] | None:
        every = await ms.statuses()
        mids = {s.provider_message_id for s in every if s.message_id == message_id}
        found = [s for s in every if s.message_id == message_id
                 or (s.message_id is None and s.provider_message_id in mids)]
        return found if wanted <= {s.status for s in found} else None

    return await eventually(probe)


@pytest.fixture(params=ENGINES)
async def ms(request: pytest.FixtureRequest, system: System, bus: Bus) -> AsyncIterator[MsEnv]:
    """The service on each engine: its SQLite file, then a database on a real PostgreSQL server."""
    env = {}
    if request.param == "postgres":
        env["THREADLINE_DATABASE_URL"] = await new_postgres_database(request.getfixturevalue("postgres_server"))
    yield await start_messenger(system, bus, env)


# --- inbound ---------------------------------------------------------------------------------------

async def test_verification_handshake(ms: MsEnv) -> None:
    async with httpx.AsyncClient() as http:
        ok = await http.get(ms.webhook_url, params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN,
                                                    "hub.challenge": "1158201444"})
        assert ok.status_code == 200 and ok.text == "1158201444"
        wrong = await http.get(ms.webhook_url, params={"hub.mode": "subscribe", "hub.verify_token": "nope",
                                                       "hub.challenge": "1"})
        assert wrong.status_code == 403
        unknown = await http.get(f"{ms.system.base_url}/webhooks/messenger/{new_id()}", params={
            "hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"})
        assert unknown.status_code == 403
    assert (await ms.script("/verify", {}))["ok"] is True


async def test_signed_text_is_one_inbound_message_and_opens_the_window(ms: MsEnv) -> None:
    before = time.time()
    sent = await ms.script("/inbound", {"from": PSID, "text": "café? 😮"})
    assert sent["webhookStatus"] == 200
    [message] = await ms.inbound()
    assert isinstance(message, InboundMessage)
    assert message.channel == "messenger" and message.client_type == "messenger"
    assert message.app_id == ms.record.app_id and message.integration_id == ms.integration_id
    assert message.channel_user_id == PSID and message.provider_message_id == sent["mid"]
    assert message.content == TextContent(text="café? 😮")
    assert message.client_info == {"page_id": PAGE_ID, "psid": PSID}
    assert before - 1 <= message.received_at <= time.time() + 1
    assert message.raw["message"]["mid"] == sent["mid"]
    assert message.referral is None
    assert ms.service.store is not None
    last = await ms.service.store.last_user_at(PAGE_ID, PSID)
    assert last is not None and abs(last - message.received_at) < 0.01





async def test_one_malformed_event_does_not_hold_back_its_batch(ms: MsEnv, caplog: pytest.LogCaptureFixture) -> None:
    def event(mid: str, text: str, **extra: Any) -> dict[str, Any]:
        return {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": int(time.time() * 1000),
                "message": {"mid": mid, "text": text}, **extra}

    body = json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": 1, "messaging": [
        event("m_GOOD1", "first"), event("m_BAD", "broken", timestamp="soon"), event("m_GOOD2", "second")]}]}).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, body)}
    async with httpx.AsyncClient() as http:
        first = await http.post(ms.webhook_url, content=body, headers=headers)
        again = await http.post(ms.webhook_url, content=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert sorted(m.provider_message_id for m in await ms.inbound()) == ["m_GOOD1", "m_GOOD2"]
    [report, _again] = [r for r in caplog.records if r.getMessage().startswith("webhook item rejected")]
    fields = report.fields  # type: ignore[attr-defined]
    assert fields["where"] == "entry[0].messaging[1]" and fields["provider_message_id"] == "m_BAD"
    assert fields["channel"] == "messenger" and "broken" not in json.dumps(fields)


async def test_mme_ref_rides_on_get_started_then_on_referral_events(ms: MsEnv) -> None:
    first = await ms.script("/inbound", {"from": PSID, "ref": "Hx_code-42"})
    [get_started] = await ms.inbound()
    assert get_started.referral == "Hx_code-42"
    assert get_started.provider_message_id == first["mid"]
    assert get_started.postback is not None and get_started.postback.payload == "GET_STARTED"
    assert get_started.content == TextContent(text="Get Started", payload="GET_STARTED")
    assert get_started.raw["postback"]["referral"] == {"ref": "Hx_code-42", "source": "SHORTLINK",
                                                       "type": "OPEN_THREAD"}
    # The thread exists now: the next m.me link arrives as a `referral` event, kept as such.
    again = await ms.script("/inbound", {"from": PSID, "ref": "second_code", "text": "hello again"})
    assert again["events"] == 2 and again["webhookStatuses"] == [200, 200]
    messages = await eventually(lambda: _at_least(ms, 3))
    referral = next(m for m in messages if m.referral == "second_code")
    assert isinstance(referral.content, UnsupportedContent) and referral.content.channel_type == "referral"
    assert referral.raw["referral"]["ref"] == "second_code"
    assert referral.provider_message_id.startswith(f"referral.{PSID}.")
    assert any(m.content == TextContent(text="hello again") for m in messages)


async def _at_least(ms: MsEnv, count: int) -> list[Any] | None:
    found = await ms.inbound()
    return found if len(found) >= count else None


async def test_postbacks_quick_replies_and_attachments(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "start"})
    button = await ms.script("/inbound", {"from": PSID, "postback": {"payload": "ORDER_42", "title": "Track"}})
    quick = await ms.script("/inbound", {"from": PSID, "text": "Yes", "quickReply": "YES_PAYLOAD"})
    image = await ms.script("/inbound", {"from": PSID, "image": "https://cdn.example/p.jpg"})
    video = await ms.script("/inbound", {"from": PSID, "attachment": {"type": "video",
                                                                      "url": "https://cdn.example/v.mp4"}})
    reel = await ms.script("/inbound", {"from": PSID, "attachment": {"type": "ig_reel"}})
    by_id = {m.provider_message_id: m for m in await eventually(lambda: _at_least(ms, 6))}
    tapped = by_id[button["mid"]]
    assert tapped.content == TextContent(text="Track", payload="ORDER_42")
    assert tapped.postback is not None and tapped.postback.payload == "ORDER_42"
    replied = by_id[quick["mid"]]
    assert replied.content == TextContent(text="Yes", payload="YES_PAYLOAD")
    assert replied.postback is not None and replied.postback.payload == "YES_PAYLOAD"
    assert by_id[image["mid"]].content == ImageContent(media_url="https://cdn.example/p.jpg")
    assert by_id[video["mid"]].content == FileContent(media_url="https://cdn.example/v.mp4")
    unsupported = by_id[reel["mid"]].content
    assert isinstance(unsupported, UnsupportedContent) and unsupported.channel_type == "ig_reel"


# --- outbound --------------------------------------------------------------------------------------

async def test_outbound_text_with_quick_replies_exact_body_and_statuses(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    send = outbound(ms, TextContent(text="Pick one", actions=[ReplyAction(text="Yes please", payload="yes"),
                                                             ReplyAction(text="No", payload="no")]))
    await publish(ms, send)
    statuses = await statuses_of(ms, send.message_id, {"sent", "delivered"})
    assert await ms.outbox() == [{
        "recipient": {"id": PSID}, "messaging_type": "RESPONSE",
        "message": {"text": "Pick one", "quick_replies": [
            {"content_type": "text", "title": "Yes please", "payload": "yes"},
            {"content_type": "text", "title": "No", "payload": "no"}]},
    }]
    mid = ms.fake.thread(ms.integration_id, PSID)[-1].mid
    assert all(s.provider_message_id == mid for s in statuses)
    # A receipt ahead of the send's record names only the mid (`statuses_of`); the others say where.
    assert all(s.conversation_id == send.conversation_id for s in statuses if s.message_id is not None)
    request = ms.fake.requests[-1]
    assert request.path == f"/sandbox/messenger-graph/v23.0/{PAGE_ID}/messages"


async def test_buttons_image_caption_and_location(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    buttons = outbound(ms, TextContent(text="Your order", actions=[
        PostbackAction(text="Track", payload="TRACK_1"), LinkAction(text="Invoice", uri="https://shop.example/i/1")]))
    image = outbound(ms, ImageContent(media_url="https://shop.example/a.jpg", text="our shop"))
    location = location_send(ms)
    for send in (buttons, image, location):
        await publish(ms, send)
        await statuses_of(ms, send.message_id, {"sent"})
    bodies = await ms.outbox()
    assert bodies[0]["message"] == {"attachment": {"type": "template", "payload": {
        "template_type": "button", "text": "Your order", "buttons": [
            {"type": "postback", "title": "Track", "payload": "TRACK_1"},
            {"type": "web_url", "url": "https://shop.example/i/1", "title": "Invoice"}]}}}
    # An image with a caption is two Send API calls, in order; the caption never gets lost.
    assert bodies[1]["message"] == {"attachment": {"type": "image", "payload": {
        "url": "https://shop.example/a.jpg", "is_reusable": True}}}
    assert bodies[2]["message"] == {"text": "our shop"}
    assert bodies[3]["message"]["text"].endswith("query=48.85%2C2.35")
    assert all(b["messaging_type"] == "RESPONSE" and b["recipient"] == {"id": PSID} for b in bodies)
    [image_sent] = [s for s in await ms.statuses() if s.message_id == image.message_id and s.status == "sent"]
    assert image_sent.provider_message_id == ms.fake.thread(ms.integration_id, PSID)[-3].mid


def location_send(ms: MsEnv) -> OutboundSend:
    return outbound(ms, LocationContent(coordinates=LocationCoordinates(lat=48.85, long=2.35),
                                        location=LocationInfo(name="Shop")))


async def test_unsendable_content_fails_at_once(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    send = outbound(ms, TemplateContent(template={"name": "wa_only"}))
    await publish(ms, send)
    [failed] = await statuses_of(ms, send.message_id, {"failed"})
    assert failed.error_code == "unsupported_content"
    assert ms.fake.requests == []


async def test_read_watermark_marks_sent_messages_read(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    first, second = outbound(ms, TextContent(text="one")), outbound(ms, TextContent(text="two"))
    for send in (first, second):
        await publish(ms, send)
        await statuses_of(ms, send.message_id, {"sent", "delivered"})
    read = await ms.script("/read", {"to": PSID})
    assert read["webhookStatus"] == 200
    read_first = await statuses_of(ms, first.message_id, {"read"})
    read_second = await statuses_of(ms, second.message_id, {"read"})
    mids = [e.mid for e in ms.fake.thread(ms.integration_id, PSID) if e.direction == "out"]
    assert {s.provider_message_id for s in read_first + read_second if s.status == "read"} == set(mids)
    # Reading again reports nothing new.
    count = len(await ms.statuses())
    await ms.script("/read", {"to": PSID})
    assert len(await ms.statuses()) == count


# --- every SunCo message type ----------------------------------------------------------------------------

async def send_all(ms: MsEnv, *contents: Content) -> list[OutboundSend]:
    """Send each content in turn (each reported `sent` before the next goes)."""
    sends = []
    for content in contents:
        send = outbound(ms, content)
        await publish(ms, send)
        [sent] = [s for s in await statuses_of(ms, send.message_id, {"sent"}) if s.status == "sent"]
        assert sent.provider_message_id.startswith("m_")
        sends.append(send)
    return sends


CARD_TAP = "ORDER_BEANS_250G"


async def test_carousel_is_a_generic_template_and_a_tapped_card_button_comes_back_as_a_postback(
        ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "what do you sell?"})
    carousel = CarouselContent(text="Our coffees", display_settings=CarouselDisplaySettings(
        image_aspect_ratio="square"), items=[
        Item(title="Beans", description="Dark roast, 250 g", media_url="https://shop.example/beans.jpg",
             media_type="image/jpeg", actions=[
                 PostbackAction(text="Order", payload=CARD_TAP),
                 LinkAction(text="Details", uri="https://shop.example/beans", default=True),
                 WebviewAction(text="Reviews", uri="https://shop.example/beans/reviews", size="compact")]),
        Item(title="Gift card", actions=[BuyAction(text="Buy", amount=2500, currency="eur",
                                                   uri="https://pay.example/gift")]),
    ])
    await send_all(ms, carousel)
    [body] = await ms.outbox()
    assert body == {"recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"attachment": {
        "type": "template", "payload": {"template_type": "generic", "image_aspect_ratio": "square", "elements": [
            {"title": "Beans", "subtitle": "Dark roast, 250 g", "image_url": "https://shop.example/beans.jpg",
             "default_action": {"type": "web_url", "url": "https://shop.example/beans"},
             "buttons": [{"type": "postback", "title": "Order", "payload": CARD_TAP},
                         {"type": "web_url", "url": "https://shop.example/beans/reviews", "title": "Reviews",
                          "webview_height_ratio": "compact"}]},
            {"title": "Gift card", "buttons": [{"type": "web_url", "url": "https://pay.example/gift",
                                                "title": "Buy"}]}]}}}}
    # The person taps the card's postback button (what the sandbox phone does): the fake posts a
    # signed messaging_postbacks webhook carrying the button's payload.
    [button] = [b for b in body["message"]["attachment"]["payload"]["elements"][0]["buttons"]
                if b["type"] == "postback"]
    tap = await ms.script("/inbound", {"from": PSID, "postback": {"payload": button["payload"],
                                                                  "title": button["title"]}})
    assert tap["webhookStatus"] == 200
    messages = await eventually(lambda: _at_least(ms, 2))
    [tapped] = [m for m in messages if m.provider_message_id == tap["mid"]]
    assert tapped.postback is not None and tapped.postback.payload == CARD_TAP and tapped.postback.text == "Order"
    assert tapped.content == TextContent(text="Order", payload=CARD_TAP)
    assert tapped.raw["postback"]["payload"] == CARD_TAP and "message" not in tapped.raw


async def test_list_is_a_generic_template_with_its_own_actions_after_it(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "my orders"})
    listing = ListContent(items=[
        Item(title="Order 41", description="shipped", actions=[PostbackAction(text="Track", payload="TRACK_41")]),
        Item(title="Order 42", media_url="https://shop.example/42.png",
             actions=[LinkAction(text="Invoice", uri="https://shop.example/i/42")]),
    ], actions=[PostbackAction(text="Load more", payload="MORE"), LinkAction(text="All orders",
                                                                            uri="https://shop.example/orders")])
    plain = ListContent(items=[Item(title="Only", description="one", actions=[
        PostbackAction(text="Pick", payload="PICK")])], actions=[PostbackAction(text="Other", payload="OTHER")])
    await send_all(ms, listing, plain)
    bodies = [b["message"] for b in await ms.outbox()]
    assert bodies == [
        {"attachment": {"type": "template", "payload": {"template_type": "generic", "elements": [
            {"title": "Order 41", "subtitle": "shipped",
             "buttons": [{"type": "postback", "title": "Track", "payload": "TRACK_41"}]},
            {"title": "Order 42", "image_url": "https://shop.example/42.png",
             "buttons": [{"type": "web_url", "url": "https://shop.example/i/42", "title": "Invoice"}]}]}}},
        # The list's link needs a button template after it; its postback is a quick reply on the last part.
        {"attachment": {"type": "template", "payload": {"template_type": "button", "text": "More options",
                                                        "buttons": [{"type": "web_url",
                                                                     "url": "https://shop.example/orders",
                                                                     "title": "All orders"}]}},
         "quick_replies": [{"content_type": "text", "title": "Load more", "payload": "MORE"}]},
        {"attachment": {"type": "template", "payload": {"template_type": "generic", "elements": [
            {"title": "Only", "subtitle": "one", "buttons": [{"type": "postback", "title": "Pick",
                                                              "payload": "PICK"}]}]}},
         "quick_replies": [{"content_type": "text", "title": "Other", "payload": "OTHER"}]},
    ]


async def test_file_location_request_buy_and_webview(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    await send_all(
        ms,
        FileContent(media_url="https://shop.example/invoice.pdf", media_type="application/pdf"),
        TextContent(text="Where should we deliver?", actions=[
            LocationRequestAction(text="Send my location"), ReplyAction(text="Pick up", payload="PICKUP")]),
        TextContent(text="Your basket", actions=[
            BuyAction(text="Pay 12.50", amount=1250, currency="usd", uri="https://pay.example/b/1"),
            WebviewAction(text="Edit", uri="https://shop.example/basket"),
            LocationRequestAction(text="Share location")]),
    )
    bodies = [b["message"] for b in await ms.outbox()]
    assert bodies == [
        {"attachment": {"type": "file", "payload": {"url": "https://shop.example/invoice.pdf",
                                                    "is_reusable": True}}},
        # Meta removed location quick replies: the request is asked in words, the reply stays native.
        {"text": f"Where should we deliver?\n\n{LOCATION_PROMPT}",
         "quick_replies": [{"content_type": "text", "title": "Pick up", "payload": "PICKUP"}]},
        {"attachment": {"type": "template", "payload": {
            "template_type": "button", "text": f"Your basket\n\n{LOCATION_PROMPT}", "buttons": [
                {"type": "web_url", "url": "https://pay.example/b/1", "title": "Pay 12.50"},
                {"type": "web_url", "url": "https://shop.example/basket", "title": "Edit",
                 "webview_height_ratio": "full"}]}}},
    ]


async def test_form_is_numbered_text_and_a_form_response_is_never_sent(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "sign me up"})
    form = FormContent(fields=[
        FormField(type="text", name="name", label="Your name"),
        FormField(type="select", name="size", label="Size", options=[FormOption(name="s", label="Small"),
                                                                     FormOption(name="l", label="Large")]),
    ])
    await send_all(ms, form)
    [body] = await ms.outbox()
    assert body["message"] == {"text": "Please reply with:\nYour name\nSize (Small, Large)"}
    answer = outbound(ms, FormResponseContent(fields=[FormField(type="text", name="name", label="Your name",
                                                                text="Ada")]))
    await publish(ms, answer)
    [failed] = await statuses_of(ms, answer.message_id, {"failed"})
    assert failed.error_code == "unsupported_content"
    assert len(ms.fake.requests) == 1  # only the form went to Meta


async def test_over_the_limits_clips_or_falls_back_never_refused(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    long_title = "A very long card title that goes well past the eighty characters Messenger shows"
    clipped = CarouselContent(items=[Item(title=long_title + "!", description="d" * 120, actions=[
        PostbackAction(text="A button label over twenty", payload="LONG")])])
    too_many = CarouselContent(text="Pick one", items=[
        Item(title=f"Card {i}", description="x", actions=[PostbackAction(text=f"Pick {i}", payload=f"P{i}")])
        for i in range(11)])
    video_card = CarouselContent(items=[Item(title="Clip", media_url="https://shop.example/c.mp4",
                                             media_type="video/mp4",
                                             actions=[PostbackAction(text="Play", payload="PLAY")])])
    long_text = TextContent(text="Terms: " + "t" * 700, actions=[PostbackAction(text="Accept", payload="OK"),
                                                                  ReplyAction(text="Later", payload="LATER")])
    huge = TextContent(text="word " * 398 + "end", actions=[PostbackAction(text="Yes", payload="Y"),
                                                             LinkAction(text="Terms", uri="https://x.example/t")])
    await send_all(ms, clipped, too_many, video_card, long_text, huge)
    bodies = [b["message"] for b in await ms.outbox()]
    assert all(r.status == 200 for r in ms.fake.requests)  # Meta (the fake) refused nothing
    # Clipped where clipping loses no choice: card title and subtitle to 80, button titles to 20.
    [element] = bodies[0]["attachment"]["payload"]["elements"]
    assert element["title"] == long_title[:79] + "…" and len(element["title"]) == 80
    assert element["subtitle"] == "d" * 79 + "…"
    assert element["buttons"] == [{"type": "postback", "title": "A button label over…", "payload": "LONG"}]
    # Eleven cards: Meta takes ten at most, so the whole carousel is the numbered text instead.
    assert bodies[1]["text"].startswith("Pick one\n\nCard 0 — x\n1. Pick 0\n\nCard 1 — x\n2. Pick 1")
    assert bodies[1]["text"].endswith("Card 10 — x\n11. Pick 10") and "quick_replies" not in bodies[1]
    # A card shows only images: a video card is text with its link.
    assert bodies[2] == {"text": "Clip\nhttps://shop.example/c.mp4\n1. Play"}
    # A button template's text is 640 at most: numbered text (replies numbered too), not clipped.
    assert bodies[3] == {"text": "Terms: " + "t" * 700 + "\n\n1. Accept\n2. Later"}
    # A fallback over 2,000 characters is split between lines: no numbered choice is cut.
    assert [b["text"] for b in bodies[4:]] == ["word " * 398 + "end", "1. Yes\nTerms: https://x.example/t"]
    assert len(bodies) == 6


# --- business activity ------------------------------------------------------------------------------------

async def test_typing_and_read_are_sender_actions(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "anyone there?"})
    expected: list[str] = []
    for activity, action in (("typing:start", "typing_on"), ("typing:stop", "typing_off"),
                             ("conversation:read", "mark_seen")):
        command = OutboundActivity(app_id=ms.record.app_id, integration_id=ms.integration_id, channel="messenger",
                                   conversation_id=new_id(), user_id=new_id(), client_id=new_id(), recipient=PSID,
                                   recipient_info={"page_id": PAGE_ID, "psid": PSID}, activity=activity,
                                   created_at=time.time())
        await ms.bus.publish(channel.subject_of(command), channel.encode(command))
        expected.append(action)

        async def shown(count: int = len(expected)) -> list[str] | None:
            found = ms.fake.sender_actions(ms.integration_id, PSID)
            return found if len(found) >= count else None

        assert await eventually(shown) == expected
    assert [(r.path, r.body, r.status) for r in ms.fake.requests] == [
        (f"/sandbox/messenger-graph/v23.0/{PAGE_ID}/messages", {"recipient": {"id": PSID}, "sender_action": a}, 200)
        for a in expected]
    assert await ms.outbox() == []  # no message, no status: only the indicator
    assert [s for s in await ms.statuses() if s.status == "sent"] == []
    async with httpx.AsyncClient() as http:
        thread = (await http.get(f"{ms.system.base_url}/sandbox/messenger/{ms.integration_id}/thread",
                                 params={"to": PSID})).json()
    assert [a["action"] for a in thread["senderActions"]] == expected
    assert thread["person"]["typing"] is False and thread["person"]["seenAt"] is not None


# --- the reply window --------------------------------------------------------------------------------

async def test_outside_the_window_is_refused_never_sent(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "yesterday", "at": time.time() - 30 * 3600})
    send = outbound(ms, TextContent(text="too late"))
    await publish(ms, send)
    [failed] = await statuses_of(ms, send.message_id, {"failed"})
    assert failed.error_code == "outside_messaging_window"
    assert failed.error_title and "24-hour" in failed.error_title
    assert ms.fake.requests == []  # Meta never saw it: no policy violation
    stranger = outbound(ms, TextContent(text="cold outreach"), psid="999000111")
    await publish(ms, stranger)
    [refused] = await statuses_of(ms, stranger.message_id, {"failed"})
    assert refused.error_code == "outside_messaging_window"


async def test_human_agent_tag_between_24_hours_and_7_days(system: System, bus: Bus) -> None:
    ms = await start_messenger(system, bus, humanAgent=True)
    await ms.script("/inbound", {"from": PSID, "text": "two days ago", "at": time.time() - 48 * 3600})
    late = outbound(ms, TextContent(text="an agent answers"))
    await publish(ms, late)
    await statuses_of(ms, late.message_id, {"sent"})
    [body] = await ms.outbox()
    assert body == {"recipient": {"id": PSID}, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT",
                    "message": {"text": "an agent answers"}}
    old = "1122334455"
    await ms.script("/inbound", {"from": old, "text": "last week", "at": time.time() - 8 * 86400})
    too_old = outbound(ms, TextContent(text="sorry for the wait"), psid=old)
    await publish(ms, too_old)
    [failed] = await statuses_of(ms, too_old.message_id, {"failed"})
    assert failed.error_code == "outside_messaging_window" and failed.error_title and "7-day" in failed.error_title
    assert await ms.outbox(old) == []


async def test_override_requests_human_agent_and_update_tags(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hello", "at": time.time() - 30 * 3600})
    human = outbound(ms, TextContent(text="agent here"),
                     override={"messenger": {"payload": {"messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"}}})
    update = outbound(ms, TextContent(text="your order shipped"),
                      override={"messenger": {"payload": {"messaging_type": "MESSAGE_TAG",
                                                          "tag": "POST_PURCHASE_UPDATE"}}})
    raw = outbound(ms, TextContent(text="ignored"), override={"messenger": {"payload": {
        "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT", "message": {"text": "raw payload"}}}})
    for send in (human, update, raw):
        await publish(ms, send)
        await statuses_of(ms, send.message_id, {"sent"})
    bodies = await ms.outbox()
    assert [(b["messaging_type"], b.get("tag")) for b in bodies] == [
        ("MESSAGE_TAG", "HUMAN_AGENT"), ("MESSAGE_TAG", "POST_PURCHASE_UPDATE"), ("MESSAGE_TAG", "HUMAN_AGENT")]
    assert bodies[2] == {"recipient": {"id": PSID}, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT",
                         "message": {"text": "raw payload"}}


async def test_meta_window_error_is_permanent(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    await ms.script("/window", {"to": PSID, "open": False})  # Meta disagrees (e.g. clock skew)
    send = outbound(ms, TextContent(text="refused by Meta"))
    await publish(ms, send)
    [failed] = await statuses_of(ms, send.message_id, {"failed"})
    assert failed.error_code == "10" and failed.error_details and "2018278" in failed.error_details
    assert failed.error_title and "outside of allowed window" in failed.error_title
    assert len(ms.fake.requests) == 1


# --- errors ----------------------------------------------------------------------------------------------

async def test_transient_errors_are_retried_then_sent_once(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    await ms.script("/fail-next", {"code": 613, "count": 1})
    await ms.script("/fail-next", {"code": 2, "httpStatus": 500, "count": 1})
    send = outbound(ms, TextContent(text="eventually"))
    await publish(ms, send)
    [sent] = [s for s in await statuses_of(ms, send.message_id, {"sent"}) if s.status == "sent"]
    assert sent.provider_message_id.startswith("m_")
    assert [r.status for r in ms.fake.requests] == [400, 500, 200]
    assert len(await ms.outbox()) == 1


@pytest.mark.parametrize(("code", "subcode"), [(551, 1545041), (100, 2018001), (190, None)])
async def test_permanent_errors_fail_without_retry(ms: MsEnv, code: int, subcode: int | None) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    await ms.script("/fail-next", {"code": code, "count": 5, **({"subcode": subcode} if subcode else {})})
    send = outbound(ms, TextContent(text="doomed"))
    await publish(ms, send)
    [failed] = await statuses_of(ms, send.message_id, {"failed"})
    assert failed.error_code == str(code) and failed.error_title
    if subcode:
        assert failed.error_details and str(subcode) in failed.error_details
    assert len(ms.fake.requests) == 1


async def test_half_sent_message_resumes_without_repeating_parts(ms: MsEnv) -> None:
    await ms.script("/inbound", {"from": PSID, "text": "hi"})
    send = outbound(ms, ImageContent(media_url="https://shop.example/b.jpg", text="caption"))
    # The image goes through, the caption hits a rate limit once: the retry sends only the caption.
    ms.fake.auto_statuses = False
    original = ms.fake._send

    calls = {"n": 0}

    def flaky(account: Any, body: dict[str, Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            ms.fake.fail_next(ms.integration_id, 613)
        return original(account, body)

    ms.fake._send = flaky  # type: ignore[method-assign]
    await publish(ms, send)
    await statuses_of(ms, send.message_id, {"sent"})
    bodies = await ms.outbox()
    assert [b["message"].get("text") or b["message"]["attachment"]["type"] for b in bodies] == ["image", "caption"]
    assert [r.status for r in ms.fake.requests] == [200, 400, 200]
