"""The web SDK against identity + conversations: sessions, history, socket resume and live frames."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from shared.sdk import (
    ErrorFrame,
    FrameUnion,
    MessageFrame,
    PingFrame,
    ReadFrame,
    ReadyFrame,
    TypingFrame,
    decode_frame,
)
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, start_sdk_session

ACCOUNT = {"Authorization": "Basic " + base64.b64encode(f"{ACCOUNT_KEY_ID}:{ACCOUNT_KEY_SECRET}".encode()).decode()}


async def create_app_with_web(http: aiohttp.ClientSession, base_url: str,
                              **web_fields: Any) -> tuple[str, str]:
    """A new app and a web integration in it (through the business API); (appId, integrationId)."""
    async with http.post(f"{base_url}/v2/apps", json={"displayName": "Shop"}, headers=ACCOUNT) as resp:
        assert resp.status == 201, await resp.text()
        app_id = (await resp.json())["app"]["id"]
    async with http.post(f"{base_url}/v2/apps/{app_id}/integrations",
                         json={"type": "web", "displayName": "Shop web", **web_fields}, headers=ACCOUNT) as resp:
        assert resp.status == 201, await resp.text()
        integration_id = (await resp.json())["integration"]["id"]
    return app_id, integration_id


FIRST_MESSAGE = "hello, first message"


async def create_session(http: aiohttp.ClientSession, base_url: str, app_id: str,
                         integration_id: str) -> dict[str, Any]:
    """A visitor whose first message (which created their user and conversation) is stored."""
    session = await start_sdk_session(http, base_url, app_id, integration_id, FIRST_MESSAGE)

    async def stored() -> bool:
        async with http.get(f"{base_url}/sdk/v1/apps/{app_id}/conversations/{session['conversationId']}/messages",
                            headers={"Authorization": f"Bearer {session['sessionToken']}"}) as resp:
            return bool((await resp.json())["messages"])

    await eventually(stored)
    return session


async def business_message(http: aiohttp.ClientSession, base_url: str, app_id: str, conversation_id: str,
                           text: str) -> dict[str, Any]:
    async with http.post(f"{base_url}/v2/apps/{app_id}/conversations/{conversation_id}/messages", headers=ACCOUNT,
                         json={"author": {"type": "business"}, "content": {"type": "text", "text": text}}) as resp:
        assert resp.status == 201, await resp.text()
        message: dict[str, Any] = (await resp.json())["messages"][0]
    return message


async def business_activity(http: aiohttp.ClientSession, base_url: str, app_id: str, conversation_id: str,
                            kind: str) -> None:
    async with http.post(f"{base_url}/v2/apps/{app_id}/conversations/{conversation_id}/activity", headers=ACCOUNT,
                         json={"author": {"type": "business"}, "type": kind}) as resp:
        assert resp.status == 200, await resp.text()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 8.0) -> Any:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def frames_until_ready(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[MessageFrame], ReadyFrame]:
    messages: list[MessageFrame] = []
    while True:
        frame = await next_frame(ws)
        if isinstance(frame, ReadyFrame):
            return messages, frame
        assert isinstance(frame, MessageFrame), frame
        messages.append(frame)


async def next_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float = 8.0) -> FrameUnion:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return decode_frame(msg.data)


@pytest.fixture
async def stack(system: Any) -> Any:
    await system.start("identity", "conversations", "web")
    return system


async def test_session_post_and_history(stack: Any) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, stack.base_url)
        session = await create_session(http, stack.base_url, app_id, integration_id)
        assert set(session) == {"appUserId", "clientId", "conversationId", "sessionToken", "refreshToken",
                                "expiresAt", "clientMessageId"}
        sdk = f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{session['conversationId']}"
        auth = {"Authorization": f"Bearer {session['sessionToken']}"}
        client_message_id = str(uuid.uuid4())
        for _ in range(2):  # a retry is the same message
            async with http.post(f"{sdk}/messages", headers=auth,
                                 json={"clientMessageId": client_message_id, "text": "hello"}) as resp:
                assert resp.status == 202

        async def history() -> list[dict[str, Any]] | None:
            async with http.get(f"{sdk}/messages", headers=auth) as resp:
                assert resp.status == 200
                page = await resp.json()
            return page["messages"] if len(page["messages"]) > 1 else None

        entries = await eventually(history)
        assert len(entries) == 2
        assert entries[0]["message"]["content"] == {"type": "text", "text": FIRST_MESSAGE}
        entries = entries[1:]
        message = entries[0]["message"]
        assert message["author"]["type"] == "user" and message["author"]["userId"] == session["appUserId"]
        assert message["content"] == {"type": "text", "text": "hello"}
        assert message["source"]["originalMessageId"] == client_message_id
        reply = await business_message(http, stack.base_url, app_id, session["conversationId"], "hi there")
        async with http.get(f"{sdk}/messages?after={entries[0]['cursor']}", headers=auth) as resp:
            page = await resp.json()
        assert [e["message"]["id"] for e in page["messages"]] == [reply["id"]]
        assert page["hasMore"] is False
        # The business sees the same conversation with the sdk client.
        async with http.get(f"{stack.base_url}/v2/apps/{app_id}/users/{session['appUserId']}/clients",
                            headers=ACCOUNT) as resp:
            clients = (await resp.json())["clients"]
        assert [(c["id"], c["type"]) for c in clients] == [(session["clientId"], "sdk")]


async def test_foreign_conversation_is_404(stack: Any) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, stack.base_url)
        alice = await create_session(http, stack.base_url, app_id, integration_id)
        bob = await create_session(http, stack.base_url, app_id, integration_id)
        assert alice["conversationId"] != bob["conversationId"]
        sdk = f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{alice['conversationId']}"
        bob_auth = {"Authorization": f"Bearer {bob['sessionToken']}"}
        async with http.get(f"{sdk}/messages", headers=bob_auth) as resp:
            assert resp.status == 404
        async with http.post(f"{sdk}/messages", headers=bob_auth,
                             json={"clientMessageId": str(uuid.uuid4()), "text": "intrusion"}) as resp:
            assert resp.status == 404
        async with http.post(f"{sdk}/activity", headers=bob_auth, json={"type": "typing:start"}) as resp:
            assert resp.status == 404
        async with http.ws_connect(f"{sdk}/socket?token={bob['sessionToken']}") as ws:
            frame = await next_frame(ws)
            assert isinstance(frame, ErrorFrame) and frame.status == 404


async def test_socket_resumes_from_cursor_with_exactly_the_missed_messages(stack: Any) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, stack.base_url)
        session = await create_session(http, stack.base_url, app_id, integration_id)
        conversation_id = session["conversationId"]
        socket_url = (f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{conversation_id}/socket"
                      f"?token={session['sessionToken']}")
        first = await business_message(http, stack.base_url, app_id, conversation_id, "one")
        async with http.ws_connect(socket_url) as ws:
            history, ready = await frames_until_ready(ws)
            assert [f.message.content.text for f in history[:1]] == [FIRST_MESSAGE]  # type: ignore[union-attr]
            assert [f.message.id for f in history[1:]] == [first["id"]]
            assert ready.cursor == history[-1].cursor
            # Live: a message, the business typing and reading.
            second = await business_message(http, stack.base_url, app_id, conversation_id, "two")
            live = await next_frame(ws)
            assert isinstance(live, MessageFrame) and live.message.id == second["id"]
            assert live.cursor > ready.cursor
            await business_activity(http, stack.base_url, app_id, conversation_id, "typing:start")
            typing = await next_frame(ws)
            assert isinstance(typing, TypingFrame) and typing.active
            await business_activity(http, stack.base_url, app_id, conversation_id, "conversation:read")
            read = await next_frame(ws)
            assert isinstance(read, ReadFrame)
            cursor = live.cursor
        # While the socket is closed, the business posts three more.
        missed = [await business_message(http, stack.base_url, app_id, conversation_id, f"missed {i}")
                  for i in range(3)]
        async with http.ws_connect(f"{socket_url}&after={cursor}") as ws:
            replayed, ready = await frames_until_ready(ws)
            assert [f.message.id for f in replayed] == [m["id"] for m in missed]
            assert ready.cursor == replayed[-1].cursor
            assert ready.business_last_read is not None
            after_resume = await business_message(http, stack.base_url, app_id, conversation_id, "live again")
            frame = await next_frame(ws)
            assert isinstance(frame, MessageFrame) and frame.message.id == after_resume["id"]


async def test_events_published_during_history_replay_are_not_lost_or_doubled(stack: Any) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, stack.base_url)
        session = await create_session(http, stack.base_url, app_id, integration_id)
        conversation_id = session["conversationId"]
        socket_url = (f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{conversation_id}/socket"
                      f"?token={session['sessionToken']}&after=0")
        # Business messages race with the socket's subscribe + history replay.
        posting = asyncio.gather(*(business_message(http, stack.base_url, app_id, conversation_id, f"m{i}")
                                   for i in range(10)))
        async with http.ws_connect(socket_url) as ws:
            sent = await posting
            seen: list[MessageFrame] = []
            while len(seen) < len(sent):
                frame = await next_frame(ws)
                if isinstance(frame, MessageFrame) and frame.message.author.type == "business":
                    seen.append(frame)
            assert sorted(f.message.id for f in seen) == sorted(m["id"] for m in sent)
            cursors = [f.cursor for f in seen]
            assert cursors == sorted(set(cursors))
            # Nothing else is pending: the next message frame is a new one.
            extra = await business_message(http, stack.base_url, app_id, conversation_id, "extra")
            while True:
                frame = await next_frame(ws)
                if isinstance(frame, MessageFrame):
                    assert frame.message.id == extra["id"]
                    break


async def test_idle_socket_gets_heartbeat_pings(system: Any) -> None:
    await system.start("identity", "conversations", "web", env={"THREADLINE_WEB_PING_INTERVAL": "0.2"})
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, system.base_url)
        session = await create_session(http, system.base_url, app_id, integration_id)
        async with http.ws_connect(f"{system.base_url}/sdk/v1/apps/{app_id}/conversations/"
                                   f"{session['conversationId']}/socket?token={session['sessionToken']}") as ws:
            history, ready = await frames_until_ready(ws)
            assert len(history) == 1 and ready.cursor == history[0].cursor and ready.ping_interval == 0.2
            pings = [await next_frame(ws) for _ in range(2)]
            assert all(isinstance(p, PingFrame) for p in pings)


async def test_socket_pings_its_client_and_drops_one_that_stops_answering(system: Any) -> None:
    # Ping interval 0.2 s: a client silent for a second gets a WebSocket ping, and is dropped when
    # it has not answered half a second later.
    await system.start("identity", "conversations", "web", env={"THREADLINE_WEB_PING_INTERVAL": "0.2"})
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, system.base_url)
        session = await create_session(http, system.base_url, app_id, integration_id)
        url = (f"{system.base_url}/sdk/v1/apps/{app_id}/conversations/{session['conversationId']}/socket"
               f"?token={session['sessionToken']}")
        async with http.ws_connect(url) as ws:  # answers pings (aiohttp's autoping)
            await frames_until_ready(ws)
            loop = asyncio.get_running_loop()
            until = loop.time() + 2.5
            while loop.time() < until:
                assert isinstance(await next_frame(ws), PingFrame)
            assert not ws.closed
        async with http.ws_connect(url, autoping=False) as ws:
            await frames_until_ready(ws)
            await ws.ping(b"are you there")  # the server answers the client's pings
            kinds = []
            while True:
                msg = await ws.receive(timeout=5)
                kinds.append(msg.type)
                if msg.type == aiohttp.WSMsgType.PONG:
                    assert msg.data == b"are you there"
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
            assert aiohttp.WSMsgType.PONG in kinds and aiohttp.WSMsgType.PING in kinds
            assert ws.closed
