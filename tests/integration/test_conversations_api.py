"""The business API driven by the official `sunshine-conversations-client` 17.0.1 (and raw HTTP
where the client cannot go), against real identity + conversations services and nats-server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import nats.js.errors
import pytest
import sunshine_conversations_client as sc
from sunshine_conversations_client.exceptions import ApiException

from shared import records, subjects
from shared.bus import Bus
from shared.messages import conversation as conv
from shared.signing import jwt_encode
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, TEST_KEYRING, System

T = TypeVar("T")


def basic(key_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}


ACCOUNT = basic(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)


@dataclass
class Tenant:
    """A running system with one app and an app key, plus helpers to call it."""

    system: System
    http: aiohttp.ClientSession
    app_id: str
    key_id: str
    secret: str

    @property
    def base(self) -> str:
        return self.system.base_url

    @property
    def auth(self) -> dict[str, str]:
        return basic(self.key_id, self.secret)

    def client(self, key_id: str | None = None, secret: str | None = None) -> sc.ApiClient:
        config = sc.Configuration(host=self.base, username=key_id or self.key_id, password=secret or self.secret)
        return sc.ApiClient(config)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a (synchronous) client call in a thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def request(self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None,
                      data: bytes | None = None) -> tuple[int, Any]:
        hdrs = {**self.auth, **(headers or {})}
        async with self.http.request(method, self.base + path, json=body, data=data, headers=hdrs) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)


async def create_tenant(system: System, http: aiohttp.ClientSession, name: str = "Acme") -> tuple[str, str, str]:
    """Bootstrap as the docs say: POST /v2/apps with the account key, then an app key."""
    async with http.post(system.base_url + "/v2/apps", json={"displayName": name}, headers=ACCOUNT) as resp:
        assert resp.status == 201
        app_id = (await resp.json())["app"]["id"]
    async with http.post(system.base_url + f"/v2/apps/{app_id}/keys", json={"displayName": "server"},
                         headers=ACCOUNT) as resp:
        assert resp.status == 201
        key = (await resp.json())["key"]
    assert key["id"].startswith("app_") and len(key["id"]) == 28
    return app_id, key["id"], key["secret"]


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """Every test here (and in the modules that take `tenant` from here and `system` too) runs with
    the services' state on SQLite, then on PostgreSQL."""
    return system_on_each_engine


@pytest.fixture
async def tenant(system: System) -> AsyncIterator[Tenant]:
    await system.start("identity", "conversations")
    async with aiohttp.ClientSession() as http:
        app_id, key_id, secret = await create_tenant(system, http)
        yield Tenant(system, http, app_id, key_id, secret)


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 5.0) -> T:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def text_post(text: str, author_type: str = "business") -> sc.MessagePost:
    return sc.MessagePost(author=sc.Author(type=author_type),
                          content=sc.Content(sc.TextMessage(type="text", text=text)))


async def new_user_conversation(t: Tenant, external_id: str = "u-1") -> tuple[str, str]:
    api = sc.UsersApi(t.client())
    user = (await t.call(api.create_user, t.app_id, sc.UserCreateBody(external_id=external_id))).user
    conversations = sc.ConversationsApi(t.client())
    body = sc.ConversationCreateBody(type="personal", participants=[
        sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user.id))])
    conversation = (await t.call(conversations.create_conversation, t.app_id, body)).conversation
    return user.id, conversation.id


# --- auth and apps ---------------------------------------------------------------------------

async def test_apps_and_auth(tenant: Tenant) -> None:
    t = tenant
    apps = sc.AppsApi(t.client(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET))
    created = await t.call(apps.create_app, sc.AppCreateBody(display_name="Second"))
    assert created.app.display_name == "Second" and len(created.app.id) == 24
    listed = await t.call(apps.list_apps)
    assert {a.id for a in listed.apps} == {t.app_id, created.app.id}
    assert listed.meta.has_more is False
    # An app key sees its own app, cannot list/create apps (403) and cannot touch another app (403).
    own = sc.AppsApi(t.client())
    assert (await t.call(own.get_app, t.app_id)).app.id == t.app_id
    with pytest.raises(ApiException) as exc:
        await t.call(own.list_apps)
    assert exc.value.status == 403
    with pytest.raises(ApiException) as exc:
        await t.call(own.get_app, created.app.id)
    assert exc.value.status == 403
    # Wrong secret, unknown key, no credentials → 401 with SunCo's error body.
    with pytest.raises(ApiException) as exc:
        await t.call(sc.AppsApi(t.client(t.key_id, "wrong")).get_app, t.app_id)
    assert exc.value.status == 401
    assert json.loads(exc.value.body)["errors"][0]["code"] == "unauthorized"
    async with t.http.get(f"{t.base}/v2/apps/{t.app_id}") as resp:
        assert resp.status == 401
    # JWT with kid + scope app works; wrong scope and bad signature do not.
    token = jwt_encode({"scope": "app"}, t.secret, kid=t.key_id)
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body["app"]["id"] == t.app_id
    bad_scope = jwt_encode({"scope": "account"}, t.secret, kid=t.key_id)
    status, _ = await t.request("GET", f"/v2/apps/{t.app_id}", headers={"Authorization": f"Bearer {bad_scope}"})
    assert status == 401
    forged = jwt_encode({"scope": "app"}, "not-the-secret", kid=t.key_id)
    status, _ = await t.request("GET", f"/v2/apps/{t.app_id}", headers={"Authorization": f"Bearer {forged}"})
    assert status == 401
    account_jwt = jwt_encode({"scope": "account"}, ACCOUNT_KEY_SECRET, kid=ACCOUNT_KEY_ID)
    status, body = await t.request("GET", "/v2/apps", headers={"Authorization": f"Bearer {account_jwt}"})
    assert status == 200 and len(body["apps"]) == 2
    # Update and delete with the account key.
    updated = await t.call(apps.update_app, created.app.id, sc.AppUpdateBody(display_name="Renamed"))
    assert updated.app.display_name == "Renamed"
    assert await t.call(apps.delete_app, created.app.id) == {}
    with pytest.raises(ApiException) as exc:
        await t.call(apps.get_app, created.app.id)
    assert exc.value.status == 404


async def test_app_keys(tenant: Tenant) -> None:
    t = tenant
    keys = sc.AppKeysApi(t.client())
    created = await t.call(keys.create_app_key, t.app_id, sc.AppKeyCreateBody(display_name="rotation"))
    assert created.key.id.startswith("app_") and created.key.secret
    listed = await t.call(keys.list_app_keys, t.app_id)
    assert {k.id for k in listed.keys} == {t.key_id, created.key.id}
    got = await t.call(keys.get_app_key, t.app_id, created.key.id)
    assert got.key.display_name == "rotation"
    # The new key works, then stops working once deleted.
    assert (await t.call(sc.AppsApi(t.client(created.key.id, created.key.secret)).get_app, t.app_id)).app
    assert await t.call(keys.delete_app_key, t.app_id, created.key.id) == {}
    with pytest.raises(ApiException) as exc:
        await t.call(sc.AppsApi(t.client(created.key.id, created.key.secret)).get_app, t.app_id)
    assert exc.value.status == 401
    with pytest.raises(ApiException) as exc:
        await t.call(keys.get_app_key, t.app_id, created.key.id)
    assert exc.value.status == 404


# --- users and conversations -----------------------------------------------------------------

async def test_users_and_clients(tenant: Tenant) -> None:
    t = tenant
    users = sc.UsersApi(t.client())
    created = await t.call(users.create_user, t.app_id, sc.UserCreateBody(
        external_id="alice", profile=sc.Profile(given_name="Alice"), metadata={"tier": "gold"}))
    user = created.user
    assert len(user.id) == 24 and user.external_id == "alice" and user.profile.given_name == "Alice"
    assert (await t.call(users.get_user, t.app_id, "alice")).user.id == user.id
    assert (await t.call(users.get_user, t.app_id, user.id)).user.external_id == "alice"
    with pytest.raises(ApiException) as exc:
        await t.call(users.create_user, t.app_id, sc.UserCreateBody(external_id="alice"))
    assert exc.value.status == 409
    updated = await t.call(users.update_user, t.app_id, "alice",
                           sc.UserUpdateBody(profile=sc.Profile(surname="Smith")))
    assert updated.user.profile.surname == "Smith"
    clients = await t.call(sc.ClientsApi(t.client()).list_clients, t.app_id, "alice")
    assert clients.clients == []
    assert await t.call(users.delete_user, t.app_id, user.id) == {}
    with pytest.raises(ApiException) as exc:
        await t.call(users.get_user, t.app_id, "alice")
    assert exc.value.status == 404


async def test_conversations_crud_and_participants(tenant: Tenant) -> None:
    t = tenant
    user_id, conversation_id = await new_user_conversation(t, "bob")
    conversations = sc.ConversationsApi(t.client())
    got = (await t.call(conversations.get_conversation, t.app_id, conversation_id)).conversation
    assert got.type == "personal" and got.is_default is True and got.created_at.endswith("Z")
    second = (await t.call(conversations.create_conversation, t.app_id, sc.ConversationCreateBody(
        type="personal", display_name="Billing",
        participants=[sc.ParticipantSubSchema(sc.ParticipantWithUserExternalId(user_external_id="bob"))]))).conversation
    assert second.is_default is False and second.display_name == "Billing"
    # Both filter styles: the 17.x client sends URL-encoded JSON; older clients send filter[...].
    listed = await t.call(conversations.list_conversations, t.app_id,
                          sc.ConversationListFilter(user_external_id="bob"))
    assert [c.id for c in listed.conversations] == [conversation_id, second.id]
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations?filter[userId]={user_id}"
                                          "&page[size]=1")
    assert status == 200 and [c["id"] for c in body["conversations"]] == [conversation_id]
    assert body["meta"]["hasMore"] is True and "page%5Bafter%5D" in body["links"]["next"]
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations?filter[userId]={user_id}"
                                          f"&page[after]={conversation_id}")
    assert [c["id"] for c in body["conversations"]] == [second.id]
    updated = (await t.call(conversations.update_conversation, t.app_id, second.id, sc.ConversationUpdateBody(
        description="About invoices", metadata={"lang": "en"}))).conversation
    assert updated.description == "About invoices" and updated.metadata == {"lang": "en"}
    assert updated.display_name == "Billing"
    participants = await t.call(sc.ParticipantsApi(t.client()).list_participants, t.app_id, conversation_id)
    assert [p.user_id for p in participants.participants] == [user_id]
    assert participants.participants[0].user_external_id == "bob"
    assert participants.participants[0].client_associations == []
    # The default conversation cannot be deleted; another one can.
    with pytest.raises(ApiException) as exc:
        await t.call(conversations.delete_conversation, t.app_id, conversation_id)
    assert exc.value.status == 400
    await t.call(sc.MessagesApi(t.client()).post_message, t.app_id, second.id, text_post("invoice 4711 is paid"))
    assert await t.call(conversations.delete_conversation, t.app_id, second.id) == {}
    with pytest.raises(ApiException) as exc:
        await t.call(conversations.get_conversation, t.app_id, second.id)
    assert exc.value.status == 404
    # The bus keeps nothing of its events but their announcement (`conversation:remove`) and
    # the desk's copy of it.
    bus = await Bus.connect(t.system.nats_url, "test-deleted-conversation")
    try:
        left = []
        info = await bus.js.stream_info(subjects.EVENTS.name)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await bus.js.get_msg(subjects.EVENTS.name, seq)
                if msg.subject and second.id in msg.subject:
                    left.append(conv.decode(msg.data or b""))
        assert [type(event).__name__ for event in left] == ["ConversationRemoved"] * 2
    finally:
        await bus.close()
    # Unknown user → 404; sdkGroup → 400.
    with pytest.raises(ApiException) as exc:
        await t.call(conversations.create_conversation, t.app_id, sc.ConversationCreateBody(
            type="personal",
            participants=[sc.ParticipantSubSchema(sc.ParticipantWithUserExternalId(user_external_id="nobody"))]))
    assert exc.value.status == 404


async def test_other_apps_resources_are_not_found(tenant: Tenant) -> None:
    t = tenant
    _, conversation_id = await new_user_conversation(t, "carol")
    other_app, other_key, other_secret = await create_tenant(t.system, t.http, "Other")
    other = sc.ConversationsApi(t.client(other_key, other_secret))
    with pytest.raises(ApiException) as exc:
        await t.call(other.get_conversation, other_app, conversation_id)
    assert exc.value.status == 404
    with pytest.raises(ApiException) as exc:
        await t.call(sc.MessagesApi(t.client(other_key, other_secret)).post_message, other_app, conversation_id,
                     text_post("hi"))
    assert exc.value.status == 404
    # The other app's key on this app's path → 403 whatever the resource.
    with pytest.raises(ApiException) as exc:
        await t.call(other.get_conversation, t.app_id, conversation_id)
    assert exc.value.status == 403


async def test_another_apps_path_is_403_whether_or_not_that_app_exists(tenant: Tenant) -> None:
    t = tenant
    other_app, _key, _secret = await create_tenant(t.system, t.http, "Other")
    for path in ("", "/integrations", f"/conversations/{'0' * 24}", "/users/someone"):
        existing = await t.request("GET", f"/v2/apps/{other_app}{path}")
        missing = await t.request("GET", f"/v2/apps/{'f' * 24}{path}")
        assert existing == missing == (403, {"errors": [{"code": "forbidden",
                                                         "title": "This key does not grant access to this app"}]})


# Every credential field of every channel type, with a value that must never come back.
CREDENTIALS: dict[str, dict[str, Any]] = {
    "whatsapp": {"phoneNumber": "+15550001", "phoneNumberId": "1234", "accessToken": "EAAsecret-wa-access",
                 "appSecret": "secret-wa-app", "accountManagementAccessToken": "secret-wa-management"},
    "messenger": {"pageId": "102290129340398", "pageAccessToken": "EAAsecret-ms-page", "appSecret": "secret-ms-app",
                  "appId": "5551212"},
    "telegram": {"token": "123456789:secret-telegram-token", "username": "demo_bot"},
    "twilio": {"accountSid": "AC" + "0" * 32, "authToken": "secret-twilio-auth", "phoneNumber": "+15550002"},
    "android": {"projectId": "demo", "clientEmail": "a@demo.iam.gserviceaccount.com",
                "privateKey": "-----BEGIN PRIVATE KEY-----\nsecret-fcm-key\n-----END PRIVATE KEY-----\n"},
    "ios": {"keyId": "ABCDE12345", "teamId": "TEAM123456", "bundleId": "com.demo",
            "signingKey": "-----BEGIN PRIVATE KEY-----\nsecret-apns-key\n-----END PRIVATE KEY-----\n"},
    "mailgun": {"domain": "mg.demo.example", "fromAddress": "shop@mg.demo.example", "apiKey": "secret-mailgun-api",
                "password": "secret-smtp-password"},
}
SECRET_VALUES = ("EAAsecret-wa-access", "secret-wa-app", "secret-wa-management", "EAAsecret-ms-page",
                 "secret-ms-app", "secret-telegram-token", "secret-twilio-auth", "secret-fcm-key", "secret-apns-key",
                 "secret-mailgun-api", "secret-smtp-password", "rotated-secret")


async def test_channel_credentials_are_write_only_and_shared_values_are_returned(tenant: Tenant) -> None:
    t = tenant
    base = f"/v2/apps/{t.app_id}/integrations"
    answers: list[Any] = []
    ids: dict[str, str] = {}
    for kind, fields in CREDENTIALS.items():
        status, body = await t.request("POST", base, body={"type": kind, "displayName": kind, **fields})
        assert status == 201, body
        ids[kind] = body["integration"]["id"]
        rotate = {"appSecret": "rotated-secret"} if "appSecret" in fields else {"displayName": "renamed"}
        answers += [body, await t.request("GET", f"{base}/{ids[kind]}"),
                    await t.request("PATCH", f"{base}/{ids[kind]}", body=rotate)]
    answers.append(await t.request("GET", base))
    text = json.dumps(answers)
    leaked = [value for value in SECRET_VALUES if value in text]
    assert leaked == [], leaked
    # The Meta handshake token is returned (generated when not given): it only answers Meta's
    # subscription GET and authenticates nothing (notifications are checked with appSecret).
    _, whatsapp = await t.request("GET", f"{base}/{ids['whatsapp']}")
    assert len(whatsapp["integration"]["verifyToken"]) >= 16
    # A webhook's secret is returned on create and on GET, as SunCo does (X-API-Key, signature).
    status, created = await t.request("POST", base, body={"type": "custom", "webhooks": [
        {"target": "https://bot.example/hook", "triggers": ["conversation:message"]}]})
    assert status == 201
    hook = created["integration"]["webhooks"][0]
    assert len(hook["secret"]) >= 16
    custom = created["integration"]["id"]
    _, again = await t.request("GET", f"{base}/{custom}/webhooks/{hook['id']}")
    _, listed = await t.request("GET", f"{base}/{custom}/webhooks")
    assert again["webhook"]["secret"] == listed["webhooks"][0]["secret"] == hook["secret"]
    fetched = await t.call(sc.WebhooksApi(t.client()).get_webhook, t.app_id, custom, hook["id"])
    assert fetched.webhook.secret == hook["secret"]


# --- messages --------------------------------------------------------------------------------

async def test_post_and_page_messages_backwards(tenant: Tenant) -> None:
    t = tenant
    _, conversation_id = await new_user_conversation(t, "dave")
    messages = sc.MessagesApi(t.client())
    posted = await t.call(messages.post_message, t.app_id, conversation_id, text_post("m0"))
    assert isinstance(posted, sc.MessagePostResponse)  # a 200 would deserialize to None
    first = posted.messages[0]
    assert first.author.type == "business" and first.content.actual_instance.text == "m0"
    assert len(first.id) == 24 and first.received.endswith("Z")
    path = f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages"
    for i in range(1, 205):
        status, _ = await t.request("POST", path, body={"author": {"type": "business"},
                                                        "content": {"type": "text", "text": f"m{i}"}})
        assert status == 201

    def texts(page: Any) -> list[str]:
        return [m.content.actual_instance.text for m in page.messages]

    latest = await t.call(messages.list_messages, t.app_id, conversation_id)
    assert texts(latest) == [f"m{i}" for i in range(105, 205)]
    assert latest.meta.has_more is True and latest.meta.before_cursor == latest.messages[0].id
    assert "page%5Bbefore%5D=" in latest.links.prev
    middle = await t.call(messages.list_messages, t.app_id, conversation_id,
                          sc.Page(before=latest.meta.before_cursor))
    assert texts(middle) == [f"m{i}" for i in range(5, 105)]
    oldest = await t.call(messages.list_messages, t.app_id, conversation_id,
                          sc.Page(before=middle.meta.before_cursor))
    assert texts(oldest) == [f"m{i}" for i in range(5)]
    assert oldest.meta.has_more is False
    # The documented bracket style gives the same pages; page[after] pages forwards.
    status, body = await t.request("GET", f"{path}?page[before]={latest.meta.before_cursor}")
    assert status == 200 and [m["content"]["text"] for m in body["messages"]] == texts(middle)
    status, body = await t.request("GET", f"{path}?page[after]={oldest.messages[-1].id}")
    assert [m["content"]["text"] for m in body["messages"]] == texts(middle)
    assert body["meta"]["hasMore"] is True
    status, _ = await t.request("GET", f"{path}?page[before]=short")
    assert status == 400


async def test_delete_messages(tenant: Tenant) -> None:
    t = tenant
    _, conversation_id = await new_user_conversation(t, "erin")
    messages = sc.MessagesApi(t.client())
    a = (await t.call(messages.post_message, t.app_id, conversation_id, text_post("a"))).messages[0]
    await t.call(messages.post_message, t.app_id, conversation_id, text_post("b"))
    assert await t.call(messages.delete_message, t.app_id, conversation_id, a.id) == {}
    listed = await t.call(messages.list_messages, t.app_id, conversation_id)
    assert [m.content.actual_instance.text for m in listed.messages] == ["b"]
    with pytest.raises(ApiException) as exc:
        await t.call(messages.delete_message, t.app_id, conversation_id, a.id)
    assert exc.value.status == 404
    assert await t.call(messages.delete_all_messages, t.app_id, conversation_id) == {}
    assert (await t.call(messages.list_messages, t.app_id, conversation_id)).messages == []


async def test_activity(tenant: Tenant) -> None:
    t = tenant
    user_id, conversation_id = await new_user_conversation(t, "fay")
    bus = await Bus.connect(t.system.nats_url, "test-events")
    seen: list[dict[str, Any]] = []

    async def on_event(msg: Any) -> None:
        seen.append(json.loads(msg.data))

    await bus.nc.subscribe(subjects.event_subject(t.app_id, conversation_id), cb=on_event)
    await bus.nc.flush()  # the server has the subscription before anything is published
    try:
        await _check_activity(t, user_id, conversation_id, seen)
    finally:
        await bus.close()


async def _check_activity(t: Tenant, user_id: str, conversation_id: str, seen: list[dict[str, Any]]) -> None:
    activities = sc.ActivitiesApi(t.client())
    assert await t.call(activities.post_activity, t.app_id, conversation_id,
                        sc.ActivityPost(type="typing:start", author=sc.Author(type="business"))) == {}
    assert await t.call(activities.post_activity, t.app_id, conversation_id,
                        sc.ActivityPost(type="conversation:read", author=sc.Author(type="business"))) == {}

    async def two_activities() -> list[dict[str, Any]] | None:
        found = [e for e in seen if e["type"] == "conversation.activity"]
        return found if len(found) == 2 else None

    found = await eventually(two_activities)
    assert [e["activity"]["type"] for e in found] == ["typing:start", "conversation:read"]
    assert found[0]["activity"]["author"]["type"] == "business" and found[0]["user_id"] == user_id
    conversation = (await t.call(sc.ConversationsApi(t.client()).get_conversation, t.app_id,
                                 conversation_id)).conversation
    assert conversation.business_last_read is not None
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/activity",
                                body={"type": "typing:start", "author": {"type": "user", "userId": user_id}})
    assert status == 400  # a user author may only mark read


# --- integrations and webhooks ---------------------------------------------------------------

async def test_integrations_and_webhooks(tenant: Tenant) -> None:
    t = tenant
    integrations = sc.IntegrationsApi(t.client())
    custom = (await t.call(integrations.create_integration, t.app_id, sc.Custom(
        display_name="bot", webhooks=[sc.Webhook(target="https://bot.example/hook",
                                                 triggers=["conversation:message"])]))).integration
    assert custom.type == "custom" and custom.status == "active"
    assert custom.webhooks[0].secret and custom.webhooks[0].version == "v2"
    web = (await t.call(integrations.create_integration, t.app_id, sc.Web(
        display_name="site", brand_color="112233", business_name="Acme",
        origin_whitelist=["https://acme.example"]))).integration
    assert web.type == "web" and web.business_name == "Acme" and web.origin_whitelist == ["https://acme.example"]
    wa_plain = (await t.call(integrations.create_integration, t.app_id, sc.Whatsapp(
        display_name="wa", hsm_fallback_language="fr_FR"))).integration
    assert wa_plain.type == "whatsapp" and wa_plain.status == "inactive"  # no Cloud API credentials yet
    # Threadline's WhatsApp fields need raw JSON (the client's model does not know them).
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/integrations", body={
        "type": "whatsapp", "displayName": "wa2", "phoneNumber": "+15550001", "phoneNumberId": "1234",
        "accessToken": "EAAG-secret-token", "appSecret": "app-secret-value", "verifyToken": "verify-me"})
    assert status == 201
    wa = body["integration"]
    assert wa["status"] == "active" and wa["phoneNumberId"] == "1234" and wa["apiVersion"] == "v23.0"
    assert wa["verifyToken"] == "verify-me" and "accessToken" not in wa and "appSecret" not in wa
    assert wa["baseUrl"] == "https://graph.facebook.com"
    parsed = (await t.call(integrations.get_integration, t.app_id, wa["id"])).integration
    assert isinstance(parsed, sc.Whatsapp) and parsed.phone_number == "+15550001"
    # KV carries the secrets for the channel service, sealed: only the secrets key opens them.
    bus = await Bus.connect(t.system.nats_url, "test-kv")
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    raw = (await kv.get(wa["id"])).value
    assert b"EAAG-secret-token" not in raw and b"app-secret-value" not in raw and b"verify-me" not in raw
    record = records.integration_decoder(TEST_KEYRING)(raw)
    assert record.config["accessToken"] == "EAAG-secret-token" and record.app_id == t.app_id
    # List (with a type filter), update, get.
    listed = await t.call(integrations.list_integrations, t.app_id)
    assert {i.id for i in listed.integrations} == {custom.id, web.id, wa_plain.id, wa["id"]}
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/integrations?filter[types]=whatsapp")
    assert {i["id"] for i in body["integrations"]} == {wa_plain.id, wa["id"]}
    updated = (await t.call(integrations.update_integration, t.app_id, web.id,
                            sc.IntegrationUpdate(sc.WebUpdate(business_name="Acme Inc")))).integration
    # (the client's WebUpdate always sends its default colours; fields it leaves unset are kept)
    assert updated.business_name == "Acme Inc" and updated.origin_whitelist == ["https://acme.example"]
    status, body = await t.request("PATCH", f"/v2/apps/{t.app_id}/integrations/{wa['id']}",
                                   body={"accessToken": "rotated-token"})
    assert status == 200 and "accessToken" not in body["integration"]

    async def rotated() -> bool:
        entry = await kv.get(wa["id"])
        return records.integration_decoder(TEST_KEYRING)(entry.value).config["accessToken"] == "rotated-token"

    await eventually(rotated)
    # Webhooks under the custom integration.
    webhooks = sc.WebhooksApi(t.client())
    hook = (await t.call(webhooks.create_webhook, t.app_id, custom.id, sc.WebhookCreateBody(
        target="https://bot.example/second", triggers=["conversation:create", "client:add"],
        include_full_user=True))).webhook
    assert hook.include_full_user is True and hook.secret
    hooks_kv = await bus.key_value(subjects.WEBHOOKS_BUCKET)
    raw = (await hooks_kv.get(records.webhook_key(t.app_id, hook.id))).value
    assert hook.secret.encode() not in raw
    stored = records.webhook_decoder(TEST_KEYRING)(raw)
    assert stored.target == "https://bot.example/second" and stored.secret == hook.secret
    listed_hooks = await t.call(webhooks.list_webhooks, t.app_id, custom.id)
    assert len(listed_hooks.webhooks) == 2
    changed = (await t.call(webhooks.update_webhook, t.app_id, custom.id, hook.id,
                            sc.WebhookBody(triggers=["conversation:message"]))).webhook
    assert changed.triggers == ["conversation:message"] and changed.target == "https://bot.example/second"
    assert (await t.call(webhooks.get_webhook, t.app_id, custom.id, hook.id)).webhook.triggers == [
        "conversation:message"]
    with pytest.raises(ApiException) as exc:
        await t.call(webhooks.create_webhook, t.app_id, custom.id, sc.WebhookCreateBody(
            target="https://bot.example/x", triggers=["conversation:nonsense"]))
    assert exc.value.status == 400
    assert await t.call(webhooks.delete_webhook, t.app_id, custom.id, hook.id) == {}
    with pytest.raises(ApiException) as exc:
        await t.call(webhooks.get_webhook, t.app_id, custom.id, hook.id)
    assert exc.value.status == 404
    # Deleting the custom integration removes it and its webhooks from KV.
    first_hook_key = records.webhook_key(t.app_id, custom.webhooks[0].id)
    assert (await hooks_kv.get(first_hook_key)).value
    assert await t.call(integrations.delete_integration, t.app_id, custom.id) == {}
    with pytest.raises(ApiException) as exc:
        await t.call(integrations.get_integration, t.app_id, custom.id)
    assert exc.value.status == 404

    async def gone() -> bool:
        try:
            entry = await hooks_kv.get(first_hook_key)
        except Exception:
            return True
        return not entry.value

    await eventually(gone)
    # Unsupported (valid) type and invalid type → 400.
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/integrations", body={"type": "telegram"})
    assert status == 400
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/integrations", body={"type": "pigeon"})
    assert status == 400
    await bus.close()


async def test_kv_is_republished_on_start(tenant: Tenant) -> None:
    t = tenant
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/integrations",
                                   body={"type": "web", "displayName": "site"})
    assert status == 201
    integration_id = body["integration"]["id"]
    bus = await Bus.connect(t.system.nats_url, "test-kv")
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.delete(integration_id)
    await kv.put("000000000000000000000000", b"{}")  # a stale key the DB does not know
    await t.system.restart_service("conversations")
    entry = await kv.get(integration_id)
    assert records.INTEGRATION_DECODER.decode(entry.value).type == "web"
    # Asked for directly: nats-py's `keys()` answers "no keys" when its watcher's first entries are
    # still on the way as it reads the consumer's pending count (0): seen under load.
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("000000000000000000000000")
    await bus.close()


# --- errors and the document -----------------------------------------------------------------

async def test_error_statuses(tenant: Tenant) -> None:
    t = tenant
    _, conversation_id = await new_user_conversation(t, "gus")
    path = f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages"
    # Invalid enum values → 400.
    status, body = await t.request("POST", path, body={"author": {"type": "robot"},
                                                       "content": {"type": "text", "text": "x"}})
    assert status == 400 and body["errors"][0]["code"] == "bad_request"
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/conversations",
                                body={"type": "group", "participants": [{"userExternalId": "gus"}]})
    assert status == 400
    # Text SunCo refuses: empty, or over 4096 characters; an image without a URL.
    for content in ({"type": "text", "text": ""}, {"type": "text", "text": "x" * 4097},
                    {"type": "image", "mediaUrl": ""}):
        status, body = await t.request("POST", path, body={"author": {"type": "business"}, "content": content})
        assert status == 400, content
        assert body["errors"][0]["code"] == "bad_request"
    status, _ = await t.request("POST", path, body={"author": {"type": "business"},
                                                    "content": {"type": "carousel", "items": []}})
    assert status == 400
    # Malformed JSON, wrong content type, too large.
    status, body = await t.request("POST", path, data=b'{"author": ', headers={"Content-Type": "application/json"})
    assert status == 400 and "errors" in body
    status, _ = await t.request("POST", path, data=b"author=business", headers={"Content-Type": "text/plain"})
    assert status == 415
    big = json.dumps({"author": {"type": "business"}, "content": {"type": "text", "text": "x" * 120_000}})
    status, body = await t.request("POST", path, data=big.encode(), headers={"Content-Type": "application/json"})
    assert status == 413 and body["errors"][0]["code"] == "payload_too_large"
    # Nothing was written by any of these.
    listed = await t.call(sc.MessagesApi(t.client()).list_messages, t.app_id, conversation_id)
    assert listed.messages == []
    status, _ = await t.request("GET", f"/v2/apps/{t.app_id}/conversations/{'0' * 24}")
    assert status == 404


HOSTILE_URLS = ("javascript:alert(document.cookie)", "JavaScript:alert(1)", " javascript:alert(1)",
                "java\tscript:alert(1)", "data:text/html,<script>alert(1)</script>", "vbscript:msgbox(1)",
                "//evil.example/x", "/relative/path", "https://ok.example/\nx", "http://[::1")


async def test_urls_in_messages_profiles_and_conversations_must_be_http(tenant: Tenant) -> None:
    t = tenant
    user_id, conversation_id = await new_user_conversation(t, "ursula")
    path = f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages"
    business = {"type": "business"}

    def bodies(url: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            ("POST", path, {"author": business, "content": {"type": "file", "mediaUrl": url}}),
            ("POST", path, {"author": business, "content": {"type": "image", "mediaUrl": url}}),
            ("POST", path, {"author": business, "content": {"type": "text", "text": "see", "actions": [
                {"type": "link", "text": "Open", "uri": url}]}}),
            ("POST", path, {"author": business, "content": {"type": "image", "mediaUrl": "https://ok.example/a.png",
                                                            "actions": [{"type": "link", "text": "x", "uri": url}]}}),
            ("POST", path, {"author": business, "content": {"type": "text", "text": "see", "actions": [
                {"type": "webview", "text": "Open", "uri": url, "fallback": "https://ok.example"}]}}),
            ("POST", path, {"author": business, "content": {"type": "text", "text": "see", "actions": [
                {"type": "webview", "text": "Open", "uri": "https://ok.example", "fallback": url}]}}),
            ("POST", path, {"author": business, "content": {"type": "text", "text": "pick", "actions": [
                {"type": "reply", "text": "Yes", "payload": "y", "iconUrl": url}]}}),
            ("POST", path, {"author": {**business, "avatarUrl": url}, "content": {"type": "text", "text": "hi"}}),
            ("PATCH", f"/v2/apps/{t.app_id}/conversations/{conversation_id}", {"iconUrl": url}),
            ("POST", f"/v2/apps/{t.app_id}/conversations", {"type": "personal", "iconUrl": url,
                                                            "participants": [{"userId": user_id}]}),
            ("PATCH", f"/v2/apps/{t.app_id}/users/{user_id}", {"profile": {"avatarUrl": url}}),
            ("POST", f"/v2/apps/{t.app_id}/users", {"externalId": "mallory", "profile": {"avatarUrl": url}}),
        ]

    for url in HOSTILE_URLS:
        for method, where, body in bodies(url):
            status, answer = await t.request(method, where, body=body)
            assert status == 400, (url, body)
            assert answer["errors"][0]["code"] == "bad_request" and "http(s) URL" in answer["errors"][0]["title"]
    listed = await t.call(sc.MessagesApi(t.client()).list_messages, t.app_id, conversation_id)
    assert listed.messages == []
    # The same bodies with web URLs are fine (through the official client too).
    for method, where, body in bodies("https://cdn.example/files/menu.pdf"):
        status, answer = await t.request(method, where, body=body)
        assert status in (200, 201), (body, answer)
    post = sc.MessagePost(author=sc.Author(type="business"), content=sc.Content(sc.FileMessage(
        type="file", media_url="http://cdn.example/files/terms.pdf")))
    await t.call(sc.MessagesApi(t.client()).post_message, t.app_id, conversation_id, post)


async def test_openapi_document(tenant: Tenant) -> None:
    async with tenant.http.get(tenant.base + "/v2/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    post = doc["paths"]["/v2/apps/{appId}/conversations/{conversationId}/messages"]["post"]
    assert "201" in post["responses"] and post["operationId"] == "postMessage"
    assert "MessagePostBody" in doc["components"]["schemas"]
    assert set(doc["components"]["securitySchemes"]) == {"basicAuth", "bearerAuth"}
    assert "/v2/apps/{appId}/integrations/{integrationId}/webhooks/{webhookId}" in doc["paths"]
