"""The per-process event hub: routing by conversation, one decode per event, bounded queues."""

from __future__ import annotations

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
    hub.add("c1", mine)
    hub.add("c1", also_mine)
    hub.add("c2", other)
    await hub._on_message(created("c1", 1))
    await hub._on_message(created("c3", 2))  # nobody watches c3
    for listener in (mine, also_mine):
        frame = listener.queue.get_nowait()
        assert frame.cursor == 1
        assert frame.business_message_id == "m1"
        assert msgspec.json.decode(frame.text)["message"]["content"]["text"] == "hello 1"
        assert listener.queue.empty()
    assert other.queue.empty()
    hub.remove("c1", mine)
    hub.remove("c1", also_mine)
    assert "c1" not in hub.listeners
    await hub._on_message(Msg(_client=None, subject=subjects.event_subject("app1", "c2"),  # type: ignore[arg-type]
                              data=b"not an event"))
    assert other.queue.empty()


async def test_a_full_queue_marks_the_socket_for_closing() -> None:
    hub = EventHub()
    slow = SocketListener(8)
    hub.add("c1", slow)
    for cursor in range(1, 10):
        await hub._on_message(created("c1", cursor))
    assert slow.overflowed
    assert slow.queue.qsize() == 8
