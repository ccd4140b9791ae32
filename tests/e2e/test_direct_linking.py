"""SunCo Clients API direct linking by phone, driven by the official client 17.0.1 against the
whole system: a user's conversation gets a WhatsApp or SMS number as a client (`immediate`,
`userActivity`, `prompt`), the sandbox phone receives and answers, and the business sees
`client:add` / `client:update` / `client:remove` and the customer's messages in that conversation.
Also the NATS endpoint `conversations.client.link` that `notifications` calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import sunshine_conversations_client as sc
from sunshine_conversations_client.exceptions import ApiException

from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from shared.messages import conversation as conv
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

T = TypeVar("T")
SERVICES = ("identity", "conversations", "webhooks", "whatsapp", "sms", "sandbox")
TRIGGERS = ["conversation:message", "conversation:create", "client:add", "client:update", "client:remove"]
# Our channel names of each client type (sandbox paths).
SANDBOX_CHANNEL = {"whatsapp": "whatsapp", "twilio": "twilio"}


@dataclass
class Sandbox:
    """The running system, its sandbox app, a business webhook receiver and client helpers."""

    system: System
    http: aiohttp.ClientSession
    info: dict[str, Any]
    events: list[dict[str, Any]]
    api: sc.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api = sc.ApiClient(sc.Configuration(host=self.system.base_url, username=self.info["apiKey"]["id"],
                                                 password=self.info["apiKey"]["secret"]))

    @property
    def app_id(self) -> str:
        return str(self.info["appId"])

    @property
    def auth(self) -> dict[str, str]:
        return basic_auth_header(self.info["apiKey"]["id"], self.info["apiKey"]["secret"])

    def integration(self, kind: str) -> str:
        return str(self.info["integrations"][kind]["id"])

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a (blocking) official-client call in a thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def user_conversation(self, external_id: str) -> tuple[str, str]:
        user = (await self.call(sc.UsersApi(self.api).create_user, self.app_id,
                                sc.UserCreateBody(external_id=external_id))).user
        body = sc.ConversationCreateBody(type="personal", participants=[
            sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user.id))])
        conversation = (await self.call(sc.ConversationsApi(self.api).create_conversation, self.app_id,
                                        body)).conversation
        return user.id, conversation.id

    async def link(self, user_id: str, conversation_id: str, kind: str, phone: str, confirmation: str,
                   message: str | None = None) -> sc.Client:
        criteria_type = sc.MatchCriteriaWhatsapp if kind == "whatsapp" else sc.MatchCriteriaTwilio
        criteria = sc.MatchCriteria(criteria_type(type=kind, integration_id=self.integration(kind),
                                                  phone_number=phone))
        confirm = sc.Confirmation(type=confirmation)
        if message is not None:
            confirm.message = sc.MessagePost(author=sc.Author(type="business"),
                                             content=sc.Content(sc.TextMessage(type="text", text=message)))
        body = sc.ClientCreate(match_criteria=criteria, confirmation=confirm,
                               target=sc.Target(conversation_id=conversation_id))
        return (await self.call(sc.ClientsApi(self.api).create_client, self.app_id, user_id, body)).client

    async def phone_sends(self, kind: str, phone: str, text: str) -> None:
        path = f"{self.system.base_url}/sandbox/{SANDBOX_CHANNEL[kind]}/{self.integration(kind)}/inbound"

        async def deliver() -> bool:
            async with self.http.post(path, json={"from": phone, "text": text}) as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("webhookStatus", 200) == 200

        await eventually(deliver, timeout=10.0)

    async def phone_outbox(self, kind: str, phone: str) -> list[str]:
        path = f"{self.system.base_url}/sandbox/{SANDBOX_CHANNEL[kind]}/{self.integration(kind)}/outbox"
        async with self.http.get(path, params={"to": phone}) as resp:
            messages = (await resp.json())["messages"]
        if kind == "whatsapp":
            return [str(m.get("text", {}).get("body", "")) for m in messages]
        return [str(m.get("Body", "")) for m in messages]

    async def phone_receives(self, kind: str, phone: str, fragment: str) -> list[str]:
        async def check() -> list[str] | None:
            texts = await self.phone_outbox(kind, phone)
            return texts if any(fragment in t for t in texts) else None

        result: list[str] = await eventually(check, timeout=10.0)
        return result

    def of(self, trigger: str, client_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == trigger
                and (client_id is None or e["payload"].get("client", {}).get("id") == client_id)]

    async def event(self, trigger: str, client_id: str | None = None, reason: str | None = None,
                    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            for e in self.of(trigger, client_id):
                if reason is None or e["payload"].get("reason") == reason:
                    return e
            return None

        found: dict[str, Any] = await eventually(check, timeout=10.0)
        return found

    async def customer_message(self, conversation_id: str, text: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            for e in self.of("conversation:message"):
                message = e["payload"]["message"]
                if message["author"]["type"] == "user" and message["content"].get("text") == text:
                    return e
            return None

        found: dict[str, Any] = await eventually(check, timeout=10.0)
        assert found["payload"]["conversation"]["id"] == conversation_id
        return found

    def customer_texts(self) -> list[str]:
        return [e["payload"]["message"]["content"].get("text", "") for e in self.of("conversation:message")
                if e["payload"]["message"]["author"]["type"] == "user"]

    async def clients(self, user_id: str) -> list[sc.Client]:
        return list((await self.call(sc.ClientsApi(self.api).list_clients, self.app_id, user_id)).clients)

    async def primary(self, conversation_id: str) -> str | None:
        participants = (await self.call(sc.ParticipantsApi(self.api).list_participants, self.app_id,
                                        conversation_id)).participants
        associations = participants[0].client_associations or []
        return associations[0].client_id if associations else None


@contextlib.asynccontextmanager
async def running_sandbox(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    """The services of a phone conversation, the sandbox app (web, whatsapp, twilio) and a
    business webhook receiving TRIGGERS."""
    async with business_webhooks() as (hook_url, events):
        await system.start(*SERVICES)
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp", "twilio"))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{system.base_url}/v2/apps/{info['appId']}/integrations",
                                 headers=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]),
                                 json={"type": "custom", "webhooks": [{"target": hook_url, "triggers": TRIGGERS}]},
                                 ) as resp:
                assert resp.status == 201
            yield Sandbox(system, http, info, events)


@pytest.fixture
async def sandbox(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(system, tmp_path) as running:
        yield running


@pytest.mark.parametrize("kind", ["whatsapp", "twilio"])
async def test_immediate_link_reaches_the_phone_and_its_reply_continues_the_conversation(
        sandbox: Sandbox, kind: str) -> None:
    s = sandbox
    phone = "+15557100001" if kind == "whatsapp" else "+15558100001"
    user_id, conversation_id = await s.user_conversation(f"customer-{kind}")
    client = await s.link(user_id, conversation_id, kind, phone, "immediate", message="Hi from Threadline Shop")
    assert client.type == kind and client.status == "active"
    assert client.integration_id == s.integration(kind)
    assert client.external_id == (phone.lstrip("+") if kind == "whatsapp" else phone)
    # The confirmation message reaches the phone and is not part of the conversation.
    await s.phone_receives(kind, phone, "Hi from Threadline Shop")
    added = await s.event("client:add", client.id)
    assert added["payload"]["reason"] == "channelLinking" and added["payload"]["user"]["id"] == user_id
    assert added["payload"]["conversation"]["id"] == conversation_id
    assert added["payload"]["source"]["type"] == "api:conversations"
    updated = await s.event("client:update", client.id, "confirmed")
    assert updated["payload"]["client"]["status"] == "active"
    assert sc.ClientAddEvent.from_dict(added) is not None and sc.ClientUpdateEvent.from_dict(updated) is not None
    history = await s.call(sc.MessagesApi(s.api).list_messages, s.app_id, conversation_id)
    assert not history.messages
    assert await s.primary(conversation_id) == client.id
    # A business message goes to the phone; the phone's reply lands in the same conversation.
    post = sc.MessagePost(author=sc.Author(type="business"),
                          content=sc.Content(sc.TextMessage(type="text", text="Your order shipped")))
    await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation_id, post)
    await s.phone_receives(kind, phone, "Your order shipped")
    await s.phone_sends(kind, phone, "Thanks!")
    reply = await s.customer_message(conversation_id, "Thanks!")
    assert reply["payload"]["message"]["author"]["userId"] == user_id
    assert reply["payload"]["message"]["source"]["client"]["id"] == client.id
    assert [c.id for c in await s.clients(user_id)] == [client.id]


async def test_user_activity_confirms_on_the_next_message_into_the_target_conversation(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557100002"
    user_id, conversation_id = await s.user_conversation("customer-activity")
    client = await s.link(user_id, conversation_id, "whatsapp", phone, "userActivity",
                          message="Write to us here whenever you like")
    assert client.status == "pending"
    await s.phone_receives("whatsapp", phone, "Write to us here whenever you like")
    added = await s.event("client:add", client.id)
    assert added["payload"]["client"]["status"] == "pending"
    assert not s.of("client:update", client.id)
    # The number writes (with BSUID and wa_id, as Meta sends it now): matched, confirmed, same conversation.
    await s.phone_sends("whatsapp", phone, "hello, it's me")
    message = await s.customer_message(conversation_id, "hello, it's me")
    assert message["payload"]["message"]["author"]["userId"] == user_id
    matched = await s.event("client:update", client.id, "matched")
    confirmed = await s.event("client:update", client.id, "confirmed")
    assert s.events.index(matched) < s.events.index(confirmed)
    assert confirmed["payload"]["client"]["status"] == "active"
    assert [(c.id, c.status) for c in await s.clients(user_id)] == [(client.id, "active")]
    # No conversation was made for the number: the only one is the business's.
    assert [e["payload"]["conversation"]["id"] for e in s.of("conversation:create")] == [conversation_id]
    # Later messages keep landing there, from the same client.
    await s.phone_sends("whatsapp", phone, "second message")
    second = await s.customer_message(conversation_id, "second message")
    assert second["payload"]["message"]["source"]["client"]["id"] == client.id


async def test_prompt_yes_confirms_and_is_consumed(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15558100002"
    user_id, conversation_id = await s.user_conversation("customer-prompt-yes")
    client = await s.link(user_id, conversation_id, "twilio", phone, "prompt")
    assert client.status == "pending"
    texts = await s.phone_receives("twilio", phone, "Reply YES")
    assert "Threadline Demo Shop" in texts[-1]
    # Something else first: still pending, asked again, not stored.
    await s.phone_sends("twilio", phone, "who is this?")

    async def asked_twice() -> bool:
        return sum("Reply YES" in t for t in await s.phone_outbox("twilio", phone)) >= 2

    await eventually(asked_twice, timeout=10.0)
    assert (await s.clients(user_id))[0].status == "pending"
    await s.phone_sends("twilio", phone, "Yes!")
    confirmed = await s.event("client:update", client.id, "confirmed")
    assert confirmed["payload"]["conversation"]["id"] == conversation_id
    await s.phone_receives("twilio", phone, "Thanks!")
    assert (await s.clients(user_id))[0].status == "active"
    assert await s.primary(conversation_id) == client.id
    await s.phone_sends("twilio", phone, "now a real question")
    await s.customer_message(conversation_id, "now a real question")
    # Neither the answer nor the unrelated text before it were customer messages.
    assert "Yes!" not in s.customer_texts() and "who is this?" not in s.customer_texts()


async def test_prompt_no_cancels_and_removes_the_client(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557100003"
    user_id, conversation_id = await s.user_conversation("customer-prompt-no")
    client = await s.link(user_id, conversation_id, "whatsapp", phone, "prompt")
    await s.phone_receives("whatsapp", phone, "Reply YES")
    await s.phone_sends("whatsapp", phone, "no")
    removed = await s.event("client:remove", client.id, "linkCancelled")
    assert removed["payload"]["user"]["id"] == user_id and removed["payload"]["error"]["code"] == "link_cancelled"
    assert sc.ClientRemoveEvent.from_dict(removed) is not None
    await s.phone_receives("whatsapp", phone, "will not be linked")
    assert await s.clients(user_id) == []
    assert "no" not in s.customer_texts()
    # The number is a stranger again: its next message starts its own conversation.
    await s.phone_sends("whatsapp", phone, "hello again")

    async def elsewhere() -> dict[str, Any] | None:
        for e in s.of("conversation:message"):
            if e["payload"]["message"]["content"].get("text") == "hello again":
                return e
        return None

    other = await eventually(elsewhere, timeout=10.0)
    assert other["payload"]["conversation"]["id"] != conversation_id
    assert other["payload"]["message"]["author"]["userId"] != user_id


async def test_a_number_of_another_user_is_moved_theft_without_merging(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557100004"
    # The number wrote before: it is an anonymous user with its own conversation.
    await s.phone_sends("whatsapp", phone, "I am a stranger")
    first = await s.customer_message(
        (await eventually(lambda: _conversation_of(s, "I am a stranger"), timeout=10.0)), "I am a stranger")
    old_user, old_conversation = first["payload"]["message"]["author"]["userId"], \
        first["payload"]["conversation"]["id"]
    old_client = first["payload"]["message"]["source"]["client"]["id"]
    user_id, conversation_id = await s.user_conversation("customer-theft")
    client = await s.link(user_id, conversation_id, "whatsapp", phone, "immediate")
    assert client.id == old_client  # the same client, moved (with its BSUID alias)
    theft = await s.event("client:remove", client.id, "theft")
    assert theft["payload"]["user"]["id"] == old_user
    assert theft["payload"]["conversation"]["id"] == old_conversation
    await s.event("client:add", client.id)
    # Both users still exist (nothing merged); the old one has no client any more.
    assert await s.clients(old_user) == []
    assert [c.id for c in await s.clients(user_id)] == [client.id]
    old_participants = (await s.call(sc.ParticipantsApi(s.api).list_participants, s.app_id,
                                     old_conversation)).participants
    assert not old_participants[0].client_associations
    # Its next message goes to the new user's conversation.
    await s.phone_sends("whatsapp", phone, "now linked")
    moved = await s.customer_message(conversation_id, "now linked")
    assert moved["payload"]["message"]["author"]["userId"] == user_id


async def _conversation_of(s: Sandbox, text: str) -> str | None:
    for e in s.of("conversation:message"):
        if e["payload"]["message"]["content"].get("text") == text:
            return str(e["payload"]["conversation"]["id"])
    return None


async def test_validation_errors_through_the_official_client(sandbox: Sandbox) -> None:
    s = sandbox
    user_id, conversation_id = await s.user_conversation("customer-errors")
    _other_user, other_conversation = await s.user_conversation("someone-else")
    clients = sc.ClientsApi(s.api)

    async def refused(criteria: Any, target: str = conversation_id, confirmation: str = "immediate",
                      message: sc.MessagePost | None = None) -> tuple[int, dict[str, Any]]:
        confirm = sc.Confirmation(type=confirmation, message=message)
        body = sc.ClientCreate(match_criteria=sc.MatchCriteria(criteria), confirmation=confirm,
                               target=sc.Target(conversation_id=target))
        with pytest.raises(ApiException) as caught:
            await s.call(clients.create_client, s.app_id, user_id, body)
        return caught.value.status, json.loads(caught.value.body)

    wa, sms = s.integration("whatsapp"), s.integration("twilio")
    status, body = await refused(sc.MatchCriteriaMessagebird(type="messagebird", integration_id=sms,
                                                             phone_number="+15550000000"))
    assert status == 400 and "not supported" in body["errors"][0]["title"]
    # An e-mail link needs an e-mail integration.
    status, body = await refused(sc.MatchCriteriaMailgun(type="mailgun", integration_id=sms, address="a@b.co"))
    assert status == 400 and "not mailgun" in body["errors"][0]["title"]
    status, body = await refused(sc.MatchCriteriaWhatsapp(type="whatsapp", integration_id=sms,
                                                          phone_number="+15550000000"))
    assert status == 400 and "twilio" in body["errors"][0]["title"]
    status, body = await refused(sc.MatchCriteriaWhatsapp(type="whatsapp", integration_id=s.integration("web"),
                                                          phone_number="+15550000000"))
    assert status == 400
    status, body = await refused(sc.MatchCriteriaWhatsapp(type="whatsapp", integration_id="0" * 24,
                                                          phone_number="+15550000000"))
    assert status == 404 and body["errors"][0]["code"] == "integration_not_found"
    status, body = await refused(sc.MatchCriteriaWhatsapp(type="whatsapp", integration_id=wa,
                                                          phone_number="212 555 2368"))
    assert status == 400 and "phoneNumber" in body["errors"][0]["title"]
    status, body = await refused(sc.MatchCriteriaWhatsapp(type="whatsapp", integration_id=wa,
                                                          phone_number="+15550000000"), target=other_conversation)
    assert status == 404 and body["errors"][0]["code"] == "conversation_not_found"
    postback = sc.MessagePost(author=sc.Author(type="business"), content=sc.Content(sc.TextMessage(
        type="text", text="tap", actions=[sc.Action(sc.Postback(type="postback", text="Go",
                                                                             payload="GO"))])))
    status, body = await refused(sc.MatchCriteriaWhatsapp(type="whatsapp", integration_id=wa,
                                                          phone_number="+15550000000"), message=postback)
    assert status == 400 and "link" in body["errors"][0]["title"]
    assert await s.clients(user_id) == []
    # A readable phone format with spaces and dashes is accepted.
    client = await s.link(user_id, conversation_id, "whatsapp", "+1 555-710-0005", "immediate")
    assert client.external_id == "15557100005"


async def test_delete_removes_the_client_from_its_conversations(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15558100003"
    user_id, conversation_id = await s.user_conversation("customer-delete")
    client = await s.link(user_id, conversation_id, "twilio", phone, "immediate")
    assert await s.primary(conversation_id) == client.id
    result = await s.call(sc.ClientsApi(s.api).remove_client, s.app_id, user_id, client.id)
    assert result == {}
    removed = await s.event("client:remove", client.id, "api")
    assert removed["payload"]["conversation"]["id"] == conversation_id
    assert await s.clients(user_id) == []
    assert await s.primary(conversation_id) is None
    with pytest.raises(ApiException) as caught:
        await s.call(sc.ClientsApi(s.api).remove_client, s.app_id, user_id, client.id)
    assert caught.value.status == 404


async def test_pending_links_expire_with_link_failed(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557100006"
    user_id, conversation_id = await s.user_conversation("customer-expiry")
    client = await s.link(user_id, conversation_id, "whatsapp", phone, "userActivity")
    links = s.system.service("conversations").conversations.phone_links
    assert (await links.pending(client.id)) is not None
    # The link outlived its 24 h (moved back in time rather than waited for).
    await links.conversations.store.db.execute("UPDATE client_links SET expires_at = 0 WHERE client_id = $1",
                                               client.id)
    assert await links.sweep() == 1
    failed = await s.event("client:remove", client.id, "linkFailed")
    assert failed["payload"]["error"]["code"] == "link_expired"
    assert failed["payload"]["conversation"]["id"] == conversation_id
    assert await s.clients(user_id) == []
    assert await links.pending(client.id) is None
    # The number's message now starts its own conversation.
    await s.phone_sends("whatsapp", phone, "too late")
    other = await eventually(lambda: _conversation_of(s, "too late"), timeout=10.0)
    assert other != conversation_id


async def test_expired_link_fails_on_the_next_message(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15558100004"
    user_id, conversation_id = await s.user_conversation("customer-lazy-expiry")
    client = await s.link(user_id, conversation_id, "twilio", phone, "userActivity")
    links = s.system.service("conversations").conversations.phone_links
    await links.conversations.store.db.execute("UPDATE client_links SET expires_at = 0 WHERE client_id = $1",
                                               client.id)
    await s.phone_sends("twilio", phone, "anyone there?")
    await s.event("client:remove", client.id, "linkFailed")
    other = await eventually(lambda: _conversation_of(s, "anyone there?"), timeout=10.0)
    assert other != conversation_id


async def test_a_pending_link_survives_a_restart(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557100007"
    user_id, conversation_id = await s.user_conversation("customer-restart")
    client = await s.link(user_id, conversation_id, "whatsapp", phone, "userActivity")
    await s.system.restart_service("conversations")
    await s.phone_sends("whatsapp", phone, "after the restart")
    await s.customer_message(conversation_id, "after the restart")
    await s.event("client:update", client.id, "confirmed")


async def test_the_nats_endpoint_links_like_the_api(sandbox: Sandbox, nats_server: Any) -> None:
    s = sandbox
    phone = "+15558100005"
    user_id, conversation_id = await s.user_conversation("customer-nats")
    bus = await Bus.connect(nats_server.url, "test-notifications")
    try:
        request = conv.LinkPhoneClient(app_id=s.app_id, user_id=user_id, conversation_id=conversation_id,
                                       integration_id=s.integration("twilio"), phone_number=phone,
                                       primary=False, message_text="You will hear from us here",
                                       source_integration_id=s.integration("web"))
        reply = conv.decode_request(await bus.request(subjects.CONVERSATIONS_CLIENT_LINK,
                                                      conv.ENCODER.encode(request), timeout=5.0))
        assert isinstance(reply, conv.PhoneClientLinked)
        assert reply.client.status == "active" and reply.user.id == user_id
        refused = conv.decode_request(await bus.request(subjects.CONVERSATIONS_CLIENT_LINK, conv.ENCODER.encode(
            conv.LinkPhoneClient(app_id=s.app_id, user_id=user_id, conversation_id=conversation_id,
                                 integration_id=s.integration("web"), phone_number=phone)), timeout=5.0))
        assert isinstance(refused, conv.ConversationError) and refused.status == 400
    finally:
        await bus.close()
    await s.phone_receives("twilio", phone, "You will hear from us here")
    added = await s.event("client:add", reply.client.id)
    assert added["payload"]["source"] == {"type": "web", "integrationId": s.integration("web")}
    await s.phone_sends("twilio", phone, "got it")
    await s.customer_message(conversation_id, "got it")
