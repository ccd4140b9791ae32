"""SQLite through aiosqlite, with the pragmas every service uses and numbered migrations.

Keep SQL portable (no SQLite-only syntax beyond `INSERT ... ON CONFLICT`), so a PostgreSQL
backend can follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from shared.files import ensure_private_file, private_dir

log = logging.getLogger(__name__)
T = TypeVar("T")


async def open_db(path: str, migrations: Sequence[str]) -> aiosqlite.Connection:
    """Open (creating folders as needed) a database and apply pending migrations.

    `migrations[i]` is the SQL script of version i+1; applied versions are recorded in
    `schema_migrations`, so a migration runs once, in order, inside a transaction.

    The folder is 0700 and the file 0600 (SQLite gives its -wal and -shm files the database
    file's mode); those of older data directories are restricted here.
    """
    if path != ":memory:":
        private_dir(os.path.dirname(os.path.abspath(path)))
        for existing in (path, f"{path}-wal", f"{path}-shm"):
            if existing == path or os.path.exists(existing):
                ensure_private_file(existing)
    db = await aiosqlite.connect(path, isolation_level=None)
    db.row_factory = aiosqlite.Row
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("PRAGMA foreign_keys=ON")
    await db.execute("PRAGMA busy_timeout=5000")
    # Deleted rows are overwritten, not just unlinked: an erased user's data must not stay
    # readable in free pages of the file.
    await db.execute("PRAGMA secure_delete=ON")
    await db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    for version, script in enumerate(migrations, start=1):
        if version <= current:
            continue
        await db.execute("BEGIN")
        try:
            for statement in _split_sql(script):
                await db.execute(statement)
            await db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))",
                             (version,))
            await db.execute("COMMIT")
        except Exception:
            await db.execute("ROLLBACK")
            raise
    return db


HOT_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=5000", "secure_delete=ON")


def open_hot_connection(path: str) -> sqlite3.Connection:
    """A plain sqlite3 connection to an already opened (migrated) database, with the same
    pragmas, for a hot path that runs its few statements on the event loop thread: a hop to
    aiosqlite's thread per statement costs more CPU than the statements themselves.

    Write on it only while holding the lock that serializes the service's writes (with no
    aiosqlite transaction open, a write here never waits), and read on the other connection
    only in one hop (`execute_fetchall`): see `truncate_wal` and the stores' `_one`."""
    hot = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    hot.row_factory = sqlite3.Row
    for pragma in HOT_PRAGMAS:
        hot.execute(f"PRAGMA {pragma}")
    return hot


_Op = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class GroupCommit:
    """Runs the write functions that concurrent coroutines hand in during one turn of the loop
    together, in one transaction on a plain sqlite3 connection (`open_hot_connection`), on the
    event loop thread: one commit — the costly part of a small write — for a whole consumer
    batch instead of one per message.

    A function that raises is undone alone and its caller gets the exception; the others
    commit. The functions run one after another in the transaction; only when one raises is
    the batch undone (to a savepoint taken at its start) and run again with a savepoint around
    each function (two more statements per function, which the common case need not pay). So a
    function must depend on nothing but the connection: it may run twice. `run` returns only
    after the COMMIT, so a caller
    acknowledging a message afterwards acknowledges a durable write. `lock` is the lock every
    writer of the database holds, so the transaction never waits on an aiosqlite one.
    """

    def __init__(self, hot: sqlite3.Connection, lock: asyncio.Lock) -> None:
        self.hot = hot
        self.lock = lock
        self._queue: list[_Op] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op(connection)` in the next group transaction; its result once committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="sqlite:group-commit")
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # the other coroutines of this turn hand theirs in
        while self._queue:
            async with self.lock:
                ops, self._queue = self._queue, []
                self._commit(ops)

    def _commit(self, ops: list[_Op]) -> None:
        hot = self.hot
        try:
            hot.execute("BEGIN IMMEDIATE")
            # One savepoint for the batch (the write lock stays held if it has to run again).
            hot.execute("SAVEPOINT batch")
            try:
                outcomes: list[tuple[bool, Any]] = [(True, op(hot)) for op, _ in ops]
            except Exception:
                hot.execute("ROLLBACK TO batch")
                outcomes = self._each_in_savepoint(ops)
            hot.execute("COMMIT")
        except Exception as exc:
            if hot.in_transaction:
                hot.execute("ROLLBACK")
            for _, future in ops:
                if not future.done():
                    future.set_exception(exc)
            return
        self._settle(ops, outcomes)

    def _each_in_savepoint(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        hot = self.hot
        outcomes: list[tuple[bool, Any]] = []
        for op, _ in ops:
            hot.execute("SAVEPOINT op")
            try:
                outcomes.append((True, op(hot)))
            except Exception as exc:
                hot.execute("ROLLBACK TO op")
                outcomes.append((False, exc))
            hot.execute("RELEASE op")
        return outcomes

    @staticmethod
    def _settle(ops: list[_Op], outcomes: list[tuple[bool, Any]]) -> None:
        for (_, future), (ok, value) in zip(ops, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


TRUNCATE_ATTEMPTS = 50
TRUNCATE_RETRY_SECONDS = 0.02


async def truncate_wal(db: aiosqlite.Connection) -> bool:
    """Checkpoint the write-ahead log into the database and truncate it, so the pages erased
    rows were written in (earlier versions, still in the log) are gone from disk too.

    A read another coroutine has open on the same connection makes SQLite refuse the
    checkpoint ("database table is locked") and a reader elsewhere makes it report busy: both
    end within moments, so it is retried for about a second. False when it never got through
    (a later call or the next automatic checkpoint finishes the job)."""
    for attempt in range(TRUNCATE_ATTEMPTS):
        if attempt:
            await asyncio.sleep(TRUNCATE_RETRY_SECONDS)
        try:
            async with db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                row = await cur.fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            continue
        if row is not None and int(row[0]) == 0:
            return True
    log.warning("the write-ahead log of a database stayed in use; erased rows' old pages wait for the next checkpoint")
    return False


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def db_path(data_dir: str, service: str) -> str:
    """Path of a service's database under the data directory."""
    return os.path.join(data_dir, f"{service}.db")


_WRITE_LOCKS: weakref.WeakKeyDictionary[aiosqlite.Connection, asyncio.Lock] = weakref.WeakKeyDictionary()


def write_lock(db: aiosqlite.Connection) -> asyncio.Lock:
    """The lock that serializes writes on one connection.

    aiosqlite runs every coroutine's statements on one connection: without this lock a
    statement from another coroutine would land inside (and be rolled back with) a transaction
    it does not belong to. Hold it for every write, single statements included.
    """
    lock = _WRITE_LOCKS.get(db)
    if lock is None:
        lock = _WRITE_LOCKS[db] = asyncio.Lock()
    return lock


@contextlib.asynccontextmanager
async def transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """`async with transaction(db):` — BEGIN … COMMIT under the write lock; ROLLBACK on error."""
    async with write_lock(db):
        await db.execute("BEGIN")
        try:
            yield db
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
