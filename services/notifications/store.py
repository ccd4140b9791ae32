"""The notifications service's SQLite database: pending notifications, sends, reply windows, opt-ins.

A pending notification is one row per conversation, committed before the event that caused it
is acked, so it survives a crash or a restart; the timer fires the rows that fell due. A send
is recorded with the id its OutboundSend carried (its Nats-Msg-Id), so a restart between the
publish and the bookkeeping publishes the same id again and JetStream drops the duplicate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiosqlite

from services.notifications.limits import Counter, Refusal, retry_after
from services.notifications.policy import Pending, schedule
from shared.messages.conversation import Erasure
from shared.store import GroupCommit, open_db, open_hot_connection, transaction, truncate_wal, write_lock

MIGRATIONS = (
    """
    CREATE TABLE pending (
        conversation_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        conversation_type TEXT NOT NULL,
        user_id TEXT NOT NULL,
        notification_id TEXT NOT NULL,
        first_unread_at REAL NOT NULL,
        due_at REAL NOT NULL,
        unread_count INTEGER NOT NULL,
        last_message_id TEXT NOT NULL,
        last_text TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX pending_due ON pending (due_at);
    CREATE TABLE sends (
        id TEXT PRIMARY KEY,
        notification_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        conversation_type TEXT NOT NULL,
        user_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        recipient_info TEXT NOT NULL,
        kind TEXT NOT NULL,
        notice TEXT NOT NULL,
        status TEXT NOT NULL,
        error_code TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX sends_conversation ON sends (conversation_id, created_at);
    CREATE TABLE client_inbound (
        client_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        last_inbound_at REAL NOT NULL
    );
    CREATE TABLE optins (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        address TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        source_integration_id TEXT,
        status TEXT NOT NULL,
        code_hash TEXT,
        code_expires_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        linked INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        confirmed_at REAL,
        stopped_at REAL
    );
    CREATE INDEX optins_user ON optins (app_id, user_id, created_at)
    """,
    # Limits on sends to typed addresses (limits.py). `code_sent` = 0: an opt-in asked while a
    # code was pending for its address, for which nothing was sent (it can never be confirmed).
    """
    ALTER TABLE optins ADD COLUMN code_sent INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX optins_address ON optins (app_id, channel, address, status);
    CREATE TABLE limit_hits (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX limit_hits_key ON limit_hits (scope, key, at);
    CREATE INDEX limit_hits_at ON limit_hits (at)
    """,
    # The SDK client that typed the code (it proved it reads the address).
    """
    ALTER TABLE optins ADD COLUMN proven_by TEXT
    """,
    # The mailbox or phone an opt-in's address reaches, whatever its spelling or channel (a keyed
    # hash of limits.canonical_address): one pending code per destination, across apps.
    """
    ALTER TABLE optins ADD COLUMN destination TEXT;
    CREATE INDEX optins_destination ON optins (destination, status)
    """,
)


@dataclass(frozen=True)
class PendingRow:
    """A conversation's pending notification."""

    conversation_id: str
    app_id: str
    conversation_type: str
    user_id: str
    notification_id: str
    first_unread_at: float
    due_at: float
    unread_count: int
    last_message_id: str
    last_text: str
    attempts: int


@dataclass(frozen=True)
class SendRow:
    """One send made for a notification (or an opt-in code)."""

    id: str
    notification_id: str
    app_id: str
    conversation_id: str
    conversation_type: str
    user_id: str
    channel: str
    integration_id: str
    client_id: str
    recipient: str
    recipient_info: dict[str, Any]
    kind: str  # text | template | tagged | email | push | code
    notice: dict[str, Any]
    status: str  # published | sent | failed
    error_code: str | None


@dataclass(frozen=True)
class OptInRow:
    """A customer's opt-in to be notified at an address."""

    id: str
    app_id: str
    user_id: str
    conversation_id: str
    channel: str
    address: str
    integration_id: str
    source_integration_id: str | None
    status: str  # pending | confirmed | stopped
    code_hash: str | None
    code_expires_at: float | None
    attempts: int
    linked: bool
    created_at: float
    code_sent: bool = True
    proven_by: str | None = None
    destination: str | None = None


@dataclass(frozen=True)
class StartOutcome:
    """What `Store.start_optin` decided: `send` the code of `optin`; a code is already `pending`
    for the address (nothing to send; `optin` is the one to answer with); or `refused`."""

    kind: Literal["send", "pending", "refused"]
    optin: OptInRow | None = None
    refusal: Refusal | None = None


def _pending(row: aiosqlite.Row) -> PendingRow:
    return PendingRow(**{k: row[k] for k in row.keys()})


def _send(row: aiosqlite.Row) -> SendRow:
    return SendRow(
        id=row["id"], notification_id=row["notification_id"], app_id=row["app_id"],
        conversation_id=row["conversation_id"], conversation_type=row["conversation_type"], user_id=row["user_id"],
        channel=row["channel"], integration_id=row["integration_id"], client_id=row["client_id"],
        recipient=row["recipient"], recipient_info=json.loads(row["recipient_info"]), kind=row["kind"],
        notice=json.loads(row["notice"]), status=row["status"], error_code=row["error_code"])


def _optin(row: aiosqlite.Row) -> OptInRow:
    return OptInRow(
        id=row["id"], app_id=row["app_id"], user_id=row["user_id"], conversation_id=row["conversation_id"],
        channel=row["channel"], address=row["address"], integration_id=row["integration_id"],
        source_integration_id=row["source_integration_id"], status=row["status"], code_hash=row["code_hash"],
        code_expires_at=row["code_expires_at"], attempts=row["attempts"], linked=bool(row["linked"]),
        created_at=row["created_at"], code_sent=bool(row["code_sent"]), proven_by=row["proven_by"],
        destination=row["destination"])


@contextlib.asynccontextmanager
async def _immediate(db: aiosqlite.Connection) -> AsyncIterator[None]:
    """A write transaction that takes the database's write lock at BEGIN: replicas sharing the
    file run check-then-insert one at a time (a deferred BEGIN would let two both read "free")."""
    async with write_lock(db):
        await db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")


_NOTE_INBOUND = (
    "INSERT INTO client_inbound (client_id, app_id, user_id, last_inbound_at) VALUES (?,?,?,?)"
    " ON CONFLICT (client_id) DO UPDATE SET user_id=excluded.user_id,"
    " last_inbound_at=MAX(client_inbound.last_inbound_at, excluded.last_inbound_at)")


def _cancel(hot: sqlite3.Connection, conversation_id: str) -> bool:
    # Most customer messages have nothing pending: a read first spares the delete's write.
    if hot.execute("SELECT 1 FROM pending WHERE conversation_id=?", (conversation_id,)).fetchone() is None:
        return False
    return (hot.execute("DELETE FROM pending WHERE conversation_id=?", (conversation_id,)).rowcount or 0) > 0


class Store:
    """All of the service's SQL."""

    def __init__(self, db: aiosqlite.Connection, hot: sqlite3.Connection) -> None:
        self.db = db
        # What every customer message writes (a cancel and the reply window) goes through this
        # connection, a consumer batch per commit. Replicas sharing the file: its BEGIN IMMEDIATE
        # waits on the event loop thread for another replica's write, which lasts milliseconds.
        self.hot = hot
        self._group = GroupCommit(hot, write_lock(db))

    @classmethod
    async def open(cls, path: str) -> Store:
        """Open (and migrate) the database at `path`."""
        db = await open_db(path, MIGRATIONS)
        return cls(db, open_hot_connection(path))

    async def close(self) -> None:
        """Close the connections."""
        self.hot.close()
        await self.db.close()

    # A read runs to its end in one hop (an open SELECT's snapshot, once the hot connection has
    # committed, would make another coroutine's transaction on this connection unable to write).
    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        return list(await self.db.execute_fetchall(sql, params))  # type: ignore[arg-type]

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> aiosqlite.Row | None:
        return next(iter(await self.db.execute_fetchall(sql, params)), None)  # type: ignore[arg-type]

    # --- pending notifications ------------------------------------------------------------

    async def schedule(self, *, app_id: str, conversation_id: str, conversation_type: str, user_id: str,
                       message_id: str, text: str, at: float, delay: float, new_notification_id: str) -> PendingRow:
        """Fold a business message into the conversation's pending notification (one per conversation)."""
        async with transaction(self.db):
            row = await self._one("SELECT * FROM pending WHERE conversation_id=?", (conversation_id,))
            existing = None if row is None else _pending(row)
            if existing is not None and existing.last_message_id == message_id:
                return existing  # a redelivered event
            folded = schedule(None if existing is None else Pending(existing.first_unread_at, existing.due_at,
                                                                   existing.unread_count), at, delay)
            if existing is None:
                await self.db.execute(
                    "INSERT INTO pending (conversation_id, app_id, conversation_type, user_id, notification_id,"
                    " first_unread_at, due_at, unread_count, last_message_id, last_text) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (conversation_id, app_id, conversation_type, user_id, new_notification_id,
                     folded.first_unread_at, folded.due_at, folded.unread_count, message_id, text))
            else:
                await self.db.execute(
                    "UPDATE pending SET unread_count=?, last_message_id=?, last_text=? WHERE conversation_id=?",
                    (folded.unread_count, message_id, text, conversation_id))
            row = await self._one("SELECT * FROM pending WHERE conversation_id=?", (conversation_id,))
        assert row is not None
        return _pending(row)

    async def cancel(self, conversation_id: str) -> bool:
        """Drop the conversation's pending notification (the customer read it); True if there was one."""
        return await self._group.run(lambda hot: _cancel(hot, conversation_id))

    async def customer_wrote(self, conversation_id: str, client_id: str | None, app_id: str, user_id: str,
                             at: float) -> bool:
        """The customer wrote in the conversation, from `client_id` at `at`: its pending
        notification goes, and that channel's reply window opens (or is refreshed), in one group
        commit. True if a notification was pending."""

        def op(hot: sqlite3.Connection) -> bool:
            if client_id is not None:
                hot.execute(_NOTE_INBOUND, (client_id, app_id, user_id, at))
            return _cancel(hot, conversation_id)

        return await self._group.run(op)

    async def pending(self, conversation_id: str) -> PendingRow | None:
        """The conversation's pending notification, if any."""
        row = await self._one("SELECT * FROM pending WHERE conversation_id=?", (conversation_id,))
        return None if row is None else _pending(row)

    async def due(self, now: float, limit: int = 100) -> list[PendingRow]:
        """Pending notifications due at `now`, oldest first."""
        return [_pending(r) for r in await self._all(
            "SELECT * FROM pending WHERE due_at <= ? ORDER BY due_at LIMIT ?", (now, limit))]

    async def postpone(self, conversation_id: str, notification_id: str, due_at: float, *,
                       failed_attempt: bool = False) -> None:
        """Fire the notification later (quiet hours, an open socket, a dependency down)."""
        async with write_lock(self.db):
            await self.db.execute(
                "UPDATE pending SET due_at=?, attempts=attempts+? WHERE conversation_id=? AND notification_id=?",
                (due_at, 1 if failed_attempt else 0, conversation_id, notification_id))

    async def finish(self, conversation_id: str, notification_id: str, send: SendRow | None = None,
                     at: float = 0.0) -> None:
        """The notification was handled: record its send (if any) and drop the pending row, atomically."""
        async with transaction(self.db):
            if send is not None:
                await self._insert_send(send, at)
            await self.db.execute("DELETE FROM pending WHERE conversation_id=? AND notification_id=?",
                                  (conversation_id, notification_id))

    # --- sends ----------------------------------------------------------------------------

    async def _insert_send(self, send: SendRow, at: float) -> None:
        await self.db.execute(
            "INSERT INTO sends (id, notification_id, app_id, conversation_id, conversation_type, user_id, channel,"
            " integration_id, client_id, recipient, recipient_info, kind, notice, status, error_code, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO NOTHING",
            (send.id, send.notification_id, send.app_id, send.conversation_id, send.conversation_type, send.user_id,
             send.channel, send.integration_id, send.client_id, send.recipient, json.dumps(send.recipient_info),
             send.kind, json.dumps(send.notice), send.status, send.error_code, at, at))

    async def record_send(self, send: SendRow, at: float) -> None:
        """Record a send made outside a pending notification (an opt-in code, a template retry)."""
        async with write_lock(self.db):
            await self._insert_send(send, at)

    async def get_send(self, send_id: str) -> SendRow | None:
        """A send by the id its OutboundSend carried."""
        row = await self._one("SELECT * FROM sends WHERE id=?", (send_id,))
        return None if row is None else _send(row)

    async def set_send_status(self, send_id: str, status: str, error_code: str | None, at: float) -> bool:
        """Move a send to `status`; False when it already was there (a redelivered status)."""
        async with write_lock(self.db):
            cur = await self.db.execute(
                "UPDATE sends SET status=?, error_code=?, updated_at=? WHERE id=? AND status<>?",
                (status, error_code, at, send_id, status))
            return (cur.rowcount or 0) > 0

    async def sends(self, conversation_id: str) -> list[SendRow]:
        """The sends made for a conversation, oldest first."""
        return [_send(r) for r in await self._all(
            "SELECT * FROM sends WHERE conversation_id=? ORDER BY created_at, id", (conversation_id,))]

    # --- reply windows --------------------------------------------------------------------

    async def set_last_inbound(self, client_id: str, app_id: str, user_id: str, at: float) -> None:
        """Set the last inbound time as is (tests and operators moving a window)."""
        async with write_lock(self.db):
            await self.db.execute(
                "INSERT INTO client_inbound (client_id, app_id, user_id, last_inbound_at) VALUES (?,?,?,?)"
                " ON CONFLICT (client_id) DO UPDATE SET last_inbound_at=excluded.last_inbound_at",
                (client_id, app_id, user_id, at))

    async def last_inbound(self, client_id: str) -> float | None:
        """When the customer last wrote from `client_id`, if ever (as far as this service saw)."""
        row = await self._one("SELECT last_inbound_at FROM client_inbound WHERE client_id=?", (client_id,))
        return None if row is None else float(row[0])

    # --- opt-ins --------------------------------------------------------------------------

    async def _insert_optin(self, row: OptInRow) -> None:
        await self.db.execute(
            "INSERT INTO optins (id, app_id, user_id, conversation_id, channel, address, integration_id,"
            " source_integration_id, status, code_hash, code_expires_at, attempts, linked, created_at, code_sent,"
            " destination) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (row.id, row.app_id, row.user_id, row.conversation_id, row.channel, row.address, row.integration_id,
             row.source_integration_id, row.status, row.code_hash, row.code_expires_at, row.attempts,
             int(row.linked), row.created_at, int(row.code_sent), row.destination))

    async def start_optin(self, fresh: OptInRow, decoy_code_hash: str, *, starts: Sequence[Counter],
                          sends: Sequence[Counter], now: float, max_attempts: int) -> StartOutcome:
        """Decide an opt-in request atomically (one at a time across replicas sharing the database).

        The request counts against `starts` (refused when one is full). Then: the same user's
        live code for the address → that opt-in again (their code still works); another live
        code for the address → `fresh` is stored with `decoy_code_hash` and marked unsent (it
        answers like a real one and can never be confirmed); else the code counts against
        `sends` (refused when one is full) and `fresh` is stored: its code is to be sent.
        """
        async with _immediate(self.db):
            refusal = await self._over(starts, now)
            if refusal is not None:
                return StartOutcome("refused", refusal=refusal)
            await self._hit(starts, now)
            live = "status='pending' AND code_expires_at>? AND attempts<?"
            # Matched on the destination (any spelling, channel or app reaching that mailbox or phone).
            own = await self._one(
                f"SELECT * FROM optins WHERE app_id=? AND user_id=? AND channel=? AND destination=? AND {live}"
                " ORDER BY created_at DESC LIMIT 1",
                (fresh.app_id, fresh.user_id, fresh.channel, fresh.destination, now, max_attempts))
            if own is not None:
                return StartOutcome("pending", optin=_optin(own))
            other = await self._one(
                f"SELECT id FROM optins WHERE destination=? AND code_sent=1 AND {live} LIMIT 1",
                (fresh.destination, now, max_attempts))
            if other is not None:
                decoy = dataclasses.replace(fresh, code_hash=decoy_code_hash, code_sent=False)
                await self._insert_optin(decoy)
                return StartOutcome("pending", optin=decoy)
            refusal = await self._over(sends, now)
            if refusal is not None:
                return StartOutcome("refused", refusal=refusal)
            await self._hit(sends, now)
            await self._insert_optin(fresh)
            return StartOutcome("send", optin=fresh)

    async def expire_code(self, optin_id: str, at: float) -> None:
        """The code could not be sent: it no longer holds the address (a new request may send one)."""
        async with write_lock(self.db):
            await self.db.execute("UPDATE optins SET code_expires_at=? WHERE id=? AND status='pending'",
                                  (at, optin_id))

    async def optin(self, app_id: str, optin_id: str) -> OptInRow | None:
        """One opt-in of an app."""
        row = await self._one("SELECT * FROM optins WHERE id=? AND app_id=?", (optin_id, app_id))
        return None if row is None else _optin(row)

    async def optin_any(self, optin_id: str) -> OptInRow | None:
        """One opt-in by id (the opt-out link names no app)."""
        row = await self._one("SELECT * FROM optins WHERE id=?", (optin_id,))
        return None if row is None else _optin(row)

    async def optins(self, app_id: str, user_id: str) -> list[OptInRow]:
        """A user's opt-ins, newest first."""
        return [_optin(r) for r in await self._all(
            "SELECT * FROM optins WHERE app_id=? AND user_id=? ORDER BY created_at DESC, id", (app_id, user_id))]

    async def active_optins(self, app_id: str, channel: str) -> list[OptInRow]:
        """An app's opt-ins on `channel` that are not stopped."""
        return [_optin(r) for r in await self._all(
            "SELECT * FROM optins WHERE app_id=? AND channel=? AND status<>'stopped'", (app_id, channel))]

    async def count_attempt(self, optin_id: str) -> None:
        """One more wrong code."""
        async with write_lock(self.db):
            await self.db.execute("UPDATE optins SET attempts=attempts+1 WHERE id=?", (optin_id,))

    async def confirm_optin(self, optin_id: str, at: float, proven_by: str | None = None) -> bool:
        """pending → confirmed (the code is forgotten; `proven_by`: the SDK client that typed
        it); False if it was not pending."""
        async with write_lock(self.db):
            cur = await self.db.execute(
                "UPDATE optins SET status='confirmed', confirmed_at=?, code_hash=NULL, code_expires_at=NULL,"
                " proven_by=? WHERE id=? AND status='pending'", (at, proven_by, optin_id))
            return (cur.rowcount or 0) > 0

    async def stop_optin(self, optin_id: str, at: float) -> bool:
        """→ stopped; False if it already was."""
        async with write_lock(self.db):
            cur = await self.db.execute(
                "UPDATE optins SET status='stopped', stopped_at=?, code_hash=NULL WHERE id=? AND status<>'stopped'",
                (at, optin_id))
            return (cur.rowcount or 0) > 0

    async def mark_linked(self, optin_id: str) -> None:
        """The opt-in's number is a client of the conversation now."""
        async with write_lock(self.db):
            await self.db.execute("UPDATE optins SET linked=1 WHERE id=?", (optin_id,))

    async def unlinked_phone_optins(self) -> list[OptInRow]:
        """Confirmed WhatsApp/SMS opt-ins whose number is not linked to the conversation yet."""
        return [_optin(r) for r in await self._all(
            "SELECT * FROM optins WHERE status='confirmed' AND linked=0 AND channel IN ('whatsapp','twilio')")]

    # --- limits ---------------------------------------------------------------------------

    async def _over(self, counters: Sequence[Counter], now: float) -> Refusal | None:
        """The first counter with a full window (and when it frees up), None when all have room."""
        for counter in counters:
            wait = 0
            for rate in counter.rates:
                since = now - rate.window_seconds
                row = await self._one("SELECT COUNT(*) FROM limit_hits WHERE scope=? AND key=? AND at>?",
                                      (counter.scope, counter.key, since))
                count = int(row[0]) if row else 0
                if count < rate.count:
                    continue
                # One more is allowed once all but count-1 of the entries have left the window.
                oldest = await self._one(
                    "SELECT at FROM limit_hits WHERE scope=? AND key=? AND at>? ORDER BY at LIMIT 1 OFFSET ?",
                    (counter.scope, counter.key, since, count - rate.count))
                wait = max(wait, retry_after(float(oldest[0]) if oldest else now, rate.window_seconds, now))
            if wait:
                return Refusal(counter.scope, wait)
        return None

    async def _hit(self, counters: Sequence[Counter], now: float) -> None:
        await self.db.executemany("INSERT INTO limit_hits (scope, key, at) VALUES (?,?,?)",
                                  [(c.scope, c.key, now) for c in counters])

    async def take(self, counters: Sequence[Counter], now: float) -> Refusal | None:
        """Count one action against every counter, or none when one is full (its refusal)."""
        async with _immediate(self.db):
            refusal = await self._over(counters, now)
            if refusal is None:
                await self._hit(counters, now)
            return refusal

    async def prune_hits(self, before: float) -> int:
        """Forget counted actions older than every window; the number forgotten."""
        async with write_lock(self.db):
            cur = await self.db.execute("DELETE FROM limit_hits WHERE at<?", (before,))
            return cur.rowcount or 0

    # --- erasure (privacy events) ---------------------------------------------------------

    async def forget(self, erasure: Erasure) -> int:
        """Delete what a privacy event names, then truncate the log so the bytes leave the disk:
        - messages past retention: the conversations' pending notification and sends (their texts);
        - a deleted user: also every pending notification, send, opt-in and reply window of theirs;
        - deleted personal information: the user's opt-ins and sends (the addresses), history kept.
        The number of rows deleted."""
        ids = list(erasure.conversation_ids)
        marks = ",".join("?" * len(ids)) or "NULL"
        before = float("inf") if erasure.before is None else erasure.before
        user = erasure.user_id or ""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if not erasure.delivered_only:
            statements.append((f"DELETE FROM pending WHERE (conversation_id IN ({marks}) AND first_unread_at < ?)"
                               " OR user_id = ?", (*ids, before, user)))
        statements.append((f"DELETE FROM sends WHERE (conversation_id IN ({marks}) AND created_at < ?)"
                           " OR user_id = ?", (*ids, before, user)))
        if erasure.user_id:
            statements.append(("DELETE FROM optins WHERE user_id = ?", (user,)))
            if not erasure.delivered_only:
                statements.append(("DELETE FROM client_inbound WHERE user_id = ?", (user,)))
        deleted = 0
        async with transaction(self.db):
            for sql, params in statements:
                cur = await self.db.execute(sql, params)
                deleted += max(0, cur.rowcount or 0)
        if deleted:
            async with write_lock(self.db):
                await truncate_wal(self.db)
        return deleted

    async def user_data(self, app_id: str, user_id: str, max_sends: int) -> tuple[
            list[aiosqlite.Row], list[aiosqlite.Row], bool]:
        """A user's opt-ins and most recent sends (and whether older sends exist), for an export."""
        optins = await self._all("SELECT * FROM optins WHERE app_id=? AND user_id=? ORDER BY created_at, id",
                                 (app_id, user_id))
        sends = await self._all("SELECT * FROM sends WHERE app_id=? AND user_id=? ORDER BY created_at DESC, id"
                                " LIMIT ?", (app_id, user_id, max_sends + 1))
        return optins, sends[:max_sends], len(sends) > max_sends
