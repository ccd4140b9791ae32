"""The sandbox page in headless Chromium: one simulated phone per channel behind a tab strip,
layout (the phone of every channel and the open widget never overlap, no sideways scroll on a
phone), the phone keeps the newest message in view and does not refetch broken images, each
channel's phone sends through its fake, renders what the business sends and taps its buttons,
and the App phone (the in-app SDK) gets only the android integration's public ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from playwright.async_api import Browser, Page, expect

from services.sandbox.messenger_fake import FakeMessenger
from services.sandbox.telegram_fake import FakeTelegram
from services.sandbox.twilio_fake import FakeTwilio
from shared.bus import Bus
from tests.fakes.whatsapp_env import CUSTOMER, WaEnv, eventually, start_whatsapp
from tests.harness import System
from tests.integration.test_sandbox_channel_persistence import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BOT_TOKEN,
    PAGE_ID,
    PAGE_TOKEN,
    PSID,
    SMS_CUSTOMER,
    SMS_NUMBER,
    TG_USER,
    Channels,
    add_channels,
)
from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web
from threadline.bootstrap import sandbox_integrations

CHANNELS = ("whatsapp", "messenger", "telegram", "twilio", "app")
TIMEOUT_MS = 8000

pytestmark = pytest.mark.e2e


@pytest.fixture
async def sandbox(system: System, bus: Bus) -> WaEnv:
    """whatsapp + sandbox + the web widget's services, and a sandbox.json like `threadline up` writes."""
    # conversations first: it republishes the integrations bucket from its database at start.
    await system.start("identity", "conversations", "web")
    wa = await start_whatsapp(system, bus)
    async with aiohttp.ClientSession() as http:
        app_id, web_id = await create_app_with_web(http, system.base_url, businessName="Threadline Demo Shop")
    write_sandbox_json(system, {"web": {"id": web_id}, "whatsapp": {"id": wa.integration_id}}, app_id)
    return wa


@pytest.fixture
async def channels(sandbox: WaEnv, bus: Bus) -> Channels:
    """The sandbox fixture plus messenger, telegram, twilio and android (the App phone, served by
    the `app` service) integrations, all in sandbox.json."""
    added = await add_channels(sandbox.system, bus)
    info = json.loads((Path(sandbox.system.data_dir) / "sandbox.json").read_text())
    info["integrations"].update(added.sandbox_json_entries())
    info["integrations"]["android"] = await add_android(sandbox.system, info["appId"])
    write_sandbox_json(sandbox.system, info["integrations"], info["appId"])
    return added


async def add_android(system: System, app_id: str) -> dict[str, Any]:
    """Start `app` and create the android integration `threadline up` makes; its sandbox.json entry."""
    await system.start("app")
    body = sandbox_integrations(system.base_url)["android"]
    async with aiohttp.ClientSession() as http, http.post(
            f"{system.base_url}/v2/apps/{app_id}/integrations", json=body, headers=ACCOUNT) as resp:
        assert resp.status == 201, await resp.text()
        integration_id = (await resp.json())["integration"]["id"]
    return {"id": integration_id, **{k: v for k, v in body.items() if k not in ("type", "displayName")}}


def write_sandbox_json(system: System, integrations: dict[str, Any], app_id: str) -> None:
    Path(system.data_dir).mkdir(parents=True, exist_ok=True)
    (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({
        "baseUrl": system.base_url, "appId": app_id, "apiKey": {"id": "app_key_x", "secret": "not-on-the-page"},
        "integrations": integrations}))



async def open_page(browser: Browser, url: str, width: int, height: int) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(url)
    return page


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (1440, 900), (1024, 768), (900, 700)])
async def test_open_widget_never_covers_the_phone(channels: Channels, browser: Browser, width: int,
                                                  height: int) -> None:
    page = await open_page(browser, f"{channels.system.base_url}/sandbox/", width, height)
    try:
        await page.locator('[data-threadline="launcher"]').click()
        panel = page.locator('[data-threadline="panel"]')
        await expect(panel).to_be_visible()
        await expect(page.locator('[data-threadline="root"] .tl-title')).to_have_text("Threadline Demo Shop")
        await expect(page.locator("#brand-name")).to_have_text("Threadline Demo Shop")
        await expect(page.get_by_role("tab")).to_have_count(len(CHANNELS))
        for kind in CHANNELS:
            await page.locator(f"#tab-{kind}").click()
            await expect(page.locator("#phone-frame")).to_have_attribute("data-channel", kind)
            await expect(page.locator(f"#tab-{kind}")).to_have_attribute("aria-selected", "true")
            panel_box = await panel.bounding_box()
            for phone_part in ("#phone-frame", "#phone-tabs"):
                phone_box = await page.locator(phone_part).bounding_box()
                assert panel_box is not None and phone_box is not None
                assert not overlaps(panel_box, phone_box), (kind, phone_part, panel_box, phone_box)
            # The phone's input and Send button, and every tab, are what a click there reaches.
            for selector in ("#phone-text", '#phone-compose button[type="submit"]',
                             *(f"#tab-{other}" for other in CHANNELS)):
                hit = await page.locator(selector).evaluate(
                    "el => { const r = el.getBoundingClientRect();"
                    " return el.contains(document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2)); }")
                assert hit, (kind, selector)
            # Each tab shows its whole label.
            clipped = await page.locator(".phone-tab").evaluate_all(
                "tabs => tabs.filter(t => t.scrollWidth > t.clientWidth + 1).map(t => t.id)")
            assert clipped == [], clipped
            assert await page.evaluate("document.documentElement.scrollWidth") <= width
    finally:
        await page.context.close()


async def test_mobile_page_does_not_scroll_sideways(channels: Channels, browser: Browser) -> None:
    page = await open_page(browser, f"{channels.system.base_url}/sandbox/", 390, 844)
    try:
        await expect(page.locator('[data-threadline="launcher"]')).to_be_visible()
        await expect(page.locator("#curl")).to_contain_text("app_key_x")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        for kind in CHANNELS:
            await page.locator(f"#tab-{kind}").click()
            await expect(page.locator("#phone-frame")).to_have_attribute("data-channel", kind)
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390, kind
        await page.locator('[data-threadline="launcher"]').click()
        await expect(page.locator('[data-threadline="panel"]')).to_be_visible()
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        await page.context.close()


async def test_phone_scrolls_to_new_messages_and_does_not_refetch_broken_images(
        sandbox: WaEnv, browser: Browser) -> None:
    graph = f"{sandbox.system.base_url}/sandbox/graph/v23.0/{sandbox.record.config['phoneNumberId']}/messages"
    auth = {"Authorization": f"Bearer {sandbox.record.config['accessToken']}"}
    broken = f"{sandbox.system.base_url}/sandbox/static/missing-picture.png"
    page = await open_page(browser, f"{sandbox.system.base_url}/sandbox/", 1280, 800)
    image_requests: list[str] = []
    page.on("request", lambda request: image_requests.append(request.url) if request.url == broken else None)
    try:
        async with aiohttp.ClientSession() as http:
            async def send(body: dict[str, Any]) -> None:
                async with http.post(graph, headers=auth, json={"messaging_product": "whatsapp",
                                                                "to": CUSTOMER, **body}) as resp:
                    assert resp.status == 200, await resp.text()

            for n in range(25):
                await send({"type": "text", "text": {"body": f"line {n}"}})
            await send({"type": "image", "image": {"link": broken, "caption": "a lost picture"}})
            await send({"type": "interactive", "interactive": {
                "type": "button", "body": {"text": "Pick one"},
                "action": {"buttons": [{"type": "reply", "reply": {"id": "yes", "title": "Yes please"}}]}}})
        thread = page.locator("#phone-thread")
        await expect(thread.locator(".img-missing")).to_have_count(1)
        await expect(thread.locator("img")).to_have_count(0)
        await expect(thread.locator("li").last).to_contain_text("Pick one")

        async def at_bottom() -> None:
            await page.wait_for_function(
                "() => { const t = document.getElementById('phone-thread');"
                " return t.scrollHeight > t.clientHeight && t.scrollTop + t.clientHeight >= t.scrollHeight - 2; }")

        await at_bottom()
        await page.get_by_role("button", name="Yes please").click()
        await expect(thread.locator("li.in").last).to_contain_text("Yes please")
        await at_bottom()
        # Later polls (statuses change: read receipts) render again without fetching the image again.
        for _ in range(2):
            async with page.expect_response(lambda r: "/thread?" in r.url):
                pass
        await expect(thread.locator("li.in .meta").last).to_be_visible()
        assert len(image_requests) == 1
    finally:
        await page.context.close()


async def test_only_channels_in_sandbox_json_get_a_phone(sandbox: WaEnv, browser: Browser) -> None:
    page = await open_page(browser, f"{sandbox.system.base_url}/sandbox/", 1280, 800)
    try:
        # WhatsApp alone: no tab strip, the WhatsApp phone.
        await expect(page.locator("#phone-frame")).to_have_attribute("data-channel", "whatsapp")
        await expect(page.locator("#phone-tabs")).to_be_hidden()
        await expect(page.get_by_role("tab", include_hidden=True)).to_have_count(1)
        await expect(page.locator("#phone-business")).to_contain_text("+15550001111")
    finally:
        await page.context.close()


async def send_from_phone(page: Page, text: str) -> None:
    await page.locator("#phone-text").fill(text)
    await page.locator("#phone-text").press("Enter")
    await expect(page.locator("#phone-thread li.in").last).to_contain_text(text)


async def test_messenger_phone_sends_taps_quick_replies_and_postbacks_and_marks_read(
        channels: Channels, browser: Browser) -> None:
    base = channels.system.base_url
    fake: FakeMessenger = channels.fake(FakeMessenger)
    iid = channels.messenger.id
    page = await open_page(browser, f"{base}/sandbox/?channel=messenger", 1280, 800)
    try:
        await expect(page.locator("#phone-frame")).to_have_attribute("data-channel", "messenger")
        await expect(page.locator("#phone-business")).to_contain_text(f"m.me/{PAGE_ID}")
        await expect(page.locator("#phone-number")).to_have_value(PSID)
        await send_from_phone(page, "Do you sell beans?")
        assert fake.thread(iid, PSID)[0].body["message"]["text"] == "Do you sell beans?"
        # Messenger's blue for the customer's own bubbles.
        color = await page.locator("#phone-thread li.in").last.evaluate("el => getComputedStyle(el).backgroundColor")
        assert color == "rgb(0, 132, 255)"
        template = {"template_type": "button", "text": "We do. Anything else?",
                    "buttons": [{"type": "postback", "title": "Track my order", "payload": "TRACK"},
                                {"type": "web_url", "title": "Shop", "url": "https://example.com/shop"}]}
        async with httpx.AsyncClient(base_url=base) as http:
            sent = await http.post(f"/sandbox/messenger-graph/v23.0/{PAGE_ID}/messages",
                                   params={"access_token": PAGE_TOKEN}, json={
                                       "recipient": {"id": PSID}, "messaging_type": "RESPONSE",
                                       "message": {"attachment": {"type": "template", "payload": template},
                                                   "quick_replies": [{"content_type": "text", "title": "Decaf",
                                                                      "payload": "DECAF"}]}})
            assert sent.status_code == 200, sent.text
        await expect(page.locator("#phone-thread li.out").last).to_contain_text("We do. Anything else?")
        await expect(page.get_by_role("link", name="Shop")).to_have_attribute("href", "https://example.com/shop")
        await page.get_by_role("button", name="Decaf").click()
        await expect(page.locator("#phone-thread li.in").last).to_contain_text("Decaf")
        await expect(page.locator("#phone-quick")).to_be_hidden()  # quick replies go once answered
        assert fake.thread(iid, PSID)[-1].body["message"]["quick_reply"] == {"payload": "DECAF"}
        await page.get_by_role("button", name="Track my order").click()
        await expect(page.locator("#phone-thread li.in").last).to_contain_text("Track my order")
        assert fake.thread(iid, PSID)[-1].body["postback"]["payload"] == "TRACK"

        async def read() -> bool:
            return all(e.status == "read" for e in fake.thread(iid, PSID) if e.direction == "out")

        await eventually(read)
        # An m.me link with a ref opens the Messenger phone as the real app does: a referral.
        await page.evaluate(f"window.open('https://m.me/{PAGE_ID}?ref=spring-promo')")
        await expect(page.locator("#phone-thread li.in").last).to_contain_text("spring-promo")
        assert fake.thread(iid, PSID)[-1].body["referral"]["ref"] == "spring-promo"
    finally:
        await page.context.close()


async def test_telegram_phone_sends_and_presses_inline_buttons(channels: Channels, browser: Browser) -> None:
    base = channels.system.base_url
    fake: FakeTelegram = channels.fake(FakeTelegram)
    iid = channels.telegram.id
    page = await open_page(browser, f"{base}/sandbox/", 1280, 800)
    try:
        await page.locator("#tab-telegram").click()
        await expect(page.locator("#phone-business")).to_contain_text("@threadline_demo_bot")
        await send_from_phone(page, "hello bot")
        assert fake.thread(iid, TG_USER)[0].message["text"] == "hello bot"
        keyboard = {"inline_keyboard": [[{"text": "Light", "callback_data": "LIGHT"},
                                         {"text": "Dark", "callback_data": "DARK"}],
                                        [{"text": "Menu", "url": "https://example.com/menu"}]]}
        async with httpx.AsyncClient(base_url=base) as http:
            sent = await http.post(f"/sandbox/telegram-api/bot{BOT_TOKEN}/sendMessage", json={
                "chat_id": TG_USER, "text": "Pick a roast", "reply_markup": keyboard})
            assert sent.json()["ok"], sent.text
        await expect(page.locator("#phone-thread li.out").last).to_contain_text("Pick a roast")
        await expect(page.locator("#phone-thread .tg-row")).to_have_count(2)
        await page.get_by_role("button", name="Dark").click()
        await expect(page.locator("#phone-thread li.in").last).to_contain_text("Dark")
        pressed = fake.thread(iid, TG_USER)[-1].callback
        assert pressed is not None and pressed["data"] == "DARK"
        # A t.me deep link with ?start= opens the Telegram phone and sends /start <payload>.
        await page.locator("#tab-whatsapp").click()
        await page.evaluate("window.open('https://t.me/threadline_demo_bot?start=order-42')")
        await expect(page.locator("#phone-frame")).to_have_attribute("data-channel", "telegram")
        await expect(page.locator("#phone-thread li.in").last).to_contain_text("/start order-42")
    finally:
        await page.context.close()


async def test_sms_phone_sends_and_shows_the_business_texts(channels: Channels, browser: Browser) -> None:
    base = channels.system.base_url
    fake: FakeTwilio = channels.fake(FakeTwilio)
    iid = channels.twilio.id
    page = await open_page(browser, f"{base}/sandbox/?channel=twilio", 390, 844)
    try:
        await expect(page.locator("#tab-twilio")).to_have_text("SMS")
        await expect(page.locator("#phone-title")).to_have_text(SMS_NUMBER)
        await expect(page.locator("#phone-name")).to_be_hidden()  # an SMS has no profile name
        await send_from_phone(page, "Is the shop open?")
        assert fake.thread(iid, SMS_CUSTOMER)[0].body["Body"] == "Is the shop open?"
        async with httpx.AsyncClient(base_url=base, auth=(ACCOUNT_SID, AUTH_TOKEN)) as http:
            sent = await http.post(f"/sandbox/twilio-api/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", data={
                "To": SMS_CUSTOMER, "From": SMS_NUMBER, "Body": "Yes, until 6pm.\n1. Directions\n2. Menu"})
            assert sent.status_code == 201, sent.text
        last = page.locator("#phone-thread li.out").last
        await expect(last).to_contain_text("Yes, until 6pm.")
        assert "\n1. Directions" in await last.inner_text()  # line breaks of the text kept
        # A bad sender is reported in the phone, not silently dropped.
        await page.locator("#phone-number").fill("not a number")
        await page.locator("#phone-number").dispatch_event("change")
        await page.locator("#phone-text").fill("hello?")
        await page.locator("#phone-text").press("Enter")
        await expect(page.locator("#phone-error")).to_contain_text("E.164")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        await page.context.close()


async def test_app_phone_gets_public_ids_only(channels: Channels, browser: Browser) -> None:
    base = channels.system.base_url
    info = json.loads((Path(channels.system.data_dir) / "sandbox.json").read_text())
    android = info["integrations"]["android"]
    async with httpx.AsyncClient(base_url=base) as http:
        config = (await http.get("/sandbox/config.json")).json()
        html = (await http.get("/sandbox/")).text
    assert [ch for ch in config["channels"] if ch["kind"] == "app"] == [
        {"kind": "app", "integrationId": android["id"], "appId": info["appId"]}]
    # The service account's private key (and its id) never reach the unauthenticated page.
    for page_text in (html, json.dumps(config)):
        assert "PRIVATE KEY" not in page_text
        assert android["privateKey"].splitlines()[1] not in page_text
    page = await open_page(browser, f"{base}/sandbox/?channel=app", 1280, 800)
    try:
        await expect(page.locator("#tab-app")).to_have_text("App")
        await expect(page.locator("#phone-app-state")).to_contain_text("online")
        # The App phone has no sender fields: it is one install of the app, with its own controls.
        await expect(page.locator(".phone-identity")).to_be_hidden()
        await expect(page.locator("#phone-app-bar")).to_be_visible()
        await page.get_by_role("button", name="Close app").click()
        await expect(page.locator("#phone-lock")).to_be_visible()
        await expect(page.locator("#phone-lock-empty")).to_contain_text("No notifications")
        # Another channel's phone shows neither the app's controls nor its lock screen.
        await page.locator("#tab-whatsapp").click()
        await expect(page.locator("#phone-app-bar")).to_be_hidden()
        await expect(page.locator("#phone-lock")).to_be_hidden()
        await expect(page.locator(".phone-identity")).to_be_visible()
        # Back on the App tab the app is still closed (kept in localStorage like its session).
        await page.locator("#tab-app").click()
        await expect(page.locator("#phone-lock")).to_be_visible()
        await page.locator("#phone-lock-open").click()
        await expect(page.locator("#phone-lock")).to_be_hidden()
        await expect(page.locator("#phone-app-state")).to_contain_text("online")
    finally:
        await page.context.close()
