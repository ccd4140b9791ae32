"""The split of a consumer group's partitions among its replicas (pure logic)."""

from __future__ import annotations

import datetime

import pytest
from nats.js.kv import KeyValue

from shared import subjects
from shared.partitions import PartitionLeases, assignment


def test_every_partition_has_exactly_one_owner() -> None:
    for members in (["a"], ["a", "b"], ["r-1", "r-2", "r-3"], [f"pod-{i}" for i in range(10)]):
        owned = assignment(members, subjects.PARTITIONS)
        flat = [p for parts in owned.values() for p in parts]
        assert sorted(flat) == list(range(subjects.PARTITIONS))


def test_every_member_computes_the_same_split_whatever_the_order() -> None:
    assert assignment(["b", "a", "c"], 8) == assignment(["c", "b", "a", "a"], 8)


def test_a_member_joining_takes_partitions_only_for_itself() -> None:
    before = assignment(["a", "b"], 64)
    after = assignment(["a", "b", "c"], 64)
    assert after["a"] <= before["a"] and after["b"] <= before["b"]
    assert after["c"] == (before["a"] - after["a"]) | (before["b"] - after["b"])
    assert len(after["c"]) > 64 // 6  # roughly a third, not a crumb


def test_a_member_leaving_hands_its_partitions_to_the_others_only() -> None:
    before = assignment(["a", "b", "c"], 64)
    after = assignment(["a", "c"], 64)
    assert before["a"] <= after["a"] and before["c"] <= after["c"]
    assert after["a"] | after["c"] == set(range(64))


def test_no_members_no_owners() -> None:
    assert assignment([], 8) == {}


def test_partition_of_is_stable_and_in_range() -> None:
    # crc32, not Python's salted hash(): every process and host puts a key in the same partition.
    assert subjects.partition_of("i1:+15550001") == subjects.partition_of("i1:+15550001")
    assert {subjects.partition_of(f"k{i}") for i in range(200)} == set(range(subjects.PARTITIONS))


def test_subjects_carry_the_partition_of_their_ordering_key() -> None:
    subject = subjects.event_subject("app1", "conv1")
    assert subject == f"events.app1.conv1.{subjects.partition_of('conv1')}"
    assert subjects.conversation_of_event_subject(subject) == "conv1"
    # An erasure's filter matches the conversation's events under any partition count.
    assert subjects.conversation_events("app1", "conv1") == "events.app1.conv1.*"
    inbound = subjects.inbound_subject("whatsapp", "i1", "+1555")
    assert inbound.endswith(f".{subjects.partition_of(subjects.inbound_key('i1', '+1555'))}")
    spec = subjects.CONVERSATIONS_INBOUND
    assert spec.filter(3) == "inbound.*.*.3" and spec.durable(3) == "conversations-inbound-p3"


def test_the_partition_count_is_a_power_of_two_up_to_the_maximum_the_permissions_name() -> None:
    assert subjects.partition_count({}) == subjects.DEFAULT_PARTITIONS
    assert subjects.partition_count({subjects.PARTITIONS_VARIABLE: " "}) == subjects.DEFAULT_PARTITIONS
    for count in (1, 2, 4, 8, 16):
        assert subjects.partition_count({subjects.PARTITIONS_VARIABLE: str(count)}) == count
    for bad in ("0", "3", "12", "32", "-1", "eight", "1.0"):
        with pytest.raises(ValueError, match=subjects.PARTITIONS_VARIABLE):
            subjects.partition_count({subjects.PARTITIONS_VARIABLE: bad})
    assert subjects.MAX_PARTITIONS in subjects.PARTITION_COUNTS
    assert [subjects.partitions_for(n) for n in (0, 1, 2, 3, 5, 8, 9, 40)] == [1, 1, 2, 4, 8, 8, 16, 16]
    spec = subjects.CONVERSATIONS_INBOUND
    assert len(spec.durables) == subjects.MAX_PARTITIONS + 1  # each may exist: the permissions name them all
    assert [name for name, _ in spec.leftovers] == [
        spec.group, *(spec.durable(p) for p in range(subjects.PARTITIONS, subjects.MAX_PARTITIONS))]


def test_a_live_heartbeat_counts_as_fresh_whatever_the_servers_clock_says() -> None:
    async def hook(*_args: object) -> None:
        return None

    leases = PartitionLeases(None, None, "g", "r-me", subjects.PARTITIONS, 6.0, hook, hook)  # type: ignore[arg-type]
    skewed = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=30)  # server 30 s behind

    def heartbeat(member: str) -> KeyValue.Entry:
        return KeyValue.Entry(bucket="b", key=f"g.{member}", value=b"", revision=1, delta=0,
                              created=skewed, operation=None)  # type: ignore[arg-type]

    leases._on_member(heartbeat("r-live"), False)  # arrived while watching: just written
    leases._on_member(heartbeat("r-old"), True)  # there before the watch: as old as the server says
    assert leases._live_members() == ["r-live"]
