""""Continue on…" our app, in headless Chromium: the web messenger on the sandbox page hands its
conversation to the page's App phone (the business's simulated Android app).

The customer chats in the widget, opens "Continue on…", picks the app and activates the link the
widget shows (`/handoff/v1/open?code=`, what the app's App Link opens). The sandbox page hands
the link to its App phone, which creates its SDK session with the code (replacing the anonymous
session it had): the app joins the same conversation and shows its history, the business API
shows the app's client as the primary one, the widget says the conversation moved, and the
business's next reply lands in the app.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Page, expect

from shared.http import basic_auth_header
from tests.e2e.test_widget_handoff import Shop, eventually, sandbox_page, widget_session
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System
from threadline.bootstrap import AccountKey, bootstrap_sandbox

pytestmark = pytest.mark.e2e


@pytest.fixture
async def app_shop(system: System) -> Shop:
    await system.start("identity", "conversations", "webhooks", "handoff", "web", "app", "sandbox")
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", "android"))
    auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
    return Shop("android", system.base_url, info["appId"], info["integrations"]["web"]["id"],
                info["integrations"]["android"]["id"], auth)


@pytest.fixture
async def app_page(system: System, app_shop: Shop) -> AsyncIterator[Page]:
    async with sandbox_page(system.base_url) as tab:
        yield tab


async def installed_app(page: Page, shop: Shop) -> dict[str, Any]:
    """What the simulated app keeps in localStorage (its device token and SDK session)."""
    raw = await page.evaluate("key => localStorage.getItem(key)", f"sandbox.phone.app:{shop.app_id}:{shop.channel_id}")
    stored: dict[str, Any] = json.loads(raw or "{}")
    return stored


async def test_widget_hands_off_to_the_app(app_page: Page, app_shop: Shop) -> None:
    page, shop = app_page, app_shop
    widget = page.locator('[data-threadline="root"]')
    thread = page.locator("#phone-thread")

    # The App phone is the page's only phone: it installs with a session of its own, which
    # creates nobody until its first message.
    await expect(page.locator("#tab-app")).to_have_attribute("aria-selected", "true")
    await expect(page.locator("#phone-app-state")).to_have_text(re.compile("online"))
    own = (await installed_app(page, shop))["session"]
    assert own["sessionToken"] and own.get("appUserId") is None and own.get("conversationId") is None

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

    # "Continue on…" lists the app; choosing it shows the gateway's open link with its code.
    await widget.get_by_role("button", name="Continue this conversation on another channel").click()
    await expect(widget.locator('[data-threadline="continue-option"]')).to_have_count(1)
    await widget.get_by_role("button", name="Continue on our app").click()
    link = widget.locator('[data-threadline="continue-link"]')
    await expect(link).to_have_text("Open our app")
    await expect(link).to_have_attribute("href", re.compile(r"^https?://[^/]+/handoff/v1/open\?code=[\w-]+$"))

    # Activating it opens the App phone, which signs in with the code: the widget's conversation.
    await link.click()
    await expect(page.locator("#tab-app")).to_have_attribute("aria-selected", "true")
    await expect(thread.locator("li.in")).to_contain_text(["hello from the web"])
    await expect(thread.locator("li.out")).to_contain_text(["hi, how can we help"])
    await expect(page.locator("#phone-app-state")).to_have_text(re.compile("online"))
    linked = (await installed_app(page, shop))["session"]
    assert (linked["appUserId"], linked["conversationId"]) == (session["appUserId"], conversation_id)
    assert linked["sessionToken"] != own["sessionToken"]

    # The widget says where the conversation went; its history stays.
    moved = widget.locator('[data-threadline="system"][data-kind="moved"]')
    await expect(moved).to_have_text("Conversation moved to our app — reply there")
    await expect(widget.locator('[data-threadline="handoff"]')).to_be_hidden()
    await expect(widget.locator('[data-threadline="message"]')).to_have_count(2)

    # Same conversation for the business, with the app's client now its primary client.
    async def primary_is_the_app() -> bool:
        participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
        return bool(participants) and participants[0]["clientAssociations"][0]["clientId"] == linked["clientId"]

    await eventually(primary_is_the_app)
    participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
    assert participants[0]["userId"] == session["appUserId"]
    assert participants[0]["clientAssociations"][0]["type"] == "sdk"
    clients = {c["id"]: c for c in (await shop.api("GET", f"/users/{session['appUserId']}/clients"))["clients"]}
    assert clients[linked["clientId"]]["integrationId"] == shop.channel_id
    assert sorted((c["type"], c["integrationId"]) for c in clients.values()) == sorted(
        [("sdk", shop.web_id), ("sdk", shop.channel_id)])

    # The business's next reply goes to the app.
    await shop.reply(conversation_id, "now in the app")
    await expect(thread.locator("li.out").last).to_contain_text("now in the app")
