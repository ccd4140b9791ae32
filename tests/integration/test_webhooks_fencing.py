"""The fence of the `webhooks` partitions (`shared.partitions`, `services.webhooks.store`), on a
real nats-server and both database engines: a replica stalled past its lease — its heartbeat
gone, its partitions taken over — that goes on with the event it held can neither store nor
acknowledge it, and gives the partition up at once; the new owner delivers the conversation in
order, each event once. The stalls are made, not waited for: a handler held at a gate, the
stalled replica's lease tasks cancelled and its heartbeat entry deleted (what its TTL does)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from services.webhooks.app import WebhooksService
from services.webhooks.config import WebhooksConfig
from services.webhooks.delivery import Dispatcher
from services.webhooks.handlers import NewDelivery, PendingDelivery
from services.webhooks.store import DeliveryStore
from shared import fencing, subjects
from shared.bus import Bus, Delivery, Retry
from shared.config import CommonConfig
from shared.db import DatabaseSettings
from shared.egress import EgressSession
from shared.fencing import StaleEpoch
from shared.ids import new_id
from shared.messages import conversation
from shared.partitions import PartitionLeases
from shared.tasks import cancel_and_wait
from tests.harness import System
from tests.integration.test_webhooks_delivery import (
    FAST_RETRIES,
    Received,
    Receiver,
    add_webhook,
    eventually,
    message_created,
    publish,
    settled_row,
)

T0 = 1_700_000_000.0
LEASE_TTL = 2.0


@pytest.fixture
def system(system_on_each_engine: System) -> System:
    """Every service test here runs with the webhooks' state on SQLite, then on PostgreSQL."""
    return system_on_each_engine


def conversation_in(partition: int) -> str:
    while True:
        conversation_id = new_id()
        if subjects.partition_of(conversation_id) == partition:
            return conversation_id


def a_delivery(conversation_id: str, event_id: str) -> NewDelivery:
    return NewDelivery(webhook_id="wh-1", app_id="app-1", event_id=event_id, conversation_id=conversation_id,
                       trigger="conversation:message", body=b'{"id": "%s"}' % event_id.encode(), traceparent=None,
                       tracestate=None, created_at=T0)


def dispatcher_on(store: DeliveryStore, settings: DatabaseSettings) -> Dispatcher:
    """A dispatcher that never POSTs (these tests look at its takes and writes only)."""
    config = WebhooksConfig(common=cast(CommonConfig, None), database=settings)
    return Dispatcher(store, lambda _app_id, _webhook_id: None, cast(EgressSession, None), config)


async def stall(leases: PartitionLeases) -> None:
    """The replica stalls past its lease: no heartbeat, no watching, and its heartbeat entry gone
    (as the bucket's TTL removes it)."""
    await cancel_and_wait(leases._tasks)
    await leases.members_kv.delete(f"{leases.group}.{leases.replica}")


# --- the store: epochs fence each partition's writes ------------------------------------------


async def test_a_take_of_a_partition_fences_out_the_writes_of_the_one_before(
        database_settings: DatabaseSettings) -> None:
    a = await DeliveryStore.open(database_settings)
    b = await DeliveryStore.open(database_settings)  # another replica, the same database
    try:
        conversation_id = new_id()
        partition = subjects.partition_of(conversation_id)
        other = conversation_in((partition + 1) % subjects.PARTITIONS)
        assert await fencing.raise_epoch(a.db, partition, 5) == 5
        assert await fencing.raise_epoch(a.db, subjects.partition_of(other), 6) == 6
        [first] = await a.insert([a_delivery(conversation_id, "ev-1")], {partition: 5})

        assert await fencing.raise_epoch(b.db, partition, 9) == 9  # B takes the partition over, then reads it
        assert [row.event_id for row in await b.load_pending(partition)] == ["ev-1"]

        # A, stalled past its lease, goes on: nothing it writes for the partition gets in.
        with pytest.raises(StaleEpoch) as refused:
            await a.insert([a_delivery(conversation_id, "ev-2")], {partition: 5})
        assert (refused.value.partition, refused.value.epoch, refused.value.stored) == (partition, 5, 9)
        with pytest.raises(StaleEpoch):
            await a.record_outcome([first], [], [], T0, 200, None, {partition: 5})
        with pytest.raises(StaleEpoch):  # all or none: its other partition's row is not written either
            await a.insert([a_delivery(other, "ev-x"), a_delivery(conversation_id, "ev-3")],
                           {partition: 5, subjects.partition_of(other): 6})
        assert await b.delivery("wh-1", "ev-2") is None
        assert await b.delivery("wh-1", "ev-x") is None
        assert (await b.delivery("wh-1", "ev-1"))["status"] == "pending"  # type: ignore[index]
        assert await fencing.raise_epoch(a.db, partition, 5) == 9  # a late take never lowers the stored epoch

        # The new owner's writes go through; A's partitions not taken over too.
        assert [row.event_id for row in await b.insert([a_delivery(conversation_id, "ev-2")], {partition: 9})] \
            == ["ev-2"]
        await b.record_outcome([first], [], [], T0, 200, None, {partition: 9})
        assert (await b.delivery("wh-1", "ev-1"))["status"] == "delivered"  # type: ignore[index]
        assert len(await a.insert([a_delivery(other, "ev-x")], {subjects.partition_of(other): 6})) == 1
    finally:
        await a.close()
        await b.close()


async def test_on_postgresql_a_take_waits_for_the_writes_in_hand_then_reads_them(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch checked by a write holds the partition's entry until its commit: a take that
    comes between the check and the commit waits, and then loads the row (on SQLite the write
    transaction holds the whole file)."""
    settings = DatabaseSettings(sqlite_path=str(tmp_path / "svc.db"), schema="svc", url=postgres_url, pool_size=4)
    a = await DeliveryStore.open(settings)
    b = await DeliveryStore.open(settings)
    try:
        conversation_id = new_id()
        partition = subjects.partition_of(conversation_id)
        await fencing.raise_epoch(a.db, partition, 5)
        checked, go_on = asyncio.Event(), asyncio.Event()
        check = fencing.check_fence

        async def check_then_stall(tx: Any, fence: Mapping[int, int]) -> None:
            await check(tx, fence)
            checked.set()
            await go_on.wait()

        monkeypatch.setattr(fencing, "check_fence", check_then_stall)
        inserting = asyncio.create_task(a.insert([a_delivery(conversation_id, "ev-1")], {partition: 5}))
        await checked.wait()  # A's epoch checked, its row not written yet

        async def take() -> list[PendingDelivery]:
            assert await fencing.raise_epoch(b.db, partition, 9) == 9
            return await b.load_pending(partition)

        taking = asyncio.create_task(take())

        async def take_waits() -> bool:
            return bool(await a.db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"))

        for _ in range(200):
            if await take_waits():
                break
            assert not taking.done(), "the take did not wait for the write in hand"
            await asyncio.sleep(0.025)
        else:
            pytest.fail("the take never waited for the write in hand")
        go_on.set()
        assert len(await inserting) == 1
        assert [row.event_id for row in await taking] == ["ev-1"]
        with pytest.raises(StaleEpoch):
            await a.insert([a_delivery(conversation_id, "ev-2")], {partition: 5})
    finally:
        await a.close()
        await b.close()


# --- takes: a late one is refused, one under an owners bucket made anew starts the fence again --


async def test_a_take_overtaken_by_a_later_one_is_refused(bus: Bus, database_settings: DatabaseSettings) -> None:
    members = await bus.key_value("t_overtaken_members", ttl=LEASE_TTL)
    owners = await bus.key_value("t_overtaken_owners")
    store_a = await DeliveryStore.open(database_settings)
    store_b = await DeliveryStore.open(database_settings)
    dispatcher_a, dispatcher_b = dispatcher_on(store_a, database_settings), dispatcher_on(store_b, database_settings)
    claimed, go_on = asyncio.Event(), asyncio.Event()

    async def acquire_a(partition: int, _took_over: bool) -> None:
        claimed.set()
        await go_on.wait()  # A stalls between its compare-and-set and its fence
        await dispatcher_a.acquire(partition)

    async def acquire_b(partition: int, _took_over: bool) -> None:
        await dispatcher_b.acquire(partition)

    leases_a = PartitionLeases(members, owners, "t-overtaken", "r-a", 1, LEASE_TTL, acquire_a, dispatcher_a.release)
    leases_b = PartitionLeases(members, owners, "t-overtaken", "r-b", 1, LEASE_TTL, acquire_b, dispatcher_b.release)
    starting = asyncio.create_task(leases_a.start())
    try:
        await asyncio.wait_for(claimed.wait(), 10)
        taken_by_a = leases_a.owned[0]
        await stall(leases_a)
        await leases_b.start()
        assert dispatcher_b.leases[0].epoch > taken_by_a
        go_on.set()
        await asyncio.wait_for(starting, 10)  # A's take failed (StaleEpoch) and was given back
        assert 0 not in dispatcher_a.leases and 0 not in leases_a.owned
        assert (await owners.get("t-overtaken.0")).value == b"r-b"
        assert await fencing.raise_epoch(store_a.db, 0, taken_by_a) == dispatcher_b.leases[0].epoch
    finally:
        go_on.set()
        await asyncio.wait_for(starting, 10)
        await leases_a.stop()
        await leases_b.stop()
        await store_a.close()
        await store_b.close()


async def test_a_take_under_an_owners_bucket_made_anew_starts_the_fence_again(
        bus: Bus, database_settings: DatabaseSettings) -> None:
    """The stored epochs came from a bucket since deleted (NATS state lost, the database kept):
    its revisions start again below them. The partitions are taken all the same, and the takes of
    the old bucket are fenced out."""
    members = await bus.key_value("t_anew_members", ttl=LEASE_TTL)
    owners = await bus.key_value("t_anew_owners")
    store = await DeliveryStore.open(database_settings)
    old_epoch = 10 ** 12
    assert await fencing.raise_epoch(store.db, 0, old_epoch) == old_epoch
    dispatcher = dispatcher_on(store, database_settings)

    async def acquire(partition: int, _took_over: bool) -> None:
        await dispatcher.acquire(partition)

    leases = PartitionLeases(members, owners, "t-anew", "r-a", 1, LEASE_TTL, acquire, dispatcher.release)
    try:
        await leases.start()
        lease = dispatcher.leases[0]
        assert lease.epoch == leases.owned[0] < old_epoch
        assert (await owners.get("t-anew.0")).revision == lease.epoch
        conversation_id = conversation_in(0)
        await dispatcher.insert([a_delivery(conversation_id, "ev-1")])
        assert await store.delivery("wh-1", "ev-1") is not None
        with pytest.raises(StaleEpoch):  # a replica still on the old bucket's take
            await store.insert([a_delivery(conversation_id, "ev-2")], {0: old_epoch})
    finally:
        await leases.stop()
        await store.close()


# --- the race itself, with two `webhooks` replicas ------------------------------------------------


@dataclass
class Gate:
    """Holds a replica's event handler before it starts (a replica stalled with the message in
    hand) until opened; records what it held and how each handling ended."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[str] = field(default_factory=list)
    ended: dict[str, BaseException | None] = field(default_factory=dict)


@dataclass
class Gates:
    """The gate of each replica (by service object); `next` goes to the next replica to handle
    an event without one."""

    of_service: dict[int, Gate] = field(default_factory=dict)
    next: Gate | None = None

    def of(self, service: object) -> Gate | None:
        gate = self.of_service.get(id(service))
        if gate is None and self.next is not None:
            gate, self.next = self.next, None
            self.of_service[id(service)] = gate
        return gate


async def test_a_replica_stalled_past_its_lease_neither_stores_nor_acknowledges_the_event_it_held(
        bus: Bus, system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: replica A is delivering event 1 of conversation c (the business is slow to
    answer) and holds event 2 (fetched, not acknowledged) when it stalls past its lease. B takes
    c's partition over: stores its epoch, loads its pending rows (event 1's), restarts its
    consumer at the ack floor and gets event 2 again. Unfenced, A woke up and stored event 2's
    row after B's load, to deliver it once event 1's attempt ended, while B, finding the row
    stored, skipped it and delivered event 3 at once: events 1, 3, 2 at the business. Fenced,
    A's row is refused (its message not acknowledged), its outcome of event 1 too, and it gives
    the partition up; B delivers events 1, 2, 3, each once."""
    gates = Gates()
    handle = WebhooksService._on_event

    async def gated(self: WebhooksService, data: bytes, headers: Mapping[str, str], delivery: Delivery) -> None:
        gate = gates.of(self)
        if gate is None:
            return await handle(self, data, headers, delivery)
        event_id = conversation.decode(data).id
        gate.held.append(event_id)
        await gate.opened.wait()
        try:
            await handle(self, data, headers, delivery)
        except Exception as exc:
            gate.ended[event_id] = exc
            raise
        gate.ended[event_id] = None

    monkeypatch.setattr(WebhooksService, "_on_event", gated)
    slow: list[Received] = []  # the first attempt of event 1, answered once `answer` is set
    answer = asyncio.Event()

    async def respond(received: Received) -> int:
        if not slow:
            slow.append(received)
            await answer.wait()
        return 200

    receiver = await Receiver(respond).start()
    try:
        await system.start("webhooks", env=FAST_RETRIES)
        a = system.service("webhooks")
        await eventually(lambda: len(a.dispatcher.leases) == subjects.PARTITIONS, what="A holding every partition")
        app_id, conversation_id = new_id(), new_id()
        partition = subjects.partition_of(conversation_id)
        hook = await add_webhook(bus, system, app_id, receiver.url)
        first, second, third = (message_created(app_id, conversation_id, f"message {n}") for n in (1, 2, 3))
        await publish(bus, first)
        await eventually(lambda: len(slow) == 1, what="A's attempt of the first event")

        # A fetches the second event and stalls with it in hand, leases and all.
        gate_a = gates.of_service[id(a)] = Gate()
        await publish(bus, second)
        await eventually(lambda: gate_a.held == [second.id], what="A holding the second event")
        leases_a = a.bus._leases[0]
        taken_by_a = a.dispatcher.leases[partition].epoch
        await stall(leases_a)

        # B starts and takes every partition over (A is no member any more): a later epoch. It
        # delivers the pending first event, restarts the partition's consumer at its ack floor
        # and gets the second event again.
        gate_b = gates.next = Gate()
        b = await system.start_replica("webhooks", FAST_RETRIES)
        try:
            assert set(b.dispatcher.leases) == set(range(subjects.PARTITIONS))
            assert b.dispatcher.leases[partition].epoch > taken_by_a
            assert (await settled_row(b.store, hook.id, first.id))["status"] == "delivered"
            await eventually(lambda: gate_b.held == [second.id], what="B holding the second event")

            # A wakes up and goes on with the event: refused, not acknowledged (Retry naks it),
            # and A lets the partition go at once, though it watches nothing any more.
            gate_a.opened.set()
            await eventually(lambda: second.id in gate_a.ended, what="A's handling of the second event")
            assert isinstance(gate_a.ended[second.id], Retry)
            assert await a.store.delivery(hook.id, second.id) is None
            assert partition not in leases_a.owned
            durable = subjects.WEBHOOKS_EVENTS.durable(partition)
            await eventually(lambda: all(task.get_name() != f"consume:{durable}" for task in a.bus._tasks),
                             what="A's consumer of the partition stopped")

            # B stores and delivers the second event, then the third.
            gate_b.opened.set()
            await publish(bus, third)
            for event in (second, third):
                assert (await settled_row(b.store, hook.id, event.id))["status"] == "delivered"

            # A's attempt of the first event ends: its outcome is not recorded, nothing follows.
            answer.set()
            await eventually(lambda: partition not in a.dispatcher.leases, what="A giving the partition up")
            assert a.dispatcher.stats()["inflight"] == 0
            assert gate_b.ended == {second.id: None, third.id: None}
            accepted = receiver.accepted_event_ids(hook.id)
            assert list(dict.fromkeys(accepted)) == [first.id, second.id, third.id]  # in order...
            assert accepted == [first.id, first.id, second.id, third.id]  # ...the first twice (A, then B)
        finally:
            await b.stop()
    finally:
        answer.set()
        await receiver.stop()
