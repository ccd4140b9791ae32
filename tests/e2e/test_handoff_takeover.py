"""A link code gives its holder nothing the redeemer had before (issue: identity takeover by link).

Both ways, against the whole system with the sandbox phones:
- web/app → channel: someone with a web (or app) session gets a Messenger link and makes a
  victim who chatted on Messenger before open it. The victim's earlier conversation is not
  merged into the link's user: the victim is asked on Messenger, told what would be shared;
  until a yes their messages stay in their own conversation, a no links nothing, and only a yes
  (the legitimate customer moving their own chat) brings both together.
- channel → web/app: someone on WhatsApp gets a web (or app) link and makes a victim open it in a
  browser, where the victim then logs in. The login moves only the victim's session to their
  account: the WhatsApp identity never becomes a client of the account, never sees its
  conversation and never writes as it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from shared.http import basic_auth_header
from shared.signing import jwt_encode
from tests.e2e.test_handoff_channels import yes_answer
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

TRIGGERS = ["conversation:message", "client:add", "client:remove", "conversation:referral", "user:merge"]
VICTIM_PSID = "6100000000000901"
ATTACKER_PHONE = "+15557000901"


@dataclass
class World:
    base: str
    app_id: str
    integrations: dict[str, str]
    key_id: str
    key_secret: str
    http: aiohttp.ClientSession
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return basic_auth_header(self.key_id, self.key_secret)

    async def api(self, method: str, path: str, body: Any = None, params: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, f"{self.base}/v2/apps/{self.app_id}{path}", headers=self.auth,
                                     json=body, params=params) as resp:
            return resp.status, await resp.json(content_type=None)

    def sdk(self, root: str, path: str) -> str:
        return f"{self.base}/{root}/v1/apps/{self.app_id}{path}"

    async def session(self, root: str = "sdk", integration: str = "web", code: str | None = None,
                      ) -> dict[str, Any]:
        device = {"device": {"guid": uuid.uuid4().hex, "appVersion": "1.0"}} if root == "app" else {}
        if code is None:  # an anonymous visitor: their first message creates them
            return await start_sdk_session(self.http, self.base, self.app_id, self.integrations[integration], "hi",
                                           root=root, start_body=device)
        body: dict[str, Any] = {"linkCode": code, **device}
        async with self.http.post(self.sdk(root, f"/integrations/{self.integrations[integration]}/sessions"),
                                  json=body) as resp:
            data: dict[str, Any] = await resp.json()
            assert resp.status == 201, data
            return data

    async def say(self, session: dict[str, Any], text: str, root: str = "sdk") -> None:
        async with self.http.post(self.sdk(root, f"/conversations/{session['conversationId']}/messages"),
                                  headers=bearer(session), json={"clientMessageId": uuid.uuid4().hex,
                                                                 "text": text}) as resp:
            assert resp.status == 202, await resp.text()

    async def read(self, session: dict[str, Any], conversation_id: str, root: str = "sdk") -> tuple[int, list[str]]:
        async with self.http.get(self.sdk(root, f"/conversations/{conversation_id}/messages"),
                                 headers=bearer(session)) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                return resp.status, []
            return 200, [m["message"]["content"].get("text", "") for m in body["messages"]]

    async def phone(self, channel: str, spec: dict[str, Any]) -> None:
        async def delivered() -> bool:
            async with self.http.post(f"{self.base}/sandbox/{channel}/{self.integrations[channel]}/inbound",
                                      json=spec) as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("webhookStatus", 200) == 200

        await eventually(timeout=20.0, check=delivered)

    async def outbox(self, channel: str, to: str) -> list[str]:
        async with self.http.get(f"{self.base}/sandbox/{channel}/{self.integrations[channel]}/outbox",
                                 params={"to": to}) as resp:
            messages = (await resp.json())["messages"]
        if channel == "messenger":
            return [str(m.get("message", {}).get("text", "")) for m in messages]
        return [str(m.get("text", {}).get("body", "")) for m in messages]

    async def conversations_of(self, user_id: str) -> list[str]:
        status, body = await self.api("GET", "/conversations", params={"filter[userId]": user_id})
        assert status == 200, body
        return sorted(c["id"] for c in body["conversations"])

    async def clients_of(self, user_id: str) -> list[tuple[str, str]]:
        status, body = await self.api("GET", f"/users/{user_id}/clients")
        assert status == 200, body
        return sorted((c["type"], c.get("externalId", "")) for c in body["clients"])

    def message_event(self, text: str) -> dict[str, Any] | None:
        for event in self.events:
            if event["type"] == "conversation:message" and \
                    event["payload"]["message"]["content"].get("text") == text:
                return dict(event["payload"])
        return None

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e["payload"] for e in self.events if e["type"] == kind]


def bearer(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {session['sessionToken']}"}


@pytest.fixture
async def world(system: System, tmp_path: Path) -> AsyncIterator[World]:
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        await system.start("identity", "conversations", "webhooks", "handoff", "whatsapp", "messenger", "web", "app",
                           "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp", "messenger", "android"))
        world = World(system.base_url, info["appId"], {k: v["id"] for k, v in info["integrations"].items()},
                      info["apiKey"]["id"], info["apiKey"]["secret"], http, events)
        status, body = await world.api("POST", "/integrations", {"type": "custom", "webhooks": [
            {"target": hook_url, "triggers": TRIGGERS}]})
        assert status == 201, body
        yield world


async def victim_on_messenger(world: World) -> tuple[str, str]:
    """A customer who chatted anonymously on Messenger before: (their user id, conversation id)."""
    await world.phone("messenger", {"from": VICTIM_PSID, "text": "my address is 1 Main Street"})
    event = await eventually(timeout=20.0, check=lambda: _found(world.message_event("my address is 1 Main Street")))
    return str(event["message"]["author"]["userId"]), str(event["conversation"]["id"])


async def messenger_link(world: World, root: str) -> tuple[dict[str, Any], str]:
    """The holder's session (web or app) and a Messenger link code for its conversation."""
    integration = "web" if root == "sdk" else "android"
    holder = await world.session(root, integration)
    await world.say(holder, "hello, I am the holder", root)
    await eventually(timeout=20.0, check=lambda: _found(world.message_event("hello, I am the holder")))
    if root == "sdk":  # the widget's own "Continue on Messenger"
        async with world.http.post(world.sdk("sdk", f"/conversations/{holder['conversationId']}/linkRequests"),
                                   headers=bearer(holder),
                                   json={"integrationIds": [world.integrations["messenger"]]}) as resp:
            assert resp.status == 201, await resp.text()
            link = (await resp.json())["linkRequests"][0]
    else:  # the business's bot offers it in the app
        status, body = await world.api("POST", f"/users/{holder['appUserId']}/linkRequests",
                                       {"integrationIds": [world.integrations["messenger"]]})
        assert status == 201, body
        link = body["linkRequests"][0]
    return holder, parse_qs(urlsplit(link["url"]).query)["ref"][0]


async def asked(world: World, channel: str = "messenger", to: str = VICTIM_PSID) -> str:
    """The merge question the redeemer got, once it arrives."""
    async def question() -> str | None:
        return next((t for t in await world.outbox(channel, to) if "reply YES" in t), None)

    return str(await eventually(timeout=20.0, check=question))


@pytest.mark.parametrize("root", ["sdk", "app"])
async def test_a_messenger_link_never_gives_its_holder_the_redeemers_history(world: World, root: str) -> None:
    victim, victim_conversation = await victim_on_messenger(world)
    holder, code = await messenger_link(world, root)
    holder_user, holder_conversation = holder["appUserId"], holder["conversationId"]

    # The victim opens the m.me link: Messenger sends the referral.
    await world.phone("messenger", {"from": VICTIM_PSID, "ref": code})
    question = await asked(world)
    assert "1 message" in question and "shared" in question and "Reply NO" in question
    # A "yes" or "ok" that may answer anything else (an agent's question) merges nothing.
    for casual in ("yes", "ok", "Yes!"):
        await world.phone("messenger", {"from": VICTIM_PSID, "text": casual})
        await eventually(timeout=20.0, check=lambda casual=casual: _found(world.message_event(casual)))

    # Nothing was merged or moved: the holder reads only its own conversation.
    assert not world.of_type("user:merge")
    assert await world.conversations_of(holder_user) == [holder_conversation]
    assert await world.conversations_of(victim) == [victim_conversation]
    assert (await world.read(holder, victim_conversation, root))[0] in (401, 403, 404)
    assert await world.clients_of(victim) == [("messenger", VICTIM_PSID)]

    # The victim's next message stays in their own conversation, as their message.
    await world.phone("messenger", {"from": VICTIM_PSID, "text": "where is my order?"})
    event = await eventually(timeout=20.0, check=lambda: _found(world.message_event("where is my order?")))
    assert event["conversation"]["id"] == victim_conversation
    assert event["message"]["author"]["userId"] == victim
    assert "where is my order?" not in (await world.read(holder, holder_conversation, root))[1]

    # A no links nothing, and the business hears the link was cancelled; the "No" is still the
    # customer's message, in their own conversation.
    await world.phone("messenger", {"from": VICTIM_PSID, "text": "No"})
    await eventually(timeout=20.0, check=lambda: _any_contains(world.outbox("messenger", VICTIM_PSID),
                                                               "nothing was linked"))
    await eventually(timeout=20.0, check=lambda: _found(next(
        (p for p in world.of_type("client:remove") if p["reason"] == "linkCancelled"), None)))
    assert not world.of_type("user:merge")
    stored_no = await eventually(timeout=20.0, check=lambda: _found(world.message_event("No")))
    assert stored_no["conversation"]["id"] == victim_conversation
    assert await world.conversations_of(holder_user) == [holder_conversation]
    assert await world.clients_of(victim) == [("messenger", VICTIM_PSID)]
    # After the no the customer chats on as before.
    await world.phone("messenger", {"from": VICTIM_PSID, "text": "yes please send it tomorrow"})
    event = await eventually(timeout=20.0,
                             check=lambda: _found(world.message_event("yes please send it tomorrow")))
    assert event["conversation"]["id"] == victim_conversation


async def test_the_customer_who_says_yes_brings_their_history_along(world: World) -> None:
    earlier, earlier_conversation = await victim_on_messenger(world)
    web, code = await messenger_link(world, "sdk")
    await world.phone("messenger", {"from": VICTIM_PSID, "ref": code})
    answer = yes_answer(await asked(world))
    await world.phone("messenger", {"from": VICTIM_PSID, "text": answer.lower()})

    merge = await eventually(timeout=20.0, check=lambda: _found(next(iter(world.of_type("user:merge")), None)))
    assert merge["mergedUsers"]["surviving"]["id"] == web["appUserId"]
    assert merge["mergedUsers"]["discarded"]["id"] == earlier
    assert merge["reason"] == "channelLinking"
    recap = await eventually(timeout=20.0, check=lambda: _first_containing(
        world.outbox("messenger", VICTIM_PSID), "Continuing your conversation"))
    assert "hello, I am the holder" in recap
    assert sorted(await world.conversations_of(web["appUserId"])) == sorted(
        [web["conversationId"], earlier_conversation])
    assert world.message_event(answer.lower()) is None  # the confirmation itself was consumed
    # The next business reply goes to Messenger, now the primary client of the web conversation.
    status, _ = await world.api("POST", f"/conversations/{web['conversationId']}/messages", {
        "author": {"type": "business"}, "content": {"type": "text", "text": "see you on Messenger"}})
    assert status == 201
    await eventually(timeout=20.0, check=lambda: _any_contains(world.outbox("messenger", VICTIM_PSID),
                                                               "see you on Messenger"))


@pytest.mark.parametrize("root", ["sdk", "app"])
async def test_a_web_link_from_a_channel_gives_its_sender_nothing_of_the_account_that_logs_in(
        world: World, root: str) -> None:
    integration = "web" if root == "sdk" else "android"
    # The victim has an account with the business and a history in it.
    status, body = await world.api("POST", "/users", {"externalId": "victim@example.com"})
    assert status == 201, body
    account = body["user"]["id"]
    status, body = await world.api("POST", "/conversations", {
        "type": "personal", "participants": [{"userId": account}]})
    assert status == 201, body
    account_conversation = body["conversation"]["id"]
    status, _ = await world.api("POST", f"/conversations/{account_conversation}/messages", {
        "author": {"type": "business"}, "content": {"type": "text", "text": "your card ends in 4242"}})
    assert status == 201
    # The attacker chats on WhatsApp and gets a link into the web (or app) for that conversation.
    await world.phone("whatsapp", {"from": ATTACKER_PHONE, "text": "hi, I need help"})
    event = await eventually(timeout=20.0, check=lambda: _found(world.message_event("hi, I need help")))
    attacker, attacker_conversation = event["message"]["author"]["userId"], event["conversation"]["id"]
    status, body = await world.api("POST", f"/users/{attacker}/linkRequests",
                                   {"integrationIds": [world.integrations[integration]]})
    assert status == 201, body
    url = body["linkRequests"][0]["url"]
    code = parse_qs(urlsplit(url).query)["threadline_code" if root == "sdk" else "code"][0]

    # The victim opens it, then the site logs them in.
    opened = await world.session(root, integration, code=code)
    assert (opened["appUserId"], opened["conversationId"]) == (attacker, attacker_conversation)
    jwt = jwt_encode({"scope": "user", "external_id": "victim@example.com"}, world.key_secret, world.key_id)
    async with world.http.post(world.sdk(root, "/sessions/login"), headers=bearer(opened),
                               json={"externalId": "victim@example.com", "jwt": jwt}) as resp:
        login = await resp.json()
        assert resp.status == 200, login
    assert login["outcome"] == "separated" and login["appUserId"] == account
    assert login["conversationId"] != attacker_conversation

    # The account got the victim's session and nothing of the attacker's; the attacker's WhatsApp
    # user stays anonymous and keeps only its own conversation.
    assert [kind for kind, _ in await world.clients_of(account)] == ["sdk"]
    assert [kind for kind, _ in await world.clients_of(attacker)] == ["whatsapp"]
    status, body = await world.api("GET", f"/users/{attacker}")
    assert status == 200 and "externalId" not in body["user"]
    assert attacker_conversation not in await world.conversations_of(account)
    assert account_conversation not in await world.conversations_of(attacker)
    assert not world.of_type("user:merge")
    # The victim's new session reads the account, not the attacker's conversation.
    assert (await world.read(login, login["conversationId"], root))[0] == 200
    # The attacker writes on WhatsApp: as themselves, in their own conversation, never as the account.
    await world.phone("whatsapp", {"from": ATTACKER_PHONE, "text": "send my card number please"})
    event = await eventually(timeout=20.0, check=lambda: _found(world.message_event("send my card number please")))
    assert event["message"]["author"]["userId"] == attacker
    assert event["conversation"]["id"] == attacker_conversation
    assert "userExternalId" not in event["message"]["author"]
    # A business reply in the account's conversation never reaches the attacker's WhatsApp.
    status, _ = await world.api("POST", f"/conversations/{login['conversationId']}/messages", {
        "author": {"type": "business"}, "content": {"type": "text", "text": "for the account only"}})
    assert status == 201
    assert (await world.read(login, login["conversationId"], root))[0] == 200
    assert not any("for the account only" in t for t in await world.outbox("whatsapp", ATTACKER_PHONE))


async def _found(value: Any) -> Any:
    return value


async def _any_contains(texts: Any, wanted: str) -> bool:
    return any(wanted in text for text in await texts)


async def _first_containing(texts: Any, wanted: str) -> str | None:
    return next((text for text in await texts if wanted in text), None)


async def test_an_identified_account_is_never_joined_by_a_link(world: World) -> None:
    """The victim is a known customer (externalId) whose WhatsApp number the business linked by
    phone and wrote to. Someone's link, sent from that number, joins nothing of the account: no
    question (a yes must not hand over an account), no second client for the number, and the
    customer's next message stays in the account's conversation."""
    phone = "+15557000902"
    status, body = await world.api("POST", "/users", {"externalId": "known-902", "profile": {"givenName": "Ada"},
                                                      "metadata": {"tier": "gold"}})
    assert status == 201, body
    victim = body["user"]["id"]
    status, body = await world.api("POST", "/conversations", {"type": "personal",
                                                             "participants": [{"userId": victim}]})
    assert status == 201, body
    victim_conversation = body["conversation"]["id"]
    status, body = await world.api("POST", f"/users/{victim}/clients", {
        "matchCriteria": {"type": "whatsapp", "integrationId": world.integrations["whatsapp"],
                          "phoneNumber": phone},
        "confirmation": {"type": "immediate"}, "target": {"conversationId": victim_conversation}})
    assert status == 201, body
    status, _ = await world.api("POST", f"/conversations/{victim_conversation}/messages", {
        "author": {"type": "business"}, "content": {"type": "text", "text": "your balance is $12,345"}})
    assert status == 201
    # The attacker's web session asks for a WhatsApp link.
    holder = await world.session()
    await world.say(holder, "hi, holder here")
    await eventually(timeout=20.0, check=lambda: _found(world.message_event("hi, holder here")))
    async with world.http.post(world.sdk("sdk", f"/conversations/{holder['conversationId']}/linkRequests"),
                               headers=bearer(holder),
                               json={"integrationIds": [world.integrations["whatsapp"]]}) as resp:
        assert resp.status == 201, await resp.text()
        url = (await resp.json())["linkRequests"][0]["url"]
    await world.phone("whatsapp", {"from": phone, "text": parse_qs(urlsplit(url).query)["text"][0]})
    refusal = await eventually(timeout=20.0, check=lambda: _first_containing(world.outbox("whatsapp", phone),
                                                                             "another account"))
    assert "reply YES" not in refusal
    await eventually(timeout=20.0, check=lambda: _found(next(
        (p for p in world.of_type("client:remove") if p["reason"] == "linkFailed"), None)))
    # Nothing moved: the account keeps its one WhatsApp client and its externalId.
    assert [kind for kind, _ in await world.clients_of(victim)] == ["whatsapp"]
    assert [kind for kind, _ in await world.clients_of(holder["appUserId"])] == ["sdk"]
    status, body = await world.api("GET", "/users/known-902")
    assert status == 200 and body["user"]["id"] == victim
    assert not world.of_type("user:merge")
    await world.phone("whatsapp", {"from": phone, "text": "please deliver to my office"})
    event = await eventually(timeout=20.0, check=lambda: _found(world.message_event("please deliver to my office")))
    assert event["conversation"]["id"] == victim_conversation and event["message"]["author"]["userId"] == victim
    assert (await world.read(holder, victim_conversation))[0] in (401, 403, 404)
