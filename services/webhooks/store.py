"""The `webhooks` database: one row per (webhook, event) delivery, pending until delivered or failed.

Writes go through `GroupWriter`, which runs every write waiting at the same moment in one
transaction, so a burst of events costs one commit, not one per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from services.webhooks.handlers import NewDelivery, PendingDelivery
from shared.messages.conversation import Erasure
from shared.store import open_db, truncate_wal

log = logging.getLogger(__name__)
T = TypeVar("T")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

MIGRATIONS = [
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
]

WriteOp = Callable[[aiosqlite.Connection], Awaitable[Any]]


class GroupWriter:
    """Serializes writes and commits the ones queued together in one transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._queue: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._checkpoints: list[asyncio.Future[bool]] = []

    def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._run(), name="webhooks:writer")

    async def run(self, op: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `op` inside the next group transaction; returns once it is committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let every coroutine that is about to write queue its op first.
            await asyncio.sleep(0)
            ops, self._queue = self._queue, []
            if ops:
                await self._commit_group(ops)
            if self._checkpoints:
                await self._checkpoint()

    async def checkpoint(self) -> bool:
        """Truncate the write-ahead log between two group transactions (see `truncate_wal`)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._checkpoints.append(future)
        self._wake.set()
        return await future

    async def _checkpoint(self) -> None:
        waiting, self._checkpoints = self._checkpoints, []
        try:
            done = await truncate_wal(self.db)
        except Exception:
            log.exception("webhooks store checkpoint failed")
            done = False
        for future in waiting:
            if not future.done():
                future.set_result(done)

    async def _commit_group(self, ops: list[tuple[WriteOp, asyncio.Future[Any]]]) -> None:
        self._current = ops
        try:
            results = await self._transaction([op for op, _ in ops])
        except Exception as exc:
            if len(ops) > 1:
                # One bad op must not fail the others: run them one by one.
                for single in ops:
                    await self._commit_group([single])
                return
            log.exception("webhooks store write failed")
            if not ops[0][1].done():
                ops[0][1].set_exception(exc)
            return
        finally:
            self._current = []
        for (_, future), result in zip(ops, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _transaction(self, ops: Sequence[WriteOp]) -> list[Any]:
        await self.db.execute("BEGIN")
        try:
            results = [await op(self.db) for op in ops]
            await self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await self.db.execute("ROLLBACK")
            raise
        return results

    async def stop(self) -> None:
        """Stop the writer; queued writes that did not start are dropped (their rows stay as they were)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for _, future in [*self._current, *self._queue]:
            if not future.done():
                future.cancel()
        for checkpoint in self._checkpoints:
            checkpoint.cancel()
        self._queue = []
        self._current = []
        self._checkpoints = []


_INSERT = (
    "INSERT INTO deliveries (webhook_id, app_id, event_id, conversation_id, trigger_name, body, traceparent,"
    " tracestate, status, attempts, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)"
    " ON CONFLICT (webhook_id, event_id) DO NOTHING RETURNING seq"
)

_PENDING_COLUMNS = (
    "seq, webhook_id, app_id, event_id, conversation_id, body, traceparent, tracestate, created_at,"
    " next_attempt_at, attempts, first_attempt_at"
)


class DeliveryStore:
    """Reads and writes of the deliveries table."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.writer = GroupWriter(db)

    @classmethod
    async def open(cls, path: str) -> DeliveryStore:
        """Open (and migrate) the database and start the group writer."""
        store = cls(await open_db(path, MIGRATIONS))
        store.writer.start()
        return store

    async def close(self) -> None:
        """Stop writing and close the database."""
        await self.writer.stop()
        await self.db.close()

    async def insert(self, rows: Sequence[NewDelivery]) -> list[PendingDelivery]:
        """Store rows (all or none); returns the ones that were new, in order.

        A row whose (webhook, event) is already stored is skipped: a redelivered event never
        becomes a second delivery.
        """
        async def op(db: aiosqlite.Connection) -> list[PendingDelivery]:
            created: list[PendingDelivery] = []
            for row in rows:
                async with db.execute(_INSERT, (
                    row.webhook_id, row.app_id, row.event_id, row.conversation_id, row.trigger, row.body,
                    row.traceparent, row.tracestate, row.created_at, row.created_at,
                )) as cursor:
                    found = await cursor.fetchone()
                if found is not None:
                    created.append(PendingDelivery(
                        seq=int(found[0]), webhook_id=row.webhook_id, app_id=row.app_id, event_id=row.event_id,
                        conversation_id=row.conversation_id, body=row.body, traceparent=row.traceparent,
                        tracestate=row.tracestate, created_at=row.created_at, next_attempt_at=row.created_at,
                    ))
            return created

        return await self.writer.run(op)

    async def load_pending(self) -> list[PendingDelivery]:
        """Every pending row in insertion order (to resume after a restart)."""
        async with self.db.execute(
            f"SELECT {_PENDING_COLUMNS} FROM deliveries WHERE status = 'pending' ORDER BY seq"
        ) as cursor:
            found = await cursor.fetchall()
        return [
            PendingDelivery(
                seq=int(r[0]), webhook_id=r[1], app_id=r[2], event_id=r[3], conversation_id=r[4], body=bytes(r[5]),
                traceparent=r[6], tracestate=r[7], created_at=float(r[8]), next_attempt_at=float(r[9]),
                attempts=int(r[10]), first_attempt_at=None if r[11] is None else float(r[11]),
            )
            for r in found
        ]

    async def record_outcome(self, delivered: Sequence[PendingDelivery], failed: Sequence[PendingDelivery],
                             retried: Sequence[PendingDelivery], now: float, status: int | None,
                             error: str | None) -> None:
        """Persist the result of one attempt for the rows it carried."""
        async def op(db: aiosqlite.Connection) -> None:
            if delivered:
                await db.executemany(
                    "UPDATE deliveries SET status = 'delivered', attempts = ?, first_attempt_at = ?,"
                    " finished_at = ?, last_status = ?, last_error = NULL WHERE seq = ?",
                    [(r.attempts, r.first_attempt_at, now, status, r.seq) for r in delivered])
            if failed:
                await db.executemany(
                    "UPDATE deliveries SET status = 'failed', attempts = ?, first_attempt_at = ?,"
                    " finished_at = ?, last_status = ?, last_error = ? WHERE seq = ?",
                    [(r.attempts, r.first_attempt_at, now, status, error, r.seq) for r in failed])
            if retried:
                await db.executemany(
                    "UPDATE deliveries SET attempts = ?, first_attempt_at = ?, next_attempt_at = ?,"
                    " last_status = ?, last_error = ? WHERE seq = ?",
                    [(r.attempts, r.first_attempt_at, r.next_attempt_at, status, error, r.seq) for r in retried])

        await self.writer.run(op)

    async def counts(self) -> dict[str, int]:
        """Rows per status."""
        result = {PENDING: 0, DELIVERED: 0, FAILED: 0}
        async with self.db.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status") as cursor:
            for status, count in await cursor.fetchall():
                result[str(status)] = int(count)
        return result

    async def prune(self, finished_before: float) -> dict[str, int]:
        """Delete delivered and failed rows finished before `finished_before`; counts removed per status."""
        async def op(db: aiosqlite.Connection) -> dict[str, int]:
            removed: dict[str, int] = {}
            for status in (DELIVERED, FAILED):
                cursor = await db.execute(
                    "DELETE FROM deliveries WHERE status = ? AND finished_at < ?", (status, finished_before))
                removed[status] = max(0, cursor.rowcount)
                await cursor.close()
            return removed

        return await self.writer.run(op)

    async def forget(self, erasure: Erasure) -> dict[str, int]:
        """Delete the rows a privacy event names (every status, or only finished ones), then
        truncate the log so their bytes leave the disk; counts removed per status."""
        keys = [*erasure.conversation_ids, *([erasure.user_id] if erasure.user_id else [])]
        if not keys:
            return {}
        where = f"conversation_id IN ({','.join('?' * len(keys))})"
        params: list[Any] = list(keys)
        if erasure.before is not None:
            where += " AND created_at < ?"
            params.append(erasure.before)
        if erasure.delivered_only:
            where += " AND status <> 'pending'"

        async def op(db: aiosqlite.Connection) -> dict[str, int]:
            removed: dict[str, int] = {}
            async with db.execute(f"SELECT status, COUNT(*) FROM deliveries WHERE {where} GROUP BY status",
                                  params) as cursor:
                for status, count in await cursor.fetchall():
                    removed[str(status)] = int(count)
            await db.execute(f"DELETE FROM deliveries WHERE {where}", params)
            return removed

        removed = await self.writer.run(op)
        if removed:
            await self.writer.checkpoint()
        return removed

    async def delivery(self, webhook_id: str, event_id: str) -> dict[str, Any] | None:
        """One row as a dict (for diagnostics and tests)."""
        async with self.db.execute(
            "SELECT seq, webhook_id, event_id, conversation_id, status, attempts, last_status, last_error"
            " FROM deliveries WHERE webhook_id = ? AND event_id = ?", (webhook_id, event_id),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else dict(row)

    async def count_for_webhook(self, webhook_id: str) -> int:
        """Rows stored for one webhook, whatever their status."""
        async with self.db.execute("SELECT COUNT(*) FROM deliveries WHERE webhook_id = ?", (webhook_id,)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0
