""""Continue on…" in headless Chromium, per channel: the web messenger on the sandbox page hands
its conversation to the page's simulated phone of WhatsApp, Messenger, Telegram or SMS.

The customer chats in the widget, opens "Continue on…", picks the channel and activates the link
the widget shows (its QR code shows too, on this desktop-sized page). The sandbox page hands the
deep link to its phone, which sends what the real platform sends for it: the prefilled message
(WhatsApp, SMS: the phone's composer is filled in, the customer presses send), a Messenger
`ref` (Get Started) or a Telegram `/start` payload. The business API then shows the same
conversation with the channel as its primary client, the phone shows the recap, the widget
shows that the conversation moved, and the business's next reply lands on the phone.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from shared.http import basic_auth_header
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, CHROMIUM, CHROMIUM_ARGS, System
from threadline.bootstrap import AccountKey, bootstrap_sandbox

TIMEOUT_MS = 8000
SERVICE = {"whatsapp": "whatsapp", "messenger": "messenger", "telegram": "telegram", "twilio": "sms"}
NAME = {"whatsapp": "WhatsApp", "messenger": "Messenger", "telegram": "Telegram", "twilio": "SMS"}
LINK = {"whatsapp": r"^https://wa\.me/\d+\?text=.*TL[0-9A-Z]{8}", "messenger": r"^https://m\.me/[^?]+\?ref=[\w-]+$",
        "telegram": r"^https://t\.me/\w+\?start=[\w-]+$", "twilio": r"^sms:\+\d+\?body=.*TL[0-9A-Z]{8}"}

pytestmark = pytest.mark.e2e


@dataclass
class Shop:
    channel: str
    base_url: str
    app_id: str
    web_id: str
    channel_id: str
    auth: dict[str, str]

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession(headers=self.auth) as http, \
                http.request(method, f"{self.base_url}/v2/apps/{self.app_id}{path}", json=body) as resp:
            assert resp.status in (200, 201), await resp.text()
            data: dict[str, Any] = await resp.json()
        return data

    async def reply(self, conversation_id: str, text: str) -> None:
        await self.api("POST", f"/conversations/{conversation_id}/messages", {
            "author": {"type": "business"}, "content": {"type": "text", "text": text}})


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 8.0) -> Any:
    """Poll an async check until it returns a truthy value (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@pytest.fixture(params=sorted(SERVICE))
async def shop(request: pytest.FixtureRequest, system: System) -> Shop:
    channel: str = request.param
    await system.start("identity", "conversations", "webhooks", "handoff", "web", SERVICE[channel], "sandbox")
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", channel))
    return Shop(channel, system.base_url, info["appId"], info["integrations"]["web"]["id"],
                info["integrations"][channel]["id"], basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]))


@asynccontextmanager
async def sandbox_page(base_url: str) -> AsyncIterator[Page]:
    """The sandbox page in headless Chromium, desktop-sized."""
    async with async_playwright() as pw:
        browser: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            tab = await context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            await tab.goto(f"{base_url}/sandbox/")
            yield tab
        finally:
            await browser.close()


@pytest.fixture
async def page(system: System, shop: Shop) -> AsyncIterator[Page]:
    async with sandbox_page(system.base_url) as tab:
        yield tab


async def widget_session(page: Page, shop: Shop) -> dict[str, Any]:
    raw = await page.evaluate("key => localStorage.getItem(key)", f"threadline:{shop.app_id}:{shop.web_id}")
    stored: dict[str, Any] = json.loads(raw)
    return dict(stored["session"])


async def test_the_widget_continues_on_the_channel(page: Page, shop: Shop) -> None:
    channel = shop.channel
    widget = page.locator('[data-threadline="root"]')
    thread = page.locator("#phone-thread")

    # The customer chats in the web messenger; the business answers.
    await widget.locator('[data-threadline="launcher"]').click()
    await widget.locator('[data-threadline="input"]').fill("hello from the web")
    await widget.locator('[data-threadline="input"]').press("Enter")
    await expect(widget.locator('[data-threadline="message"][data-author="user"]')).to_have_attribute(
        "data-status", "confirmed")
    session = await widget_session(page, shop)
    conversation_id = session["conversationId"]
    await shop.reply(conversation_id, "hi, how can we help")
    await expect(widget.locator('[data-threadline="message"][data-author="business"]')).to_contain_text(
        "hi, how can we help")

    # "Continue on…" lists the app's other channel; choosing it shows the link and its QR code.
    continue_button = widget.get_by_role("button", name="Continue this conversation on another channel")
    await continue_button.click()
    await expect(continue_button).to_have_attribute("aria-expanded", "true")
    option = widget.get_by_role("button", name=f"Continue on {NAME[channel]}")
    await expect(widget.locator('[data-threadline="continue-option"]')).to_have_count(1)
    await option.click()
    link = widget.locator('[data-threadline="continue-link"]')
    await expect(link).to_have_text(f"Open {NAME[channel]}")
    await expect(link).to_have_attribute("href", re.compile(LINK[channel]))
    qr = widget.locator('[data-threadline="continue-qr"]')
    await expect(qr).to_have_attribute("alt", re.compile(f"QR code that opens {NAME[channel]}"))
    await page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=await qr.element_handle())

    # Activating the link opens the page's phone of that channel, which sends what the platform does.
    await link.click()
    await expect(page.locator(f"#tab-{channel}")).to_have_attribute("aria-selected", "true")
    if channel in ("whatsapp", "twilio"):
        composer = page.locator("#phone-text")
        await expect(composer).to_have_value(re.compile(r"code TL[0-9A-Z]{8}"))
        await page.locator("#phone-compose button[type=submit]").click()

    # The phone gets the recap of the web conversation, the widget says where it went.
    await expect(thread).to_contain_text("hello from the web")
    await expect(thread).to_contain_text("hi, how can we help")
    moved = widget.locator('[data-threadline="system"][data-kind="moved"]')
    await expect(moved).to_have_text(f"Conversation moved to {NAME[channel]} — reply there")
    await expect(widget.locator('[data-threadline="handoff"]')).to_be_hidden()
    # History stays in the widget.
    await expect(widget.locator('[data-threadline="message"]')).to_have_count(2)

    # Same conversation for the business, with the channel now its primary client.
    async def primary_is_channel() -> bool:
        participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
        return bool(participants) and participants[0]["clientAssociations"][0]["type"] == channel

    await eventually(primary_is_channel)
    participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
    assert participants[0]["userId"] == session["appUserId"]
    clients = (await shop.api("GET", f"/users/{session['appUserId']}/clients"))["clients"]
    assert sorted(c["type"] for c in clients) == sorted(["sdk", channel])

    # The business's next reply goes to the phone.
    await shop.reply(conversation_id, "now on your phone")
    await expect(thread).to_contain_text("now on your phone")
