"""SDK sessions against identity, conversations, handoff, web and app: a session creates nobody
until its first message, new sessions and link requests are rate-limited per source and app
(shared by replicas, 429 + Retry-After), session tokens expire and are renewed with a refresh
token, and a message to a conversation the business deleted is refused, never accepted and then
dropped. Real NATS, SQLite and HTTP (through the front door)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from services.web import app as web_app
from shared.http import basic_auth_header
from shared.sdk import ErrorFrame, SessionClaims, decode_frame
from shared.sdk_service import SdkSettings, issue_tokens, new_session_claims
from shared.signing import jwt_encode, sign_token
from tests.harness import (
    ACCOUNT_KEY_ID,
    ACCOUNT_KEY_SECRET,
    SDK_TOKEN_SECRET,
    System,
    service_credentials,
    start_sdk_session,
)
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "handoff", "web", "app")
SETTINGS = SdkSettings(token_secret=SDK_TOKEN_SECRET, ping_interval=20, socket_queue_size=256, request_timeout=5)


@dataclass
class Shop:
    system: System
    http: aiohttp.ClientSession
    app_id: str
    integrations: dict[str, str]
    auth: dict[str, str]
    key_id: str
    key_secret: str

    @property
    def base(self) -> str:
        return self.system.base_url

    def sdk(self, path: str, root: str = "sdk") -> str:
        return f"{self.base}/{root}/v1/apps/{self.app_id}{path}"

    async def api(self, method: str, path: str, body: Any = None, status: int | None = None) -> dict[str, Any]:
        async with self.http.request(method, f"{self.base}/v2/apps/{self.app_id}{path}", headers=self.auth,
                                     json=body) as resp:
            data: dict[str, Any] = await resp.json()
            assert resp.status == (status or (201 if method == "POST" else 200)), data
        return data

    async def new_session(self, ip: str | None = None, origin: str | None = None, base: str | None = None,
                          root: str = "sdk", integration: str = "web") -> tuple[int, dict[str, Any], Any]:
        headers = {**({"X-Forwarded-For": ip} if ip else {}), **({"Origin": origin} if origin else {})}
        url = f"{base or self.base}/{root}/v1/apps/{self.app_id}/integrations/{self.integrations[integration]}/sessions"
        async with self.http.post(url, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers

    async def call(self, method: str, path: str, token: str, body: Any = None,
                   root: str = "sdk") -> tuple[int, dict[str, Any]]:
        async with self.http.request(method, self.sdk(path, root), json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json()

    async def users(self) -> int:
        """Users identity holds for this app (white-box: its own database)."""
        store = self.system.service("identity").store
        return int(await store.db.fetchval("SELECT COUNT(*) FROM users WHERE app_id = $1", self.app_id))

    async def texts(self, session: dict[str, Any]) -> list[str]:
        status, body = await self.call("GET", f"/conversations/{session['conversationId']}/messages",
                                       session["sessionToken"])
        assert status == 200, body
        return [m["message"]["content"].get("text", "") for m in body["messages"]]


async def open_shop(system: System, tmp_path: Path, http: aiohttp.ClientSession,
                    env: dict[str, str] | None = None) -> Shop:
    await system.start(*SERVICES, env=env)
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   str(tmp_path / "sbx"), ("web", "whatsapp", "android"))
    return Shop(system, http, info["appId"], {kind: entry["id"] for kind, entry in info["integrations"].items()},
                basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]), info["apiKey"]["id"],
                info["apiKey"]["secret"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def shop(system: System, tmp_path: Path, http: aiohttp.ClientSession) -> Shop:
    return await open_shop(system, tmp_path, http)


def too_many(status: int, body: dict[str, Any], headers: Any) -> int:
    """A 429 in SunCo's error shape with a Retry-After in whole seconds; the seconds."""
    assert status == 429, body
    assert body["errors"][0]["code"] == "too_many_requests", body
    retry = int(headers["Retry-After"])
    assert retry >= 1
    return retry


# --- a session creates nobody until its first message ----------------------------------------

async def test_a_session_creates_nobody_until_its_first_message(shop: Shop) -> None:
    sessions = []
    for _ in range(5):
        status, body, _headers = await shop.new_session()
        assert status == 201, body
        assert set(body) == {"sessionToken", "refreshToken", "expiresAt"}  # no user, client, conversation yet
        sessions.append(body)
    assert await shop.users() == 0
    pending = sessions[0]["sessionToken"]
    # A pending session can read nothing and ask for nothing but its first message.
    fake = "0" * 24
    for method, path, body in (("GET", f"/conversations/{fake}/messages", None),
                               ("POST", f"/conversations/{fake}/messages", {"clientMessageId": "a" * 16, "text": "x"}),
                               ("POST", f"/conversations/{fake}/activity", {"type": "typing:start"}),
                               ("POST", f"/conversations/{fake}/linkRequests",
                                {"integrationIds": [shop.integrations["whatsapp"]]}),
                               ("POST", f"/conversations/{fake}/notificationOptIns",
                                {"channel": "email", "address": "a@example.com"})):
        status, answer = await shop.call(method, path, pending, body)
        assert status == 409 and answer["errors"][0]["code"] == "conversation_not_started", (path, answer)
    async with shop.http.ws_connect(shop.sdk(f"/conversations/{fake}/socket?token={pending}")) as ws:
        frame = decode_frame((await ws.receive(timeout=5)).data)
        assert isinstance(frame, ErrorFrame) and frame.status == 409
    assert await shop.users() == 0

    # The first message creates the user, its client and conversation in one step.
    first = {"clientMessageId": str(uuid.uuid4()), "text": "hello, is anyone there?"}
    status, started = await shop.call("POST", "/conversations", pending, first)
    assert status == 201, started
    assert {"appUserId", "clientId", "conversationId", "sessionToken", "refreshToken", "expiresAt",
            "clientMessageId"} <= set(started)
    assert started["sessionToken"] != pending
    assert await shop.users() == 1
    await eventually(lambda: _has(shop, started, "hello, is anyone there?"))
    clients = (await shop.api("GET", f"/users/{started['appUserId']}/clients"))["clients"]
    assert [(c["id"], c["type"]) for c in clients] == [(started["clientId"], "sdk")]

    # A retry of the first message (its answer lost) is the same user and the same message.
    status, again = await shop.call("POST", "/conversations", pending, first)
    assert status == 201 and again["duplicate"] is True
    assert (again["appUserId"], again["conversationId"]) == (started["appUserId"], started["conversationId"])
    assert await shop.users() == 1
    # The old pending token still reads nothing; the new one cannot start a second conversation.
    status, _ = await shop.call("GET", f"/conversations/{started['conversationId']}/messages", pending)
    assert status == 409
    status, answer = await shop.call("POST", "/conversations", started["sessionToken"],
                                     {"clientMessageId": str(uuid.uuid4()), "text": "again"})
    assert status == 409 and answer["errors"][0]["code"] == "conversation_started"
    assert await shop.texts(started) == ["hello, is anyone there?"]


async def test_a_pending_session_logs_in_and_its_old_token_does_not_follow(shop: Shop) -> None:
    status, pending, _headers = await shop.new_session()
    assert status == 201
    jwt = jwt_encode({"scope": "user", "external_id": "dana", "exp": int(time.time()) + 600}, shop.key_secret,
                     shop.key_id)
    status, login = await shop.call("POST", "/sessions/login", pending["sessionToken"],
                                    {"externalId": "dana", "jwt": jwt})
    assert status == 200 and login["outcome"] == "identified", login
    assert (await shop.api("GET", "/users/dana"))["user"]["id"] == login["appUserId"]
    status, _ = await shop.call("POST", f"/conversations/{login['conversationId']}/messages", login["sessionToken"],
                                {"clientMessageId": str(uuid.uuid4()), "text": "signed in"})
    assert status == 202
    # The pending token was good for one visitor, who is now dana: it does not become dana's.
    status, body = await shop.call("POST", "/conversations", pending["sessionToken"],
                                   {"clientMessageId": str(uuid.uuid4()), "text": "am I dana?"})
    assert status == 401, body
    assert await shop.users() == 1


async def test_the_app_registers_its_install_with_the_first_message(shop: Shop) -> None:
    device = {"guid": "phone-1", "pushNotificationToken": "fcm-token-1", "appVersion": "1.0",
              "info": {"os": "Android"}}
    status, pending, _headers = await shop.new_session(root="app", integration="android")
    assert status == 201 and "appUserId" not in pending
    status, _answer = await shop.call("PUT", "/devices/phone-1", pending["sessionToken"], device, root="app")
    assert status == 409  # no client to register it under yet
    status, started = await shop.call("POST", "/conversations", pending["sessionToken"],
                                      {"clientMessageId": str(uuid.uuid4()), "text": "hi from the app",
                                       "device": device}, root="app")
    assert status == 201, started
    devices = (await shop.api("GET", f"/users/{started['appUserId']}/devices"))["devices"]
    assert [(d["guid"], d["pushNotificationToken"]) for d in devices] == [("phone-1", "fcm-token-1")]


async def _has(shop: Shop, session: dict[str, Any], text: str) -> bool:
    return text in await shop.texts(session)


# --- rate limits ------------------------------------------------------------------------------

LIMITED = {"THREADLINE_SDK_SESSIONS_PER_IP": "5/m", "THREADLINE_SDK_SESSIONS_PER_ORIGIN": "7/m",
           "THREADLINE_SDK_SESSIONS_PER_APP": "10/m", "THREADLINE_SDK_LINKS_PER_USER": "3/m"}


async def test_new_sessions_are_limited_per_address_origin_and_app(system: System, tmp_path: Path,
                                                                   http: aiohttp.ClientSession) -> None:
    shop = await open_shop(system, tmp_path, http, LIMITED)
    site = "https://shop.example"
    # 40 sessions in a burst from one address: 5 pass, the rest are refused and say when to retry.
    answers = [await shop.new_session(ip="203.0.113.7", origin=site) for _ in range(40)]
    assert [status for status, _body, _headers in answers[:5]] == [201] * 5
    for status, body, headers in answers[5:]:
        assert 1 <= too_many(status, body, headers) <= 60
    assert "per ip" in answers[5][1]["errors"][0]["title"]
    # The address is the client's, as the trusted front door forwarded it: others have their own.
    assert [(await shop.new_session(ip=ip, origin=site))[0] for ip in ("203.0.113.8", "203.0.113.9")] == [201, 201]
    # 7 from this Origin: the next one, from a fresh address, is over the per-(app, Origin) limit.
    status, body, headers = await shop.new_session(ip="203.0.113.10", origin=site)
    too_many(status, body, headers)
    assert "per origin" in body["errors"][0]["title"]
    # Another Origin has its own budget until the app's (10 a minute) is spent.
    statuses = [(await shop.new_session(ip=f"198.51.100.{n}", origin="https://other.example"))[0] for n in range(4)]
    assert statuses == [201, 201, 201, 429]
    assert await shop.users() == 0


async def test_replicas_share_the_session_budget(system: System, tmp_path: Path,
                                                 http: aiohttp.ClientSession) -> None:
    shop = await open_shop(system, tmp_path, http, LIMITED)
    # A second web replica on the same NATS, reached directly (its peer address is the client's).
    second = web_app.create({**system.env, **service_credentials("web"), **LIMITED})
    await second.start()
    try:
        other_base = f"http://127.0.0.1:{second.port}"
        statuses = []
        for n in range(6):
            status, _body, _headers = await shop.new_session(base=other_base if n % 2 else None)
            statuses.append(status)
        # Both replicas see loopback as the client: 5 between them, whichever answered.
        assert statuses == [201] * 5 + [429]
    finally:
        await second.stop()


async def test_link_requests_are_limited_per_session_user(system: System, tmp_path: Path,
                                                          http: aiohttp.ClientSession) -> None:
    shop = await open_shop(system, tmp_path, http, LIMITED)
    session = await start_sdk_session(http, shop.base, shop.app_id, shop.integrations["web"])
    path = f"/conversations/{session['conversationId']}/linkRequests"
    body = {"integrationIds": [shop.integrations["whatsapp"]]}
    for _ in range(3):
        status, answer = await shop.call("POST", path, session["sessionToken"], body)
        assert status == 201, answer
    async with http.post(shop.sdk(path), json=body,
                         headers={"Authorization": f"Bearer {session['sessionToken']}"}) as resp:
        too_many(resp.status, await resp.json(), resp.headers)
    # Another visitor has a budget of their own.
    other = await start_sdk_session(http, shop.base, shop.app_id, shop.integrations["web"], headers={
        "X-Forwarded-For": "203.0.113.9"})
    status, _ = await shop.call("POST", f"/conversations/{other['conversationId']}/linkRequests",
                                other["sessionToken"], body)
    assert status == 201


# --- a message to a conversation the business deleted ----------------------------------------

async def test_a_message_to_a_deleted_conversation_is_refused_not_dropped(shop: Shop) -> None:
    visitor = await start_sdk_session(shop.http, shop.base, shop.app_id, shop.integrations["web"], "first")
    # The business opens a second conversation for this user and hands it to the web.
    second = (await shop.api("POST", "/conversations", {
        "type": "personal", "participants": [{"userId": visitor["appUserId"]}]}))["conversation"]
    link = (await shop.api("POST", f"/users/{visitor['appUserId']}/linkRequests", {
        "integrationIds": [shop.integrations["web"]], "conversationId": second["id"]}))["linkRequests"][0]
    code = link["url"].split("threadline_code=")[1].split("&")[0]
    async with shop.http.post(shop.sdk(f"/integrations/{shop.integrations['web']}/sessions"),
                              json={"linkCode": code}) as resp:
        assert resp.status == 201, await resp.text()
        linked = await resp.json()
    assert linked["conversationId"] == second["id"]
    message = {"clientMessageId": str(uuid.uuid4()), "text": "still there?"}
    status, _ = await shop.call("POST", f"/conversations/{second['id']}/messages", linked["sessionToken"], message)
    assert status == 202
    await shop.api("DELETE", f"/conversations/{second['id']}")
    status, body = await shop.call("POST", f"/conversations/{second['id']}/messages", linked["sessionToken"],
                                   {"clientMessageId": str(uuid.uuid4()), "text": "hello?"})
    assert status == 404, body
    assert body == {"errors": [{"code": "conversation_not_found", "title": "Conversation not found"}]}


# --- expiring session tokens and refresh -----------------------------------------------------

def expired_tokens(session: dict[str, Any], issued_ago: float) -> dict[str, str]:
    """The session's tokens as they were issued `issued_ago` seconds ago (signed as the service does)."""
    claims = SessionClaims.from_token(SDK_TOKEN_SECRET, session["sessionToken"])
    assert claims is not None
    tokens = issue_tokens(SETTINGS, claims, time.time() - issued_ago)
    return {"sessionToken": tokens.session_token, "refreshToken": tokens.refresh_token}


async def test_an_expired_session_token_is_401_and_the_refresh_token_renews_it(shop: Shop) -> None:
    session = await start_sdk_session(shop.http, shop.base, shop.app_id, shop.integrations["web"], "hi")
    assert session["expiresAt"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 23 * 3600))
    old = expired_tokens(session, 25 * 3600)  # the session token lives 24 h
    path = f"/conversations/{session['conversationId']}/messages"
    status, body = await shop.call("GET", path, old["sessionToken"])
    assert status == 401 and body["errors"][0]["code"] == "session_expired", body
    async with shop.http.ws_connect(shop.sdk(f"/conversations/{session['conversationId']}/socket"
                                             f"?token={old['sessionToken']}")) as ws:
        frame = decode_frame((await ws.receive(timeout=5)).data)
        assert isinstance(frame, ErrorFrame) and (frame.status, frame.code) == (401, "session_expired")
    # The refresh token (30 days, renewed each time) gets a new pair: same ids, working token.
    async with shop.http.post(shop.sdk("/sessions/refresh"), json={"refreshToken": old["refreshToken"]}) as resp:
        assert resp.status == 200, await resp.text()
        renewed = await resp.json()
    assert (renewed["appUserId"], renewed["clientId"], renewed["conversationId"]) == (
        session["appUserId"], session["clientId"], session["conversationId"])
    await eventually(lambda: _has(shop, renewed, "hi"))
    # Each kind of token does its own job only.
    status, body = await shop.call("GET", path, renewed["refreshToken"])
    assert status == 401
    for wrong in (renewed["sessionToken"], "garbage", expired_tokens(session, 31 * 86400)["refreshToken"]):
        async with shop.http.post(shop.sdk("/sessions/refresh"), json={"refreshToken": wrong}) as resp:
            assert resp.status == 401, await resp.text()
    # A token whose exp is a string (signed with the right secret) is not a token.
    claims = msgspec.to_builtins(SessionClaims.from_token(SDK_TOKEN_SECRET, renewed["sessionToken"]))
    forged = sign_token(SDK_TOKEN_SECRET, {**claims, "exp": str(claims["exp"])})
    status, body = await shop.call("GET", path, forged)
    assert status == 401 and body["errors"][0]["code"] == "unauthorized"
    # A pending session refreshes too (it stays pending).
    _status, pending, _headers = await shop.new_session()
    async with shop.http.post(shop.sdk("/sessions/refresh"), json={"refreshToken": pending["refreshToken"]}) as resp:
        assert resp.status == 200
        assert "conversationId" not in await resp.json()


async def test_sessions_end_at_the_configured_absolute_age(system: System, tmp_path: Path,
                                                           http: aiohttp.ClientSession) -> None:
    shop = await open_shop(system, tmp_path, http, {"THREADLINE_SDK_SESSION_MAX_AGE_SECONDS": str(40 * 86400)})
    session = await start_sdk_session(http, shop.base, shop.app_id, shop.integrations["web"])
    claims = SessionClaims.from_token(SDK_TOKEN_SECRET, session["sessionToken"])
    assert claims is not None
    aged = msgspec.structs.replace(claims, sst=int(time.time()) - 41 * 86400)
    settings = SdkSettings(token_secret=SDK_TOKEN_SECRET, ping_interval=20, socket_queue_size=256,
                           request_timeout=5, session_max_age=40 * 86400)
    async with http.post(shop.sdk("/sessions/refresh"), json={"refreshToken": session["refreshToken"]}) as resp:
        assert resp.status == 200  # a young session renews
    tokens = issue_tokens(settings, aged, time.time() - 5)
    async with http.post(shop.sdk("/sessions/refresh"), json={"refreshToken": tokens.refresh_token}) as resp:
        assert resp.status == 401
        assert (await resp.json())["errors"][0]["code"] == "session_expired"


# --- JWTs: strict claim types, bounded lifetime ----------------------------------------------

async def test_business_and_login_jwts_need_numeric_time_claims_and_a_bounded_lifetime(shop: Shop) -> None:
    now = int(time.time())
    app_jwt = {"scope": "app"}
    refused = [{**app_jwt, "exp": "1"}, {**app_jwt, "exp": str(now + 600)}, {**app_jwt, "exp": True},
               {**app_jwt, "iat": "now"}, {**app_jwt, "nbf": [now]}, {**app_jwt, "exp": now + 25 * 3600},
               {**app_jwt, "iat": now - 3600, "exp": now + 24 * 3600}, {**app_jwt, "nbf": now + 3600},
               {**app_jwt, "iat": now + 3600}, {**app_jwt, "exp": now - 3600}]
    for payload in refused:
        token = jwt_encode(payload, shop.key_secret, shop.key_id)
        async with shop.http.get(f"{shop.base}/v2/apps/{shop.app_id}/integrations",
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 401, payload
    for payload in (app_jwt, {**app_jwt, "exp": now + 3600}, {**app_jwt, "iat": now, "exp": now + 24 * 3600}):
        token = jwt_encode(payload, shop.key_secret, shop.key_id)
        async with shop.http.get(f"{shop.base}/v2/apps/{shop.app_id}/integrations",
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, payload
    # The SDK login JWT: the same rules, answered `invalid_auth`.
    session = await start_sdk_session(shop.http, shop.base, shop.app_id, shop.integrations["web"])
    user = {"scope": "user", "external_id": "alice"}
    for payload in ({**user, "exp": "1"}, {**user, "exp": now + 30 * 86400}, {**user, "iat": str(now)}):
        status, body = await shop.call("POST", "/sessions/login", session["sessionToken"], {
            "externalId": "alice", "jwt": jwt_encode(payload, shop.key_secret, shop.key_id)})
        assert status == 401 and body["errors"][0]["code"] == "invalid_auth", (payload, body)
    status, body = await shop.call("POST", "/sessions/login", session["sessionToken"], {
        "externalId": "alice", "jwt": jwt_encode({**user, "exp": now + 600}, shop.key_secret, shop.key_id)})
    assert status == 200 and body["outcome"] == "identified", body
    assert {"sessionToken", "refreshToken", "expiresAt"} <= set(body)


async def test_jwts_without_exp_are_refused_when_configured(system: System, tmp_path: Path,
                                                            http: aiohttp.ClientSession) -> None:
    shop = await open_shop(system, tmp_path, http, {"THREADLINE_JWT_REQUIRE_EXP": "true",
                                                    "THREADLINE_JWT_MAX_LIFETIME_SECONDS": "600"})
    now = int(time.time())
    for payload, expected in (({"scope": "app"}, 401), ({"scope": "app", "exp": now + 900}, 401),
                              ({"scope": "app", "exp": now + 300}, 200)):
        token = jwt_encode(payload, shop.key_secret, shop.key_id)
        async with http.get(f"{shop.base}/v2/apps/{shop.app_id}/integrations",
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == expected, payload


def test_new_session_claims_are_pending() -> None:
    claims = new_session_claims("a", "i", "c", 1_800_000_000)
    assert claims.pending and claims.sst == 1_800_000_000
