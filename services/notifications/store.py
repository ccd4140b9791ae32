"""The notifications service's database: pending notifications, sends, reply windows, opt-ins.

A pending notification is one row per conversation, committed before the event that caused it
is acked, so it survives a crash or a restart; the timer fires the rows that fell due. A send
is recorded with the id its OutboundSend carried (its Nats-Msg-Id), so a restart between the
publish and the bookkeeping publishes the same id again and JetStream drops the duplicate.

The same SQL runs on SQLite (a file under the data directory) and on PostgreSQL
(THREADLINE_DATABASE_URL), through `shared.db`. Several replicas may write at once: a write
that depends on what is there is one upsert, and the opt-in and limit decisions, which count
rows before inserting, run one at a time (`shared.db.serialize`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.notifications.limits import Counter, Refusal, retry_after
from services.notifications.policy import schedule
from shared import subjects
from shared.db import Connection, Database, DatabaseSettings, GroupCommit, Migration, Row, open_database, serialize
from shared.messages.conversation import Erasure


async def _partition_pending(tx: Connection) -> None:
    """Pending notifications get their conversation's partition under today's count (rows from
    before partitioning, or from a deployment with another count): run at every start, it
    writes only the rows whose partition changed."""
    rows = await tx.fetch("SELECT conversation_id, part FROM pending")
    moved = [(part, r[0]) for r in rows if (part := subjects.partition_of(r[0])) != r[1]]
    if moved:
        await tx.executemany("UPDATE pending SET part = $1 WHERE conversation_id = $2", moved)


MIGRATION = Migration([
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
    # The replica holding a conversation's partition of the events stream fires its notification
    # (shared.partitions): never two replicas deciding on one.
    """
    ALTER TABLE pending ADD COLUMN part INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX pending_part_due ON pending (part, due_at)
    """,
    _partition_pending,
])


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


def _pending(row: Row) -> PendingRow:
    return PendingRow(
        conversation_id=row["conversation_id"], app_id=row["app_id"], conversation_type=row["conversation_type"],
        user_id=row["user_id"], notification_id=row["notification_id"],
        first_unread_at=float(row["first_unread_at"]), due_at=float(row["due_at"]),
        unread_count=int(row["unread_count"]), last_message_id=row["last_message_id"], last_text=row["last_text"],
        attempts=int(row["attempts"]))


def _send(row: Row) -> SendRow:
    return SendRow(
        id=row["id"], notification_id=row["notification_id"], app_id=row["app_id"],
        conversation_id=row["conversation_id"], conversation_type=row["conversation_type"], user_id=row["user_id"],
        channel=row["channel"], integration_id=row["integration_id"], client_id=row["client_id"],
        recipient=row["recipient"], recipient_info=json.loads(row["recipient_info"]), kind=row["kind"],
        notice=json.loads(row["notice"]), status=row["status"], error_code=row["error_code"])


def _optin(row: Row) -> OptInRow:
    expires = row["code_expires_at"]
    return OptInRow(
        id=row["id"], app_id=row["app_id"], user_id=row["user_id"], conversation_id=row["conversation_id"],
        channel=row["channel"], address=row["address"], integration_id=row["integration_id"],
        source_integration_id=row["source_integration_id"], status=row["status"], code_hash=row["code_hash"],
        code_expires_at=None if expires is None else float(expires), attempts=int(row["attempts"]),
        linked=bool(row["linked"]), created_at=float(row["created_at"]), code_sent=bool(row["code_sent"]),
        proven_by=row["proven_by"], destination=row["destination"])


# A business message folded into the conversation's pending notification in one statement, so
# replicas handling two replies of one conversation at once never lose one (policy.schedule: a
# burst is one notification, due `delay` after the first reply; later ones raise the count and
# become the excerpt). A redelivered event (the same last message) changes nothing.
_SCHEDULE = (
    "INSERT INTO pending (conversation_id, app_id, conversation_type, user_id, notification_id, first_unread_at,"
    " due_at, unread_count, last_message_id, last_text, part) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (conversation_id) DO UPDATE SET"
    " unread_count = pending.unread_count"
    " + CASE WHEN pending.last_message_id = excluded.last_message_id THEN 0 ELSE 1 END,"
    " last_message_id = excluded.last_message_id, last_text = excluded.last_text"
    " RETURNING *")
# The reply window never moves back, whichever replica records a late message.
_NOTE_INBOUND = (
    "INSERT INTO client_inbound (client_id, app_id, user_id, last_inbound_at) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (client_id) DO UPDATE SET user_id = excluded.user_id,"
    " last_inbound_at = CASE WHEN excluded.last_inbound_at > client_inbound.last_inbound_at"
    " THEN excluded.last_inbound_at ELSE client_inbound.last_inbound_at END")
_CANCEL = "DELETE FROM pending WHERE conversation_id = $1"
_INSERT_SEND = (
    "INSERT INTO sends (id, notification_id, app_id, conversation_id, conversation_type, user_id, channel,"
    " integration_id, client_id, recipient, recipient_info, kind, notice, status, error_code, created_at,"
    " updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16)"
    " ON CONFLICT (id) DO NOTHING")
_INSERT_OPTIN = (
    "INSERT INTO optins (id, app_id, user_id, conversation_id, channel, address, integration_id,"
    " source_integration_id, status, code_hash, code_expires_at, attempts, linked, created_at, code_sent,"
    " destination) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)")
# Names the lock under which opt-in and limit decisions run on PostgreSQL (advisory locks are
# per database, which every service's schema shares: the key names the service).
# Opt-in and limit decisions count rows before inserting: they run one at a time across replicas.
_DECISIONS = "notifications:optins-and-limits"


async def _cancel(tx: Connection, conversation_id: str) -> bool:
    return await tx.execute(_CANCEL, conversation_id) > 0


class Store:
    """All of the service's SQL."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # What every customer (and business) message writes goes through here, a consumer batch
        # per commit.
        self._group = GroupCommit(db)

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Store:
        """Open (and migrate) the service's database; pending rows follow the partition count."""
        return cls(await open_database(settings, MIGRATION, at_start=_partition_pending))

    async def close(self) -> None:
        """Close the connections (a write handed in later fails)."""
        await self.db.close()

    # --- pending notifications ------------------------------------------------------------

    async def schedule(self, *, app_id: str, conversation_id: str, conversation_type: str, user_id: str,
                       message_id: str, text: str, at: float, delay: float, new_notification_id: str) -> PendingRow:
        """Fold a business message into the conversation's pending notification (one per conversation)."""
        first = schedule(None, at, delay)

        async def op(tx: Connection) -> Row | None:
            return await tx.fetchrow(
                _SCHEDULE, conversation_id, app_id, conversation_type, user_id, new_notification_id,
                float(first.first_unread_at), float(first.due_at), first.unread_count, message_id, text,
                subjects.partition_of(conversation_id))

        row = await self._group.run(op)
        assert row is not None  # an upsert returns its row, inserted or updated
        return _pending(row)

    async def cancel(self, conversation_id: str) -> bool:
        """Drop the conversation's pending notification (the customer read it); True if there was one."""
        return await self._group.run(lambda tx: _cancel(tx, conversation_id))

    async def customer_wrote(self, conversation_id: str, client_id: str | None, app_id: str, user_id: str,
                             at: float) -> bool:
        """The customer wrote in the conversation, from `client_id` at `at`: its pending
        notification goes, and that channel's reply window opens (or is refreshed), in one group
        commit. True if a notification was pending."""

        async def op(tx: Connection) -> bool:
            if client_id is not None:
                await tx.execute(_NOTE_INBOUND, client_id, app_id, user_id, float(at))
            return await _cancel(tx, conversation_id)

        return await self._group.run(op)

    async def pending(self, conversation_id: str) -> PendingRow | None:
        """The conversation's pending notification, if any."""
        row = await self.db.fetchrow("SELECT * FROM pending WHERE conversation_id = $1", conversation_id)
        return None if row is None else _pending(row)

    async def due(self, now: float, partitions: Collection[int], limit: int = 100) -> list[PendingRow]:
        """Pending notifications of these partitions' conversations due at `now`, oldest first."""
        if not partitions:
            return []
        parts = sorted(partitions)
        listed = ", ".join(f"${i}" for i in range(3, 3 + len(parts)))
        return [_pending(r) for r in await self.db.fetch(
            f"SELECT * FROM pending WHERE due_at <= $1 AND part IN ({listed}) ORDER BY due_at LIMIT $2",
            float(now), limit, *parts)]

    async def postpone(self, conversation_id: str, notification_id: str, due_at: float, *,
                       failed_attempt: bool = False) -> None:
        """Fire the notification later (quiet hours, an open socket, a dependency down)."""
        await self.db.execute(
            "UPDATE pending SET due_at = $1, attempts = attempts + $2 WHERE conversation_id = $3"
            " AND notification_id = $4", float(due_at), 1 if failed_attempt else 0, conversation_id, notification_id)

    async def finish(self, conversation_id: str, notification_id: str, send: SendRow | None = None,
                     at: float = 0.0) -> None:
        """The notification was handled: record its send (if any) and drop the pending row, atomically."""
        async with self.db.transaction() as tx:
            if send is not None:
                await _insert_send(tx, send, at)
            await tx.execute("DELETE FROM pending WHERE conversation_id = $1 AND notification_id = $2",
                             conversation_id, notification_id)

    # --- sends ----------------------------------------------------------------------------

    async def record_send(self, send: SendRow, at: float) -> None:
        """Record a send made outside a pending notification (an opt-in code, a template retry)."""
        await _insert_send(self.db, send, at)

    async def get_send(self, send_id: str) -> SendRow | None:
        """A send by the id its OutboundSend carried."""
        row = await self.db.fetchrow("SELECT * FROM sends WHERE id = $1", send_id)
        return None if row is None else _send(row)

    async def set_send_status(self, send_id: str, status: str, error_code: str | None, at: float) -> bool:
        """Move a send to `status`; False when it already was there (a redelivered status)."""
        return await self.db.execute(
            "UPDATE sends SET status = $1, error_code = $2, updated_at = $3 WHERE id = $4 AND status <> $1",
            status, error_code, float(at), send_id) > 0

    async def sends(self, conversation_id: str) -> list[SendRow]:
        """The sends made for a conversation, oldest first."""
        return [_send(r) for r in await self.db.fetch(
            "SELECT * FROM sends WHERE conversation_id = $1 ORDER BY created_at, id", conversation_id)]

    # --- reply windows --------------------------------------------------------------------

    async def set_last_inbound(self, client_id: str, app_id: str, user_id: str, at: float) -> None:
        """Set the last inbound time as is (tests and operators moving a window)."""
        await self.db.execute(
            "INSERT INTO client_inbound (client_id, app_id, user_id, last_inbound_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (client_id) DO UPDATE SET last_inbound_at = excluded.last_inbound_at",
            client_id, app_id, user_id, float(at))

    async def last_inbound(self, client_id: str) -> float | None:
        """When the customer last wrote from `client_id`, if ever (as far as this service saw)."""
        found = await self.db.fetchval("SELECT last_inbound_at FROM client_inbound WHERE client_id = $1", client_id)
        return None if found is None else float(found)

    # --- opt-ins --------------------------------------------------------------------------

    async def start_optin(self, fresh: OptInRow, decoy_code_hash: str, *, starts: Sequence[Counter],
                          sends: Sequence[Counter], now: float, max_attempts: int) -> StartOutcome:
        """Decide an opt-in request atomically (one at a time across replicas sharing the database).

        The request counts against `starts` (refused when one is full). Then: the same user's
        live code for the address → that opt-in again (their code still works); another live
        code for the address → `fresh` is stored with `decoy_code_hash` and marked unsent (it
        answers like a real one and can never be confirmed); else the code counts against
        `sends` (refused when one is full) and `fresh` is stored: its code is to be sent.
        """
        now = float(now)
        async with self.db.transaction() as tx:
            await serialize(tx, _DECISIONS)
            refusal = await _over(tx, starts, now)
            if refusal is not None:
                return StartOutcome("refused", refusal=refusal)
            await _hit(tx, starts, now)
            # Matched on the destination (any spelling, channel or app reaching that mailbox or phone).
            # A live code: pending, not expired, not locked by wrong tries.
            own = await tx.fetchrow(
                "SELECT * FROM optins WHERE app_id = $1 AND user_id = $2 AND channel = $3 AND destination = $4"
                " AND status = 'pending' AND code_expires_at > $5 AND attempts < $6 ORDER BY created_at DESC LIMIT 1",
                fresh.app_id, fresh.user_id, fresh.channel, fresh.destination, now, max_attempts)
            if own is not None:
                return StartOutcome("pending", optin=_optin(own))
            other = await tx.fetchval(
                "SELECT id FROM optins WHERE destination = $1 AND code_sent = 1"
                " AND status = 'pending' AND code_expires_at > $2 AND attempts < $3 LIMIT 1",
                fresh.destination, now, max_attempts)
            if other is not None:
                decoy = dataclasses.replace(fresh, code_hash=decoy_code_hash, code_sent=False)
                await _insert_optin(tx, decoy)
                return StartOutcome("pending", optin=decoy)
            refusal = await _over(tx, sends, now)
            if refusal is not None:
                return StartOutcome("refused", refusal=refusal)
            await _hit(tx, sends, now)
            await _insert_optin(tx, fresh)
            return StartOutcome("send", optin=fresh)

    async def expire_code(self, optin_id: str, at: float) -> None:
        """The code could not be sent: it no longer holds the address (a new request may send one)."""
        await self.db.execute("UPDATE optins SET code_expires_at = $1 WHERE id = $2 AND status = 'pending'",
                              float(at), optin_id)

    async def optin(self, app_id: str, optin_id: str) -> OptInRow | None:
        """One opt-in of an app."""
        row = await self.db.fetchrow("SELECT * FROM optins WHERE id = $1 AND app_id = $2", optin_id, app_id)
        return None if row is None else _optin(row)

    async def optin_any(self, optin_id: str) -> OptInRow | None:
        """One opt-in by id (the opt-out link names no app)."""
        row = await self.db.fetchrow("SELECT * FROM optins WHERE id = $1", optin_id)
        return None if row is None else _optin(row)

    async def optins(self, app_id: str, user_id: str) -> list[OptInRow]:
        """A user's opt-ins, newest first."""
        return [_optin(r) for r in await self.db.fetch(
            "SELECT * FROM optins WHERE app_id = $1 AND user_id = $2 ORDER BY created_at DESC, id", app_id, user_id)]

    async def active_optins(self, app_id: str, channel: str) -> list[OptInRow]:
        """An app's opt-ins on `channel` that are not stopped."""
        return [_optin(r) for r in await self.db.fetch(
            "SELECT * FROM optins WHERE app_id = $1 AND channel = $2 AND status <> 'stopped'", app_id, channel)]

    async def count_attempt(self, optin_id: str) -> None:
        """One more wrong code."""
        await self.db.execute("UPDATE optins SET attempts = attempts + 1 WHERE id = $1", optin_id)

    async def confirm_optin(self, optin_id: str, at: float, proven_by: str | None = None) -> bool:
        """pending → confirmed (the code is forgotten; `proven_by`: the SDK client that typed
        it); False if it was not pending."""
        return await self.db.execute(
            "UPDATE optins SET status = 'confirmed', confirmed_at = $1, code_hash = NULL, code_expires_at = NULL,"
            " proven_by = $2 WHERE id = $3 AND status = 'pending'", float(at), proven_by, optin_id) > 0

    async def stop_optin(self, optin_id: str, at: float) -> bool:
        """→ stopped; False if it already was."""
        return await self.db.execute(
            "UPDATE optins SET status = 'stopped', stopped_at = $1, code_hash = NULL WHERE id = $2"
            " AND status <> 'stopped'", float(at), optin_id) > 0

    async def mark_linked(self, optin_id: str) -> None:
        """The opt-in's number is a client of the conversation now."""
        await self.db.execute("UPDATE optins SET linked = 1 WHERE id = $1", optin_id)

    async def unlinked_phone_optins(self) -> list[OptInRow]:
        """Confirmed WhatsApp/SMS/e-mail opt-ins whose address is not linked to the conversation yet."""
        return [_optin(r) for r in await self.db.fetch(
            "SELECT * FROM optins WHERE status = 'confirmed' AND linked = 0"
            " AND channel IN ('whatsapp', 'twilio', 'email')")]

    # --- limits ---------------------------------------------------------------------------

    async def take(self, counters: Sequence[Counter], now: float) -> Refusal | None:
        """Count one action against every counter, or none when one is full (its refusal)."""
        now = float(now)
        async with self.db.transaction() as tx:
            await serialize(tx, _DECISIONS)
            refusal = await _over(tx, counters, now)
            if refusal is None:
                await _hit(tx, counters, now)
            return refusal

    async def prune_hits(self, before: float) -> int:
        """Forget counted actions older than every window; the number forgotten."""
        return await self.db.execute("DELETE FROM limit_hits WHERE at < $1", float(before))

    # --- erasure (privacy events) ---------------------------------------------------------

    async def forget(self, erasure: Erasure) -> int:
        """Delete what a privacy event names, then make the bytes unreadable where the engine
        allows (`Database.erase_freed_pages`):
        - messages past retention: the conversations' pending notification and sends (their texts);
        - a deleted user: also every pending notification, send, opt-in and reply window of theirs;
        - deleted personal information: the user's opt-ins and sends (the addresses), history kept.
        - one deleted message: the conversation's pending notification when its text is that
          message's (the sends stay: they are what reached the customer).
        The number of rows deleted."""
        if erasure.message is not None:
            deleted = 0
            async with self.db.transaction() as tx:
                for conversation_id in erasure.conversation_ids:
                    deleted += await tx.execute(
                        "DELETE FROM pending WHERE conversation_id = $1 AND last_message_id = $2",
                        conversation_id, erasure.message.id)
            if deleted:
                await self.db.erase_freed_pages()
            return deleted
        ids = list(erasure.conversation_ids)
        marks = ",".join(f"${i}" for i in range(1, len(ids) + 1)) or "NULL"
        before = float("inf") if erasure.before is None else float(erasure.before)
        user = erasure.user_id or ""
        named = (*ids, before, user)

        def of_named(column: str) -> str:  # the conversations' rows older than `before`, or the user's
            return f"(conversation_id IN ({marks}) AND {column} < ${len(ids) + 1}) OR user_id = ${len(ids) + 2}"

        statements: list[tuple[str, tuple[Any, ...]]] = []
        if not erasure.delivered_only:
            statements.append((f"DELETE FROM pending WHERE {of_named('first_unread_at')}", named))
        statements.append((f"DELETE FROM sends WHERE {of_named('created_at')}", named))
        if erasure.user_id:
            statements.append(("DELETE FROM optins WHERE user_id = $1", (user,)))
            if not erasure.delivered_only:
                statements.append(("DELETE FROM client_inbound WHERE user_id = $1", (user,)))
        deleted = 0
        async with self.db.transaction() as tx:
            for sql, params in statements:
                deleted += await tx.execute(sql, *params)
        if deleted:
            await self.db.erase_freed_pages()
        return deleted

    async def user_data(self, app_id: str, user_id: str, max_sends: int) -> tuple[list[Row], list[Row], bool]:
        """A user's opt-ins and most recent sends (and whether older sends exist), for an export."""
        optins = await self.db.fetch("SELECT * FROM optins WHERE app_id = $1 AND user_id = $2 ORDER BY created_at, id",
                                     app_id, user_id)
        sends = await self.db.fetch("SELECT * FROM sends WHERE app_id = $1 AND user_id = $2"
                                    " ORDER BY created_at DESC, id LIMIT $3", app_id, user_id, max_sends + 1)
        return optins, sends[:max_sends], len(sends) > max_sends


async def _insert_send(conn: Connection, send: SendRow, at: float) -> None:
    await conn.execute(
        _INSERT_SEND, send.id, send.notification_id, send.app_id, send.conversation_id, send.conversation_type,
        send.user_id, send.channel, send.integration_id, send.client_id, send.recipient,
        json.dumps(send.recipient_info), send.kind, json.dumps(send.notice), send.status, send.error_code, float(at))


async def _insert_optin(tx: Connection, row: OptInRow) -> None:
    await tx.execute(
        _INSERT_OPTIN, row.id, row.app_id, row.user_id, row.conversation_id, row.channel, row.address,
        row.integration_id, row.source_integration_id, row.status, row.code_hash,
        None if row.code_expires_at is None else float(row.code_expires_at), int(row.attempts), int(row.linked),
        float(row.created_at), int(row.code_sent), row.destination)


async def _over(tx: Connection, counters: Sequence[Counter], now: float) -> Refusal | None:
    """The first counter with a full window (and when it frees up), None when all have room."""
    for counter in counters:
        wait = 0
        for rate in counter.rates:
            since = now - rate.window_seconds
            count = int(await tx.fetchval(
                "SELECT COUNT(*) FROM limit_hits WHERE scope = $1 AND key = $2 AND at > $3",
                counter.scope, counter.key, since))
            if count < rate.count:
                continue
            # One more is allowed once all but count-1 of the entries have left the window.
            oldest = await tx.fetchval(
                "SELECT at FROM limit_hits WHERE scope = $1 AND key = $2 AND at > $3 ORDER BY at LIMIT 1 OFFSET $4",
                counter.scope, counter.key, since, count - rate.count)
            wait = max(wait, retry_after(now if oldest is None else float(oldest), rate.window_seconds, now))
        if wait:
            return Refusal(counter.scope, wait)
    return None


async def _hit(tx: Connection, counters: Sequence[Counter], now: float) -> None:
    if counters:
        await tx.executemany("INSERT INTO limit_hits (scope, key, at) VALUES ($1, $2, $3)",
                             [(c.scope, c.key, now) for c in counters])
