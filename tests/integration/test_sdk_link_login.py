"""The handoff's reverse path and SDK login against identity, conversations, webhooks, handoff,
web and app: a session created with a link code joins the code's user and conversation (the
business gets `client:add` + `conversation:referral`), refused codes link nothing, and
`POST …/sessions/login` with a user JWT identifies the visitor or merges it into the user who has
the externalId (`user:merge` / `client:add` reason `sdkLogin`), revoking the old token."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.http import basic_auth_header
from shared.sdk import ErrorFrame, decode_frame
from shared.signing import jwt_encode
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from tests.integration.test_web_conversation import create_app_with_web, eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

ACCOUNT = basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)
TRIGGERS = ["conversation:message", "client:add", "conversation:referral", "user:merge", "user:update"]


@dataclass
class Shop:
    base: str
    app_id: str
    integrations: dict[str, str]
    auth: dict[str, str]
    key_id: str
    key_secret: str
    http: aiohttp.ClientSession
    events: list[dict[str, Any]] = field(default_factory=list)

    def sdk(self, path: str, root: str = "sdk") -> str:
        return f"{self.base}/{root}/v1/apps/{self.app_id}{path}"

    async def api(self, method: str, path: str, body: Any = None, status: int | None = None) -> dict[str, Any]:
        async with self.http.request(method, f"{self.base}/v2/apps/{self.app_id}{path}", headers=self.auth,
                                     json=body) as resp:
            data: dict[str, Any] = await resp.json()
            assert resp.status == (status or (201 if method == "POST" else 200)), data
        return data

    async def session(self, link_code: str | None = None, root: str = "sdk", integration: str = "web",
                      extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        body = {**({"linkCode": link_code} if link_code is not None else {}), **(extra or {})}
        async with self.http.post(self.sdk(f"/integrations/{self.integrations[integration]}/sessions", root),
                                  json=body) as resp:
            return resp.status, await resp.json()

    async def new_session(self, first_message: str = "hello from the first device") -> dict[str, Any]:
        """A web visitor whose first message (which created their user and conversation) is stored."""
        session = await start_sdk_session(self.http, self.base, self.app_id, self.integrations["web"], first_message)
        await eventually(lambda: _history_has(self, session, first_message))
        return session

    async def link(self, user_id: str, integration: str = "web") -> dict[str, Any]:
        body = await self.api("POST", f"/users/{user_id}/linkRequests",
                              {"integrationIds": [self.integrations[integration]]})
        link: dict[str, Any] = body["linkRequests"][0]
        return link

    async def history(self, session: dict[str, Any], root: str = "sdk") -> tuple[int, list[str]]:
        async with self.http.get(self.sdk(f"/conversations/{session['conversationId']}/messages", root),
                                 headers={"Authorization": f"Bearer {session['sessionToken']}"}) as resp:
            body = await resp.json()
            if resp.status != 200:
                return resp.status, []
            return 200, [m["message"]["content"].get("text", "") for m in body["messages"]]

    async def say(self, session: dict[str, Any], text: str) -> None:
        async with self.http.post(self.sdk(f"/conversations/{session['conversationId']}/messages"),
                                  headers={"Authorization": f"Bearer {session['sessionToken']}"},
                                  json={"clientMessageId": uuid.uuid4().hex, "text": text}) as resp:
            assert resp.status == 202, await resp.text()

    async def reply(self, conversation_id: str, text: str) -> None:
        await self.api("POST", f"/conversations/{conversation_id}/messages",
                       {"author": {"type": "business"}, "content": {"type": "text", "text": text}})

    async def login(self, session: dict[str, Any], external_id: Any, jwt: str) -> tuple[int, dict[str, Any]]:
        async with self.http.post(self.sdk("/sessions/login"), json={"externalId": external_id, "jwt": jwt},
                                  headers={"Authorization": f"Bearer {session['sessionToken']}"}) as resp:
            return resp.status, await resp.json()

    def jwt(self, external_id: Any, **extra: Any) -> str:
        return jwt_encode({"scope": "user", "external_id": external_id, **extra}, self.key_secret, self.key_id)

    async def clients(self, user_id: str) -> list[dict[str, Any]]:
        return list((await self.api("GET", f"/users/{user_id}/clients"))["clients"])

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


@pytest.fixture
async def shop(system: System, tmp_path: Path) -> AsyncIterator[Shop]:
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        await system.start("identity", "conversations", "webhooks", "handoff", "web", "app")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp", "android"))
        integrations = {kind: entry["id"] for kind, entry in info["integrations"].items()}
        shop = Shop(system.base_url, info["appId"], integrations,
                    basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]), info["apiKey"]["id"],
                    info["apiKey"]["secret"], http, events)
        await shop.api("POST", "/integrations", {"type": "custom", "webhooks": [
            {"target": hook_url, "triggers": TRIGGERS}]})
        yield shop


async def chatting_visitor(shop: Shop) -> dict[str, Any]:
    """A web visitor with a short exchange with the business (both messages stored)."""
    session = await shop.new_session("hello from the first device")
    await shop.reply(session["conversationId"], "hi, how can we help")

    async def both() -> bool:
        return len((await shop.history(session))[1]) == 2

    await eventually(both)
    return session


# --- link codes into SDK sessions -------------------------------------------------------------

async def test_a_link_code_opens_the_conversation_in_a_new_web_session(shop: Shop) -> None:
    source = await chatting_visitor(shop)
    user_id, conversation_id = source["appUserId"], source["conversationId"]
    link = await shop.link(user_id)
    assert link["url"].endswith(f"threadline_code={link['code']}")

    status, linked = await shop.session(link["code"])
    assert status == 201, linked
    # The new session is the code's user on the code's conversation, with a client of its own.
    assert (linked["appUserId"], linked["conversationId"]) == (user_id, conversation_id)
    assert linked["clientId"] != source["clientId"]
    assert (await shop.history(linked)) == (200, ["hello from the first device", "hi, how can we help"])
    participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
    assert participants[0]["clientAssociations"][0]["clientId"] == linked["clientId"]
    assert sorted(c["id"] for c in await shop.clients(user_id)) == sorted([source["clientId"], linked["clientId"]])

    # The business hears it like a channel arrival.
    def arrival() -> list[dict[str, Any]]:
        return [e for e in shop.of_type("client:add") if e["payload"]["client"]["id"] == linked["clientId"]]

    await eventually(lambda: _truthy(arrival()))
    client_add = arrival()[0]["payload"]
    assert client_add["reason"] == "channelLinking" and client_add["user"]["id"] == user_id
    assert client_add["client"]["type"] == "sdk"
    await eventually(lambda: _truthy(shop.of_type("conversation:referral")))
    referral = shop.of_type("conversation:referral")[0]["payload"]
    assert referral["conversation"]["id"] == conversation_id
    assert referral["source"] == {"type": "web", "integrationId": shop.integrations["web"]}

    # A business reply reaches the new session's history; the old session still reads it too.
    await shop.reply(conversation_id, "welcome on this device")
    assert (await eventually(lambda: _history_has(shop, linked, "welcome on this device")))

    # Replaying the code (a reload, a shared link) is refused and links nothing.
    status, refusal = await shop.session(link["code"])
    assert status == 410, refusal
    assert refusal["errors"][0]["code"] == "link_code_used"
    assert "already been used" in refusal["errors"][0]["title"]
    assert len(await shop.clients(user_id)) == 2


async def test_refused_codes_link_nothing(shop: Shop, system: System) -> None:
    source = await chatting_visitor(shop)
    user_id = source["appUserId"]

    async def refused(code: str, status: int, error_code: str, words: str) -> None:
        got, body = await shop.session(code)
        assert got == status, body
        assert body["errors"][0]["code"] == error_code
        assert words in body["errors"][0]["title"]

    await refused("nonexistentcode0123456789", 400, "link_code_invalid", "isn't valid")
    await refused("not a code!", 400, "link_code_invalid", "isn't valid")
    # A code made for the app is not a web link.
    await refused((await shop.link(user_id, "android"))["code"], 400, "link_code_wrong_channel",
                  "different channel")
    # A short WhatsApp code is refused unasked: no oracle for live short codes, no attempt burnt.
    short = (await shop.link(user_id, "whatsapp"))["code"]
    await refused(short, 400, "link_code_invalid", "isn't valid")
    await refused(short.lower(), 400, "link_code_invalid", "isn't valid")
    record = await system.service("handoff").handlers._record(short)
    assert record is not None and record.failed_attempts == 0 and record.used_at is None
    # Another app's code reads like an unknown one.
    other_app, other_web = await create_app_with_web(shop.http, shop.base)
    other_user = (await start_sdk_session(shop.http, shop.base, other_app, other_web))["appUserId"]
    async with shop.http.post(f"{shop.base}/v2/apps/{other_app}/users/{other_user}/linkRequests", headers=ACCOUNT,
                              json={"integrationIds": [other_web]}) as resp:
        assert resp.status == 201, await resp.text()
        foreign = (await resp.json())["linkRequests"][0]["code"]
    await refused(foreign, 400, "link_code_invalid", "isn't valid")
    # An expired code (the handoff's clock moved past its expiry).
    expired = (await shop.link(user_id))["code"]
    handoff = system.service("handoff").handlers
    handoff.clock = lambda: time.time() + 3600
    await refused(expired, 410, "link_code_expired", "expired")
    handoff.clock = time.time

    assert [c["id"] for c in await shop.clients(user_id)] == [source["clientId"]]
    assert not shop.of_type("conversation:referral")


async def test_the_app_redeems_a_code_for_its_android_integration(shop: Shop) -> None:
    source = await chatting_visitor(shop)
    link = await shop.link(source["appUserId"], "android")
    assert f"code={link['code']}" in link["url"]
    device = {"guid": "install-7", "appVersion": "1.2.0", "info": {"os": "Android"}}
    status, linked = await shop.session(link["code"], root="app", integration="android", extra={"device": device})
    assert status == 201, linked
    assert (linked["appUserId"], linked["conversationId"]) == (source["appUserId"], source["conversationId"])
    assert (await shop.history(linked, root="app")) == (200, ["hello from the first device", "hi, how can we help"])
    devices = (await shop.api("GET", f"/users/{source['appUserId']}/devices"))["devices"]
    assert [(d["guid"], d["clientId"]) for d in devices] == [("install-7", linked["clientId"])]
    clients = {c["id"]: c for c in await shop.clients(source["appUserId"])}
    assert clients[linked["clientId"]]["integrationId"] == shop.integrations["android"]
    # The same code does not open a web session.
    status, refusal = await shop.session(link["code"])
    assert status == 410 and refusal["errors"][0]["code"] == "link_code_used"


# --- login ------------------------------------------------------------------------------------

async def test_bad_login_jwts_are_refused_and_change_nothing(shop: Shop) -> None:
    visitor = await shop.new_session()
    async with shop.http.post(f"{shop.base}/v2/apps", headers=ACCOUNT, json={"displayName": "Other"}) as resp:
        other_app = (await resp.json())["app"]["id"]
    async with shop.http.post(f"{shop.base}/v2/apps/{other_app}/keys", headers=ACCOUNT,
                              json={"displayName": "k"}) as resp:
        other_key = (await resp.json())["key"]
    _header, payload, _sig = shop.jwt("alice").split(".")
    none_header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": shop.key_id}).encode()).rstrip(b"=")
    bad = {
        "bad signature": jwt_encode({"scope": "user", "external_id": "alice"}, "not-the-secret", shop.key_id),
        "other app's kid": jwt_encode({"scope": "user", "external_id": "alice"}, other_key["secret"],
                                      other_key["id"]),
        "no kid": jwt_encode({"scope": "user", "external_id": "alice"}, shop.key_secret),
        "scope app": jwt_encode({"scope": "app", "external_id": "alice"}, shop.key_secret, shop.key_id),
        "numeric external_id": shop.jwt(12345),
        "expired": shop.jwt("alice", exp=int(time.time()) - 60),
        "exp not a number": shop.jwt("alice", exp="tomorrow"),
        "alg none": f"{none_header.decode()}.{payload}.",
        "another external_id": shop.jwt("mallory"),
        "garbage": "not.a.jwt",
        "empty": "",
    }
    for what, token in bad.items():
        status, body = await shop.login(visitor, "alice", token)
        assert status == 401, (what, body)
        assert body["errors"][0]["code"] == "invalid_auth", what
        assert body["errors"][0]["title"].startswith("Invalid login JWT"), what
    # A number as externalId is a bad body, not a login.
    status, _ = await shop.login(visitor, 12345, shop.jwt(12345))
    assert status == 400
    # No session, no login.
    async with shop.http.post(shop.sdk("/sessions/login"), json={"externalId": "alice", "jwt": shop.jwt("alice")}
                              ) as resp:
        assert resp.status == 401
    user = (await shop.api("GET", f"/users/{visitor['appUserId']}"))["user"]
    assert "externalId" not in user and not user.get("authenticated")
    await shop.api("GET", "/users/alice", status=404)


async def test_login_identifies_an_anonymous_visitor(shop: Shop) -> None:
    visitor = await chatting_visitor(shop)
    status, login = await shop.login(visitor, "alice", shop.jwt("alice", exp=int(time.time()) + 600))
    assert status == 200, login
    assert login["outcome"] == "identified" and login["externalId"] == "alice"
    assert (login["appUserId"], login["conversationId"], login["clientId"]) == (
        visitor["appUserId"], visitor["conversationId"], visitor["clientId"])
    user = (await shop.api("GET", "/users/alice"))["user"]
    assert user["id"] == visitor["appUserId"] and user["authenticated"] is True
    await eventually(lambda: _truthy(shop.of_type("user:update")))
    update = shop.of_type("user:update")[0]["payload"]
    assert update["reason"] == "authentication" and update["user"]["externalId"] == "alice"
    assert (await shop.history(login))[0] == 200
    # Logging in again as the same person changes nothing.
    status, again = await shop.login(login, "alice", shop.jwt("alice"))
    assert status == 200 and again["outcome"] == "unchanged" and again["appUserId"] == visitor["appUserId"]
    # An identified session never becomes someone else: 409, and bob is not touched.
    await shop.api("POST", "/users", {"externalId": "bob"})
    status, conflict = await shop.login(again, "bob", shop.jwt("bob"))
    assert status == 409, conflict
    assert (await shop.api("GET", "/users/alice"))["user"]["id"] == visitor["appUserId"]
    assert (await shop.api("GET", f"/users/{visitor['appUserId']}/merges"))["merges"] == []
    assert not shop.of_type("user:merge")


async def test_login_merges_the_visitor_into_the_known_user(shop: Shop) -> None:
    known = (await shop.api("POST", "/users", {"externalId": "carol", "metadata": {"tier": "gold"}}))["user"]
    visitor = await chatting_visitor(shop)
    conversation_id = visitor["conversationId"]

    status, login = await shop.login(visitor, "carol", shop.jwt("carol"))
    assert status == 200, login
    assert login["outcome"] == "merged"
    assert (login["appUserId"], login["conversationId"], login["clientId"]) == (
        known["id"], conversation_id, visitor["clientId"])
    # The visitor's user is gone; its client and its conversation belong to carol now.
    await shop.api("GET", f"/users/{visitor['appUserId']}", status=404)
    assert [c["id"] for c in await shop.clients(known["id"])] == [visitor["clientId"]]
    participants = (await shop.api("GET", f"/conversations/{conversation_id}/participants"))["participants"]
    assert [(p["userId"], p["userExternalId"]) for p in participants] == [(known["id"], "carol")]
    assert participants[0]["clientAssociations"][0]["clientId"] == visitor["clientId"]
    carol = (await shop.api("GET", "/users/carol"))["user"]
    assert carol["authenticated"] is True and carol["metadata"] == {"tier": "gold"}
    merges = (await shop.api("GET", f"/users/{known['id']}/merges"))["merges"]
    assert [(m["survivingUserId"], m["discardedUserId"], m["reason"]) for m in merges] == [
        (known["id"], visitor["appUserId"], "sdkLogin")]

    await eventually(lambda: _truthy(shop.of_type("user:merge")))
    merge = shop.of_type("user:merge")[0]["payload"]
    assert merge["reason"] == "sdkLogin"
    assert merge["mergedUsers"]["surviving"]["id"] == known["id"]
    assert merge["mergedUsers"]["discarded"]["id"] == visitor["appUserId"]
    assert conversation_id in merge["mergedConversations"]["surviving"]

    def login_add() -> list[dict[str, Any]]:
        return [e for e in shop.of_type("client:add") if e["payload"]["reason"] == "sdkLogin"]

    await eventually(lambda: _truthy(login_add()))
    assert login_add()[0]["payload"]["client"]["id"] == visitor["clientId"]
    assert login_add()[0]["payload"]["user"]["id"] == known["id"]

    # The new token reads the conversation; the old one names a user that no longer exists and
    # is refused everywhere, posting included (nothing accepted and then dropped).
    assert (await shop.history(login))[1][:2] == ["hello from the first device", "hi, how can we help"]
    assert (await shop.history(visitor))[0] == 401
    async with shop.http.post(shop.sdk(f"/conversations/{conversation_id}/messages"),
                              headers={"Authorization": f"Bearer {visitor['sessionToken']}"},
                              json={"clientMessageId": uuid.uuid4().hex, "text": "from the old token"}) as resp:
        assert resp.status == 401
    status, _ = await shop.login(visitor, "carol", shop.jwt("carol"))
    assert status == 401
    socket_url = (shop.sdk(f"/conversations/{conversation_id}/socket").replace("http", "ws", 1)
                  + f"?token={visitor['sessionToken']}")
    async with shop.http.ws_connect(socket_url) as ws:
        frame = decode_frame((await ws.receive(timeout=8)).data)
        assert isinstance(frame, ErrorFrame) and frame.status == 401
    # The business's reply lands in the conversation the visitor is in.
    await shop.reply(conversation_id, "hello carol")
    assert await eventually(lambda: _history_has(shop, login, "hello carol"))


async def _truthy(value: Any) -> Any:
    return value


async def _history_has(shop: Shop, session: dict[str, Any], text: str) -> bool:
    return text in (await shop.history(session))[1]


@pytest.mark.parametrize("carol_exists", [False, True])
async def test_a_login_moves_only_the_session_when_its_user_holds_other_clients(shop: Shop,
                                                                                carol_exists: bool) -> None:
    """A session opened by someone else's link joined their user: the JWT proves the session, not
    the link's sender, so only the session goes to the account — no identification, no merge."""
    known = (await shop.api("POST", "/users", {"externalId": "carol"}))["user"] if carol_exists else None
    source = await chatting_visitor(shop)
    link = await shop.link(source["appUserId"])
    status, visitor = await shop.session(link["code"])
    assert status == 201, visitor
    status, login = await shop.login(visitor, "carol", shop.jwt("carol"))
    assert status == 200, login
    assert login["outcome"] == "separated" and login["clientId"] == visitor["clientId"]
    carol = (await shop.api("GET", "/users/carol"))["user"]
    assert carol["authenticated"] is True
    if known is not None:
        assert carol["id"] == known["id"]
    assert login["appUserId"] == carol["id"] != source["appUserId"]
    assert login["conversationId"] != source["conversationId"]
    # The link's sender keeps its user, its client and its conversation; carol got the session only.
    assert [c["id"] for c in await shop.clients(source["appUserId"])] == [source["clientId"]]
    assert [c["id"] for c in await shop.clients(carol["id"])] == [visitor["clientId"]]
    assert "externalId" not in (await shop.api("GET", f"/users/{source['appUserId']}"))["user"]
    participants = (await shop.api("GET", f"/conversations/{source['conversationId']}/participants"))["participants"]
    assert [a["clientId"] for a in participants[0]["clientAssociations"]] == [source["clientId"]]
    assert not shop.of_type("user:merge") and not shop.of_type("user:update")
    # The sender's session still works, on its conversation only; carol's reads hers.
    assert (await shop.history(source))[0] == 200
    assert (await shop.history(login)) == (200, [])
    await shop.reply(login["conversationId"], "hello carol")
    assert await eventually(lambda: _history_has(shop, login, "hello carol"))
    assert "hello carol" not in (await shop.history(source))[1]
