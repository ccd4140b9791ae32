"""A customer sends pictures and documents from the widget in headless Chromium: the paper clip
(a file chosen), a file dropped on the conversation, a pasted screenshot. The widget checks the
type and the size first and says what it refuses; what it accepts is uploaded to `web`
(`POST /sdk/…/attachments`) and sent as an image or file message, which the business's webhook
receives with a URL that `conversations` serves, and which the history keeps.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sunco
from playwright.async_api import Browser, Page, Route, expect

from tests.e2e.test_widget_conversation import TIMEOUT_MS
from tests.e2e.test_widget_rich_messages import (
    Shop,
    hook,
    messages,
    new_app,
    shop_site,
    wait_event,
    widget_page_html,
)
from tests.harness import System, business_webhooks

pytestmark = pytest.mark.e2e

# The widget's limit for this shop (THREADLINE_SDK_MAX_UPLOAD_BYTES), which its config tells it.
LIMIT = 64 * 1024
# A real 1×1 PNG (the browser must be able to show it) and a small PDF.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                       "AAAABJRU5ErkJggg==")
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


@pytest.fixture
async def shop(system: System) -> AsyncIterator[Shop]:
    await system.start("identity", "conversations", "webhooks", "web",
                       env={"THREADLINE_SDK_MAX_UPLOAD_BYTES": str(LIMIT)})
    async with aiohttp.ClientSession() as http, business_webhooks() as (hook_url, events):
        app_id, web_id, key_id, secret = await new_app(system, http, hook_url)
        async with shop_site(widget_page_html(system.base_url, app_id, web_id)) as site_url:
            yield Shop(system.base_url, app_id, web_id, key_id, secret, events, site_url)


@pytest.fixture
async def page(browser: Browser, shop: Shop) -> AsyncIterator[Page]:
    context = await browser.new_context()
    tab = await context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    await tab.goto(shop.site_url)
    try:
        yield tab
    finally:
        await context.close()


def user_media(kind: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        message = event["payload"].get("message", {}) if event["type"] == "conversation:message" else {}
        return message.get("author", {}).get("type") == "user" and message.get("content", {}).get("type") == kind
    return match


async def fetch(url: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def test_the_customer_attaches_a_picture_and_a_document(page: Page, shop: Shop) -> None:
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    attach = hook(page, "attach")
    await expect(attach).to_have_accessible_name("Attach a file")
    files = hook(page, "file-input")

    # Checked in the browser first: a web page, or a file over the shop's limit, never leaves it.
    await files.set_input_files({"name": "page.html", "mimeType": "text/html", "buffer": b"<html></html>"})
    await expect(hook(page, "attach-error")).to_contain_text("\u201Cpage.html\u201D can\u2019t be sent")
    await files.set_input_files({"name": "huge.png", "mimeType": "image/png",
                                 "buffer": PNG + b"\x00" * LIMIT})
    await expect(hook(page, "attach-error")).to_contain_text("is too large: files can be at most 64 KB")
    await expect(hook(page, "upload")).to_have_count(0)
    await expect(messages(page, "user")).to_have_count(0)

    # A picture: the conversation's first message.
    await files.set_input_files({"name": "receipt.png", "mimeType": "image/png", "buffer": PNG})
    await expect(hook(page, "attach-error")).to_be_hidden()
    sent = messages(page, "user").last
    await expect(sent).to_have_attribute("data-type", "image")
    await expect(sent).to_have_attribute("data-status", "confirmed")
    event = await wait_event(shop.events, user_media("image"))
    content = event["payload"]["message"]["content"]
    url = content["mediaUrl"]
    assert url.startswith(f"{shop.base_url}/attachments/v1/{shop.app_id}/") and url.endswith("/receipt.png")
    assert (content["mediaType"], content["altText"]) == ("image/png", "receipt.png")
    assert await fetch(url) == (200, PNG, "image/png")
    # The widget shows the stored picture itself, loaded from its URL.
    picture = sent.locator("img")
    await expect(picture).to_have_attribute("src", url)
    await expect(picture).to_have_js_property("complete", True)
    assert await picture.evaluate("img => img.naturalWidth") == 1
    shop.conversation_id = event["payload"]["conversation"]["id"]
    [stored] = await shop.history()
    assert isinstance(stored.content.actual_instance, sunco.ImageMessage)
    assert stored.content.actual_instance.media_url == url

    # A document. Its upload shows in the thread with its progress; the first try is cut off
    # (the network), the customer taps it and it goes.
    held: asyncio.Queue[Route] = asyncio.Queue()

    await page.route("**/attachments", held.put)
    await files.set_input_files({"name": "invoice.pdf", "mimeType": "application/pdf", "buffer": PDF})
    upload = hook(page, "upload")
    await expect(upload).to_contain_text("invoice.pdf")
    await expect(hook(upload, "upload-progress")).to_have_accessible_name("Uploading invoice.pdf")
    cut = await asyncio.wait_for(held.get(), TIMEOUT_MS / 1000)
    await cut.abort("connectionreset")
    await expect(upload).to_have_attribute("data-status", "failed")
    await expect(hook(page, "attach-error")).to_contain_text("“invoice.pdf” was not sent")
    await expect(hook(page, "attach-error")).to_contain_text("Tap it to try again")
    await page.unroute("**/attachments")
    await upload.click()
    document = messages(page, "user").last
    await expect(document).to_have_attribute("data-type", "file")
    await expect(document).to_have_attribute("data-status", "confirmed")
    event = await wait_event(shop.events, user_media("file"))
    file_url = event["payload"]["message"]["content"]["mediaUrl"]
    assert event["payload"]["message"]["content"]["altText"] == "invoice.pdf"
    link = document.locator("a")
    await expect(link).to_have_text("invoice.pdf")
    await expect(hook(page, "upload")).to_have_count(0)
    await expect(hook(page, "attach-error")).to_be_hidden()
    await expect(link).to_have_attribute("href", file_url)
    assert (await fetch(file_url))[:2] == (200, PDF)
    assert [type(m.content.actual_instance) for m in await shop.history()] == [sunco.ImageMessage,
                                                                              sunco.FileMessage]

    # After a reload the history shows both as the widget shows any picture or file.
    await page.reload()
    await hook(page, "launcher").click()
    await expect(messages(page, "user")).to_have_count(2)
    await expect(messages(page, "user").first.locator("img")).to_have_attribute("src", url)
    await expect(messages(page, "user").last.locator("a")).to_have_attribute("href", file_url)


async def test_a_dropped_file_and_a_pasted_screenshot_are_sent(page: Page, shop: Shop) -> None:
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    png = list(PNG)
    # A file dragged from the desktop and dropped on the conversation.
    await page.evaluate("""(bytes) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        const panel = document.querySelector('[data-threadline="panel"]');
        const over = new DragEvent("dragover", {dataTransfer: data, bubbles: true, cancelable: true});
        document.querySelector('[data-threadline="messages"]').dispatchEvent(over);
        if (!over.defaultPrevented || panel.getAttribute("data-dragging") !== "true") {
            throw new Error("the panel is no drop target");
        }
        panel.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", png)
    await expect(messages(page, "user").last).to_have_attribute("data-status", "confirmed")
    await expect(hook(page, "panel")).not_to_have_attribute("data-dragging", "true")
    dropped = await wait_event(shop.events, lambda e: user_media("image")(e)
                               and e["payload"]["message"]["content"]["altText"] == "dropped.png")
    # A screenshot pasted in the message input.
    await page.evaluate("""(bytes) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "image.png", {type: "image/png"}));
        const input = document.querySelector('[data-threadline="input"]');
        input.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
    }""", png)
    await expect(messages(page, "user")).to_have_count(2)
    await expect(messages(page, "user").last).to_have_attribute("data-status", "confirmed")
    pasted = await wait_event(shop.events, lambda e: user_media("image")(e)
                              and e["payload"]["message"]["content"]["altText"] == "image.png")
    assert await hook(page, "input").input_value() == ""
    for event in (dropped, pasted):
        assert await fetch(event["payload"]["message"]["content"]["mediaUrl"]) == (200, PNG, "image/png")
