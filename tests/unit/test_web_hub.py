"""The per-process event hub: routing by conversation, one decode per event, bounded queues."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.msg import Msg

from shared import subjects
from shared.messages import conversation as conv
from shared.sdk_service import EventHub, SocketListener
from shared.sunco import Author, ConversationRef, Message, TextContent


def created(conversation_id: str, cursor: int) -> Msg:
    event = conv.MessageCreated(
        id=f"e{cursor}", app_id="app1", conversation_id=conversation_id, created_at=1.0,
        conversation=ConversationRef(id=conversation_id, type="personal"), cursor=cursor, user_id="u1",
        message=Message(id=f"m{cursor}", received="2026-01-01T00:00:00.000Z", author=Author(type="business"),
                        content=TextContent(text=f"hello {cursor}")))
    return Msg(_client=None, subject=subjects.event_subject("app1", conversation_id),  # type: ignore[arg-type]
               data=conv.encode(event))


async def test_hub_routes_events_to_the_sockets_of_their_conversation() -> None:
    hub = EventHub()
    mine, also_mine, other = SocketListener(8), SocketListener(8), SocketListener(8)
    await hub.add("c1", mine)
    await hub.add("c1", also_mine)
    await hub.add("c2", other)
    await hub._on_message(created("c1", 1))
    await hub._on_message(created("c3", 2))  # nobody watches c3
    for listener in (mine, also_mine):
        assert listener.pending is not None
        frame = listener.pending.popleft()
        assert frame.cursor == 1
        assert frame.business_message_id == "m1"
        assert msgspec.json.decode(frame.text)["message"]["content"]["text"] == "hello 1"
        assert not listener.pending
    assert other.pending is None
    hub.remove("c1", mine)
    hub.remove("c1", also_mine)
    assert "c1" not in hub.listeners
    await hub._on_message(Msg(_client=None, subject=subjects.event_subject("app1", "c2"),  # type: ignore[arg-type]
                              data=b"not an event"))
    assert other.pending is None


async def test_a_full_queue_marks_the_socket_for_closing() -> None:
    hub = EventHub()
    slow = SocketListener(8)
    await hub.add("c1", slow)
    for cursor in range(1, 10):
        await hub._on_message(created("c1", cursor))
    assert slow.overflowed
    assert slow.pending is not None and len(slow.pending) == 8


async def test_a_live_listener_sends_in_order_with_one_short_lived_sender() -> None:
    sent: list[int | None] = []
    runs = 0

    async def drain(listener: SocketListener) -> None:
        nonlocal runs
        runs += 1
        try:
            while listener.pending:
                frame = listener.pending.popleft()
                if frame.cursor is None or listener.watermark.admit(frame.cursor):
                    sent.append(frame.cursor)
                await asyncio.sleep(0)
        finally:
            listener.sender = None

    hub = EventHub()
    listener = SocketListener(8, drain, after=1)
    await hub.add("c1", listener)
    for cursor in (1, 2, 3):  # offered while history is replayed: held, no sender yet
        await hub._on_message(created("c1", cursor))
    assert listener.sender is None and sent == []
    listener.go_live()
    await hub._on_message(created("c1", 3))  # a duplicate of a pending frame
    await hub._on_message(created("c1", 4))
    assert listener.sender is not None
    await listener.sender
    assert sent == [2, 3, 4]  # cursor 1 was in the history (after=1); 3 once
    assert runs == 1 and listener.sender is None  # an idle socket holds no task
    await hub._on_message(created("c1", 5))
    assert listener.sender is not None
    await listener.sender
    assert sent == [2, 3, 4, 5] and runs == 2
