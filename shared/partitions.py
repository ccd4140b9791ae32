"""Which replica consumes which partition of a consumer group, agreed through a NATS KV bucket.

Every stream subject carries a partition number (`shared.subjects.partition_of`), and a consumer
group has one durable consumer per partition. One replica at a time consumes a partition, so
the messages of one key (a customer, a conversation, a recipient) are handled in stream order
whichever replica handles them, and a partition's other state (the webhooks' pending deliveries
of its conversations) has one owner.

The agreement, in two NATS KV buckets (`shared.subjects`):
- members (`PARTITION_MEMBERS_BUCKET`, entries expire after the TTL): each replica rewrites
  `<group>.<replica>` every `tick` seconds. Every replica watches those keys (one watcher for its
  life) and counts as members those it heard from within the TTL, minus those deleted (a replica
  that stops deletes its key);
- the members split the partitions by rendezvous hashing (`assignment`): every member computes
  the same split from the same member list, and a member joining or leaving moves only the
  partitions it gains or loses;
- owners (`PARTITION_OWNERS_BUCKET`, no expiry): `<group>.<n>` names the replica consuming
  partition n. A replica takes a partition with the KV's compare-and-set: creating the key when
  nobody owns it, or replacing an owner that is no longer a member (its heartbeat stopped); one
  of several contenders wins. It deletes the key after it stopped consuming (the batch in hand
  finished, its `release` hook done). Every replica watches the owners too: one that sees its
  partition taken over (it was thought dead) stops consuming it at once, and one that could not
  write its heartbeat for most of the TTL stops consuming everything.

Only heartbeats are written while nothing changes: one small write per group and replica per
tick, whatever the number of partitions (on a clustered bucket every write is replicated).

A replica that keeps its id across a restart (`THREADLINE_REPLICA_ID`: the pod name in
Kubernetes, `<service>-<n>` under `threadline up`) takes its own partitions back at once instead
of waiting out the TTL. Two live processes must never share an id.

The leases alone are not a fence: a replica stalled longer than the TTL (a stopped VM, a loop
blocked, heartbeats stuck behind a NATS leader election) still believes it owns its partitions
and goes on with the batch it held after another replica took them over, until its watcher or
its heartbeat check tells it. So every take of a partition has an epoch (`Lease`, which the
acquire hook reads with `lease_being_taken`): the revision of the owner entry its
compare-and-set wrote, greater than every earlier take's of that partition. A consumer whose
writes must not outlive its lease fences them in its own database: taking a partition, it
stores the epoch (only ever raising the stored one) before it reads the partition's state, and
it does every write of the partition in one transaction with a check that the stored epoch is
still its own. A stalled replica's writes are then refused from the moment the new owner took
the partition over (and what it committed before is what the new owner reads); it stops
consuming the partition at once (`Lease.fenced`), and the messages it held, never acknowledged,
go to the new owner. A stored epoch greater than a take's own is a later take, or a bucket made
anew (its revisions start again): `Lease.reaffirm` tells them apart. `shared.fencing` does
this; `webhooks` fences its deliveries so, and `conversations` its inbound messages. The other
groups do not: a stalled replica of theirs
may still finish its batch after the takeover (their handlers are idempotent, so nothing is
stored twice; a batch takes milliseconds, the TTL is seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from shared.tasks import cancel_and_wait
from shared.telemetry import log_fields

log = logging.getLogger(__name__)

PartitionHook = Callable[[int], Coroutine[Any, Any, None]]
# `acquire(partition, took_over)`: took_over when the partition's previous owner did not give it
# back (it died, or this replica restarted under its id): its consumer may hold messages that
# owner never finished.
AcquireHook = Callable[[int, bool], Coroutine[Any, Any, None]]


@dataclass(frozen=True, eq=False)
class Lease:
    """One take of a partition by this replica.

    `epoch` is the revision of the owner entry the take's compare-and-set wrote: the bucket's
    revisions only grow, so a later take of the partition (by any replica, this one after a
    restart included) has a greater epoch. It fences the partition's writes (see the module's
    docstring).
    """

    group: str
    partition: int
    replica: str
    epoch: int
    holder: PartitionLeases = field(repr=False)

    async def reaffirm(self) -> Lease | None:
        """The same take under a fresh epoch, if no other take of the partition came after this
        one (None then): the owner entry rewritten with compare-and-set on this take's revision.

        For a fence that finds a greater epoch stored than this take's, which is either a later
        take (this one is stale) or one of an owners bucket since made anew, whose revisions
        started again: only the second lets the rewrite through (a read could not tell them
        apart, it may be answered by a lagging replica of the bucket)."""
        holder = self.holder
        if holder.owned.get(self.partition) != self.epoch:
            return None
        try:
            revision = await holder.owners_kv.update(holder._owner_key(self.partition), self.replica.encode(),
                                                     last=self.epoch)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            return None
        if holder.owned.get(self.partition) != self.epoch:
            # Lost meanwhile (our heartbeat lapsed): a next tick deletes the entry, as after a
            # give-back whose delete failed.
            return None
        holder.owned[self.partition] = revision
        holder._owners[self.partition] = (self.replica, revision)
        return Lease(self.group, self.partition, self.replica, revision, holder)

    def fenced(self) -> None:
        """A write of this take was refused, a later take's epoch being stored: stop consuming the
        partition now (its release hook runs) rather than when the watcher or the heartbeat
        check tells."""
        if self.holder.owned.get(self.partition) == self.epoch:
            self.holder._lost(self.partition)


# The take an acquire hook runs for (set around the hook, in its context).
_TAKING: ContextVar[Lease | None] = ContextVar("threadline_partition_taking", default=None)


def lease_being_taken(partition: int) -> Lease:
    """Inside an acquire hook of `PartitionLeases` (and the tasks it starts): the take of
    `partition` it runs for."""
    lease = _TAKING.get()
    if lease is None or lease.partition != partition:
        raise RuntimeError(f"partition {partition} is not being taken here (only an acquire hook knows its lease)")
    return lease


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

    `acquire(n, took_over)` is awaited once this replica owns partition n; `release(n)` when it must give
    the partition up (another member owns it now, it was taken over, or `stop()`), and must
    return only once nothing of partition n is being handled any more.
    """

    def __init__(self, members: KeyValue, owners: KeyValue, group: str, replica: str, partitions: int, ttl: float,
                 acquire: AcquireHook, release: PartitionHook) -> None:
        self.members_kv = members
        self.owners_kv = owners
        self.group = group
        self.replica = replica
        self.partitions = partitions
        self.ttl = ttl
        self.tick = ttl / 4
        self.acquire = acquire
        self.release = release
        self.members: list[str] = []
        self.owned: dict[int, int] = {}  # partition → revision of our owner entry
        self._owners: dict[int, tuple[str, int]] = {}  # partition → (owner, revision), as watched
        self._heard: dict[str, float] = {}  # member → monotonic time its heartbeat was last seen
        self._beat_at = time.monotonic()  # our last heartbeat the server took
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.changed = asyncio.Event()  # set after every tick that changed what this replica holds

    def _member_key(self, replica: str) -> str:
        return f"{self.group}.{replica}"

    def _owner_key(self, partition: int) -> str:
        return f"{self.group}.{partition}"

    async def start(self) -> None:
        """Take this replica's share now (a replica starting alone consumes before its start
        returns), then keep it up to date in the background."""
        loaded = [asyncio.Event(), asyncio.Event()]
        self._tasks = [
            asyncio.create_task(self._watch(self.members_kv, self._on_member, loaded[0]),
                                name=f"partitions:{self.group}:members"),
            asyncio.create_task(self._watch(self.owners_kv, self._on_owner, loaded[1]),
                                name=f"partitions:{self.group}:owners"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in loaded)), self.ttl)
        await self._beat()
        self._tasks.append(asyncio.create_task(self._heartbeat(), name=f"partitions:{self.group}:heartbeat"))
        await self._tick_once()
        self._tasks.append(asyncio.create_task(self._run(), name=f"partitions:{self.group}"))

    async def _watch(self, kv: KeyValue, apply: Callable[[KeyValue.Entry, bool], None],
                     loaded: asyncio.Event) -> None:
        while not self._stopped.is_set():
            try:
                watcher = await kv.watch(f"{self.group}.*")
                current = True  # the values there when the watch began, until its end marker
                try:
                    async for entry in watcher:
                        if entry is None:  # the current values are in
                            current = False
                            loaded.set()
                        else:
                            apply(entry, current)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the watch starts again
                log.warning("watching the partitions of %s: %s", self.group, exc)
                await asyncio.sleep(self.tick)

    def _on_member(self, entry: KeyValue.Entry, current: bool) -> None:
        member = entry.key[len(self._member_key("")):]
        if entry.operation in ("DEL", "PURGE"):
            self._heard.pop(member, None)
            return
        heard = time.monotonic()
        if current and entry.created is not None:
            # A value written before we watched: as old as the server says. Only then — a
            # heartbeat arriving live was just written, and comparing the server's clock with
            # ours would let a skew of a few seconds make every member look dead.
            age = time.time() - entry.created.timestamp()  # type: ignore[attr-defined]
            heard -= min(max(age, 0.0), self.ttl)
        self._heard[member] = heard

    def _on_owner(self, entry: KeyValue.Entry, _current: bool) -> None:
        suffix = entry.key[len(self.group) + 1:]
        if not suffix.isdecimal():
            return
        partition = int(suffix)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._owners.pop(partition, None)
            return
        owner = entry.value.decode()
        self._owners[partition] = (owner, entry.revision or 0)
        if partition in self.owned and owner != self.replica:
            self._lost(partition)  # taken over: we were thought dead

    async def stop(self) -> None:
        """Give every partition back (release hooks first, then the owner keys and the heartbeat,
        so that the other members take them over at their next tick rather than after the TTL)."""
        self._stopped.set()
        await cancel_and_wait(self._tasks)
        for partition in list(self.owned):
            if partition not in self._releasing:
                self._releasing[partition] = asyncio.create_task(self.release(partition))
        for partition, task in list(self._releasing.items()):
            with contextlib.suppress(Exception):
                await task
            await self._give_back(partition)
        self._releasing.clear()
        with contextlib.suppress(Exception):
            await self.members_kv.delete(self._member_key(self.replica))

    async def _heartbeat(self) -> None:
        """Beat every tick in a task of its own: a slow acquire hook (a partition's rows loaded,
        its consumer created while NATS elects a leader) must not let our entry expire, or the
        others would take over partitions we still consume."""
        while not self._stopped.is_set():
            await asyncio.sleep(self.tick)
            await self._beat()

    async def _beat(self) -> None:
        try:
            await self.members_kv.put(self._member_key(self.replica), b"")
            self._beat_at = time.monotonic()
        except asyncio.CancelledError:
            raise
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("heartbeat of %s: %s", self.group, exc)
        except Exception:  # the loop must go on: its lapse check is what gives partitions up
            log.exception("heartbeat of %s failed", self.group)
        if time.monotonic() - self._beat_at > self.ttl * 0.75:
            # Our heartbeat has not reached the server for most of the TTL: the others may be
            # taking our partitions over.
            for partition in list(self.owned):
                self._lost(partition)

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
        except Exception:
            log.exception("partition leases of %s failed", self.group)

    async def step(self) -> None:
        """One tick: settle releases, give up what is no longer ours, take what is (the heartbeat
        runs on its own)."""
        before = set(self.owned)
        self.members = sorted({*self._live_members(), self.replica})
        wanted = assignment(self.members, self.partitions)[self.replica]
        for partition, task in list(self._releasing.items()):
            if task.done():
                del self._releasing[partition]
                await self._give_back(partition)
        # A give-back whose delete failed (NATS away, a leader election): the key still names us
        # and the partition's new owner waits for it; delete it again.
        for partition, (owner, revision) in list(self._owners.items()):
            if owner == self.replica and partition not in self.owned and partition not in self._releasing:
                with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    await self.owners_kv.delete(self._owner_key(partition), last=revision)
        given_up = sorted(set(self.owned) - wanted - set(self._releasing))
        for partition in given_up:
            self._releasing[partition] = asyncio.create_task(self.release(partition))
        taken = []
        for partition in sorted(wanted - set(self.owned) - set(self._releasing)):
            took_over = await self._claim(partition)
            if took_over is None:
                continue
            taking = _TAKING.set(Lease(self.group, partition, self.replica, self.owned[partition], self))
            try:
                await self.acquire(partition, took_over)
            except Exception:
                # Not consumed, so not ours: give it back, and try again at a next tick.
                log.exception("taking partition %d of %s failed", partition, self.group)
                await self._give_back(partition)
                continue
            finally:
                _TAKING.reset(taking)
            if partition not in self.owned:
                # Lost while being taken (taken over, or our heartbeat lapsed): its release may
                # have run before the acquire started consuming; run it again now.
                lost = self._releasing.get(partition)
                if lost is not None:
                    await asyncio.wait([lost])
                self._releasing[partition] = asyncio.create_task(self.release(partition))
                continue
            taken.append(partition)
        if given_up or taken:
            log.info("%s: consuming partitions %s (took %s, giving up %s; %d replicas)", self.group,
                     sorted(set(self.owned) - set(self._releasing)), taken, given_up, len(self.members),
                     extra=log_fields(group=self.group, taken=taken, given_up=given_up, replicas=len(self.members)))
        if set(self.owned) != before:
            self.changed.set()

    def _live_members(self) -> list[str]:
        horizon = time.monotonic() - self.ttl
        return [member for member, heard in self._heard.items() if heard >= horizon]

    async def _claim(self, partition: int) -> bool | None:
        """Own `partition`: None when not (now), else whether it was taken over from an owner
        that did not give it back."""
        key = self._owner_key(partition)
        current = self._owners.get(partition)
        try:
            if current is None:
                revision = await self.owners_kv.create(key, self.replica.encode())
                took_over = False
            elif current[0] != self.replica and (current[0] in self._live_members()
                                                  or await self._beating(current[0])):
                return None  # its owner lets it go at its next tick
            else:
                # Its owner stopped beating (checked at the server, not only in our watched
                # view), or it is ours from before a restart under the same id: a written
                # compare-and-set either way, so a stale view cannot make two owners.
                revision = await self.owners_kv.update(key, self.replica.encode(), last=current[1])
                took_over = True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            return None  # someone else was quicker, or our view is behind: next tick
        self.owned[partition] = revision
        self._owners[partition] = (self.replica, revision)
        return took_over

    async def _beating(self, member: str) -> bool:
        """Whether `member`'s heartbeat is still in the bucket (our watcher may have gone stale)."""
        try:
            await self.members_kv.get(self._member_key(member))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False
        self._heard[member] = time.monotonic()
        return True

    def _lost(self, partition: int) -> None:
        log.warning("lost partition %d of %s", partition, self.group,
                    extra=log_fields(group=self.group, partition=partition))
        self.owned.pop(partition, None)
        if partition not in self._releasing:
            self._releasing[partition] = asyncio.create_task(self.release(partition))
        self.changed.set()

    async def _give_back(self, partition: int) -> None:
        revision = self.owned.pop(partition, None)
        if revision is None:
            return
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await self.owners_kv.delete(self._owner_key(partition), last=revision)
