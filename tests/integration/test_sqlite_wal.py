"""Erasure truncates SQLite's write-ahead log even while a read holds the connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.store import open_db, truncate_wal

MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"]


async def test_the_log_is_truncated_once_a_concurrent_read_on_the_connection_ends(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    db = await open_db(str(path), MIGRATIONS)
    try:
        await db.executemany("INSERT INTO notes (body) VALUES (?)", [(f"secret {i}",) for i in range(200)])
        await db.execute("DELETE FROM notes")
        wal = Path(f"{path}-wal")
        assert b"secret 7" in wal.read_bytes()
        await db.executemany("INSERT INTO notes (body) VALUES (?)", [(f"kept {i}",) for i in range(200)])
        # A read another coroutine started and has not finished makes SQLite refuse the checkpoint.
        reader = await db.execute("SELECT body FROM notes")
        assert await reader.fetchone() is not None

        async def finish_reading() -> None:
            await asyncio.sleep(0.1)
            await reader.close()

        closing = asyncio.create_task(finish_reading())
        assert await truncate_wal(db)
        await closing
        assert wal.read_bytes() == b""
        assert b"secret 7" not in path.read_bytes()
    finally:
        await db.close()
