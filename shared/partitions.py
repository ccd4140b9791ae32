"""Which replica consumes which partition of a consumer group, agreed through a NATS KV bucket.

Every stream subject carries a partition number (`shared.subjects.partition_of`), and a consumer
group has one durable consumer per partition. One replica at a time consumes a partition, so
the messages of one key (a customer, a conversation, a recipient) are handled in stream order
whichever replica handles them, and a partition's other state (the webhooks' pending deliveries
of its conversations) has one owner.

The agreement, in the bucket `shared.subjects.PARTITIONS_BUCKET` (entries expire after its TTL):
- each replica rewrites `<group>.m.<replica>` every `tick` seconds; the members are the keys
  present;
- the members split the partitions by rendezvous hashing (`assignment`): every member computes
  the same split from the same member list, and a member joining or leaving moves only the
  partitions it gains or loses;
- a replica consumes a partition only while it holds `<group>.p.<n>`: created with the KV's
  compare-and-set (one winner), rewritten with the revision it last wrote each tick (a replica
  that lost it learns so at once), deleted after the replica stopped consuming it (it finishes
  the batch in hand and its `release` hook first). A replica that dies stops rewriting; its
  entries expire after the TTL, and the members that now own its partitions create them.

A replica that keeps its id across a restart (`THREADLINE_REPLICA_ID`: the pod name in
Kubernetes, `<service>-<n>` under `threadline up`) takes its own leases back at once instead of
waiting out the TTL. Two live processes must never share an id.

Not a fence: a replica stalled longer than the TTL (a stopped VM) may still finish the batch it
held after another replica took the partition over. A batch takes milliseconds and the TTL is
seconds; the receivers de-duplicate by event id in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from shared.telemetry import log_fields

log = logging.getLogger(__name__)

PartitionHook = Callable[[int], Coroutine[Any, Any, None]]


def _weight(member: str, partition: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest(), "big")


def assignment(members: Iterable[str], partitions: int) -> dict[str, set[int]]:
    """Rendezvous hashing: each partition goes to the member with the highest weight for it."""
    ordered = sorted(set(members))
    owned: dict[str, set[int]] = {member: set() for member in ordered}
    if not ordered:
        return owned
    for partition in range(partitions):
        owned[max(ordered, key=lambda member: _weight(member, partition))].add(partition)
    return owned


class PartitionLeases:
    """One replica's share of one consumer group's partitions, kept up to date every `tick`.

    `acquire(n)` is awaited once this replica holds partition n's lease; `release(n)` when it
    must give the partition up (another member owns it now, the lease was lost, or `stop()`),
    and must return only once nothing of partition n is being handled any more.
    """

    def __init__(self, kv: KeyValue, group: str, replica: str, partitions: int, ttl: float,
                 acquire: PartitionHook, release: PartitionHook) -> None:
        self.kv = kv
        self.group = group
        self.replica = replica
        self.partitions = partitions
        self.ttl = ttl
        self.tick = ttl / 4
        self.acquire = acquire
        self.release = release
        self.members: list[str] = []
        self.owned: dict[int, int] = {}  # partition → revision of our lease entry
        self._renewed: dict[int, float] = {}  # partition → monotonic time of the last rewrite
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.changed = asyncio.Event()  # set after every tick that changed what this replica holds

    def _member_key(self, replica: str) -> str:
        return f"{self.group}.m.{replica}"

    def _lease_key(self, partition: int) -> str:
        return f"{self.group}.p.{partition}"

    async def start(self) -> None:
        """Take this replica's share now (a replica starting alone consumes before its start
        returns), then keep it up to date in the background."""
        await self._tick_once()
        self._task = asyncio.create_task(self._run(), name=f"partitions:{self.group}")

    async def stop(self) -> None:
        """Give every partition back (release hooks first, then the leases, so that the other
        members take them over at their next tick rather than after the TTL)."""
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for partition in list(self.owned):
            if partition not in self._releasing:
                self._releasing[partition] = asyncio.create_task(self.release(partition))
        for partition, task in list(self._releasing.items()):
            with contextlib.suppress(Exception):
                await task
            await self._drop_lease(partition)
        self._releasing.clear()
        with contextlib.suppress(Exception):
            await self.kv.delete(self._member_key(self.replica))

    async def _run(self) -> None:
        while not self._stopped.is_set():
            await asyncio.sleep(self.tick)
            await self._tick_once()

    async def _tick_once(self) -> None:
        try:
            await self.step()
        except asyncio.CancelledError:
            raise
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("partition leases of %s: %s", self.group, exc)
            self._expire_unrenewed()
        except Exception:
            log.exception("partition leases of %s failed", self.group)
            self._expire_unrenewed()

    async def step(self) -> None:
        """One tick: heartbeat, renew, release what is no longer ours, take what is ours and free."""
        before = set(self.owned)
        await self.kv.put(self._member_key(self.replica), b"")
        self.members = sorted({*await self._live_members(), self.replica})
        wanted = assignment(self.members, self.partitions)[self.replica]
        for partition in list(self.owned):
            await self._renew(partition)
        for partition, task in list(self._releasing.items()):
            if task.done():
                del self._releasing[partition]
                await self._drop_lease(partition)
        given_up = sorted(set(self.owned) - wanted - set(self._releasing))
        for partition in given_up:
            self._releasing[partition] = asyncio.create_task(self.release(partition))
        taken = []
        for partition in sorted(wanted - set(self.owned) - set(self._releasing)):
            if await self._claim(partition):
                taken.append(partition)
                await self.acquire(partition)
        if given_up or taken:
            log.info("%s: consuming partitions %s (took %s, giving up %s; %d replicas)", self.group,
                     sorted(set(self.owned) - set(self._releasing)), taken, given_up, len(self.members),
                     extra=log_fields(group=self.group, taken=taken, given_up=given_up, replicas=len(self.members)))
        if set(self.owned) != before:
            self.changed.set()

    async def _live_members(self) -> list[str]:
        prefix = self._member_key("")
        watcher = await self.kv.watch(self._member_key("*"), ignore_deletes=True, meta_only=True)
        members: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:  # the end of the current values
                    break
                if entry.key.startswith(prefix):
                    members.append(entry.key[len(prefix):])
        finally:
            await watcher.stop()
        return members

    async def _claim(self, partition: int) -> bool:
        key = self._lease_key(partition)
        try:
            revision = await self.kv.create(key, self.replica.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            # Held — by this very replica before a restart (same id): take it back at once.
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return False
            if entry.value != self.replica.encode() or partition in self._releasing:
                return False
            try:
                revision = await self.kv.update(key, self.replica.encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        self.owned[partition] = revision
        self._renewed[partition] = time.monotonic()
        return True

    async def _renew(self, partition: int) -> None:
        try:
            self.owned[partition] = await self.kv.update(self._lease_key(partition), self.replica.encode(),
                                                         last=self.owned[partition])
            self._renewed[partition] = time.monotonic()
        except nats.js.errors.KeyWrongLastSequenceError:
            self._lost(partition)

    def _expire_unrenewed(self) -> None:
        """NATS unreachable: a lease not rewritten for most of the TTL may be someone else's by now."""
        deadline = time.monotonic() - self.ttl * 0.75
        for partition in [p for p, at in self._renewed.items() if at < deadline and p in self.owned]:
            self._lost(partition)

    def _lost(self, partition: int) -> None:
        log.warning("lost the lease of partition %d of %s", partition, self.group,
                    extra=log_fields(group=self.group, partition=partition))
        self.owned.pop(partition, None)
        self._renewed.pop(partition, None)
        if partition not in self._releasing:
            self._releasing[partition] = asyncio.create_task(self.release(partition))
        self.changed.set()

    async def _drop_lease(self, partition: int) -> None:
        revision = self.owned.pop(partition, None)
        self._renewed.pop(partition, None)
        if revision is None:
            return
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await self.kv.delete(self._lease_key(partition), last=revision)
