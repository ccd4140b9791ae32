"""shared/store on real SQLite files: group commits on the hot-path connection, and erasure
truncating the write-ahead log even while a read holds the connection."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from shared.store import GroupCommit, open_db, open_hot_connection, truncate_wal

MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT UNIQUE)"]


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


async def test_concurrent_writes_share_one_commit_and_a_failing_one_is_undone_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.db")
    db = await open_db(path, MIGRATIONS)
    hot = open_hot_connection(path)
    statements: list[str] = []
    hot.set_trace_callback(statements.append)
    group = GroupCommit(hot, asyncio.Lock())
    other = sqlite3.connect(path)
    try:
        def insert(body: str) -> int:
            cur = hot.execute("INSERT INTO notes (body) VALUES (?)", (body,))
            assert cur.lastrowid is not None
            return cur.lastrowid

        def insert_then_fail() -> None:
            hot.execute("INSERT INTO notes (body) VALUES ('half done')")
            hot.execute("INSERT INTO notes (body) VALUES ('one')")  # UNIQUE: raises

        async def write(body: str) -> int:
            row_id = await group.run(lambda _hot: insert(body))
            # Returned after the commit: another connection sees it.
            assert other.execute("SELECT body FROM notes WHERE id=?", (row_id,)).fetchone() == (body,)
            return row_id

        async def failing() -> None:
            with pytest.raises(sqlite3.IntegrityError):
                await group.run(lambda _hot: insert_then_fail())

        # Writes that all succeed share a transaction without a savepoint each.
        await asyncio.gather(write("zero"), write("also zero"))
        assert statements.count("COMMIT") == 1 and "SAVEPOINT op" not in statements
        statements.clear()

        ids = await asyncio.gather(write("one"), write("two"), failing(), write("three"))
        assert len(set(ids[:2] + ids[3:])) == 3
        assert statements.count("COMMIT") == 1
        bodies = [row[0] for row in other.execute("SELECT body FROM notes ORDER BY id")]
        assert bodies == ["zero", "also zero", "one", "two", "three"]
        # A later turn's write is a transaction of its own.
        await write("four")
        assert statements.count("COMMIT") == 2
    finally:
        other.close()
        hot.close()
        await db.close()
