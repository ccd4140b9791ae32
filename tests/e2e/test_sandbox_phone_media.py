"""The sandbox page's WhatsApp phone sends a photo, in headless Chromium: the paper clip refuses
what WhatsApp does not carry, uploads the photo (its progress in the thread), the fake delivers
WhatsApp's image webhook, and the business gets a Threadline attachment URL serving the same
bytes in its webhook and in the conversation's history; the phone shows the photo it sent."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Route, expect

from shared.http import basic_auth_header
from tests.e2e.test_sandbox_app_phone import TIMEOUT_MS, eventually
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from tests.integration.test_sandbox_phone_media import png
from threadline.bootstrap import AccountKey, bootstrap_sandbox

CUSTOMER = "+15557003003"
PHOTO = png(3, 2)
UPLOADS = re.compile(r"/sandbox/uploads$")

pytestmark = pytest.mark.e2e


async def test_the_whatsapp_phone_sends_a_photo_the_business_gets_as_a_threadline_file(
        system: System, browser: Browser) -> None:
    await system.start("identity", "conversations", "webhooks", "whatsapp", "web", "sandbox")
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", "whatsapp"))
    app_id, whatsapp_id = info["appId"], info["integrations"]["whatsapp"]["id"]
    auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
    sandbox = system.service("sandbox")

    async def ready() -> bool:  # the channel service and the fake both know the integration
        sandbox.sync_accounts()
        return (system.service("whatsapp").credentials(whatsapp_id) is not None
                and whatsapp_id in sandbox.fake.accounts)

    await eventually(ready)
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession(headers=auth) as http:
        async with http.post(f"{system.base_url}/v2/apps/{app_id}/integrations", json={
                "type": "custom", "webhooks": [{"target": hook_url, "triggers": ["conversation:message"]}]}) as resp:
            assert resp.status == 201, await resp.text()

        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        await page.goto(f"{system.base_url}/sandbox/?channel=whatsapp")
        await page.locator("#phone-number").fill(CUSTOMER)
        await page.locator("#phone-number").dispatch_event("change")
        attach = page.get_by_role("button", name="Attach a photo or file")
        await expect(attach).to_be_visible()

        # What WhatsApp does not carry never leaves the phone.
        async with page.expect_file_chooser() as chooser:
            await attach.click()
        await (await chooser.value).set_files(
            {"name": "sticker.webp", "mimeType": "image/webp", "buffer": b"RIFF\x00\x00\x00\x00WEBPVP8 "})
        await expect(page.locator("#phone-error")).to_contain_text("“sticker.webp” can’t be sent on WhatsApp")

        # The photo: uploaded (its progress shown while it goes), then sent by the fake.
        held: asyncio.Queue[Route] = asyncio.Queue()
        await page.route(UPLOADS, held.put)
        async with page.expect_file_chooser() as chooser:
            await attach.click()
        await (await chooser.value).set_files({"name": "vase.png", "mimeType": "image/png", "buffer": PHOTO})
        uploading = page.locator("#phone-thread li.in").last
        await expect(uploading).to_contain_text("vase.png")
        await expect(uploading.get_by_label("Uploading vase.png")).to_be_visible()
        await (await asyncio.wait_for(held.get(), TIMEOUT_MS / 1000)).continue_()
        await page.unroute(UPLOADS)

        def image_event() -> dict[str, Any] | None:
            return next((e for e in events if e["type"] == "conversation:message"
                         and e["payload"]["message"]["content"]["type"] == "image"), None)

        async def arrived() -> dict[str, Any] | None:
            return image_event()

        event = await eventually(arrived, timeout=15.0)
        message = event["payload"]["message"]
        assert message["author"]["type"] == "user" and message["source"]["type"] == "whatsapp"
        url = message["content"]["mediaUrl"]
        assert url.startswith(f"{system.base_url}/attachments/v1/{app_id}/"), url
        async with http.get(url) as resp:
            assert resp.status == 200 and await resp.read() == PHOTO and resp.content_type == "image/png"
        history = (await (await http.get(
            f"{system.base_url}/v2/apps/{app_id}/conversations/{event['payload']['conversation']['id']}/messages"
        )).json())["messages"]
        assert [(m["content"]["type"], m["content"].get("mediaUrl")) for m in history] == [("image", url)]

        # The phone shows the photo it sent, from the sandbox's copy, once WhatsApp has it.
        photo = page.locator("#phone-thread li.in").last.locator("img")
        await expect(photo).to_have_attribute("src", re.compile(r"/sandbox/uploads/[^/]+/vase\.png$"))
        await expect(photo).to_have_js_property("complete", True)
        assert await photo.evaluate("img => img.naturalWidth") == 3
        await expect(page.locator("#phone-thread li.in")).to_have_count(1)
        await expect(page.locator("#phone-error")).to_be_hidden()
        await context.close()
