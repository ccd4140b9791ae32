"""The sandbox page's App phone in headless Chromium against the whole stack (identity,
conversations, webhooks, app, sandbox): a simulated Android app of the business that talks
the in-app SDK protocol, gets its device token from the sandbox's fake FCM, and shows the
business's replies over its socket while open and as push notifications while closed.

The business side is a webhook receiver (a custom integration) and the business REST API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from shared.http import basic_auth_header
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, CHROMIUM, CHROMIUM_ARGS, System
from threadline.bootstrap import AccountKey, bootstrap_sandbox

TIMEOUT_MS = 8000
# A real 1×1 PNG (the phone must be able to show it) and a small PDF, sent from the app.
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                         "AAAABJRU5ErkJggg==")
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
# A short push grace period: a reply no socket got is pushed 0.3 s later.
APP_ENV = {"THREADLINE_APP_PUSH_GRACE_SECONDS": "0.3", "THREADLINE_APP_RETRY_BASE_SECONDS": "0.1",
           "THREADLINE_APP_RETRY_MAX_SECONDS": "0.3"}

pytestmark = pytest.mark.e2e


@dataclass
class Business:
    """The integrator: the sandbox app's key, a webhook receiver and the REST API."""

    base_url: str
    app_id: str
    android_id: str
    auth: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession(headers=self.auth) as http, \
                http.request(method, f"{self.base_url}/v2/apps/{self.app_id}{path}", json=body) as resp:
            assert resp.status in (200, 201), await resp.text()
            data: dict[str, Any] = await resp.json()
        return data

    async def reply(self, conversation_id: str, text: str) -> str:
        return await self.send(conversation_id, {"type": "text", "text": text})

    async def send(self, conversation_id: str, content: dict[str, Any]) -> str:
        """Post `content` as the business; the message's id."""
        sent = await self.api("POST", f"/conversations/{conversation_id}/messages", {
            "author": {"type": "business", "displayName": "Support"}, "content": content})
        return str(sent["messages"][0]["id"])

    async def history(self, conversation_id: str) -> list[dict[str, Any]]:
        page = await self.api("GET", f"/conversations/{conversation_id}/messages")
        messages: list[dict[str, Any]] = page["messages"]
        return messages

    async def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float = 8.0) -> dict[str, Any]:
        """The first webhook event (old or new) for which `match` holds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for event in self.events:
                if match(event):
                    return event
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no matching webhook event; got {[e['type'] for e in self.events]}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass


async def eventually(check: Callable[[], Any], timeout: float = 8.0) -> Any:
    """Poll an async check until it returns a truthy value (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@pytest.fixture
async def business(system: System) -> AsyncIterator[Business]:
    """The stack with the app channel, the sandbox app bootstrapped as `threadline up` does it."""
    await system.start("identity", "conversations", "webhooks", "app", "sandbox", env=APP_ENV)
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("android",))
    receiver = web.Application()
    holder: dict[str, Business] = {}

    async def on_webhook(request: web.Request) -> web.Response:
        holder["b"].events.extend((await request.json())["events"])
        holder["b"].arrived.set()
        return web.Response(status=200)

    receiver.router.add_post("/hook", on_webhook)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        holder["b"] = Business(base_url=system.base_url, app_id=info["appId"],
                               android_id=info["integrations"]["android"]["id"],
                               auth=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]))
        await holder["b"].api("POST", "/integrations", {
            "type": "custom", "displayName": "Helpdesk",
            "webhooks": [{"target": f"http://127.0.0.1:{port}/hook",
                          "triggers": ["conversation:message", "conversation:read", "conversation:postback"]}]})
        yield holder["b"]
    finally:
        await runner.cleanup()


@pytest.fixture
async def page(system: System, business: Business) -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        browser: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            tab = await context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            await tab.goto(f"{system.base_url}/sandbox/?channel=app")
            yield tab
        finally:
            await browser.close()


async def installed(page: Page, business: Business) -> dict[str, Any]:
    """What the simulated app keeps in localStorage (its device token and SDK session)."""
    raw = await page.evaluate("key => localStorage.getItem(key)",
                              f"sandbox.phone.app:{business.app_id}:{business.android_id}")
    stored: dict[str, Any] = json.loads(raw)
    return stored


async def pushes_to(business: Business, token: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{business.base_url}/sandbox/android/{business.android_id}/outbox", params={"to": token}) as resp:
        assert resp.status == 200, await resp.text()
        messages: list[dict[str, Any]] = (await resp.json())["messages"]
    return messages


async def send_from_app(page: Page, business: Business, text: str) -> str:
    """Type `text` in the open app; the conversation id the business got it in."""
    await expect(page.locator("#phone-app-state")).to_have_text(re.compile("online"))
    await page.locator("#phone-text").fill(text)
    await page.locator("#phone-text").press("Enter")
    await expect(page.locator("#phone-thread li.in").last).to_contain_text(text)
    event = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                      and e["payload"]["message"]["content"].get("text") == text)
    message = event["payload"]["message"]
    assert message["author"]["type"] == "user"
    assert message["source"]["type"] == "android"
    assert message["source"]["integrationId"] == business.android_id
    conversation_id = str(event["payload"]["conversation"]["id"])
    # The business may hear of the message before the app has read the answer to its POST (which
    # brings the session's conversation on a first message): wait for the app to keep it.
    await page.wait_for_function(
        "([key, id]) => ((JSON.parse(localStorage.getItem(key) || '{}').session || {}).conversationId) === id",
        arg=[f"sandbox.phone.app:{business.app_id}:{business.android_id}", conversation_id])
    return conversation_id


async def test_the_app_chats_live_and_shows_a_push_while_closed(page: Page, business: Business) -> None:
    await expect(page.locator("#tab-app")).to_have_attribute("aria-selected", "true")
    await expect(page.locator("#phone-title")).to_have_text("Threadline Demo Shop")
    conversation_id = await send_from_app(page, business, "Is my order ready?")
    stored = await installed(page, business)
    assert stored["session"]["conversationId"] == conversation_id
    # The customer's message is stored in the conversation the business reads through the API.
    history = await business.api("GET", f"/conversations/{conversation_id}/messages")
    assert [m["content"]["text"] for m in history["messages"]] == ["Is my order ready?"]
    # The install registered its device (with the fake FCM's token) under the user's sdk client.
    devices = (await business.api("GET", f"/users/{stored['session']['appUserId']}/devices"))["devices"]
    assert [(d["guid"], d["pushNotificationToken"], d["status"]) for d in devices] == [
        (stored["guid"], stored["token"], "active")]

    # The app is open: the business's typing and read show, the reply arrives over its socket,
    # and the app marks it read.
    await business.api("POST", f"/conversations/{conversation_id}/activity",
                       {"author": {"type": "business"}, "type": "typing:start"})
    await expect(page.locator("#phone-business")).to_have_text("typing…")
    await business.api("POST", f"/conversations/{conversation_id}/activity",
                       {"author": {"type": "business"}, "type": "conversation:read"})
    await expect(page.locator("#phone-thread li.in .meta.read")).to_have_count(1)
    await business.reply(conversation_id, "It ships today.")
    await expect(page.locator("#phone-thread li.out").last).to_contain_text("It ships today.")
    await expect(page.locator("#phone-business")).not_to_have_text("typing…")
    await business.wait_event(lambda e: e["type"] == "conversation:read"
                              and e["payload"]["conversation"]["id"] == conversation_id)

    # Closed: the socket is gone, so the next reply is pushed and shows on the lock screen.
    await page.get_by_role("button", name="Close app").click()
    lock = page.locator("#phone-lock")
    await expect(lock).to_be_visible()
    await expect(page.locator("#phone-app-toggle")).to_have_text("Open app")
    await business.reply(conversation_id, "Your beans are on their way.")
    note = page.locator("#phone-notifications .lock-note")
    await expect(note).to_have_count(1)
    await expect(note).to_contain_text("Your beans are on their way.")
    await expect(note.locator(".note-title")).to_have_text("Threadline Demo Shop")
    assert "Your beans are on their way." not in await page.locator("#phone-thread").inner_text()

    # Tapping the notification opens the app: the socket resumes from its cursor with the message.
    await note.click()
    await expect(lock).to_be_hidden()
    await expect(page.locator("#phone-thread li.out").last).to_contain_text("Your beans are on their way.")
    await expect(page.locator("#phone-thread li.out")).to_have_count(2)
    # One push only: the reply the open app got over its socket was never pushed.
    pushed = await pushes_to(business, stored["token"])
    assert [p["message"]["notification"]["body"] for p in pushed] == ["Your beans are on their way."]
    assert pushed[0]["message"]["data"]["conversationId"] == conversation_id


async def test_uninstalling_the_app_drops_its_push_token(page: Page, business: Business, system: System) -> None:
    conversation_id = await send_from_app(page, business, "Hello from the app")
    stored = await installed(page, business)
    user_id = stored["session"]["appUserId"]
    await page.get_by_role("button", name="Uninstall").click()
    await expect(page.locator("#phone-lock")).to_be_visible()
    await expect(page.locator("#phone-lock-empty")).to_contain_text("not installed")
    await expect(page.locator("#phone-app-toggle")).to_be_disabled()
    app_service = system.service("app")

    async def socket_gone() -> bool:
        # The app closed its socket; until the server has seen the close, a reply would still be
        # written into it (and count as delivered there) rather than pushed.
        return not app_service.sockets

    await eventually(socket_gone)

    # The next reply is pushed to a revoked token: FCM says UNREGISTERED and the token is dropped.
    await business.reply(conversation_id, "Are you still there?")

    async def token_dropped() -> bool:
        devices = (await business.api("GET", f"/users/{user_id}/devices"))["devices"]
        return bool(devices) and devices[0].get("pushNotificationToken") is None \
            and devices[0]["status"] == "inactive"

    await eventually(token_dropped)
    assert await pushes_to(business, stored["token"]) == []
    await expect(page.locator("#phone-notifications .lock-note")).to_have_count(0)

    # Installing again is a new install: a new device token and a new session, which creates a new
    # (anonymous) user with its first message only.
    await page.get_by_role("button", name="Install app").click()
    await expect(page.locator("#phone-lock")).to_be_hidden()
    await expect(page.locator("#phone-app-state")).to_have_text(re.compile("online"))
    again = await installed(page, business)
    assert again["token"] != stored["token"]
    assert again["session"]["sessionToken"] != stored["session"]["sessionToken"]
    assert again["session"].get("appUserId") is None
    await expect(page.locator("#phone-thread li")).to_have_count(0)
    await send_from_app(page, business, "Back again")
    again = await installed(page, business)
    assert again["session"]["appUserId"] not in (None, user_id)
    devices = (await business.api("GET", f"/users/{again['session']['appUserId']}/devices"))["devices"]
    assert [d["pushNotificationToken"] for d in devices] == [again["token"]]


async def test_the_app_shows_what_the_business_sends_and_answers_like_the_widget(
        page: Page, business: Business) -> None:
    conversation_id = await send_from_app(page, business, "Can you help me choose?")
    thread = page.locator("#phone-thread")
    chips = page.locator("#phone-quick button")

    # A text with reply buttons (chips under it), a postback button and a link (in the bubble).
    await business.send(conversation_id, {"type": "text", "text": "Espresso or filter?", "actions": [
        {"type": "reply", "text": "Espresso", "payload": "pick-espresso"},
        {"type": "reply", "text": "Filter", "payload": "pick-filter"},
        {"type": "postback", "text": "Talk to a barista", "payload": "handoff-barista"},
        {"type": "link", "text": "Our menu", "uri": "https://shop.example/menu"}]})
    offer = thread.locator("li.out").last
    await expect(offer).to_contain_text("Espresso or filter?")
    await expect(chips).to_have_text(["Espresso", "Filter"])
    await expect(offer.get_by_role("link", name="Our menu")).to_have_attribute("href", "https://shop.example/menu")

    # A postback tap: the business hears of it, the history keeps nothing, the button says it went.
    await offer.get_by_role("button", name="Talk to a barista").click()
    tapped = await business.wait_event(lambda e: e["type"] == "conversation:postback")
    assert tapped["payload"]["postback"]["payload"] == "handoff-barista"
    assert tapped["payload"]["conversation"]["id"] == conversation_id
    await expect(offer.get_by_role("button", name="Talk to a barista")).to_have_attribute("data-state", "sent")
    await expect(thread.locator("li.in")).to_have_count(1)
    assert [m["content"].get("text") for m in await business.history(conversation_id)] == [
        "Can you help me choose?", "Espresso or filter?"]

    # A reply tap: the label as the customer's message, with the button's payload.
    await chips.filter(has_text="Espresso").click()
    await expect(thread.locator("li.in").last).to_contain_text("Espresso")
    await expect(chips).to_have_count(0)
    answer = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                       and e["payload"]["message"]["content"].get("payload") == "pick-espresso")
    assert answer["payload"]["message"]["content"]["text"] == "Espresso"
    stored = (await business.history(conversation_id))[-1]
    assert stored["author"]["type"] == "user"
    assert (stored["content"]["text"], stored["content"]["payload"]) == ("Espresso", "pick-espresso")

    # A carousel: cards in a row that scrolls sideways, each with its buttons.
    await business.send(conversation_id, {"type": "carousel", "items": [
        {"title": "Ethiopia Yirgacheffe", "description": "Floral, bright",
         "actions": [{"type": "postback", "text": "Add Ethiopia", "payload": "add-ethiopia"},
                     {"type": "link", "text": "Details", "uri": "https://shop.example/ethiopia"}]},
        {"title": "Colombia Huila", "description": "Chocolate, round",
         "actions": [{"type": "postback", "text": "Add Colombia", "payload": "add-colombia"}]},
        {"title": "Kenya AA", "description": "Blackcurrant",
         "actions": [{"type": "buy", "text": "Buy", "amount": 1250, "currency": "eur",
                      "uri": "https://shop.example/pay/kenya"}]}]})
    cards = thread.locator("li.out").last.locator(".app-cards .app-card")
    await expect(cards).to_have_count(3)
    await expect(cards.locator(".card-title")).to_have_text(["Ethiopia Yirgacheffe", "Colombia Huila", "Kenya AA"])
    await expect(cards.nth(2).get_by_role("link")).to_have_attribute("href", "https://shop.example/pay/kenya")
    row = thread.locator("li.out").last.locator(".app-cards")
    assert await row.evaluate("r => getComputedStyle(r).overflowX === 'auto' && r.scrollWidth > r.clientWidth")
    boxes = [await cards.nth(i).bounding_box() for i in range(2)]
    assert boxes[0] and boxes[1] and boxes[1]["x"] > boxes[0]["x"] and abs(boxes[1]["y"] - boxes[0]["y"]) < 1
    await cards.nth(1).get_by_role("button", name="Add Colombia").click()
    added = await business.wait_event(lambda e: e["type"] == "conversation:postback"
                                      and e["payload"]["postback"]["payload"] == "add-colombia")
    assert added["payload"]["conversation"]["id"] == conversation_id
    await expect(cards.nth(1).get_by_role("button", name="Add Colombia")).to_have_attribute("data-state", "sent")

    # A list: its items one under the other with their buttons, then its own buttons.
    await business.send(conversation_id, {"type": "list", "items": [
        {"title": "Brewing guide", "description": "Pour-over in five steps",
         "actions": [{"type": "webview", "text": "Read", "uri": "https://shop.example/guide",
                      "fallback": "https://shop.example/guide"}]},
        {"title": "Grinder", "description": "Burr, 40 settings",
         "actions": [{"type": "buy", "text": "Buy", "amount": 8900, "currency": "usd"}]}],
        "actions": [{"type": "postback", "text": "More like these", "payload": "more"}]})
    listed = thread.locator("li.out").last
    await expect(listed.locator(".app-list-item .card-title")).to_have_text(["Brewing guide", "Grinder"])
    await expect(listed.get_by_role("link", name="Read")).to_have_attribute("href", "https://shop.example/guide")
    # A buy button without a payment page shows the offer and opens nothing.
    await expect(listed.locator("[data-action=buy]")).to_have_text(re.compile(r"^Buy \(.*89\.00.*\)$"))
    await expect(listed.locator("a[data-action=buy]")).to_have_count(0)
    await expect(listed.get_by_role("button", name="More like these")).to_be_visible()

    # A location request: a chip that shares the phone's (sample) place.
    await business.send(conversation_id, {"type": "text", "text": "Where should we deliver?",
                                          "actions": [{"type": "locationRequest", "text": "Send my location"}]})
    await expect(chips).to_have_text(["📍 Send my location"])
    await chips.click()
    await expect(thread.locator("li.in").last).to_contain_text("Champ de Mars, Paris")
    shared = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                       and e["payload"]["message"]["content"]["type"] == "location")
    assert shared["payload"]["message"]["content"]["coordinates"] == {"lat": 48.8584, "long": 2.2945}

    # A form: answered inline, checked before it is sent, then shown submitted.
    form_id = await business.send(conversation_id, {"type": "form", "blockChatInput": True, "fields": [
        {"type": "text", "name": "name", "label": "Your name", "placeholder": "Ada"},
        {"type": "email", "name": "email", "label": "E-mail"},
        {"type": "select", "name": "grind", "label": "Grind",
         "options": [{"name": "whole", "label": "Whole bean"}, {"name": "fine", "label": "Fine"}]}]})
    form = thread.locator("li.out").last.locator("form.app-form")
    await expect(form).to_have_attribute("data-state", "open")
    await form.get_by_label("Your name").fill("Ada Lovelace")
    await form.get_by_label("E-mail").fill("not an address")
    await form.get_by_role("button", name="Submit").click()
    await expect(form.get_by_role("alert")).to_contain_text("E-mail")
    await form.get_by_label("E-mail").fill("ada@example.com")
    await form.get_by_label("Grind").select_option(label="Fine")
    await form.get_by_role("button", name="Submit").click()
    await expect(form).to_have_attribute("data-state", "submitted")
    await expect(form.get_by_label("Your name")).to_be_disabled()
    await expect(thread.locator("li.in").last).to_contain_text("Grind: Fine")
    event = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                      and e["payload"]["message"]["content"]["type"] == "formResponse")
    fields = event["payload"]["message"]["content"]["fields"]
    assert [(f["label"], f["type"]) for f in fields] == [
        ("Your name", "text"), ("E-mail", "email"), ("Grind", "select")]
    assert (fields[0]["text"], fields[1]["email"], fields[2]["select"]) == (
        "Ada Lovelace", "ada@example.com", [{"name": "fine", "label": "Fine"}])
    assert {f["quotedMessageId"] for f in fields} == {form_id}
    stored = (await business.history(conversation_id))[-1]
    assert stored["content"]["type"] == "formResponse"
    assert [f["label"] for f in stored["content"]["fields"]] == ["Your name", "E-mail", "Grind"]
    # The first (wrong) try was never sent: one answer, no postback or extra message on the way.
    assert [m["content"]["type"] for m in await business.history(conversation_id)].count("formResponse") == 1

    # Opened again, the app rebuilds the thread from its history: the form shows its answer.
    await page.reload()
    form = thread.locator("form.app-form")
    await expect(form).to_have_attribute("data-state", "submitted")
    await expect(form.get_by_label("Your name")).to_have_value("Ada Lovelace")
    await expect(form.get_by_label("Grind")).to_have_value("1")
    await expect(thread.locator("li.in").last).to_contain_text(
        "Your name: Ada Lovelace\nE-mail: ada@example.com\nGrind: Fine", use_inner_text=True)
    await expect(thread.locator("li.in").nth(1)).to_have_text(re.compile("^Espresso"))


async def test_a_message_that_did_not_get_through_is_retried_as_the_same_message(
        page: Page, business: Business) -> None:
    conversation_id = await send_from_app(page, business, "Hello")
    posted: list[dict[str, Any]] = []

    async def lose_first(route: Route) -> None:
        posted.append(route.request.post_data_json)
        if len(posted) == 1:
            await route.abort("connectionreset")  # the network drops the first attempt
        else:
            await route.continue_()

    await page.route(re.compile(r"/app/v1/apps/[^/]+/conversations/[^/]+/messages$"), lose_first)
    await business.send(conversation_id, {"type": "text", "text": "Milk?", "actions": [
        {"type": "reply", "text": "Oat milk", "payload": "milk-oat"}]})
    await page.locator("#phone-quick button").filter(has_text="Oat milk").click()
    bubble = page.locator("#phone-thread li.in").last
    await expect(bubble).to_contain_text("not sent")
    await bubble.get_by_role("button", name="Retry").click()
    await expect(bubble.locator(".meta")).to_have_text(re.compile("✓$"))
    await expect(bubble).not_to_contain_text("not sent")
    await business.wait_event(lambda e: e["type"] == "conversation:message"
                              and e["payload"]["message"]["content"].get("payload") == "milk-oat")
    assert len(posted) == 2 and posted[0] == posted[1]
    assert posted[0]["text"] == "Oat milk" and posted[0]["payload"] == "milk-oat"
    texts = [m["content"].get("text") for m in await business.history(conversation_id)]
    assert texts == ["Hello", "Milk?", "Oat milk"]


async def test_the_app_sends_a_photo_and_a_document(page: Page, business: Business) -> None:
    conversation_id = await send_from_app(page, business, "Here is my receipt")
    attach = page.get_by_role("button", name="Attach a photo or file")
    await expect(attach).to_be_visible()
    files = page.locator("#phone-file")
    # What the app refuses itself never leaves the phone.
    await files.set_input_files({"name": "page.html", "mimeType": "text/html", "buffer": b"<html></html>"})
    await expect(page.locator("#phone-error")).to_contain_text("“page.html” can’t be sent")

    # A photo: uploaded (its progress shown while it goes), then sent as an image message.
    held: asyncio.Queue[Route] = asyncio.Queue()
    await page.route(re.compile(r"/app/v1/apps/[^/]+/attachments$"), held.put)
    await files.set_input_files({"name": "receipt.png", "mimeType": "image/png", "buffer": PIXEL})
    uploading = page.locator("#phone-thread li.in").last
    await expect(uploading).to_contain_text("receipt.png")
    await expect(uploading.get_by_label("Uploading receipt.png")).to_be_visible()
    await (await asyncio.wait_for(held.get(), TIMEOUT_MS / 1000)).continue_()
    await page.unroute(re.compile(r"/app/v1/apps/[^/]+/attachments$"))
    event = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                      and e["payload"]["message"]["content"]["type"] == "image")
    content = event["payload"]["message"]["content"]
    assert event["payload"]["conversation"]["id"] == conversation_id
    assert event["payload"]["message"]["source"]["type"] == "android"
    url = content["mediaUrl"]
    assert url.startswith(f"{business.base_url}/attachments/v1/{business.app_id}/") and url.endswith("/receipt.png")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == PIXEL and resp.headers["Content-Type"] == "image/png"
    # Once stored, the app shows the picture from its URL, as it shows the business's.
    photo = page.locator("#phone-thread li.in").last.locator("img")
    await expect(photo).to_have_attribute("src", url)
    await expect(photo).to_have_js_property("complete", True)
    assert await photo.evaluate("img => img.naturalWidth") == 1

    # A document: a file message named after it.
    await files.set_input_files({"name": "order.pdf", "mimeType": "application/pdf", "buffer": PDF})
    event = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                      and e["payload"]["message"]["content"]["type"] == "file")
    document = event["payload"]["message"]["content"]
    assert (document["mediaType"], document["altText"]) == ("application/pdf", "order.pdf")
    link = page.locator("#phone-thread li.in").last.get_by_role("link")
    await expect(link).to_have_attribute("href", document["mediaUrl"])
    await expect(link).to_contain_text("order.pdf")
    await expect(page.locator("#phone-error")).to_be_hidden()
    history = await business.history(conversation_id)
    assert [(m["content"]["type"], m["content"].get("mediaUrl")) for m in history] == [
        ("text", None), ("image", url), ("file", document["mediaUrl"])]
