"""The conversations database: apps, keys, integrations, webhooks, conversations, messages.

One aiosqlite connection. Every write runs inside `Store.tx()`, which holds a lock: on a shared
connection an open transaction would otherwise swallow another coroutine's statements.
Methods named `add_*`, `set_*`, `delete_*`, `upsert_*`, `insert_*` must be called inside `tx()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite
import msgspec

from shared import records
from shared.encryption import Keyring
from shared.store import GroupCommit, open_db, open_hot_connection, truncate_wal
from shared.sunco import ConversationRef, Message

# Stored message bodies are `Message` JSON.
MESSAGE_DECODER = msgspec.json.Decoder(Message)


class _PrivacySettings(msgspec.Struct, rename="camel"):
    mask_credit_card_numbers: bool | None = None
    conversation_retention_seconds: int | None = None


# Reads the privacy keys of an app's settings JSON without building the whole dict.
_PRIVACY_SETTINGS = msgspec.json.Decoder(_PrivacySettings)


def _privacy(settings: str) -> _PrivacySettings:
    try:
        return _PRIVACY_SETTINGS.decode(settings)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _PrivacySettings()


def conversation_ref(row: aiosqlite.Row | sqlite3.Row) -> ConversationRef:
    """The `{id, type}` reference events carry, from a conversations row."""
    return ConversationRef(id=row["id"], type=row["type"])

MIGRATIONS: tuple[str, ...] = (
    # 1: the whole schema.
    """
    CREATE TABLE apps (
        id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        settings TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE app_keys (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        display_name TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX app_keys_app ON app_keys(app_id, id);
    CREATE TABLE integrations (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        status TEXT NOT NULL,
        display_name TEXT,
        config TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX integrations_app ON integrations(app_id, id);
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
        record TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX webhooks_integration ON webhooks(integration_id, id);
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        default_user_id TEXT,
        display_name TEXT,
        description TEXT,
        icon_url TEXT,
        metadata TEXT,
        business_last_read REAL,
        last_updated_at REAL NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX conversations_app ON conversations(app_id, id);
    CREATE UNIQUE INDEX conversations_default ON conversations(app_id, default_user_id);
    CREATE TABLE participants (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        user_external_id TEXT,
        unread_count INTEGER NOT NULL DEFAULT 0,
        last_read REAL,
        created_at REAL NOT NULL,
        UNIQUE (conversation_id, user_id)
    );
    CREATE INDEX participants_user ON participants(app_id, user_id);
    CREATE TABLE client_associations (
        participant_id TEXT NOT NULL REFERENCES participants(id) ON DELETE CASCADE,
        client_id TEXT NOT NULL,
        type TEXT NOT NULL,
        integration_id TEXT,
        external_id TEXT,
        info TEXT,
        last_active REAL NOT NULL,
        PRIMARY KEY (participant_id, client_id)
    );
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        app_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        author_type TEXT NOT NULL,
        user_id TEXT,
        integration_id TEXT,
        provider_message_id TEXT,
        event_id TEXT NOT NULL,
        received REAL NOT NULL,
        body TEXT NOT NULL
    );
    CREATE UNIQUE INDEX messages_provider ON messages(app_id, integration_id, provider_message_id);
    CREATE INDEX messages_conversation ON messages(conversation_id, seq);
    CREATE TABLE external_messages (
        app_id TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        provider_message_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (app_id, integration_id, provider_message_id)
    );
    """,
    # 2: pending direct links by phone (Clients API `userActivity` / `prompt`), see clients.py.
    """
    CREATE TABLE client_links (
        client_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        integration_id TEXT NOT NULL,
        client_type TEXT NOT NULL,
        phone_number TEXT NOT NULL,
        confirmation TEXT NOT NULL,
        is_primary INTEGER NOT NULL,
        source_integration_id TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX client_links_expiry ON client_links(expires_at);
    """,
    # 3: the e-mail integration's type became SunCo's `mailgun` (it was `email`, which the official
    # client cannot parse); startup republishes every record to KV, so the KV copies follow.
    """
    UPDATE integrations SET type = 'mailgun' WHERE type = 'email';
    """,
    # 4: merges waiting for the customer's yes on the channel that holds the history (a link code
    # redeemed by an identity with history of its own), see linking.py.
    """
    CREATE TABLE merge_confirmations (
        client_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        surviving_user_id TEXT NOT NULL,
        discarded_user_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        client_type TEXT NOT NULL,
        code TEXT,
        answer TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX merge_confirmations_expiry ON merge_confirmations(expires_at);
    """,
    # 5 (privacy): the retention sweep walks an app's conversations by inactivity.
    """
    CREATE INDEX conversations_activity ON conversations(app_id, last_updated_at, id);
    """,
)

_JSON = msgspec.json.Encoder()


def dumps(value: Any) -> str:
    """JSON text of a value (structs included)."""
    return _JSON.encode(value).decode()


def loads(text: str | None) -> Any:
    """Parse JSON text (None stays None)."""
    return None if text is None else msgspec.json.decode(text)


@dataclass(frozen=True)
class Association:
    """A client attached to a participant; the most recently active comes first (= primary)."""

    client_id: str
    type: str
    integration_id: str | None
    external_id: str | None
    info: dict[str, Any] | None
    last_active: float


@dataclass(frozen=True)
class StoredMessage:
    """A row of the messages table; `body` is the SunCo Message JSON."""

    seq: int
    id: str
    conversation_id: str
    event_id: str
    body: str


@dataclass(frozen=True)
class PendingMerge:
    """A merge waiting for the customer's yes on `client_id`'s channel (`merge_confirmations`):
    a link `code` for `conversation_id` was redeemed by an identity (of `discarded_user_id`) that
    holds history of its own."""

    client_id: str
    app_id: str
    surviving_user_id: str
    discarded_user_id: str
    conversation_id: str
    integration_id: str
    client_type: str
    code: str | None
    # The number the customer's yes must carry ("YES 4821"): a yes to anything else is not one.
    answer: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class InboundLookup:
    """What a customer message needs to know before it is handled, read in two statements."""

    integration_known: bool
    masks_cards: bool  # the app's `maskCreditCardNumbers`
    duplicate: StoredMessage | None  # the message already stored with this provider id


@dataclass(frozen=True)
class InboundRecord:
    """What `record_inbound` wrote: the message's cursor, and whether its client is new here."""

    seq: int | None
    participant_id: str | None = None
    new_client: bool = False
    # The new client joined a conversation the user already had other clients in (SunCo's client:add).
    joined_others: bool = False


def app_key_context(key_id: str) -> str:
    """What an app key's sealed secret is bound to."""
    return f"appkey:{key_id}:secret"


@dataclass(frozen=True)
class Resealed:
    """What `Store.reseal_secrets` changed: rows whose secrets it (re)sealed under the primary key."""

    app_keys: int = 0
    integrations: int = 0
    webhooks: int = 0


class Store:
    """Data access for the conversations service.

    App key secrets are sealed with `keyring` here; integration configs and webhook records
    arrive sealed (`Admin`), since the same sealed values go to KV.
    """

    def __init__(self, db: aiosqlite.Connection, hot: sqlite3.Connection | None = None,
                 keyring: Keyring | None = None) -> None:
        self.db = db
        self.keyring = keyring or Keyring()
        # The inbound hot path runs its few statements on this connection, on the event loop
        # thread: one aiosqlite thread hop per statement cost more CPU than the statements
        # themselves (bench/e2e.py). It writes only under `_lock`, like every other writer, so
        # it never waits on an open aiosqlite transaction.
        self.hot = hot
        self._lock = asyncio.Lock()
        self._group = GroupCommit(hot, self._lock) if hot is not None else None

    @classmethod
    async def open(cls, path: str, keyring: Keyring | None = None) -> Store:
        """Open (and migrate) the database at `path`."""
        db = await open_db(path, MIGRATIONS)
        return cls(db, open_hot_connection(path), keyring)

    async def close(self) -> None:
        """Close the connections."""
        if self.hot is not None:
            self.hot.close()
        await self.db.close()

    def _grouped(self) -> GroupCommit:
        assert self._group is not None, "store opened without its hot-path connection"
        return self._group

    def _hot(self) -> sqlite3.Connection:
        assert self.hot is not None, "store opened without its hot-path connection"
        return self.hot

    def inbound_lookup(self, app_id: str, integration_id: str, provider_message_id: str) -> InboundLookup:
        """Whether the app has the integration and masks card numbers, and the already-stored
        message with this provider id (hot path, no I/O wait)."""
        hot = self._hot()
        app = hot.execute("SELECT a.settings, i.id AS integration_id FROM apps a"
                          " LEFT JOIN integrations i ON i.app_id = a.id AND i.id = ? WHERE a.id = ?",
                          (integration_id, app_id)).fetchone()
        row = hot.execute("SELECT seq, id, conversation_id, event_id, body FROM messages"
                          " WHERE app_id=? AND integration_id=? AND provider_message_id=?",
                          (app_id, integration_id, provider_message_id)).fetchone()
        return InboundLookup(
            integration_known=app is not None and app["integration_id"] is not None,
            masks_cards=app is not None and bool(_privacy(app["settings"]).mask_credit_card_numbers),
            duplicate=None if row is None else StoredMessage(**dict(row)))

    def integration_type_now(self, integration_id: str) -> str | None:
        """An integration's type, read on the hot-path connection (None when unknown)."""
        row = self._hot().execute("SELECT type FROM integrations WHERE id=?", (integration_id,)).fetchone()
        return None if row is None else str(row["type"])

    def masks_cards_now(self, app_id: str) -> bool:
        """The app's `maskCreditCardNumbers` setting, read on the hot-path connection."""
        row = self._hot().execute("SELECT settings FROM apps WHERE id=?", (app_id,)).fetchone()
        return row is not None and bool(_privacy(row["settings"]).mask_credit_card_numbers)

    def default_conversation_now(self, app_id: str, user_id: str) -> sqlite3.Row | None:
        """`default_conversation` on the hot-path connection."""
        return self._hot().execute("SELECT * FROM conversations WHERE app_id=? AND default_user_id=?",
                                   (app_id, user_id)).fetchone()

    async def record_inbound(self, *, message_id: str, app_id: str, conversation_id: str, user_id: str,
                             user_external_id: str | None, integration_id: str, provider_message_id: str,
                             event_id: str, received: float, body: str, client_id: str, client_type: str,
                             client_integration_id: str | None, client_external_id: str | None,
                             client_info: dict[str, Any] | None) -> InboundRecord:
        """Store a customer message, touch the conversation and make the client primary, in one
        group transaction (`GroupCommit`). `seq` is None when the provider id was stored already
        (nothing written)."""
        def op(hot: sqlite3.Connection) -> InboundRecord:
            cur = hot.execute(
                "INSERT INTO messages (id, app_id, conversation_id, author_type, user_id, integration_id,"
                " provider_message_id, event_id, received, body) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (app_id, integration_id, provider_message_id) DO NOTHING",
                (message_id, app_id, conversation_id, "user", user_id, integration_id, provider_message_id,
                 event_id, received, body))
            if cur.rowcount == 0:
                return InboundRecord(seq=None)
            seq = cur.lastrowid
            hot.execute("UPDATE conversations SET last_updated_at=? WHERE id=?", (received, conversation_id))
            participant = hot.execute("SELECT * FROM participants WHERE conversation_id=? AND user_id=?",
                                      (conversation_id, user_id)).fetchone()
            if participant is None:
                return InboundRecord(seq=seq)
            participant_id = str(participant["id"])
            info = None if client_info is None else dumps(client_info)
            # A returning client (the common case) is one UPDATE; a new one is inserted.
            existed = hot.execute(
                "UPDATE client_associations SET last_active=?, type=?, integration_id=?, external_id=?, info=?"
                " WHERE participant_id=? AND client_id=?",
                (received, client_type, client_integration_id, client_external_id, info, participant_id,
                 client_id)).rowcount > 0
            if not existed:
                hot.execute(
                    "INSERT INTO client_associations (participant_id, client_id, type, integration_id,"
                    " external_id, info, last_active) VALUES (?,?,?,?,?,?,?) ON CONFLICT (participant_id,"
                    " client_id) DO UPDATE SET last_active=excluded.last_active, type=excluded.type,"
                    " integration_id=excluded.integration_id, external_id=excluded.external_id,"
                    " info=excluded.info",
                    (participant_id, client_id, client_type, client_integration_id, client_external_id, info,
                     received))
            if user_external_id is not None and user_external_id != participant["user_external_id"]:
                hot.execute("UPDATE participants SET user_external_id=? WHERE app_id=? AND user_id=?",
                            (user_external_id, app_id, user_id))
            joined_others = not existed and hot.execute(
                "SELECT 1 FROM client_associations WHERE participant_id=? AND client_id<>? LIMIT 1",
                (participant_id, client_id)).fetchone() is not None
            return InboundRecord(seq=seq, participant_id=participant_id, new_client=not existed,
                                 joined_others=joined_others)

        return await self._grouped().run(op)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[None]:
        """A write transaction (serialized with every other write of this process)."""
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    # --- generic helpers --------------------------------------------------------------------

    # A read runs to its end in one hop to aiosqlite's thread. Stepped over several hops, an open
    # SELECT holds a read snapshot that another coroutine's `tx()` on this connection inherits:
    # once the hot connection has committed, its BEGIN IMMEDIATE then fails at once with
    # "database is locked" (a stale snapshot cannot be upgraded to a writer).
    async def _one(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self.db.execute_fetchall(sql, params)
        return next(iter(rows), None)  # type: ignore[arg-type]

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        return list(await self.db.execute_fetchall(sql, params))  # type: ignore[arg-type]

    async def _run(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self.db.execute(sql, params) as cur:
            return cur.rowcount

    # --- apps and keys ----------------------------------------------------------------------

    async def add_app(self, app_id: str, display_name: str, settings: dict[str, Any],
                      metadata: dict[str, Any], now: float) -> None:
        await self._run("INSERT INTO apps (id, display_name, settings, metadata, created_at) VALUES (?,?,?,?,?)",
                        (app_id, display_name, dumps(settings), dumps(metadata), now))

    async def set_app(self, app_id: str, display_name: str, settings: dict[str, Any],
                      metadata: dict[str, Any]) -> None:
        await self._run("UPDATE apps SET display_name=?, settings=?, metadata=? WHERE id=?",
                        (display_name, dumps(settings), dumps(metadata), app_id))

    async def delete_app(self, app_id: str) -> int:
        return await self._run("DELETE FROM apps WHERE id=?", (app_id,))

    async def get_app(self, app_id: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM apps WHERE id=?", (app_id,))

    async def list_apps(self, after: str | None, before: str | None, limit: int) -> tuple[list[aiosqlite.Row], bool]:
        return await self._page("SELECT * FROM apps", "", (), after, before, limit, "apps")

    async def add_key(self, key_id: str, app_id: str, display_name: str, secret: str, now: float) -> None:
        """Store an app key; its secret is sealed (an HS256 JWT is verified with it, so it cannot be a hash)."""
        await self._run("INSERT INTO app_keys (id, app_id, display_name, secret, created_at) VALUES (?,?,?,?,?)",
                        (key_id, app_id, display_name, self.keyring.seal(secret, app_key_context(key_id)), now))

    def _key_out(self, row: aiosqlite.Row) -> dict[str, Any]:
        key = dict(row)
        key["secret"] = self.keyring.open(key["secret"], app_key_context(key["id"]))
        return key

    async def get_key(self, key_id: str) -> dict[str, Any] | None:
        """An app key's row, its secret opened."""
        row = await self._one("SELECT * FROM app_keys WHERE id=?", (key_id,))
        return None if row is None else self._key_out(row)

    async def list_keys(self, app_id: str) -> list[dict[str, Any]]:
        """An app's keys, their secrets opened."""
        return [self._key_out(row) for row in await self._all("SELECT * FROM app_keys WHERE app_id=? ORDER BY id",
                                                              (app_id,))]

    async def count_keys(self, app_id: str) -> int:
        row = await self._one("SELECT COUNT(*) FROM app_keys WHERE app_id=?", (app_id,))
        return int(row[0]) if row else 0

    async def reseal_secrets(self, integration_fields: Iterable[str]) -> Resealed:
        """Seal every secret under the keyring's primary key: plaintext ones (a data directory
        from before secrets were encrypted) and those sealed under an older key (rotation).

        One transaction; raises SecretsError (nothing changed) when a secret is sealed under a
        key the keyring does not hold.
        """
        fields = tuple(integration_fields)
        counts = {"app_keys": 0, "integrations": 0, "webhooks": 0}
        async with self.tx():
            for row in await self._all("SELECT id, secret FROM app_keys"):
                if self.keyring.needs_reseal(row["secret"]):
                    sealed = self.keyring.reseal(row["secret"], app_key_context(row["id"]))
                    await self._run("UPDATE app_keys SET secret=? WHERE id=?", (sealed, row["id"]))
                    counts["app_keys"] += 1
            for row in await self._all("SELECT id, config FROM integrations"):
                config = loads(row["config"])
                resealed = self.keyring.seal_fields(config, fields, records.integration_context(row["id"]))
                if resealed != config:
                    await self._run("UPDATE integrations SET config=? WHERE id=?", (dumps(resealed), row["id"]))
                    counts["integrations"] += 1
            for row in await self._all("SELECT id, record FROM webhooks"):
                hook = records.WEBHOOK_DECODER.decode(row["record"])
                if self.keyring.needs_reseal(hook.secret):
                    hook = msgspec.structs.replace(hook, secret=self.keyring.reseal(
                        hook.secret, records.webhook_secret_context(hook.id)))
                    await self._run("UPDATE webhooks SET record=? WHERE id=?",
                                    (records.ENCODER.encode(hook).decode(), row["id"]))
                    counts["webhooks"] += 1
        return Resealed(**counts)

    async def delete_key(self, app_id: str, key_id: str) -> int:
        return await self._run("DELETE FROM app_keys WHERE app_id=? AND id=?", (app_id, key_id))

    # --- integrations and webhooks ----------------------------------------------------------

    async def add_integration(self, integration_id: str, app_id: str, type_: str, status: str,
                              display_name: str | None, config: dict[str, Any], now: float) -> None:
        await self._run(
            "INSERT INTO integrations (id, app_id, type, status, display_name, config, created_at) "
            "VALUES (?,?,?,?,?,?,?)", (integration_id, app_id, type_, status, display_name, dumps(config), now))

    async def set_integration(self, integration_id: str, status: str, display_name: str | None,
                              config: dict[str, Any]) -> None:
        await self._run("UPDATE integrations SET status=?, display_name=?, config=? WHERE id=?",
                        (status, display_name, dumps(config), integration_id))

    async def delete_integration(self, integration_id: str) -> int:
        return await self._run("DELETE FROM integrations WHERE id=?", (integration_id,))

    async def get_integration(self, app_id: str, integration_id: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM integrations WHERE app_id=? AND id=?", (app_id, integration_id))

    async def list_integrations(self, app_id: str | None, types: Iterable[str] | None = None, *,
                                after: str | None = None, before: str | None = None,
                                limit: int = 1000) -> tuple[list[aiosqlite.Row], bool]:
        where, params = [], []
        if app_id is not None:
            where.append("app_id=?")
            params.append(app_id)
        if types:
            type_list = list(types)
            where.append(f"type IN ({','.join('?' * len(type_list))})")
            params.extend(type_list)
        return await self._page("SELECT * FROM integrations", " AND ".join(where), params, after, before, limit,
                                "integrations")

    async def add_webhook(self, webhook_id: str, app_id: str, integration_id: str, record: str, now: float) -> None:
        await self._run("INSERT INTO webhooks (id, app_id, integration_id, record, created_at) VALUES (?,?,?,?,?)",
                        (webhook_id, app_id, integration_id, record, now))

    async def set_webhook(self, webhook_id: str, record: str) -> None:
        await self._run("UPDATE webhooks SET record=? WHERE id=?", (record, webhook_id))

    async def delete_webhook(self, webhook_id: str) -> int:
        return await self._run("DELETE FROM webhooks WHERE id=?", (webhook_id,))

    async def get_webhook(self, integration_id: str, webhook_id: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM webhooks WHERE integration_id=? AND id=?", (integration_id, webhook_id))

    async def list_webhooks(self, integration_id: str | None = None, app_id: str | None = None) -> list[aiosqlite.Row]:
        if integration_id is not None:
            return await self._all("SELECT * FROM webhooks WHERE integration_id=? ORDER BY id", (integration_id,))
        if app_id is not None:
            return await self._all("SELECT * FROM webhooks WHERE app_id=? ORDER BY id", (app_id,))
        return await self._all("SELECT * FROM webhooks ORDER BY id")

    # --- conversations and participants -----------------------------------------------------

    async def create_personal_conversation(
            self, conversation_id: str, participant_id: str, app_id: str, user_id: str, user_external_id: str | None,
            *, default: bool, display_name: str | None, description: str | None, icon_url: str | None,
            metadata: dict[str, Any] | None, now: float) -> tuple[sqlite3.Row, bool]:
        """Create a personal conversation with the user as its participant, on the hot-path
        connection in a group transaction (a first contact waits on no thread hop, holds the
        write lock for no loop turn, and shares its commit with the others of the batch). With
        `default`, the user's default conversation when they have one (nothing written); a new
        one is the default when the user has none. The row and whether it was created."""

        def op(hot: sqlite3.Connection) -> tuple[sqlite3.Row, bool]:
            existing = hot.execute("SELECT * FROM conversations WHERE app_id=? AND default_user_id=?",
                                   (app_id, user_id)).fetchone()
            if default and existing is not None:
                return existing, False
            hot.execute(
                "INSERT INTO conversations (id, app_id, type, default_user_id, display_name, description,"
                " icon_url, metadata, last_updated_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (conversation_id, app_id, "personal", None if existing is not None else user_id, display_name,
                 description, icon_url, None if metadata is None else dumps(metadata), now, now))
            hot.execute(
                "INSERT INTO participants (id, app_id, conversation_id, user_id, user_external_id, created_at)"
                " VALUES (?,?,?,?,?,?)", (participant_id, app_id, conversation_id, user_id, user_external_id, now))
            return hot.execute("SELECT * FROM conversations WHERE id=?", (conversation_id,)).fetchone(), True

        return await self._grouped().run(op)

    async def set_conversation(self, conversation_id: str, display_name: str | None, description: str | None,
                               icon_url: str | None, metadata: dict[str, Any] | None) -> None:
        await self._run("UPDATE conversations SET display_name=?, description=?, icon_url=?, metadata=? WHERE id=?",
                        (display_name, description, icon_url, None if metadata is None else dumps(metadata),
                         conversation_id))

    async def touch_conversation(self, conversation_id: str, now: float) -> None:
        await self._run("UPDATE conversations SET last_updated_at=? WHERE id=?", (now, conversation_id))

    async def set_business_last_read(self, conversation_id: str, at: float) -> None:
        await self._run("UPDATE conversations SET business_last_read=? WHERE id=?", (at, conversation_id))

    async def delete_conversation(self, conversation_id: str) -> int:
        return await self._run("DELETE FROM conversations WHERE id=?", (conversation_id,))

    async def get_conversation(self, app_id: str, conversation_id: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM conversations WHERE app_id=? AND id=?", (app_id, conversation_id))

    async def default_conversation(self, app_id: str, user_id: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM conversations WHERE app_id=? AND default_user_id=?", (app_id, user_id))

    async def list_user_conversations(self, app_id: str, user_id: str, after: str | None, before: str | None,
                                      limit: int) -> tuple[list[aiosqlite.Row], bool]:
        return await self._page(
            "SELECT c.* FROM conversations c JOIN participants p ON p.conversation_id = c.id",
            "p.app_id=? AND p.user_id=?", (app_id, user_id), after, before, limit, "conversations", "c")

    async def set_participant_external_id(self, app_id: str, user_id: str, external_id: str | None) -> None:
        await self._run("UPDATE participants SET user_external_id=? WHERE app_id=? AND user_id=?",
                        (external_id, app_id, user_id))

    async def participants(self, conversation_id: str) -> list[aiosqlite.Row]:
        return await self._all("SELECT * FROM participants WHERE conversation_id=? ORDER BY created_at, id",
                               (conversation_id,))

    async def participant(self, conversation_id: str, user_id: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM participants WHERE conversation_id=? AND user_id=?",
                               (conversation_id, user_id))

    async def user_conversation_ids(self, app_id: str, user_id: str) -> list[str]:
        rows = await self._all("SELECT conversation_id FROM participants WHERE app_id=? AND user_id=?",
                               (app_id, user_id))
        return [r["conversation_id"] for r in rows]

    async def mark_read(self, participant_id: str, at: float) -> None:
        await self._run("UPDATE participants SET last_read=?, unread_count=0 WHERE id=?", (at, participant_id))

    async def add_unread(self, conversation_id: str) -> None:
        await self._run("UPDATE participants SET unread_count = unread_count + 1 WHERE conversation_id=?",
                        (conversation_id,))

    async def merge_user(self, app_id: str, discarded_id: str, surviving_id: str,
                         surviving_external_id: str | None) -> list[str]:
        """Give the discarded user's conversations to the survivor (inside `tx()`); their ids.

        The survivor keeps its own default conversation; the discarded one's stays as another
        conversation of the survivor.
        """
        moved = [str(r["conversation_id"]) for r in await self._all(
            "SELECT conversation_id FROM participants WHERE app_id=? AND user_id=?", (app_id, discarded_id))]
        if await self._one("SELECT 1 FROM conversations WHERE app_id=? AND default_user_id=?", (app_id, surviving_id)):
            await self._run("UPDATE conversations SET default_user_id=NULL WHERE app_id=? AND default_user_id=?",
                            (app_id, discarded_id))
        else:
            await self._run("UPDATE conversations SET default_user_id=? WHERE app_id=? AND default_user_id=?",
                            (surviving_id, app_id, discarded_id))
        await self._run("UPDATE participants SET user_id=?, user_external_id=? WHERE app_id=? AND user_id=?",
                        (surviving_id, surviving_external_id, app_id, discarded_id))
        await self._run("UPDATE messages SET user_id=? WHERE app_id=? AND user_id=?",
                        (surviving_id, app_id, discarded_id))
        return moved

    async def user_history(self, app_id: str, user_id: str) -> tuple[int, float | None]:
        """How many messages the user's conversations hold, and when the first was received."""
        row = await self._one(
            "SELECT COUNT(*) AS n, MIN(received) AS first FROM messages WHERE app_id=? AND conversation_id IN"
            " (SELECT conversation_id FROM participants WHERE app_id=? AND user_id=?)", (app_id, app_id, user_id))
        return (0, None) if row is None else (int(row["n"]), row["first"])

    async def remove_association(self, app_id: str, user_id: str, client_id: str) -> list[str]:
        """Take the client out of the user's conversations (inside `tx()`); their ids."""
        rows = await self._all(
            "SELECT p.id, p.conversation_id FROM participants p JOIN client_associations a ON a.participant_id = p.id"
            " WHERE p.app_id=? AND p.user_id=? AND a.client_id=?", (app_id, user_id, client_id))
        for row in rows:
            await self._run("DELETE FROM client_associations WHERE participant_id=? AND client_id=?",
                            (row["id"], client_id))
        return [str(row["conversation_id"]) for row in rows]

    async def put_pending_merge(self, pending: PendingMerge) -> None:
        """Record (or replace) the merge `pending.client_id` is asked to confirm (inside `tx()`)."""
        await self._run(
            "INSERT INTO merge_confirmations (client_id, app_id, surviving_user_id, discarded_user_id,"
            " conversation_id, integration_id, client_type, code, answer, created_at, expires_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (client_id) DO UPDATE SET app_id=excluded.app_id,"
            " surviving_user_id=excluded.surviving_user_id, discarded_user_id=excluded.discarded_user_id,"
            " conversation_id=excluded.conversation_id, integration_id=excluded.integration_id,"
            " client_type=excluded.client_type, code=excluded.code, answer=excluded.answer,"
            " created_at=excluded.created_at,"
            " expires_at=excluded.expires_at",
            (pending.client_id, pending.app_id, pending.surviving_user_id, pending.discarded_user_id,
             pending.conversation_id, pending.integration_id, pending.client_type, pending.code, pending.answer,
             pending.created_at, pending.expires_at))

    def pending_merge_now(self, client_id: str) -> PendingMerge | None:
        """The merge a client is asked to confirm (hot-path connection: asked for every message)."""
        row = self._hot().execute("SELECT * FROM merge_confirmations WHERE client_id=?", (client_id,)).fetchone()
        return None if row is None else PendingMerge(**dict(row))

    async def drop_pending_merge(self, client_id: str, created_at: float) -> bool:
        """Forget a client's pending merge if it is still this one (inside `tx()`)."""
        return await self._run("DELETE FROM merge_confirmations WHERE client_id=? AND created_at=?",
                               (client_id, created_at)) > 0

    async def expired_pending_merges(self, at: float, limit: int = 100) -> list[PendingMerge]:
        """Pending merges past their time, oldest first."""
        rows = await self._all("SELECT * FROM merge_confirmations WHERE expires_at <= ? ORDER BY expires_at LIMIT ?",
                               (at, limit))
        return [PendingMerge(**dict(row)) for row in rows]

    async def upsert_association(self, participant_id: str, client_id: str, type_: str,
                                 integration_id: str | None, external_id: str | None,
                                 info: dict[str, Any] | None, now: float) -> bool:
        """Make the client the most recent (primary) one; True when it was not associated before."""
        existed = await self._one("SELECT 1 FROM client_associations WHERE participant_id=? AND client_id=?",
                                  (participant_id, client_id))
        await self._run(
            "INSERT INTO client_associations (participant_id, client_id, type, integration_id, external_id, info,"
            " last_active) VALUES (?,?,?,?,?,?,?) ON CONFLICT (participant_id, client_id) DO UPDATE SET"
            " last_active=excluded.last_active, type=excluded.type, integration_id=excluded.integration_id,"
            " external_id=excluded.external_id, info=excluded.info",
            (participant_id, client_id, type_, integration_id, external_id, None if info is None else dumps(info), now))
        return existed is None

    async def associations(self, participant_id: str) -> list[Association]:
        rows = await self._all(
            "SELECT * FROM client_associations WHERE participant_id=? ORDER BY last_active DESC, client_id",
            (participant_id,))
        return [Association(client_id=r["client_id"], type=r["type"], integration_id=r["integration_id"],
                            external_id=r["external_id"], info=loads(r["info"]), last_active=r["last_active"])
                for r in rows]

    # --- messages ---------------------------------------------------------------------------

    async def insert_message(self, message_id: str, app_id: str, conversation_id: str, author_type: str,
                             user_id: str | None, integration_id: str | None, provider_message_id: str | None,
                             event_id: str, received: float, body: str) -> int | None:
        """Insert a message and return its seq, or None when the provider id was stored already."""
        async with self.db.execute(
            "INSERT INTO messages (id, app_id, conversation_id, author_type, user_id, integration_id,"
            " provider_message_id, event_id, received, body) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (app_id, integration_id, provider_message_id) DO NOTHING",
            (message_id, app_id, conversation_id, author_type, user_id, integration_id, provider_message_id,
             event_id, received, body),
        ) as cur:
            if cur.rowcount == 0:
                return None
            return cur.lastrowid

    async def message_by_provider_id(self, app_id: str, integration_id: str,
                                     provider_message_id: str) -> StoredMessage | None:
        row = await self._one(
            "SELECT seq, id, conversation_id, event_id, body FROM messages"
            " WHERE app_id=? AND integration_id=? AND provider_message_id=?",
            (app_id, integration_id, provider_message_id))
        return None if row is None else StoredMessage(**dict(row))

    async def get_message(self, app_id: str, message_id: str) -> StoredMessage | None:
        row = await self._one("SELECT seq, id, conversation_id, event_id, body FROM messages WHERE app_id=? AND id=?",
                              (app_id, message_id))
        return None if row is None else StoredMessage(**dict(row))

    async def delete_message(self, conversation_id: str, message_id: str) -> int:
        return await self._run("DELETE FROM messages WHERE conversation_id=? AND id=?", (conversation_id, message_id))

    async def delete_messages(self, conversation_id: str) -> int:
        return await self._run("DELETE FROM messages WHERE conversation_id=?", (conversation_id,))

    async def message_seq(self, conversation_id: str, message_id: str) -> int | None:
        row = await self._one("SELECT seq FROM messages WHERE conversation_id=? AND id=?",
                              (conversation_id, message_id))
        return None if row is None else int(row["seq"])

    async def messages_before(self, conversation_id: str, before_seq: int | None, limit: int) -> tuple[
            list[StoredMessage], bool]:
        """The `limit` messages just before `before_seq` (all when None), oldest first, and whether older exist."""
        bound = "AND seq < ?" if before_seq is not None else ""
        params: list[Any] = [conversation_id]
        if before_seq is not None:
            params.append(before_seq)
        rows = await self._all(
            f"SELECT seq, id, conversation_id, event_id, body FROM messages WHERE conversation_id=? {bound}"
            " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        more = len(rows) > limit
        return [StoredMessage(**dict(r)) for r in reversed(rows[:limit])], more

    async def messages_after(self, conversation_id: str, after_seq: int, limit: int) -> tuple[
            list[StoredMessage], bool]:
        """The `limit` messages just after `after_seq`, oldest first, and whether newer exist."""
        rows = await self._all(
            "SELECT seq, id, conversation_id, event_id, body FROM messages WHERE conversation_id=? AND seq > ?"
            " ORDER BY seq LIMIT ?", (conversation_id, after_seq, limit + 1))
        return [StoredMessage(**dict(r)) for r in rows[:limit]], len(rows) > limit

    async def has_messages(self, conversation_id: str, *, before_seq: int | None = None,
                           after_seq: int | None = None) -> bool:
        if before_seq is not None:
            row = await self._one("SELECT 1 FROM messages WHERE conversation_id=? AND seq < ? LIMIT 1",
                                  (conversation_id, before_seq))
        else:
            row = await self._one("SELECT 1 FROM messages WHERE conversation_id=? AND seq > ? LIMIT 1",
                                  (conversation_id, after_seq or 0))
        return row is not None

    # --- retention (conversationRetentionSeconds) ---------------------------------------------

    async def retention_settings(self) -> list[tuple[str, int]]:
        """(app id, seconds) of every app with a retention period."""
        rows = await self._all("SELECT id, settings FROM apps ORDER BY id")
        out = []
        for row in rows:
            seconds = _privacy(row["settings"]).conversation_retention_seconds
            if seconds:
                out.append((str(row["id"]), int(seconds)))
        return out

    async def inactive_conversations(self, app_id: str, cutoff: float, after: tuple[float, str] | None,
                                     limit: int) -> list[aiosqlite.Row]:
        """The app's conversations last active before `cutoff`, in activity order after the
        keyset `after` ((last_updated_at, id) of the previous page's last row)."""
        since, since_id = after if after is not None else (float("-inf"), "")
        return await self._all(
            "SELECT * FROM conversations WHERE app_id=? AND last_updated_at < ?"
            " AND (last_updated_at > ? OR (last_updated_at = ? AND id > ?))"
            " ORDER BY last_updated_at, id LIMIT ?", (app_id, cutoff, since, since, since_id, limit))

    async def has_messages_before(self, conversation_id: str, before: float) -> bool:
        row = await self._one("SELECT 1 FROM messages WHERE conversation_id=? AND received < ? LIMIT 1",
                              (conversation_id, before))
        return row is not None

    async def delete_expired_messages(self, conversation_id: str, cutoff: float, limit: int) -> int:
        """Delete up to `limit` messages received before `cutoff`, while the conversation is still
        inactive since before it (inside `tx()`; a message that just arrived stops the sweep)."""
        deleted = await self._run(
            "DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages m JOIN conversations c"
            " ON c.id = m.conversation_id WHERE m.conversation_id=? AND m.received < ? AND c.last_updated_at < ?"
            " ORDER BY m.seq LIMIT ?)", (conversation_id, cutoff, cutoff, limit))
        return deleted

    async def delete_expired_externals(self, conversation_id: str, cutoff: float) -> int:
        """Forget the provider ids of the conversation's messages that are gone (inside `tx()`)."""
        return await self._run(
            "DELETE FROM external_messages WHERE conversation_id=? AND created_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = external_messages.message_id)",
            (conversation_id, cutoff))

    # --- erasure (user deletion, personal information) ---------------------------------------

    async def delete_some_messages(self, conversation_id: str, limit: int) -> int:
        """Delete up to `limit` of the conversation's messages, oldest first (inside `tx()`)."""
        return await self._run("DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE conversation_id=?"
                               " ORDER BY seq LIMIT ?)", (conversation_id, limit))

    async def delete_user_rows(self, app_id: str, user_id: str, conversation_ids: Sequence[str]) -> None:
        """Delete the user's conversations (participants, client associations and pending links go
        with them), their provider ids, and the user's pending links and merges (inside `tx()`)."""
        marks = ",".join("?" * len(conversation_ids)) or "NULL"
        await self._run(f"DELETE FROM external_messages WHERE conversation_id IN ({marks})", conversation_ids)
        await self._run("DELETE FROM client_links WHERE app_id=? AND user_id=?", (app_id, user_id))
        await self._run("DELETE FROM merge_confirmations WHERE app_id=? AND (surviving_user_id=? OR"
                        " discarded_user_id=?)", (app_id, user_id, user_id))
        await self._run(f"DELETE FROM conversations WHERE id IN ({marks})", conversation_ids)

    async def clear_association_info(self, app_id: str, user_id: str) -> None:
        """Forget the channel information copied with the user's clients (inside `tx()`)."""
        await self._run("UPDATE client_associations SET info=NULL WHERE participant_id IN"
                        " (SELECT id FROM participants WHERE app_id=? AND user_id=?)", (app_id, user_id))

    async def user_authored(self, app_id: str, user_id: str, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, body) of the messages the user wrote, after `after_seq`, oldest first."""
        rows = await self._all("SELECT seq, body FROM messages WHERE app_id=? AND user_id=? AND author_type='user'"
                               " AND seq > ? ORDER BY seq LIMIT ?", (app_id, user_id, after_seq, limit))
        return [(int(r["seq"]), str(r["body"])) for r in rows]

    async def set_message_bodies(self, bodies: Sequence[tuple[int, str]]) -> None:
        """Rewrite stored message bodies (inside `tx()`)."""
        await self.db.executemany("UPDATE messages SET body=? WHERE seq=?", [(body, seq) for seq, body in bodies])

    async def user_pending_links(self, app_id: str, user_id: str) -> list[aiosqlite.Row]:
        """The user's direct links by phone waiting for a confirmation (for an export)."""
        return await self._all("SELECT * FROM client_links WHERE app_id=? AND user_id=? ORDER BY created_at",
                               (app_id, user_id))

    async def user_pending_merges(self, app_id: str, user_id: str) -> list[PendingMerge]:
        """The merges waiting for a customer's yes that involve the user (for an export)."""
        rows = await self._all("SELECT * FROM merge_confirmations WHERE app_id=? AND (surviving_user_id=? OR"
                               " discarded_user_id=?) ORDER BY created_at", (app_id, user_id, user_id))
        return [PendingMerge(**dict(row)) for row in rows]

    async def checkpoint(self) -> bool:
        """Truncate the write-ahead log (erased rows' older page versions leave the disk)."""
        async with self._lock:
            return await truncate_wal(self.db)

    # --- provider ids of sent messages ------------------------------------------------------

    async def upsert_external(self, app_id: str, integration_id: str, provider_message_id: str,
                              message_id: str, conversation_id: str, now: float) -> None:
        await self._run(
            "INSERT INTO external_messages (app_id, integration_id, provider_message_id, message_id, conversation_id,"
            " created_at) VALUES (?,?,?,?,?,?) ON CONFLICT (app_id, integration_id, provider_message_id) DO NOTHING",
            (app_id, integration_id, provider_message_id, message_id, conversation_id, now))

    async def external(self, app_id: str, integration_id: str, provider_message_id: str) -> aiosqlite.Row | None:
        return await self._one(
            "SELECT * FROM external_messages WHERE app_id=? AND integration_id=? AND provider_message_id=?",
            (app_id, integration_id, provider_message_id))

    # --- paging -----------------------------------------------------------------------------

    async def _page(self, select: str, where: str, params: Sequence[Any], after: str | None, before: str | None,
                    limit: int, table: str, alias: str = "") -> tuple[list[aiosqlite.Row], bool]:
        """Keyset paging in creation order, by (created_at, id); cursors are ids.

        Returns the page in ascending order and whether more rows exist past it in the
        direction of paging. A cursor id that does not exist is a 400.
        """
        col = f"{alias}." if alias else ""
        clauses = [where] if where else []
        args = list(params)
        for cursor, op in ((after, ">"), (before, "<")):
            if cursor is None:
                continue
            row = await self._one(f"SELECT created_at FROM {table} WHERE id=?", (cursor,))
            if row is None:
                raise CursorNotFound(cursor)
            clauses.append(f"({col}created_at {op} ? OR ({col}created_at = ? AND {col}id {op} ?))")
            args.extend([row["created_at"], row["created_at"], cursor])
        sql = select + (" WHERE " + " AND ".join(clauses) if clauses else "")
        order = "DESC" if before is not None and after is None else "ASC"
        rows = await self._all(f"{sql} ORDER BY {col}created_at {order}, {col}id {order} LIMIT ?", (*args, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        if order == "DESC":
            rows.reverse()
        return rows, more


class CursorNotFound(LookupError):
    """A paging cursor names no row."""
