"""The widget in headless Chromium against the whole stack (identity, conversations, webhooks, web).

The business side is what a real integrator runs: a webhook receiver (a loopback aiohttp
server registered as a custom integration's webhook) and the official
`sunshine_conversations_client` for replies, typing and read.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sunco
from aiohttp import web
from playwright.async_api import Browser, Page, expect

from shared.sdk import SessionClaims
from shared.sdk_service import SdkSettings, issue_tokens
from tests.harness import SDK_TOKEN_SECRET
from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web

TIMEOUT_MS = 8000

pytestmark = pytest.mark.e2e


@dataclass
class Business:
    """The integrator: receives webhooks, answers with the official client."""

    app_id: str
    web_integration_id: str
    key_id: str
    key_secret: str
    base_url: str
    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def client(self) -> sunco.ApiClient:
        config = sunco.Configuration(host=self.base_url, username=self.key_id, password=self.key_secret)
        return sunco.ApiClient(config)

    async def reply(self, conversation_id: str, text: str, display_name: str | None = None,
                    content: dict[str, Any] | None = None) -> str:
        author: dict[str, Any] = {"type": "business"}
        if display_name is not None:
            author["displayName"] = display_name
        post = sunco.MessagePost.from_dict({"author": author,
                                            "content": content or {"type": "text", "text": text}})

        def call() -> str:
            with self.client() as api_client:
                response = sunco.MessagesApi(api_client).post_message(self.app_id, conversation_id, post)
                return str(response.messages[0].id)

        # The official client is synchronous; the services run on this event loop.
        return await asyncio.to_thread(call)

    async def activity(self, conversation_id: str, kind: str) -> None:
        post = sunco.ActivityPost.from_dict({"author": {"type": "business"}, "type": kind})

        def call() -> None:
            with self.client() as api_client:
                sunco.ActivitiesApi(api_client).post_activity(self.app_id, conversation_id, post)

        await asyncio.to_thread(call)

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


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def business(system: Any) -> AsyncIterator[Business]:
    await system.start("identity", "conversations", "webhooks", "web")
    receiver = web.Application()
    holder: dict[str, Business] = {}

    async def on_webhook(request: web.Request) -> web.Response:
        body = await request.json()
        holder["b"].events.extend(body["events"])
        holder["b"].arrived.set()
        return web.Response(status=200)

    receiver.router.add_post("/hook", on_webhook)
    runner, port = await serve(receiver)
    try:
        async with aiohttp.ClientSession() as http:
            app_id, web_id = await create_app_with_web(http, system.base_url)
            async with http.post(f"{system.base_url}/v2/apps/{app_id}/integrations", headers=ACCOUNT, json={
                "type": "custom", "displayName": "Helpdesk",
                "webhooks": [{"target": f"http://127.0.0.1:{port}/hook",
                              "triggers": ["conversation:message", "conversation:read", "conversation:typing"]}],
            }) as resp:
                assert resp.status == 201, await resp.text()
            async with http.post(f"{system.base_url}/v2/apps/{app_id}/keys", headers=ACCOUNT,
                                 json={"displayName": "helpdesk"}) as resp:
                assert resp.status == 201, await resp.text()
                key = (await resp.json())["key"]
        holder["b"] = Business(app_id=app_id, web_integration_id=web_id, key_id=key["id"], key_secret=key["secret"],
                               base_url=system.base_url)
        yield holder["b"]
    finally:
        await runner.cleanup()


@pytest.fixture
async def page_url(system: Any, business: Business) -> AsyncIterator[str]:
    """A page of the business's own site (another origin) embedding the widget with one script tag."""
    html = f"""<!doctype html><html><head><title>Shop</title></head><body><h1>Shop</h1>
<script src="{system.base_url}/widget/threadline.js"></script>
<script>Threadline.init({json.dumps({"appId": business.app_id, "integrationId": business.web_integration_id,
                                     "baseUrl": system.base_url})});</script>
</body></html>"""
    site = web.Application()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    site.router.add_get("/", index)
    runner, port = await serve(site)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()



@pytest.fixture
async def page(browser: Browser, page_url: str) -> AsyncIterator[Page]:
    context = await browser.new_context()
    tab = await context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    await tab.goto(page_url)
    try:
        yield tab
    finally:
        await context.close()


def hook(page: Page, name: str) -> Any:
    return page.locator(f'[data-threadline="{name}"]')


async def open_and_send(page: Page, business: Business, text: str) -> str:
    """Open the widget, send `text`, wait for the business webhook; the conversation id."""
    await hook(page, "launcher").click()
    await expect(hook(page, "panel")).to_be_visible()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    await hook(page, "input").fill(text)
    await hook(page, "send").click()
    await expect(page.locator('[data-threadline="message"][data-author="user"]')).to_have_attribute(
        "data-status", "confirmed")
    event = await business.wait_event(lambda e: e["type"] == "conversation:message"
                                      and e["payload"]["message"]["content"].get("text") == text)
    message = event["payload"]["message"]
    assert message["author"]["type"] == "user"
    assert message["source"]["type"] == "web"
    return str(event["payload"]["conversation"]["id"])


async def test_customer_message_reaches_the_business_and_the_reply_comes_back(page: Page, business: Business) -> None:
    conversation_id = await open_and_send(page, business, "Hello from the widget")
    user_message = page.locator('[data-threadline="message"][data-author="user"]')
    client_message_id = await user_message.get_attribute("data-client-message-id")
    event = await business.wait_event(lambda e: e["type"] == "conversation:message")
    assert event["payload"]["message"]["source"]["originalMessageId"] == client_message_id

    await business.reply(conversation_id, "Hi! How can we help?", display_name="Sam from Support")
    replies = page.locator('[data-threadline="message"][data-author="business"]')
    await expect(replies).to_have_text(["Hi! How can we help?"])
    # Under each message: the business author's name and the time; the message text stays the content.
    await expect(replies.locator('[data-threadline="meta"]')).to_have_attribute(
        "data-label", re.compile(r"^Sam from Support \u00b7 .*\d{1,2}:\d{2}"))
    await expect(user_message.locator('[data-threadline="meta"]')).to_have_attribute(
        "data-label", re.compile(r"^[^\u00b7]*\d{1,2}:\d{2}"))

    # Reload: the session is in localStorage, history comes back in order.
    await page.reload()
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    await expect(hook(page, "message")).to_have_text(["Hello from the widget", "Hi! How can we help?"])
    await expect(page.locator('[data-threadline="message"][data-author="user"]')).to_have_attribute(
        "data-status", "confirmed")


async def test_typing_and_read_both_ways(page: Page, business: Business) -> None:
    conversation_id = await open_and_send(page, business, "Is anyone there?")
    # Customer typing → the business gets conversation:typing.
    await hook(page, "input").press_sequentially("Still h")
    typing = await business.wait_event(lambda e: e["type"] == "conversation:typing")
    assert typing["payload"]["activity"]["type"] == "typing:start"
    assert typing["payload"]["activity"]["author"]["type"] == "user"
    # Business typing → "typing…" in the widget, gone when the reply lands.
    await business.activity(conversation_id, "typing:start")
    await expect(hook(page, "typing")).to_be_visible()
    await business.reply(conversation_id, "Yes, here!")
    await expect(page.locator('[data-threadline="message"][data-author="business"]')).to_have_text(["Yes, here!"])
    await expect(hook(page, "typing")).to_be_hidden()
    # The panel is open and visible: the widget reports the reply as read.
    read = await business.wait_event(lambda e: e["type"] == "conversation:read")
    assert read["payload"]["activity"]["author"]["type"] == "user"
    # Business reads → "Seen" under the customer's last message.
    await expect(hook(page, "seen")).to_have_count(0)
    await business.activity(conversation_id, "conversation:read")
    await expect(hook(page, "seen")).to_be_visible()
    last_user = page.locator('[data-threadline="message"][data-author="user"]').last
    seen_follows = await last_user.evaluate(
        "node => node.nextElementSibling && node.nextElementSibling.dataset.threadline === 'seen'")
    assert seen_follows
    # A new customer message is not seen yet.
    await hook(page, "input").fill("One more thing")
    await hook(page, "send").click()
    await expect(page.locator('[data-threadline="message"][data-author="user"]').last).to_have_attribute(
        "data-status", "confirmed")
    await expect(hook(page, "seen")).to_have_count(0)


async def test_widget_reconnects_after_a_web_restart_and_shows_the_missed_message_once(
        system: Any, page: Page, business: Business) -> None:
    conversation_id = await open_and_send(page, business, "Before the restart")
    await business.reply(conversation_id, "First reply")
    business_messages = page.locator('[data-threadline="message"][data-author="business"]')
    await expect(business_messages).to_have_text(["First reply"])

    await system.stop_service("web")
    await expect(hook(page, "status")).to_have_attribute("data-state", "reconnecting")
    await business.reply(conversation_id, "Sent while you were away")
    # The customer writes while the service is down: the POST fails and is retried.
    await hook(page, "input").fill("Typed while offline")
    await hook(page, "send").click()
    offline = page.locator('[data-threadline="message"][data-author="user"]').last
    await expect(offline).to_have_attribute("data-status", "pending")
    await system.start("web")

    await expect(business_messages).to_have_text(["First reply", "Sent while you were away"])
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    await expect(offline).to_have_attribute("data-status", "confirmed")
    await business.wait_event(lambda e: e["type"] == "conversation:message"
                              and e["payload"]["message"]["content"].get("text") == "Typed while offline")
    # Live again on the new process, still without duplicates.
    await business.reply(conversation_id, "After the restart")
    await expect(business_messages).to_have_text(["First reply", "Sent while you were away", "After the restart"])
    cursors = await hook(page, "message").evaluate_all("nodes => nodes.map(n => Number(n.dataset.cursor))")
    assert cursors == sorted(set(cursors))
    await expect(page.locator('[data-threadline="message"][data-author="user"]')).to_have_text(
        ["Before the restart", "Typed while offline"])
    offline_events = [e for e in business.events if e["type"] == "conversation:message"
                      and e["payload"]["message"]["content"].get("text") == "Typed while offline"]
    assert len(offline_events) == 1


async def test_an_image_that_fails_to_load_shows_a_placeholder(page: Page, business: Business) -> None:
    conversation_id = await open_and_send(page, business, "Can I see a picture?")
    missing = f"{business.base_url}/widget/no-such-picture.png"
    await business.reply(conversation_id, "", content={"type": "image", "mediaUrl": missing, "altText": "Our beans"})
    reply = page.locator('[data-threadline="message"][data-author="business"]')
    await expect(reply.locator('[data-threadline="image-missing"]')).to_be_visible()
    await expect(reply.locator("img")).to_have_count(0)
    await expect(reply.locator('[data-threadline="image-missing"]')).to_have_attribute("aria-label", "Our beans")


async def users_of(system: Any, app_id: str) -> int:
    """Users identity holds for the app (white-box: its own database)."""
    return int(await system.service("identity").store.db.fetchval("SELECT COUNT(*) FROM users WHERE app_id = $1",
                                                                   app_id))


async def test_opening_the_widget_creates_nobody_until_the_first_message(system: Any, page: Page,
                                                                         business: Business) -> None:
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "/sdk/v1/" in request.url else None)
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    await hook(page, "input").fill("Just looking")  # typing is not a message either
    await hook(page, "close").click()
    await page.reload()
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    assert await users_of(system, business.app_id) == 0
    assert not [url for url in asked if "/sessions" in url or "/conversations" in url]
    assert await page.evaluate("key => localStorage.getItem(key)",
                               f"threadline:{business.app_id}:{business.web_integration_id}") is None
    # The first message creates the visitor, and the conversation the business sees.
    await hook(page, "close").click()
    await open_and_send(page, business, "Now a question")
    assert await users_of(system, business.app_id) == 1


async def test_the_widget_renews_an_expired_session_and_keeps_the_conversation(system: Any, page: Page,
                                                                               business: Business) -> None:
    conversation_id = await open_and_send(page, business, "Before the token expired")
    await business.reply(conversation_id, "Noted")
    await expect(page.locator('[data-threadline="message"][data-author="business"]')).to_have_text(["Noted"])
    key = f"threadline:{business.app_id}:{business.web_integration_id}"
    state = await page.evaluate("key => JSON.parse(localStorage.getItem(key))", key)
    session = state["session"]
    claims = SessionClaims.from_token(SDK_TOKEN_SECRET, session["sessionToken"])
    assert claims is not None
    settings = SdkSettings(token_secret=SDK_TOKEN_SECRET, ping_interval=20, socket_queue_size=256, request_timeout=5)
    # Tokens issued 25 hours ago: the session token has expired, the refresh token has not.
    old = issue_tokens(settings, claims, time.time() - 25 * 3600)
    for expires_at, what in ((old.expires_at, "known to be expired"),
                             ("2999-01-01T00:00:00.000Z", "expired by the service's clock only")):
        state["session"] = {**session, "sessionToken": old.session_token, "refreshToken": old.refresh_token,
                            "expiresAt": expires_at}
        await page.evaluate("([key, value]) => localStorage.setItem(key, JSON.stringify(value))", [key, state])
        await page.reload()
        await hook(page, "launcher").click()
        await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
        await expect(hook(page, "message")).to_have_text(["Before the token expired", "Noted"])
        renewed = (await page.evaluate("key => JSON.parse(localStorage.getItem(key))", key))["session"]
        assert renewed["sessionToken"] != old.session_token, what
        assert (renewed["appUserId"], renewed["conversationId"]) == (session["appUserId"], conversation_id), what
    await hook(page, "input").fill("Still me")
    await hook(page, "send").click()
    await expect(page.locator('[data-threadline="message"][data-author="user"]').last).to_have_attribute(
        "data-status", "confirmed")
    assert await users_of(system, business.app_id) == 1
