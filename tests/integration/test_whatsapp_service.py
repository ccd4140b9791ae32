"""The whatsapp service against real NATS and the sandbox's fake Cloud API, through the front door."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import async_playwright, expect
from pywa import WhatsApp, types

from services.whatsapp.handlers import media_url
from shared import subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.media import object_key, parse_attachment_url
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, InboundMessage, OutboundActivity, OutboundSend
from shared.signing import meta_signature
from shared.sunco import (
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
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
    WebviewAction,
)
from tests.fakes.whatsapp import bsuid_for
from tests.fakes.whatsapp_env import (
    ACCESS_TOKEN,
    APP_SECRET,
    CUSTOMER,
    PHONE_NUMBER_ID,
    VERIFY_TOKEN,
    WaEnv,
    eventually,
    start_whatsapp,
    stream_messages,
)
from tests.harness import System


@pytest.fixture
async def wa(system: System, bus: Bus) -> AsyncIterator[WaEnv]:
    yield await start_whatsapp(system, bus)


async def test_verification_handshake(wa: WaEnv) -> None:
    async with httpx.AsyncClient() as http:
        ok = await http.get(wa.webhook_url, params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN,
                                                    "hub.challenge": "1158201444"})
        assert ok.status_code == 200 and ok.text == "1158201444"
        assert ok.headers["content-type"].startswith("text/plain")
        wrong = await http.get(wa.webhook_url, params={"hub.mode": "subscribe", "hub.verify_token": "nope",
                                                       "hub.challenge": "1"})
        assert wrong.status_code == 403
        wrong_mode = await http.get(wa.webhook_url, params={"hub.mode": "unsubscribe",
                                                            "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"})
        assert wrong_mode.status_code == 403
    assert (await wa.script("/verify", {}))["ok"] is True


async def test_signed_text_becomes_one_inbound_message(wa: WaEnv) -> None:
    sent = await wa.script("/inbound", {"from": CUSTOMER, "text": "hi there", "name": "Ada"})
    assert sent["webhookStatus"] == 200
    [message] = await wa.inbound()
    assert isinstance(message, InboundMessage)
    assert message.channel == "whatsapp" and message.client_type == "whatsapp"
    assert message.app_id == wa.record.app_id and message.integration_id == wa.integration_id
    assert message.provider_message_id == sent["wamid"]
    assert message.channel_user_id == bsuid_for(CUSTOMER)
    assert message.client_info["wa_id"] == "15551234567"
    assert message.client_info["bsuid"] == bsuid_for(CUSTOMER)
    assert message.display_name == "Ada"
    assert message.content == TextContent(text="hi there")
    assert message.received_at > 1_700_000_000
    assert message.raw["id"] == sent["wamid"]





async def test_one_malformed_message_does_not_hold_back_its_batch(wa: WaEnv, caplog: pytest.LogCaptureFixture) -> None:
    def text(wamid: str, body: str) -> dict[str, object]:
        return {"from": "15551234567", "id": wamid, "timestamp": "1717000000", "type": "text", "text": {"body": body}}

    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": wa.record.config["phoneNumberId"]},
             "contacts": [{"profile": {"name": "Ada"}, "wa_id": "15551234567"}],
             "messages": [text("wamid.GOOD1", "first"), {**text("wamid.BAD", "broken"), "timestamp": "yesterday"},
                          text("wamid.GOOD2", "second")]}
    body = json.dumps({"object": "whatsapp_business_account",
                       "entry": [{"id": "waba", "changes": [{"field": "messages", "value": value}]}]}).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, body)}
    async with httpx.AsyncClient() as http:
        first = await http.post(wa.webhook_url, content=body, headers=headers)
        again = await http.post(wa.webhook_url, content=body, headers=headers)  # Meta's retry changes nothing
    assert first.status_code == again.status_code == 200
    inbound = await wa.inbound()
    assert sorted(m.provider_message_id for m in inbound) == ["wamid.GOOD1", "wamid.GOOD2"]
    reports = [r for r in caplog.records if r.getMessage().startswith("webhook item rejected")]
    assert len(reports) == 2 and all(r.levelname == "WARNING" for r in reports)
    fields = reports[0].fields  # type: ignore[attr-defined]
    assert fields["where"] == "entry[0].changes[0].value.messages[1]"
    assert fields["provider_message_id"] == "wamid.BAD" and "timestamp" in fields["reason"]
    assert fields["integration_id"] == wa.integration_id and fields["channel"] == "whatsapp"
    assert "broken" not in json.dumps(fields)  # the customer's text is never logged


async def test_content_types_are_normalized(wa: WaEnv) -> None:
    image = await wa.script("/inbound", {"from": CUSTOMER, "image": {"caption": "look", "mimeType": "image/png"}})
    button = await wa.script("/inbound", {"from": CUSTOMER, "buttonReply": {"id": "yes", "title": "Yes"},
                                          "contextId": "wamid.OUT1"})
    listed = await wa.script("/inbound", {"from": CUSTOMER, "listReply": {"id": "plan_pro", "title": "Pro"}})
    template_button = await wa.script("/inbound", {"from": CUSTOMER, "message": {
        "type": "button", "button": {"payload": "confirm_1234", "text": "Confirm"}}})
    location = await wa.script("/inbound", {"from": CUSTOMER, "location": {
        "latitude": 48.85, "longitude": 2.35, "name": "Shop", "address": "1 Rue X"}})
    sticker = await wa.script("/inbound", {"from": CUSTOMER, "message": {
        "type": "sticker", "sticker": {"id": "999", "mime_type": "image/webp", "animated": False}}})
    reaction = await wa.script("/inbound", {"from": CUSTOMER, "message": {
        "type": "reaction", "reaction": {"message_id": "wamid.OUT1", "emoji": "👍"}}})
    by_id = {m.provider_message_id: m for m in await wa.inbound()}
    assert len(by_id) == 7

    img = by_id[image["wamid"]]
    assert isinstance(img.content, ImageContent)
    assert img.content.text == "look" and img.content.media_type == "image/png"
    # Copied into the object store before it was published: history keeps it when Meta's
    # media id expires.
    ref = parse_attachment_url(wa.system.base_url, img.content.media_url)
    assert ref is not None and ref.app_id == img.app_id and ref.filename == "image.png"
    stored = await wa.service.media_copier.store.open(object_key(ref.app_id, ref.token))
    assert stored is not None
    copied = await stored.read()
    assert copied.startswith(b"\x89PNG")
    # The passthrough URL (what a message carries when the copy fails) serves the same file.
    creds = wa.service.credentials(img.integration_id)
    assert creds is not None
    passthrough = media_url(wa.system.base_url, creds, img.raw["image"]["id"])
    async with httpx.AsyncClient() as http:
        fetched = await http.get(passthrough)
        assert fetched.status_code == 200 and fetched.content == copied
        forged = await http.get(passthrough.split("?")[0] + "?sig=00")
        assert forged.status_code == 404

    tapped = by_id[button["wamid"]]
    assert tapped.content == TextContent(text="Yes", payload="yes")
    assert tapped.postback is not None and tapped.postback.payload == "yes"
    assert tapped.quoted_provider_message_id == "wamid.OUT1"
    assert by_id[listed["wamid"]].content == TextContent(text="Pro", payload="plan_pro")
    assert by_id[template_button["wamid"]].content == TextContent(text="Confirm", payload="confirm_1234")
    loc = by_id[location["wamid"]].content
    assert isinstance(loc, LocationContent) and loc.coordinates.lat == 48.85 and loc.location is not None
    for wamid, kind in ((sticker["wamid"], "sticker"), (reaction["wamid"], "reaction")):
        content = by_id[wamid].content
        assert isinstance(content, UnsupportedContent) and content.channel_type == kind
        assert content.raw["id"] == wamid and kind in content.raw


async def test_bsuid_present_or_absent(wa: WaEnv) -> None:
    no_bsuid = await wa.script("/inbound", {"from": "+15557770001", "text": "a", "withBsuid": False})
    no_phone = await wa.script("/inbound", {"from": "+15557770002", "text": "b", "withWaId": False})
    by_id = {m.provider_message_id: m for m in await wa.inbound()}
    phone_only = by_id[no_bsuid["wamid"]]
    assert phone_only.channel_user_id == "15557770001"
    assert phone_only.client_info.get("wa_id") == "15557770001" and "bsuid" not in phone_only.client_info
    username = by_id[no_phone["wamid"]]
    assert username.channel_user_id == bsuid_for("+15557770002")
    assert "wa_id" not in username.client_info and username.client_info["bsuid"] == bsuid_for("+15557770002")


def outbound(wa: WaEnv, content: Content, **extra: object) -> OutboundSend:
    return OutboundSend(app_id=wa.record.app_id, integration_id=wa.integration_id, channel="whatsapp",
                        conversation_id=new_id(), message_id=new_id(), user_id=new_id(), client_id=new_id(),
                        recipient=bsuid_for(CUSTOMER), recipient_info={"wa_id": "15551234567"},
                        content=content, **extra)  # type: ignore[arg-type]


async def publish(wa: WaEnv, send: OutboundSend) -> None:
    await wa.bus.publish(channel.subject_of(send), channel.encode(send))


async def statuses_of(wa: WaEnv, message_id: str, count: int) -> list[DeliveryStatus]:
    async def probe() -> list[DeliveryStatus] | None:
        found = [s for s in await wa.statuses() if s.message_id == message_id]
        return found if len(found) >= count else None

    return await eventually(probe)


async def test_outbound_text_buttons_and_statuses(wa: WaEnv) -> None:
    send = outbound(wa, TextContent(text="Pick one", actions=[ReplyAction(text="Yes please", payload="yes"),
                                                             ReplyAction(text="No", payload="no")]))
    await publish(wa, send)
    # Accepted → `sent` from the send call, then `sent`/`delivered` webhooks, all naming our message.
    statuses = await statuses_of(wa, send.message_id, 3)
    [body] = wa.fake.outbox(wa.integration_id, CUSTOMER)
    assert body == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "15551234567",
        "type": "interactive",
        "interactive": {"type": "button", "body": {"text": "Pick one"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "yes", "title": "Yes please"}},
            {"type": "reply", "reply": {"id": "no", "title": "No"}}]}},
        "biz_opaque_callback_data": f"tl:{send.conversation_id}:{send.message_id}",
    }
    wamid = wa.fake.thread(wa.integration_id, CUSTOMER)[0].wamid
    assert {s.status for s in statuses} >= {"sent", "delivered"}
    assert all(s.provider_message_id == wamid and s.conversation_id == send.conversation_id for s in statuses)


async def test_outbound_image_template_and_bsuid_recipient(wa: WaEnv) -> None:
    image = outbound(wa, ImageContent(media_url="https://example.com/a.jpg", text="our shop"))
    template = TemplateContent(template={"name": "order_update", "language": {"code": "en_US"},
                                         "components": [{"type": "body", "parameters": [{"type": "text",
                                                                                         "text": "#1234"}]}]})
    templ = outbound(wa, template)
    by_bsuid = outbound(wa, TextContent(text="hello username user"))
    by_bsuid.recipient_info = {}
    for send in (image, templ, by_bsuid):
        await publish(wa, send)
        await statuses_of(wa, send.message_id, 1)
    bodies = wa.fake.outbox(wa.integration_id, CUSTOMER)
    assert bodies[0]["image"] == {"link": "https://example.com/a.jpg", "caption": "our shop"}
    assert bodies[1]["type"] == "template" and bodies[1]["template"] == template.template
    assert bodies[2]["recipient"] == bsuid_for(CUSTOMER) and "to" not in bodies[2]


async def test_override_payload_is_sent_as_is(wa: WaEnv) -> None:
    payload = {"type": "text", "text": {"body": "raw override", "preview_url": True}}
    send = outbound(wa, TextContent(text="ignored"), override={"whatsapp": {"payload": payload}})
    await publish(wa, send)
    await statuses_of(wa, send.message_id, 1)
    [body] = wa.fake.outbox(wa.integration_id, CUSTOMER)
    assert body == {**payload, "messaging_product": "whatsapp", "to": "15551234567"}


async def test_transient_rate_limit_is_retried_then_sent(wa: WaEnv) -> None:
    await wa.script("/fail-next", {"code": 130429, "httpStatus": 400, "count": 2})
    send = outbound(wa, TextContent(text="eventually"))
    await publish(wa, send)
    [sent] = [s for s in await statuses_of(wa, send.message_id, 1) if s.status == "sent"][:1]
    assert sent.provider_message_id.startswith("wamid.")
    attempts = [r for r in wa.fake.requests if r["body"].get("text", {}).get("body") == "eventually"]
    assert len(attempts) == 3
    assert len(wa.fake.outbox(wa.integration_id, CUSTOMER)) == 1


@pytest.mark.parametrize(("code", "http_status"), [(131026, 400), (131008, 400)])
async def test_permanent_error_fails_without_retry(wa: WaEnv, code: int, http_status: int) -> None:
    await wa.script("/fail-next", {"code": code, "httpStatus": http_status, "count": 5})
    send = outbound(wa, TextContent(text="doomed"))
    await publish(wa, send)
    [failed] = await statuses_of(wa, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == str(code)
    assert failed.error_title and str(code) in failed.error_title
    assert failed.error_details
    # A later message goes through at once: the failed one was acked, not retried.
    probe = outbound(wa, TextContent(text="next"))
    await publish(wa, probe)
    await statuses_of(wa, probe.message_id, 1)
    assert len([r for r in wa.fake.requests if r["body"].get("text", {}).get("body") == "doomed"]) == 1


async def test_late_failed_and_read_statuses(wa: WaEnv) -> None:
    send = outbound(wa, TextContent(text="late news"))
    await publish(wa, send)
    await statuses_of(wa, send.message_id, 3)
    wamid = wa.fake.thread(wa.integration_id, CUSTOMER)[0].wamid
    await wa.script("/status", {"wamid": wamid, "status": "read"})
    await wa.script("/status", {"wamid": wamid, "status": "failed", "code": 131047})
    statuses = await statuses_of(wa, send.message_id, 5)
    failed = next(s for s in statuses if s.status == "failed")
    assert failed.provider_message_id == wamid
    assert failed.error_code == "131047" and failed.error_title == "Re-engagement message"
    assert failed.error_details and "24 hours" in failed.error_details
    assert any(s.status == "read" for s in statuses)


async def test_unknown_integration_send_fails_after_retries(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus, env={"WHATSAPP_MAX_SEND_ATTEMPTS": "2"})
    send = outbound(wa, TextContent(text="to nowhere"))
    send.integration_id = new_id()
    await wa.bus.publish(channel.subject_of(send), channel.encode(send))

    async def probe() -> list[DeliveryStatus] | None:
        found = await stream_messages(bus, subjects.STATUS,
                                      subjects.integration_subjects("status", "whatsapp", send.integration_id))
        return found or None

    [failed] = await eventually(probe)
    assert failed.status == "failed" and failed.message_id == send.message_id


async def test_transient_errors_give_up_after_max_attempts(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus, env={"WHATSAPP_MAX_SEND_ATTEMPTS": "3"})
    await wa.script("/fail-next", {"code": 131016, "httpStatus": 503, "count": 10})
    send = outbound(wa, TextContent(text="never lands"))
    await publish(wa, send)
    [failed] = await statuses_of(wa, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "131016"
    assert len([r for r in wa.fake.requests if r["body"].get("text", {}).get("body") == "never lands"]) == 3
    assert wa.fake.outbox(wa.integration_id, CUSTOMER) == []


# --- every SunCo content type on the wire ------------------------------------------------------

IMG = "https://shop.example/shoe.jpg"


def interactive(kind: str, body: str, action: dict[str, Any], header: dict[str, Any] | None = None,
                ) -> dict[str, Any]:
    inner: dict[str, Any] = {"type": kind, "body": {"text": body}, "action": action}
    if header is not None:
        inner["header"] = header
    return {"type": "interactive", "interactive": inner}


def listed(body: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    return interactive("list", body, {"button": "Options", "sections": [{"title": "Options", "rows": rows}]})


def buttons(body: str, replies: list[tuple[str, str]], header: dict[str, Any] | None = None) -> dict[str, Any]:
    return interactive("button", body, {"buttons": [{"type": "reply", "reply": {"id": i, "title": t}}
                                                    for i, t in replies]}, header)


def text(body: str, preview: bool = False) -> dict[str, Any]:
    return {"type": "text", "text": {"body": body, "preview_url": preview}}


def cta(body: str, label: str, url: str, header: dict[str, Any] | None = None) -> dict[str, Any]:
    return interactive("cta_url", body, {"name": "cta_url", "parameters": {"display_text": label, "url": url}},
                       header)


def replies(*pairs: tuple[str, str]) -> list[Any]:
    return [ReplyAction(text=label, payload=payload) for label, payload in pairs]


PLAN_ITEMS = [
    Item(title="Basic", description="Free forever", media_url="https://shop.example/basic.png",
         actions=[PostbackAction(text="Choose Basic", payload="PLAN_BASIC")]),
    Item(title="Professional subscription", description="$10 a month",
         actions=[PostbackAction(text="Choose Pro", payload="PLAN_PRO")]),
    Item(title="Enterprise plan for large teams", actions=[ReplyAction(text="Talk to us", payload="PLAN_ENT")]),
]
PLAN_ROWS = [
    {"id": "PLAN_BASIC", "title": "Basic", "description": "Free forever"},
    {"id": "PLAN_PRO", "title": "Professional subscripti…", "description": "$10 a month"},
    {"id": "PLAN_ENT", "title": "Enterprise plan for lar…", "description": "Enterprise plan for large teams"},
]

# content → the message part of the Graph body (everything but addressing and callback data).
RENDERINGS: dict[str, tuple[Content, dict[str, Any]]] = {
    "plain text": (TextContent(text="hello"), text("hello")),
    "two reply buttons": (
        TextContent(text="Pick one", actions=replies(("Yes please", "yes"), ("No", "no"))),
        buttons("Pick one", [("yes", "Yes please"), ("no", "No")])),
    "buttons with a link in the body": (
        TextContent(text="Pick", actions=[*replies(("A", "PA")), LinkAction(text="Terms", uri="https://t.example")]),
        buttons("Pick\n\nTerms: https://t.example", [("PA", "A")])),
    "one link is a CTA URL button": (
        TextContent(text="Track your order", actions=[LinkAction(text="Track", uri="https://shop.example/t/1")]),
        cta("Track your order", "Track", "https://shop.example/t/1")),
    "one webview is a CTA URL button, label clipped": (
        TextContent(text="Pick a seat", actions=[WebviewAction(text="Open the seat map now please",
                                                               uri="https://shop.example/seats",
                                                               fallback="https://shop.example/seats")]),
        cta("Pick a seat", "Open the seat map n…", "https://shop.example/seats")),
    "location request": (
        TextContent(text="Where should we deliver?", actions=[LocationRequestAction(text="Send location")]),
        interactive("location_request_message", "Where should we deliver?", {"name": "send_location"})),
    "location request with a choice numbered in its body": (
        TextContent(text="Where to?", actions=[LocationRequestAction(text="Share"),
                                               *replies(("Pick up in store", "PICKUP"))]),
        interactive("location_request_message",
                    "Where to?\n\nReply with your address, or share your location.\n1. Pick up in store",
                    {"name": "send_location"})),
    "four replies are a list": (
        TextContent(text="Which size?", actions=replies(("Small", "S"), ("Medium", "M"), ("Large", "L"),
                                                        ("Extra large with a long name", "XL"))),
        listed("Which size?", [{"id": "S", "title": "Small"}, {"id": "M", "title": "Medium"},
                               {"id": "L", "title": "Large"},
                               {"id": "XL", "title": "Extra large with a long…",
                                "description": "Extra large with a long name"}])),
    "two links are text": (
        TextContent(text="Useful links", actions=[LinkAction(text="Shop", uri="https://shop.example"),
                                                  LinkAction(text="Help", uri="https://help.example")]),
        text("Useful links\n\nShop: https://shop.example\nHelp: https://help.example")),
    "image with reply buttons has an image header": (
        ImageContent(media_url=IMG, text="Like it?", actions=replies(("Yes", "LIKE"), ("No", "DISLIKE"))),
        buttons("Like it?", [("LIKE", "Yes"), ("DISLIKE", "No")], {"type": "image", "image": {"link": IMG}})),
    "image with one link is a CTA URL button with an image header": (
        ImageContent(media_url=IMG, text="New arrivals",
                     actions=[LinkAction(text="See more", uri="https://shop.example/new")]),
        cta("New arrivals", "See more", "https://shop.example/new", {"type": "image", "image": {"link": IMG}})),
    "image with four replies numbers them in the caption": (
        ImageContent(media_url=IMG, text="Rate it", actions=replies(("One", "1"), ("Two", "2"), ("Three", "3"),
                                                                    ("Four", "4"))),
        {"type": "image", "image": {"link": IMG, "caption": "Rate it\n\n1. One\n2. Two\n3. Three\n4. Four"}}),
    "file": (
        FileContent(media_url="https://shop.example/files/i.pdf", text="Your invoice", alt_text="invoice-42.pdf"),
        {"type": "document", "document": {"link": "https://shop.example/files/i.pdf", "filename": "invoice-42.pdf",
                                          "caption": "Your invoice"}}),
    "carousel of postbacks is a list": (
        CarouselContent(text="Our plans", items=PLAN_ITEMS), listed("Our plans", PLAN_ROWS)),
    "list of postbacks is a list, its own actions extra rows": (
        ListContent(items=PLAN_ITEMS[:2], actions=[PostbackAction(text="More plans", payload="MORE")]),
        listed("Please choose:", [*PLAN_ROWS[:2], {"id": "MORE", "title": "More plans"}])),
    "carousel with a link is text": (
        CarouselContent(text="Our picks", items=[
            Item(title="Boots", description="Waterproof", media_url="https://shop.example/boots.jpg",
                 actions=[LinkAction(text="Buy", uri="https://shop.example/boots")]),
            Item(title="Socks", actions=[PostbackAction(text="Add socks", payload="ADD_SOCKS")])]),
        text("Our picks\n\nBoots — Waterproof\nhttps://shop.example/boots.jpg\nBuy: https://shop.example/boots"
             "\n\nSocks\n1. Add socks")),
    "carousel item with two choices is text": (
        CarouselContent(items=[Item(title="Boots", actions=replies(("Buy", "BUY"), ("Save", "SAVE")))]),
        text("Boots\n1. Buy\n2. Save")),
    "list of eleven is text": (
        ListContent(items=[Item(title=f"Item {i}", actions=[PostbackAction(text="Pick", payload=f"I{i}")])
                           for i in range(11)]),
        text("\n\n".join(f"Item {i}\n{i + 1}. Pick" for i in range(11)))),
    "form is text": (
        FormContent(fields=[FormField(type="text", name="name", label="Your name"),
                            FormField(type="select", name="size", label="Size",
                                      options=[FormOption(name="s", label="S"), FormOption(name="m", label="M")])]),
        text("Please reply with:\nYour name\nSize (S, M)")),
    # Past a limit: clipped where nothing is lost, else the numbered text — never a refused body.
    "eleven replies are numbered text": (
        TextContent(text="Pick a slot", actions=replies(*((f"Slot {i}", f"SLOT{i}") for i in range(11)))),
        text("Pick a slot\n\n" + "\n".join(f"{i + 1}. Slot {i}" for i in range(11)))),
    "button titles equal once clipped become list rows": (
        TextContent(text="Where?", actions=replies(("Deliver to my home address", "HOME"),
                                                   ("Deliver to my home address twice", "HOME2"))),
        listed("Where?", [{"id": "HOME", "title": "Deliver to my home addr…",
                           "description": "Deliver to my home address"},
                          {"id": "HOME2", "title": "Deliver to my home addr…",
                           "description": "Deliver to my home address twice"}])),
    "a payload too long for an id is numbered text": (
        TextContent(text="Confirm?", actions=replies(("Yes", "P" * 300), ("No", "N"))),
        text("Confirm?\n\n1. Yes\n2. No")),
    "the same payload twice is numbered text": (
        TextContent(text="Pick", actions=replies(("A", "SAME"), ("B", "SAME"))), text("Pick\n\n1. A\n2. B")),
    "a body too long for buttons is numbered text": (
        TextContent(text="x" * 1500, actions=replies(("Yes", "Y"), ("No", "N"))),
        text("x" * 1500 + "\n\n1. Yes\n2. No")),
    "a caption too long is text with the image linked first": (
        ImageContent(media_url=IMG, text="y" * 2000), text(f"{IMG}\n\n" + "y" * 2000, preview=True)),
    "text past 4096 is clipped": (TextContent(text="z" * 5000), text("z" * 4095 + "…")),
}


async def sent_body(wa: WaEnv, send: OutboundSend) -> dict[str, Any]:
    """Publish `send`, wait for the send path's outcome; the body the fake accepted."""
    await publish(wa, send)
    [first] = (await statuses_of(wa, send.message_id, 1))[:1]
    assert first.status == "sent", (first.error_code, first.error_title, first.error_details)
    [body] = [b for b in wa.fake.outbox(wa.integration_id, CUSTOMER)
              if b.get("biz_opaque_callback_data") == f"tl:{send.conversation_id}:{send.message_id}"]
    return body


@pytest.mark.parametrize("case", list(RENDERINGS))
async def test_each_content_type_is_sent_natively_or_readably(wa: WaEnv, case: str) -> None:
    content, expected = RENDERINGS[case]
    send = outbound(wa, content)
    body = await sent_body(wa, send)
    assert body == {"messaging_product": "whatsapp", "recipient_type": "individual", "to": "15551234567",
                    **expected, "biz_opaque_callback_data": f"tl:{send.conversation_id}:{send.message_id}"}


async def test_a_quoted_message_keeps_its_context_in_every_form(wa: WaEnv) -> None:
    quoted = (await wa.script("/inbound", {"from": CUSTOMER, "text": "which one?"}))["wamid"]
    for content in (TextContent(text="This one", actions=replies(("Ok", "OK"))),
                    CarouselContent(items=PLAN_ITEMS),
                    TextContent(text="Go", actions=[LinkAction(text="Open", uri="https://shop.example")])):
        body = await sent_body(wa, outbound(wa, content, quoted_provider_message_id=quoted))
        assert body["context"] == {"message_id": quoted}


async def test_a_form_response_is_never_sent_to_a_customer(wa: WaEnv) -> None:
    answer = FormResponseContent(fields=[FormField(type="text", name="name", label="Name", text="Ada")])
    send = outbound(wa, answer)
    await publish(wa, send)
    [failed] = await statuses_of(wa, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "unsupported_content"
    assert wa.fake.outbox(wa.integration_id, CUSTOMER) == []


async def test_a_tapped_list_row_comes_back_with_its_payload(wa: WaEnv) -> None:
    body = await sent_body(wa, outbound(wa, CarouselContent(text="Our plans", items=PLAN_ITEMS)))
    ours = wa.fake.thread(wa.integration_id, CUSTOMER)[-1].wamid
    row = body["interactive"]["action"]["sections"][0]["rows"][1]
    # What the sandbox phone posts when the customer taps the row (the real list_reply webhook).
    tap = await wa.script("/inbound", {"from": CUSTOMER, "listReply": row})
    [message] = [m for m in await wa.inbound() if m.provider_message_id == tap["wamid"]]
    assert message.postback is not None and message.postback.payload == "PLAN_PRO"
    assert message.content == TextContent(text="Professional subscripti…", payload="PLAN_PRO")
    assert message.quoted_provider_message_id == ours
    assert message.raw["interactive"]["list_reply"]["description"] == "$10 a month"


# --- read and typing ---------------------------------------------------------------------------

def activity(wa: WaEnv, kind: str, last: str | None) -> OutboundActivity:
    return OutboundActivity(app_id=wa.record.app_id, integration_id=wa.integration_id, channel="whatsapp",
                            conversation_id=new_id(), user_id=new_id(), client_id=new_id(),
                            recipient=bsuid_for(CUSTOMER), recipient_info={"wa_id": "15551234567"},
                            activity=kind, last_provider_message_id=last, created_at=time.time())  # type: ignore[arg-type]


def status_calls(wa: WaEnv) -> list[dict[str, Any]]:
    return [r["body"] for r in wa.fake.requests if r["body"].get("status") == "read"]


async def test_read_and_typing_reach_the_customers_phone(wa: WaEnv) -> None:
    first = (await wa.script("/inbound", {"from": CUSTOMER, "text": "hello?"}))["wamid"]
    latest = (await wa.script("/inbound", {"from": CUSTOMER, "text": "anyone there?"}))["wamid"]
    await wa.bus.publish(channel.subject_of(activity(wa, "conversation:read", latest)),
                         channel.encode(activity(wa, "conversation:read", latest)))

    async def read_call() -> list[dict[str, Any]] | None:
        return status_calls(wa) or None

    assert await eventually(read_call) == [{"messaging_product": "whatsapp", "status": "read", "message_id": latest}]
    thread = {e.wamid: e for e in wa.fake.thread(wa.integration_id, CUSTOMER)}
    assert thread[latest].status == "read" and thread[first].status != "read"
    assert not wa.fake.is_typing(wa.integration_id, CUSTOMER)

    # typing:stop has no call of its own (the indicator ends with the next message); typing:start
    # marks read and shows the indicator. Both ride the recipient's ordered partition.
    for kind in ("typing:stop", "typing:start"):
        await wa.bus.publish(channel.subject_of(activity(wa, kind, latest)), channel.encode(activity(wa, kind, latest)))

    async def typing_call() -> list[dict[str, Any]] | None:
        calls = status_calls(wa)
        return calls if len(calls) >= 2 else None

    calls = await eventually(typing_call)
    assert calls[1] == {"messaging_product": "whatsapp", "status": "read", "message_id": latest,
                        "typing_indicator": {"type": "text"}}
    assert wa.fake.is_typing(wa.integration_id, CUSTOMER)
    async with httpx.AsyncClient() as http:
        thread_view = (await http.get(f"{wa.system.base_url}/sandbox/whatsapp/{wa.integration_id}/thread",
                                      params={"to": CUSTOMER})).json()
    assert thread_view["typing"] is True
    # The business's next message ends the indicator.
    await sent_body(wa, outbound(wa, TextContent(text="Here!")))
    assert not wa.fake.is_typing(wa.integration_id, CUSTOMER)
    assert len(status_calls(wa)) == 2


async def test_activity_without_a_customer_message_or_for_stopped_typing_makes_no_call(wa: WaEnv) -> None:
    sender, creds = wa.service.sender, wa.service.credentials(wa.integration_id)
    assert creds is not None
    assert sender.activity_request(creds, activity(wa, "typing:start", None)) is None
    assert sender.activity_request(creds, activity(wa, "conversation:read", None)) is None
    assert sender.activity_request(creds, activity(wa, "typing:stop", "wamid.X")) is None
    request = sender.activity_request(creds, activity(wa, "typing:start", "wamid.X"))
    assert request is not None and request.url == creds.messages_url
    assert request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert json.loads(request.body) == {"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.X",
                                        "typing_indicator": {"type": "text"}}


# --- pywa, an independent client, sends the same bodies ----------------------------------------

def pywa_client(wa: WaEnv) -> Any:
    graph = httpx.URL(f"{wa.system.base_url}/sandbox/graph")

    class Rewrite(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            request.url = request.url.copy_with(scheme=graph.scheme, host=graph.host, port=graph.port,
                                                path=graph.path + request.url.path)
            return super().handle_request(request)

    return WhatsApp(phone_id=PHONE_NUMBER_ID, token=ACCESS_TOKEN, session=httpx.Client(transport=Rewrite()),
                    api_version="23.0")


async def test_our_interactive_bodies_are_what_pywa_sends(wa: WaEnv) -> None:
    client = pywa_client(wa)
    to = "15551234567"
    cases: list[tuple[Content, Any]] = [
        (TextContent(text="Pick one", actions=replies(("Yes please", "yes"), ("No", "no"))),
         lambda: client.send_message(to, "Pick one", buttons=[types.Button("Yes please", "yes"),
                                                               types.Button("No", "no")])),
        (TextContent(text="Which size?", actions=replies(("Small", "S"), ("Medium", "M"), ("Large", "L"),
                                                         ("Huge", "H"))),
         lambda: client.send_message(to, "Which size?", buttons=types.SectionList("Options", [types.Section(
             "Options", [types.SectionRow(t, i) for t, i in (("Small", "S"), ("Medium", "M"), ("Large", "L"),
                                                             ("Huge", "H"))])]))),
        (CarouselContent(text="Our plans", items=PLAN_ITEMS),
         lambda: client.send_message(to, "Our plans", buttons=types.SectionList("Options", [types.Section(
             "Options", [types.SectionRow(r["title"], r["id"], r.get("description")) for r in PLAN_ROWS])]))),
        (TextContent(text="Track your order", actions=[LinkAction(text="Track", uri="https://shop.example/t/1")]),
         lambda: client.send_message(to, "Track your order", buttons=types.URLButton("Track",
                                                                                       "https://shop.example/t/1"))),
        (TextContent(text="Where should we deliver?", actions=[LocationRequestAction(text="Send")]),
         lambda: client.request_location(to, "Where should we deliver?")),
        (ImageContent(media_url=IMG, text="Like it?", actions=replies(("Yes", "LIKE"), ("No", "DISLIKE"))),
         lambda: client.send_image(to, IMG, caption="Like it?", buttons=[types.Button("Yes", "LIKE"),
                                                                          types.Button("No", "DISLIKE")])),
    ]
    for content, by_pywa in cases:
        ours = await sent_body(wa, outbound(wa, content))
        await asyncio.to_thread(by_pywa)
        theirs = wa.fake.outbox(wa.integration_id, CUSTOMER)[-1]
        assert json.loads(json.dumps(theirs["interactive"])) == ours["interactive"]
    # And the read/typing calls are pywa's mark_message_as_read / indicate_typing.
    wamid = (await wa.script("/inbound", {"from": CUSTOMER, "text": "hi"}))["wamid"]
    assert (await asyncio.to_thread(client.indicate_typing, wamid)).success is True
    sender, creds = wa.service.sender, wa.service.credentials(wa.integration_id)
    assert creds is not None
    for kind in ("conversation:read", "typing:start"):
        request = sender.activity_request(creds, activity(wa, kind, wamid))
        assert request is not None
        ours_call = json.loads(request.body)
        theirs_call = await asyncio.to_thread(
            client.indicate_typing if kind == "typing:start" else client.mark_message_as_read, wamid)
        assert theirs_call.success is True
        assert status_calls(wa)[-1] == ours_call


# --- the sandbox phone shows them and taps them --------------------------------------------------

@pytest.mark.e2e
async def test_sandbox_phone_taps_interactive_messages(wa: WaEnv) -> None:
    Path(wa.system.data_dir).mkdir(parents=True, exist_ok=True)
    (Path(wa.system.data_dir) / "sandbox.json").write_text(json.dumps({
        "baseUrl": wa.system.base_url, "appId": wa.record.app_id,
        "integrations": {"whatsapp": {"id": wa.integration_id}}}))
    for content in (CarouselContent(text="Our plans", items=PLAN_ITEMS),
                    TextContent(text="Track your order",
                                actions=[LinkAction(text="Track", uri="https://shop.example/t/1")]),
                    TextContent(text="Where should we deliver?", actions=[LocationRequestAction(text="Send")])):
        await sent_body(wa, outbound(wa, content))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium",
                                           args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(8000)
            await page.goto(f"{wa.system.base_url}/sandbox/?channel=whatsapp")
            thread = page.locator("#phone-thread")
            await expect(thread.locator("li.out")).to_have_count(3)
            track = thread.get_by_role("link", name="↗ Track")
            await expect(track).to_have_attribute("href", "https://shop.example/t/1")
            # The list opens on its button and a row tap is the customer's list_reply.
            row = thread.get_by_role("button", name="Professional subscripti…")
            await expect(row).to_be_hidden()
            await thread.get_by_role("button", name="☰ Options").click()
            await row.click()
            await expect(thread.locator("li.in").last).to_contain_text("Professional subscripti…")
            await thread.get_by_role("button", name="📍 Send location").click()
            await expect(thread.locator("li.in").last).to_contain_text("📍")
            # The business typing shows under its name until its next message.
            latest = [e for e in wa.fake.thread(wa.integration_id, CUSTOMER) if e.direction == "in"][-1].wamid
            await wa.bus.publish(channel.subject_of(activity(wa, "typing:start", latest)),
                                 channel.encode(activity(wa, "typing:start", latest)))
            await expect(page.locator("#phone-business")).to_have_text("typing…")
            await sent_body(wa, outbound(wa, TextContent(text="Thanks!")))
            await expect(page.locator("#phone-business")).to_contain_text("WhatsApp business")
        finally:
            await browser.close()

    async def both() -> list[InboundMessage] | None:
        found = await wa.inbound()
        return found if len(found) >= 2 else None

    tapped, located = await eventually(both)
    assert tapped.postback is not None and tapped.postback.payload == "PLAN_PRO"
    assert isinstance(located.content, LocationContent)
