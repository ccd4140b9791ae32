"""The desk service against the real system: NATS, its database (SQLite, then PostgreSQL), HTTP
through the front door, the WhatsApp sandbox fake.

A bot is the switchboard's default; the desk its next member. A WhatsApp customer writes, the bot
passes control, and the desk routes the conversation to an online agent; agents sign in with
passwords (session cookie, CSRF token), go offline and come back, transfer, reply, note, resolve.
The business drives the same desk through `/v2/apps/{appId}/desk/…` with its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import nats.js.errors
import pytest
from aiohttp import web

from services.desk.app import DeskService
from shared import subjects
from shared.bus import Bus
from shared.http import basic_auth_header
from shared.messages import notification
from tests.fakes.oidc import oidc_provider
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "webhooks", "whatsapp", "sandbox", "desk")
PASSWORD = "correct horse battery staple 42"
SQLITE_ONLY = pytest.mark.parametrize("engine_env", ["sqlite"], indirect=True)


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """The services' state on SQLite, then on PostgreSQL (but for tests marked `SQLITE_ONLY`)."""
    return system_on_each_engine


@dataclass
class AgentSession:
    """A browser-like client signed in as one agent: its cookie jar and CSRF token."""

    http: aiohttp.ClientSession
    base: str
    agent: dict[str, Any]
    csrf: str

    @property
    def id(self) -> str:
        return str(self.agent["id"])

    def headers(self) -> dict[str, str]:
        return {"Origin": self.base, "X-CSRF-Token": self.csrf}

    async def call(self, method: str, path: str, body: Any = None, status: int | None = 200) -> Any:
        async with self.http.request(method, f"{self.base}/desk/api/v1{path}", json=body,
                                     headers=self.headers()) as resp:
            data = await resp.json()
            if status is not None:
                assert resp.status == status, (resp.status, data)
            return data


@dataclass
class Desk:
    http: aiohttp.ClientSession
    system: System
    info: dict[str, Any]
    auth: dict[str, str]
    events: list[dict[str, Any]]
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    bot_id: str = ""

    @property
    def base(self) -> str:
        return self.system.base_url

    @property
    def app_id(self) -> str:
        return str(self.info["appId"])

    @property
    def whatsapp(self) -> str:
        return str(self.info["integrations"]["whatsapp"]["id"])

    async def rest(self, method: str, path: str, body: Any = None, status: int | None = 200,
                   app_id: str | None = None) -> Any:
        """The business's REST API (its app key)."""
        async with self.http.request(method, f"{self.base}/v2/apps/{app_id or self.app_id}{path}", json=body,
                                     headers=self.auth) as resp:
            data = await resp.json()
            if status is not None:
                assert resp.status == status, (resp.status, data)
            return data

    async def create_agent(self, email: str, name: str, role: str = "agent", capacity: int = 2,
                           **extra: Any) -> dict[str, Any]:
        created = await self.rest("POST", "/desk/agents", {"email": email, "displayName": name, "role": role,
                                                            "password": PASSWORD, "capacity": capacity, **extra},
                                  status=201)
        return dict(created["agent"])

    async def sign_in(self, email: str) -> AgentSession:
        return await self.sign_in_with(email, PASSWORD)

    async def sign_in_with(self, email: str, password: str) -> AgentSession:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sessions.append(http)
        async with http.post(f"{self.base}/desk/api/v1/session", headers={"Origin": self.base},
                             json={"appId": self.app_id, "email": email, "password": password}) as resp:
            data = await resp.json()
            assert resp.status == 200, data
        return AgentSession(http=http, base=self.base, agent=data["agent"], csrf=data["csrfToken"])

    async def customer_writes(self, sender: str, text: str) -> None:
        async def delivered() -> bool:
            async with self.http.post(f"{self.base}/sandbox/whatsapp/{self.whatsapp}/inbound",
                                      json={"from": sender, "text": text}) as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("webhookStatus", 200) == 200

        await eventually(delivered, timeout=20.0)

    async def outbox(self, to: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/sandbox/whatsapp/{self.whatsapp}/outbox", params={"to": to}) as resp:
            assert resp.status == 200, await resp.text()
            return list((await resp.json())["messages"])

    async def ticket(self, conversation_id: str) -> dict[str, Any] | None:
        async with self.http.get(f"{self.base}/v2/apps/{self.app_id}/desk/conversations/{conversation_id}",
                                 headers=self.auth) as resp:
            if resp.status == 404:
                return None
            assert resp.status == 200, await resp.text()
            return dict((await resp.json())["conversation"])

    async def assigned_to(self, conversation_id: str, agent_id: str | None, timeout: float = 15.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            ticket = await self.ticket(conversation_id)
            return ticket if ticket is not None and ticket["agentId"] == agent_id else None

        return dict(await eventually(check, timeout=timeout))

    @property
    def service(self) -> DeskService:
        service = self.system.service("desk")
        assert isinstance(service, DeskService)
        return service


@asynccontextmanager
async def desk_scene(system: System, tmp_path: Path, *, switchboard: bool = True) -> AsyncIterator[Desk]:
    """Services up, a sandbox app with WhatsApp, a bot, and (unless not asked) a switchboard: the
    bot (default) then the desk."""
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        await system.start(*SERVICES)
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("whatsapp",))
        desk = Desk(http=http, system=system, info=info, events=events,
                    auth=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]))
        try:
            bot = await desk.rest("POST", "/integrations", {
                "type": "custom", "displayName": "bot",
                "webhooks": [{"target": hook_url, "triggers": ["conversation:message"]}]}, status=201)
            desk.bot_id = bot["integration"]["id"]
            if switchboard:
                await bot_then_desk(desk)
            yield desk
        finally:
            for session in desk.sessions:
                await session.close()


async def bot_then_desk(desk: Desk) -> None:
    """The app's switchboard: the bot (default), then the desk."""
    switchboard = (await desk.rest("POST", "/switchboards", status=201))["switchboard"]
    members = f"/switchboards/{switchboard['id']}/switchboardIntegrations"
    desk_member = (await desk.rest("POST", members, {"name": "desk", "integrationType": "desk"},
                                   status=201))["switchboardIntegration"]
    bot_member = (await desk.rest("POST", members, {
        "name": "bot", "integrationId": desk.bot_id,
        "nextSwitchboardIntegrationId": desk_member["id"]}, status=201))["switchboardIntegration"]
    await desk.rest("PATCH", f"/switchboards/{switchboard['id']}", {
        "enabled": True, "defaultSwitchboardIntegrationId": bot_member["id"]})


async def customer_conversation(desk: Desk, sender: str, text: str) -> str:
    """A WhatsApp customer writes; the conversation's id, from the bot's webhook."""
    await desk.customer_writes(sender, text)

    async def found() -> str | None:
        return next((e["payload"]["conversation"]["id"] for e in desk.events
                     if e["type"] == "conversation:message"
                     and e["payload"]["message"]["content"].get("text") == text), None)

    return str(await eventually(found, timeout=20.0))


async def pass_to_desk(desk: Desk, conversation_id: str, metadata: dict[str, Any] | None = None) -> None:
    await desk.rest("POST", f"/conversations/{conversation_id}/passControl",
                    {"switchboardIntegration": "next", "metadata": metadata or {}})


async def test_a_conversation_passed_to_the_desk_reaches_an_online_agent_and_moves_when_they_leave(
        system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        ada = await desk.create_agent("ada@example.com", "Ada", role="admin")
        bob = await desk.create_agent("Bob@Example.com", "Bob")
        assert bob["email"] == "bob@example.com" and "passwordHash" not in bob and "password" not in bob
        a = await desk.sign_in("ada@example.com")
        await a.call("PUT", f"/agents/{ada['id']}/presence", {"presence": "online"})

        conversation_id = await customer_conversation(desk, "+15550001", "where is my order?")
        # The bot holds it: not the desk's yet.
        assert await desk.ticket(conversation_id) is None
        await pass_to_desk(desk, conversation_id)
        ticket = await desk.assigned_to(conversation_id, ada["id"])
        assert ticket["channel"] == "whatsapp" and ticket["status"] == "open" and not ticket["queued"]
        assert ticket["lastMessageText"] == "where is my order?"
        async with desk.http.get(f"{desk.system.service_url('desk')}/metrics") as resp:
            exposition = await resp.text()
        assert 'threadline_desk_assignments_total{reason="least_busy"}' in exposition
        assert "threadline_desk_wait_seconds_bucket" in exposition
        mine = await a.call("GET", "/conversations?view=mine")
        assert [t["conversationId"] for t in mine["conversations"]] == [conversation_id]

        # Ada goes offline: the conversation waits (nobody else online), then Bob comes and gets it.
        await a.call("PUT", f"/agents/{ada['id']}/presence", {"presence": "offline"})
        waiting = await desk.assigned_to(conversation_id, None)
        assert waiting["queued"] and waiting["lastAgentId"] == ada["id"]
        b = await desk.sign_in("bob@example.com")
        await b.call("PUT", f"/agents/{bob['id']}/presence", {"presence": "online"})
        await desk.assigned_to(conversation_id, bob["id"])

        # Bob answers from the desk: it goes out on WhatsApp as the business, named after him.
        sent = await b.call("POST", f"/conversations/{conversation_id}/messages", {"text": "On its way!"}, 201)
        assert sent["message"]["author"]["displayName"] == "Bob"
        assert sent["message"]["metadata"] == {"desk:agentId": bob["id"]}

        async def delivered() -> bool:
            return any("On its way!" in str(m) for m in await desk.outbox("+15550001"))

        await eventually(delivered, timeout=20.0)

        # A private note and labels stay in the desk.
        await b.call("POST", f"/conversations/{conversation_id}/notes", {"text": "VIP, ordered twice"}, 201)
        await b.call("PUT", f"/conversations/{conversation_id}/labels", {"labels": ["delivery", "vip"]})
        detail = await a.call("GET", f"/conversations/{conversation_id}")
        assert [n["text"] for n in detail["notes"]] == ["VIP, ordered twice"]
        assert detail["conversation"]["labels"] == ["delivery", "vip"]
        assert not any("VIP" in str(m) for m in await desk.outbox("+15550001"))

        # Resolved: the slot is free and the switchboard gets control back (the bot is the default).
        await b.call("PUT", f"/conversations/{conversation_id}/status", {"status": "resolved"})

        async def released() -> bool:
            conversation = (await desk.rest("GET", f"/conversations/{conversation_id}"))["conversation"]
            return conversation.get("activeSwitchboardIntegration") is None or \
                conversation["activeSwitchboardIntegration"]["name"] != "desk"

        await eventually(released, timeout=10.0)


async def stored_events(bus: Bus, prefix: str) -> list[bytes]:
    """The events stream's messages whose subjects start with `prefix`, oldest first."""
    info = await bus.js.stream_info(subjects.EVENTS.name)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            msg = await bus.js.get_msg(subjects.EVENTS.name, seq)
            if (msg.subject or "").startswith(prefix):
                found.append(msg.data or b"")
    return found


async def desk_deliveries(bus: Bus) -> int:
    """How many messages the desk's durables have handed out, over every partition."""
    total = 0
    for partition in range(subjects.PARTITIONS):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await bus.js.consumer_info(subjects.EVENTS.name, subjects.DESK_EVENTS.durable(partition))
            total += info.delivered.consumer_seq if info.delivered and info.delivered.consumer_seq else 0
    return total


@SQLITE_ONLY
async def test_the_desk_reads_the_events_of_apps_with_a_desk_only_and_erasures_purge_its_copies(
        system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path, switchboard=False) as desk:
        bus = await Bus.connect(system.nats_url, "test-desk-copies")
        try:
            app_events, copies = f"events.{desk.app_id}.", f"{subjects.DESK_COPY_PREFIX}.{desk.app_id}."
            # No desk in the app's switchboard (it has none): its events reach the business, and
            # the desk is handed none of them.
            await customer_conversation(desk, "+15550071", "is anyone there?")
            assert any(b"is anyone there?" in data for data in await stored_events(bus, app_events))
            assert await stored_events(bus, copies) == []
            assert await desk_deliveries(bus) == 0

            # The desk joins the switchboard: the desk gets copies of what concerns it.
            await bot_then_desk(desk)
            ada = await desk.create_agent("ada@example.com", "Ada", role="admin")
            a = await desk.sign_in("ada@example.com")
            await a.call("PUT", f"/agents/{ada['id']}/presence", {"presence": "online"})
            conversation_id = await customer_conversation(desk, "+15550072", "my parcel is late")
            await pass_to_desk(desk, conversation_id)
            ticket = await desk.assigned_to(conversation_id, ada["id"])
            assert ticket["lastMessageText"] == "my parcel is late"
            assert any(b"my parcel is late" in data for data in await stored_events(bus, copies))
            assert not any(b"is anyone there?" in data for data in await stored_events(bus, copies))
            assert await desk_deliveries(bus) > 0

            # The customer is deleted: the copy of user:remove reaches the desk (the ticket goes),
            # and the copies of her messages are purged with the originals.
            user_id = next(e["payload"]["message"]["author"]["userId"] for e in desk.events
                           if e["type"] == "conversation:message"
                           and e["payload"]["message"]["content"].get("text") == "my parcel is late")
            await desk.rest("DELETE", f"/users/{user_id}")

            async def ticket_gone() -> bool:
                return await desk.ticket(conversation_id) is None

            await eventually(ticket_gone, timeout=10.0)
            left = await stored_events(bus, copies)
            assert any(b"conversation.user.removed" in data for data in left)
            assert not any(b"my parcel is late" in data for data in left + await stored_events(bus, app_events))
        finally:
            await bus.close()


@SQLITE_ONLY
async def test_two_agents_accepting_one_conversation_at_once_get_one_assignment(
        system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        agents = [await desk.create_agent(f"agent{i}@example.com", f"Agent {i}") for i in range(2)]
        sessions = [await desk.sign_in(agent["email"]) for agent in agents]
        for session in sessions:
            await session.call("PUT", f"/agents/{session.id}/presence", {"presence": "online"})
        # Nobody has the skill the bot asks for: it waits in the queue, for someone to take it by hand.
        conversation_id = await customer_conversation(desk, "+15550002", "hallo")
        await pass_to_desk(desk, conversation_id, {"desk:skills": "German"})
        waiting = await eventually(lambda: desk.ticket(conversation_id), timeout=15.0)
        assert waiting["queued"] and waiting["agentId"] is None and waiting["requiredSkills"] == ["german"]

        responses = await asyncio.gather(*(session.http.post(
            f"{desk.base}/desk/api/v1/conversations/{conversation_id}/assign", json={}, headers=session.headers())
            for session in sessions))
        outcomes = {session.id: response.status for session, response in zip(sessions, responses, strict=True)}
        for response in responses:
            response.release()
        assert sorted(outcomes.values()) == [200, 409]
        winner = next(agent_id for agent_id, status in outcomes.items() if status == 200)
        assert (await desk.ticket(conversation_id))["agentId"] == winner

        # An agent who is away cannot take one either.
        other = await customer_conversation(desk, "+15550003", "guten Tag")
        await pass_to_desk(desk, other, {"desk:skills": "german, french"})
        await eventually(lambda: desk.ticket(other), timeout=15.0)
        loser = next(session for session in sessions if session.id != winner)
        await loser.call("PUT", f"/agents/{loser.id}/presence", {"presence": "away"})
        refused = await loser.call("POST", f"/conversations/{other}/assign", {}, status=409)
        assert refused["errors"][0]["title"] == "The agent is not online"


@SQLITE_ONLY
async def test_roles_apps_and_hostile_input(system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        await desk.create_agent("admin@example.com", "Admin", role="admin")
        await desk.create_agent("agent@example.com", "Agent")
        agent = await desk.sign_in("agent@example.com")
        refused = await agent.call("POST", "/agents", {"email": "x@example.com", "displayName": "X",
                                                       "password": PASSWORD}, status=403)
        assert refused["errors"][0]["title"] == "This action needs the admin role"
        # No CSRF token, or a cross-site origin: refused before anything happens.
        async with agent.http.put(f"{desk.base}/desk/api/v1/agents/{agent.id}/presence",
                                  json={"presence": "online"}, headers={"Origin": desk.base}) as resp:
            assert resp.status == 403
        async with agent.http.put(f"{desk.base}/desk/api/v1/agents/{agent.id}/presence", json={"presence": "online"},
                                  headers={**agent.headers(), "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        # Wrong passwords: 401, never which part was wrong; an unknown app the same.
        async with aiohttp.ClientSession() as anon:
            for app_id, email, password in ((desk.app_id, "agent@example.com", "wrong password 123"),
                                            (desk.app_id, "nobody@example.com", PASSWORD),
                                            ("0" * 24, "agent@example.com", PASSWORD)):
                async with anon.post(f"{desk.base}/desk/api/v1/session", headers={"Origin": desk.base},
                                     json={"appId": app_id, "email": email, "password": password}) as resp:
                    assert resp.status == 401, await resp.text()
            async with anon.get(f"{desk.base}/desk/api/v1/conversations") as resp:
                assert resp.status == 401
        # Hostile bodies: 400 with SunCo's error body, never a 500.
        for body in ('{"email": "\udc80"}', "[" * 5000 + "]" * 5000, '{"email": 1}', "not json"):
            async with desk.http.post(f"{desk.base}/v2/apps/{desk.app_id}/desk/agents", data=body.encode(
                    "utf-8", "surrogatepass"), headers={**desk.auth, "Content-Type": "application/json"}) as resp:
                assert resp.status == 400, (body[:20], await resp.text())
                assert (await resp.json())["errors"][0]["code"] == "bad_request"
        # Another app's ids look like ids that do not exist; its key cannot reach this desk.
        other = await bootstrap_sandbox(desk.base, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                        str(tmp_path / "other"), ("whatsapp",))
        other_auth = basic_auth_header(other["apiKey"]["id"], other["apiKey"]["secret"])
        async with desk.http.get(f"{desk.base}/v2/apps/{desk.app_id}/desk/agents", headers=other_auth) as resp:
            assert resp.status == 403
        async with desk.http.get(f"{desk.base}/v2/apps/{other['appId']}/desk/agents/{agent.id}",
                                 headers=other_auth) as resp:
            assert resp.status == 404
        await agent.call("GET", f"/agents/{agent.id}")
        async with desk.http.get(f"{desk.base}/v2/apps/{desk.app_id}/desk/nothing-here", headers=desk.auth) as resp:
            assert resp.status == 404


async def test_nul_characters_sessions_and_sockets(system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        admin = await desk.create_agent("admin@example.com", "Admin", role="admin")
        # NUL anywhere: 400, never a 500 (PostgreSQL's text cannot hold it).
        async with desk.http.post(f"{desk.base}/desk/api/v1/session", headers={"Origin": desk.base},
                                  json={"appId": desk.app_id, "email": "admin@example.com\u0000",
                                        "password": PASSWORD}) as resp:
            assert resp.status == 400
        await desk.rest("POST", "/desk/agents", {"email": "x\u0000@example.com", "displayName": "X",
                                                 "password": PASSWORD}, status=400)
        await desk.rest("GET", "/desk/conversations?channel=%00", status=400)
        await desk.rest("GET", "/desk/conversations?before=nan_abc", status=400)

        # One's own password: the current one is required, and the other sessions end with it.
        first = await desk.sign_in("admin@example.com")
        second = await desk.sign_in("admin@example.com")
        refused = await first.call("PATCH", f"/agents/{admin['id']}", {"password": "a brand new passphrase 7"},
                                   status=403)
        assert refused["errors"][0]["title"] == "currentPassword is wrong or missing"
        await first.call("PATCH", f"/agents/{admin['id']}", {"password": "a brand new passphrase 7",
                                                             "currentPassword": PASSWORD})
        await first.call("GET", "/me")
        await second.call("GET", "/me", status=401)

        # A live socket ends with its session, whatever its client sends (or does not).
        third = await desk.sign_in_with("admin@example.com", "a brand new passphrase 7")
        ws = await third.http.ws_connect(f"{desk.base}/desk/api/v1/socket", headers={"Origin": desk.base})
        await third.call("GET", "/me")
        async with third.http.delete(f"{desk.base}/desk/api/v1/session", headers=third.headers()) as resp:
            assert resp.status == 200
        await desk.service._check_sockets()
        closed = await ws.receive(timeout=5.0)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4401 or closed.data == 4401
        await ws.close()

        # The demo sign-in does not exist unless configured (it is, under `make up` only).
        async with desk.http.post(f"{desk.base}/desk/api/v1/session/demo", headers={"Origin": desk.base},
                                  json={"appId": desk.app_id}) as resp:
            assert resp.status == 404


@SQLITE_ONLY
async def test_channels_show_what_to_paste_to_admins_only(system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        channels = (await desk.rest("GET", "/desk/channels"))["channels"]
        [whatsapp] = [c for c in channels if c["type"] == "whatsapp"]
        assert whatsapp["webhookUrl"] == f"{desk.base}/webhooks/whatsapp/{desk.whatsapp}"
        assert whatsapp["verifyToken"] and whatsapp["lastWebhookAt"] is None
        # The platform's webhook comes in: its time is noted.
        await desk.customer_writes("+15550010", "hello")

        async def seen() -> bool:
            listed = (await desk.rest("GET", "/desk/channels"))["channels"]
            return any(c["id"] == desk.whatsapp and c["lastWebhookAt"] for c in listed)

        await eventually(seen, timeout=15.0)
        # An agent sees the channels (for "Continue on…"), not their secrets or setup.
        await desk.create_agent("agent@example.com", "Agent")
        agent = await desk.sign_in("agent@example.com")
        for channel in (await agent.call("GET", "/channels"))["channels"]:
            assert set(channel) == {"id", "type", "displayName", "status"}
        await agent.call("POST", "/channels", {"type": "telegram", "token": "123:abc"}, status=403)
        # Only channels: a custom integration (keys, webhooks) is the API's business.
        await desk.rest("POST", "/desk/channels", {"type": "custom", "webhooks": []}, status=400)


@SQLITE_ONLY
async def test_the_business_context_panel_is_called_signed_and_shown_as_cards(system: System, tmp_path: Path,
                                                                              bus: Bus) -> None:
    calls: list[dict[str, Any]] = []
    answer: dict[str, Any] = {"status": 200, "body": {"cards": [
        {"title": "Customer value", "url": "https://crm.example.com/c/1",
         "fields": [{"label": "Lifetime", "value": 1234.5}, {"label": "Tier", "value": "gold"}]},
        {"title": "Open case", "fields": [{"label": "Subject", "value": "x" * 500}], "url": "javascript:alert(1)"}]}}

    async def context(request: web.Request) -> web.Response:
        calls.append({"query": dict(request.query), "signature": request.headers.get("X-Threadline-Signature", "")})
        if answer["status"] != 200:
            return web.Response(status=answer["status"])
        return web.json_response(answer["body"])

    receiver = web.Application()
    receiver.router.add_get("/context", context)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with desk_scene(system, tmp_path) as desk:
            await desk.rest("PUT", "/desk/settings", {"contextUrl": "http://169.254.169.254/latest"}, status=400)
            settings = (await desk.rest("PUT", "/desk/settings", {"contextUrl": f"http://127.0.0.1:{port}/context"}))
            secret = settings["settings"]["contextSecret"]
            assert len(secret) >= 40
            agent = await desk.create_agent("agent@example.com", "Agent")
            session = await desk.sign_in("agent@example.com")
            await session.call("GET", "/settings", status=403)  # only admins see the secret
            await session.call("PUT", f"/agents/{agent['id']}/presence", {"presence": "online"})
            conversation_id = await customer_conversation(desk, "+15550020", "my order?")
            await pass_to_desk(desk, conversation_id)
            await desk.assigned_to(conversation_id, agent["id"])

            shown = await session.call("GET", f"/conversations/{conversation_id}/context")
            assert shown["contextError"] is None
            assert [card["title"] for card in shown["cards"]] == ["Customer value", "Open case"]
            assert shown["cards"][0]["fields"] == [{"label": "Lifetime", "value": "1234.5"},
                                                   {"label": "Tier", "value": "gold"}]
            assert shown["cards"][0]["url"] == "https://crm.example.com/c/1"
            assert shown["cards"][1]["url"] is None and len(shown["cards"][1]["fields"][0]["value"]) == 200
            [call] = calls
            user_id = call["query"]["userId"]
            assert call["query"]["appId"] == desk.app_id and call["query"]["conversationId"] == conversation_id
            at = call["signature"].split(",")[0].removeprefix("t=")
            expected = hmac.new(secret.encode(), f"{at}.{desk.app_id}.{user_id}".encode(), hashlib.sha256).hexdigest()
            assert call["signature"] == f"t={at},v1={expected}"

            # Another customer with the same e-mail address is suggested (merging stays theirs to confirm).
            assert shown["mergeSuggestions"] == []
            twin = (await desk.rest("POST", "/users", {"externalId": "kim-42", "profile": {"email": "kim@example.com"}},
                                    status=201))["user"]
            await desk.rest("PATCH", f"/users/{user_id}", {"profile": {"email": "Kim@example.com"}})
            shown = await session.call("GET", f"/conversations/{conversation_id}/context")
            assert shown["mergeSuggestions"] == [{"userId": twin["id"], "reason": "email", "channels": [],
                                                  "confirmOn": None}]

            # Where the customer asked to be notified when away shows too (the address masked).
            assert shown["optIns"] == []
            await system.start("notifications")
            async with desk.http.patch(f"{desk.base}/v2/apps/{desk.app_id}", json={"settings": {"notifications": {
                    "templates": {"whatsappOptIn": {"name": "optin_code", "language": "en_US"}}}}},
                    headers=basic_auth_header(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET)) as resp:
                assert resp.status == 200, await resp.text()

            async def opted_in() -> bool:
                started = await bus.request(subjects.NOTIFICATIONS_OPTIN_START, notification.ENCODER.encode(
                    notification.StartOptIn(app_id=desk.app_id, user_id=user_id, conversation_id=conversation_id,
                                            channel="whatsapp", address="+15550020")), timeout=10.0)
                return not isinstance(notification.decode(started), notification.NotificationError)

            await eventually(opted_in, timeout=15.0)
            shown = await session.call("GET", f"/conversations/{conversation_id}/context")
            [opt_in] = shown["optIns"]
            assert opt_in["channel"] == "whatsapp" and opt_in["status"] == "pending"
            assert "+15550020" not in opt_in["maskedAddress"] and opt_in["maskedAddress"].endswith("0020")

            # The business's server failing or answering nonsense never fails the desk.
            answer["status"] = 500
            shown = await session.call("GET", f"/conversations/{conversation_id}/context")
            assert shown["cards"] == [] and shown["contextError"] == "the context service answered 500"
            answer.update(status=200, body={"cards": "nope"})
            shown = await session.call("GET", f"/conversations/{conversation_id}/context")
            assert shown["contextError"] == "the context service's answer is not cards"
            assert shown["clients"] and shown["user"]["id"] == user_id
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("engine_env", ["postgres"], indirect=True)
async def test_two_desk_replicas_decide_each_conversation_once_and_share_live_updates(
        system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        second = await system.start_replica("desk")
        try:
            first = desk.service
            # Both replicas hold some of the desk's event partitions.
            async def split() -> bool:
                mine = {p for leases in first.bus._leases for p in leases.owned}
                theirs = {p for leases in second.bus._leases for p in leases.owned}  # type: ignore[attr-defined]
                return bool(mine) and bool(theirs)

            await eventually(split, timeout=20.0)
            agents = [await desk.create_agent(f"a{i}@example.com", f"A{i}", capacity=3) for i in range(3)]
            sessions = [await desk.sign_in(agent["email"]) for agent in agents]
            for session in sessions:
                await session.call("PUT", f"/agents/{session.id}/presence", {"presence": "online"})
            # A desk open on the second replica hears of what the first decides, and the other way.
            watcher = sessions[0]
            ws = await watcher.http.ws_connect(f"http://127.0.0.1:{second.port}/desk/api/v1/socket",
                                               headers={"Origin": desk.base})
            conversations = [await customer_conversation(desk, f"+1555003{i:04d}", f"hello {i}") for i in range(9)]
            await asyncio.gather(*(pass_to_desk(desk, c) for c in conversations))

            async def all_assigned() -> list[str] | None:
                tickets = [await desk.ticket(c) for c in conversations]
                holders = [t["agentId"] for t in tickets if t is not None and t["agentId"]]
                return holders if len(holders) == len(conversations) else None

            holders = await eventually(all_assigned, timeout=30.0)
            assert sorted(holders.count(agent["id"]) for agent in agents) == [3, 3, 3]
            seen: set[str] = set()
            while len(seen) < len(conversations):
                update = (await ws.receive(timeout=10.0)).json()
                if update["kind"] == "ticket" and update["data"]["agentId"]:
                    seen.add(update["conversationId"])
            assert seen == set(conversations)
            await ws.close()
        finally:
            await second.stop()


@SQLITE_ONLY
async def test_a_whatsapp_template_from_a_canned_reply_goes_out_as_a_template(system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        await desk.rest("POST", "/desk/canned-replies", {"shortcut": "follow up", "text": "Following up",
                                                         "whatsappTemplate": {"name": "x-bad!", "language": "en"}},
                        status=400)
        created = await desk.rest("POST", "/desk/canned-replies", {
            "shortcut": "follow up", "text": "Following up on your order",
            "whatsappTemplate": {"name": "order_follow_up", "language": "en_US"}}, status=201)
        assert created["cannedReply"]["whatsappTemplate"] == {"name": "order_follow_up", "language": "en_US"}
        agent = await desk.create_agent("agent@example.com", "Agent")
        session = await desk.sign_in("agent@example.com")
        await session.call("PUT", f"/agents/{agent['id']}/presence", {"presence": "online"})
        conversation_id = await customer_conversation(desk, "+15550040", "any news?")
        await pass_to_desk(desk, conversation_id)
        await desk.assigned_to(conversation_id, agent["id"])
        listed = (await session.call("GET", "/canned-replies"))["cannedReplies"]
        assert [r["whatsappTemplate"]["name"] for r in listed] == ["order_follow_up"]
        await session.call("POST", f"/conversations/{conversation_id}/messages", {"content": {
            "type": "template", "template": {"name": "order_follow_up", "language": {"code": "en_US"}}}}, status=201)

        async def sent() -> bool:
            return any("order_follow_up" in str(m) for m in await desk.outbox("+15550040"))

        await eventually(sent, timeout=20.0)


@pytest.mark.parametrize("engine_env", ["postgres"], indirect=True)
async def test_search_finds_messages_customers_and_labels(system: System, tmp_path: Path) -> None:
    async with desk_scene(system, tmp_path) as desk:
        first = await customer_conversation(desk, "+15550061", "Mein Paket ist beschädigt, Bestellung #A-1234")
        await desk.customer_writes("+15550061", "hello again")
        second = await customer_conversation(desk, "+15550062", "50% off? Is that_true")
        third = await customer_conversation(desk, "+15550063", "nothing special")
        for conversation in (first, second, third):
            await pass_to_desk(desk, conversation)
            await eventually(lambda c=conversation: desk.ticket(c), timeout=15.0)
        await desk.rest("PUT", f"/desk/conversations/{third}/labels", {"labels": ["Refund-VIP"]})

        async def found(q: str) -> list[str]:
            listed = await desk.rest("GET", f"/desk/conversations?q={quote(q)}&status=")
            return sorted(t["conversationId"] for t in listed["conversations"])

        assert await found("beschädigt") == [first]  # an earlier message, not the preview
        assert await found("MEIN PAKET") == [first]
        assert await found("#a-1234") == [first]
        assert await found("50%") == [second] and await found("that_t") == [second]
        assert await found("+1 555 0062") == [second]  # the customer's number, however written
        assert await found("refund-vip") == [third]
        assert await found("zz-nothing-zz") == []
        await desk.rest("GET", "/desk/conversations?q=x", status=400)


@SQLITE_ONLY
async def test_single_sign_on_with_openid_connect(system: System, tmp_path: Path) -> None:
    async with oidc_provider() as provider, desk_scene(system, tmp_path) as desk:
        ben = await desk.create_agent("ben@example.com", "Ben")
        settings = (await desk.rest("PUT", "/desk/settings", {"sso": {
            "issuer": provider.base, "clientId": provider.client_id, "clientSecret": provider.client_secret}}))
        assert settings["settings"]["sso"] == {"issuer": provider.base, "clientId": provider.client_id,
                                               "redirectUri": f"{desk.base}/desk/api/v1/sso/callback"}
        assert "clientSecret" not in str(settings)
        await desk.rest("PUT", "/desk/settings", {"sso": {"issuer": "http://169.254.169.254", "clientId": "x",
                                                          "clientSecret": "y"}}, status=400)

        async def sign_in(http: aiohttp.ClientSession) -> aiohttp.ClientResponse:
            """Start at the desk, follow the provider back to the callback (not past it)."""
            async with http.get(f"{desk.base}/desk/api/v1/sso/start", params={"app": desk.app_id},
                                allow_redirects=False) as start:
                assert start.status == 302, await start.text()
                authorize = start.headers["Location"]
            async with http.get(authorize, allow_redirects=False) as back:
                assert back.status == 302
                callback = back.headers["Location"]
            return await http.get(callback, allow_redirects=False)

        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            done = await sign_in(http)
            assert done.status == 303 and done.headers["Location"] == "/desk/"
            async with http.get(f"{desk.base}/desk/api/v1/session") as resp:
                assert resp.status == 200 and (await resp.json())["agent"]["id"] == ben["id"]
            # The same callback again (a replay): refused, its state was used.
            async with http.get(str(done.url), allow_redirects=False) as again:
                assert again.status in (400, 403)

        # A callback this browser did not start (login CSRF: someone else's code and state): refused.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as attacker:
            async with attacker.get(f"{desk.base}/desk/api/v1/sso/start", params={"app": desk.app_id},
                                    allow_redirects=False) as start:
                authorize = start.headers["Location"]
            async with attacker.get(authorize, allow_redirects=False) as back:
                planted = back.headers["Location"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as victim:
            async with victim.get(planted, allow_redirects=False) as resp:
                assert resp.status == 400 and "not started in this browser" in await resp.text()
            async with victim.get(f"{desk.base}/desk/api/v1/session") as resp:
                assert resp.status == 401

        # What the provider vouches for must hold: a verified e-mail of an agent, this client, this sign-in.
        for tamper, reason in (({"email_verified": False}, "email_verified"), ({"aud": "another-client"}, "not valid"),
                               ({"email": "stranger@example.com"}, "no agent"), ({"nonce": "x"}, "nonce")):
            provider.tamper = tamper
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                resp = await sign_in(http)
                assert resp.status == 403 and reason in await resp.text(), tamper
                async with http.get(f"{desk.base}/desk/api/v1/session") as session:
                    assert session.status == 401
        provider.tamper = {}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{desk.base}/desk/api/v1/sso/start", params={"app": "0" * 24},
                                allow_redirects=False) as resp:
                assert resp.status == 400 and "not set up" in await resp.text()
