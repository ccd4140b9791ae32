"""`PresenceBoard` against a real nats-server: open and close become bucket writes, in order,
without one write per socket per interval; stopping withdraws the heartbeat and every socket."""

from __future__ import annotations

import asyncio

import nats.js.errors
from nats.js.kv import KeyValue

from shared import subjects
from shared.bus import Bus
from shared.messages.sdk_presence import DECODER, SocketPresence, replica_key, socket_key
from shared.presence import PresenceBoard, PresenceIndex


def entry(n: int, replica: str) -> SocketPresence:
    return SocketPresence(app_id="a", user_id=f"u{n}", client_id=f"c{n}", conversation_id=f"conv{n}",
                          integration_id="i", channel="web", replica_id=replica, written_at=0.0)


async def keys(kv: KeyValue) -> set[str]:
    try:
        return set(await kv.keys())
    except Exception as exc:  # nats-py raises NoKeysError on an empty bucket
        if type(exc).__name__ == "NoKeysError":
            return set()
        raise


async def settle(kv: KeyValue, wanted: set[str]) -> set[str]:
    for _ in range(100):
        found = await keys(kv)
        if found == wanted:
            return found
        await asyncio.sleep(0.05)
    return await keys(kv)


async def test_the_board_writes_opens_and_closes_and_withdraws_everything_on_stop(bus: Bus) -> None:
    kv = await bus.key_value(subjects.SDK_PRESENCE_BUCKET, ttl=subjects.SDK_PRESENCE_TTL_SECONDS)

    async def bucket() -> KeyValue:
        return kv

    board = PresenceBoard(bucket, "r1")
    await board.start()
    for n in range(200):
        board.open(f"s{n}", entry(n, "r1"))
    board.open("brief", entry(999, "r1"))
    board.close("brief")  # opened and closed before it was written: never written
    for n in range(0, 200, 2):
        board.close(f"s{n}")
    wanted = {replica_key("r1")} | {socket_key("r1", f"s{n}") for n in range(1, 200, 2)}
    assert await settle(kv, wanted) == wanted
    assert board.open_sockets == 100

    # A reader sees the odd ones connected, the even ones not.
    index = PresenceIndex()
    for key in wanted:
        index.apply(key, DECODER.decode((await kv.get(key)).value or b""))
    assert index.connected("u1", "conv1") and not index.connected("u2", "conv2")

    await board.stop()
    assert await keys(kv) == set()


async def test_the_first_heartbeat_waits_for_a_bucket_that_has_no_leader_yet(bus: Bus) -> None:
    """A replicated bucket just created answers "no responders" until its leader is elected
    (seen with three web replicas starting at once in a cluster); starting must wait it out."""
    kv = await bus.key_value(subjects.SDK_PRESENCE_BUCKET, ttl=subjects.SDK_PRESENCE_TTL_SECONDS)
    refusals = 3

    async def bucket() -> KeyValue:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise nats.js.errors.NoStreamResponseError
        return kv

    board = PresenceBoard(bucket, "r2")
    await board.start()
    assert refusals == 0
    assert replica_key("r2") in await keys(kv)
    await board.stop()
