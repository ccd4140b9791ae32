"""The `webhooks` database: one row per (webhook, event) delivery, pending until delivered or failed.

Writes go through `shared.db.GroupCommit`: every write handed in during one turn of the loop
runs in one transaction, so a burst of events costs one commit (on SQLite with no thread hop
per statement).

The rows of a conversation are written by the replica holding its partition, fenced by the
epoch of its take (`shared.fencing`): a take raises the partition's stored epoch before it loads
the partition's pending rows, and a write given `epochs` checks in its own transaction that the
stored epoch of each partition it writes is still the writer's (`StaleEpoch` if not, nothing
written).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from services.webhooks.handlers import NewDelivery, PendingDelivery
from shared import fencing, subjects
from shared.db import Connection, Database, DatabaseSettings, GroupCommit, Migration, open_database
from shared.messages.conversation import Erasure

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


async def _partition_pending(tx: Connection) -> None:
    """Pending rows get their conversation's partition under today's count (rows from before
    partitioning, or from a deployment with another count; only pending rows are ever read by
    partition): run at every start, it writes only the rows whose partition changed."""
    rows = await tx.fetch("SELECT seq, conversation_id, part FROM deliveries WHERE status = 'pending'")
    moved = [(part, r[0]) for r in rows if (part := subjects.partition_of(r[1])) != r[2]]
    if moved:
        await tx.executemany("UPDATE deliveries SET part = $1 WHERE seq = $2", moved)


MIGRATION = Migration([
    """
    CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        trigger_name TEXT NOT NULL,
        body BLOB NOT NULL,
        traceparent TEXT,
        tracestate TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        first_attempt_at REAL,
        next_attempt_at REAL NOT NULL,
        finished_at REAL,
        last_status INTEGER,
        last_error TEXT,
        UNIQUE (webhook_id, event_id)
    );
    CREATE INDEX deliveries_status_seq ON deliveries (status, seq);
    CREATE INDEX deliveries_finished_at ON deliveries (finished_at)
    """,
    # The replica that holds a conversation's partition delivers its rows (shared.partitions).
    """
    ALTER TABLE deliveries ADD COLUMN part INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX deliveries_part_pending ON deliveries (part, seq) WHERE status = 'pending'
    """,
    _partition_pending,
    # The fence of each partition's writes: the epoch of its latest take (shared.fencing).
    fencing.EPOCHS_TABLE,
    # When the event happened (an erasure's `before` is in that clock); rows from before have none.
    "ALTER TABLE deliveries ADD COLUMN event_at REAL",
])

_INSERT = (
    "INSERT INTO deliveries (webhook_id, app_id, event_id, conversation_id, trigger_name, body, traceparent,"
    " tracestate, status, attempts, created_at, next_attempt_at, part, event_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', 0, $9, $9, $10, $11)"
    " ON CONFLICT (webhook_id, event_id) DO NOTHING RETURNING seq"
)

_PENDING_COLUMNS = (
    "seq, webhook_id, app_id, event_id, conversation_id, body, traceparent, tracestate, created_at,"
    " next_attempt_at, attempts, first_attempt_at, event_at"
)

def fence_of(conversation_ids: Iterable[str], epochs: Mapping[int, int] | None) -> dict[int, int]:
    """The epochs to check for writing rows of these conversations: those of their partitions
    found in `epochs` (a partition not there is written unfenced: a leftover durable's message,
    drained by whichever replica holds partition 0)."""
    if not epochs:
        return {}
    return {p: epochs[p] for p in {subjects.partition_of(c) for c in conversation_ids} if p in epochs}


class DeliveryStore:
    """Reads and writes of the deliveries table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.writes = GroupCommit(db)

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> DeliveryStore:
        """Open (and migrate) the service's database; pending rows follow the partition count."""
        return cls(await open_database(settings, MIGRATION, at_start=_partition_pending))

    async def close(self) -> None:
        """Close the database (a write handed in later fails)."""
        await self.db.close()

    async def insert(self, rows: Sequence[NewDelivery], epochs: Mapping[int, int] | None = None,
                     ) -> list[PendingDelivery]:
        """Store rows (all or none); returns the ones that were new, in order.

        A row whose (webhook, event) is already stored is skipped: a redelivered event never
        becomes a second delivery. `epochs` (partition → the epoch of this replica's take) fence
        the rows of those partitions: StaleEpoch, nothing stored, if a later take's is stored.
        """
        fence = fence_of((row.conversation_id for row in rows), epochs)

        async def op(tx: Connection) -> list[PendingDelivery]:
            if fence:
                await fencing.check_fence(tx, fence)
            created: list[PendingDelivery] = []
            for row in rows:
                seq = await tx.fetchval(
                    _INSERT, row.webhook_id, row.app_id, row.event_id, row.conversation_id, row.trigger, row.body,
                    row.traceparent, row.tracestate, row.created_at, subjects.partition_of(row.conversation_id),
                    row.event_at)
                if seq is not None:
                    created.append(PendingDelivery(
                        seq=int(seq), webhook_id=row.webhook_id, app_id=row.app_id, event_id=row.event_id,
                        conversation_id=row.conversation_id, body=row.body, traceparent=row.traceparent,
                        tracestate=row.tracestate, created_at=row.created_at, next_attempt_at=row.created_at,
                        event_at=row.event_at,
                    ))
            return created

        return await self.writes.run(op)

    async def load_pending(self, partition: int) -> list[PendingDelivery]:
        """The pending rows of one partition's conversations in insertion order (to resume them
        when this replica takes the partition)."""
        found = await self.db.fetch(
            f"SELECT {_PENDING_COLUMNS} FROM deliveries WHERE status = 'pending' AND part = $1 ORDER BY seq",
            partition)
        return [
            PendingDelivery(
                seq=int(r[0]), webhook_id=r[1], app_id=r[2], event_id=r[3], conversation_id=r[4], body=bytes(r[5]),
                traceparent=r[6], tracestate=r[7], created_at=float(r[8]), next_attempt_at=float(r[9]),
                attempts=int(r[10]), first_attempt_at=None if r[11] is None else float(r[11]),
                event_at=None if r[12] is None else float(r[12]),
            )
            for r in found
        ]

    async def record_outcome(self, delivered: Sequence[PendingDelivery], failed: Sequence[PendingDelivery],
                             retried: Sequence[PendingDelivery], now: float, status: int | None,
                             error: str | None, epochs: Mapping[int, int] | None = None) -> None:
        """Persist the result of one attempt for the rows it carried (fenced by `epochs` as
        `insert` is: StaleEpoch, nothing written, if a partition of the rows was taken over)."""
        fence = fence_of((r.conversation_id for r in (*delivered, *failed, *retried)), epochs)

        async def op(tx: Connection) -> None:
            if fence:
                await fencing.check_fence(tx, fence)
            if delivered:
                await tx.executemany(
                    "UPDATE deliveries SET status = 'delivered', attempts = $1, first_attempt_at = $2,"
                    " finished_at = $3, last_status = $4, last_error = NULL WHERE seq = $5",
                    [(r.attempts, r.first_attempt_at, now, status, r.seq) for r in delivered])
            if failed:
                await tx.executemany(
                    "UPDATE deliveries SET status = 'failed', attempts = $1, first_attempt_at = $2,"
                    " finished_at = $3, last_status = $4, last_error = $5 WHERE seq = $6",
                    [(r.attempts, r.first_attempt_at, now, status, error, r.seq) for r in failed])
            if retried:
                await tx.executemany(
                    "UPDATE deliveries SET attempts = $1, first_attempt_at = $2, next_attempt_at = $3,"
                    " last_status = $4, last_error = $5 WHERE seq = $6",
                    [(r.attempts, r.first_attempt_at, r.next_attempt_at, status, error, r.seq) for r in retried])

        await self.writes.run(op)

    async def counts(self) -> dict[str, int]:
        """Rows per status."""
        result = {PENDING: 0, DELIVERED: 0, FAILED: 0}
        for status, count in await self.db.fetch("SELECT status, COUNT(*) FROM deliveries GROUP BY status"):
            result[str(status)] = int(count)
        return result

    async def prune(self, finished_before: float) -> dict[str, int]:
        """Delete delivered and failed rows finished before `finished_before`; counts removed per status."""
        async def op(tx: Connection) -> dict[str, int]:
            return {status: await tx.execute("DELETE FROM deliveries WHERE status = $1 AND finished_at < $2",
                                             status, finished_before)
                    for status in (DELIVERED, FAILED)}

        return await self.writes.run(op)

    async def forget(self, erasure: Erasure) -> dict[str, int]:
        """Delete the rows a privacy event names (every status, or only finished ones), then
        make their bytes unreadable where the engine allows; counts removed per status."""
        keys = [*erasure.conversation_ids, *([erasure.user_id] if erasure.user_id else [])]
        if not keys:
            return {}
        where = f"conversation_id IN ({','.join(f'${i}' for i in range(1, len(keys) + 1))})"
        params: list[Any] = list(keys)
        if erasure.message is not None:  # one message: the deliveries of its event, whatever their status
            params.append(erasure.message.event_id)
            where += f" AND event_id = ${len(params)}"
        elif erasure.before is not None:
            # By the event's time: a row this service created after `before` (it read the event
            # late) is still a copy of what happened before it.
            params.append(erasure.before)
            where += f" AND COALESCE(event_at, created_at) < ${len(params)}"
        if erasure.delivered_only:
            where += " AND status <> 'pending'"

        async def op(tx: Connection) -> dict[str, int]:
            removed: dict[str, int] = {}
            for status, count in await tx.fetch(
                    f"SELECT status, COUNT(*) FROM deliveries WHERE {where} GROUP BY status", *params):
                removed[str(status)] = int(count)
            await tx.execute(f"DELETE FROM deliveries WHERE {where}", *params)
            return removed

        removed = await self.writes.run(op)
        if removed:
            await self.db.erase_freed_pages()
        return removed

    async def delivery(self, webhook_id: str, event_id: str) -> dict[str, Any] | None:
        """One row as a dict (for diagnostics and tests)."""
        row = await self.db.fetchrow(
            "SELECT seq, webhook_id, event_id, conversation_id, status, attempts, last_status, last_error"
            " FROM deliveries WHERE webhook_id = $1 AND event_id = $2", webhook_id, event_id)
        return None if row is None else dict(row)

    async def count_for_webhook(self, webhook_id: str) -> int:
        """Rows stored for one webhook, whatever their status."""
        return int(await self.db.fetchval("SELECT COUNT(*) FROM deliveries WHERE webhook_id = $1", webhook_id))
