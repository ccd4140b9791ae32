"""Away notifications in headless Chromium: the widget's "Notify me" opt-in, then the business's
reply reaching a customer who left the page, on WhatsApp (template) or by e-mail.

The whole system runs (identity, conversations, webhooks, handoff, notifications, whatsapp, web,
sandbox) with the notification delay shortened to about a second. The customer opts in from the
widget on the sandbox page, reads the confirmation code on the sandbox's WhatsApp phone (its
outbox) or in its SMTP sink, and types it back. Absence of a notification is proven without
waiting for time: the cancelled reply leaves no pending notification once the notifications
service has consumed every event, and a later unread reply is then notified exactly once.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from threadline.bootstrap import AccountKey, bootstrap_sandbox

TIMEOUT_MS = 8000
CUSTOMER_NUMBER = "+15557770001"
CUSTOMER_EMAIL = "ada@example.com"
SERVICES = ("identity", "conversations", "webhooks", "handoff", "notifications", "whatsapp", "web", "sandbox")
FAST = {"THREADLINE_NOTIFY_DEFAULT_DELAY_SECONDS": "1", "THREADLINE_NOTIFY_TICK_SECONDS": "0.2"}
TEMPLATES = {"whatsapp": {"name": "away_reply", "language": "en_US", "parameters": ["text"]},
             "whatsappOptIn": {"name": "optin_code", "language": "en_US", "parameters": ["code"]}}
TRIGGERS = ["conversation:message", "notification:delivery:channel", "notification:delivery:failure"]

pytestmark = pytest.mark.e2e


@dataclass
class Shop:
    base_url: str
    app_id: str
    web_id: str
    whatsapp_id: str
    auth: dict[str, str]
    events: list[dict[str, Any]]

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession(headers=self.auth) as http, \
                http.request(method, f"{self.base_url}/v2/apps/{self.app_id}{path}", json=body) as resp:
            assert resp.status in (200, 201), await resp.text()
            data: dict[str, Any] = await resp.json()
        return data

    async def reply(self, conversation_id: str, text: str) -> None:
        await self.api("POST", f"/conversations/{conversation_id}/messages", {
            "author": {"type": "business"}, "content": {"type": "text", "text": text}})

    async def sandbox(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, \
                http.request("POST" if body is not None else "GET", f"{self.base_url}/sandbox{path}",
                             json=body) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
        return data

    async def whatsapp_outbox(self) -> list[dict[str, Any]]:
        """What the business sent the customer's WhatsApp number (Graph API bodies), oldest first."""
        data = await self.sandbox(f"/whatsapp/{self.whatsapp_id}/outbox?to={CUSTOMER_NUMBER}")
        return list(data["messages"])

    async def inbox(self) -> list[dict[str, Any]]:
        return list((await self.sandbox(f"/mail?to={CUSTOMER_EMAIL}"))["mails"])

    async def mail_code(self) -> str | None:
        """The opt-in code of the confirmation mail in the customer's inbox, once it is there."""
        for mail in await self.inbox():
            found = re.search(r"\b(\d{6})\b", mail["subject"])
            if found:
                return found.group(1)
        return None


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll an async check until it returns a truthy value (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def template_of(body: dict[str, Any]) -> dict[str, Any] | None:
    outbound = body.get("body", body)
    return outbound.get("template") if outbound.get("type") == "template" else None


def template_texts(body: dict[str, Any]) -> list[str]:
    template = template_of(body) or {}
    return [p.get("text", "") for c in template.get("components", []) for p in c.get("parameters", [])]


@pytest.fixture
def shop_env() -> dict[str, str]:
    return FAST


@pytest.fixture
async def shop(system: System, shop_env: dict[str, str]) -> AsyncIterator[Shop]:
    await system.start(*SERVICES, env=shop_env)
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", "whatsapp", "email"))
    async with business_webhooks() as (hook_url, events):
        shop = Shop(system.base_url, info["appId"], info["integrations"]["web"]["id"],
                    info["integrations"]["whatsapp"]["id"],
                    basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]), events)
        async with aiohttp.ClientSession(headers=basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)) as http, \
                http.patch(f"{system.base_url}/v2/apps/{shop.app_id}", json={
                    "settings": {"notifications": {"enabled": True, "templates": TEMPLATES}}}) as resp:
            assert resp.status == 200, await resp.text()  # app settings need the account key
        await shop.api("POST", "/integrations", {"type": "custom", "displayName": "Business", "webhooks": [
            {"target": hook_url, "triggers": TRIGGERS}]})
        yield shop



async def open_shop_page(browser: Browser, shop: Shop) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    await page.goto(f"{shop.base_url}/sandbox/")
    return context, page


async def chat(page: Page, shop: Shop, text: str) -> str:
    """The customer writes in the widget; returns the conversation id."""
    widget = page.locator('[data-threadline="root"]')
    await widget.locator('[data-threadline="launcher"]').click()
    await widget.locator('[data-threadline="input"]').fill(text)
    await widget.locator('[data-threadline="input"]').press("Enter")
    await expect(widget.locator('[data-threadline="message"][data-author="user"]')).to_have_attribute(
        "data-status", "confirmed")
    raw = await page.evaluate("key => localStorage.getItem(key)", f"threadline:{shop.app_id}:{shop.web_id}")
    return str(json.loads(raw)["session"]["conversationId"])


async def opt_in(page: Page, channel_name: str, address: str, read_code: Callable[[], Awaitable[str | None]]) -> None:
    """"Notify me" → channel → address → code → confirmed."""
    widget = page.locator('[data-threadline="root"]')
    bell = widget.get_by_role("button", name=re.compile(r"^Notify me by .* when you reply$"))
    await bell.click()
    await expect(bell).to_have_attribute("aria-expanded", "true")
    await widget.get_by_role("button", name=f"Notify me by {channel_name}", exact=True).click()
    await widget.locator('[data-threadline="notify-address"]').fill(address)
    await widget.get_by_role("button", name="Send code").click()
    await expect(widget.locator('[data-threadline="notify-sent"]')).to_contain_text("We sent a code to")
    code = await eventually(read_code)
    await widget.get_by_label("Code").fill("000000" if code != "000000" else "111111")
    await widget.get_by_role("button", name="Confirm").click()
    await expect(widget.locator('[data-threadline="notify-error"]')).to_be_visible()  # a wrong code is refused
    await widget.get_by_label("Code").fill(code)
    await widget.get_by_role("button", name="Confirm").click()
    await expect(widget.locator('[data-threadline="notify-done"]')).to_contain_text("You'll be notified at")
    await expect(bell).to_have_attribute("data-active", "true")


async def notifications_idle(system: System, conversation_id: str) -> bool:
    """Every event is consumed by `notifications` and nothing is pending for the conversation."""
    bus: Bus = system.service("notifications").bus
    spec = subjects.NOTIFICATIONS_EVENTS
    info = await bus.js.consumer_info(spec.stream.name, spec.durable(subjects.partition_of(conversation_id)))
    if info.num_pending or info.num_ack_pending:
        return False
    return await system.service("notifications").store.pending(conversation_id) is None


async def test_whatsapp_opt_in_then_away_reply_continues_the_conversation(system: System, shop: Shop,
                                                                          browser: Browser) -> None:
    context, page = await open_shop_page(browser, shop)
    conversation_id = await chat(page, shop, "is my order on its way?")

    async def whatsapp_code() -> str | None:
        for sent in await shop.whatsapp_outbox():
            found = [t for t in template_texts(sent) if re.fullmatch(r"\d{6}", t)]
            if found and (template_of(sent) or {}).get("name") == "optin_code":
                return found[0]
        return None

    await opt_in(page, "WhatsApp", CUSTOMER_NUMBER, whatsapp_code)
    await context.close()  # the customer leaves: the widget's socket closes

    await shop.reply(conversation_id, "Yes, it ships today")

    async def notification() -> dict[str, Any] | None:
        sent = [m for m in await shop.whatsapp_outbox() if (template_of(m) or {}).get("name") == "away_reply"]
        return sent[0] if sent else None

    notice = await eventually(notification)
    # That number never wrote to the business: outside the 24 h window, so an approved template.
    assert any("Yes, it ships today" in text for text in template_texts(notice))

    async def delivered_event() -> bool:
        return any(e["type"] == "notification:delivery:channel" for e in shop.events)

    await eventually(delivered_event)

    # The customer answers on WhatsApp: the business sees it in the same conversation.
    await shop.sandbox(f"/whatsapp/{shop.whatsapp_id}/inbound",
                       {"from": CUSTOMER_NUMBER, "name": "Ada", "text": "great, thanks!"})

    async def reply_seen() -> dict[str, Any] | None:
        for event in shop.events:
            message = event.get("payload", {}).get("message", {})
            if event["type"] == "conversation:message" and message.get("content", {}).get("text") == "great, thanks!":
                return event
        return None

    event = await eventually(reply_seen)
    assert event["payload"]["conversation"]["id"] == conversation_id
    assert event["payload"]["message"]["source"]["type"] == "whatsapp"
    assert len([m for m in await shop.whatsapp_outbox() if (template_of(m) or {}).get("name") == "away_reply"]) == 1


async def test_a_reply_read_before_the_delay_is_not_notified(system: System, shop: Shop, browser: Browser) -> None:
    context, page = await open_shop_page(browser, shop)
    conversation_id = await chat(page, shop, "hello")

    async def whatsapp_code() -> str | None:
        for sent in await shop.whatsapp_outbox():
            found = [t for t in template_texts(sent) if re.fullmatch(r"\d{6}", t)]
            if found:
                return found[0]
        return None

    await opt_in(page, "WhatsApp", CUSTOMER_NUMBER, whatsapp_code)
    widget = page.locator('[data-threadline="root"]')
    # The widget is open and in view: the reply shows and is marked read at once.
    await shop.reply(conversation_id, "first reply, read in the widget")
    await expect(widget.locator('[data-threadline="message"][data-author="business"]')).to_contain_text(
        "first reply, read in the widget")

    async def read_by_customer() -> bool:
        participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
        return any(p.get("lastRead") for p in participants)

    await eventually(read_by_customer)
    await context.close()
    await eventually(lambda: notifications_idle(system, conversation_id))

    # A later reply nobody reads is notified: exactly once, and only about itself.
    await shop.reply(conversation_id, "second reply, unread")

    async def notified() -> list[dict[str, Any]] | None:
        sent = [m for m in await shop.whatsapp_outbox() if (template_of(m) or {}).get("name") == "away_reply"]
        return sent or None

    (notice,) = await eventually(notified)
    texts = " ".join(template_texts(notice))
    assert "second reply, unread" in texts and "first reply" not in texts


async def test_email_opt_in_notifies_with_a_working_opt_out_link(system: System, shop: Shop,
                                                                  browser: Browser) -> None:
    context, page = await open_shop_page(browser, shop)
    conversation_id = await chat(page, shop, "please mail me")

    await opt_in(page, "e-mail", CUSTOMER_EMAIL, shop.mail_code)
    await context.close()

    await shop.reply(conversation_id, "Your refund is on its way")

    async def notification_mail() -> dict[str, Any] | None:
        found = [m for m in await shop.inbox() if "Your refund is on its way" in (m["text"] or "")]
        return found[0] if found else None

    mail = await eventually(notification_mail)
    assert mail["unsubscribe"] and "/notifications/v1/optout?token=" in mail["unsubscribe"]
    assert mail["unsubscribe"] in mail["links"]

    # Another visitor (own browser context, no widget session) reads the inbox on the sandbox
    # page's Mail tab, opens the mail and follows its opt-out link.
    reader, reader_page = await open_shop_page(browser, shop)
    await reader_page.locator("#tab-mail").click()
    await reader_page.locator("#phone-number").fill(CUSTOMER_EMAIL)
    await reader_page.locator("#phone-number").dispatch_event("change")
    thread = reader_page.locator("#phone-thread")
    await thread.get_by_role("button", name=re.compile("New message from")).first.click()
    await expect(thread).to_contain_text("Your refund is on its way")
    async with reader.expect_page() as opened:
        await thread.get_by_role("link", name="Unsubscribe").click()
    optout = await opened.value
    await expect(optout.locator("h1")).to_have_text("You're unsubscribed")
    await reader.close()

    mails_before = len(await shop.inbox())
    await shop.reply(conversation_id, "One more thing")

    # The reply is scheduled, falls due and is dropped (nowhere left to notify): no mail.
    store = system.service("notifications").store

    async def scheduled() -> bool:
        return await store.pending(conversation_id) is not None

    await eventually(scheduled)
    await eventually(lambda: notifications_idle(system, conversation_id))
    assert len(await shop.inbox()) == mails_before


@pytest.mark.parametrize("shop_env", [{**FAST, "THREADLINE_NOTIFY_CODE_LIMIT_PER_APP": "1/h"}])
async def test_a_refused_code_says_when_to_retry_and_asking_again_reuses_the_pending_code(
        system: System, shop: Shop, browser: Browser) -> None:
    """The app's budget of confirmation codes is one an hour: a second address is refused with
    when to retry; asking again for the first address sends nothing and its code still works."""
    context, page = await open_shop_page(browser, shop)
    await chat(page, shop, "notify me please")
    widget = page.locator('[data-threadline="root"]')
    await widget.get_by_role("button", name=re.compile(r"^Notify me by .* when you reply$")).click()
    await widget.get_by_role("button", name="Notify me by e-mail", exact=True).click()
    await widget.locator('[data-threadline="notify-address"]').fill(CUSTOMER_EMAIL)
    await widget.get_by_role("button", name="Send code").click()
    await expect(widget.locator('[data-threadline="notify-sent"]')).to_contain_text("We sent a code to")

    code = await eventually(shop.mail_code)
    await widget.get_by_role("button", name="Send a new code").click()
    await widget.locator('[data-threadline="notify-address"]').fill("grace@example.com")
    await widget.get_by_role("button", name="Send code").click()
    await expect(widget.locator('[data-threadline="notify-error"]')).to_have_text(
        re.compile(r"^No more codes can be sent right now\. Try again in (59|60) minutes\.$"))
    assert (await shop.sandbox("/mail?to=grace@example.com"))["mails"] == []

    # The first address again: "We sent a code", nothing new in the inbox, and that code confirms.
    await widget.locator('[data-threadline="notify-address"]').fill(CUSTOMER_EMAIL)
    await widget.get_by_role("button", name="Send code").click()
    sent = widget.locator('[data-threadline="notify-sent"]')
    await expect(sent).to_contain_text("We sent a code to a•••@example.com")
    assert len(await shop.inbox()) == 1  # codes go out over SMTP before the answer: none was sent
    await widget.get_by_label("Code").fill(code)
    await widget.get_by_role("button", name="Confirm").click()
    await expect(widget.locator('[data-threadline="notify-done"]')).to_contain_text("You'll be notified at")
    await context.close()
