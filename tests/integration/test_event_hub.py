"""The SDK services' event hub against a real nats-server: subscribed only while a socket listens."""

from __future__ import annotations

import asyncio

import nats

from shared import subjects
from shared.bus import Bus
from shared.sdk_service import EventHub, SocketListener
from tests.unit.test_web_hub import created
from threadline.natsserver import NatsServer


async def until(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_the_hub_follows_the_events_only_while_a_socket_listens(bus: Bus, nats_server: NatsServer) -> None:
    hub = EventHub(linger=0.1)
    await hub.start(bus.nc)
    publisher = await nats.connect(nats_server.url)  # another connection, as conversations is
    try:
        assert not hub.following  # no socket: this process is sent nothing

        # The first socket subscribes before it goes on: what is published next reaches it.
        listener = SocketListener(8)
        await hub.add("c1", listener)
        assert hub.following
        await publisher.publish(subjects.event_subject("app1", "c1"), created("c1", 1).data)
        await until(lambda: listener.pending is not None and len(listener.pending) == 1)

        # The last socket gone, the subscription lingers; a socket arriving meanwhile keeps it.
        hub.remove("c1", listener)
        assert hub.following
        again = SocketListener(8)
        await hub.add("c2", again)
        await asyncio.sleep(0.3)
        assert hub.following
        await publisher.publish(subjects.event_subject("app1", "c2"), created("c2", 2).data)
        await until(lambda: again.pending is not None and len(again.pending) == 1)

        # Past the linger with no socket: unsubscribed, and a new socket subscribes again.
        hub.remove("c2", again)
        await until(lambda: not hub.following)
        third = SocketListener(8)
        await hub.add("c3", third)
        assert hub.following
        await publisher.publish(subjects.event_subject("app1", "c3"), created("c3", 3).data)
        await until(lambda: third.pending is not None and len(third.pending) == 1)
        # A desk copy of an event is not a socket's business.
        await publisher.publish(subjects.desk_event_subject("app1", "c3"), created("c3", 4).data)
        await publisher.flush()
        await asyncio.sleep(0.1)
        assert third.pending is not None and len(third.pending) == 1
    finally:
        await hub.stop()
        assert not hub.following
        await publisher.close()
