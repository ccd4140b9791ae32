"""Reaching a customer by phone number: SunCo's v1.1 Notification API (one call) and the v2
outbound flow (user → conversation → client `immediate` → message), against the whole system
with the sandbox's WhatsApp and SMS phones. The customer's reply continues that conversation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sunshine_conversations_client as sc

from shared.http import basic_auth_header
from tests.e2e.test_direct_linking import Sandbox, running_sandbox
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System
from tests.integration.test_web_conversation import eventually

TEMPLATE = {"name": "order_update", "language": {"policy": "deterministic", "code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "A-1001"}]}]}


@pytest.fixture
async def sandbox(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(system, tmp_path) as running:
        yield running


async def notify(s: Sandbox, body: dict[str, Any], auth: dict[str, str] | None = None,
                 app_id: str | None = None) -> tuple[int, dict[str, Any]]:
    url = f"{s.system.base_url}/v1.1/apps/{app_id or s.app_id}/notifications"
    async with s.http.post(url, json=body, headers=auth or s.auth) as resp:
        return resp.status, json.loads(await resp.text() or "{}")


def text_notification(integration_id: str, phone: str, text: str) -> dict[str, Any]:
    return {"destination": {"integrationId": integration_id, "destinationId": phone},
            "author": {"role": "appMaker", "name": "Acme Support"},
            "message": {"type": "text", "text": text}}


async def created_conversation(s: Sandbox, conversation_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        for e in s.of("conversation:create"):
            if e["payload"]["conversation"]["id"] == conversation_id:
                return e
        return None

    found: dict[str, Any] = await eventually(check, timeout=10.0)
    return found


async def business_message(s: Sandbox, text: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        for e in s.of("conversation:message"):
            message = e["payload"]["message"]
            if message["author"]["type"] == "business" and message["content"].get("text") == text:
                return e
        return None

    found: dict[str, Any] = await eventually(check, timeout=10.0)
    return found


async def test_a_text_notification_by_sms_starts_a_conversation_that_the_reply_continues(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15558200001"
    status, body = await notify(s, text_notification(s.integration("twilio"), phone, "Your table is ready"))
    assert status == 201, body
    notification_id = body["notification"]["_id"]
    assert len(notification_id) == 24
    await s.phone_receives("twilio", phone, "Your table is ready")
    stored = await business_message(s, "Your table is ready")
    assert stored["payload"]["message"]["id"] == notification_id
    assert stored["payload"]["message"]["author"]["displayName"] == "Acme Support"
    conversation_id = stored["payload"]["conversation"]["id"]
    created = await created_conversation(s, conversation_id)
    assert created["payload"]["creationReason"] == "notification"
    assert created["payload"]["user"].get("externalId") is None  # a new, anonymous user
    user_id = created["payload"]["user"]["id"]
    history = await s.call(sc.MessagesApi(s.api).list_messages, s.app_id, conversation_id)
    assert [m.content.actual_instance.text for m in history.messages] == ["Your table is ready"]
    # The customer answers by SMS: same conversation, same user.
    await s.phone_sends("twilio", phone, "On my way")
    reply = await s.customer_message(conversation_id, "On my way")
    assert reply["payload"]["message"]["author"]["userId"] == user_id
    # A second notification to the number goes to the same conversation (no new one).
    status, body = await notify(s, text_notification(s.integration("twilio"), phone.lstrip("+"), "See you soon"))
    assert status == 201, body
    again = await business_message(s, "See you soon")
    assert again["payload"]["conversation"]["id"] == conversation_id
    assert len([e for e in s.of("conversation:create")
                if e["payload"]["conversation"]["id"] == conversation_id]) == 1


async def test_a_whatsapp_template_notification_and_the_reply(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557200001"
    status, body = await notify(s, {
        "destination": {"integrationId": s.integration("whatsapp"), "destinationId": phone},
        "author": {"role": "appMaker"}, "messageSchema": "whatsapp",
        "message": {"type": "template", "template": TEMPLATE}})
    assert status == 201, body
    path = f"{s.system.base_url}/sandbox/whatsapp/{s.integration('whatsapp')}/outbox"

    async def template_sent() -> list[dict[str, Any]] | None:
        async with s.http.get(path, params={"to": phone}) as resp:
            sent = [m for m in (await resp.json())["messages"] if m.get("type") == "template"]
        return sent or None

    sent = await eventually(template_sent, timeout=10.0)
    assert sent[0]["template"]["name"] == "order_update" and sent[0]["to"] == phone.lstrip("+")

    async def stored() -> dict[str, Any] | None:
        for e in s.of("conversation:message"):
            if e["payload"]["message"]["id"] == body["notification"]["_id"]:
                return e
        return None

    event = await eventually(stored, timeout=10.0)
    conversation_id = event["payload"]["conversation"]["id"]
    assert event["payload"]["message"]["content"]["type"] == "template"
    # The customer replies on WhatsApp (BSUID + wa_id): the same conversation continues.
    await s.phone_sends("whatsapp", phone, "Where is it now?")
    await s.customer_message(conversation_id, "Where is it now?")


async def test_a_known_number_is_notified_in_its_users_conversation(sandbox: Sandbox) -> None:
    s = sandbox
    phone = "+15557200002"
    user_id, conversation_id = await s.user_conversation("known-customer")
    await s.link(user_id, conversation_id, "whatsapp", phone, "immediate")
    status, body = await notify(s, text_notification(s.integration("whatsapp"), phone, "Reminder: tomorrow 9am"))
    assert status == 201, body
    event = await business_message(s, "Reminder: tomorrow 9am")
    assert event["payload"]["conversation"]["id"] == conversation_id
    await s.phone_receives("whatsapp", phone, "Reminder: tomorrow 9am")


async def test_bad_notifications_are_refused_sunshine_style(sandbox: Sandbox) -> None:
    s = sandbox
    twilio = s.integration("twilio")
    # Another app and its integration: not found under this app, and this key cannot use that app.
    async with s.http.post(f"{s.system.base_url}/v2/apps", json={"displayName": "Other"},
                           headers=basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)) as resp:
        other_app = (await resp.json())["app"]["id"]
    async with s.http.post(f"{s.system.base_url}/v2/apps/{other_app}/integrations", json={
            "type": "twilio", "accountSid": "AC" + "1" * 32, "authToken": "f" * 32, "phoneNumber": "+15550009999",
            "baseUrl": f"{s.system.base_url}/sandbox/twilio-api"},
            headers=basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)) as resp:
        assert resp.status == 201, await resp.text()
        foreign = (await resp.json())["integration"]["id"]
    status, body = await notify(s, text_notification(foreign, "+15558200002", "hi"))
    assert status == 404 and body["errors"][0]["code"] == "integration_not_found"
    status, body = await notify(s, text_notification(twilio, "+15558200002", "hi"), app_id=other_app)
    assert status == 403
    status, body = await notify(s, text_notification(s.integration("web"), "+15558200002", "hi"))
    assert status == 400 and "whatsapp or twilio" in body["errors"][0]["title"]
    status, body = await notify(s, text_notification(twilio, "call me maybe", "hi"))
    assert status == 400 and "destinationId" in body["errors"][0]["title"]
    bad_author = {**text_notification(twilio, "+15558200002", "hi"), "author": {"role": "appUser"}}
    status, body = await notify(s, bad_author)
    assert status == 400 and "appMaker" in body["errors"][0]["title"]
    status, body = await notify(s, {**text_notification(twilio, "+15558200002", "hi"), "messageSchema": "whatsapp",
                                    "message": {"type": "template", "template": TEMPLATE}})
    assert status == 400 and "whatsapp integration" in body["errors"][0]["title"]
    status, body = await notify(s, {**text_notification(twilio, "+15558200002", "hi"),
                                    "message": {"type": "carousel", "items": []}})
    assert status == 400
    status, body = await notify(s, {"destination": {"integrationId": twilio}})
    assert status == 400 and body["errors"][0]["title"]
    # Nothing was sent or created by any of these.
    assert await s.phone_outbox("twilio", "+15558200002") == []
    assert not s.of("conversation:create")


@pytest.mark.parametrize("kind", ["whatsapp", "twilio"])
async def test_the_v2_outbound_flow_with_the_official_client(sandbox: Sandbox, kind: str) -> None:
    """SunCo's v2 pattern: create user → create conversation → create client (immediate) → post a
    business message with destination.integrationId; the reply lands in that conversation."""
    s = sandbox
    phone = "+15557300001" if kind == "whatsapp" else "+15558300001"
    users, conversations = sc.UsersApi(s.api), sc.ConversationsApi(s.api)
    user = (await s.call(users.create_user, s.app_id, sc.UserCreateBody(external_id=f"v2-{kind}"))).user
    conversation = (await s.call(conversations.create_conversation, s.app_id, sc.ConversationCreateBody(
        type="personal", participants=[sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user.id))]
    ))).conversation
    criteria = (sc.MatchCriteriaWhatsapp if kind == "whatsapp" else sc.MatchCriteriaTwilio)(
        type=kind, integration_id=s.integration(kind), phone_number=phone)
    client = (await s.call(sc.ClientsApi(s.api).create_client, s.app_id, user.id, sc.ClientCreate(
        match_criteria=sc.MatchCriteria(criteria), confirmation=sc.Confirmation(type="immediate"),
        target=sc.Target(conversation_id=conversation.id)))).client
    assert client.status == "active"
    post = sc.MessagePost(author=sc.Author(type="business"),
                          content=sc.Content(sc.TextMessage(type="text", text="Your appointment is confirmed")),
                          destination=sc.Destination(integration_id=s.integration(kind)))
    posted = await s.call(sc.MessagesApi(s.api).post_message, s.app_id, conversation.id, post)
    assert posted.messages[0].author.type == "business"
    await s.phone_receives(kind, phone, "Your appointment is confirmed")
    await s.phone_sends(kind, phone, "Great, thank you")
    reply = await s.customer_message(conversation.id, "Great, thank you")
    assert reply["payload"]["message"]["author"]["userId"] == user.id
    assert reply["payload"]["message"]["source"]["type"] == kind
