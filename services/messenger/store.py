"""The messenger database: each person's last action per Page (the reply window) and the
message ids the service sent (to resume a half-sent message and to map read watermarks).

Why SQLite and not memory + client info: identity writes a client's `info` once, when the
client is created, so the send command cannot carry "last message at"; and a window kept only
in memory would refuse every reply after a restart. Read receipts name no message ids (only a
watermark), so the ids we sent must be remembered too. Both tables are tiny and portable SQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import aiosqlite

from shared.store import open_db, transaction, write_lock

from .handlers import SentRef, UserAction

MIGRATIONS = [
    """
    CREATE TABLE windows (
        page_id TEXT NOT NULL,
        psid TEXT NOT NULL,
        last_user_at REAL NOT NULL,
        PRIMARY KEY (page_id, psid)
    );
    CREATE TABLE sent (
        message_id TEXT NOT NULL,
        part INTEGER NOT NULL,
        page_id TEXT NOT NULL,
        psid TEXT NOT NULL,
        mid TEXT NOT NULL,
        conversation_id TEXT,
        sent_at REAL NOT NULL,
        delivered_at REAL,
        read_at REAL,
        PRIMARY KEY (message_id, part)
    );
    CREATE INDEX sent_thread ON sent (page_id, psid, sent_at);
    CREATE INDEX sent_mid ON sent (mid)
    """,
]

ReceiptKind = Literal["delivered", "read"]
_RECEIPT_COLUMN = {"delivered": "delivered_at", "read": "read_at"}


class Store:
    """Reply windows and sent message ids."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: str) -> Store:
        """Open (and migrate) the database at `path`."""
        return cls(await open_db(path, MIGRATIONS))

    async def close(self) -> None:
        """Close the connection."""
        await self.db.close()

    # --- windows -------------------------------------------------------------------------------

    async def touch_windows(self, actions: Sequence[UserAction]) -> None:
        """Record people's actions; a late (older) webhook never moves a window back."""
        if not actions:
            return
        async with transaction(self.db):
            for action in actions:
                await self.db.execute(
                    "INSERT INTO windows (page_id, psid, last_user_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (page_id, psid) DO UPDATE SET last_user_at = excluded.last_user_at "
                    "WHERE excluded.last_user_at > windows.last_user_at",
                    (action.page_id, action.psid, action.at))

    async def last_user_at(self, page_id: str, psid: str) -> float | None:
        """When the person last acted towards the Page (None: never, as far as we know)."""
        async with self.db.execute("SELECT last_user_at FROM windows WHERE page_id = ? AND psid = ?",
                                   (page_id, psid)) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    # --- sent messages ----------------------------------------------------------------------------

    async def sent_parts(self, message_id: str) -> dict[int, str]:
        """part → mid of the parts of a message already accepted by the Send API."""
        async with self.db.execute("SELECT part, mid FROM sent WHERE message_id = ?", (message_id,)) as cur:
            rows = await cur.fetchall()
        return {int(r["part"]): str(r["mid"]) for r in rows}

    async def record_sent(self, message_id: str, part: int, page_id: str, psid: str, mid: str,
                          conversation_id: str | None, sent_at: float) -> None:
        """Remember an accepted part (`sent_at`: when the call started, at or before Meta's timestamp)."""
        async with write_lock(self.db):
            await self.db.execute(
                "INSERT INTO sent (message_id, part, page_id, psid, mid, conversation_id, sent_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id, part) DO NOTHING",
                (message_id, part, page_id, psid, mid, conversation_id, sent_at))

    async def receipt_candidates(self, kind: ReceiptKind, page_id: str, psid: str, watermark: float,
                                 mids: Iterable[str] = ()) -> list[SentRef]:
        """Sent messages a receipt covers (sent at or before the watermark, or named) not yet reported."""
        column = _RECEIPT_COLUMN[kind]
        base = f"SELECT mid, message_id, conversation_id FROM sent WHERE page_id = ? AND psid = ? AND {column} IS NULL"
        found: dict[str, SentRef] = {}
        async with self.db.execute(f"{base} AND sent_at <= ? ORDER BY sent_at", (page_id, psid, watermark)) as cur:
            for row in await cur.fetchall():
                found[str(row["mid"])] = _ref(row)
        mid_list = [m for m in dict.fromkeys(mids) if m not in found]
        # Bounded IN lists: SQLite caps the number of parameters of one statement.
        for start in range(0, len(mid_list), 500):
            chunk = mid_list[start:start + 500]
            marks = ",".join("?" for _ in chunk)
            async with self.db.execute(f"{base} AND mid IN ({marks})", (page_id, psid, *chunk)) as cur:
                for row in await cur.fetchall():
                    found[str(row["mid"])] = _ref(row)
        return list(found.values())

    async def mark_receipts(self, kind: ReceiptKind, mids: Sequence[str], at: float) -> None:
        """Note that these messages were reported delivered/read (once published)."""
        if not mids:
            return
        column = _RECEIPT_COLUMN[kind]
        async with transaction(self.db):
            for mid in mids:
                await self.db.execute(f"UPDATE sent SET {column} = ? WHERE mid = ? AND {column} IS NULL", (at, mid))

    async def prune(self, sent_before: float) -> int:
        """Forget sent ids older than the retention (their receipts no longer matter)."""
        async with write_lock(self.db):
            cur = await self.db.execute("DELETE FROM sent WHERE sent_at < ?", (sent_before,))
            return cur.rowcount


def _ref(row: aiosqlite.Row) -> SentRef:
    return SentRef(mid=str(row["mid"]), message_id=str(row["message_id"]), conversation_id=row["conversation_id"])
