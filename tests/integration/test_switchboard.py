"""The switchboard, driven by the official SunCo client unchanged: a bot and an agent system
(two custom integrations with their webhooks and keys) share conversations; the one in control
gets the customer's messages, the other only when it asked for standby events; control passes,
is offered and accepted, and released back to the default, each announced once as SunCo's
`switchboard:*` webhooks; a caller that does not have control is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sc
from sunshine_conversations_client.rest import ApiException

from tests.harness import System, business_webhooks
from tests.integration.test_conversations_api import Tenant, create_tenant, eventually

TRIGGERS = ["conversation:message", "switchboard:passControl", "switchboard:offerControl",
            "switchboard:acceptControl", "switchboard:releaseControl", "switchboard:passControl:failure",
            "switchboard:offerControl:failure", "switchboard:acceptControl:failure"]


@dataclass
class Party:
    """A custom integration (a bot, an agent desk) with its webhook's events and its own key."""

    integration_id: str
    events: list[dict[str, Any]]
    key_id: str
    secret: str
    member_id: str = ""

    def messages(self) -> list[str]:
        return [e["payload"]["message"]["content"]["text"] for e in self.events if e["type"] == "conversation:message"]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


@dataclass
class Desk:
    t: Tenant
    bot: Party
    agent: Party
    switchboard_id: str
    user_id: str = ""
    conversation_id: str = ""

    def actions(self, party: Party | None = None) -> sc.SwitchboardActionsApi:
        client = self.t.client() if party is None else self.t.client(party.key_id, party.secret)
        return sc.SwitchboardActionsApi(client)

    async def say(self, text: str) -> None:
        """The customer writes (through the API, as a user-authored message)."""
        post = sc.MessagePost(author=sc.Author(type="user", user_id=self.user_id),
                              content=sc.Content(sc.TextMessage(type="text", text=text)))
        await self.t.call(sc.MessagesApi(self.t.client()).post_message, self.t.app_id, self.conversation_id, post)

    async def in_control(self) -> str | None:
        conversation = (await self.t.call(sc.ConversationsApi(self.t.client()).get_conversation, self.t.app_id,
                                          self.conversation_id)).conversation
        active = conversation.active_switchboard_integration
        return None if active is None else active.name


async def _party(t: Tenant, name: str, url: str, events: list[dict[str, Any]]) -> Party:
    integrations = sc.IntegrationsApi(t.client())
    custom = (await t.call(integrations.create_integration, t.app_id, sc.Custom(
        display_name=name, webhooks=[sc.Webhook(target=url, triggers=TRIGGERS)]))).integration
    key = (await t.call(sc.CustomIntegrationApiKeysApi(t.client()).create_custom_integration_key, t.app_id, custom.id,
                        sc.IntegrationApiKey(display_name=f"{name} key"))).key
    assert key.id.startswith("int_") and key.secret
    return Party(custom.id, events, key.id, key.secret)


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """The conversations store on SQLite, then on PostgreSQL."""
    return system_on_each_engine


@pytest.fixture
async def desk(system: System) -> AsyncIterator[Desk]:
    await system.start("identity", "conversations", "webhooks")
    async with (aiohttp.ClientSession() as http, business_webhooks() as (bot_url, bot_events),
                business_webhooks() as (agent_url, agent_events)):
        t = Tenant(system, http, *await create_tenant(system, http))
        bot = await _party(t, "bot", bot_url, bot_events)
        agent = await _party(t, "agent", agent_url, agent_events)
        switchboards = sc.SwitchboardsApi(t.client())
        switchboard = (await t.call(switchboards.create_switchboard, t.app_id)).switchboard
        assert switchboard.enabled is False  # configured first, then enabled
        members = sc.SwitchboardIntegrationsApi(t.client())
        # The agent desk hears nothing while the bot talks; the bot keeps listening after handing over.
        agent.member_id = (await t.call(members.create_switchboard_integration, t.app_id, switchboard.id,
                                        sc.SwitchboardIntegrationCreateBody(
                                            name="agent", integration_id=agent.integration_id,
                                            deliver_standby_events=False, message_history_count=5))
                           ).switchboard_integration.id
        created = (await t.call(members.create_switchboard_integration, t.app_id, switchboard.id,
                                sc.SwitchboardIntegrationCreateBody(
                                    name="bot", integration_id=bot.integration_id, deliver_standby_events=True,
                                    next_switchboard_integration_id=agent.member_id))).switchboard_integration
        bot.member_id = created.id
        assert created.integration_type == "custom" and created.next_switchboard_integration_id == agent.member_id
        await t.call(members.update_switchboard_integration, t.app_id, switchboard.id, agent.member_id,
                     sc.SwitchboardIntegrationUpdateBody(next_switchboard_integration_id=bot.member_id))
        enabled = (await t.call(switchboards.update_switchboard, t.app_id, switchboard.id, sc.SwitchboardUpdateBody(
            enabled=True, default_switchboard_integration_id=bot.member_id))).switchboard
        assert enabled.enabled and enabled.default_switchboard_integration_id == bot.member_id
        yield Desk(t, bot, agent, switchboard.id)


async def _conversation(d: Desk, external_id: str = "customer-1") -> None:
    user = (await d.t.call(sc.UsersApi(d.t.client()).create_user, d.t.app_id,
                           sc.UserCreateBody(external_id=external_id))).user
    body = sc.ConversationCreateBody(type="personal", participants=[
        sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user.id))])
    conversation = (await d.t.call(sc.ConversationsApi(d.t.client()).create_conversation, d.t.app_id,
                                   body)).conversation
    d.user_id, d.conversation_id = user.id, conversation.id


async def _until(check: Callable[[], bool], timeout: float = 8.0) -> None:
    async def probe() -> bool:
        return check()

    await eventually(probe, timeout)


async def _refused(call: Any) -> ApiException:
    try:
        await call
    except ApiException as exc:
        return exc
    raise AssertionError("the call was not refused")


async def test_bot_hands_over_to_the_agent_and_back(desk: Desk) -> None:
    d = desk
    await _conversation(d)
    assert await d.in_control() == "bot"  # a new conversation starts with the default
    await d.say("hi")
    await _until(lambda: d.bot.messages() == ["hi"])

    # The bot hands over to its next, with context; both sides hear of it, parsed by the client's models.
    await d.t.call(d.actions(d.bot).pass_control, d.t.app_id, d.conversation_id, sc.PassControlBody(
        switchboard_integration="next", metadata={"topic": "billing", "vip": True}))
    await _until(lambda: bool(d.agent.of("switchboard:passControl")) and bool(d.bot.of("switchboard:passControl")))
    [passed] = d.agent.of("switchboard:passControl")
    event = sc.SwitchboardPassControl.from_dict(passed)
    assert event.payload.metadata == {"topic": "billing", "vip": True}
    active = event.payload.conversation.active_switchboard_integration
    assert active.name == "agent" and active.integration_id == d.agent.integration_id
    assert active.integration_type == "custom" and active.id == d.agent.member_id
    assert await d.in_control() == "agent"

    await d.say("I need a human")
    await _until(lambda: d.agent.messages() == ["I need a human"] and "I need a human" in d.bot.messages())
    assert d.agent.messages() == ["I need a human"]  # never "hi": it was the bot's
    message_event = sc.ConversationMessageEvent.from_dict(d.agent.of("conversation:message")[0])
    assert message_event.payload.conversation.active_switchboard_integration.name == "agent"

    # The bot is in standby now: it may not act for the conversation any more.
    refused = await _refused(d.t.call(d.actions(d.bot).release_control, d.t.app_id, d.conversation_id,
                                      sc.ReleaseControlBody()))
    assert refused.status == 403 and "forbidden" in (refused.body or "")

    # The agent is done: nobody is in control until the customer writes, then the default is.
    await d.t.call(d.actions(d.agent).release_control, d.t.app_id, d.conversation_id,
                   sc.ReleaseControlBody(metadata={"resolution": "refunded"}))
    await _until(lambda: bool(d.bot.of("switchboard:releaseControl")))
    released = sc.SwitchboardReleaseControl.from_dict(d.bot.of("switchboard:releaseControl")[0])
    assert released.payload.conversation.active_switchboard_integration is None
    assert released.payload.metadata == {"resolution": "refunded"}
    assert await d.in_control() is None
    await d.say("one more thing")
    await _until(lambda: "one more thing" in d.bot.messages())
    assert await d.in_control() == "bot"
    await asyncio.sleep(0.3)
    assert "one more thing" not in d.agent.messages()


async def test_offer_then_accept_and_the_failures(desk: Desk) -> None:
    d = desk
    await _conversation(d)
    app_actions = d.actions()
    # Offering control to the one in control, or to nobody known: 400, and announced as failures.
    same = await _refused(d.t.call(app_actions.offer_control, d.t.app_id, d.conversation_id,
                                   sc.OfferControlBody(switchboard_integration="bot")))
    unknown = await _refused(d.t.call(app_actions.pass_control, d.t.app_id, d.conversation_id,
                                      sc.PassControlBody(switchboard_integration="nobody")))
    nothing_pending = await _refused(d.t.call(d.actions(d.agent).accept_control, d.t.app_id, d.conversation_id,
                                              sc.AcceptControlBody()))
    assert (same.status, unknown.status) == (400, 400)
    assert nothing_pending.status == 403  # the agent is not the one offered control (nobody is)
    await _until(lambda: bool(d.bot.of("switchboard:offerControl:failure"))
                 and bool(d.bot.of("switchboard:passControl:failure")))
    failure = sc.SwitchboardOfferControlFailure.from_dict(d.bot.of("switchboard:offerControl:failure")[0])
    assert failure.payload.error["code"] == "bad_request"
    assert failure.payload.conversation.active_switchboard_integration.name == "bot"

    # The bot offers the conversation to the agent (by name), the agent takes it.
    await d.t.call(d.actions(d.bot).offer_control, d.t.app_id, d.conversation_id,
                   sc.OfferControlBody(switchboard_integration="agent", metadata={"queue": "tier2"}))
    await _until(lambda: bool(d.agent.of("switchboard:offerControl")))
    offered = sc.SwitchboardOfferControl.from_dict(d.agent.of("switchboard:offerControl")[0])
    assert offered.payload.conversation.pending_switchboard_integration.name == "agent"
    assert offered.payload.conversation.active_switchboard_integration.name == "bot"
    # Only the one offered control may accept it.
    refused = await _refused(d.t.call(d.actions(d.bot).accept_control, d.t.app_id, d.conversation_id,
                                      sc.AcceptControlBody()))
    assert refused.status == 403
    # Two accepts at once (two agent replicas, a double click): one takes control, once.
    outcomes = await asyncio.gather(
        d.t.call(d.actions(d.agent).accept_control, d.t.app_id, d.conversation_id, sc.AcceptControlBody()),
        d.t.call(d.actions(d.agent).accept_control, d.t.app_id, d.conversation_id, sc.AcceptControlBody()),
        return_exceptions=True)
    # The later one finds nothing offered to it any more.
    assert sorted(o.status if isinstance(o, ApiException) else 200 for o in outcomes) in ([200, 200], [200, 403])
    await _until(lambda: bool(d.bot.of("switchboard:acceptControl")))
    await asyncio.sleep(0.3)
    assert len(d.bot.of("switchboard:acceptControl")) == 1
    accepted = sc.SwitchboardAcceptControl.from_dict(d.bot.of("switchboard:acceptControl")[0])
    assert accepted.payload.conversation.active_switchboard_integration.name == "agent"
    assert accepted.payload.conversation.pending_switchboard_integration is None
    assert await d.in_control() == "agent"


async def test_configuration_rules(desk: Desk) -> None:
    d = desk
    t = d.t
    switchboards = sc.SwitchboardsApi(t.client())
    members = sc.SwitchboardIntegrationsApi(t.client())
    listed = (await t.call(switchboards.list_switchboards, t.app_id)).switchboards
    assert [s.id for s in listed] == [d.switchboard_id]
    second = await _refused(t.call(switchboards.create_switchboard, t.app_id))
    assert second.status == 409
    default = await _refused(t.call(members.delete_switchboard_integration, t.app_id, d.switchboard_id,
                                    d.bot.member_id))
    someones_next = await _refused(t.call(members.delete_switchboard_integration, t.app_id, d.switchboard_id,
                                          d.agent.member_id))
    assert (default.status, someones_next.status) == (400, 400)
    duplicate = await _refused(t.call(members.create_switchboard_integration, t.app_id, d.switchboard_id,
                                      sc.SwitchboardIntegrationCreateBody(name="bot", integration_type="desk")))
    assert duplicate.status == 409
    desk_member = (await t.call(members.create_switchboard_integration, t.app_id, d.switchboard_id,
                                sc.SwitchboardIntegrationCreateBody(name="desk", integration_type="desk")
                                )).switchboard_integration
    assert desk_member.integration_type == "desk" and desk_member.integration_id == ""
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/switchboards/{d.switchboard_id}"
                                           "/switchboardIntegrations",
                                   body={"name": "both", "integrationId": d.bot.integration_id,
                                         "integrationType": "desk"})
    assert status == 400 and body["errors"][0]["code"] == "bad_request"
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/switchboards/{d.switchboard_id}"
                                        "/switchboardIntegrations", body={"name": "bad name!", "integrationType": "x"})
    assert status == 400
    for index in range(7):  # up to ten
        await t.call(members.create_switchboard_integration, t.app_id, d.switchboard_id,
                     sc.SwitchboardIntegrationCreateBody(name=f"extra-{index}", integration_type="desk"))
    eleventh = await _refused(t.call(members.create_switchboard_integration, t.app_id, d.switchboard_id,
                                     sc.SwitchboardIntegrationCreateBody(name="eleventh", integration_type="desk")))
    assert eleventh.status == 400
    # A target is an id, else a name, else an integration type, and must name one member.
    await _conversation(d)
    await t.call(d.actions().pass_control, t.app_id, d.conversation_id,
                 sc.PassControlBody(switchboard_integration="desk"))  # the name (many are of type desk)
    assert await d.in_control() == "desk"
    ambiguous = await _refused(t.call(d.actions().pass_control, t.app_id, d.conversation_id,
                                      sc.PassControlBody(switchboard_integration="custom")))  # bot's and agent's type
    assert ambiguous.status == 400 and "several" in (ambiguous.body or "")
    await t.call(d.actions().pass_control, t.app_id, d.conversation_id,
                 sc.PassControlBody(switchboard_integration=d.agent.member_id))
    assert await d.in_control() == "agent"
    # An integration of the switchboard cannot be deleted from under it.
    in_use = await _refused(t.call(sc.IntegrationsApi(t.client()).delete_integration, t.app_id, d.bot.integration_id))
    assert in_use.status == 400 and "switchboard" in (in_use.body or "")
    # An integration's key reaches its conversations and own webhooks, not the switchboard or others' webhooks.
    bot_client = t.client(d.bot.key_id, d.bot.secret)
    for call in (t.call(sc.SwitchboardsApi(bot_client).list_switchboards, t.app_id),
                 t.call(sc.WebhooksApi(bot_client).list_webhooks, t.app_id, d.agent.integration_id),
                 t.call(sc.IntegrationsApi(bot_client).list_integrations, t.app_id)):
        assert (await _refused(call)).status == 403
    own = (await t.call(sc.WebhooksApi(bot_client).list_webhooks, t.app_id, d.bot.integration_id)).webhooks
    assert len(own) == 1
    web = (await t.call(sc.IntegrationsApi(t.client()).create_integration, t.app_id,
                        sc.Web(display_name="site"))).integration
    keyless = await _refused(t.call(sc.CustomIntegrationApiKeysApi(t.client()).create_custom_integration_key,
                                    t.app_id, web.id, sc.IntegrationApiKey(display_name="no")))
    assert keyless.status == 400
    # Disabled again, every integration hears everything.
    await t.call(switchboards.update_switchboard, t.app_id, d.switchboard_id, sc.SwitchboardUpdateBody(enabled=False))
    await _conversation(d, "customer-2")
    await d.say("everyone hears this")
    await _until(lambda: "everyone hears this" in d.agent.messages() and "everyone hears this" in d.bot.messages())
    await t.call(switchboards.delete_switchboard, t.app_id, d.switchboard_id)
    assert (await t.call(switchboards.list_switchboards, t.app_id)).switchboards == []
    assert await d.in_control() is None


async def test_membership_rules_races_and_a_deleted_member_in_control(desk: Desk) -> None:
    d = desk
    t = d.t
    base = f"/v2/apps/{t.app_id}/switchboards/{d.switchboard_id}"
    web = (await t.call(sc.IntegrationsApi(t.client()).create_integration, t.app_id,
                        sc.Web(display_name="site"))).integration
    for body, status in (({"name": "site", "integrationId": web.id}, 400),  # members are custom integrations
                         ({"name": "bot-again", "integrationId": d.bot.integration_id}, 409),  # one member each
                         ({"name": "next", "integrationType": "desk"}, 400)):  # the keyword
        got, _ = await t.request("POST", f"{base}/switchboardIntegrations", body=body)
        assert got == status, body
    # null clears a next (absent leaves it).
    status, body = await t.request("PATCH", f"{base}/switchboardIntegrations/{d.agent.member_id}",
                                   body={"nextSwitchboardIntegrationId": None})
    assert status == 200 and body["switchboardIntegration"].get("nextSwitchboardIntegrationId") is None
    status, body = await t.request("PATCH", f"{base}/switchboardIntegrations/{d.agent.member_id}",
                                   body={"deliverStandbyEvents": True})
    assert status == 200 and body["switchboardIntegration"].get("nextSwitchboardIntegrationId") is None
    # Making a member the default while deleting it: one wins, and the switchboard stays whole.
    for round_ in range(4):
        status, body = await t.request("POST", f"{base}/switchboardIntegrations",
                                       body={"name": f"temp-{round_}", "integrationType": "desk"})
        assert status == 201
        temp = body["switchboardIntegration"]["id"]
        outcomes = await asyncio.gather(
            t.request("PATCH", base, body={"defaultSwitchboardIntegrationId": temp}),
            t.request("DELETE", f"{base}/switchboardIntegrations/{temp}"))
        # Either the PATCH went first (then the default cannot be deleted) or the DELETE did (then
        # there is no such member to make the default): never both.
        assert sorted(status for status, _ in outcomes) == [200, 400]
        status, body = await t.request("GET", base.rsplit("/", 1)[0])
        [switchboard] = body["switchboards"]
        status, listed = await t.request("GET", f"{base}/switchboardIntegrations")
        members = {m["id"] for m in listed["switchboardIntegrations"]}
        assert switchboard["defaultSwitchboardIntegrationId"] in members
        if switchboard["defaultSwitchboardIntegrationId"] == temp:  # the PATCH won: put the bot back
            await t.request("PATCH", base, body={"defaultSwitchboardIntegrationId": d.bot.member_id})
            await t.request("DELETE", f"{base}/switchboardIntegrations/{temp}")
    # A member deleted while in control: the customer's next message goes to the default.
    status, body = await t.request("POST", f"{base}/switchboardIntegrations",
                                   body={"name": "night-shift", "integrationType": "desk"})
    night = body["switchboardIntegration"]["id"]
    await _conversation(d)
    await t.call(d.actions().pass_control, t.app_id, d.conversation_id,
                 sc.PassControlBody(switchboard_integration="night-shift"))
    assert await d.in_control() == "night-shift"
    status, _ = await t.request("DELETE", f"{base}/switchboardIntegrations/{night}")
    assert status == 200
    assert await d.in_control() is None
    await d.say("anyone there?")
    await _until(lambda: "anyone there?" in d.bot.messages())
    assert await d.in_control() == "bot"
