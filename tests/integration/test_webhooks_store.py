"""The webhooks database on both engines (a real SQLite file, a real PostgreSQL server): pending
deliveries are loaded by the partition of their conversation, and follow a changed partition
count at the next start."""

from __future__ import annotations

from dataclasses import replace

from services.webhooks.handlers import NewDelivery
from services.webhooks.store import DeliveryStore
from shared import subjects
from shared.db import DatabaseSettings
from shared.messages.conversation import Erasure

T0 = 1_700_000_000.0


def a_delivery(conversation_id: str, event_id: str) -> NewDelivery:
    return NewDelivery(webhook_id="wh-1", app_id="app-1", event_id=event_id, conversation_id=conversation_id,
                       trigger="conversation:message", body=b'{"id": "%s"}' % event_id.encode(), traceparent=None,
                       tracestate=None, created_at=T0)


async def test_pending_deliveries_follow_a_changed_partition_count_at_the_next_start(
        database_settings: DatabaseSettings) -> None:
    store = await DeliveryStore.open(database_settings)
    conversations = [f"conv-{i}" for i in range(12)]
    try:
        created = await store.insert([a_delivery(c, f"ev-{c}-{n}") for c in conversations for n in range(2)])
        assert len(created) == 24
        again = await store.insert([a_delivery(conversations[0], f"ev-{conversations[0]}-0")])
        assert again == []  # a redelivered event is never a second delivery
        for conversation in conversations:
            pending = await store.load_pending(subjects.partition_of(conversation))
            assert [p.event_id for p in pending if p.conversation_id == conversation] == [
                f"ev-{conversation}-0", f"ev-{conversation}-1"]
        # As a deployment with another partition count wrote them.
        async with store.db.transaction() as tx:
            await tx.execute("UPDATE deliveries SET part = $1", subjects.MAX_PARTITIONS - 1)
        assert [await store.load_pending(p) for p in range(subjects.PARTITIONS)] == [[]] * subjects.PARTITIONS
    finally:
        await store.close()
    store = await DeliveryStore.open(database_settings)
    try:
        found = {p: await store.load_pending(p) for p in range(subjects.PARTITIONS)}
        assert sum(len(rows) for rows in found.values()) == 24
        for partition, rows in found.items():
            assert all(subjects.partition_of(row.conversation_id) == partition for row in rows)
            seqs = [row.seq for row in rows]
            assert seqs == sorted(seqs)  # in insertion order, as delivery needs
    finally:
        await store.close()


async def test_an_erasure_before_a_time_takes_rows_by_when_their_event_happened(
        database_settings: DatabaseSettings) -> None:
    """Delete All Messages or retention up to `before`: a row this service created later (it read
    the event late, after `before`) is still a copy of an event from before, and goes; the row of
    an event after `before` stays, and so do another conversation's."""
    store = await DeliveryStore.open(database_settings)
    try:
        def read_late(event_id: str, event_at: float, conversation_id: str = "conv-1") -> NewDelivery:
            return replace(a_delivery(conversation_id, event_id), created_at=T0 + 60, event_at=event_at)

        await store.insert([read_late("ev-old", T0), read_late("ev-new", T0 + 20), read_late("ev-other", T0, "conv-2")])
        removed = await store.forget(Erasure(("conv-1",), before=T0 + 10))
        assert removed == {"pending": 1}
        left = [p.event_id for part in range(subjects.PARTITIONS) for p in await store.load_pending(part)]
        assert sorted(left) == ["ev-new", "ev-other"]
    finally:
        await store.close()
