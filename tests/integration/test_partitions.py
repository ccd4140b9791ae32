"""Partitioned consumer groups on a real nats-server: two replicas split the partitions, each
message is handled once and in order per key, a replica that leaves or dies is taken over, and
the durable from before partitioning is drained."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from nats.js import api
from nats.js.errors import KeyNotFoundError, NotFoundError

from shared import bus as bus_module
from shared import subjects
from shared.bus import Bus, Delivery, Retry
from shared.partitions import Lease, PartitionLeases, lease_being_taken
from shared.subjects import ConsumerSpec
from shared.tasks import cancel_and_wait
from threadline.natsserver import NatsServer


@dataclass
class Seen:
    """What every replica handled: (replica, subject, data) in handling order."""

    handled: list[tuple[str, str, bytes]] = field(default_factory=list)

    def handler(self, replica: str, hang: asyncio.Event | None = None):  # type: ignore[no-untyped-def]
        async def handle(data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
            if hang is not None and hang.is_set():
                await asyncio.Event().wait()  # stuck: the message stays unacknowledged
            await asyncio.sleep(0.001)  # let the replicas interleave
            self.handled.append((replica, delivery.subject, data))
        return handle

    def data(self) -> list[bytes]:
        return [d for _, _, d in self.handled]

    async def until(self, count: int, timeout: float = 30) -> None:
        for _ in range(int(timeout / 0.05)):
            if len(self.handled) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"handled {len(self.handled)} of {count}")


async def publish(bus: Bus, keys: int, per_key: int, tag: str) -> list[bytes]:
    sent = []
    for i in range(per_key):
        for k in range(keys):
            data = f"{tag}:k{k}:{i}".encode()
            await bus.publish(subjects.inbound_subject("web", "i1", f"k{k}"), data)
            sent.append(data)
    return sent


def per_key(values: list[bytes]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for value in values:
        tag, key, index = value.decode().split(":")
        out.setdefault(f"{tag}:{key}", []).append(int(index))
    return out


def partition(subject: str) -> int:
    return int(subject.rsplit(".", 1)[1])


async def replica(nats_server: NatsServer, name: str, spec: ConsumerSpec, seen: Seen,
                  hang: asyncio.Event | None = None) -> Bus:
    bus = await Bus.connect(nats_server.url, name, replica=name)
    await bus.consume(spec, seen.handler(name, hang), batch=20)
    return bus


def kill(bus: Bus) -> None:
    """The process dies: no release, no lease deleted, nothing acked (its connection just goes)."""
    for leases in bus._leases:
        for task in leases._tasks:
            task.cancel()
    for task in list(bus._tasks):
        task.cancel()


async def holders(bus: Bus, spec: ConsumerSpec) -> dict[int, str]:
    kv = await bus.key_value(subjects.PARTITION_OWNERS_BUCKET)
    found = {}
    for p in range(subjects.PARTITIONS):
        try:
            entry = await kv.get(f"{spec.group}.{p}")
        except Exception:
            continue
        if entry.value:
            found[p] = entry.value.decode()
    return found


async def until_held_by(bus: Bus, spec: ConsumerSpec, replicas: set[str], timeout: float = 20) -> dict[int, str]:
    for _ in range(int(timeout / 0.1)):
        held = await holders(bus, spec)
        if len(held) == subjects.PARTITIONS and set(held.values()) == replicas:
            return held
        await asyncio.sleep(0.1)
    raise AssertionError(f"partitions held: {await holders(bus, spec)}")


async def test_two_replicas_split_the_partitions_and_keep_each_key_in_order(bus: Bus,
                                                                          nats_server: NatsServer) -> None:
    spec = ConsumerSpec(subjects.INBOUND, "t-split", "inbound.*.*")
    seen = Seen()
    a = await replica(nats_server, "r-a", spec, seen)
    b = await replica(nats_server, "r-b", spec, seen)
    try:
        held = await until_held_by(bus, spec, {"r-a", "r-b"})
        sent = await publish(bus, keys=40, per_key=5, tag="x")
        await seen.until(len(sent))
        await asyncio.sleep(0.3)
        assert sorted(seen.data()) == sorted(sent)  # each once
        assert all(order == sorted(order) for order in per_key(seen.data()).values())
        by_partition: dict[int, set[str]] = {}
        for who, subject, _ in seen.handled:
            by_partition.setdefault(partition(subject), set()).add(who)
        assert all(len(who) == 1 for who in by_partition.values()), by_partition
        assert {p: next(iter(w)) for p, w in by_partition.items()} == {p: held[p] for p in by_partition}
        assert {"r-a", "r-b"} == {who for who, _, _ in seen.handled}
    finally:
        await a.close()
        await b.close()


async def test_a_replica_that_leaves_hands_its_partitions_over_at_once(bus: Bus, nats_server: NatsServer) -> None:
    spec = ConsumerSpec(subjects.INBOUND, "t-leave", "inbound.*.*")
    seen = Seen()
    a = await replica(nats_server, "r-a", spec, seen)
    b = await replica(nats_server, "r-b", spec, seen)
    try:
        await until_held_by(bus, spec, {"r-a", "r-b"})
        await a.close()  # leases deleted: no waiting out the TTL
        await until_held_by(bus, spec, {"r-b"}, timeout=subjects.PARTITION_LEASE_SECONDS - 1)
        sent = await publish(bus, keys=20, per_key=3, tag="y")
        await seen.until(len(sent))
        assert {who for who, _, _ in seen.handled} == {"r-b"}
        assert sorted(seen.data()) == sorted(sent)
    finally:
        await b.close()


async def test_a_dead_replica_is_taken_over_after_the_lease_ttl_in_order_and_nothing_is_lost(
        bus: Bus, nats_server: NatsServer) -> None:
    spec = ConsumerSpec(subjects.INBOUND, "t-dead", "inbound.*.*")
    seen = Seen()
    stuck = asyncio.Event()
    a = await replica(nats_server, "r-a", spec, seen, hang=stuck)
    b = await replica(nats_server, "r-b", spec, seen)
    try:
        held_by_a = {p for p, who in (await until_held_by(bus, spec, {"r-a", "r-b"})).items() if who == "r-a"}
        stuck.set()  # r-a takes messages and never finishes them
        sent = await publish(bus, keys=40, per_key=3, tag="z")
        await asyncio.sleep(0.5)
        kill(a)
        await a.nc.close()
        await until_held_by(bus, spec, {"r-b"}, timeout=subjects.PARTITION_LEASE_SECONDS * 3)
        # Well before the 30 s ack_wait would hand r-a's unacknowledged messages out again.
        await seen.until(len(sent), timeout=10)
        await asyncio.sleep(0.3)
        assert sorted(seen.data()) == sorted(sent)
        assert all(order == sorted(order) for order in per_key(seen.data()).values())
        taken_over = {partition(s) for who, s, _ in seen.handled if who == "r-b"}
        assert held_by_a <= taken_over
    finally:
        await b.close()


async def test_a_replica_restarted_under_its_id_takes_its_partitions_back_at_once(
        bus: Bus, nats_server: NatsServer) -> None:
    spec = ConsumerSpec(subjects.INBOUND, "t-restart", "inbound.*.*")
    seen = Seen()
    first = await replica(nats_server, "r-a", spec, seen)
    await until_held_by(bus, spec, {"r-a"})
    kill(first)
    await first.nc.close()  # its leases stay until the TTL
    again = await replica(nats_server, "r-a", spec, seen)
    try:
        sent = await publish(bus, keys=10, per_key=2, tag="r")
        await seen.until(len(sent), timeout=subjects.PARTITION_LEASE_SECONDS - 2)
        assert sorted(seen.data()) == sorted(sent)
    finally:
        await again.close()


async def test_a_message_handed_back_before_a_give_back_keeps_its_place_for_the_next_holder(
        bus: Bus, nats_server: NatsServer) -> None:
    """A replica hands a key's message back for later (its announcement failed: NATS was electing
    a leader), then gives its partitions up. The hold that keeps the key's later messages behind
    it goes to the next holder with the partition; what the first one acknowledged does not
    come again."""
    spec = ConsumerSpec(subjects.INBOUND, "t-handback", "inbound.*.*")
    seen = Seen()
    handed_back = asyncio.Event()

    async def failing_once(data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        if data == b"h:k0:0" and not handed_back.is_set():
            handed_back.set()
            raise Retry(5.0, "the announcement failed")
        seen.handled.append(("r-a", delivery.subject, data))

    a = await Bus.connect(nats_server.url, "r-a", replica="r-a")
    await a.consume(spec, failing_once, batch=20)
    b: Bus | None = None
    try:
        await until_held_by(bus, spec, {"r-a"})
        await bus.publish(subjects.inbound_subject("web", "i1", "k0"), b"h:k0:0")
        others = [f"o:k{k}:0".encode() for k in range(1, 7)]  # other keys, acknowledged by r-a
        for k, data in enumerate(others, start=1):
            await bus.publish(subjects.inbound_subject("web", "i1", f"k{k}"), data)
        await asyncio.wait_for(handed_back.wait(), 10)
        await seen.until(len(others), timeout=10)
        b = await replica(nats_server, "r-b", spec, seen)
        await a.close()  # a clean give-back: r-b takes every partition at its next tick
        await until_held_by(bus, spec, {"r-b"}, timeout=subjects.PARTITION_LEASE_SECONDS)
        await bus.publish(subjects.inbound_subject("web", "i1", "k0"), b"h:k0:1")
        await seen.until(len(others) + 2, timeout=15)
        await asyncio.sleep(0.5)
        by_b = [data for who, _, data in seen.handled if who == "r-b"]
        assert by_b == [b"h:k0:0", b"h:k0:1"]  # in order, and nothing r-a acknowledged again
        assert sorted(data for who, _, data in seen.handled if who == "r-a") == sorted(others)
    finally:
        if b is not None:
            await b.close()
        await a.close()


async def test_the_durable_from_before_partitioning_is_drained_then_removed(bus: Bus, nats_server: NatsServer) -> None:
    spec = ConsumerSpec(subjects.INBOUND, "t-legacy", "inbound.*.*")
    # What the previous version left: one durable over every subject, with messages on the old
    # three-token subjects still unhandled.
    await bus.js.add_consumer(subjects.INBOUND.name, api.ConsumerConfig(
        durable_name=spec.group, ack_policy=api.AckPolicy.EXPLICIT, filter_subject="inbound.>"))
    old = [f"old:k{k}:{i}".encode() for i in range(3) for k in range(5)]
    for data in old:
        await bus.publish(f"inbound.web.{data.decode().split(':')[1]}", data)
    seen = Seen()
    a = await replica(nats_server, "r-a", spec, seen)
    try:
        new = await publish(bus, keys=5, per_key=2, tag="new")
        await seen.until(len(old) + len(new))
        assert sorted(seen.data()) == sorted(old + new)
        assert per_key([d for d in seen.data() if d.startswith(b"old")]) == {f"old:k{k}": [0, 1, 2] for k in range(5)}
        for _ in range(100):
            try:
                await bus.js.consumer_info(subjects.INBOUND.name, spec.group)
            except NotFoundError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the pre-partitioning durable was not removed")
    finally:
        await a.close()


async def test_the_durables_of_partitions_beyond_todays_count_are_drained_and_kept_where_they_are(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "LEFTOVER_RECHECK_SECONDS", 0.5)
    spec = ConsumerSpec(subjects.INBOUND, "t-shrunk", "inbound.*.*")
    # What a deployment with twice today's partitions left: durables of the partitions that no
    # longer exist, with messages on their subjects still unhandled.
    gone = [subjects.PARTITIONS, subjects.MAX_PARTITIONS - 1]
    old: list[bytes] = []
    for partition in gone:
        await bus.js.add_consumer(subjects.INBOUND.name, api.ConsumerConfig(
            durable_name=spec.durable(partition), ack_policy=api.AckPolicy.EXPLICIT,
            filter_subject=spec.filter(partition)))
        for i in range(3):
            data = f"old:p{partition}:{i}".encode()
            old.append(data)
            await bus.publish(f"inbound.web.shrunk.{partition}", data)
    seen = Seen()
    a = await replica(nats_server, "r-a", spec, seen)
    try:
        new = await publish(bus, keys=5, per_key=2, tag="new")
        await seen.until(len(old) + len(new))
        assert sorted(seen.data()) == sorted(old + new)
        assert [d for d in seen.data() if d.startswith(b"old:p%d" % gone[0])] == old[:3]  # in order
        # Drained, and kept at their position: a later raise of the count goes on from there
        # instead of creating them again from the stream's start (a replay of all it retains).
        for partition in gone:
            for _ in range(100):
                info = await bus.js.consumer_info(subjects.INBOUND.name, spec.durable(partition))
                if not info.num_pending and not info.num_ack_pending:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the durable of partition {partition} was not drained")
            assert info.delivered.stream_seq > 0
        # A replica still on the old count publishes there during a change: drained again.
        await bus.publish(f"inbound.web.shrunk.{gone[0]}", b"late:p:0")
        await seen.until(len(old) + len(new) + 1)
        assert seen.data()[-1] == b"late:p:0"
        # Today's partitions are untouched.
        assert (await bus.js.consumer_info(subjects.INBOUND.name, spec.durable(0))).config.filter_subject \
            == spec.filter(0)
    finally:
        await a.close()


async def test_a_partition_whose_take_failed_is_taken_again(bus: Bus, nats_server: NatsServer) -> None:
    spec = ConsumerSpec(subjects.INBOUND, "t-acquire", "inbound.*.*")
    seen = Seen()
    failures = {3: 1}

    async def on_acquire(partition: int) -> None:
        if failures.get(partition):
            failures[partition] -= 1
            raise RuntimeError("the database is away for a moment")

    consumer = await Bus.connect(nats_server.url, "r-a", replica="r-a")
    await consumer.consume(spec, seen.handler("r-a"), on_acquire=on_acquire)
    try:
        await until_held_by(bus, spec, {"r-a"}, timeout=subjects.PARTITION_LEASE_SECONDS)
        sent = await publish(bus, keys=40, per_key=2, tag="q")
        await seen.until(len(sent))
        assert 3 in {partition(s) for _, s, _ in seen.handled}
        assert failures == {3: 0}
    finally:
        await consumer.close()


async def test_a_slow_acquire_never_stops_the_heartbeat(bus: Bus) -> None:
    ttl = 1.0
    members = await bus.js.create_key_value(bucket="t_slow_members", ttl=ttl)
    owners = await bus.js.create_key_value(bucket="t_slow_owners")
    started, finish = asyncio.Event(), asyncio.Event()

    async def acquire(partition: int, _took_over: bool) -> None:
        if partition == 0:
            started.set()
            await finish.wait()  # e.g. a partition's pending rows loaded from a slow database

    async def release(_partition: int) -> None:
        return None

    leases = PartitionLeases(members, owners, "t-slow", "r-slow", 2, ttl, acquire, release)
    starting = asyncio.create_task(leases.start())
    try:
        await asyncio.wait_for(started.wait(), 5)
        for _ in range(int(3 * ttl / 0.25)):  # three TTLs: the entry would have expired twice
            await asyncio.sleep(0.25)
            entry = await members.get("t-slow.r-slow")  # raises KeyNotFoundError once expired
            assert entry is not None
        assert not leases._releasing  # nothing was lost meanwhile
        finish.set()
        await asyncio.wait_for(starting, 5)
        assert set(leases.owned) == {0, 1}
    finally:
        finish.set()
        await asyncio.wait_for(starting, 5)
        await leases.stop()


async def test_every_take_of_a_partition_has_a_greater_epoch_and_a_fenced_one_is_given_up_at_once(
        bus: Bus) -> None:
    ttl = 2.0
    members = await bus.js.create_key_value(bucket="t_epoch_members", ttl=ttl)
    owners = await bus.js.create_key_value(bucket="t_epoch_owners")
    taken: list[Lease] = []
    released: list[tuple[str, int]] = []

    def hooks(replica: str):  # type: ignore[no-untyped-def]
        async def acquire(partition: int, _took_over: bool) -> None:
            taken.append(lease_being_taken(partition))

        async def release(partition: int) -> None:
            released.append((replica, partition))
        return acquire, release

    a = PartitionLeases(members, owners, "t-epoch", "r-a", 1, ttl, *hooks("r-a"))
    b = PartitionLeases(members, owners, "t-epoch", "r-b", 1, ttl, *hooks("r-b"))
    try:
        await a.start()
        first = taken[-1]
        assert (first.replica, first.partition, first.epoch) == ("r-a", 0, a.owned[0])
        with pytest.raises(RuntimeError):
            lease_being_taken(0)  # only an acquire hook knows its lease
        # r-a stalls past its lease (no heartbeat, no watching, its entry expired): r-b takes over.
        await cancel_and_wait(a._tasks)
        await members.delete("t-epoch.r-a")
        await b.start()
        second = taken[-1]
        assert second.replica == "r-b" and second.epoch == b.owned[0] > first.epoch
        assert await first.reaffirm() is None  # the later take stands
        # r-a's store refused its write (it found the later epoch): r-a lets the partition go at once.
        first.fenced()
        for _ in range(100):
            if ("r-a", 0) in released:
                break
            await asyncio.sleep(0.02)
        assert released == [("r-a", 0)] and 0 not in a.owned
        # r-b is fenced in turn (a write of its take refused): it lets go, and takes the
        # partition again at a next tick — a later take, a greater epoch.
        second.fenced()
        for _ in range(200):
            if len(taken) == 3:
                break
            await asyncio.sleep(0.02)
        assert ("r-b", 0) in released
        third = taken[-1]
        assert third.replica == "r-b" and third.epoch == b.owned[0] > second.epoch
        renewed = await third.reaffirm()
        assert renewed is not None and renewed.epoch > third.epoch and b.owned[0] == renewed.epoch
        assert (await owners.get("t-epoch.0")).revision == renewed.epoch
    finally:
        await a.stop()
        await b.stop()


async def test_a_durable_lost_while_being_recreated_at_its_floor_starts_there_again(bus: Bus) -> None:
    """A holder recreating a dead owner's durable at its ack floor that stops between the delete
    and the add leaves the start behind: the next holder creates it from there, not from the
    stream's first message (days of events again)."""
    for i in range(5):
        await bus.publish(subjects.inbound_subject("web", "i1", "k0"), f"old-{i}".encode())
    first_kept = (await bus.js.stream_info(subjects.INBOUND.name)).state.last_seq
    owners = await bus.key_value(subjects.PARTITION_OWNERS_BUCKET)
    durable = "t-resume-p0"
    await owners.put(f"{bus_module.RESUME_KEY_PREFIX}{durable}", str(first_kept).encode())
    config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                filter_subject="inbound.*.*", deliver_policy=api.DeliverPolicy.ALL)
    puller = await bus._start_puller(subjects.INBOUND, durable, config, 10, asyncio.Event(), create=True,
                                     bucket=owners)
    assert puller is not None
    try:
        info = await bus.js.consumer_info(subjects.INBOUND.name, durable)
        assert info.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE
        assert info.config.opt_start_seq == first_kept
        with pytest.raises(KeyNotFoundError):  # used: the next creation is a new durable's again
            await owners.get(f"{bus_module.RESUME_KEY_PREFIX}{durable}")
    finally:
        await puller.stop()


async def test_a_durable_recreated_at_its_floor_takes_a_new_filter(bus: Bus) -> None:
    """A filter update keeps where the durable delivers from (the server refuses to change it):
    a durable recreated at its ack floor still takes a change of the partition count."""
    durable = "t-refilter-p0"
    await bus.js.add_consumer(subjects.INBOUND.name, api.ConsumerConfig(
        durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, filter_subject="inbound.*.*.0",
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1))
    config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                filter_subject="inbound.*.*", deliver_policy=api.DeliverPolicy.ALL)
    puller = await asyncio.wait_for(bus._start_puller(subjects.INBOUND, durable, config, 10, asyncio.Event(),
                                                      create=True), 10)
    assert puller is not None
    try:
        info = await bus.js.consumer_info(subjects.INBOUND.name, durable)
        assert info.config.filter_subject == "inbound.*.*"
        assert info.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE
    finally:
        await puller.stop()
