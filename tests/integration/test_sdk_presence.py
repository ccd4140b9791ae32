"""Socket presence: an open SDK socket has one entry in SDK_PRESENCE_BUCKET; closing it removes it;
the replica's heartbeat keeps its sockets alive, and stopping withdraws both."""

from __future__ import annotations

from typing import Any

import aiohttp
import nats.js.errors
import pytest

from shared import subjects
from shared.bus import Bus
from shared.messages import sdk_presence
from tests.integration.test_web_conversation import (
    create_app_with_web,
    create_session,
    eventually,
    frames_until_ready,
)


@pytest.fixture
async def stack(system: Any) -> Any:
    await system.start("identity", "conversations", "web")
    return system


async def presence_entries(bus: Bus) -> dict[str, sdk_presence.SocketPresence]:
    """Every socket entry of the presence bucket (key → decoded value)."""
    return {key: entry for key, entry in (await bucket_entries(bus)).items()
            if isinstance(entry, sdk_presence.SocketPresence)}


async def bucket_entries(bus: Bus) -> dict[str, sdk_presence.PresenceEntry]:
    """Every entry of the presence bucket, heartbeats included."""
    kv = await bus.key_value(subjects.SDK_PRESENCE_BUCKET)
    found: dict[str, sdk_presence.PresenceEntry] = {}
    try:
        keys = await kv.keys()
    except Exception as exc:  # nats-py raises NoKeysError on an empty bucket
        if type(exc).__name__ == "NoKeysError":
            return found
        raise
    for key in keys:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # deleted since `keys()` listed it (a socket closed)
            continue
        if entry.value:
            found[key] = sdk_presence.DECODER.decode(entry.value)
    return found


async def test_open_socket_is_present_until_closed(stack: Any, bus: Bus) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, stack.base_url)
        session = await create_session(http, stack.base_url, app_id, integration_id)
        url = (f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{session['conversationId']}/socket"
               f"?token={session['sessionToken']}").replace("http://", "ws://")
        ws = await http.ws_connect(url)
        await frames_until_ready(ws)
        entries = await eventually(lambda: presence_entries(bus))
        assert len(entries) == 1
        (presence,) = entries.values()
        assert presence.app_id == app_id
        assert presence.user_id == session["appUserId"]
        assert presence.client_id == session["clientId"]
        assert presence.conversation_id == session["conversationId"]
        assert presence.integration_id == integration_id
        assert presence.channel == "web"
        # Held by a replica whose heartbeat is in the bucket, under the socket's key.
        heartbeats = [e for e in (await bucket_entries(bus)).values() if isinstance(e, sdk_presence.ReplicaAlive)]
        assert [h.replica_id for h in heartbeats] == [presence.replica_id]
        (key,) = entries
        assert key.startswith(f"socket.{presence.replica_id}.")

        # A second socket of the same session is a second entry.
        ws2 = await http.ws_connect(url)
        await frames_until_ready(ws2)
        assert len(await eventually(lambda: _at_least(bus, 2))) == 2

        await ws.close()
        await eventually(lambda: _exactly(bus, 1))
        await ws2.close()
        await eventually(lambda: _exactly(bus, 0))

    kv = await bus.key_value(subjects.SDK_PRESENCE_BUCKET)
    status = await kv.status()
    assert status.ttl == subjects.SDK_PRESENCE_TTL_SECONDS  # stale entries of a dead replica expire


async def test_stopping_the_service_withdraws_presence(stack: Any, bus: Bus) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, integration_id = await create_app_with_web(http, stack.base_url)
        session = await create_session(http, stack.base_url, app_id, integration_id)
        url = (f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{session['conversationId']}/socket"
               f"?token={session['sessionToken']}").replace("http://", "ws://")
        ws = await http.ws_connect(url)
        await frames_until_ready(ws)
        await eventually(lambda: _exactly(bus, 1))
        await stack.stop_service("web")
        assert await bucket_entries(bus) == {}
        await ws.close()


async def _at_least(bus: Bus, count: int) -> dict[str, sdk_presence.SocketPresence] | None:
    entries = await presence_entries(bus)
    return entries if len(entries) >= count else None


async def _exactly(bus: Bus, count: int) -> bool:
    return len(await presence_entries(bus)) == count
