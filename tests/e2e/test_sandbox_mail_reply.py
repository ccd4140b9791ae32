"""The sandbox page's mail box replies, in headless Chromium: a visitor opts in to e-mail
notifications in the widget and leaves; the business's reply is notified by mail; the visitor
comes back to the page, opens that mail in the Mail tab, presses Reply, types, sends (real SMTP
to the e-mail service's receiver) and sees the receiver's answer; the widget's timeline shows the
e-mail reply, without the quoted original, and the business has it in the conversation."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from playwright.async_api import Browser, expect

from shared.http import basic_auth_header
from tests.e2e.test_widget_notifications import (
    CUSTOMER_EMAIL,
    FAST,
    TEMPLATES,
    TIMEOUT_MS,
    TRIGGERS,
    Shop,
    chat,
    eventually,
    open_shop_page,
    opt_in,
)
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from threadline.bootstrap import AccountKey, bootstrap_sandbox

# The sandbox starts last: it is given the port of the e-mail service's SMTP receiver.
SERVICES = ("identity", "conversations", "webhooks", "handoff", "notifications", "whatsapp", "email", "web")
REPLY = "Perfect, thank you! I'll be home on Monday."

pytestmark = pytest.mark.e2e


@pytest.fixture
async def shop(system: System) -> AsyncIterator[Shop]:
    await system.start(*SERVICES, env=FAST)
    port = system.service("email").smtp_port
    assert isinstance(port, int) and port > 0
    await system.start("sandbox", env={**FAST, "THREADLINE_MAIL_SMTP_PORT": str(port)})
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", "whatsapp", "email"))
    async with business_webhooks() as (hook_url, events):
        shop = Shop(system.base_url, info["appId"], info["integrations"]["web"]["id"],
                    info["integrations"]["whatsapp"]["id"],
                    basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]), events)
        async with aiohttp.ClientSession(headers=basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)) as http, \
                http.patch(f"{system.base_url}/v2/apps/{shop.app_id}", json={
                    "settings": {"notifications": {"enabled": True, "templates": TEMPLATES}}}) as resp:
            assert resp.status == 200, await resp.text()
        await shop.api("POST", "/integrations", {"type": "custom", "displayName": "Business", "webhooks": [
            {"target": hook_url, "triggers": TRIGGERS}]})
        email_id = info["integrations"]["email"]["id"]

        async def email_integration_seen() -> bool:
            return system.service("email").credentials(email_id) is not None

        await eventually(email_integration_seen)
        yield shop


async def test_the_mail_box_replies_to_a_notification_and_the_widget_shows_the_reply(
        system: System, shop: Shop, browser: Browser) -> None:
    context, page = await open_shop_page(browser, shop)
    conversation_id = await chat(page, shop, "is my order on its way?")

    await opt_in(page, "e-mail", CUSTOMER_EMAIL, shop.mail_code)
    await page.close()  # the visitor leaves (the widget's socket closes); the browser keeps its session

    await shop.reply(conversation_id, "Yes, it ships today")

    async def notification_mail() -> dict[str, Any] | None:
        found = [m for m in await shop.inbox() if "Yes, it ships today" in (m["text"] or "")]
        return found[0] if found else None

    notice = await eventually(notification_mail, timeout=15.0)
    assert notice["replyTo"] and notice["replyTo"].startswith("reply+")

    # Back on the page: the Mail tab shows the mail box of the address, the mail opens, Reply.
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{shop.base_url}/sandbox/")
    await page.locator("#tab-mail").click()
    await page.locator("#phone-number").fill(CUSTOMER_EMAIL)
    await page.locator("#phone-number").dispatch_event("change")
    thread = page.locator("#phone-thread")
    await thread.locator(f'.mail-row[data-mail-id="{notice["id"]}"]').click()
    await expect(thread.locator(".mail-meta").first).to_contain_text(f"Reply-To: {notice['replyTo']}")
    await thread.get_by_role("button", name="Reply", exact=True).click()
    compose = thread.locator(".mail-compose")
    await expect(compose).to_contain_text(f"To: {notice['replyTo']}")
    await expect(compose).to_contain_text(f"Subject: Re: {notice['subject']}")
    await compose.get_by_label("Your reply").fill(REPLY)
    await compose.get_by_role("button", name="Send").click()
    status = thread.locator(".mail-reply-status")
    await expect(status).to_have_attribute("data-outcome", "sent")
    await expect(status).to_contain_text(re.compile(r"Reply sent · the e-mail service answered 250"))
    await expect(compose).to_be_hidden()

    # The mail box lists the reply it sent.
    await thread.get_by_role("button", name="← Mail box").click()
    sent_row = thread.locator('.mail-row[data-direction="sent"]')
    await expect(sent_row).to_have_count(1)
    await expect(sent_row).to_contain_text(f"Re: {notice['subject']}")
    await expect(sent_row).to_contain_text(f"To: {notice['replyTo']}")

    # The widget (back on this page with the same session) shows the e-mail reply in its timeline.
    widget = page.locator('[data-threadline="root"]')
    await widget.locator('[data-threadline="launcher"]').click()
    mine = widget.locator('[data-threadline="message"][data-author="user"]')
    await expect(mine.filter(has_text=REPLY)).to_have_count(1, timeout=15000)
    await expect(widget.locator('[data-threadline="message"]').filter(has_text="wrote:")).to_have_count(0)

    # The business has it in the conversation, from the e-mail channel, the quote stripped.
    messages = (await shop.api("GET", f"/conversations/{conversation_id}/messages"))["messages"]
    [from_mail] = [m for m in messages if m.get("source", {}).get("type") == "mailgun"]
    assert from_mail["author"]["type"] == "user" and from_mail["content"]["text"] == REPLY
    await context.close()


async def test_without_the_receiver_port_the_page_says_replies_are_off(system: System, browser: Browser) -> None:
    """The tests' System gives every service THREADLINE_MAIL_SMTP_PORT=0, a port the sandbox cannot
    know: the Reply button is disabled and the page says why."""
    await system.start("sandbox")
    Path(system.data_dir).mkdir(parents=True, exist_ok=True)
    (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({
        "baseUrl": system.base_url, "appId": "0" * 24, "integrations": {
            "email": {"id": "1" * 24, "fromAddress": "notifications@demo-shop.threadline.test"}}}))
    message = EmailMessage()
    message["From"] = "Shop <notifications@demo-shop.threadline.test>"
    message["To"] = CUSTOMER_EMAIL
    message["Subject"] = "Your order shipped"
    message.set_content("It is on its way.")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=system.service("sandbox").mail.port, start_tls=False)
    await smtp.connect()
    await smtp.send_message(message)
    await smtp.quit()

    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{system.base_url}/sandbox/?channel=mail")
    await page.locator("#phone-number").fill(CUSTOMER_EMAIL)
    await page.locator("#phone-number").dispatch_event("change")
    thread = page.locator("#phone-thread")
    await thread.get_by_role("button", name=re.compile("Your order shipped")).click()
    await expect(thread.get_by_role("button", name="Reply", exact=True)).to_be_disabled()
    await expect(thread.locator(".mail-reply-off")).to_contain_text(
        re.compile(r"E-mail replies are off: THREADLINE_MAIL_SMTP_PORT is 0"))
    await context.close()
