"""Pure parts of erasure: which copies a privacy event names, the webhook queue dropping the rows
of erased conversations, which bus filters overlap (purging consumed copies), and the
`user:remove` webhook form."""

from __future__ import annotations

import sunshine_conversations_client as sc

from services.webhooks.handlers import PendingDelivery, WebhookQueue, webhook_event
from shared.bus import subjects_overlap
from shared.messages import conversation as conv
from shared.sunco import ConversationRef, UserRef


def row(seq: int, conversation_id: str, created_at: float = 100.0) -> PendingDelivery:
    return PendingDelivery(seq=seq, webhook_id="w", app_id="a", event_id=f"e{seq}", conversation_id=conversation_id,
                           body=b"{}", traceparent=None, tracestate=None, created_at=created_at,
                           next_attempt_at=created_at)


def test_privacy_events_name_the_copies_to_forget() -> None:
    removed = conv.UserRemoved(id="e1", app_id="a", conversation_id="c1", created_at=5.0,
                               user=UserRef(id="u1", external_id="x"), conversation_ids=["c1", "c2"])
    assert conv.erasure(removed) == conv.Erasure(("c1", "c2"), user_id="u1")
    personal = conv.PersonalInformationDeleted(id="e2", app_id="a", conversation_id="c1", created_at=5.0,
                                               user_id="u1", conversation_ids=["c1"])
    assert conv.erasure(personal) == conv.Erasure(("c1",), user_id="u1", delivered_only=True)
    expired = conv.MessagesExpired(id="e3", app_id="a", conversation_id="c1", created_at=7.0,
                                   conversation=ConversationRef(id="c1", type="personal"), before=3.0)
    assert conv.erasure(expired) == conv.Erasure(("c1",), before=7.0)
    deleted = conv.MessageDeleted(id="e4", app_id="a", conversation_id="c1", created_at=9.0,
                                  conversation=ConversationRef(id="c1", type="personal"), message_id="m1",
                                  message_event_id="e0", message_at=4.0)
    assert conv.erasure(conv.decode(conv.encode(deleted))) == conv.Erasure(
        ("c1",), message=conv.DeletedMessage(id="m1", event_id="e0", at=4.0))
    assert conv.concerns_desk(deleted, None)  # the desk's preview may be its text
    # Only user:remove is a webhook (SunCo announces neither retention, personal information nor deletions).
    assert webhook_event(personal) is None and webhook_event(expired) is None and webhook_event(deleted) is None
    found = webhook_event(conv.decode(conv.encode(removed)))
    assert found is not None and found[0] == "user:remove"
    assert found[1]["payload"] == {"user": {"id": "u1", "externalId": "x", "authenticated": False}}
    assert sc.UserRemoveEvent.from_dict(found[1]).payload.user.external_id == "x"


def test_the_webhook_queue_drops_the_waiting_rows_of_erased_conversations() -> None:
    queue = WebhookQueue("w", "a")
    for seq, conversation_id, created in ((1, "c1", 100.0), (2, "c1", 200.0), (3, "c2", 100.0), (4, "c3", 100.0)):
        queue.add(row(seq, conversation_id, created), 300.0)
    in_flight = queue.take_batch(300.0, 1)
    assert [r.seq for r in in_flight] == [1] and queue.pending == 3
    assert queue.forget(["c1"], before=150.0) == 0  # row 2 is newer than the erasure; row 1 is in flight
    assert queue.forget(["c2", "nowhere"], before=None) == 1 and queue.pending == 2
    queue.complete(in_flight, "delivered", 301.0, policy=None)  # type: ignore[arg-type]
    batch = queue.take_batch(302.0, 10)
    assert sorted(r.seq for r in batch) == [2, 4]  # c2 is gone, the others go on in order
    queue.complete(batch, "delivered", 303.0, policy=None)  # type: ignore[arg-type]
    assert queue.is_idle() and queue.pending == 0


def test_the_webhook_queue_compares_an_erasure_with_when_the_event_happened() -> None:
    """A row stored at 400 (this service read its event late) of an event that happened at 100
    goes with an erasure up to 150; the row of an event at 200 stays."""
    queue = WebhookQueue("w", "a")
    for seq, happened in ((1, 100.0), (2, 200.0)):
        late = row(seq, "c1", created_at=400.0)
        late.event_at = happened
        queue.add(late, 400.0)
    assert queue.forget(["c1"], before=150.0) == 1
    assert [r.seq for r in queue.take_batch(401.0, 10)] == [2]


def test_the_webhook_queue_drops_the_waiting_rows_of_one_deleted_message_only() -> None:
    queue = WebhookQueue("w", "a")
    for seq in (1, 2, 3):
        queue.add(row(seq, "c1"), 300.0)
    assert queue.forget(["c1"], before=None, event_id="e2") == 1 and queue.pending == 2
    assert [r.seq for r in queue.take_batch(301.0, 10)] == [1, 3]


def test_subject_filters_overlap_when_one_subject_can_match_both() -> None:
    assert subjects_overlap("inbound.>", "inbound.whatsapp.i1")
    assert subjects_overlap("outbound.whatsapp.>", "outbound.*.i1")
    assert subjects_overlap(">", "events.a.c")
    assert not subjects_overlap("outbound.whatsapp.>", "outbound.messenger.>")
    assert not subjects_overlap("events.a.c1", "events.a.c2")
    assert not subjects_overlap("events.a", "events.a.c")
    assert subjects_overlap("events.*.c", "events.a.*")
