"""One store layer, two engines: PostgreSQL through asyncpg, or SQLite on the event loop thread.

A store writes its SQL once, with PostgreSQL's `$1` placeholders, against `Connection`:
`execute` (rows affected), `executemany`, `fetch`, `fetchrow`, `fetchval`. `open_database`
picks the engine from `DatabaseSettings`: a `postgresql://` URL (THREADLINE_DATABASE_URL) means
a pool on that database with the service's tables in a schema named after it; no URL means a
file of its own under the data directory, as `make up` runs.

SQLite runs on plain `sqlite3` connections, synchronously on the event loop thread: its
statements cost a few microseconds, a hop to a worker thread per statement costs more CPU than
that (measured on the hot path, see README "Performance"). Writes go through one writer
connection, serialized by a lock and never interleaved with another coroutine's transaction;
reads outside a transaction go through a second, read-only connection, so they see committed
data only, as a read on a PostgreSQL pool does.

Migrations (`Migration`) are numbered steps, recorded in `schema_migrations`: SQL scripts written
in the SQLite dialect the stores always used (`INTEGER`, `REAL`, `BLOB`, `INTEGER PRIMARY KEY`),
translated for PostgreSQL by `postgres_ddl`, or async functions for a step that differs by
engine. All pending steps run in one transaction; on PostgreSQL under an advisory lock, so two
replicas starting together apply them once. A failed step leaves the schema as it was and
raises `MigrationError`.

`GroupCommit` batches the writes concurrent coroutines hand in during one turn of the loop into
one transaction.

Latency goes to `shared.metrics` (`threadline_store_duration_seconds`, by engine and operation):
one measurement per call of a `Database` method, per transaction (named by its caller:
`transaction`, `group_commit`, `migrate`, `executemany`), never per statement inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import sqlite3
import time
import weakref
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

import asyncpg

from shared import metrics
from shared.config import ConfigError, env_int, env_str
from shared.files import ensure_private_file, private_dir

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
Engine = Literal["sqlite", "postgres"]
ENGINES: tuple[Engine, ...] = ("sqlite", "postgres")

POSTGRES_SCHEMES = ("postgresql", "postgres")
DEFAULT_POOL_SIZE = 10
MAX_POOL_SIZE = 500
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=5000",
                  # Deleted rows are overwritten, not just unlinked: an erased user's data must
                  # not stay readable in free pages of the file.
                  "secure_delete=ON",
                  # Statement journals and sorts in memory: on disk each was a file created,
                  # unlinked and written page by page per transaction (60 % of conversations'
                  # pwrite calls under load), and it left customers' data in /var/tmp's blocks.
                  "temp_store=MEMORY")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class Row(Protocol):
    """A result row: by column name or position (`sqlite3.Row` and `asyncpg.Record` both are)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...

    def keys(self) -> Any: ...


# What a violated constraint (unique, foreign key, not null, check) raises, on either engine.
INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


# What a statement raises when the database cannot be reached (down, failing over, restarting):
# callers answer 503 so the sender retries, and readiness turns false (`Database.ping`).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.InterfaceError,
)
# What a transaction raises when PostgreSQL chose it as the loser of a conflict with another
# replica's (a deadlock, a serialization failure): nothing was written; the same request or
# message succeeds when tried again. Consumers nak and retry; the API answers 503 + Retry-After.
CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
)
PING_TIMEOUT_SECONDS = 2.0


class MigrationError(RuntimeError):
    """A schema migration failed; the schema is left as it was."""


@dataclass(frozen=True)
class DatabaseSettings:
    """Where a service keeps its state: a PostgreSQL URL, or a SQLite file of its own."""

    sqlite_path: str
    schema: str
    url: str | None = None
    pool_size: int = DEFAULT_POOL_SIZE

    @property
    def engine(self) -> Engine:
        return "sqlite" if self.url is None else "postgres"

    @classmethod
    def from_env(cls, data_dir: str, service: str, environ: Mapping[str, str] | None = None) -> DatabaseSettings:
        """THREADLINE_DATABASE_URL (a postgresql:// URL, or unset for SQLite under `data_dir`) and
        THREADLINE_DATABASE_POOL_SIZE (connections per process on PostgreSQL)."""
        url = env_str("THREADLINE_DATABASE_URL", "", environ) or None
        if url is not None:
            scheme = urlsplit(url).scheme
            if scheme not in POSTGRES_SCHEMES:
                raise ConfigError(f"THREADLINE_DATABASE_URL must be a postgresql:// URL, got a {scheme or 'bare'} one")
        pool_size = env_int("THREADLINE_DATABASE_POOL_SIZE", DEFAULT_POOL_SIZE, environ)
        if not 1 <= pool_size <= MAX_POOL_SIZE:
            raise ConfigError(f"THREADLINE_DATABASE_POOL_SIZE must be between 1 and {MAX_POOL_SIZE}")
        return cls(sqlite_path=os.path.join(data_dir, f"{service}.db"), schema=service, url=url, pool_size=pool_size)


class Connection(Protocol):
    """What a store's SQL runs on: the database itself, or one transaction."""

    engine: Engine

    async def execute(self, query: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        """Run a statement once per parameter tuple."""
        ...

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        """Every row of a query."""
        ...

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        """The first row of a query, or None."""
        ...

    async def fetchval(self, query: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        ...


class Database(Connection, Protocol):
    """A service's database: reads and single writes directly, `transaction()` for atomic groups."""

    settings: DatabaseSettings

    def transaction(self, operation: str = "transaction") -> contextlib.AbstractAsyncContextManager[Connection]:
        """`async with db.transaction() as tx:` — every statement on `tx` commits together, or none.

        `operation` names it in the store latency metric (one of `shared.metrics.STORE_OPERATIONS`)."""
        ...

    async def ping(self) -> bool:
        """Whether the database answers now (a readiness check)."""
        ...

    async def erase_freed_pages(self) -> bool:
        """After deleting personal data: make the deleted rows' bytes unreadable on disk where the
        engine allows it (SQLite truncates its write-ahead log; see README "Privacy" for PostgreSQL)."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...


_savepoints = 0


@contextlib.asynccontextmanager
async def savepoint(tx: Connection) -> AsyncIterator[Connection]:
    """`async with savepoint(tx):` inside a transaction — an error in the block undoes the block
    alone, and the transaction goes on (PostgreSQL refuses every later statement of a
    transaction after an error unless it is rolled back to a savepoint)."""
    global _savepoints
    _savepoints += 1
    name = f"sp_{_savepoints}"
    await tx.execute(f"SAVEPOINT {name}")
    try:
        yield tx
    except BaseException:
        await tx.execute(f"ROLLBACK TO SAVEPOINT {name}")
        await tx.execute(f"RELEASE SAVEPOINT {name}")
        _forget_verified(tx)
        raise
    await tx.execute(f"RELEASE SAVEPOINT {name}")


# What each open transaction has verified and still holds (see `verified_in`).
_VERIFIED: weakref.WeakKeyDictionary[Connection, set[Hashable]] = weakref.WeakKeyDictionary()


def verified_in(tx: Connection) -> set[Hashable]:
    """Facts this transaction has checked and locked (e.g. with `SELECT … FOR SHARE`), so that a
    later write of the same transaction need not check them again. Forgotten when the
    transaction ends and whenever it rolls back to a savepoint (whose locks go with it)."""
    facts = _VERIFIED.get(tx)
    if facts is None:
        facts = _VERIFIED[tx] = set()
    return facts


def _forget_verified(tx: Connection) -> None:
    _VERIFIED.pop(tx, None)


async def serialize(tx: Connection, name: str) -> None:
    """Make the rest of this transaction run one at a time with every other transaction that
    serializes on `name`, in any replica: for a decision that counts rows before inserting,
    which no unique constraint can express. PostgreSQL takes a transaction-scoped advisory lock;
    SQLite's write transaction already holds the file's write lock from its BEGIN IMMEDIATE."""
    if tx.engine == "postgres":
        await tx.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(name))


Step = str | Callable[[Connection], Awaitable[None]]


@dataclass(frozen=True)
class Migration:
    """Version i+1 of a schema is `steps[i]`: a SQL script or an async function of the transaction."""

    steps: Sequence[Step]


# --- SQL text ----------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$(\d+)")
_SQLITE_QUERIES: dict[str, str] = {}


def sqlite_query(query: str) -> str:
    """`$1` placeholders as SQLite's numbered `?1` (the same parameter may appear twice)."""
    translated = _SQLITE_QUERIES.get(query)
    if translated is None:
        translated = _PLACEHOLDER.sub(r"?\1", query)
        if len(_SQLITE_QUERIES) < 4096:  # dynamic IN lists must not grow this forever
            _SQLITE_QUERIES[query] = translated
    return translated


_DDL_WORDS = (
    # An identity column never reuses a value, which is all AUTOINCREMENT asks of SQLite.
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b", re.IGNORECASE),
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
)


def postgres_ddl(script: str) -> str:
    """A migration written for SQLite, as PostgreSQL DDL: 64-bit integers (SQLite's are), doubles,
    BYTEA, and an identity column where SQLite has its rowid alias."""
    for pattern, replacement in _DDL_WORDS:  # the rowid alias first: INTEGER would match it
        script = pattern.sub(replacement, script)
    return script


def like_containing(text: str) -> str:
    """A `LIKE $n ESCAPE '!'` pattern matching `text` anywhere, its `%`, `_` and `!` taken literally
    (the same on both engines: PostgreSQL's default escape, the backslash, is common in JSON text)."""
    return "%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


def split_sql(script: str) -> list[str]:
    """The statements of a script (no `;` inside literals in our migrations)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _rows_affected(status: str) -> int:
    """asyncpg's command tag (`UPDATE 3`, `INSERT 0 1`) as a count."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


# --- latency -----------------------------------------------------------------------------------

class _Timed(Protocol):
    engine: Engine


D = TypeVar("D", bound=_Timed)


_Method = Callable[Concatenate[D, P], Coroutine[Any, Any, T]]


def _timed(operation: str) -> Callable[[_Method[D, P, T]], _Method[D, P, T]]:
    """Record one call in `metrics.STORE_SAMPLE` of a database method in the store latency
    metric (raising ones too). A record costs several µs, more than a SQLite read: every call
    would add a visible share of the hot path's CPU; the others return the method's own
    coroutine, with no frame of ours around it."""
    attributes = {engine: metrics.store_attributes(engine, operation) for engine in ENGINES}
    calls = itertools.count()

    async def recorded(call: Coroutine[Any, Any, T], engine: Engine) -> T:
        started = time.perf_counter()
        try:
            return await call
        finally:
            metrics.store_elapsed(started, attributes[engine])

    def wrap(method: _Method[D, P, T]) -> _Method[D, P, T]:
        @functools.wraps(method)
        def timed(self: D, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
            call = method(self, *args, **kwargs)
            if next(calls) % metrics.STORE_SAMPLE:
                return call
            return recorded(call, self.engine)

        return timed

    return wrap


# --- SQLite ------------------------------------------------------------------------------------

def _sqlite_connect(path: str, *, read_only: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    for pragma in SQLITE_PRAGMAS:
        conn.execute(f"PRAGMA {pragma}")
    if read_only:
        # A write on the read path is a bug (it would bypass the write lock): fail loudly.
        conn.execute("PRAGMA query_only=ON")
    return conn


class SqliteConnection:
    """Statements on one sqlite3 connection, run at once on the calling thread."""

    engine: Engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def execute(self, query: str, *args: Any) -> int:
        return self.conn.execute(sqlite_query(query), args).rowcount

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sqlite_query(query), args)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return self.conn.execute(sqlite_query(query), args).fetchall()

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        row: Row | None = self.conn.execute(sqlite_query(query), args).fetchone()
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        row = self.conn.execute(sqlite_query(query), args).fetchone()
        return None if row is None else row[0]


class SqliteDatabase:
    """A service's SQLite file: a writer connection behind a lock, a read-only one for reads."""

    engine: Engine = "sqlite"

    def __init__(self, settings: DatabaseSettings, writer: sqlite3.Connection, reader: sqlite3.Connection) -> None:
        self.settings = settings
        self.lock = asyncio.Lock()
        self._writer = SqliteConnection(writer)
        self._reader = SqliteConnection(reader)

    @classmethod
    def open(cls, settings: DatabaseSettings) -> SqliteDatabase:
        """Open the file (creating its 0700 folder; the file and its -wal/-shm are 0600)."""
        path = settings.sqlite_path
        if path != ":memory:":
            private_dir(os.path.dirname(os.path.abspath(path)))
            for existing in (path, f"{path}-wal", f"{path}-shm"):
                if existing == path or os.path.exists(existing):
                    ensure_private_file(existing)
        writer = _sqlite_connect(path, read_only=False)
        return cls(settings, writer, _sqlite_connect(path, read_only=True))

    @_timed("execute")
    async def execute(self, query: str, *args: Any) -> int:
        async with self.lock:
            return await self._writer.execute(query, *args)

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        async with self.transaction("executemany") as tx:
            await tx.executemany(query, args)

    @_timed("fetch")
    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return await self._reader.fetch(query, *args)

    @_timed("fetchrow")
    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        return await self._reader.fetchrow(query, *args)

    @_timed("fetchval")
    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._reader.fetchval(query, *args)

    @contextlib.asynccontextmanager
    async def transaction(self, operation: str = "transaction") -> AsyncIterator[Connection]:
        started = time.perf_counter()
        try:
            async with self.lock:
                conn = self._writer.conn
                conn.execute("BEGIN IMMEDIATE")
                _forget_verified(self._writer)  # the writer serves every transaction in turn
                try:
                    yield self._writer
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            metrics.store_elapsed(started, metrics.store_attributes(self.engine, operation))

    async def ping(self) -> bool:
        return True  # a file of this process: it answers whenever the process does

    async def erase_freed_pages(self) -> bool:
        async with self.lock:
            return await _truncate_wal(self._writer.conn)

    async def close(self) -> None:
        async with self.lock:
            self._writer.conn.close()
            self._reader.conn.close()


TRUNCATE_ATTEMPTS = 50
TRUNCATE_RETRY_SECONDS = 0.02


async def _truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the write-ahead log into the file and truncate it, so the pages erased rows were
    written in (older versions, still in the log) leave the disk. A reader in another process
    makes SQLite report busy for a moment: retried for about a second, then left to the next
    checkpoint."""
    for attempt in range(TRUNCATE_ATTEMPTS):
        if attempt:
            await asyncio.sleep(TRUNCATE_RETRY_SECONDS)
        try:
            row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            continue
        if row is not None and int(row[0]) == 0:
            return True
    log.warning("the write-ahead log of a database stayed in use; erased rows' old pages wait for the next checkpoint")
    return False


# --- PostgreSQL --------------------------------------------------------------------------------

class PostgresConnection:
    """Statements on one pooled asyncpg connection (inside a transaction)."""

    engine: Engine = "postgres"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, query: str, *args: Any) -> int:
        return _rows_affected(await self.conn.execute(query, *args))

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        await self.conn.executemany(query, args)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return list(await self.conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        row: Row | None = await self.conn.fetchrow(query, *args)
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.conn.fetchval(query, *args)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """A pool connection's reset on release: nothing to do (asyncpg still rolls back a transaction
    left open). The stores hold no session state (advisory locks are transaction-scoped; no
    LISTEN, cursors or SET), and asyncpg's default reset cost a round trip and four statements per
    release: on the hot path, a fifth of the statements PostgreSQL ran."""


class PostgresDatabase:
    """A pool on the database of the URL, with `search_path` set to the service's schema."""

    engine: Engine = "postgres"

    def __init__(self, settings: DatabaseSettings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> PostgresDatabase:
        """Connect (the schema is created if missing) and size the pool from the settings."""
        assert settings.url is not None
        if not _SCHEMA_NAME.match(settings.schema):
            raise ConfigError(f"not a usable schema name: {settings.schema!r}")
        conn = await asyncpg.connect(settings.url)
        try:
            # Two replicas starting at once may both try: the loser's error is harmless.
            with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateSchemaError):
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema}"')
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(
            settings.url, min_size=1, max_size=settings.pool_size, reset=_keep_session,
            server_settings={"search_path": settings.schema, "application_name": f"threadline-{settings.schema}"})
        return cls(settings, pool)

    @_timed("execute")
    async def execute(self, query: str, *args: Any) -> int:
        return _rows_affected(await self.pool.execute(query, *args))

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        async with self.transaction("executemany") as tx:
            await tx.executemany(query, args)

    @_timed("fetch")
    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return list(await self.pool.fetch(query, *args))

    @_timed("fetchrow")
    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        row: Row | None = await self.pool.fetchrow(query, *args)
        return row

    @_timed("fetchval")
    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.pool.fetchval(query, *args)

    @contextlib.asynccontextmanager
    async def transaction(self, operation: str = "transaction") -> AsyncIterator[Connection]:
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                yield PostgresConnection(conn)
        finally:
            metrics.store_elapsed(started, metrics.store_attributes(self.engine, operation))

    async def ping(self) -> bool:
        try:
            return bool(await self.pool.fetchval("SELECT 1", timeout=PING_TIMEOUT_SECONDS) == 1)
        except Exception:  # whatever the failure, the answer is "not now"
            return False

    async def erase_freed_pages(self) -> bool:
        # PostgreSQL reclaims dead rows with (auto)vacuum; it never zeroes them. Physical erasure
        # there is the storage's encryption and retention (README "Privacy").
        return True

    async def close(self) -> None:
        await self.pool.close()


# --- opening and migrating -------------------------------------------------------------------

async def open_database(settings: DatabaseSettings, migration: Migration,
                        at_start: Callable[[Connection], Awaitable[None]] | None = None) -> Database:
    """Open the service's database on its engine and bring its schema up to date; then run
    `at_start` (in a transaction of its own: it must be idempotent, every replica runs it)."""
    db: Database
    if settings.url is None:
        db = SqliteDatabase.open(settings)
    else:
        db = await PostgresDatabase.open(settings)
    try:
        await migrate(db, migration)
        if at_start is not None:
            async with db.transaction() as tx:
                await at_start(tx)
    except BaseException:
        await db.close()
        raise
    return db


async def migrate(db: Database, migration: Migration) -> int:
    """Apply the steps newer than the recorded version, in one transaction; the version reached.

    On PostgreSQL a transaction-scoped advisory lock named after the schema makes a second
    replica wait, then find the steps applied.
    """
    async with db.transaction("migrate") as tx:
        if tx.engine == "postgres":
            await tx.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(f"migrate:{db.settings.schema}"))
        await tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY,"
                         " applied_at DOUBLE PRECISION)")
        current = int(await tx.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
        for version, step in enumerate(migration.steps, start=1):
            if version <= current:
                continue
            try:
                if isinstance(step, str):
                    for statement in split_sql(step if tx.engine == "sqlite" else postgres_ddl(step)):
                        await tx.execute(statement)
                else:
                    await step(tx)
            except Exception as exc:
                raise MigrationError(
                    f"migrating the {db.settings.schema} database to version {version} failed, nothing was"
                    f" changed: {type(exc).__name__}: {exc}") from exc
            await tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                             version, time.time())
            log.info("%s database migrated to version %d", db.settings.schema, version)
            current = version
    return current


def _lock_key(name: str) -> int:
    """A stable key for an advisory lock."""
    return zlib.crc32(f"threadline:{name}".encode())


# --- group commit ------------------------------------------------------------------------------

_Op = tuple[Callable[[Connection], Awaitable[Any]], "asyncio.Future[Any]"]


class GroupCommit:
    """Runs the writes that concurrent coroutines hand in during one turn of the loop together,
    in one transaction: one commit — the costly part of a small write — for a whole consumer
    batch instead of one per message.

    A function that raises is undone alone and its caller gets the exception; the others
    commit. The functions run one after another; only when one raises is the transaction rolled
    back and the batch run again in a new one with a savepoint around each function (two more
    statements per function, which the common case need not pay). So a function must
    depend on nothing but the connection: it may run twice. `run` returns only after the
    COMMIT, so a caller acknowledging a message afterwards acknowledges a durable write.
    Each batch is one `group_commit` measurement of the store latency metric.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[_Op] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, op: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `await op(tx)` in the next group transaction; its result once committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="db:group-commit")
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # the other coroutines of this turn hand theirs in
        while self._queue:
            ops, self._queue = self._queue, []
            await self._commit(ops)

    async def _commit(self, ops: list[_Op]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            try:
                async with self.db.transaction("group_commit") as tx:
                    outcomes = [(True, await op(tx)) for op, _ in ops]
            except Exception:
                if len(outcomes) == len(ops):  # the COMMIT failed, not a function: nothing to sort out
                    raise
                # A function raised and the transaction was rolled back: again, each function
                # undone alone if it raises (a savepoint around the whole batch would have cost
                # every batch a statement, and SQLite a copy of each page it changed).
                async with self.db.transaction("group_commit") as tx:
                    outcomes = await self._each_in_savepoint(tx, ops)
        except Exception as exc:
            for _, future in ops:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(ops, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    async def _each_in_savepoint(tx: Connection, ops: list[_Op]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for op, _ in ops:
            await tx.execute("SAVEPOINT op")
            try:
                outcomes.append((True, await op(tx)))
            except Exception as exc:
                await tx.execute("ROLLBACK TO SAVEPOINT op")
                _forget_verified(tx)
                outcomes.append((False, exc))
            await tx.execute("RELEASE SAVEPOINT op")
        return outcomes
