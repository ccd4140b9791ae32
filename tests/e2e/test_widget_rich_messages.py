"""Every SunCo message type a business sends, in the widget in headless Chromium, and the
customer's answers: taps on reply and postback buttons, a submitted form, a shared location.

The business is what a real integrator runs: the official `sunshine_conversations_client` posts
the messages and reads the history, and a custom integration's webhook receives what the
customer did (`conversation:message`, `conversation:postback`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sunco
from aiohttp import web
from playwright.async_api import Browser, Locator, Page, expect

from tests.e2e.test_widget_conversation import TIMEOUT_MS, serve
from tests.harness import System, business_webhooks
from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web

pytestmark = pytest.mark.e2e

TRIGGERS = ["conversation:message", "conversation:postback"]
# A 1×1 PNG, served by the shop's own site for the cards' pictures.
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                         "AAAABJRU5ErkJggg==")
EIFFEL = {"latitude": 48.8584, "longitude": 2.2945}
ANSWER_TEXT = "Your name: Ada Lovelace\nE-mail: ada@example.com\nWhen: Afternoon"


@dataclass
class Shop:
    """The integrator: an app with a web integration, an app key for the official client, and a
    custom integration's webhook."""

    base_url: str
    app_id: str
    web_integration_id: str
    key_id: str
    secret: str
    events: list[dict[str, Any]]
    site_url: str = ""
    conversation_id: str = ""

    def client(self, key_id: str | None = None, secret: str | None = None) -> sunco.ApiClient:
        return sunco.ApiClient(sunco.Configuration(host=self.base_url, username=key_id or self.key_id,
                                                   password=secret or self.secret))

    async def post(self, content: dict[str, Any], *, author: dict[str, Any] | None = None,
                   key: tuple[str, str] | None = None) -> str:
        """Post a business message through the official client; its id."""
        post = sunco.MessagePost.from_dict({"author": author or {"type": "business"}, "content": content})

        def call() -> str:
            with self.client(*(key or (None, None))) as api:
                return str(sunco.MessagesApi(api).post_message(self.app_id, self.conversation_id, post).messages[0].id)

        return await asyncio.to_thread(call)

    async def history(self) -> list[Any]:
        """The conversation's messages, parsed by the official client."""
        def call() -> list[Any]:
            with self.client() as api:
                return list(sunco.MessagesApi(api).list_messages(self.app_id, self.conversation_id).messages)

        return await asyncio.to_thread(call)


async def wait_event(events: list[dict[str, Any]], match: Callable[[dict[str, Any]], bool],
                     timeout: float = 10.0) -> dict[str, Any]:
    """The first webhook event (already received or arriving within `timeout`) that matches."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for event in events:
            if match(event):
                return event
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no matching webhook event; got {[e['type'] for e in events]}")
        await asyncio.sleep(0.05)


def user_message(text: str) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        message = event["payload"].get("message", {}) if event["type"] == "conversation:message" else {}
        return message.get("author", {}).get("type") == "user" and message.get("content", {}).get("text") == text
    return match


def postback(payload: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "conversation:postback" and e["payload"]["postback"]["payload"] == payload


async def new_app(system: System, http: aiohttp.ClientSession, hook_url: str) -> tuple[str, str, str, str]:
    """An app with a web integration, a custom integration with a webhook, and an app key:
    (appId, web integration id, key id, secret)."""
    app_id, web_id = await create_app_with_web(http, system.base_url)
    async with http.post(f"{system.base_url}/v2/apps/{app_id}/integrations", headers=ACCOUNT, json={
            "type": "custom", "displayName": "Shop backend",
            "webhooks": [{"target": hook_url, "triggers": TRIGGERS}]}) as resp:
        assert resp.status == 201, await resp.text()
    async with http.post(f"{system.base_url}/v2/apps/{app_id}/keys", headers=ACCOUNT,
                         json={"displayName": "backend"}) as resp:
        assert resp.status == 201, await resp.text()
        key = (await resp.json())["key"]
    return app_id, web_id, key["id"], key["secret"]


def widget_page_html(base_url: str, app_id: str, integration_id: str) -> str:
    return f"""<!doctype html><html><head><title>Shop</title></head><body><h1>Shop</h1>
<script src="{base_url}/widget/threadline.js"></script>
<script>Threadline.init({json.dumps({"appId": app_id, "integrationId": integration_id, "baseUrl": base_url})});</script>
</body></html>"""


@contextlib.asynccontextmanager
async def shop_site(html: str) -> AsyncIterator[str]:
    """The shop's own site (another origin): the page embedding the widget, and a picture."""
    site = web.Application()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    async def picture(_request: web.Request) -> web.Response:
        return web.Response(body=PIXEL, content_type="image/png")

    site.router.add_get("/", index)
    site.router.add_get("/bean.png", picture)
    runner, port = await serve(site)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@pytest.fixture
async def shop(system: System) -> AsyncIterator[Shop]:
    await system.start("identity", "conversations", "webhooks", "web")
    async with aiohttp.ClientSession() as http, business_webhooks() as (hook_url, events):
        app_id, web_id, key_id, secret = await new_app(system, http, hook_url)
        async with shop_site(widget_page_html(system.base_url, app_id, web_id)) as site_url:
            yield Shop(system.base_url, app_id, web_id, key_id, secret, events, site_url)



@pytest.fixture
async def page(browser: Browser, shop: Shop) -> AsyncIterator[Page]:
    # The visitor allows this site their location (a fixed position: the Eiffel Tower).
    context = await browser.new_context(geolocation=EIFFEL, permissions=["geolocation"])
    tab = await context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    await tab.goto(shop.site_url)
    try:
        yield tab
    finally:
        await context.close()


def hook(scope: Page | Locator, name: str) -> Locator:
    return scope.locator(f'[data-threadline="{name}"]')


def messages(page: Page, author: str) -> Locator:
    return page.locator(f'[data-threadline="message"][data-author="{author}"]')


async def start_chat(page: Page, events: list[dict[str, Any]], text: str = "Hello") -> str:
    """Open the widget and write `text`; the conversation id (from the business's webhook)."""
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    await hook(page, "input").fill(text)
    await hook(page, "send").click()
    await expect(messages(page, "user").last).to_have_attribute("data-status", "confirmed")
    event = await wait_event(events, user_message(text))
    return str(event["payload"]["conversation"]["id"])


async def test_reply_and_postback_buttons(page: Page, shop: Shop) -> None:
    shop.conversation_id = await start_chat(page, shop.events)
    await shop.post({"type": "text", "text": "How was your delivery?", "actions": [
        {"type": "reply", "text": "On time", "payload": "RATE_ON_TIME"},
        {"type": "reply", "text": "Late", "payload": "RATE_LATE"},
        {"type": "postback", "text": "Talk to a person", "payload": "HUMAN"},
        {"type": "link", "text": "Track my parcel", "uri": "https://example.com/track?id=1"},
        {"type": "webview", "text": "Delivery options", "uri": "https://example.com/options",
         "fallback": "https://example.com/options"},
    ]})
    question = messages(page, "business").last
    await expect(question).to_contain_text("How was your delivery?")
    # Postback and links are buttons in the bubble; the replies are chips under it.
    buttons = hook(question, "action")
    await expect(buttons).to_have_text(["Talk to a person", "Track my parcel", "Delivery options"])
    await expect(buttons.nth(0)).to_have_attribute("data-action", "postback")
    for index, url in ((1, "https://example.com/track?id=1"), (2, "https://example.com/options")):
        await expect(buttons.nth(index)).to_have_attribute("href", url)
        await expect(buttons.nth(index)).to_have_attribute("target", "_blank")
        await expect(buttons.nth(index)).to_have_attribute("rel", "noopener noreferrer")
    chips = hook(hook(page, "quick-replies"), "quick-reply")
    await expect(chips).to_have_text(["On time", "Late"])

    # A postback: the business hears `conversation:postback`; no message, the button and the
    # chips stay. The button is a real button: the keyboard presses it.
    await buttons.nth(0).focus()
    await page.keyboard.press("Enter")
    event = await wait_event(shop.events, postback("HUMAN"))
    assert event["payload"]["conversation"]["id"] == shop.conversation_id
    assert event["payload"]["source"]["type"] == "web"
    await expect(buttons.nth(0)).to_have_attribute("data-state", "sent")
    await expect(messages(page, "user")).to_have_count(1)
    await expect(chips).to_have_count(2)

    # A reply: the customer's message is the label, with the payload; the chips go.
    await chips.filter(has_text="Late").click()
    await expect(messages(page, "user").last).to_have_text("Late")
    await expect(messages(page, "user").last).to_have_attribute("data-status", "confirmed")
    event = await wait_event(shop.events, user_message("Late"))
    assert event["payload"]["message"]["content"]["payload"] == "RATE_LATE"
    await expect(hook(page, "quick-replies")).to_have_count(0)
    # The business's history: the reply is a message, the postback is not.
    texts = [(m.author.type, m.content.actual_instance.text) for m in await shop.history()]
    assert texts == [("user", "Hello"), ("business", "How was your delivery?"), ("user", "Late")]
    # After a reload the answered question shows no chips; its postback button is still there.
    await page.reload()
    await hook(page, "launcher").click()
    await expect(messages(page, "user")).to_have_text(["Hello", "Late"])
    await expect(hook(messages(page, "business").last, "action").first).to_have_text("Talk to a person")
    await expect(hook(page, "quick-replies")).to_have_count(0)


async def test_carousel_and_list(page: Page, shop: Shop) -> None:
    shop.conversation_id = await start_chat(page, shop.events, "What do you have?")
    picture = shop.site_url + "bean.png"
    cards = [{"title": name, "description": f"{name} from our roastery", "mediaUrl": picture,
              "actions": [{"type": "postback", "text": f"Order {name.lower()}", "payload": f"ORDER_{name.upper()}"},
                          {"type": "link", "text": "Details", "uri": f"https://example.com/{name.lower()}"}]}
             for name in ("Espresso", "Latte", "Mocha")]
    cards[2]["actions"] = [{"type": "buy", "text": "Buy", "amount": 450, "currency": "usd"}]
    await shop.post({"type": "carousel", "items": cards})
    carousel = hook(page, "carousel")
    items = hook(carousel, "carousel-item")
    await expect(items).to_have_count(3)
    await expect(hook(items, "item-title")).to_have_text(["Espresso", "Latte", "Mocha"])
    await expect(hook(items.nth(1), "item-description")).to_have_text("Latte from our roastery")
    await expect(items.nth(0).locator("img")).to_have_attribute("src", picture)
    await expect(hook(items.nth(0), "action")).to_have_text(["Order espresso", "Details"])
    buy = hook(items.nth(2), "action")
    # SunCo's buy pays in SunCo's own checkout: the widget shows the offer, and it is no link.
    await expect(buy).to_have_attribute("data-action", "buy")
    await expect(buy).to_contain_text("4.50")
    await expect(items.nth(2).locator("a")).to_have_count(0)
    # One row that scrolls sideways: the cards side by side, wider together than the row.
    layout = await carousel.evaluate("""row => ({overflow: getComputedStyle(row).overflowX,
        wider: row.scrollWidth > row.clientWidth,
        sideBySide: [...row.children].every((card, i, all) =>
            i === 0 || card.getBoundingClientRect().top === all[0].getBoundingClientRect().top)})""")
    assert layout == {"overflow": "auto", "wider": True, "sideBySide": True}
    await hook(items.nth(1), "action").filter(has_text="Order latte").click()
    await wait_event(shop.events, postback("ORDER_LATTE"))

    await shop.post({"type": "list", "items": [
        {"title": "Small", "description": "250 ml", "mediaUrl": picture,
         "actions": [{"type": "postback", "text": "Pick small", "payload": "SIZE_S"}]},
        {"title": "Large", "description": "400 ml",
         "actions": [{"type": "postback", "text": "Pick large", "payload": "SIZE_L"}]},
    ], "actions": [{"type": "link", "text": "All sizes", "uri": "https://example.com/sizes"}]})
    listed = hook(page, "list")
    rows = hook(listed, "list-item")
    await expect(hook(rows, "item-title")).to_have_text(["Small", "Large"])
    await expect(hook(rows, "item-description")).to_have_text(["250 ml", "400 ml"])
    more = hook(hook(listed, "list-actions"), "action")
    await expect(more).to_have_text("All sizes")
    await expect(more).to_have_attribute("href", "https://example.com/sizes")
    # The list's rows are one under the other.
    tops = await rows.evaluate_all("rows => rows.map(r => r.getBoundingClientRect().top)")
    assert tops[1] > tops[0]
    await hook(rows.nth(1), "action").click()
    event = await wait_event(shop.events, postback("SIZE_L"))
    assert event["payload"]["user"]["id"]
    # Neither tap is a message of the conversation.
    assert [m.content.actual_instance.type for m in await shop.history()] == ["text", "carousel", "list"]


async def test_a_form_is_answered_in_the_widget(page: Page, shop: Shop) -> None:
    shop.conversation_id = await start_chat(page, shop.events, "I'd like a call back")
    form_id = await shop.post({"type": "form", "blockChatInput": True, "fields": [
        {"type": "text", "name": "name", "label": "Your name", "placeholder": "Ada", "minSize": 2, "maxSize": 40},
        {"type": "email", "name": "email", "label": "E-mail"},
        {"type": "select", "name": "slot", "label": "When", "options": [
            {"name": "am", "label": "Morning"}, {"name": "pm", "label": "Afternoon"}]},
    ]})
    form = hook(page, "form")
    await expect(form).to_have_attribute("data-state", "open")
    await expect(hook(form, "form-field")).to_have_count(3)
    # While the form waits for its answer, the composer does too (blockChatInput).
    await expect(hook(page, "input")).to_be_disabled()
    # Incomplete or malformed: the form says what is wrong and sends nothing.
    await form.get_by_label("Your name").fill("A")
    await hook(form, "form-submit").click()
    await expect(hook(form, "form-error")).to_be_visible()
    await form.get_by_label("Your name").fill("Ada Lovelace")
    await form.get_by_label("E-mail").fill("not an address")
    await hook(form, "form-submit").click()
    await expect(hook(form, "form-error")).to_contain_text("e-mail")
    await form.get_by_label("E-mail").fill("ada@example.com")
    await form.get_by_label("When").select_option(label="Afternoon")
    await expect(messages(page, "user")).to_have_count(1)
    await hook(form, "form-submit").click()

    answer = messages(page, "user").last
    await expect(answer).to_have_attribute("data-status", "confirmed")
    await expect(answer.locator(".tl-bubble")).to_have_text(ANSWER_TEXT)
    await expect(form).to_have_attribute("data-state", "submitted")
    await expect(form.get_by_label("Your name")).to_be_disabled()
    await expect(form.get_by_label("Your name")).to_have_value("Ada Lovelace")
    await expect(hook(page, "input")).to_be_enabled()

    event = await wait_event(shop.events, lambda e: e["type"] == "conversation:message"
                             and e["payload"]["message"]["content"]["type"] == "formResponse")
    content = event["payload"]["message"]["content"]
    assert content["textFallback"] == ANSWER_TEXT
    # The official client parses the answer from the history.
    last = (await shop.history())[-1]
    response = last.content.actual_instance
    assert isinstance(response, sunco.FormResponseMessage)
    assert [(f.type, f.name, f.text, f.email, f.select, f.quoted_message_id) for f in response.fields] == [
        ("text", "name", "Ada Lovelace", None, None, form_id),
        ("email", "email", None, "ada@example.com", None, form_id),
        ("select", "slot", None, None, [{"name": "pm", "label": "Afternoon"}], form_id)]
    assert response.text_fallback == content["textFallback"]

    # After a reload the form shows as answered, from the history.
    await page.reload()
    await hook(page, "launcher").click()
    await expect(hook(page, "form")).to_have_attribute("data-state", "submitted")
    await expect(hook(page, "form").get_by_label("E-mail")).to_have_value("ada@example.com")
    await expect(hook(page, "form").get_by_label("When")).to_have_value("1")
    await expect(hook(page, "input")).to_be_enabled()


async def test_sharing_a_location(page: Page, shop: Shop) -> None:
    shop.conversation_id = await start_chat(page, shop.events, "Can you deliver to me?")
    await shop.post({"type": "text", "text": "Where should we deliver?",
                     "actions": [{"type": "locationRequest", "text": "Send my location"}]})
    share = hook(hook(page, "quick-replies"), "quick-reply")
    await expect(share).to_have_text("Send my location")
    await expect(share).to_have_attribute("data-action", "locationRequest")

    # Refused first (the browser says no): the widget says so, the input stays usable, the button stays.
    await page.evaluate("""() => { navigator.geolocation.getCurrentPosition =
        (ok, fail) => fail({code: 1, message: "User denied Geolocation"}); }""")
    await share.click()
    await expect(hook(page, "location-error")).to_contain_text("type your address")
    await expect(hook(page, "input")).to_be_enabled()
    await expect(share).to_be_enabled()
    await expect(messages(page, "user")).to_have_count(1)

    # Allowed: the browser's position becomes a location message.
    await page.evaluate("() => { delete navigator.geolocation.getCurrentPosition; }")
    await share.click()
    shared = messages(page, "user").last
    await expect(shared).to_have_attribute("data-type", "location")
    await expect(shared).to_have_attribute("data-status", "confirmed")
    await expect(shared.locator(".tl-bubble")).to_contain_text("48.8584, 2.2945")
    await expect(hook(page, "quick-replies")).to_have_count(0)
    event = await wait_event(shop.events, lambda e: e["type"] == "conversation:message"
                             and e["payload"]["message"]["content"]["type"] == "location")
    assert event["payload"]["message"]["content"]["coordinates"] == {"lat": EIFFEL["latitude"],
                                                                      "long": EIFFEL["longitude"]}
    location = (await shop.history())[-1].content.actual_instance
    assert isinstance(location, sunco.LocationMessage)
    assert (location.coordinates.lat, location.coordinates.long) == (48.8584, 2.2945)


async def test_the_sdk_refuses_malformed_rich_answers(shop: Shop) -> None:
    """The web service checks the shape of what a widget (or anyone with its session) posts."""
    async with aiohttp.ClientSession() as http:
        sdk = f"{shop.base_url}/sdk/v1/apps/{shop.app_id}"
        async with http.post(f"{sdk}/integrations/{shop.web_integration_id}/sessions") as resp:
            pending = await resp.json()
        auth = {"Authorization": f"Bearer {pending['sessionToken']}"}
        async with http.post(f"{sdk}/conversations", headers=auth,
                             json={"clientMessageId": "first-message-0001", "text": "hi"}) as resp:
            assert resp.status == 201, await resp.text()
            session = await resp.json()
        auth = {"Authorization": f"Bearer {session['sessionToken']}"}
        url = f"{sdk}/conversations/{session['conversationId']}/messages"
        for body, why in (
                ({"text": "here", "location": {"lat": 1, "long": 2}}, "not text and location"),
                ({"location": {"lat": 91, "long": 2}}, "location.lat"),
                ({"text": "Yes", "payload": "x" * 1001}, "payload"),
                ({"formResponse": {"quotedMessageId": "abc", "fields": []}}, "fields"),
                ({"formResponse": {"quotedMessageId": "abc", "fields": [
                    {"type": "select", "name": "a", "label": "A", "select": []}]}}, "exactly one option")):
            async with http.post(url, headers=auth, json={"clientMessageId": "bad-message-0001", **body}) as resp:
                assert resp.status == 400, body
                assert why in (await resp.json())["errors"][0]["title"]
