"""The `webhooks` database: one row per (webhook, event) delivery, pending until delivered or failed.

Writes go through `shared.store.GroupCommit` on a plain sqlite3 connection: every write handed
in during one turn of the loop runs in one transaction on the event loop thread, so a burst of
events costs one commit and no thread hop per statement.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

from services.webhooks.handlers import NewDelivery, PendingDelivery
from shared.messages.conversation import Erasure
from shared.store import GroupCommit, open_db, open_hot_connection, truncate_wal

log = logging.getLogger(__name__)

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

    def __init__(self, db: aiosqlite.Connection, hot: sqlite3.Connection) -> None:
        self.db = db
        self.hot = hot
        self.lock = asyncio.Lock()
        self.writes = GroupCommit(hot, self.lock)

    @classmethod
    async def open(cls, path: str) -> DeliveryStore:
        """Open (and migrate) the database."""
        db = await open_db(path, MIGRATIONS)
        return cls(db, open_hot_connection(path))

    async def close(self) -> None:
        """Close the database (a write handed in later fails)."""
        async with self.lock:
            self.hot.close()
        await self.db.close()

    async def checkpoint(self) -> bool:
        """Truncate the write-ahead log between two group transactions (see `truncate_wal`)."""
        async with self.lock:
            return await truncate_wal(self.db)

    async def insert(self, rows: Sequence[NewDelivery]) -> list[PendingDelivery]:
        """Store rows (all or none); returns the ones that were new, in order.

        A row whose (webhook, event) is already stored is skipped: a redelivered event never
        becomes a second delivery.
        """
        def op(hot: sqlite3.Connection) -> list[PendingDelivery]:
            created: list[PendingDelivery] = []
            for row in rows:
                found = hot.execute(_INSERT, (
                    row.webhook_id, row.app_id, row.event_id, row.conversation_id, row.trigger, row.body,
                    row.traceparent, row.tracestate, row.created_at, row.created_at,
                )).fetchone()
                if found is not None:
                    created.append(PendingDelivery(
                        seq=int(found[0]), webhook_id=row.webhook_id, app_id=row.app_id, event_id=row.event_id,
                        conversation_id=row.conversation_id, body=row.body, traceparent=row.traceparent,
                        tracestate=row.tracestate, created_at=row.created_at, next_attempt_at=row.created_at,
                    ))
            return created

        return await self.writes.run(op)

    async def load_pending(self) -> list[PendingDelivery]:
        """Every pending row in insertion order (to resume after a restart)."""
        found = await self.db.execute_fetchall(
            f"SELECT {_PENDING_COLUMNS} FROM deliveries WHERE status = 'pending' ORDER BY seq")
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
        def op(hot: sqlite3.Connection) -> None:
            if delivered:
                hot.executemany(
                    "UPDATE deliveries SET status = 'delivered', attempts = ?, first_attempt_at = ?,"
                    " finished_at = ?, last_status = ?, last_error = NULL WHERE seq = ?",
                    [(r.attempts, r.first_attempt_at, now, status, r.seq) for r in delivered])
            if failed:
                hot.executemany(
                    "UPDATE deliveries SET status = 'failed', attempts = ?, first_attempt_at = ?,"
                    " finished_at = ?, last_status = ?, last_error = ? WHERE seq = ?",
                    [(r.attempts, r.first_attempt_at, now, status, error, r.seq) for r in failed])
            if retried:
                hot.executemany(
                    "UPDATE deliveries SET attempts = ?, first_attempt_at = ?, next_attempt_at = ?,"
                    " last_status = ?, last_error = ? WHERE seq = ?",
                    [(r.attempts, r.first_attempt_at, r.next_attempt_at, status, error, r.seq) for r in retried])

        await self.writes.run(op)

    async def counts(self) -> dict[str, int]:
        """Rows per status."""
        result = {PENDING: 0, DELIVERED: 0, FAILED: 0}
        for status, count in await self.db.execute_fetchall("SELECT status, COUNT(*) FROM deliveries GROUP BY status"):
            result[str(status)] = int(count)
        return result

    async def prune(self, finished_before: float) -> dict[str, int]:
        """Delete delivered and failed rows finished before `finished_before`; counts removed per status."""
        def op(hot: sqlite3.Connection) -> dict[str, int]:
            removed: dict[str, int] = {}
            for status in (DELIVERED, FAILED):
                cursor = hot.execute(
                    "DELETE FROM deliveries WHERE status = ? AND finished_at < ?", (status, finished_before))
                removed[status] = max(0, cursor.rowcount)
            return removed

        return await self.writes.run(op)

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

        def op(hot: sqlite3.Connection) -> dict[str, int]:
            removed: dict[str, int] = {}
            for status, count in hot.execute(f"SELECT status, COUNT(*) FROM deliveries WHERE {where} GROUP BY status",
                                             params).fetchall():
                removed[str(status)] = int(count)
            hot.execute(f"DELETE FROM deliveries WHERE {where}", params)
            return removed

        removed = await self.writes.run(op)
        if removed:
            await self.checkpoint()
        return removed

    async def delivery(self, webhook_id: str, event_id: str) -> dict[str, Any] | None:
        """One row as a dict (for diagnostics and tests)."""
        rows = await self.db.execute_fetchall(
            "SELECT seq, webhook_id, event_id, conversation_id, status, attempts, last_status, last_error"
            " FROM deliveries WHERE webhook_id = ? AND event_id = ?", (webhook_id, event_id))
        return next((dict(row) for row in rows), None)

    async def count_for_webhook(self, webhook_id: str) -> int:
        """Rows stored for one webhook, whatever their status."""
        rows = list(await self.db.execute_fetchall("SELECT COUNT(*) FROM deliveries WHERE webhook_id = ?",
                                                   (webhook_id,)))
        return int(rows[0][0]) if rows else 0
