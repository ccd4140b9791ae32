"""The conversations database: apps, keys, integrations, webhooks, conversations, messages.

On `shared.db`: a SQLite file under the data directory, or the `conversations` schema of the
PostgreSQL database THREADLINE_DATABASE_URL names; one SQL text for both.

Writes that belong together run inside `async with store.tx():` — every store method called in
that block (by the same task) runs on the transaction's connection, so its reads see the block's
writes and no statement escapes it (on SQLite a write outside it would wait for the lock the
block holds). Methods named `add_*`, `set_*`, `delete_*`, `upsert_*`, `insert_*`, `put_*`,
`drop_*` are meant to be called inside `tx()`; outside it each statement commits on its own.
The inbound hot path (`record_inbound`, `create_personal_conversation`) hands its writes to a
`GroupCommit` instead: concurrent handlers share one transaction and one commit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from shared import fencing, records
from shared.db import (
    Connection,
    Database,
    DatabaseSettings,
    GroupCommit,
    Migration,
    Row,
    like_containing,
    open_database,
    serialize,
)
from shared.encryption import Keyring
from shared.sunco import Content, ConversationRef, Message, SwitchboardIntegrationRef

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


def conversation_ref(row: Row) -> ConversationRef:
    """The reference events carry, from a conversations row: `{id, type}` and the ids of the
    switchboard integrations in control and offered control."""
    active, pending = row["switchboard_active"], row["switchboard_pending"]
    return ConversationRef(id=row["id"], type=row["type"],
                           active_switchboard_integration=None if active is None else SwitchboardIntegrationRef(
                               id=active),
                           pending_switchboard_integration=None if pending is None else SwitchboardIntegrationRef(
                               id=pending))


# Version i+1 of the schema is SCRIPTS[i], in the SQLite dialect the store always used (existing
# data directories have applied them as written).
SCRIPTS: tuple[str, ...] = (
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
    # 6 (switchboard): an app's switchboard and its integrations, who is in control of each
    # conversation (active) and who was offered it (pending), and custom integrations' API keys.
    """
    CREATE TABLE switchboards (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL UNIQUE REFERENCES apps(id) ON DELETE CASCADE,
        enabled INTEGER NOT NULL,
        default_switchboard_integration_id TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE switchboard_integrations (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        switchboard_id TEXT NOT NULL REFERENCES switchboards(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        integration_id TEXT,
        integration_type TEXT NOT NULL,
        deliver_standby_events INTEGER NOT NULL,
        next_switchboard_integration_id TEXT,
        message_history_count INTEGER,
        created_at REAL NOT NULL,
        UNIQUE (switchboard_id, name)
    );
    ALTER TABLE conversations ADD COLUMN switchboard_active TEXT;
    ALTER TABLE conversations ADD COLUMN switchboard_pending TEXT;
    CREATE TABLE integration_keys (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
        display_name TEXT,
        secret TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX integration_keys_integration ON integration_keys(integration_id, id);
    """,
    # 7 (attachments): files uploaded for messages, kept under the data directory; `id` is the
    # unguessable token in their public URL.
    """
    CREATE TABLE attachments (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        filename TEXT NOT NULL,
        media_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        conversation_id TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX attachments_conversation ON attachments(conversation_id);
    """,
    # 8 (app-wide listing): an app's conversations by who is in control of them (the desk's
    # queue), most recent activity first; the listing without that filter walks
    # conversations_activity (5) backwards.
    """
    CREATE INDEX conversations_control ON conversations(app_id, switchboard_active, last_updated_at, id);
    """,
    # 9: the desk's search walks an app's newest messages.
    """
    CREATE INDEX messages_app_seq ON messages(app_id, seq);
    """,
    # 10: whether an app has any merge waiting for a customer's yes, read with every customer
    # message (`_INBOUND_LOOKUP`).
    """
    CREATE INDEX merge_confirmations_app ON merge_confirmations(app_id);
    """,
    # 11: the fence of the inbound partitions' writes: the epoch of each one's latest take
    # (`shared.fencing`).
    fencing.EPOCHS_TABLE,
    # 12: a user deletion under way: what its `user:remove` must name, kept until it is announced
    # (the conversations' rows go first, so a retry would otherwise name none).
    """
    CREATE TABLE user_deletions (
        app_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        conversation_ids TEXT NOT NULL,
        PRIMARY KEY (app_id, user_id)
    );
    """,
)


MIGRATION = Migration(SCRIPTS)


_JSON = msgspec.json.Encoder()


# The newest messages of an app a search looks through.
SEARCH_WINDOW = 100_000


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
    """What a customer message needs to know before it is handled, read in one statement."""

    integration_known: bool
    masks_cards: bool  # the app's `maskCreditCardNumbers`
    duplicate: StoredMessage | None  # the message already stored with this provider id
    # Some client of the app is asked to confirm a merge (rarely, briefly): only then is the
    # sender's own question looked for (`pending_merge`).
    merges_pending: bool


@dataclass(frozen=True)
class AttachmentClaim:
    """A file of ours that a message carries (`shared.media`): recorded with the message."""

    token: str
    filename: str
    media_type: str


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


class _Args:
    """The parameters of a query built piece by piece: `add` keeps a value, returns its `$n`."""

    def __init__(self, *values: Any) -> None:
        self.values: list[Any] = list(values)

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def marks(self, values: Iterable[Any]) -> str:
        """`$n, $n+1, …` for each value (NULL for none: `x IN (NULL)` matches nothing)."""
        return ", ".join(self.add(value) for value in values) or "NULL"


@dataclass(frozen=True)
class ConversationFilter:
    """Which conversations a listing keeps (a field left None keeps them all)."""

    type: str | None = None
    # The switchboard integrations one of which must be in control (empty: none matches).
    active_switchboard_integration_ids: Sequence[str] | None = None
    # An integration type (or client type) of which a client is in the conversation.
    channel: str | None = None
    updated_since: float | None = None  # last_updated_at at or after
    created_since: float | None = None  # created_at at or after

    def clauses(self, args: _Args) -> list[str]:
        """SQL conditions on the conversations row `c`, their values added to `args`."""
        out = []
        if self.type is not None:
            out.append(f"c.type = {args.add(self.type)}")
        if self.active_switchboard_integration_ids is not None:
            out.append(f"c.switchboard_active IN ({args.marks(self.active_switchboard_integration_ids)})")
        if self.channel is not None:
            channel = args.add(self.channel)
            out.append(
                "EXISTS (SELECT 1 FROM participants cp JOIN client_associations ca ON ca.participant_id = cp.id"
                " LEFT JOIN integrations ci ON ci.id = ca.integration_id"
                f" WHERE cp.conversation_id = c.id AND (ca.type = {channel} OR ci.type = {channel}))")
        if self.updated_since is not None:
            out.append(f"c.last_updated_at >= {args.add(self.updated_since)}")
        if self.created_since is not None:
            out.append(f"c.created_at >= {args.add(self.created_since)}")
        return out


_MESSAGE_COLUMNS = "seq, id, conversation_id, event_id, body"
_INBOUND_LOOKUP = (
    "SELECT a.settings, i.id AS integration_id, m.seq, m.id, m.conversation_id, m.event_id, m.body,"
    " EXISTS (SELECT 1 FROM merge_confirmations c WHERE c.app_id = a.id) AS merges_pending FROM apps a"
    " LEFT JOIN integrations i ON i.app_id = a.id AND i.id = $1"
    " LEFT JOIN messages m ON m.app_id = a.id AND m.integration_id = $1 AND m.provider_message_id = $3"
    " WHERE a.id = $2")
# A file a message carries, claimed for the message's conversation unless already recorded (a
# business's upload keeps the conversation it was uploaded for, or none).
_CLAIM_ATTACHMENT = (
    "INSERT INTO attachments (id, app_id, filename, media_type, size, conversation_id, created_at)"
    " VALUES ($1, $2, $3, $4, 0, $5, $6) ON CONFLICT (id) DO NOTHING")
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, app_id, conversation_id, author_type, user_id, integration_id,"
    " provider_message_id, event_id, received, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (app_id, integration_id, provider_message_id) DO NOTHING RETURNING seq")
_INSERT_CONVERSATION = (
    "INSERT INTO conversations (id, app_id, type, default_user_id, display_name, description, icon_url, metadata,"
    " last_updated_at, created_at, switchboard_active) VALUES ($1, $2, 'personal', $3, $4, $5, $6, $7, $8, $8, $9)"
    " ON CONFLICT (app_id, default_user_id) DO NOTHING RETURNING *")
_UPSERT_ASSOCIATION = (
    "INSERT INTO client_associations (participant_id, client_id, type, integration_id, external_id, info,"
    " last_active) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (participant_id, client_id) DO UPDATE SET"
    " last_active=excluded.last_active, type=excluded.type, integration_id=excluded.integration_id,"
    " external_id=excluded.external_id, info=excluded.info")
_TOUCH_ASSOCIATION = (
    "UPDATE client_associations SET last_active=$1, type=$2, integration_id=$3, external_id=$4, info=$5"
    " WHERE participant_id=$6 AND client_id=$7")
# The same by conversation and user, answering the participant's id: one statement for a
# returning customer's message instead of a read of the participant and the update.
_TOUCH_PARTICIPANTS_ASSOCIATION = (
    "UPDATE client_associations SET last_active=$1, type=$2, integration_id=$3, external_id=$4, info=$5"
    " WHERE client_id=$6"
    " AND participant_id=(SELECT id FROM participants WHERE conversation_id=$7 AND user_id=$8)"
    " RETURNING participant_id")


class Store:
    """Data access for the conversations service.

    App key secrets are sealed with `keyring` here; integration configs and webhook records
    arrive sealed (`Admin`), since the same sealed values go to KV.
    """

    def __init__(self, db: Database, keyring: Keyring | None = None) -> None:
        self.db = db
        self.keyring = keyring or Keyring()
        self._group = GroupCommit(db)
        # The transaction `tx()` opened in the current task (None: statements go to `db`).
        self._tx: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
            f"conversations-store-tx-{id(self)}", default=None)

    @classmethod
    async def open(cls, settings: DatabaseSettings, keyring: Keyring | None = None) -> Store:
        """Open (and migrate) the service's database."""
        return cls(await open_database(settings, MIGRATION), keyring)

    async def close(self) -> None:
        """Close the connections."""
        await self.db.close()

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Connection]:
        """A write transaction: the store's methods called inside the block (by this task) run on
        it, and commit together or not at all. Not reentrant (on SQLite a nested one would wait
        for the lock its own block holds)."""
        if self._tx.get() is not None:
            raise RuntimeError("Store.tx() inside Store.tx()")
        async with self.db.transaction() as conn:
            token = self._tx.set(conn)
            try:
                yield conn
            finally:
                self._tx.reset(token)

    # --- generic helpers --------------------------------------------------------------------

    def _outside_tx(self, what: str) -> None:
        """Refuse what would wait for the lock the task's own `tx()` holds (SQLite)."""
        if self._tx.get() is not None:
            raise RuntimeError(f"{what} inside Store.tx() would wait for that transaction")

    def _c(self) -> Connection:
        """Where a statement goes: the task's open `tx()`, else the database."""
        conn = self._tx.get()
        return self.db if conn is None else conn

    async def _one(self, sql: str, *args: Any) -> Row | None:
        return await self._c().fetchrow(sql, *args)

    async def _all(self, sql: str, *args: Any) -> list[Row]:
        return await self._c().fetch(sql, *args)

    async def _run(self, sql: str, *args: Any) -> int:
        return await self._c().execute(sql, *args)

    async def _returning(self, sql: str, *args: Any) -> Any:
        """The value a write's RETURNING gives: in the open `tx()`, else in a transaction of its
        own (outside one, `fetchval` reads on SQLite's read-only connection)."""
        conn = self._tx.get()
        if conn is not None:
            return await conn.fetchval(sql, *args)
        async with self.db.transaction() as tx:
            return await tx.fetchval(sql, *args)

    async def serialize(self, name: str) -> None:
        """Inside `tx()`: the rest of the transaction runs one at a time with every other that
        serializes on `name`, in any replica (a limit checked by counting before an insert)."""
        conn = self._tx.get()
        if conn is None:
            raise RuntimeError("Store.serialize() outside Store.tx()")
        await serialize(conn, f"conversations:{name}")

    # --- the inbound hot path -----------------------------------------------------------------

    async def inbound_lookup(self, app_id: str, integration_id: str, provider_message_id: str) -> InboundLookup:
        """Whether the app has the integration, masks card numbers and has merges waiting for a
        yes, and the already-stored message with this provider id, in one read (a message for an unknown app is dropped
        whether or not it is a duplicate)."""
        row = await self._one(_INBOUND_LOOKUP, integration_id, app_id, provider_message_id)
        if row is None:
            return InboundLookup(integration_known=False, masks_cards=False, duplicate=None, merges_pending=False)
        return InboundLookup(
            integration_known=row["integration_id"] is not None,
            masks_cards=bool(_privacy(row["settings"]).mask_credit_card_numbers),
            merges_pending=bool(row["merges_pending"]),
            duplicate=None if row["seq"] is None else StoredMessage(
                seq=int(row["seq"]), id=row["id"], conversation_id=row["conversation_id"], event_id=row["event_id"],
                body=row["body"]))

    async def integration_type(self, integration_id: str) -> str | None:
        """An integration's type (None when unknown)."""
        row = await self._one("SELECT type FROM integrations WHERE id=$1", integration_id)
        return None if row is None else str(row["type"])

    async def masks_cards(self, app_id: str) -> bool:
        """The app's `maskCreditCardNumbers` setting."""
        row = await self._one("SELECT settings FROM apps WHERE id=$1", app_id)
        return row is not None and bool(_privacy(row["settings"]).mask_credit_card_numbers)

    async def record_inbound(self, *, message_id: str, app_id: str, conversation_id: str, user_id: str,
                             user_external_id: str | None, integration_id: str, provider_message_id: str,
                             event_id: str, received: float, body: str, client_id: str, client_type: str,
                             client_integration_id: str | None, client_external_id: str | None,
                             client_info: dict[str, Any] | None,
                             attachment: AttachmentClaim | None = None,
                             fence: Mapping[int, int] | None = None) -> InboundRecord:
        """Store a customer message (and claim the file it carries), touch the conversation and
        make the client primary, in one group transaction (`GroupCommit`). `seq` is None when the
        provider id was stored already (nothing written). `fence` (the inbound partition → the
        epoch of this replica's take): StaleEpoch, nothing written, when a later take's is stored."""
        async def op(tx: Connection) -> InboundRecord:
            if fence:
                await fencing.check_fence(tx, fence)
            seq = await tx.fetchval(_INSERT_MESSAGE, message_id, app_id, conversation_id, "user", user_id,
                                    integration_id, provider_message_id, event_id, received, body)
            if seq is None:
                return InboundRecord(seq=None)
            if attachment is not None:
                await tx.execute(_CLAIM_ATTACHMENT, attachment.token, app_id, attachment.filename,
                                 attachment.media_type, conversation_id, received)
            await tx.execute("UPDATE conversations SET last_updated_at=$1 WHERE id=$2", received, conversation_id)
            info = None if client_info is None else dumps(client_info)
            # A returning client (the common case) is one UPDATE, which finds the participant too;
            # a new one is inserted.
            participant_id = await tx.fetchval(_TOUCH_PARTICIPANTS_ASSOCIATION, received, client_type,
                                               client_integration_id, client_external_id, info, client_id,
                                               conversation_id, user_id)
            existed = participant_id is not None
            if participant_id is None:
                participant_id = await tx.fetchval(
                    "SELECT id FROM participants WHERE conversation_id=$1 AND user_id=$2", conversation_id, user_id)
                if participant_id is None:
                    return InboundRecord(seq=int(seq))
                await tx.execute(_UPSERT_ASSOCIATION, participant_id, client_id, client_type, client_integration_id,
                                 client_external_id, info, received)
            participant_id = str(participant_id)
            if user_external_id is not None:  # writes only when it changed
                await tx.execute("UPDATE participants SET user_external_id=$1 WHERE app_id=$2 AND user_id=$3"
                                 " AND (user_external_id IS NULL OR user_external_id <> $1)",
                                 user_external_id, app_id, user_id)
            joined_others = not existed and await tx.fetchrow(
                "SELECT 1 FROM client_associations WHERE participant_id=$1 AND client_id<>$2 LIMIT 1",
                participant_id, client_id) is not None
            return InboundRecord(seq=int(seq), participant_id=participant_id, new_client=not existed,
                                 joined_others=joined_others)

        self._outside_tx("record_inbound")
        return await self._group.run(op)

    async def create_personal_conversation(
            self, conversation_id: str, participant_id: str, app_id: str, user_id: str, user_external_id: str | None,
            *, default: bool, display_name: str | None, description: str | None, icon_url: str | None,
            metadata: dict[str, Any] | None, now: float,
            in_control: str | None = None) -> tuple[Row, bool]:
        """Create a personal conversation with the user as its participant (`in_control`: the
        switchboard integration that starts in control of it), in a group
        transaction (a first contact shares its commit with the others of the batch). With
        `default`, the user's default conversation when they have one (nothing written); a new
        one is the default when the user has none. The row and whether it was created.

        Another writer (a replica) creating the user's default conversation at the same moment
        is no error: the unique (app, default user) index decides, and the loser returns the
        winner's (with `default`) or creates one that is not the default."""
        meta = None if metadata is None else dumps(metadata)

        async def op(tx: Connection) -> tuple[Row, bool]:
            existing = await tx.fetchrow("SELECT * FROM conversations WHERE app_id=$1 AND default_user_id=$2",
                                         app_id, user_id)
            if default and existing is not None:
                return existing, False
            row = await tx.fetchrow(_INSERT_CONVERSATION, conversation_id, app_id,
                                    None if existing is not None else user_id, display_name, description, icon_url,
                                    meta, now, in_control)
            if row is None:  # another writer made the user's default conversation meanwhile
                if default:
                    winner = await tx.fetchrow(
                        "SELECT * FROM conversations WHERE app_id=$1 AND default_user_id=$2", app_id, user_id)
                    if winner is not None:
                        return winner, False
                row = await tx.fetchrow(_INSERT_CONVERSATION, conversation_id, app_id, None, display_name,
                                        description, icon_url, meta, now, in_control)
                assert row is not None
            await tx.execute(
                "INSERT INTO participants (id, app_id, conversation_id, user_id, user_external_id, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)", participant_id, app_id, conversation_id, user_id,
                user_external_id, now)
            return row, True

        self._outside_tx("create_personal_conversation")
        return await self._group.run(op)

    # --- switchboards -----------------------------------------------------------------------

    async def add_switchboard(self, switchboard_id: str, app_id: str, enabled: bool, now: float) -> bool:
        """Create the app's switchboard; False when it has one already (one per app)."""
        inserted = await self._returning(
            "INSERT INTO switchboards (id, app_id, enabled, created_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (app_id) DO NOTHING RETURNING id", switchboard_id, app_id, int(enabled), now)
        return inserted is not None

    async def switchboard(self, app_id: str, switchboard_id: str | None = None) -> Row | None:
        """The app's switchboard (when `switchboard_id` is given, only if it is that one)."""
        row = await self._one("SELECT * FROM switchboards WHERE app_id=$1", app_id)
        return row if row is not None and switchboard_id in (None, row["id"]) else None

    async def set_switchboard(self, switchboard_id: str, enabled: bool, default_id: str | None) -> None:
        await self._run("UPDATE switchboards SET enabled=$2, default_switchboard_integration_id=$3 WHERE id=$1",
                        switchboard_id, int(enabled), default_id)

    async def delete_switchboard(self, switchboard_id: str) -> int:
        """Remove the switchboard, its integrations and every conversation's control by them."""
        await self._run("UPDATE conversations SET switchboard_active=NULL, switchboard_pending=NULL"
                        " WHERE app_id=(SELECT app_id FROM switchboards WHERE id=$1)"
                        " AND (switchboard_active IS NOT NULL OR switchboard_pending IS NOT NULL)", switchboard_id)
        return await self._run("DELETE FROM switchboards WHERE id=$1", switchboard_id)

    async def switchboard_integrations(self, switchboard_id: str) -> list[Row]:
        return await self._all("SELECT * FROM switchboard_integrations WHERE switchboard_id=$1 ORDER BY created_at, id",
                               switchboard_id)

    async def put_switchboard_integration(self, row: dict[str, Any]) -> None:
        """Insert or replace a switchboard integration (`row`: every column)."""
        columns = ("id", "app_id", "switchboard_id", "name", "integration_id", "integration_type",
                   "deliver_standby_events", "next_switchboard_integration_id", "message_history_count", "created_at")
        args = _Args()
        marks = ", ".join(args.add(int(row[c]) if isinstance(row[c], bool) else row[c]) for c in columns)
        updates = ", ".join(f"{c}=excluded.{c}" for c in columns[3:-1])
        await self._run(f"INSERT INTO switchboard_integrations ({', '.join(columns)}) VALUES ({marks})"
                        f" ON CONFLICT (id) DO UPDATE SET {updates}", *args.values)

    async def delete_switchboard_integration(self, switchboard_integration_id: str) -> int:
        """Remove a switchboard integration; conversations it controlled (or was offered) have
        no one in control (or pending) then."""
        await self._run("UPDATE conversations SET switchboard_active=NULL WHERE switchboard_active=$1",
                        switchboard_integration_id)
        await self._run("UPDATE conversations SET switchboard_pending=NULL WHERE switchboard_pending=$1",
                        switchboard_integration_id)
        return await self._run("DELETE FROM switchboard_integrations WHERE id=$1", switchboard_integration_id)

    async def all_switchboards(self) -> list[Row]:
        return await self._all("SELECT * FROM switchboards ORDER BY app_id")

    async def set_control(self, conversation_id: str, expected: tuple[str | None, str | None],
                          active: str | None, pending: str | None) -> Row | None:
        """Move the conversation's control from `expected` (active, pending) to (`active`,
        `pending`); None when another writer changed it first (the caller reads and decides
        again), else the updated row."""
        return await self._one(
            "UPDATE conversations SET switchboard_active=$2, switchboard_pending=$3 WHERE id=$1"
            " AND switchboard_active IS NOT DISTINCT FROM $4 AND switchboard_pending IS NOT DISTINCT FROM $5"
            " RETURNING *", conversation_id, active, pending, expected[0], expected[1])

    async def give_default_control(self, conversation_id: str, default_id: str, replaced: str | None) -> Row | None:
        """Put the switchboard's default in control of a conversation that `replaced` (None:
        nobody, or a member since deleted) controls; the row (None when the conversation is gone)."""
        await self._run("UPDATE conversations SET switchboard_active=$2 WHERE id=$1"
                        " AND switchboard_active IS NOT DISTINCT FROM $3", conversation_id, default_id, replaced)
        return await self._one("SELECT * FROM conversations WHERE id=$1", conversation_id)

    # --- attachments ------------------------------------------------------------------------

    async def add_attachment(self, attachment_id: str, app_id: str, filename: str, media_type: str, size: int,
                             conversation_id: str | None, now: float) -> None:
        await self._run("INSERT INTO attachments (id, app_id, filename, media_type, size, conversation_id, created_at)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7)", attachment_id, app_id, filename, media_type, size,
                        conversation_id, now)

    async def attachment(self, app_id: str, attachment_id: str) -> Row | None:
        return await self._one("SELECT * FROM attachments WHERE app_id=$1 AND id=$2", app_id, attachment_id)

    async def attachment_ids(self, app_id: str, attachment_ids: Sequence[str]) -> set[str]:
        """Which of these attachments of the app still exist."""
        args = _Args(app_id)
        marks = args.marks(attachment_ids)
        rows = await self._all(f"SELECT id FROM attachments WHERE app_id=$1 AND id IN ({marks})", *args.values)
        return {str(row["id"]) for row in rows}

    async def delete_attachment(self, app_id: str, attachment_id: str) -> int:
        return await self._run("DELETE FROM attachments WHERE app_id=$1 AND id=$2", app_id, attachment_id)

    # --- integration keys -------------------------------------------------------------------

    async def add_integration_key(self, key_id: str, app_id: str, integration_id: str, display_name: str | None,
                                  secret: str, now: float) -> None:
        await self._run("INSERT INTO integration_keys (id, app_id, integration_id, display_name, secret, created_at)"
                        " VALUES ($1, $2, $3, $4, $5, $6)", key_id, app_id, integration_id, display_name,
                        self.keyring.seal(secret, app_key_context(key_id)), now)

    async def integration_key(self, key_id: str) -> dict[str, Any] | None:
        """A custom integration key with its secret opened."""
        row = await self._one("SELECT * FROM integration_keys WHERE id=$1", key_id)
        return None if row is None else self._key_out(row)

    async def integration_keys(self, integration_id: str) -> list[dict[str, Any]]:
        rows = await self._all("SELECT * FROM integration_keys WHERE integration_id=$1 ORDER BY created_at, id",
                               integration_id)
        return [self._key_out(row) for row in rows]

    async def delete_integration_key(self, integration_id: str, key_id: str) -> int:
        return await self._run("DELETE FROM integration_keys WHERE integration_id=$1 AND id=$2", integration_id,
                               key_id)

    # --- apps and keys ----------------------------------------------------------------------

    async def add_app(self, app_id: str, display_name: str, settings: dict[str, Any],
                      metadata: dict[str, Any], now: float) -> None:
        await self._run("INSERT INTO apps (id, display_name, settings, metadata, created_at)"
                        " VALUES ($1, $2, $3, $4, $5)", app_id, display_name, dumps(settings), dumps(metadata), now)

    async def set_app(self, app_id: str, display_name: str, settings: dict[str, Any],
                      metadata: dict[str, Any]) -> None:
        await self._run("UPDATE apps SET display_name=$1, settings=$2, metadata=$3 WHERE id=$4",
                        display_name, dumps(settings), dumps(metadata), app_id)

    async def delete_app(self, app_id: str) -> int:
        return await self._run("DELETE FROM apps WHERE id=$1", app_id)

    async def get_app(self, app_id: str) -> Row | None:
        return await self._one("SELECT * FROM apps WHERE id=$1", app_id)

    async def list_apps(self, after: str | None, before: str | None, limit: int) -> tuple[list[Row], bool]:
        return await self._page("SELECT * FROM apps", "", _Args(), after, before, limit, "apps")

    async def add_key(self, key_id: str, app_id: str, display_name: str, secret: str, now: float) -> None:
        """Store an app key; its secret is sealed (an HS256 JWT is verified with it, so it cannot be a hash)."""
        await self._run("INSERT INTO app_keys (id, app_id, display_name, secret, created_at)"
                        " VALUES ($1, $2, $3, $4, $5)", key_id, app_id, display_name,
                        self.keyring.seal(secret, app_key_context(key_id)), now)

    def _key_out(self, row: Row) -> dict[str, Any]:
        key = dict(row)
        key["secret"] = self.keyring.open(key["secret"], app_key_context(key["id"]))
        return key

    async def get_key(self, key_id: str) -> dict[str, Any] | None:
        """An app key's row, its secret opened."""
        row = await self._one("SELECT * FROM app_keys WHERE id=$1", key_id)
        return None if row is None else self._key_out(row)

    async def list_keys(self, app_id: str) -> list[dict[str, Any]]:
        """An app's keys, their secrets opened."""
        return [self._key_out(row) for row in await self._all("SELECT * FROM app_keys WHERE app_id=$1 ORDER BY id",
                                                              app_id)]

    async def count_keys(self, app_id: str) -> int:
        return int(await self._c().fetchval("SELECT COUNT(*) FROM app_keys WHERE app_id=$1", app_id) or 0)

    async def reseal_secrets(self, integration_fields: Iterable[str]) -> Resealed:
        """Seal every secret under the keyring's primary key: plaintext ones (a data directory
        from before secrets were encrypted) and those sealed under an older key (rotation).

        One transaction; raises SecretsError (nothing changed) when a secret is sealed under a
        key the keyring does not hold.
        """
        fields = tuple(integration_fields)
        counts = {"app_keys": 0, "integrations": 0, "webhooks": 0}
        async with self.tx():
            for table in ("app_keys", "integration_keys"):  # custom integration keys count as keys
                for row in await self._all(f"SELECT id, secret FROM {table}"):
                    if self.keyring.needs_reseal(row["secret"]):
                        sealed = self.keyring.reseal(row["secret"], app_key_context(row["id"]))
                        await self._run(f"UPDATE {table} SET secret=$1 WHERE id=$2", sealed, row["id"])
                        counts["app_keys"] += 1
            for row in await self._all("SELECT id, config FROM integrations"):
                config = loads(row["config"])
                resealed = self.keyring.seal_fields(config, fields, records.integration_context(row["id"]))
                if resealed != config:
                    await self._run("UPDATE integrations SET config=$1 WHERE id=$2", dumps(resealed), row["id"])
                    counts["integrations"] += 1
            for row in await self._all("SELECT id, record FROM webhooks"):
                hook = records.WEBHOOK_DECODER.decode(row["record"])
                if self.keyring.needs_reseal(hook.secret):
                    hook = msgspec.structs.replace(hook, secret=self.keyring.reseal(
                        hook.secret, records.webhook_secret_context(hook.id)))
                    await self._run("UPDATE webhooks SET record=$1 WHERE id=$2",
                                    records.ENCODER.encode(hook).decode(), row["id"])
                    counts["webhooks"] += 1
        return Resealed(**counts)

    async def delete_key(self, app_id: str, key_id: str) -> int:
        return await self._run("DELETE FROM app_keys WHERE app_id=$1 AND id=$2", app_id, key_id)

    # --- integrations and webhooks ----------------------------------------------------------

    async def add_integration(self, integration_id: str, app_id: str, type_: str, status: str,
                              display_name: str | None, config: dict[str, Any], now: float) -> None:
        await self._run(
            "INSERT INTO integrations (id, app_id, type, status, display_name, config, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", integration_id, app_id, type_, status, display_name, dumps(config),
            now)

    async def set_integration(self, integration_id: str, status: str, display_name: str | None,
                              config: dict[str, Any]) -> None:
        await self._run("UPDATE integrations SET status=$1, display_name=$2, config=$3 WHERE id=$4",
                        status, display_name, dumps(config), integration_id)

    async def delete_integration(self, integration_id: str) -> int:
        return await self._run("DELETE FROM integrations WHERE id=$1", integration_id)

    async def get_integration(self, app_id: str, integration_id: str) -> Row | None:
        return await self._one("SELECT * FROM integrations WHERE app_id=$1 AND id=$2", app_id, integration_id)

    async def integrations_of_type(self, type_: str) -> list[Row]:
        """Every integration of a type, whatever its app (id, app_id, config)."""
        return await self._all("SELECT id, app_id, config FROM integrations WHERE type=$1", type_)

    async def list_integrations(self, app_id: str | None, types: Iterable[str] | None = None, *,
                                after: str | None = None, before: str | None = None,
                                limit: int = 1000) -> tuple[list[Row], bool]:
        args = _Args()
        where = []
        if app_id is not None:
            where.append(f"app_id={args.add(app_id)}")
        if types:
            where.append(f"type IN ({args.marks(types)})")
        return await self._page("SELECT * FROM integrations", " AND ".join(where), args, after, before, limit,
                                "integrations")

    async def add_webhook(self, webhook_id: str, app_id: str, integration_id: str, record: str, now: float) -> None:
        await self._run("INSERT INTO webhooks (id, app_id, integration_id, record, created_at)"
                        " VALUES ($1, $2, $3, $4, $5)", webhook_id, app_id, integration_id, record, now)

    async def set_webhook(self, webhook_id: str, record: str) -> None:
        await self._run("UPDATE webhooks SET record=$1 WHERE id=$2", record, webhook_id)

    async def delete_webhook(self, webhook_id: str) -> int:
        return await self._run("DELETE FROM webhooks WHERE id=$1", webhook_id)

    async def get_webhook(self, integration_id: str, webhook_id: str) -> Row | None:
        return await self._one("SELECT * FROM webhooks WHERE integration_id=$1 AND id=$2", integration_id, webhook_id)

    async def list_webhooks(self, integration_id: str | None = None, app_id: str | None = None) -> list[Row]:
        if integration_id is not None:
            return await self._all("SELECT * FROM webhooks WHERE integration_id=$1 ORDER BY id", integration_id)
        if app_id is not None:
            return await self._all("SELECT * FROM webhooks WHERE app_id=$1 ORDER BY id", app_id)
        return await self._all("SELECT * FROM webhooks ORDER BY id")

    # --- conversations and participants -----------------------------------------------------

    async def set_conversation(self, conversation_id: str, display_name: str | None, description: str | None,
                               icon_url: str | None, metadata: dict[str, Any] | None) -> None:
        await self._run(
            "UPDATE conversations SET display_name=$1, description=$2, icon_url=$3, metadata=$4 WHERE id=$5",
            display_name, description, icon_url, None if metadata is None else dumps(metadata), conversation_id)

    async def touch_conversation(self, conversation_id: str, now: float) -> None:
        await self._run("UPDATE conversations SET last_updated_at=$1 WHERE id=$2", now, conversation_id)

    async def set_business_last_read(self, conversation_id: str, at: float) -> None:
        await self._run("UPDATE conversations SET business_last_read=$1 WHERE id=$2", at, conversation_id)

    async def delete_conversation(self, conversation_id: str) -> int:
        """Delete a conversation (its messages, participants and attachments go with it)."""
        await self._run("DELETE FROM attachments WHERE conversation_id=$1", conversation_id)
        return await self._run("DELETE FROM conversations WHERE id=$1", conversation_id)

    async def get_conversation(self, app_id: str, conversation_id: str) -> Row | None:
        return await self._one("SELECT * FROM conversations WHERE app_id=$1 AND id=$2", app_id, conversation_id)

    async def default_conversation(self, app_id: str, user_id: str) -> Row | None:
        """The user's default conversation (asked for every customer message)."""
        return await self._one("SELECT * FROM conversations WHERE app_id=$1 AND default_user_id=$2", app_id, user_id)

    async def list_user_conversations(self, app_id: str, user_id: str, after: str | None, before: str | None,
                                      limit: int, where: ConversationFilter | None = None) -> tuple[list[Row], bool]:
        """The user's conversations in creation order (`_page`: id cursors), those `where` keeps."""
        args = _Args(app_id, user_id)
        clauses = ["p.app_id=$1 AND p.user_id=$2", *(where.clauses(args) if where is not None else [])]
        return await self._page(
            "SELECT c.* FROM conversations c JOIN participants p ON p.conversation_id = c.id",
            " AND ".join(clauses), args, after, before, limit, "conversations", "c")

    async def list_conversations(self, app_id: str, where: ConversationFilter, after: tuple[float, str] | None,
                                 before: tuple[float, str] | None, limit: int) -> tuple[list[Row], bool]:
        """The app's conversations that `where` keeps, most recent activity first: keyset paging
        on (last_updated_at, id) descending, never an offset.

        A cursor is a position (last_updated_at, a prefix of the id), not a row: `after` pages
        towards older activity, `before` towards newer. Rows sharing the cursor's id prefix and
        time are taken for the cursor's own row (ids share 18 hex digits only by a 2^-40 chance
        within one second). Returns the page newest first and whether more rows lie beyond it in
        the direction of paging. A conversation created, or active, after the first page sorts
        above it: paging on (`after`) shows no conversation twice and skips none that kept its
        place; one that moved up is seen by paging back (`before`) or on a new first page.
        """
        args = _Args(app_id)
        clauses = ["c.app_id=$1", *where.clauses(args)]
        for cursor, op in ((after, "<"), (before, ">")):
            if cursor is None:
                continue
            at, prefix = args.add(cursor[0]), args.add(cursor[1])
            # The first comparison bounds the index range; the second breaks the tie.
            clauses.append(f"c.last_updated_at {op}= {at} AND (c.last_updated_at {op} {at}"
                           f" OR substr(c.id, 1, {len(cursor[1])}) {op} {prefix})")
        order = "ASC" if before is not None and after is None else "DESC"
        rows = await self._all(
            f"SELECT c.* FROM conversations c WHERE {' AND '.join(clauses)}"
            f" ORDER BY c.last_updated_at {order}, c.id {order} LIMIT {args.add(limit + 1)}", *args.values)
        more = len(rows) > limit
        rows = rows[:limit]
        if order == "ASC":
            rows.reverse()
        return rows, more

    async def set_participant_external_id(self, app_id: str, user_id: str, external_id: str | None) -> None:
        await self._run("UPDATE participants SET user_external_id=$1 WHERE app_id=$2 AND user_id=$3",
                        external_id, app_id, user_id)

    async def participants(self, conversation_id: str) -> list[Row]:
        return await self._all("SELECT * FROM participants WHERE conversation_id=$1 ORDER BY created_at, id",
                               conversation_id)

    async def participant(self, conversation_id: str, user_id: str) -> Row | None:
        return await self._one("SELECT * FROM participants WHERE conversation_id=$1 AND user_id=$2",
                               conversation_id, user_id)

    async def begin_user_deletion(self, app_id: str, user_id: str, subject_id: str,
                                  conversation_ids: Sequence[str]) -> tuple[str, list[str]]:
        """Note a user deletion under way, or add to the one an earlier attempt noted: the subject
        its `user:remove` goes on (the first attempt's) and every conversation it names."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "SELECT subject_id, conversation_ids FROM user_deletions WHERE app_id=$1 AND user_id=$2",
                app_id, user_id)
            named = list(dict.fromkeys([*(loads(row["conversation_ids"]) if row else []), *conversation_ids]))
            subject = str(row["subject_id"]) if row else subject_id
            await tx.execute(
                "INSERT INTO user_deletions (app_id, user_id, subject_id, conversation_ids) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (app_id, user_id) DO UPDATE SET conversation_ids = excluded.conversation_ids",
                app_id, user_id, subject, dumps(named))
        return subject, named

    async def end_user_deletion(self, app_id: str, user_id: str) -> None:
        """The user deletion is done: forget its note."""
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM user_deletions WHERE app_id=$1 AND user_id=$2", app_id, user_id)

    async def user_conversation_ids(self, app_id: str, user_id: str) -> list[str]:
        rows = await self._all("SELECT conversation_id FROM participants WHERE app_id=$1 AND user_id=$2",
                               app_id, user_id)
        return [r["conversation_id"] for r in rows]

    async def mark_read(self, participant_id: str, at: float) -> None:
        await self._run("UPDATE participants SET last_read=$1, unread_count=0 WHERE id=$2", at, participant_id)

    async def add_unread(self, conversation_id: str) -> None:
        await self._run("UPDATE participants SET unread_count = unread_count + 1 WHERE conversation_id=$1",
                        conversation_id)

    async def merge_user(self, app_id: str, discarded_id: str, surviving_id: str,
                         surviving_external_id: str | None) -> list[str]:
        """Give the discarded user's conversations to the survivor (inside `tx()`); their ids.

        The survivor keeps its own default conversation; the discarded one's stays as another
        conversation of the survivor (it becomes the survivor's default when it has none).
        """
        moved = [str(r["conversation_id"]) for r in await self._all(
            "SELECT conversation_id FROM participants WHERE app_id=$1 AND user_id=$2", app_id, discarded_id)]
        await self._run(
            "UPDATE conversations SET default_user_id = CASE WHEN EXISTS (SELECT 1 FROM conversations s"
            " WHERE s.app_id=$1 AND s.default_user_id=$3) THEN NULL ELSE $3 END"
            " WHERE app_id=$1 AND default_user_id=$2", app_id, discarded_id, surviving_id)
        await self._run("UPDATE participants SET user_id=$1, user_external_id=$2 WHERE app_id=$3 AND user_id=$4",
                        surviving_id, surviving_external_id, app_id, discarded_id)
        await self._run("UPDATE messages SET user_id=$1 WHERE app_id=$2 AND user_id=$3",
                        surviving_id, app_id, discarded_id)
        return moved

    async def user_history(self, app_id: str, user_id: str) -> tuple[int, float | None]:
        """How many messages the user's conversations hold, and when the first was received."""
        row = await self._one(
            "SELECT COUNT(*) AS n, MIN(received) AS first FROM messages WHERE app_id=$1 AND conversation_id IN"
            " (SELECT conversation_id FROM participants WHERE app_id=$1 AND user_id=$2)", app_id, user_id)
        return (0, None) if row is None else (int(row["n"]), row["first"])

    async def remove_association(self, app_id: str, user_id: str, client_id: str) -> list[str]:
        """Take the client out of the user's conversations (inside `tx()`); their ids."""
        rows = await self._all(
            "SELECT p.id, p.conversation_id FROM participants p JOIN client_associations a ON a.participant_id = p.id"
            " WHERE p.app_id=$1 AND p.user_id=$2 AND a.client_id=$3", app_id, user_id, client_id)
        for row in rows:
            await self._run("DELETE FROM client_associations WHERE participant_id=$1 AND client_id=$2",
                            row["id"], client_id)
        return [str(row["conversation_id"]) for row in rows]

    async def leave_conversations(self, app_id: str, client_id: str, *, except_user_id: str | None = None,
                                  only_user_id: str | None = None) -> list[ConversationRef]:
        """Remove the client from participants' client associations, most recently active first
        (inside `tx()`); the conversations it left."""
        args = _Args(client_id, app_id)
        where = "a.client_id=$1 AND p.app_id=$2"
        if except_user_id is not None:
            where += f" AND p.user_id <> {args.add(except_user_id)}"
        if only_user_id is not None:
            where += f" AND p.user_id = {args.add(only_user_id)}"
        rows = await self._all(
            "SELECT a.participant_id, c.id, c.type FROM client_associations a"
            " JOIN participants p ON p.id = a.participant_id JOIN conversations c ON c.id = p.conversation_id"
            f" WHERE {where} ORDER BY a.last_active DESC", *args.values)
        for row in rows:
            await self._run("DELETE FROM client_associations WHERE participant_id=$1 AND client_id=$2",
                            row["participant_id"], client_id)
        return [ConversationRef(id=row["id"], type=row["type"]) for row in rows]

    async def upsert_association(self, participant_id: str, client_id: str, type_: str,
                                 integration_id: str | None, external_id: str | None,
                                 info: dict[str, Any] | None, now: float) -> bool:
        """Make the client the most recent (primary) one; True when it was not associated before."""
        text = None if info is None else dumps(info)
        if await self._run(_TOUCH_ASSOCIATION, now, type_, integration_id, external_id, text, participant_id,
                           client_id):
            return False
        await self._run(_UPSERT_ASSOCIATION, participant_id, client_id, type_, integration_id, external_id, text, now)
        return True

    async def associations(self, participant_id: str) -> list[Association]:
        rows = await self._all(
            "SELECT * FROM client_associations WHERE participant_id=$1 ORDER BY last_active DESC, client_id",
            participant_id)
        return [Association(client_id=r["client_id"], type=r["type"], integration_id=r["integration_id"],
                            external_id=r["external_id"], info=loads(r["info"]), last_active=r["last_active"])
                for r in rows]

    # --- pending merges (linking.py) ----------------------------------------------------------

    async def put_pending_merge(self, pending: PendingMerge) -> None:
        """Record (or replace) the merge `pending.client_id` is asked to confirm (inside `tx()`)."""
        await self._run(
            "INSERT INTO merge_confirmations (client_id, app_id, surviving_user_id, discarded_user_id,"
            " conversation_id, integration_id, client_type, code, answer, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT (client_id) DO UPDATE SET app_id=excluded.app_id,"
            " surviving_user_id=excluded.surviving_user_id, discarded_user_id=excluded.discarded_user_id,"
            " conversation_id=excluded.conversation_id, integration_id=excluded.integration_id,"
            " client_type=excluded.client_type, code=excluded.code, answer=excluded.answer,"
            " created_at=excluded.created_at,"
            " expires_at=excluded.expires_at",
            pending.client_id, pending.app_id, pending.surviving_user_id, pending.discarded_user_id,
            pending.conversation_id, pending.integration_id, pending.client_type, pending.code, pending.answer,
            pending.created_at, pending.expires_at)

    async def pending_merge(self, client_id: str) -> PendingMerge | None:
        """The merge a client is asked to confirm (asked for every customer message)."""
        row = await self._one("SELECT * FROM merge_confirmations WHERE client_id=$1", client_id)
        return None if row is None else PendingMerge(**dict(row))

    async def drop_pending_merge(self, client_id: str, created_at: float) -> bool:
        """Forget a client's pending merge if it is still this one (inside `tx()`)."""
        return await self._run("DELETE FROM merge_confirmations WHERE client_id=$1 AND created_at=$2",
                               client_id, created_at) > 0

    async def expired_pending_merges(self, at: float, limit: int = 100) -> list[PendingMerge]:
        """Pending merges past their time, oldest first."""
        rows = await self._all(
            "SELECT * FROM merge_confirmations WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2", at, limit)
        return [PendingMerge(**dict(row)) for row in rows]

    # --- pending direct links by phone (clients.py) ---------------------------------------------

    async def put_client_link(self, *, client_id: str, app_id: str, user_id: str, conversation_id: str,
                              integration_id: str, client_type: str, phone_number: str, confirmation: str,
                              primary: bool, source_integration_id: str | None, created_at: float,
                              expires_at: float) -> None:
        """Record (or replace) the pending link of a client."""
        await self._run(
            "INSERT INTO client_links (client_id, app_id, user_id, conversation_id, integration_id, client_type,"
            " phone_number, confirmation, is_primary, source_integration_id, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (client_id) DO UPDATE SET"
            " app_id=excluded.app_id, user_id=excluded.user_id, conversation_id=excluded.conversation_id,"
            " integration_id=excluded.integration_id, client_type=excluded.client_type,"
            " phone_number=excluded.phone_number, confirmation=excluded.confirmation,"
            " is_primary=excluded.is_primary, source_integration_id=excluded.source_integration_id,"
            " created_at=excluded.created_at, expires_at=excluded.expires_at",
            client_id, app_id, user_id, conversation_id, integration_id, client_type, phone_number, confirmation,
            int(primary), source_integration_id, created_at, expires_at)

    async def client_link(self, client_id: str) -> Row | None:
        """The pending link of a client."""
        return await self._one("SELECT * FROM client_links WHERE client_id=$1", client_id)

    async def drop_client_link(self, client_id: str) -> bool:
        """Forget the pending link of a client; whether there was one."""
        return await self._run("DELETE FROM client_links WHERE client_id=$1", client_id) > 0

    async def expired_client_links(self, at: float, limit: int = 100) -> list[Row]:
        """Pending links past their time, oldest first."""
        return await self._all("SELECT * FROM client_links WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2",
                               at, limit)

    # --- messages ---------------------------------------------------------------------------

    async def insert_message(self, message_id: str, app_id: str, conversation_id: str, author_type: str,
                             user_id: str | None, integration_id: str | None, provider_message_id: str | None,
                             event_id: str, received: float, body: str,
                             attachment: AttachmentClaim | None = None) -> int | None:
        """Insert a message (and claim the file it carries) and return its seq, or None when the
        provider id was stored already."""
        seq = await self._returning(_INSERT_MESSAGE, message_id, app_id, conversation_id, author_type, user_id,
                                    integration_id, provider_message_id, event_id, received, body)
        if seq is not None and attachment is not None:
            await self._run(_CLAIM_ATTACHMENT, attachment.token, app_id, attachment.filename, attachment.media_type,
                            conversation_id, received)
        return None if seq is None else int(seq)

    async def recent_business_contents(self, conversation_id: str, limit: int) -> list[Content]:
        """The contents of the business's latest `limit` messages in the conversation, newest first."""
        rows = await self._all(
            "SELECT body FROM messages WHERE conversation_id=$1 AND author_type='business' ORDER BY seq DESC LIMIT $2",
            conversation_id, limit)
        return [MESSAGE_DECODER.decode(row["body"]).content for row in rows]

    async def latest_message(self, conversation_id: str) -> tuple[str, Content] | None:
        """(author type, content) of the conversation's latest message."""
        row = await self._one(
            "SELECT author_type, body FROM messages WHERE conversation_id=$1 ORDER BY seq DESC LIMIT 1",
            conversation_id)
        return None if row is None else (row["author_type"], MESSAGE_DECODER.decode(row["body"]).content)

    async def last_inbound_provider_id(self, conversation_id: str, integration_id: str) -> str | None:
        """The platform's id of the customer's latest message in the conversation on this integration."""
        row = await self._one(
            "SELECT provider_message_id FROM messages WHERE conversation_id=$1 AND integration_id=$2"
            " AND author_type='user' AND provider_message_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
            conversation_id, integration_id)
        return None if row is None else str(row["provider_message_id"])

    async def message_by_provider_id(self, app_id: str, integration_id: str,
                                     provider_message_id: str) -> StoredMessage | None:
        row = await self._one(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE app_id=$1 AND integration_id=$2 AND provider_message_id=$3",
            app_id, integration_id, provider_message_id)
        return None if row is None else StoredMessage(**dict(row))

    async def get_message(self, app_id: str, message_id: str) -> StoredMessage | None:
        row = await self._one(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE app_id=$1 AND id=$2",
                              app_id, message_id)
        return None if row is None else StoredMessage(**dict(row))

    async def search_messages(self, app_id: str, query: str, limit: int) -> list[str]:
        """The conversations whose messages hold `query` (lower-cased, as the JSON text has it), most
        recent first, among the app's newest `SEARCH_WINDOW` messages (a bound on what one search costs)."""
        text = _JSON.encode(query.lower()).decode()[1:-1]
        rows = await self._all(
            "SELECT conversation_id, MAX(seq) AS last FROM (SELECT conversation_id, body, seq FROM messages"
            " WHERE app_id = $1 ORDER BY seq DESC LIMIT $2) recent WHERE lower(body) LIKE $3 ESCAPE '!'"
            " GROUP BY conversation_id ORDER BY last DESC LIMIT $4",
            app_id, SEARCH_WINDOW, like_containing(text), limit)
        return [row["conversation_id"] for row in rows]

    async def message_event(self, conversation_id: str, message_id: str) -> tuple[str, float] | None:
        """A message's MessageCreated: its event id and time (None when there is no such message)."""
        row = await self._one("SELECT event_id, received FROM messages WHERE conversation_id=$1 AND id=$2",
                              conversation_id, message_id)
        return None if row is None else (str(row["event_id"]), float(row["received"]))

    async def delete_message(self, conversation_id: str, message_id: str) -> int:
        return await self._run("DELETE FROM messages WHERE conversation_id=$1 AND id=$2", conversation_id, message_id)

    async def delete_messages(self, conversation_id: str) -> int:
        """Delete the conversation's messages and the files they carried or were uploaded for it
        (inside `tx()`; the sweep deletes the files)."""
        await self._run("DELETE FROM attachments WHERE conversation_id=$1", conversation_id)
        return await self._run("DELETE FROM messages WHERE conversation_id=$1", conversation_id)

    async def message_seq(self, conversation_id: str, message_id: str) -> int | None:
        row = await self._one("SELECT seq FROM messages WHERE conversation_id=$1 AND id=$2",
                              conversation_id, message_id)
        return None if row is None else int(row["seq"])

    async def messages_before(self, conversation_id: str, before_seq: int | None, limit: int) -> tuple[
            list[StoredMessage], bool]:
        """The `limit` messages just before `before_seq` (all when None), oldest first, and whether older exist."""
        args = _Args(conversation_id)
        bound = "" if before_seq is None else f" AND seq < {args.add(before_seq)}"
        rows = await self._all(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id=$1{bound}"
            f" ORDER BY seq DESC LIMIT {args.add(limit + 1)}", *args.values)
        more = len(rows) > limit
        return [StoredMessage(**dict(r)) for r in reversed(rows[:limit])], more

    async def messages_after(self, conversation_id: str, after_seq: int, limit: int) -> tuple[
            list[StoredMessage], bool]:
        """The `limit` messages just after `after_seq`, oldest first, and whether newer exist."""
        rows = await self._all(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id=$1 AND seq > $2 ORDER BY seq LIMIT $3",
            conversation_id, after_seq, limit + 1)
        return [StoredMessage(**dict(r)) for r in rows[:limit]], len(rows) > limit

    async def has_messages(self, conversation_id: str, *, before_seq: int | None = None,
                           after_seq: int | None = None) -> bool:
        if before_seq is not None:
            row = await self._one("SELECT 1 FROM messages WHERE conversation_id=$1 AND seq < $2 LIMIT 1",
                                  conversation_id, before_seq)
        else:
            row = await self._one("SELECT 1 FROM messages WHERE conversation_id=$1 AND seq > $2 LIMIT 1",
                                  conversation_id, after_seq or 0)
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
                                     limit: int) -> list[Row]:
        """The app's conversations last active before `cutoff`, in activity order after the
        keyset `after` ((last_updated_at, id) of the previous page's last row)."""
        since, since_id = after if after is not None else (float("-inf"), "")
        return await self._all(
            "SELECT * FROM conversations WHERE app_id=$1 AND last_updated_at < $2"
            " AND (last_updated_at > $3 OR (last_updated_at = $3 AND id > $4))"
            " ORDER BY last_updated_at, id LIMIT $5", app_id, cutoff, since, since_id, limit)

    async def has_messages_before(self, conversation_id: str, before: float) -> bool:
        row = await self._one("SELECT 1 FROM messages WHERE conversation_id=$1 AND received < $2 LIMIT 1",
                              conversation_id, before)
        return row is not None

    async def delete_expired_messages(self, conversation_id: str, cutoff: float, limit: int) -> int:
        """Delete up to `limit` messages received before `cutoff`, while the conversation is still
        inactive since before it (inside `tx()`; a message that just arrived stops the sweep)."""
        return await self._run(
            "DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages m JOIN conversations c"
            " ON c.id = m.conversation_id WHERE m.conversation_id=$1 AND m.received < $2 AND c.last_updated_at < $2"
            " ORDER BY m.seq LIMIT $3)", conversation_id, cutoff, limit)

    async def delete_expired_externals(self, conversation_id: str, cutoff: float) -> int:
        """Forget the provider ids of the conversation's messages that are gone, and their files
        (inside `tx()`; the sweep deletes the files)."""
        await self._run("DELETE FROM attachments WHERE conversation_id=$1 AND created_at < $2", conversation_id, cutoff)
        return await self._run(
            "DELETE FROM external_messages WHERE conversation_id=$1 AND created_at < $2"
            " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = external_messages.message_id)",
            conversation_id, cutoff)

    # --- erasure (user deletion, personal information) ---------------------------------------

    async def delete_some_messages(self, conversation_id: str, limit: int) -> int:
        """Delete up to `limit` of the conversation's messages, oldest first (inside `tx()`)."""
        return await self._run("DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE conversation_id=$1"
                               " ORDER BY seq LIMIT $2)", conversation_id, limit)

    async def delete_user_rows(self, app_id: str, user_id: str, conversation_ids: Sequence[str]) -> None:
        """Delete the user's conversations (participants, client associations and pending links go
        with them), their provider ids, and the user's pending links and merges (inside `tx()`)."""
        args = _Args()
        marks = args.marks(conversation_ids)
        await self._run(f"DELETE FROM external_messages WHERE conversation_id IN ({marks})", *args.values)
        await self._run(f"DELETE FROM attachments WHERE conversation_id IN ({marks})", *args.values)
        await self._run("DELETE FROM client_links WHERE app_id=$1 AND user_id=$2", app_id, user_id)
        await self._run("DELETE FROM merge_confirmations WHERE app_id=$1 AND (surviving_user_id=$2 OR"
                        " discarded_user_id=$2)", app_id, user_id)
        await self._run(f"DELETE FROM conversations WHERE id IN ({marks})", *args.values)

    async def clear_association_info(self, app_id: str, user_id: str) -> None:
        """Forget the channel information copied with the user's clients (inside `tx()`)."""
        await self._run("UPDATE client_associations SET info=NULL WHERE participant_id IN"
                        " (SELECT id FROM participants WHERE app_id=$1 AND user_id=$2)", app_id, user_id)

    async def user_authored(self, app_id: str, user_id: str, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, body) of the messages the user wrote, after `after_seq`, oldest first."""
        rows = await self._all("SELECT seq, body FROM messages WHERE app_id=$1 AND user_id=$2 AND author_type='user'"
                               " AND seq > $3 ORDER BY seq LIMIT $4", app_id, user_id, after_seq, limit)
        return [(int(r["seq"]), str(r["body"])) for r in rows]

    async def set_message_bodies(self, bodies: Sequence[tuple[int, str]]) -> None:
        """Rewrite stored message bodies (inside `tx()`)."""
        await self._c().executemany("UPDATE messages SET body=$1 WHERE seq=$2", [(body, seq) for seq, body in bodies])

    async def user_pending_links(self, app_id: str, user_id: str) -> list[Row]:
        """The user's direct links by phone waiting for a confirmation (for an export)."""
        return await self._all("SELECT * FROM client_links WHERE app_id=$1 AND user_id=$2 ORDER BY created_at",
                               app_id, user_id)

    async def user_pending_merges(self, app_id: str, user_id: str) -> list[PendingMerge]:
        """The merges waiting for a customer's yes that involve the user (for an export)."""
        rows = await self._all("SELECT * FROM merge_confirmations WHERE app_id=$1 AND (surviving_user_id=$2 OR"
                               " discarded_user_id=$2) ORDER BY created_at", app_id, user_id)
        return [PendingMerge(**dict(row)) for row in rows]

    async def checkpoint(self) -> bool:
        """After erasing rows: make their bytes unreadable on disk where the engine allows it
        (SQLite truncates its write-ahead log). Not inside `tx()`."""
        self._outside_tx("checkpoint")
        return await self.db.erase_freed_pages()

    # --- provider ids of sent messages ------------------------------------------------------

    async def upsert_external(self, app_id: str, integration_id: str, provider_message_id: str,
                              message_id: str, conversation_id: str, now: float) -> None:
        await self._run(
            "INSERT INTO external_messages (app_id, integration_id, provider_message_id, message_id, conversation_id,"
            " created_at) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (app_id, integration_id, provider_message_id) DO NOTHING",
            app_id, integration_id, provider_message_id, message_id, conversation_id, now)

    async def external(self, app_id: str, integration_id: str, provider_message_id: str) -> Row | None:
        return await self._one(
            "SELECT * FROM external_messages WHERE app_id=$1 AND integration_id=$2 AND provider_message_id=$3",
            app_id, integration_id, provider_message_id)

    # --- paging -----------------------------------------------------------------------------

    async def _page(self, select: str, where: str, args: _Args, after: str | None, before: str | None,
                    limit: int, table: str, alias: str = "") -> tuple[list[Row], bool]:
        """Keyset paging in creation order, by (created_at, id); cursors are ids. `where` uses
        `args`' placeholders.

        Returns the page in ascending order and whether more rows exist past it in the
        direction of paging. A cursor id that does not exist is a 400.
        """
        col = f"{alias}." if alias else ""
        clauses = [where] if where else []
        for cursor, op in ((after, ">"), (before, "<")):
            if cursor is None:
                continue
            row = await self._one(f"SELECT created_at FROM {table} WHERE id=$1", cursor)
            if row is None:
                raise CursorNotFound(cursor)
            at, at_id = args.add(row["created_at"]), args.add(cursor)
            clauses.append(f"({col}created_at {op} {at} OR ({col}created_at = {at} AND {col}id {op} {at_id}))")
        sql = select + (" WHERE " + " AND ".join(clauses) if clauses else "")
        order = "DESC" if before is not None and after is None else "ASC"
        rows = await self._all(f"{sql} ORDER BY {col}created_at {order}, {col}id {order} LIMIT {args.add(limit + 1)}",
                               *args.values)
        more = len(rows) > limit
        rows = rows[:limit]
        if order == "DESC":
            rows.reverse()
        return rows, more


class CursorNotFound(LookupError):
    """A paging cursor names no row."""
