"""The customer's rich answers through both SDK services (`web` at /sdk, `app` at /app): a tap on
a reply or postback button, a shared location and a form answer, each stored (or, for a
postback, announced) as SunCo content, and a session's first message may be one of them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.harness import System, business_webhooks
from tests.integration.test_app_service import APP_ENV, android_integration
from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web, eventually


@pytest.fixture
async def stack(system: System) -> AsyncIterator[System]:
    await system.start("identity", "conversations", "webhooks", "web", "app", "sandbox", env=APP_ENV)
    yield system


class Customer:
    """An SDK session of one of the two services, and the business's side of its conversation."""

    def __init__(self, http: aiohttp.ClientSession, base: str, root: str, app_id: str) -> None:
        self.http, self.base, self.root, self.app_id = http, base, root, app_id
        self.session: dict[str, Any] = {}

    @property
    def sdk(self) -> str:
        return f"{self.base}/{self.root}/v1/apps/{self.app_id}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session['sessionToken']}"}

    async def start(self, integration_id: str, body: dict[str, Any]) -> None:
        """A pending session whose first message is `body`."""
        async with self.http.post(f"{self.sdk}/integrations/{integration_id}/sessions") as resp:
            assert resp.status == 201, await resp.text()
            self.session = await resp.json()
        async with self.http.post(f"{self.sdk}/conversations", headers=self.auth,
                                  json={"clientMessageId": str(uuid.uuid4()), **body}) as resp:
            assert resp.status == 201, await resp.text()
            self.session = await resp.json()

    async def post(self, body: dict[str, Any]) -> None:
        async with self.http.post(f"{self.sdk}/conversations/{self.session['conversationId']}/messages",
                                  headers=self.auth, json={"clientMessageId": str(uuid.uuid4()), **body}) as resp:
            assert resp.status == 202, await resp.text()

    async def history(self, count: int) -> list[dict[str, Any]]:
        """The conversation's messages once there are `count`."""
        async def page() -> list[dict[str, Any]] | None:
            async with self.http.get(f"{self.sdk}/conversations/{self.session['conversationId']}/messages",
                                     headers=self.auth) as resp:
                assert resp.status == 200, await resp.text()
                entries = (await resp.json())["messages"]
            assert len(entries) <= count, [e["message"]["content"] for e in entries]
            return [e["message"] for e in entries] if len(entries) == count else None

        found: list[dict[str, Any]] = await eventually(page)
        return found

    async def business(self, content: dict[str, Any]) -> str:
        async with self.http.post(f"{self.base}/v2/apps/{self.app_id}/conversations/"
                                  f"{self.session['conversationId']}/messages", headers=ACCOUNT,
                                  json={"author": {"type": "business"}, "content": content}) as resp:
            assert resp.status == 201, await resp.text()
            return str((await resp.json())["messages"][0]["id"])


@pytest.mark.parametrize("root", ["sdk", "app"])
async def test_taps_locations_and_form_answers(stack: System, root: str) -> None:
    async with aiohttp.ClientSession() as http, business_webhooks() as (url, events):
        app_id, web_id = await create_app_with_web(http, stack.base_url)
        async with http.post(f"{stack.base_url}/v2/apps/{app_id}/integrations", headers=ACCOUNT, json={
                "type": "custom", "webhooks": [{"target": url, "triggers": ["conversation:postback"]}]}) as resp:
            assert resp.status == 201, await resp.text()
        integration_id = web_id if root == "sdk" else (await android_integration(http, stack.base_url, app_id))["id"]
        customer = Customer(http, stack.base_url, root, app_id)
        # The first message may be a shared location (the app's install comes with it).
        start: dict[str, Any] = {"location": {"lat": 52.52, "long": 13.405, "name": "Home"}}
        if root == "app":
            start["device"] = {"guid": "install-1", "appVersion": "1.0"}
        await customer.start(integration_id, start)
        [first] = await customer.history(1)
        assert first["content"] == {"type": "location", "coordinates": {"lat": 52.52, "long": 13.405},
                                    "location": {"name": "Home"}}

        await customer.business({"type": "text", "text": "Which one?", "actions": [
            {"type": "reply", "text": "Blue", "payload": "COLOR_BLUE"},
            {"type": "postback", "text": "Call me", "payload": "CALL_ME"}]})
        form_id = await customer.business({"type": "form", "fields": [
            {"type": "text", "name": "name", "label": "Name"},
            {"type": "select", "name": "size", "label": "Size", "options": [{"name": "s", "label": "Small"}]}]})
        await customer.post({"text": "Blue", "payload": "COLOR_BLUE"})
        await customer.post({"text": "Call me", "payload": "CALL_ME"})
        # An answer to something that is not a form of the conversation is dropped, not stored.
        await customer.post({"formResponse": {"quotedMessageId": first["id"], "fields": [
            {"type": "text", "name": "name", "label": "Name", "text": "Bob"}]}})
        await customer.post({"formResponse": {"quotedMessageId": form_id, "fields": [
            {"type": "text", "name": "name", "label": "Name", "text": "Ada"},
            {"type": "select", "name": "size", "label": "Size", "select": [{"name": "s", "label": "Small"}]}]}})
        await customer.post({"location": {"lat": -33.8568, "long": 151.2153}})
        history = await customer.history(6)
        tap, answer, location = history[3:]
        assert tap["content"] == {"type": "text", "text": "Blue", "payload": "COLOR_BLUE"}
        assert answer["content"] == {"type": "formResponse", "textFallback": "Name: Ada\nSize: Small", "fields": [
            {"type": "text", "name": "name", "label": "Name", "text": "Ada", "quotedMessageId": form_id},
            {"type": "select", "name": "size", "label": "Size", "select": [{"name": "s", "label": "Small"}],
             "quotedMessageId": form_id}]}
        assert location["content"] == {"type": "location", "coordinates": {"lat": -33.8568, "long": 151.2153}}
        # The postback tap is no message: the business heard it as `conversation:postback`.
        async def postbacks() -> list[dict[str, Any]]:
            return [e for e in events if e["type"] == "conversation:postback"]

        [tapped] = await eventually(postbacks)
        assert tapped["payload"]["postback"] == {"payload": "CALL_ME"}
        assert tapped["payload"]["source"]["type"] == ("web" if root == "sdk" else "android")
