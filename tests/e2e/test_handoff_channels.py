"""The handoff end to end on every channel: a web conversation gets a link from the business
API, the channel's sandbox phone sends what the platform would send with it, and the channel
joins the same conversation — recap in its outbox, `client:add` + `conversation:referral`, the
widget told it moved, the code never shown as customer text, the next reply routed there — and
a second use of the code links nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from shared.http import basic_auth_header
from shared.sdk import ChannelFrame, decode_frame
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from tests.integration.test_web_conversation import eventually, frames_until_ready
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICE = {"whatsapp": "whatsapp", "messenger": "messenger", "telegram": "telegram", "twilio": "sms"}
SENDERS = {"whatsapp": ("+15557000001", "+15557000002"), "messenger": ("6100000000000101", "6100000000000102"),
           "telegram": (515151, 525252), "twilio": ("+15558000001", "+15558000002")}


def phone_spec(channel: str, url: str, sender: Any) -> dict[str, Any]:
    """What the customer's tap on the deep link makes the platform send."""
    query = parse_qs(urlsplit(url).query)
    if channel == "whatsapp":
        return {"from": sender, "text": query["text"][0]}
    if channel == "twilio":
        return {"from": sender, "text": query["body"][0]}
    if channel == "messenger":
        return {"from": sender, "ref": query["ref"][0]}
    return {"from": sender, "start": query["start"][0]}


def outbox_texts(channel: str, messages: list[dict[str, Any]]) -> list[str]:
    texts = []
    for body in messages:
        if channel == "whatsapp":
            texts.append(str(body.get("text", {}).get("body", "")))
        elif channel == "messenger":
            texts.append(str(body.get("message", {}).get("text", "")))
        elif channel == "telegram":
            texts.append(str(body.get("text", "")))
        else:
            texts.append(str(body.get("Body", "")))
    return texts


@pytest.mark.parametrize("channel", sorted(SERVICE))
async def test_a_web_conversation_continues_on_the_channel(system: System, tmp_path: Path, channel: str) -> None:
    async with business_webhooks() as (hook_url, events):
        await system.start("identity", "conversations", "webhooks", "handoff", SERVICE[channel], "web", "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", channel))
        base, app_id = system.base_url, info["appId"]
        web_id, target_id = info["integrations"]["web"]["id"], info["integrations"][channel]["id"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v2/apps/{app_id}/integrations", headers=auth, json={
                    "type": "custom", "webhooks": [{"target": hook_url, "triggers": [
                        "conversation:message", "client:add", "conversation:referral"]}]}) as resp:
                assert resp.status == 201
            # The customer chats on the web first.
            session = await start_sdk_session(http, base, app_id, web_id, "hello from the web")
            conversation_id, user_id = session["conversationId"], session["appUserId"]
            async with http.post(f"{base}/v2/apps/{app_id}/conversations/{conversation_id}/messages", headers=auth,
                                 json={"author": {"type": "business"},
                                       "content": {"type": "text", "text": "hi, how can we help"}}) as resp:
                assert resp.status == 201
            socket = await http.ws_connect(f"{base.replace('http', 'ws')}/sdk/v1/apps/{app_id}/conversations/"
                                           f"{conversation_id}/socket?token={session['sessionToken']}")
            await frames_until_ready(socket)
            # The business (or the widget) asks for a link to the channel.
            async with http.post(f"{base}/v2/apps/{app_id}/users/{user_id}/linkRequests", headers=auth,
                                 json={"integrationIds": [target_id]}) as resp:
                assert resp.status == 201, await resp.text()
                link = (await resp.json())["linkRequests"][0]
            assert link["integrationId"] == target_id and link["type"] == channel
            assert link["code"] in link["url"] or channel in ("whatsapp", "twilio")
            # The customer taps it: the channel's phone sends what the platform would.
            sender, stranger = SENDERS[channel]
            path = f"{base}/sandbox/{channel}/{target_id}"

            async def deliver(spec: dict[str, Any]) -> bool:
                async with http.post(f"{path}/inbound", json=spec) as resp:
                    body = await resp.json(content_type=None)
                    return resp.status == 200 and body.get("webhookStatus", 200) == 200

            await eventually(timeout=20.0, check=lambda: deliver(phone_spec(channel, link["url"], sender)))

            async def outbox(to: Any) -> list[str]:
                async with http.get(f"{path}/outbox", params={"to": str(to)}) as resp:
                    return outbox_texts(channel, (await resp.json())["messages"])

            recap = await eventually(timeout=20.0, check=lambda: outbox(sender))
            assert "hello from the web" in recap[0] and "hi, how can we help" in recap[0]
            assert "Threadline Demo Shop" in recap[0]  # the web messenger's businessName

            def added() -> list[dict[str, Any]]:
                return [e for e in events if e["type"] == "client:add"
                        and e["payload"]["client"]["type"] == channel]

            async def linked() -> list[dict[str, Any]]:
                return added()

            await eventually(timeout=20.0, check=linked)
            client_add = added()[0]["payload"]
            assert client_add["reason"] == "channelLinking" and client_add["user"]["id"] == user_id

            # The referral is announced right after the client (it may come in the next webhook call).
            async def referred() -> list[dict[str, Any]]:
                return [e for e in events if e["type"] == "conversation:referral"
                        and e["payload"]["conversation"]["id"] == conversation_id]

            await eventually(timeout=20.0, check=referred)
            kinds = [e["type"] for e in events if e["type"] in ("client:add", "conversation:referral")]
            assert kinds.index("client:add") < kinds.index("conversation:referral")
            # The widget hears that the conversation moved.
            frame = decode_frame((await socket.receive(timeout=10)).data)
            while not isinstance(frame, ChannelFrame):
                frame = decode_frame((await socket.receive(timeout=10)).data)
            assert frame.status == "moved" and frame.integration_id == target_id
            await socket.close()
            # The next business reply goes to the channel (now the primary client).
            async with http.post(f"{base}/v2/apps/{app_id}/conversations/{conversation_id}/messages", headers=auth,
                                 json={"author": {"type": "business"},
                                       "content": {"type": "text", "text": "now on your phone"}}) as resp:
                assert resp.status == 201
            await eventually(timeout=20.0, check=lambda: _contains(outbox(sender), "now on your phone"))
            # The customer taps the link again: already linked, nothing to say, nothing stored.
            await eventually(timeout=20.0, check=lambda: deliver(phone_spec(channel, link["url"], sender)))
            await eventually(timeout=20.0, check=lambda: deliver({"from": sender, "text": "thanks"}))

            def said(text: str) -> list[dict[str, Any]]:
                return [e for e in events if e["type"] == "conversation:message"
                        and e["payload"]["message"]["content"].get("text") == text]

            await eventually(timeout=20.0, check=lambda: _async(said("thanks")))  # in order after the repeat
            assert not any("used" in text.lower() for text in await outbox(sender))
            # The code was never shown to the business as a customer message.
            texts = [e["payload"]["message"]["content"].get("text", "") for e in events
                     if e["type"] == "conversation:message"]
            assert all(link["code"] not in text for text in texts)
            # A second use (someone else) links nothing and is told why.
            await eventually(timeout=20.0, check=lambda: deliver(phone_spec(channel, link["url"], stranger)))
            refusal = await eventually(timeout=20.0, check=lambda: outbox(stranger))
            assert "used" in refusal[0].lower()
            async with http.get(f"{base}/v2/apps/{app_id}/users/{user_id}/clients", headers=auth) as resp:
                clients = (await resp.json())["clients"]
            assert sorted(c["type"] for c in clients) == sorted(["sdk", channel])


async def _contains(texts: Any, wanted: str) -> bool:
    return any(wanted in text for text in await texts)


async def _first_with(texts: Any, wanted: str) -> str | None:
    return next((text for text in await texts if wanted in text), None)


def yes_answer(question: str) -> str:
    """The exact yes a merge question asks for ("YES 4821")."""
    match = re.search(r"reply (YES \d{4})", question)
    assert match is not None, question
    return match.group(1)


async def test_two_identified_users_are_never_merged_by_a_link(system: System, tmp_path: Path) -> None:
    async with business_webhooks() as (hook_url, events):
        await system.start("identity", "conversations", "webhooks", "handoff", "whatsapp", "web", "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp"))
        base, app_id = system.base_url, info["appId"]
        web_id, wa_id = info["integrations"]["web"]["id"], info["integrations"]["whatsapp"]["id"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        phone = f"{base}/sandbox/whatsapp/{wa_id}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v2/apps/{app_id}/integrations", headers=auth, json={
                    "type": "custom", "webhooks": [{"target": hook_url, "triggers": [
                        "conversation:message", "client:add", "client:remove"]}]}) as resp:
                assert resp.status == 201
            # Alice is known on WhatsApp (her user carries an externalId).
            await eventually(
                timeout=20.0,
                check=lambda: _delivered(http, phone, {"from": "+15557000009", "text": "hi, alice here"}))
            alice = await eventually(timeout=20.0, check=lambda: _user_of_message(events, "hi, alice here"))
            async with http.patch(f"{base}/v2/apps/{app_id}/users/{alice}", headers=auth,
                                  json={"externalId": "alice"}) as resp:
                assert resp.status == 200, await resp.text()
            # Bob is known on the web and asks for a WhatsApp link.
            bob_session = await start_sdk_session(http, base, app_id, web_id)
            bob = bob_session["appUserId"]
            async with http.patch(f"{base}/v2/apps/{app_id}/users/{bob}", headers=auth,
                                  json={"externalId": "bob"}) as resp:
                assert resp.status == 200
            async with http.post(f"{base}/v2/apps/{app_id}/users/{bob}/linkRequests", headers=auth,
                                 json={"integrationIds": [wa_id]}) as resp:
                link = (await resp.json())["linkRequests"][0]
            # Alice's phone sends Bob's code: refused on WhatsApp, client:remove linkFailed for Bob.
            await eventually(
                timeout=20.0,
                check=lambda: _delivered(http, phone, phone_spec("whatsapp", link["url"], "+15557000009")))

            async def refusal() -> list[str]:
                async with http.get(f"{phone}/outbox", params={"to": "+15557000009"}) as resp:
                    return [t for t in outbox_texts("whatsapp", (await resp.json())["messages"])
                            if "another account" in t]

            await eventually(timeout=20.0, check=refusal)
            await eventually(timeout=20.0, check=lambda: _has(events, lambda e: e["type"] == "client:remove"
                                     and e["payload"]["reason"] == "linkFailed"
                                     and e["payload"]["user"]["id"] == bob))
            for user, external in ((alice, "alice"), (bob, "bob")):
                async with http.get(f"{base}/v2/apps/{app_id}/users/{user}", headers=auth) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["user"]["externalId"] == external
            async with http.get(f"{base}/v2/apps/{app_id}/users/{bob}/clients", headers=auth) as resp:
                assert [c["type"] for c in (await resp.json())["clients"]] == ["sdk"]
            async with http.get(f"{base}/v2/apps/{app_id}/users/{bob}/merges", headers=auth) as resp:
                assert (await resp.json())["merges"] == []


async def _delivered(http: aiohttp.ClientSession, phone: str, spec: dict[str, Any]) -> bool:
    async with http.post(f"{phone}/inbound", json=spec) as resp:
        body = await resp.json(content_type=None)
        return resp.status == 200 and body.get("webhookStatus", 200) == 200


async def _user_of_message(events: list[dict[str, Any]], text: str) -> str | None:
    for event in events:
        if event["type"] == "conversation:message" and event["payload"]["message"]["content"].get("text") == text:
            return str(event["payload"]["message"]["author"]["userId"])
    return None


async def _has(events: list[dict[str, Any]], predicate: Any) -> bool:
    return any(predicate(e) for e in events)


async def test_a_known_channel_identity_joins_the_link_user_only_after_saying_yes(system: System,
                                                                                  tmp_path: Path) -> None:
    async with business_webhooks() as (hook_url, events):
        await system.start("identity", "conversations", "webhooks", "handoff", "whatsapp", "web", "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp"))
        base, app_id = system.base_url, info["appId"]
        web_id, wa_id = info["integrations"]["web"]["id"], info["integrations"]["whatsapp"]["id"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        phone = f"{base}/sandbox/whatsapp/{wa_id}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v2/apps/{app_id}/integrations", headers=auth, json={
                    "type": "custom", "webhooks": [{"target": hook_url, "triggers": [
                        "conversation:message", "user:merge"]}]}) as resp:
                assert resp.status == 201
            await eventually(
                timeout=20.0,
                check=lambda: _delivered(http, phone, {"from": "+15557000077", "text": "an earlier chat"}))
            earlier = await eventually(timeout=20.0, check=lambda: _user_of_message(events, "an earlier chat"))
            session = await start_sdk_session(http, base, app_id, web_id)
            survivor = session["appUserId"]
            async with http.post(f"{base}/v2/apps/{app_id}/users/{survivor}/linkRequests", headers=auth,
                                 json={"integrationIds": [wa_id]}) as resp:
                link = (await resp.json())["linkRequests"][0]
            await eventually(
                timeout=20.0,
                check=lambda: _delivered(http, phone, phone_spec("whatsapp", link["url"], "+15557000077")))

            async def outbox() -> list[str]:
                async with http.get(f"{phone}/outbox", params={"to": "+15557000077"}) as resp:
                    return outbox_texts("whatsapp", (await resp.json())["messages"])

            # The number holds a conversation of its own: it is asked first, and nothing moves.
            question = await eventually(timeout=20.0, check=lambda: _first_with(outbox(), "reply YES"))
            assert not any(e["type"] == "user:merge" for e in events)
            async with http.get(f"{base}/v2/apps/{app_id}/users/{earlier}", headers=auth) as resp:
                assert resp.status == 200
            # Its yes brings it in.
            await eventually(timeout=20.0,
                             check=lambda: _delivered(http, phone, {"from": "+15557000077",
                                                                    "text": yes_answer(question) + "!"}))
            await eventually(timeout=20.0, check=lambda: _has(events, lambda e: e["type"] == "user:merge"))
            merge = next(e for e in events if e["type"] == "user:merge")["payload"]
            assert merge["mergedUsers"]["surviving"]["id"] == survivor
            assert merge["mergedUsers"]["discarded"]["id"] == earlier
            assert merge["reason"] == "channelLinking"
            await eventually(timeout=20.0, check=lambda: _contains(outbox(), "Continuing your conversation"))
            async with http.get(f"{base}/v2/apps/{app_id}/users/{earlier}", headers=auth) as resp:
                assert resp.status == 404
            async with http.get(f"{base}/v2/apps/{app_id}/users/{survivor}/clients", headers=auth) as resp:
                assert sorted(c["type"] for c in (await resp.json())["clients"]) == ["sdk", "whatsapp"]
            async with http.get(f"{base}/v2/apps/{app_id}/users/{survivor}/merges", headers=auth) as resp:
                merges = (await resp.json())["merges"]
            assert [(m["survivingUserId"], m["discardedUserId"]) for m in merges] == [(survivor, earlier)]
            # The earlier WhatsApp conversation now belongs to the survivor too.
            async with http.get(f"{base}/v2/apps/{app_id}/conversations",
                                params={"filter[userId]": survivor}, headers=auth) as resp:
                assert len((await resp.json())["conversations"]) == 2


async def _async(value: Any) -> Any:
    return value
