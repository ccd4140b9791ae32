"""The handoff's reverse path in headless Chromium: WhatsApp → the web messenger, then login.

A customer writes on the sandbox WhatsApp phone. The business (this test, through the API)
asks for a link request to the web integration for that user and sends the link as a WhatsApp
text. The customer opens it: the sandbox page with `?threadline_code=…` — the widget redeems it,
drops it from the address bar and shows the WhatsApp history of the same conversation. Then the
page calls `Threadline.login(externalId, jwt)` with a JWT the business backend minted with an app
key. The JWT proves who holds the browser, not who holds the WhatsApp number (whoever sent the
link): the browser alone moves to the known user (`separated`), the widget switches to that
user's conversation and clears what the WhatsApp one showed, nothing is merged, and the
business's reply there appears in the widget.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, expect

from shared.http import basic_auth_header
from shared.signing import jwt_encode
from tests.e2e.test_handoff_channels import outbox_texts
from tests.e2e.test_widget_handoff import TIMEOUT_MS, eventually
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from threadline.bootstrap import AccountKey, bootstrap_sandbox

pytestmark = pytest.mark.e2e

PHONE_NUMBER = "+15557000042"



async def test_a_whatsapp_customer_continues_on_the_web_and_logs_in(system: System, browser: Browser) -> None:
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        await system.start("identity", "conversations", "webhooks", "handoff", "whatsapp", "web", "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       system.data_dir, ("web", "whatsapp"))
        base, app_id = system.base_url, info["appId"]
        web_id, wa_id = info["integrations"]["web"]["id"], info["integrations"]["whatsapp"]["id"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        phone = f"{base}/sandbox/whatsapp/{wa_id}"

        async def api(method: str, path: str, body: Any = None) -> dict[str, Any]:
            async with http.request(method, f"{base}/v2/apps/{app_id}{path}", headers=auth, json=body) as resp:
                assert resp.status in (200, 201), await resp.text()
                data: dict[str, Any] = await resp.json()
            return data

        async def whatsapp_inbox() -> list[str]:
            async with http.get(f"{phone}/outbox", params={"to": PHONE_NUMBER}) as resp:
                return outbox_texts("whatsapp", (await resp.json())["messages"])

        await api("POST", "/integrations", {"type": "custom", "webhooks": [{"target": hook_url, "triggers": [
            "conversation:message", "client:add", "conversation:referral", "user:merge"]}]})
        # The business knows this customer from its own site (an account with an externalId).
        known = (await api("POST", "/users", {"externalId": "customer-42"}))["user"]

        # The customer writes on WhatsApp; the business answers there.
        async def delivered() -> bool:
            async with http.post(f"{phone}/inbound", json={"from": PHONE_NUMBER, "text": "where is my order?"}) as r:
                body = await r.json(content_type=None)
                return r.status == 200 and body.get("webhookStatus", 200) == 200

        await eventually(delivered, timeout=20.0)

        async def first_message() -> dict[str, Any] | None:
            return next((e["payload"] for e in events if e["type"] == "conversation:message"
                         and e["payload"]["message"]["content"].get("text") == "where is my order?"), None)

        arrived = await eventually(first_message, timeout=20.0)
        conversation_id = arrived["conversation"]["id"]
        whatsapp_user = arrived["message"]["author"]["userId"]
        await api("POST", f"/conversations/{conversation_id}/messages", {
            "author": {"type": "business"}, "content": {"type": "text", "text": "Happy to check, one moment"}})

        # The business sends a link to its website for this conversation, as a WhatsApp text.
        link = (await api("POST", f"/users/{whatsapp_user}/linkRequests", {"integrationIds": [web_id]}))[
            "linkRequests"][0]
        assert link["url"] == f"{base}/sandbox/?threadline_code={link['code']}"
        await api("POST", f"/conversations/{conversation_id}/messages", {
            "author": {"type": "business"},
            "content": {"type": "text", "text": f"Please log in on our site to see the details: {link['url']}"}})

        async def link_on_phone() -> str | None:
            return next((t for t in await whatsapp_inbox() if link["url"] in t), None)

        await eventually(link_on_phone, timeout=20.0)

        # The customer opens the link in a browser: the widget continues the WhatsApp conversation.
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        await page.goto(link["url"])
        widget = page.locator('[data-threadline="root"]')
        await expect(widget.locator('[data-threadline="panel"]')).to_be_visible()
        messages = widget.locator('[data-threadline="message"]')
        await expect(messages).to_have_count(3)
        await expect(messages.nth(0)).to_contain_text("where is my order?")
        await expect(messages.nth(0)).to_have_attribute("data-author", "user")
        await expect(messages.nth(1)).to_contain_text("Happy to check, one moment")
        await expect(messages.nth(2)).to_contain_text("Please log in on our site")
        assert "threadline_code" not in page.url  # a reload does not replay the code
        stored = await page.evaluate("key => JSON.parse(localStorage.getItem(key)).session",
                                     f"threadline:{app_id}:{web_id}")
        assert (stored["appUserId"], stored["conversationId"]) == (whatsapp_user, conversation_id)

        def added() -> list[dict[str, Any]]:
            return [e["payload"] for e in events
                    if e["type"] == "client:add" and e["payload"]["client"]["type"] == "sdk"]

        await eventually(lambda: _value(added()), timeout=20.0)
        assert added()[0]["reason"] == "channelLinking" and added()[0]["user"]["id"] == whatsapp_user

        # The site logs the customer in with a JWT its backend signed with an app key.
        key = (await api("POST", "/keys", {"displayName": "website login"}))["key"]
        token = jwt_encode({"scope": "user", "external_id": "customer-42"}, key["secret"], key["id"])
        result = await page.evaluate("([id, jwt]) => Threadline.login(id, jwt)", ["customer-42", token])
        assert result["outcome"] == "separated"
        assert result["appUserId"] == known["id"] and result["conversationId"] != conversation_id
        account_conversation = result["conversationId"]
        # The WhatsApp conversation is no longer shown: this is the account's conversation.
        await expect(messages).to_have_count(0)

        # Nothing was merged: the WhatsApp number stays its own user with its own conversation.
        assert not [e for e in events if e["type"] == "user:merge"]
        clients = (await api("GET", "/users/customer-42/clients"))["clients"]
        assert [c["type"] for c in clients] == ["sdk"]
        whatsapp_clients = (await api("GET", f"/users/{whatsapp_user}/clients"))["clients"]
        assert [c["type"] for c in whatsapp_clients] == ["whatsapp"]
        participants = (await api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
        assert [p["userId"] for p in participants] == [whatsapp_user]

        # The business's reply in the account's conversation shows in the widget (new token, new socket).
        await api("POST", f"/conversations/{account_conversation}/messages", {
            "author": {"type": "business"}, "content": {"type": "text", "text": "Your order ships tomorrow"}})
        await expect(messages.last).to_contain_text("Your order ships tomorrow")
        await expect(messages).to_have_count(1)
        stored = await page.evaluate("key => JSON.parse(localStorage.getItem(key)).session",
                                     f"threadline:{app_id}:{web_id}")
        assert (stored["appUserId"], stored["externalId"], stored["conversationId"]) == (
            known["id"], "customer-42", account_conversation)
        # What the customer writes now is the known user's, in the account's conversation.
        await widget.locator('[data-threadline="input"]').fill("thanks!")
        await widget.locator('[data-threadline="input"]').press("Enter")

        async def thanks() -> dict[str, Any] | None:
            return next((e["payload"] for e in events if e["type"] == "conversation:message"
                         and e["payload"]["message"]["content"].get("text") == "thanks!"), None)

        said = await eventually(thanks, timeout=20.0)
        assert said["conversation"]["id"] == account_conversation
        assert said["message"]["author"]["userId"] == known["id"]
        assert not any("Your order ships tomorrow" in t for t in await whatsapp_inbox())
        await context.close()


async def test_a_used_link_says_why_and_falls_back_to_a_fresh_chat(system: System, browser: Browser) -> None:
    async with aiohttp.ClientSession() as http:
        await system.start("identity", "conversations", "handoff", "web", "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       system.data_dir, ("web",))
        base, app_id, web_id = system.base_url, info["appId"], info["integrations"]["web"]["id"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        owner = await start_sdk_session(http, base, app_id, web_id)
        async with http.post(f"{base}/v2/apps/{app_id}/users/{owner['appUserId']}/linkRequests", headers=auth,
                             json={"integrationIds": [web_id]}) as resp:
            link = (await resp.json())["linkRequests"][0]
        async with http.post(f"{base}/sdk/v1/apps/{app_id}/integrations/{web_id}/sessions",
                             json={"linkCode": link["code"]}) as resp:
            assert resp.status == 201  # someone used it first

        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        await page.goto(link["url"])
        widget = page.locator('[data-threadline="root"]')
        refusal = widget.locator('[data-threadline="system"][data-kind="link-refused"]')
        await expect(refusal).to_contain_text("This link has already been used")
        await expect(refusal).to_have_attribute("role", "alert")
        # Not stuck: a fresh anonymous chat works.
        await expect(widget.locator('[data-threadline="status"]')).to_have_attribute("data-state", "connected")
        await widget.locator('[data-threadline="input"]').fill("hello?")
        await widget.locator('[data-threadline="input"]').press("Enter")
        await expect(widget.locator('[data-threadline="message"][data-author="user"]')).to_have_attribute(
            "data-status", "confirmed")
        stored = await page.evaluate("key => JSON.parse(localStorage.getItem(key)).session",
                                     f"threadline:{app_id}:{web_id}")
        assert stored["appUserId"] != owner["appUserId"]
        assert stored["conversationId"] != owner["conversationId"]
        # Logging out forgets it: the next chat is another anonymous visitor (created by its first message).
        await page.evaluate("() => Threadline.logout()")
        assert await page.evaluate("key => localStorage.getItem(key)", f"threadline:{app_id}:{web_id}") is None
        await expect(widget.locator('[data-threadline="message"]')).to_have_count(0)
        await expect(widget.locator('[data-threadline="status"]')).to_have_attribute("data-state", "connected")
        await widget.locator('[data-threadline="input"]').fill("me again")
        await widget.locator('[data-threadline="input"]').press("Enter")
        await expect(widget.locator('[data-threadline="message"][data-author="user"]')).to_have_attribute(
            "data-status", "confirmed")
        again = await page.evaluate("key => JSON.parse(localStorage.getItem(key)).session",
                                    f"threadline:{app_id}:{web_id}")
        assert again["appUserId"] not in (stored["appUserId"], owner["appUserId"])
        await context.close()


async def _value(value: Any) -> Any:
    return value
