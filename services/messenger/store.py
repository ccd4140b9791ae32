"""The messenger database: each person's last action per Page (the reply window) and the
message ids the service sent (to resume a half-sent message and to map read watermarks).

Why a database and not memory + client info: identity writes a client's `info` once, when the
client is created, so the send command cannot carry "last message at"; and a window kept only
in memory would refuse every reply after a restart. Read receipts name no message ids (only a
watermark), so the ids we sent must be remembered too. Both tables are tiny and portable SQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from shared.db import Database, DatabaseSettings, Migration, Row, open_database

from .handlers import SentRef, UserAction

MIGRATION = Migration([
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
])

ReceiptKind = Literal["delivered", "read"]
_RECEIPT_COLUMN = {"delivered": "delivered_at", "read": "read_at"}
# Named mids per statement: SQLite caps the number of parameters of one statement.
_MIDS_PER_QUERY = 500


class Store:
    """Reply windows and sent message ids."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Store:
        """Open (and migrate) the service's database."""
        return cls(await open_database(settings, MIGRATION))

    async def close(self) -> None:
        """Close the connections."""
        await self.db.close()

    # --- windows -------------------------------------------------------------------------------

    async def touch_windows(self, actions: Sequence[UserAction]) -> None:
        """Record people's actions; a late (older) webhook never moves a window back, whichever
        replica records it (the comparison is in the upsert, not in memory)."""
        if not actions:
            return
        await self.db.executemany(
            "INSERT INTO windows (page_id, psid, last_user_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (page_id, psid) DO UPDATE SET last_user_at = excluded.last_user_at "
            "WHERE excluded.last_user_at > windows.last_user_at",
            [(action.page_id, action.psid, action.at) for action in actions])

    async def last_user_at(self, page_id: str, psid: str) -> float | None:
        """When the person last acted towards the Page (None: never, as far as we know)."""
        found = await self.db.fetchval("SELECT last_user_at FROM windows WHERE page_id = $1 AND psid = $2",
                                       page_id, psid)
        return None if found is None else float(found)

    # --- sent messages ----------------------------------------------------------------------------

    async def sent_parts(self, message_id: str) -> dict[int, str]:
        """part → mid of the parts of a message already accepted by the Send API."""
        rows = await self.db.fetch("SELECT part, mid FROM sent WHERE message_id = $1", message_id)
        return {int(r["part"]): str(r["mid"]) for r in rows}

    async def record_sent(self, message_id: str, part: int, page_id: str, psid: str, mid: str,
                          conversation_id: str | None, sent_at: float) -> None:
        """Remember an accepted part (`sent_at`: when the call started, at or before Meta's timestamp)."""
        await self.db.execute(
            "INSERT INTO sent (message_id, part, page_id, psid, mid, conversation_id, sent_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (message_id, part) DO NOTHING",
            message_id, part, page_id, psid, mid, conversation_id, sent_at)

    async def receipt_candidates(self, kind: ReceiptKind, page_id: str, psid: str, watermark: float,
                                 mids: Iterable[str] = ()) -> list[SentRef]:
        """Sent messages a receipt covers (sent at or before the watermark, or named) not yet reported."""
        column = _RECEIPT_COLUMN[kind]
        base = ("SELECT mid, message_id, conversation_id FROM sent"
                f" WHERE page_id = $1 AND psid = $2 AND {column} IS NULL")
        found: dict[str, SentRef] = {}
        for row in await self.db.fetch(f"{base} AND sent_at <= $3 ORDER BY sent_at", page_id, psid, watermark):
            found[str(row["mid"])] = _ref(row)
        mid_list = [m for m in dict.fromkeys(mids) if m not in found]
        for start in range(0, len(mid_list), _MIDS_PER_QUERY):
            chunk = mid_list[start:start + _MIDS_PER_QUERY]
            marks = ",".join(f"${i}" for i in range(3, len(chunk) + 3))
            for row in await self.db.fetch(f"{base} AND mid IN ({marks})", page_id, psid, *chunk):
                found[str(row["mid"])] = _ref(row)
        return list(found.values())

    async def mark_receipts(self, kind: ReceiptKind, mids: Sequence[str], at: float) -> None:
        """Note that these messages were reported delivered/read (once published)."""
        if not mids:
            return
        column = _RECEIPT_COLUMN[kind]
        await self.db.executemany(f"UPDATE sent SET {column} = $1 WHERE mid = $2 AND {column} IS NULL",
                                  [(at, mid) for mid in mids])

    async def prune(self, sent_before: float) -> int:
        """Forget sent ids older than the retention (their receipts no longer matter)."""
        return await self.db.execute("DELETE FROM sent WHERE sent_at < $1", sent_before)


def _ref(row: Row) -> SentRef:
    return SentRef(mid=str(row["mid"]), message_id=str(row["message_id"]), conversation_id=row["conversation_id"])
