"""Fencing a consumer group's writes with the epoch of each partition's take (`shared.partitions`).

A service whose writes must not outlive its lease keeps, in its own database, each partition's
latest epoch (`EPOCHS_TABLE`). Taking a partition (`take`, in the group's acquire hook) stores
the take's epoch, only ever raising the stored one, before the take reads the partition's state;
every write of the partition then checks, in its own transaction, that the stored epoch is still
its take's (`check_fence`: `StaleEpoch` if not, nothing written). The check holds the partition's
entry until the commit (SQLite's write transaction holds the file; PostgreSQL a share lock on the
row), so a take waits for the writes in hand, and then reads them. A replica stalled past its
lease can then write nothing of a partition from the moment another replica took it over.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from shared.db import Connection, Database, verified_in
from shared.partitions import Lease, lease_being_taken
from shared.telemetry import log_fields

log = logging.getLogger(__name__)

# The migration step that creates the epochs table (one per service database).
EPOCHS_TABLE: Final = """
    CREATE TABLE partition_epochs (
        part INTEGER NOT NULL PRIMARY KEY,
        epoch INTEGER NOT NULL
    )
    """

_RAISE_EPOCH = (
    "INSERT INTO partition_epochs (part, epoch) VALUES ($1, $2)"
    " ON CONFLICT (part) DO UPDATE SET epoch = excluded.epoch WHERE partition_epochs.epoch < excluded.epoch"
)
_EPOCH = "SELECT epoch FROM partition_epochs WHERE part = $1"
# Held until the commit: a take's raise of the epoch waits for the writes in hand.
_EPOCH_LOCKED = {"sqlite": _EPOCH, "postgres": _EPOCH + " FOR SHARE"}


class StaleEpoch(Exception):
    """A write for a partition that a later take (another replica's, while this one was stalled
    past its lease) holds now: its epoch is stored, this writer's is older. Nothing was written."""

    def __init__(self, partition: int, epoch: int, stored: int | None) -> None:
        super().__init__(f"partition {partition} was taken over: this replica's epoch is {epoch},"
                         f" the partition's {stored}")
        self.partition = partition
        self.epoch = epoch
        self.stored = stored


async def check_fence(tx: Connection, fence: Mapping[int, int]) -> None:
    """StaleEpoch unless every partition's stored epoch is still the writer's (`fence`: partition
    → the epoch of the writer's take); holds the entries until the commit. A group commit's writes
    of one partition check it once."""
    query = _EPOCH_LOCKED[tx.engine]
    verified = verified_in(tx)
    for partition in sorted(fence):
        fact = ("epoch", partition, fence[partition])
        if fact in verified:
            continue
        stored = await tx.fetchval(query, partition)
        if stored is None or int(stored) != fence[partition]:
            raise StaleEpoch(partition, fence[partition], None if stored is None else int(stored))
        verified.add(fact)


async def raise_epoch(db: Database, partition: int, epoch: int) -> int:
    """A take of `partition` under `epoch`: stored unless a greater one is (the stored epoch only
    rises), before the take reads the partition's state. Returns the stored epoch: `epoch`, or a
    greater one (a later take's, or one of an owners bucket made anew). Waits for another
    replica's writes of the partition in hand: what is read next includes them."""
    async with db.transaction() as tx:
        await tx.execute(_RAISE_EPOCH, partition, epoch)
        return int(await tx.fetchval(_EPOCH, partition))


async def replace_epoch(db: Database, partition: int, epoch: int, stored: int) -> bool:
    """Store `epoch` for `partition` in place of `stored` (greater), if that is still the one
    stored: for a take whose owners bucket was made anew (its revisions started again)."""
    async with db.transaction() as tx:
        return await tx.execute("UPDATE partition_epochs SET epoch = $1 WHERE part = $2 AND epoch = $3",
                                epoch, partition, stored) == 1


async def take(db: Database, partition: int) -> Lease:
    """In an acquire hook: fence `partition` with the epoch of the take being made, and return
    the take. StaleEpoch when a later take's epoch is stored already.

    A greater epoch stored than this take's is a later take's (this one is stale), or one of an
    owners bucket since made anew, whose revisions started again: only in the second case is the
    owner entry still this take's, and rewritten (`Lease.reaffirm`), its fresh epoch replaces
    the stored one."""
    lease = lease_being_taken(partition)
    stored = await raise_epoch(db, partition, lease.epoch)
    if stored == lease.epoch:
        return lease
    renewed = await lease.reaffirm()
    if renewed is None or not await replace_epoch(db, partition, renewed.epoch, stored):
        raise StaleEpoch(partition, lease.epoch, stored)
    log.warning("partition %d of %s: the stored epoch (%d) is ahead of the owners bucket (%d), which was"
                " made anew: the partition is fenced from that bucket's epochs on", partition, lease.group, stored,
                renewed.epoch, extra=log_fields(partition=partition))
    return renewed
