"""The agent desk in headless Chromium, with a customer in the sandbox page's web messenger.

A customer writes on the web; the bot (the switchboard's default) passes control to the desk;
agent A, online, gets the conversation; A goes offline and agent B gets it; B sends the customer to
WhatsApp with the handoff link, the customer continues there, and the conversation goes on in the
same timeline (a badge per channel). A's desk, in a second browser context, sees it all live.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from playwright.async_api import Browser, BrowserContext, Page, expect

from shared.http import basic_auth_header
from shared.signing import meta_signature
from tests.e2e.test_widget_conversation import TIMEOUT_MS
from tests.e2e.test_widget_handoff import eventually
from tests.fakes.oidc import oidc_provider
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from threadline.bootstrap import AccountKey, bootstrap_sandbox

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"
CUSTOMER_PHONE = "15550199"


@dataclass
class Scene:
    base: str
    app_id: str
    web_id: str
    whatsapp_id: str
    auth: dict[str, str]
    http: aiohttp.ClientSession
    events: list[dict[str, Any]]

    async def rest(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        async with self.http.request(method, f"{self.base}/v2/apps/{self.app_id}{path}", json=body,
                                     headers=self.auth) as resp:
            data = await resp.json()
            assert resp.status == status, (resp.status, data)
            return data



@pytest.fixture
async def scene(system: System) -> AsyncIterator[Scene]:
    await system.start("identity", "conversations", "webhooks", "handoff", "web", "whatsapp", "sandbox", "desk")
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", "whatsapp"))
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        s = Scene(system.base_url, info["appId"], info["integrations"]["web"]["id"],
                  info["integrations"]["whatsapp"]["id"],
                  basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]), http, events)
        bot = await s.rest("POST", "/integrations", {"type": "custom", "displayName": "bot", "webhooks": [
            {"target": hook_url, "triggers": ["conversation:message"]}]}, status=201)
        switchboard = (await s.rest("POST", "/switchboards", status=201))["switchboard"]
        members = f"/switchboards/{switchboard['id']}/switchboardIntegrations"
        desk_member = (await s.rest("POST", members, {"name": "desk", "integrationType": "desk"},
                                    status=201))["switchboardIntegration"]
        bot_member = (await s.rest("POST", members, {"name": "bot", "integrationId": bot["integration"]["id"],
                                                     "nextSwitchboardIntegrationId": desk_member["id"]},
                                   status=201))["switchboardIntegration"]
        await s.rest("PATCH", f"/switchboards/{switchboard['id']}",
                     {"enabled": True, "defaultSwitchboardIntegrationId": bot_member["id"]})
        for email, name, role in (("ana@example.com", "Ana", "admin"), ("ben@example.com", "Ben", "agent")):
            await s.rest("POST", "/desk/agents", {"email": email, "displayName": name, "role": role,
                                                  "password": PASSWORD}, status=201)
        yield s


async def open_desk(browser: Browser, scene: Scene, email: str) -> tuple[BrowserContext, Page]:
    """A browser context signed in to the desk as `email` (through the sign-in form)."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{scene.base}/desk/?app={scene.app_id}")
    await page.get_by_label("E-mail", exact=True).fill(email)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_role("button", name="Sign in", exact=True).click()
    await expect(page.locator("#desk")).to_be_visible()
    await expect(page.locator("#presence")).to_have_value("online")
    await expect(page.locator("#live")).to_have_class("live on")
    return context, page


def inbox_item(page: Page, conversation_id: str) -> Any:
    return page.locator(f'#tickets li[data-conversation="{conversation_id}"]')


async def test_a_conversation_goes_from_the_web_to_agent_a_then_b_then_whatsapp(browser: Browser,
                                                                              scene: Scene) -> None:
    expect.set_options(timeout=TIMEOUT_MS)
    ana_context, ana = await open_desk(browser, scene, "ana@example.com")
    customer_context = await browser.new_context(viewport={"width": 1280, "height": 800})
    shop = await customer_context.new_page()
    shop.set_default_timeout(TIMEOUT_MS)
    ben_context: BrowserContext | None = None
    try:
        # The customer writes in the web messenger; the bot holds the conversation, then passes it.
        await shop.goto(f"{scene.base}/sandbox/")
        widget = shop.locator('[data-threadline="root"]')
        await widget.locator('[data-threadline="launcher"]').click()
        await widget.locator('[data-threadline="input"]').fill("my parcel never came")
        await widget.locator('[data-threadline="input"]').press("Enter")

        async def first_message() -> str | None:
            return next((e["payload"]["conversation"]["id"] for e in scene.events
                         if e["payload"]["message"]["content"].get("text") == "my parcel never came"), None)

        conversation_id = str(await eventually(first_message, timeout=20.0))
        await scene.rest("POST", f"/conversations/{conversation_id}/passControl", {"switchboardIntegration": "next"})

        # Ana is online: it is hers, live in her inbox.
        await expect(inbox_item(ana, conversation_id)).to_contain_text("my parcel never came")
        await expect(inbox_item(ana, conversation_id)).to_contain_text("open · Ana")
        await inbox_item(ana, conversation_id).click()
        await expect(ana.locator("#timeline li.user .text")).to_have_text(["my parcel never came"])
        await expect(ana.locator("#timeline li.user .badge")).to_have_text(["Web"])
        await expect(ana.locator("#identities")).to_contain_text("Web")

        # Ben signs in; Ana goes offline: the conversation is Ben's.
        ben_context, ben = await open_desk(browser, scene, "ben@example.com")
        await ana.get_by_role("tab", name="All").click()
        await ana.locator("#presence").select_option("offline")
        await expect(inbox_item(ben, conversation_id)).to_contain_text("open · Ben")
        await expect(inbox_item(ana, conversation_id)).to_contain_text("open · Ben")  # live, in Ana's "All"

        # Ben opens it; typing shows both ways while the customer is still on the web.
        await inbox_item(ben, conversation_id).click()
        await expect(ben.locator("#timeline")).to_contain_text("my parcel never came")
        await widget.locator('[data-threadline="input"]').press_sequentially("still there?")
        await expect(ben.locator("#customer-typing")).to_be_visible()
        await ben.locator("#reply-text").press_sequentially("Let me check")
        await expect(widget.locator('[data-threadline="typing"]')).to_be_visible()
        await ben.locator("#reply-text").fill("")
        await widget.locator('[data-threadline="input"]').fill("")

        # Ben sends the customer to WhatsApp with the handoff link.
        await ben.locator("#continue-on").select_option(label="WhatsApp · WhatsApp (sandbox)")
        handoff = ben.locator("#timeline li.business").last
        await expect(handoff).to_contain_text("Continue this conversation on WhatsApp")
        await expect(widget.locator('[data-threadline="message"][data-author="business"]').last).to_contain_text(
            "Continue this conversation on WhatsApp")
        link = (await handoff.locator(".text").inner_text()).split(": ", 1)[1].strip()
        prefilled = parse_qs(urlsplit(link).query)["text"][0]

        # The customer follows the link on WhatsApp (the sandbox's phone sends what WhatsApp would).
        async def send(text: str) -> None:
            async with scene.http.post(f"{scene.base}/sandbox/whatsapp/{scene.whatsapp_id}/inbound",
                                       json={"from": CUSTOMER_PHONE, "text": text}) as resp:
                assert resp.status == 200, await resp.text()

        await send(prefilled)
        await send("it's me, now on WhatsApp")
        # Same timeline, a WhatsApp badge on the new message; Ana's desk sees it live too.
        await expect(ben.locator("#timeline li.user").last).to_contain_text("it's me, now on WhatsApp")
        await expect(ben.locator("#timeline li.user").last.locator(".badge")).to_have_text("WhatsApp")
        await expect(ben.locator("#timeline li.user").first.locator(".badge")).to_have_text("Web")
        # The handoff itself is in the timeline, and the conversation's channel is WhatsApp now.
        await expect(ben.locator("#timeline li.event")).to_contain_text("Moved to WhatsApp")
        await expect(inbox_item(ben, conversation_id).locator(".badge")).to_have_text("WhatsApp")
        await inbox_item(ana, conversation_id).click()
        await expect(ana.locator("#timeline")).to_contain_text("it's me, now on WhatsApp")

        # Ana searches: an earlier message finds the conversation; nonsense finds nothing.
        await ana.locator("#filter-search").fill("parcel never")
        await expect(ana.locator("#tickets li[data-conversation]")).to_have_count(1)
        await expect(inbox_item(ana, conversation_id)).to_be_visible()
        await ana.locator("#filter-search").fill("no such words here")
        await expect(ana.locator("#tickets li[data-conversation]")).to_have_count(0)
        await ana.locator("#filter-search").fill("")
        await expect(inbox_item(ana, conversation_id)).to_be_visible()

        # Ben's reply goes out on the customer's current channel: WhatsApp.
        await ben.locator("#reply-text").fill("Found it, it arrives tomorrow")
        await ben.get_by_role("button", name="Send").click()
        await expect(ana.locator("#timeline li.business").last).to_contain_text("Found it, it arrives tomorrow")

        async def on_whatsapp() -> bool:
            async with scene.http.get(f"{scene.base}/sandbox/whatsapp/{scene.whatsapp_id}/outbox",
                                      params={"to": CUSTOMER_PHONE}) as resp:
                return "Found it, it arrives tomorrow" in await resp.text()
        await eventually(on_whatsapp, timeout=20.0)

        # A day later (the page's clock moved on), WhatsApp's window is closed: the desk warns and
        # offers the app's approved templates.
        await scene.rest("POST", "/desk/canned-replies", {
            "shortcut": "follow up", "text": "Following up",
            "whatsappTemplate": {"name": "order_follow_up", "language": "en_US"}}, status=201)
        await ben.clock.set_fixed_time(time.time() + 25 * 3600)
        await inbox_item(ben, conversation_id).click()
        await expect(ben.locator("#window-warning")).to_contain_text("24-hour window is closed")
        await ben.locator("#template").select_option(label="follow up (order_follow_up, en_US)")

        async def template_sent() -> bool:
            async with scene.http.get(f"{scene.base}/sandbox/whatsapp/{scene.whatsapp_id}/outbox",
                                      params={"to": CUSTOMER_PHONE}) as resp:
                return "order_follow_up" in await resp.text()
        await eventually(template_sent, timeout=20.0)

        # A private note stays in the desk; resolving hands the conversation back to the bot.
        await ben.get_by_label("Private note").check()
        await ben.locator("#reply-text").fill("Carrier lost it once already")
        await ben.get_by_role("button", name="Send").click()
        await expect(ana.locator("#timeline li.note")).to_contain_text("Carrier lost it once already")
        await ben.get_by_role("button", name="Resolve").click()
        await expect(ben.locator("#thread-state")).to_contain_text("resolved")
    finally:
        await customer_context.close()
        await ana_context.close()
        if ben_context is not None:
            await ben_context.close()


async def test_an_admin_sets_a_channel_up_from_the_desk(browser: Browser, scene: Scene) -> None:
    expect.set_options(timeout=TIMEOUT_MS)
    context, ana = await open_desk(browser, scene, "ana@example.com")
    try:
        await ana.get_by_role("button", name="Channels").click()
        rows = ana.locator("#channel-rows tr")
        await expect(rows).to_have_count(2)  # the sandbox's web messenger and WhatsApp
        form = ana.locator("#channel-form")
        await form.get_by_label("Type").select_option("whatsapp")
        await form.get_by_label("Name").fill("Support line")
        await form.get_by_label("Phone number (+E.164)").fill("+15550123000")
        await form.get_by_label("Phone number id").fill("123000123000")
        await form.get_by_label("Access token").fill("a-fake-access-token-for-the-test")
        await form.get_by_label("App secret").fill("the-app-secret-of-the-test")
        await form.get_by_role("button", name="Add").click()
        await expect(rows).to_have_count(3)
        added = rows.filter(has_text="Support line")
        await expect(added).to_contain_text("Webhook URL: http")
        await expect(added).to_contain_text("Verify token: ")
        await expect(added).to_contain_text("never")
        integration_id = await added.get_attribute("data-channel")
        url = f"{scene.base}/webhooks/whatsapp/{integration_id}"
        await expect(added).to_contain_text(url)

        # The platform's first webhook, signed with the app secret: the desk shows when it came.
        body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
            "field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550123000", "phone_number_id": "123000123000"},
                "contacts": [{"profile": {"name": "Kim"}, "wa_id": "15550777"}],
                "messages": [{"from": "15550777", "id": "wamid.setup1", "timestamp": str(int(time.time())),
                              "type": "text", "text": {"body": "hello support"}}]}}]}]}).encode()

        async def delivered() -> bool:
            async with scene.http.post(url, data=body, headers={
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": meta_signature("the-app-secret-of-the-test", body)}) as resp:
                return resp.status == 200
        await eventually(delivered, timeout=15.0)
        await ana.get_by_role("button", name="Back to conversations").click()
        await ana.get_by_role("button", name="Channels").click()
        await expect(rows.filter(has_text="Support line")).not_to_contain_text("never")

        # The app's push channel too: an Android app with its service account.
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        await form.get_by_label("Type").select_option("android")
        await form.get_by_label("Name").fill("Shop app")
        await form.get_by_label("Firebase project id").fill("shop-app-test")
        await form.get_by_label("Service account e-mail").fill("push@shop-app-test.iam.gserviceaccount.com")
        await form.get_by_label("Service account private key (PEM)").fill(key)
        await form.get_by_role("button", name="Add").click()
        android = rows.filter(has_text="Shop app")
        await expect(android).to_contain_text("active")
        await expect(rows).to_have_count(4)

        # An admin removes the channel.
        ana.once("dialog", lambda dialog: dialog.accept())
        await rows.filter(has_text="Support line").get_by_role("button", name="Remove").click()
        await expect(rows).to_have_count(3)
        async with scene.http.get(f"{scene.base}/v2/apps/{scene.app_id}/integrations/{integration_id}",
                                  headers=scene.auth) as resp:
            assert resp.status == 404
    finally:
        await context.close()


async def test_an_agent_signs_in_with_single_sign_on(browser: Browser, scene: Scene) -> None:
    expect.set_options(timeout=TIMEOUT_MS)
    async with oidc_provider() as provider:
        await scene.rest("PUT", "/desk/settings", {"sso": {"issuer": provider.base, "clientId": provider.client_id,
                                                           "clientSecret": provider.client_secret}})
        context = await browser.new_context(viewport={"width": 1400, "height": 900})
        try:
            page = await context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            await page.goto(f"{scene.base}/desk/?app={scene.app_id}")
            await page.get_by_role("button", name="Sign in with single sign-on").click()
            await expect(page.locator("#desk")).to_be_visible()
            await expect(page.locator("#me")).to_have_text("Ben · agent")
            assert provider.token_requests == 1
        finally:
            await context.close()


async def test_the_sandbox_page_opens_the_desk_as_the_demo_agent(browser: Browser, system: System) -> None:
    expect.set_options(timeout=TIMEOUT_MS)
    await system.start("identity", "conversations", "web", "sandbox", "desk",
                       env={"THREADLINE_DESK_DEMO_AGENT_EMAIL": "demo@threadline.invalid"})
    await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET), system.data_dir,
                            ("web",), desk=True)
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        await page.goto(f"{system.base_url}/sandbox/")
        link = page.get_by_role("link", name="Open the agent desk")
        await expect(link).to_have_attribute("href", re.compile(r"^/desk/#demo=[0-9a-f]{24}$"))

        async def demo_agent_made() -> bool:
            desk = system.service("desk")
            app_id = (await link.get_attribute("href") or "").rpartition("=")[2]
            return await desk.store.agent_by_email(app_id, "demo@threadline.invalid") is not None

        await eventually(demo_agent_made, timeout=15.0)
        async with context.expect_page() as opened:
            await link.click()
        desk_page = await opened.value
        await expect(desk_page.locator("#me")).to_have_text("Demo agent · admin")
        await expect(desk_page.locator("#presence")).to_have_value("online")
    finally:
        await context.close()
