"""No `javascript:` (or `data:`, `vbscript:`, …) URL is ever rendered as a link or image, in
headless Chromium against the whole stack.

The business API refuses such URLs (tests/integration/test_conversations_api.py), so these tests
put them where the API cannot vouch for them: messages already in the conversations store (as
an older version stored them) for the web messenger, and a send straight to the sandbox's fake
WhatsApp Graph API for the sandbox's phone page. Either page must show the message without the
link, and no script may run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from services.conversations.store import dumps
from shared.ids import new_id
from shared.sunco import Author, FileContent, ImageContent, LinkAction, Message, TextContent
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, CHROMIUM, CHROMIUM_ARGS, System
from threadline.bootstrap import AccountKey, bootstrap_sandbox

TIMEOUT_MS = 8000
HOSTILE = ("javascript:window.__pwned=1", " JavaScript:window.__pwned=2", "java\tscript:window.__pwned=3",
           "data:text/html,<script>window.__pwned=4</script>", "vbscript:msgbox(5)")

pytestmark = pytest.mark.e2e


@asynccontextmanager
async def sandbox_page(base_url: str) -> AsyncIterator[Page]:
    """The sandbox page (the widget beside the simulated phones) in headless Chromium."""
    async with async_playwright() as pw:
        browser: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            tab = await context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            tab.on("dialog", lambda dialog: pytest.fail(f"a dialog opened: {dialog.message}"))
            await tab.goto(f"{base_url}/sandbox/")
            yield tab
        finally:
            await browser.close()


async def rendered_urls(scope: Any) -> list[str]:
    """Every href and src under `scope`, as attributes (what a click or a load would follow)."""
    return list(await scope.locator("a[href], img[src], iframe[src]").evaluate_all(
        "nodes => nodes.map(n => n.getAttribute('href') || n.getAttribute('src'))"))


async def sandbox(system: System, *kinds: str) -> dict[str, Any]:
    return await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   system.data_dir, ("web", *kinds))


async def test_the_widget_never_renders_a_script_url(system: System) -> None:
    await system.start("identity", "conversations", "webhooks", "web", "sandbox")
    await sandbox(system)
    async with sandbox_page(system.base_url) as page:
        widget = page.locator('[data-threadline="root"]')
        await widget.locator('[data-threadline="launcher"]').click()
        await widget.locator('[data-threadline="input"]').fill("Where is my invoice?")
        await widget.locator('[data-threadline="input"]').press("Enter")
        user_message = widget.locator('[data-threadline="message"][data-author="user"]')
        await expect(user_message).to_have_attribute("data-status", "confirmed")
        store = system.service("conversations").store
        [row] = await store.db.fetch("SELECT id, app_id FROM conversations")
        conversation_id, app_id = row["id"], row["app_id"]

        # Stored as a version without the API's URL check would have stored them.
        contents: list[Any] = []
        for index, url in enumerate(HOSTILE):
            contents += [FileContent(media_url=url, alt_text=f"invoice-{index}.pdf"),
                         ImageContent(media_url=url, alt_text=f"picture {index}"),
                         TextContent(text=f"see {index}", actions=[LinkAction(text=f"open {index}", uri=url)])]
        contents.append(FileContent(media_url="https://cdn.example/terms.pdf", alt_text="terms.pdf"))
        async with store.tx():
            for content in contents:
                received = time.time()
                message = Message(id=new_id(), received="2024-06-01T12:00:00.000Z",
                                  author=Author(type="business"), content=content)
                await store.insert_message(message.id, app_id, conversation_id, "business", None, None, None,
                                           new_id(), received, dumps(message))
        await page.reload()
        await widget.locator('[data-threadline="launcher"]').click()
        replies = widget.locator('[data-threadline="message"][data-author="business"]')
        await expect(replies).to_have_count(len(contents))

        urls = await rendered_urls(widget)
        assert urls == ["https://cdn.example/terms.pdf"], urls
        # The messages are still shown: the file's name as text, a placeholder for the picture.
        for index in range(len(HOSTILE)):
            await expect(replies.filter(has_text=f"invoice-{index}.pdf")).to_have_count(1)
            await expect(replies.filter(has_text=f"see {index}")).to_have_count(1)
        await expect(widget.locator('[data-threadline="file-unavailable"]')).to_have_count(len(HOSTILE))
        await expect(widget.locator('[data-threadline="image-missing"]')).to_have_count(len(HOSTILE))
        for index in range(len(HOSTILE)):
            await widget.get_by_text(f"invoice-{index}.pdf", exact=True).click()
        assert await page.evaluate("() => window.__pwned === undefined")


async def test_the_sandbox_phone_never_renders_a_script_url(system: System) -> None:
    await system.start("identity", "conversations", "webhooks", "web", "whatsapp", "sandbox")
    info = await sandbox(system, "whatsapp")
    whatsapp = info["integrations"]["whatsapp"]
    graph = f"{system.base_url}/sandbox/graph/v23.0/{whatsapp['phoneNumberId']}/messages"
    headers = {"Authorization": f"Bearer {whatsapp['accessToken']}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for index, url in enumerate(HOSTILE):
            for body in ({"type": "document", "document": {"link": url, "filename": f"invoice-{index}.pdf"}},
                         {"type": "image", "image": {"link": url, "caption": f"picture {index}"}}):
                async with http.post(graph, json={"messaging_product": "whatsapp", "to": "15551234567",
                                                  **body}) as resp:
                    assert resp.status == 200, await resp.text()
    async with sandbox_page(system.base_url) as page:
        await expect(page.locator("#tab-whatsapp")).to_have_attribute("aria-selected", "true")
        thread = page.locator("#phone-thread")
        for index in range(len(HOSTILE)):
            await expect(thread).to_contain_text(f"invoice-{index}.pdf")
            await expect(thread).to_contain_text(f"picture {index}")
        urls = await rendered_urls(thread)
        assert all(url.startswith(("http://", "https://", "sms:", "tel:")) for url in urls), urls
        await thread.get_by_text("invoice-0.pdf").click()
        assert await page.evaluate("() => window.__pwned === undefined")
