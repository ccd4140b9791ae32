"""The store layer on both engines (a real SQLite file, a real PostgreSQL server): one SQL text,
the same results; transactions and group commits all or nothing; migrations once, atomic, and
safe when two replicas start together."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import asyncpg
import pytest

from shared.config import ConfigError
from shared.db import (
    INTEGRITY_ERRORS,
    Connection,
    DatabaseSettings,
    GroupCommit,
    Migration,
    MigrationError,
    open_database,
    postgres_ddl,
    savepoint,
    sqlite_query,
    verified_in,
)

SCHEMA = Migration([
    """
    CREATE TABLE items (
        seq INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        weight REAL,
        body BLOB
    );
    CREATE INDEX items_size ON items (size)
    """,
])


async def test_one_sql_text_on_both_engines(database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    try:
        assert await db.execute("INSERT INTO items (name, size, weight, body) VALUES ($1, $2, $3, $4)",
                                "a", 3, 1.5, b"\x00\xff") == 1
        await db.executemany("INSERT INTO items (name, size) VALUES ($1, $2)", [("b", 2), ("c", 2 ** 40)])
        row = await db.fetchrow("SELECT seq, name, size, weight, body FROM items WHERE name = $1", "a")
        assert row is not None
        assert (row["name"], row[2], row["weight"], bytes(row["body"])) == ("a", 3, 1.5, b"\x00\xff")
        assert dict(row)["size"] == 3
        # The same parameter twice, and a 64-bit integer.
        names = [r["name"] for r in await db.fetch(
            "SELECT name FROM items WHERE size = $1 OR size > $1 * 1000 ORDER BY seq", 2)]
        assert names == ["b", "c"]
        assert await db.fetchval("SELECT size FROM items WHERE name = $1", "c") == 2 ** 40
        assert await db.fetchval("SELECT size FROM items WHERE name = $1", "nobody") is None
        assert await db.execute("UPDATE items SET size = size + 1 WHERE size = $1", 2) == 1
        assert await db.execute("INSERT INTO items (name, size) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                                "a", 9) == 0
    finally:
        await db.close()


async def test_a_transaction_commits_together_or_not_at_all(database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    try:
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "x", 1)
                assert await tx.fetchval("SELECT COUNT(*) FROM items") == 1
                raise RuntimeError("undo")
        assert await db.fetchval("SELECT COUNT(*) FROM items") == 0
        async with db.transaction() as tx:
            seq = await tx.fetchval("INSERT INTO items (name, size) VALUES ($1, $2) RETURNING seq", "y", 1)
        assert await db.fetchval("SELECT name FROM items WHERE seq = $1", seq) == "y"
    finally:
        await db.close()


async def test_a_savepoint_undoes_its_block_alone(database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    try:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "first", 1)
            with pytest.raises(INTEGRITY_ERRORS):
                async with savepoint(tx):
                    await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "second", 2)
                    await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "first", 3)
            # The transaction goes on after the error (PostgreSQL would refuse this otherwise).
            await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "third", 4)
        names = [r["name"] for r in await db.fetch("SELECT name FROM items ORDER BY seq")]
        assert names == ["first", "third"]
    finally:
        await db.close()


async def test_what_a_transaction_verified_lasts_until_its_end_or_a_savepoint_rollback(
        database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    group = GroupCommit(db)
    try:
        async with db.transaction() as tx:
            verified_in(tx).add("checked")
            assert "checked" in verified_in(tx)
            async with savepoint(tx):
                verified_in(tx).add("inside")
            assert {"checked", "inside"} <= verified_in(tx)  # a released savepoint keeps its locks
            with pytest.raises(RuntimeError):
                async with savepoint(tx):
                    raise RuntimeError("undo")
            assert not verified_in(tx)  # its locks went with the rollback: check again
            verified_in(tx).add("again")
        async with db.transaction() as tx:
            assert not verified_in(tx)  # a new transaction (SQLite's reuses the writer connection)

        # A group commit run again one savepoint per write: a write after a failed one sees
        # nothing its predecessors verified.
        seen: list[set[object]] = []

        def op(name: str, fails: bool) -> object:
            async def run(tx: Connection) -> None:
                seen.append(set(verified_in(tx)))
                verified_in(tx).add(name)
                if fails:
                    raise ValueError(name)
            return run

        results = await asyncio.gather(*(group.run(op(n, n == "b")) for n in ("a", "b", "c")),  # type: ignore[arg-type]
                                       return_exceptions=True)
        assert isinstance(results[1], ValueError) and results[0] is None and results[2] is None
        # First try: a, then b (which sees a's) fails; again with savepoints: a, b, then c.
        assert seen == [set(), {"a"}, set(), {"a"}, set()]
    finally:
        await db.close()


async def test_reads_outside_a_transaction_see_committed_rows_only(database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    try:
        inside = asyncio.Event()
        release = asyncio.Event()

        async def writer() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "pending", 1)
                inside.set()
                await release.wait()

        task = asyncio.create_task(writer())
        await inside.wait()
        assert await db.fetchval("SELECT COUNT(*) FROM items") == 0
        release.set()
        await task
        assert await db.fetchval("SELECT COUNT(*) FROM items") == 1
    finally:
        await db.close()


async def test_group_commit_undoes_a_failing_write_alone(database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    group = GroupCommit(db)
    try:
        def insert(name: str) -> object:
            async def op(tx: Connection) -> int:
                seq = await tx.fetchval("INSERT INTO items (name, size) VALUES ($1, $2) RETURNING seq", name, 1)
                return int(seq)
            return op

        await group.run(insert("taken"))  # type: ignore[arg-type]
        results = await asyncio.gather(*(group.run(insert(n)) for n in ("one", "taken", "two")),  # type: ignore[arg-type]
                                       return_exceptions=True)
        assert isinstance(results[0], int) and isinstance(results[2], int)
        assert isinstance(results[1], Exception)  # the unique name, whatever the engine calls it
        names = {r["name"] for r in await db.fetch("SELECT name FROM items")}
        assert names == {"taken", "one", "two"}
    finally:
        await db.close()


async def test_migrations_apply_once_and_a_failed_one_changes_nothing(database_settings: DatabaseSettings) -> None:
    db = await open_database(database_settings, SCHEMA)
    await db.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "kept", 1)
    await db.close()

    broken = Migration([*SCHEMA.steps, "ALTER TABLE items ADD COLUMN color TEXT; CREATE TABLE items (x TEXT)"])
    with pytest.raises(MigrationError, match="version 2"):
        await open_database(database_settings, broken)

    async def add_column(tx: Connection) -> None:
        await tx.execute("ALTER TABLE items ADD COLUMN color TEXT")

    db = await open_database(database_settings, Migration([*SCHEMA.steps, add_column]))
    try:
        # Version 1 did not run again (the row is still there); version 2 ran after the failure.
        assert await db.fetchval("SELECT COUNT(*) FROM items") == 1
        assert await db.fetchval("SELECT MAX(version) FROM schema_migrations") == 2
        assert await db.execute("UPDATE items SET color = $1", "red") == 1
    finally:
        await db.close()


async def test_two_replicas_migrating_at_once_apply_each_step_once(postgres_url: str, tmp_path: object) -> None:
    settings = DatabaseSettings(sqlite_path="unused", schema="svc", url=postgres_url, pool_size=2)
    applied = 0

    async def counted(tx: Connection) -> None:
        nonlocal applied
        applied += 1
        await asyncio.sleep(0.2)  # the other replica arrives meanwhile and must wait
        await tx.execute("CREATE TABLE counted (id INTEGER)")

    dbs = await asyncio.gather(*(open_database(settings, Migration([counted])) for _ in range(2)))
    try:
        assert applied == 1
        assert await dbs[1].fetchval("SELECT COUNT(*) FROM schema_migrations") == 1
    finally:
        for db in dbs:
            await db.close()


async def test_schemas_share_one_database(postgres_url: str) -> None:
    a = DatabaseSettings(sqlite_path="unused", schema="alpha", url=postgres_url, pool_size=2)
    dbs = [await open_database(s, SCHEMA) for s in (a, dataclasses.replace(a, schema="beta"))]
    try:
        await dbs[0].execute("INSERT INTO items (name, size) VALUES ($1, $2)", "in-alpha", 1)
        assert await dbs[1].fetchval("SELECT COUNT(*) FROM items") == 0
        conn = await asyncpg.connect(postgres_url)
        try:
            assert await conn.fetchval("SELECT name FROM alpha.items") == "in-alpha"
        finally:
            await conn.close()
    finally:
        for db in dbs:
            await db.close()


async def test_a_pool_connection_goes_back_without_a_reset_round_trip(postgres_url: str) -> None:
    # asyncpg's default reset ran four statements at every release: a fifth of what PostgreSQL
    # did on the hot path. The stores keep no session state, so a release sends nothing, and a
    # transaction an interrupted caller left open is still rolled back.
    settings = DatabaseSettings(sqlite_path="unused", schema="resets", url=postgres_url, pool_size=1)
    db = await open_database(settings, SCHEMA)
    observer = await asyncpg.connect(postgres_url)
    try:
        assert await db.fetchval("SELECT 41 + $1", 1) == 42
        last = await observer.fetchval(
            "SELECT query FROM pg_stat_activity WHERE application_name = 'threadline-resets'")
        assert last == "SELECT 41 + $1"

        async def interrupted() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (name, size) VALUES ($1, $2)", "half-done", 1)
                await asyncio.sleep(60)

        task = asyncio.create_task(interrupted())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await db.fetchval("SELECT COUNT(*) FROM items") == 0
    finally:
        await observer.close()
        await db.close()


async def test_sqlite_reads_cannot_write(tmp_path: object) -> None:
    db = await open_database(DatabaseSettings(sqlite_path=f"{tmp_path}/svc.db", schema="svc"), SCHEMA)
    try:
        with pytest.raises(Exception, match=r"readonly|read-only"):
            await db.fetch("INSERT INTO items (name, size) VALUES ($1, $2) RETURNING seq", "sneaky", 1)
    finally:
        await db.close()


def test_sql_translation() -> None:
    assert sqlite_query("SELECT $1, $2, $1 FROM t WHERE a = $10") == "SELECT ?1, ?2, ?1 FROM t WHERE a = ?10"
    ddl = postgres_ddl("CREATE TABLE t (seq INTEGER PRIMARY KEY, n integer NOT NULL, w REAL, b BLOB, s TEXT)")
    assert ddl == ("CREATE TABLE t (seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL,"
                   " w DOUBLE PRECISION, b BYTEA, s TEXT)")
    assert postgres_ddl("seq INTEGER PRIMARY KEY AUTOINCREMENT,") == (
        "seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,")


@pytest.mark.parametrize("environ, message", [
    ({"THREADLINE_DATABASE_URL": "mysql://x/y"}, "postgresql://"),
    ({"THREADLINE_DATABASE_POOL_SIZE": "0"}, "between 1"),
    ({"THREADLINE_DATABASE_POOL_SIZE": "many"}, "integer"),
])
def test_settings_refuse_what_cannot_run(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DatabaseSettings.from_env("/data", "svc", environ)


def test_settings_pick_the_engine_from_the_url() -> None:
    assert DatabaseSettings.from_env("/data", "svc", {}).engine == "sqlite"
    assert DatabaseSettings.from_env("/data", "svc", {}).sqlite_path == "/data/svc.db"
    pg = DatabaseSettings.from_env("/data", "svc", {"THREADLINE_DATABASE_URL": "postgresql://u:p@db:5432/tl",
                                                    "THREADLINE_DATABASE_POOL_SIZE": "20"})
    assert (pg.engine, pg.schema, pg.pool_size) == ("postgres", "svc", 20)


async def test_sqlite_erasure_leaves_no_log_behind(tmp_path: object) -> None:
    path = f"{tmp_path}/svc.db"
    db = await open_database(DatabaseSettings(sqlite_path=path, schema="svc"), SCHEMA)
    try:
        await db.execute("INSERT INTO items (name, size, body) VALUES ($1, $2, $3)", "secret", 1, b"personal data")
        await db.execute("DELETE FROM items WHERE name = $1", "secret")
        assert await db.erase_freed_pages() is True

        assert os.path.getsize(f"{path}-wal") == 0
        with open(path, "rb") as fh:
            assert b"personal data" not in fh.read()
    finally:
        await db.close()
