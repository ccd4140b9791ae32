"""A bot hands a web messenger conversation to an agent, in headless Chromium.

Two custom integrations, a bot and an agent system, each with its webhook and its own
integration key, sit on the app's switchboard (the bot by default, the agent next). The test
plays both systems through the official `sunshine_conversations_client`, each with its own key,
reacting to its own webhook: the customer writes in the widget, the bot asks with reply buttons,
the customer taps one, the bot passes control to the agent, and from then on the agent gets the
customer's messages (the bot, without standby events, does not) and its reply shows in the widget.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sunco
from playwright.async_api import Browser, Page, expect

from tests.e2e.test_widget_conversation import TIMEOUT_MS
from tests.e2e.test_widget_rich_messages import (
    hook,
    messages,
    shop_site,
    wait_event,
    widget_page_html,
)
from tests.harness import System, business_webhooks
from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web

pytestmark = pytest.mark.e2e

TRIGGERS = ["conversation:message", "conversation:postback", "switchboard:passControl"]


@dataclass
class Party:
    """One system on the switchboard: its custom integration, webhook events and key."""

    name: str
    integration_id: str
    events: list[dict[str, Any]]
    key_id: str
    secret: str

    def customer_texts(self) -> list[str]:
        """The customer's messages this system's webhook got, in order."""
        return [e["payload"]["message"]["content"].get("text", "") for e in self.events
                if e["type"] == "conversation:message" and e["payload"]["message"]["author"]["type"] == "user"]


@dataclass
class Desk:
    base_url: str
    app_id: str
    web_integration_id: str
    key_id: str
    secret: str
    bot: Party
    agent: Party
    site_url: str = ""

    def client(self, party: Party | None = None) -> sunco.ApiClient:
        key_id, secret = (self.key_id, self.secret) if party is None else (party.key_id, party.secret)
        return sunco.ApiClient(sunco.Configuration(host=self.base_url, username=key_id, password=secret))

    async def call(self, party: Party | None, fn: Any, *args: Any) -> Any:
        """`fn(api_client)(*args)` with `party`'s key (None: the app key), in a thread."""
        def run() -> Any:
            with self.client(party) as api:
                return fn(api)(*args)
        return await asyncio.to_thread(run)

    async def say(self, party: Party, conversation_id: str, content: dict[str, Any], name: str) -> None:
        post = sunco.MessagePost.from_dict({"author": {"type": "business", "displayName": name}, "content": content})
        await self.call(party, lambda api: sunco.MessagesApi(api).post_message, self.app_id, conversation_id, post)


async def system_on_switchboard(base_url: str, http: aiohttp.ClientSession, app_id: str, name: str, url: str,
                                events: list[dict[str, Any]]) -> Party:
    """A custom integration with its webhook, and its key (`POST …/integrations/{id}/keys`)."""
    async with http.post(f"{base_url}/v2/apps/{app_id}/integrations", headers=ACCOUNT, json={
            "type": "custom", "displayName": name, "webhooks": [{"target": url, "triggers": TRIGGERS}]}) as resp:
        assert resp.status == 201, await resp.text()
        integration_id = (await resp.json())["integration"]["id"]
    async with http.post(f"{base_url}/v2/apps/{app_id}/integrations/{integration_id}/keys", headers=ACCOUNT,
                         json={"displayName": f"{name} key"}) as resp:
        assert resp.status == 201, await resp.text()
        key = (await resp.json())["key"]
    assert key["id"].startswith("int_")
    return Party(name, integration_id, events, key["id"], key["secret"])


@pytest.fixture
async def desk(system: System) -> AsyncIterator[Desk]:
    await system.start("identity", "conversations", "webhooks", "web")
    async with (aiohttp.ClientSession() as http, business_webhooks() as (bot_url, bot_events),
                business_webhooks() as (agent_url, agent_events)):
        app_id, web_id = await create_app_with_web(http, system.base_url)
        async with http.post(f"{system.base_url}/v2/apps/{app_id}/keys", headers=ACCOUNT,
                             json={"displayName": "setup"}) as resp:
            assert resp.status == 201, await resp.text()
            key = (await resp.json())["key"]
        bot = await system_on_switchboard(system.base_url, http, app_id, "bot", bot_url, bot_events)
        agent = await system_on_switchboard(system.base_url, http, app_id, "agent", agent_url, agent_events)
        desk = Desk(system.base_url, app_id, web_id, key["id"], key["secret"], bot, agent)
        switchboard = (await desk.call(None, lambda api: sunco.SwitchboardsApi(api).create_switchboard,
                                       app_id)).switchboard
        members = lambda api: sunco.SwitchboardIntegrationsApi(api).create_switchboard_integration  # noqa: E731
        agent_member = (await desk.call(None, members, app_id, switchboard.id, sunco.SwitchboardIntegrationCreateBody(
            name="agent", integration_id=agent.integration_id, deliver_standby_events=False))
        ).switchboard_integration
        bot_member = (await desk.call(None, members, app_id, switchboard.id, sunco.SwitchboardIntegrationCreateBody(
            name="bot", integration_id=bot.integration_id, deliver_standby_events=False,
            next_switchboard_integration_id=agent_member.id))).switchboard_integration
        enabled = (await desk.call(None, lambda api: sunco.SwitchboardsApi(api).update_switchboard, app_id,
                                   switchboard.id, sunco.SwitchboardUpdateBody(
                                       enabled=True, default_switchboard_integration_id=bot_member.id))).switchboard
        assert enabled.enabled
        async with shop_site(widget_page_html(system.base_url, app_id, web_id)) as site_url:
            desk.site_url = site_url
            yield desk


@pytest.fixture
async def page(browser: Browser, desk: Desk) -> AsyncIterator[Page]:
    context = await browser.new_context()
    tab = await context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    await tab.goto(desk.site_url)
    try:
        yield tab
    finally:
        await context.close()


def in_control(event: dict[str, Any]) -> str | None:
    active = event["payload"]["conversation"].get("activeSwitchboardIntegration")
    return None if active is None else str(active["name"])


async def test_the_bot_hands_the_customer_to_an_agent(page: Page, desk: Desk) -> None:
    bot, agent = desk.bot, desk.agent
    # The customer writes in the widget: the bot, in control by default, hears it.
    await hook(page, "launcher").click()
    await expect(hook(page, "status")).to_have_attribute("data-state", "connected")
    await hook(page, "input").fill("Hi, I need help with an order")
    await hook(page, "send").click()
    first = await wait_event(bot.events, lambda e: e["type"] == "conversation:message")
    assert first["payload"]["message"]["content"]["text"] == "Hi, I need help with an order"
    assert in_control(first) == "bot"
    conversation_id = first["payload"]["conversation"]["id"]

    # The bot, with its own key, asks with reply buttons; the customer taps one in the widget.
    await desk.say(bot, conversation_id, {"type": "text", "text": "Is it about a delivery?", "actions": [
        {"type": "reply", "text": "Yes, a delivery", "payload": "TOPIC_DELIVERY"},
        {"type": "reply", "text": "Something else", "payload": "TOPIC_OTHER"}]}, "Shop bot")
    chips = hook(hook(page, "quick-replies"), "quick-reply")
    await expect(chips).to_have_text(["Yes, a delivery", "Something else"])
    await chips.first.click()
    await expect(hook(page, "quick-replies")).to_have_count(0)
    tapped = await wait_event(bot.events, lambda e: e["type"] == "conversation:message"
                              and e["payload"]["message"]["content"].get("payload") == "TOPIC_DELIVERY")
    assert tapped["payload"]["message"]["content"]["text"] == "Yes, a delivery"
    assert tapped["payload"]["message"]["author"]["type"] == "user"

    # The bot passes control to the next one on the switchboard: the agent.
    await desk.call(bot, lambda api: sunco.SwitchboardActionsApi(api).pass_control, desk.app_id, conversation_id,
                    sunco.PassControlBody(switchboard_integration="next", metadata={"topic": "delivery"}))
    passed = await wait_event(agent.events, lambda e: e["type"] == "switchboard:passControl")
    assert in_control(passed) == "agent" and passed["payload"]["metadata"] == {"topic": "delivery"}

    # The customer's next message goes to the agent, not to the bot.
    await hook(page, "input").fill("It was due yesterday")
    await hook(page, "send").click()
    late = await wait_event(agent.events, lambda e: e["type"] == "conversation:message"
                            and e["payload"]["message"]["content"].get("text") == "It was due yesterday")
    assert in_control(late) == "agent"
    # The agent answers with its own key; the reply shows in the widget under the agent's name.
    await desk.say(agent, conversation_id, {"type": "text", "text": "Sorry about that, I'm on it."}, "Ana (agent)")
    reply = messages(page, "business").last
    await expect(reply).to_contain_text("Sorry about that, I'm on it.")
    await expect(hook(reply, "meta")).to_have_attribute("data-label", re.compile(r"^Ana \(agent\) \u00b7 "))
    await expect(messages(page, "user")).to_have_text(["Hi, I need help with an order", "Yes, a delivery",
                                                       "It was due yesterday"])

    # The agent hands back to the bot by name; the customer's next message is the bot's again. A
    # webhook's events come in order, so once the bot has that one, it would have had the earlier
    # one too, had it been sent to it: it was not.
    await desk.call(agent, lambda api: sunco.SwitchboardActionsApi(api).pass_control, desk.app_id, conversation_id,
                    sunco.PassControlBody(switchboard_integration="bot"))
    await wait_event(bot.events, lambda e: e["type"] == "switchboard:passControl" and in_control(e) == "bot")
    await hook(page, "input").fill("Thanks!")
    await hook(page, "send").click()
    await wait_event(bot.events, lambda e: e["type"] == "conversation:message"
                     and e["payload"]["message"]["content"].get("text") == "Thanks!")
    assert bot.customer_texts() == ["Hi, I need help with an order", "Yes, a delivery", "Thanks!"]
    assert agent.customer_texts() == ["It was due yesterday"]
