"""The sandbox page in headless Chromium: layout (phone and open widget never overlap, no sideways
scroll on a phone), the phone keeps the newest message in view and does not refetch broken images."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from shared.bus import Bus
from tests.fakes.whatsapp_env import CUSTOMER, WaEnv, start_whatsapp
from tests.harness import System
from tests.integration.test_web_conversation import create_app_with_web

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 8000

pytestmark = pytest.mark.e2e


@pytest.fixture
async def sandbox(system: System, bus: Bus) -> WaEnv:
    """whatsapp + sandbox + the web widget's services, and a sandbox.json like `threadline up` writes."""
    # conversations first: it republishes the integrations bucket from its database at start.
    await system.start("identity", "conversations", "web")
    wa = await start_whatsapp(system, bus)
    async with aiohttp.ClientSession() as http:
        app_id, web_id = await create_app_with_web(http, system.base_url, businessName="Threadline Demo Shop")
    Path(system.data_dir).mkdir(parents=True, exist_ok=True)
    (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({
        "baseUrl": system.base_url, "appId": app_id, "apiKey": {"id": "app_key_x", "secret": "not-on-the-page"},
        "integrations": {"web": {"id": web_id}, "whatsapp": {"id": wa.integration_id}}}))
    return wa


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


async def open_page(browser: Browser, url: str, width: int, height: int) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(url)
    return page


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (1440, 900), (1024, 768), (900, 700)])
async def test_open_widget_never_covers_the_phone(sandbox: WaEnv, browser: Browser, width: int,
                                                  height: int) -> None:
    page = await open_page(browser, f"{sandbox.system.base_url}/sandbox/", width, height)
    try:
        await page.locator('[data-threadline="launcher"]').click()
        panel = page.locator('[data-threadline="panel"]')
        await expect(panel).to_be_visible()
        await expect(page.locator('[data-threadline="root"] .tl-title')).to_have_text("Threadline Demo Shop")
        await expect(page.locator("#brand-name")).to_have_text("Threadline Demo Shop")
        panel_box = await panel.bounding_box()
        phone_box = await page.locator(".phone-frame").bounding_box()
        assert panel_box is not None and phone_box is not None
        assert not overlaps(panel_box, phone_box), (panel_box, phone_box)
        # The phone's input and Send button are what a click there reaches.
        for selector in ("#phone-text", '#phone-compose button[type="submit"]'):
            hit = await page.locator(selector).evaluate(
                "el => { const r = el.getBoundingClientRect();"
                " return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === el; }")
            assert hit, selector
        assert await page.evaluate("document.documentElement.scrollWidth") <= width
    finally:
        await page.context.close()


async def test_mobile_page_does_not_scroll_sideways(sandbox: WaEnv, browser: Browser) -> None:
    page = await open_page(browser, f"{sandbox.system.base_url}/sandbox/", 390, 844)
    try:
        await expect(page.locator('[data-threadline="launcher"]')).to_be_visible()
        await expect(page.locator("#curl")).to_contain_text("app_key_x")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.locator('[data-threadline="launcher"]').click()
        await expect(page.locator('[data-threadline="panel"]')).to_be_visible()
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        await page.context.close()


async def test_phone_scrolls_to_new_messages_and_does_not_refetch_broken_images(
        sandbox: WaEnv, browser: Browser) -> None:
    graph = f"{sandbox.system.base_url}/sandbox/graph/v23.0/{sandbox.record.config['phoneNumberId']}/messages"
    auth = {"Authorization": f"Bearer {sandbox.record.config['accessToken']}"}
    broken = f"{sandbox.system.base_url}/sandbox/static/missing-picture.png"
    page = await open_page(browser, f"{sandbox.system.base_url}/sandbox/", 1280, 800)
    image_requests: list[str] = []
    page.on("request", lambda request: image_requests.append(request.url) if request.url == broken else None)
    try:
        async with aiohttp.ClientSession() as http:
            async def send(body: dict[str, Any]) -> None:
                async with http.post(graph, headers=auth, json={"messaging_product": "whatsapp",
                                                                "to": CUSTOMER, **body}) as resp:
                    assert resp.status == 200, await resp.text()

            for n in range(25):
                await send({"type": "text", "text": {"body": f"line {n}"}})
            await send({"type": "image", "image": {"link": broken, "caption": "a lost picture"}})
            await send({"type": "interactive", "interactive": {
                "type": "button", "body": {"text": "Pick one"},
                "action": {"buttons": [{"type": "reply", "reply": {"id": "yes", "title": "Yes please"}}]}}})
        thread = page.locator("#phone-thread")
        await expect(thread.locator(".img-missing")).to_have_count(1)
        await expect(thread.locator("img")).to_have_count(0)
        await expect(thread.locator("li").last).to_contain_text("Pick one")

        async def at_bottom() -> None:
            await page.wait_for_function(
                "() => { const t = document.getElementById('phone-thread');"
                " return t.scrollHeight > t.clientHeight && t.scrollTop + t.clientHeight >= t.scrollHeight - 2; }")

        await at_bottom()
        await page.get_by_role("button", name="Yes please").click()
        await expect(thread.locator("li.in").last).to_contain_text("Yes please")
        await at_bottom()
        # Later polls (statuses change: read receipts) render again without fetching the image again.
        for _ in range(2):
            async with page.expect_response(lambda r: "/thread?" in r.url):
                pass
        await expect(thread.locator("li.in .meta").last).to_be_visible()
        assert len(image_requests) == 1
    finally:
        await page.context.close()
