"""Users and clients, in the identity service's own database (`shared.db`: a SQLite file of its
own, or a schema on PostgreSQL).

Every write is one statement or one transaction, and what two replicas could both try to create
(a client for one channel identity, a user for one externalId, an alias) is settled by a unique
index and `ON CONFLICT`, not by a read before the write.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import msgspec

from shared.db import (
    INTEGRITY_ERRORS,
    Connection,
    Database,
    DatabaseSettings,
    Migration,
    Row,
    like_containing,
    open_database,
    postgres_ddl,
    serialize,
    split_sql,
)
from shared.ids import iso, new_id, now
from shared.messages.identity import MergeRecord, RegisterDevice, ResolveClient, SimilarUser
from shared.sunco import Client, Device, Profile, User

# Version 4's table, as SQLite has always been given it.
_CLIENT_ALIASES = """
    CREATE TABLE client_aliases (
        app_id TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        alias TEXT NOT NULL,
        client_id TEXT NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
        PRIMARY KEY (app_id, integration_id, alias)
    );
    CREATE INDEX client_aliases_client ON client_aliases (client_id)
    """
# Its backfill reads JSON, which each engine spells its own way.
_CLIENT_ALIASES_BACKFILL = {
    "sqlite": """INSERT INTO client_aliases (app_id, integration_id, alias, client_id)
        SELECT app_id, integration_id, json_extract(info, '$.wa_id'), id FROM clients
        WHERE type = 'whatsapp' AND json_extract(info, '$.wa_id') IS NOT NULL
          AND json_extract(info, '$.wa_id') != external_id
        ON CONFLICT DO NOTHING""",
    "postgres": """INSERT INTO client_aliases (app_id, integration_id, alias, client_id)
        SELECT app_id, integration_id, info::jsonb ->> 'wa_id', id FROM clients
        WHERE type = 'whatsapp' AND info::jsonb ->> 'wa_id' IS NOT NULL
          AND info::jsonb ->> 'wa_id' <> external_id
        ON CONFLICT DO NOTHING""",
}


async def _client_aliases(tx: Connection) -> None:
    """Version 4: the alias table, backfilled from the wa_id each WhatsApp client's `info` kept
    (on SQLite the very statements the script of this version always ran)."""
    ddl = _CLIENT_ALIASES if tx.engine == "sqlite" else postgres_ddl(_CLIENT_ALIASES)
    for statement in [*split_sql(ddl), _CLIENT_ALIASES_BACKFILL[tx.engine]]:
        await tx.execute(statement)


MIGRATION = Migration([
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        external_id TEXT,
        signed_up_at REAL NOT NULL,
        authenticated INTEGER NOT NULL DEFAULT 0,
        profile TEXT NOT NULL DEFAULT '{}',
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE UNIQUE INDEX users_external_id ON users (app_id, external_id);
    CREATE INDEX users_app ON users (app_id);
    CREATE TABLE clients (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        status TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        display_name TEXT,
        avatar_url TEXT,
        info TEXT NOT NULL DEFAULT '{}',
        raw TEXT NOT NULL DEFAULT '{}',
        linked_at REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    CREATE UNIQUE INDEX clients_channel_identity ON clients (app_id, integration_id, external_id);
    CREATE INDEX clients_user ON clients (user_id)
    """,
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        client_id TEXT NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
        integration_id TEXT NOT NULL,
        type TEXT NOT NULL,
        guid TEXT NOT NULL,
        status TEXT NOT NULL,
        push_token TEXT,
        app_version TEXT,
        info TEXT NOT NULL DEFAULT '{}',
        last_seen REAL NOT NULL
    );
    CREATE UNIQUE INDEX devices_client_guid ON devices (client_id, guid);
    CREATE INDEX devices_user ON devices (user_id);
    CREATE INDEX devices_push_token ON devices (app_id, push_token)
    """,
    """
    CREATE TABLE merges (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        surviving_user_id TEXT NOT NULL,
        discarded_user_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        merged_client_ids TEXT NOT NULL,
        discarded_metadata TEXT NOT NULL,
        discarded_user TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX merges_surviving ON merges (app_id, surviving_user_id);
    CREATE INDEX merges_discarded ON merges (app_id, discarded_user_id)
    """,
    # Other keys one client is known by on its integration: a WhatsApp client keyed by its BSUID
    # is also found by its wa_id (the phone's digits), one created from a phone number by its
    # BSUID once a message carried both. Backfilled from the wa_id kept in `info`.
    _client_aliases,
    # (privacy) A client's `raw` was the payload of the message that created it: that text must
    # not outlive the message (retention, erasure); nothing else ever wrote `raw`.
    """
    UPDATE clients SET raw = '{}' WHERE raw <> '{}'
    """,
    # The SDK client that proved it reads a phone client's number (an opt-in's confirmed code):
    # an SDK login takes such a client along with the session (login.py).
    """
    ALTER TABLE clients ADD COLUMN proven_by TEXT
    """,
    # One device per push token and app, enforced by the database: two replicas registering one
    # token for two devices at once would otherwise both keep it (each push sent twice). Of
    # devices already sharing a token, the one seen last keeps it.
    """
    UPDATE devices SET push_token = NULL, status = 'inactive'
    WHERE push_token IS NOT NULL AND EXISTS (
        SELECT 1 FROM devices AS newer WHERE newer.app_id = devices.app_id AND newer.push_token = devices.push_token
        AND (newer.last_seen > devices.last_seen OR (newer.last_seen = devices.last_seen AND newer.id > devices.id)));
    DROP INDEX devices_push_token;
    CREATE UNIQUE INDEX devices_push_token ON devices (app_id, push_token) WHERE push_token IS NOT NULL
    """,
    # The desk's merge suggestions look a number or an address up across an app's integrations.
    """
    CREATE INDEX clients_app_external_id ON clients (app_id, external_id);
    CREATE INDEX client_aliases_app_alias ON client_aliases (app_id, alias)
    """,
])

MAX_METADATA_BYTES = 4096


class Conflict(Exception):
    """A uniqueness rule (externalId per app) would be broken."""


def _user(row: Row) -> User:
    return User(
        id=row["id"], external_id=row["external_id"], signed_up_at=iso(row["signed_up_at"]),
        authenticated=bool(row["authenticated"]),
        profile=msgspec.convert(json.loads(row["profile"]), Profile),
        metadata=json.loads(row["metadata"]),
    )


def _client(row: Row) -> Client:
    return Client(
        id=row["id"], type=row["type"], status=row["status"], integration_id=row["integration_id"],
        external_id=row["external_id"], display_name=row["display_name"], avatar_url=row["avatar_url"],
        info=json.loads(row["info"]) or None, raw=json.loads(row["raw"]) or None,
        linked_at=iso(row["linked_at"]), last_seen=iso(row["last_seen"]),
    )


def _device(row: Row) -> Device:
    return Device(
        id=row["id"], type=row["type"], guid=row["guid"], client_id=row["client_id"], status=row["status"],
        integration_id=row["integration_id"], last_seen=iso(row["last_seen"]),
        push_notification_token=row["push_token"], info=json.loads(row["info"]) or None,
        app_version=row["app_version"],
    )


class ChannelIdentity(NamedTuple):
    """What `resolve_clients` needs of a `ResolveClient` (wa_id: a WhatsApp sender's number when
    it differs from the key)."""

    request: ResolveClient
    wa_id: str | None


class Resolution(NamedTuple):
    user: User
    client: Client
    user_created: bool
    client_created: bool


_USER_BY_ID = "SELECT * FROM users WHERE app_id = $1 AND id = $2"
_CLIENT_BY_KEY = "SELECT * FROM clients WHERE app_id = $1 AND integration_id = $2 AND external_id = $3"
_CLIENT_BY_ALIAS = ("SELECT c.* FROM client_aliases a JOIN clients c ON c.id = a.client_id"
                    " WHERE a.app_id = $1 AND a.integration_id = $2 AND a.alias = $3")
_ADD_ALIAS = ("INSERT INTO client_aliases (app_id, integration_id, alias, client_id) VALUES ($1, $2, $3, $4)"
              " ON CONFLICT (app_id, integration_id, alias) DO NOTHING")
_INSERT_USER = ("INSERT INTO users (id, app_id, external_id, signed_up_at, profile)"
                " VALUES ($1, $2, NULL, $3, $4)")
# Rows changed 0: another transaction (a concurrent request, another replica) created the client.
_INSERT_CLIENT = (
    "INSERT INTO clients (id, app_id, user_id, type, status, integration_id, external_id,"
    " display_name, avatar_url, info, raw, linked_at, last_seen)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)"
    " ON CONFLICT (app_id, integration_id, external_id) DO NOTHING")
_DELETE_USER = "DELETE FROM users WHERE app_id = $1 AND id = $2"


def _profile_from_name(display_name: str | None) -> dict[str, Any]:
    if not display_name:
        return {}
    given, _, surname = display_name.partition(" ")
    return {"givenName": given, **({"surname": surname} if surname else {})}


async def _client_now(tx: Connection, app_id: str, integration_id: str, key: str) -> tuple[User, Client] | None:
    row = await tx.fetchrow(_CLIENT_BY_KEY, app_id, integration_id, key)
    if row is None:
        row = await tx.fetchrow(_CLIENT_BY_ALIAS, app_id, integration_id, key)
    if row is None:
        return None
    user = await tx.fetchrow(_USER_BY_ID, app_id, row["user_id"])
    return None if user is None else (_user(user), _client(row))


async def _insert_client(tx: Connection, *, app_id: str, user_id: str | None, client_type: str, status: str,
                         integration_id: str, key: str, display_name: str | None, avatar_url: str | None,
                         info: dict[str, Any], raw: dict[str, Any]) -> str | None:
    """Create the client keyed `key` (and a user for it unless `user_id` is given), inside a
    transaction; its id, or None when another transaction created that client first (then no
    user is left behind: the one inserted here is deleted again, unseen)."""
    ts = now()
    owner = user_id or new_id()
    client_id = new_id()
    if user_id is None:
        await tx.execute(_INSERT_USER, owner, app_id, ts, json.dumps(_profile_from_name(display_name)))
    if await tx.execute(_INSERT_CLIENT, client_id, app_id, owner, client_type, status, integration_id, key,
                        display_name, avatar_url, json.dumps(info), json.dumps(raw), ts) == 1:
        return client_id
    if user_id is None:
        await tx.execute(_DELETE_USER, app_id, owner)
    return None


async def _resolve_now(tx: Connection, identity: ChannelIdentity) -> Resolution | None:
    """One identity of `IdentityStore.resolve_clients`, inside its transaction."""
    req, wa_id = identity
    found = await _client_now(tx, req.app_id, req.integration_id, req.channel_user_id)
    if found is None and wa_id:
        found = await _client_now(tx, req.app_id, req.integration_id, wa_id)
        if found is not None:
            user, client = found
            # (Its key is this one when another transaction created it since the lookup by key.)
            if client.external_id != req.channel_user_id:
                await tx.execute(_ADD_ALIAS, req.app_id, req.integration_id, req.channel_user_id, client.id)
            info = {**(client.info or {}), **req.info}
            if info != (client.info or {}):
                await tx.execute("UPDATE clients SET info = $1 WHERE app_id = $2 AND id = $3",
                                 json.dumps(info), req.app_id, client.id)
                client = msgspec.structs.replace(client, info=info)
            found = user, client
    if found is not None:
        return Resolution(found[0], found[1], False, False)
    if req.user_id is not None and await tx.fetchval(
            "SELECT 1 FROM users WHERE app_id = $1 AND id = $2", req.app_id, req.user_id) is None:
        return None
    client_id = await _insert_client(
        tx, app_id=req.app_id, user_id=req.user_id, client_type=req.client_type, status="active",
        integration_id=req.integration_id, key=req.channel_user_id, display_name=req.display_name,
        avatar_url=req.avatar_url, info=req.info, raw=req.raw)
    if client_id is not None and wa_id:
        # Keyed by its BSUID: its number finds it too (direct linking by phone).
        await tx.execute(_ADD_ALIAS, req.app_id, req.integration_id, wa_id, client_id)
    created = await _client_now(tx, req.app_id, req.integration_id, req.channel_user_id)
    assert created is not None
    inserted = client_id is not None
    return Resolution(created[0], created[1], inserted and req.user_id is None, inserted)


class IdentityStore:
    """Reads and writes users and clients; every write is one statement or one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> IdentityStore:
        """Open (and migrate) the service's database."""
        return cls(await open_database(settings, MIGRATION))

    async def close(self) -> None:
        await self.db.close()

    async def resolve_clients(self, identities: Sequence[ChannelIdentity]) -> list[Resolution | None]:
        """Find or create the client (and its user) behind each channel identity, in order, in one
        transaction: None for one whose `user_id` names no user. The same identity twice in a
        batch is created once. A WhatsApp sender unknown by its key whose wa_id names a client
        (made by direct linking from the number, or first seen without its BSUID) is that client,
        with its key as a new alias; a new WhatsApp client's wa_id becomes its alias. Two
        transactions creating one client at once (PostgreSQL, several replicas) end with one
        client and one user: the later finds the earlier's."""
        async with self.db.transaction() as tx:
            return [await _resolve_now(tx, identity) for identity in identities]

    async def find_user(self, app_id: str, id_or_external_id: str) -> User | None:
        """A user by id, else by externalId (SunCo's `{userIdOrExternalId}`)."""
        row = await self.db.fetchrow(_USER_BY_ID, app_id, id_or_external_id)
        if row is None:
            row = await self.db.fetchrow("SELECT * FROM users WHERE app_id = $1 AND external_id = $2",
                                         app_id, id_or_external_id)
        return _user(row) if row is not None else None

    async def create_user(self, app_id: str, external_id: str | None, profile: Profile,
                          metadata: dict[str, Any], signed_up_at: float | None = None) -> User:
        user_id = new_id()
        created = await self.db.execute(
            "INSERT INTO users (id, app_id, external_id, signed_up_at, profile, metadata)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (app_id, external_id) DO NOTHING",
            user_id, app_id, external_id, float(signed_up_at or now()), msgspec.json.encode(profile).decode(),
            json.dumps(metadata))
        if created != 1:
            raise Conflict(f"A user with externalId {external_id!r} already exists")
        user = await self.find_user(app_id, user_id)
        assert user is not None
        return user

    async def update_user(self, app_id: str, user: User, external_id: str | None,
                          profile: dict[str, Any] | None, metadata: dict[str, Any] | None) -> User:
        merged_profile = msgspec.to_builtins(user.profile)
        if profile is not None:
            for key, value in profile.items():
                if value is None:
                    merged_profile.pop(key, None)
                else:
                    merged_profile[key] = value
        merged_metadata = dict(user.metadata)
        if metadata is not None:
            for key, value in metadata.items():
                if value is None:
                    merged_metadata.pop(key, None)
                else:
                    merged_metadata[key] = value
        try:
            await self.db.execute(
                "UPDATE users SET external_id = $1, profile = $2, metadata = $3 WHERE id = $4 AND app_id = $5",
                external_id if external_id is not None else user.external_id,
                json.dumps(merged_profile), json.dumps(merged_metadata), user.id, app_id)
        except INTEGRITY_ERRORS as exc:  # one statement, no transaction of ours to spoil
            raise Conflict(f"A user with externalId {external_id!r} already exists") from exc
        updated = await self.find_user(app_id, user.id)
        assert updated is not None
        return updated

    async def delete_user(self, app_id: str, user_id: str) -> list[str]:
        """Delete a user with its clients, their aliases and devices, and the personal data the
        merge log kept of it (see `_scrub_merges`), leaving no byte of it on disk (as far as the
        engine allows: `erase_freed_pages`); returns the deleted client ids."""
        clients = await self.list_clients(app_id, user_id)
        async with self.db.transaction() as tx:
            await _scrub_merges(tx, app_id, user_id)
            await tx.execute("DELETE FROM devices WHERE app_id = $1 AND user_id = $2", app_id, user_id)
            await tx.execute("DELETE FROM clients WHERE app_id = $1 AND user_id = $2", app_id, user_id)
            await tx.execute(_DELETE_USER, app_id, user_id)
        await self.db.erase_freed_pages()
        return [c.id for c in clients]

    async def delete_personal_information(self, app_id: str, user_id: str) -> User | None:
        """SunCo's Delete User Personal Information: the profile (all but `locale`) and metadata,
        each client's displayName, avatarUrl, info and raw, devices' info and what the merge log
        kept are cleared; the user, its externalId, clients and history stay."""
        user = await self.find_user(app_id, user_id)
        if user is None:
            return None
        profile = {"locale": user.profile.locale} if user.profile.locale else {}
        async with self.db.transaction() as tx:
            await _scrub_merges(tx, app_id, user_id)
            await tx.execute("UPDATE users SET profile = $1, metadata = '{}' WHERE app_id = $2 AND id = $3",
                             json.dumps(profile), app_id, user_id)
            await tx.execute("UPDATE clients SET display_name = NULL, avatar_url = NULL, info = '{}', raw = '{}'"
                             " WHERE app_id = $1 AND user_id = $2", app_id, user_id)
            await tx.execute("UPDATE devices SET info = '{}' WHERE app_id = $1 AND user_id = $2", app_id, user_id)
        await self.db.erase_freed_pages()
        return await self.find_user(app_id, user_id)

    async def list_clients(self, app_id: str, user_id: str) -> list[Client]:
        rows = await self.db.fetch(
            "SELECT * FROM clients WHERE app_id = $1 AND user_id = $2 ORDER BY linked_at", app_id, user_id)
        return [_client(row) for row in rows]

    async def set_client_status(self, app_id: str, client_id: str, status: str) -> tuple[User, Client] | None:
        """Set a client's status; returns its user and the updated client (None: no such client)."""
        # In a transaction: outside one, `fetchrow` on SQLite reads on the read-only connection.
        async with self.db.transaction() as tx:
            row = await tx.fetchrow("UPDATE clients SET status = $1 WHERE app_id = $2 AND id = $3 RETURNING *",
                                    status, app_id, client_id)
        if row is None:
            return None
        user = await self.find_user(app_id, row["user_id"])
        return None if user is None else (user, _client(row))

    async def find_client(self, app_id: str, integration_id: str, channel_user_id: str) -> tuple[User, Client] | None:
        """The client a channel identity names: by its key, else by one of its aliases."""
        row = await self.db.fetchrow(_CLIENT_BY_KEY, app_id, integration_id, channel_user_id)
        if row is None:
            row = await self.db.fetchrow(_CLIENT_BY_ALIAS, app_id, integration_id, channel_user_id)
        if row is None:
            return None
        user = await self.find_user(app_id, row["user_id"])
        if user is None:
            return None
        return user, _client(row)

    async def create_client(self, *, app_id: str, integration_id: str, client_type: str, channel_user_id: str,
                            display_name: str | None, avatar_url: str | None, info: dict[str, Any],
                            raw: dict[str, Any], user_id: str | None,
                            status: str = "active") -> tuple[User, Client, bool, bool]:
        """Create the client (and its user unless `user_id` is given) in one transaction.

        Returns (user, client, user_created, client_created). If another request created the
        same client meanwhile, that one is returned and nothing is written.
        """
        async with self.db.transaction() as tx:
            client_id = await _insert_client(
                tx, app_id=app_id, user_id=user_id, client_type=client_type, status=status,
                integration_id=integration_id, key=channel_user_id, display_name=display_name,
                avatar_url=avatar_url, info=info, raw=raw)
        inserted = client_id is not None
        found = await self.find_client(app_id, integration_id, channel_user_id)
        assert found is not None
        user, client = found
        return user, client, inserted and user_id is None, inserted

    async def attach_client(self, app_id: str, client_id: str, user_id: str, status: str) -> None:
        """Give the client to `user_id` with `status` (a direct link: moved, never merged)."""
        await self.db.execute(
            "UPDATE clients SET user_id = $1, status = $2, linked_at = $3 WHERE app_id = $4 AND id = $5",
            user_id, status, now(), app_id, client_id)

    async def move_client(self, app_id: str, client_id: str, user_id: str) -> None:
        """Give one client, with its devices, to `user_id` (an SDK login that proves only it)."""
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE clients SET user_id = $1, linked_at = $2 WHERE app_id = $3 AND id = $4",
                             user_id, now(), app_id, client_id)
            await tx.execute("UPDATE devices SET user_id = $1 WHERE app_id = $2 AND client_id = $3",
                             user_id, app_id, client_id)

    async def set_proven_by(self, app_id: str, client_id: str, proven_by: str | None) -> None:
        """Record which SDK client proved it reads this client's address (None: none did)."""
        await self.db.execute("UPDATE clients SET proven_by = $1 WHERE app_id = $2 AND id = $3",
                              proven_by, app_id, client_id)

    async def proven_by(self, app_id: str, sdk_client_id: str) -> set[str]:
        """The clients whose address the SDK client proved it reads."""
        rows = await self.db.fetch("SELECT id FROM clients WHERE app_id = $1 AND proven_by = $2",
                                   app_id, sdk_client_id)
        return {str(row["id"]) for row in rows}

    async def remove_client(self, app_id: str, user_id: str, client_id: str) -> Client | None:
        """Delete one of the user's clients (its aliases and devices go with it); the client as it was."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow("DELETE FROM clients WHERE app_id = $1 AND id = $2 AND user_id = $3 RETURNING *",
                                    app_id, client_id, user_id)
        return None if row is None else _client(row)

    async def register_device(self, req: RegisterDevice) -> Device | None:
        """Upsert the device `(client, guid)`; None when the client is not the user's sdk client."""
        if await self.db.fetchval("SELECT id FROM clients WHERE app_id = $1 AND id = $2 AND user_id = $3",
                                  req.app_id, req.client_id, req.user_id) is None:
            return None
        token = req.push_notification_token or None
        async with self.db.transaction() as tx:
            if token is not None:
                # One registration of a token at a time across replicas: the one that waited
                # then sees the other's device and takes the token from it (the unique index
                # guarantees one holder; this keeps the loser from failing on it).
                await serialize(tx, f"identity:push-token:{req.app_id}:{token}")
                await tx.execute(
                    "UPDATE devices SET push_token = NULL, status = 'inactive'"
                    " WHERE app_id = $1 AND push_token = $2 AND NOT (client_id = $3 AND guid = $4)",
                    req.app_id, token, req.client_id, req.guid)
            row = await tx.fetchrow(
                "INSERT INTO devices (id, app_id, user_id, client_id, integration_id, type, guid, status, push_token,"
                " app_version, info, last_seen) VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $11)"
                " ON CONFLICT (client_id, guid) DO UPDATE SET status = 'active',"
                " push_token = COALESCE(excluded.push_token, devices.push_token),"
                " app_version = COALESCE(excluded.app_version, devices.app_version),"
                " info = CASE WHEN excluded.info = '{}' THEN devices.info ELSE excluded.info END,"
                " integration_id = excluded.integration_id, last_seen = excluded.last_seen"
                " RETURNING *",
                new_id(), req.app_id, req.user_id, req.client_id, req.integration_id, req.device_type, req.guid,
                token, req.app_version, json.dumps(req.info), now())
        assert row is not None
        return _device(row)

    async def list_devices(self, app_id: str, user_id: str) -> list[Device]:
        rows = await self.db.fetch("SELECT * FROM devices WHERE app_id = $1 AND user_id = $2 ORDER BY last_seen DESC",
                                   app_id, user_id)
        return [_device(row) for row in rows]

    async def drop_push_token(self, app_id: str, device_id: str, token: str) -> Device | None:
        """Forget a dead push token (only if it is still the device's token)."""
        await self.db.execute(
            "UPDATE devices SET push_token = NULL, status = 'inactive'"
            " WHERE app_id = $1 AND id = $2 AND push_token = $3",
            app_id, device_id, token)
        row = await self.db.fetchrow("SELECT * FROM devices WHERE app_id = $1 AND id = $2", app_id, device_id)
        return None if row is None else _device(row)

    async def merge_users(self, app_id: str, *, surviving: User, discarded: User, reason: str) -> MergeRecord:
        """Move `discarded`'s clients and devices to `surviving`, fold its metadata and profile
        in (the survivor's values win; keys past SunCo's 4 KB are dropped and reported), take
        its externalId when the survivor has none, delete it and log the merge — one transaction.

        Once, whichever replica asks: a merge of a pair another replica has just merged returns
        that merge's record and changes nothing; `UserGone` when `discarded` went another way
        (deleted, merged into someone else)."""
        metadata = dict(discarded.metadata)
        metadata.update(surviving.metadata)
        dropped: dict[str, Any] = {}
        for key in [k for k in discarded.metadata if k not in surviving.metadata]:
            if len(json.dumps(metadata)) <= MAX_METADATA_BYTES:
                break
            dropped[key] = metadata.pop(key)
        profile = {**msgspec.to_builtins(discarded.profile), **msgspec.to_builtins(surviving.profile)}
        external_id = surviving.external_id or discarded.external_id
        clients = await self.list_clients(app_id, discarded.id)
        record = MergeRecord(id=new_id(), app_id=app_id, surviving_user_id=surviving.id,
                             discarded_user_id=discarded.id, reason=reason,
                             merged_client_ids=[c.id for c in clients], discarded_metadata=dropped, created_at=now())
        async with self.db.transaction() as tx:
            # Locks the discarded user's row (a concurrent merge of it waits here, then finds it
            # gone): a no-op write, as SQLite has no SELECT … FOR UPDATE.
            if not await tx.execute("UPDATE users SET authenticated = authenticated WHERE app_id = $1 AND id = $2",
                                    app_id, discarded.id):
                done = await _merge_of(tx, app_id, surviving.id, discarded.id)
                if done is None:
                    raise UserGone(discarded.id)
                return done
            await tx.execute("UPDATE clients SET user_id = $1 WHERE app_id = $2 AND user_id = $3",
                             surviving.id, app_id, discarded.id)
            await tx.execute("UPDATE devices SET user_id = $1 WHERE app_id = $2 AND user_id = $3",
                             surviving.id, app_id, discarded.id)
            await tx.execute(_DELETE_USER, app_id, discarded.id)
            # Authenticated stays so once either user was (SQLite's two-argument MAX is not portable).
            await tx.execute(
                "UPDATE users SET external_id = $1, profile = $2, metadata = $3,"
                " authenticated = CASE WHEN authenticated > $4 THEN authenticated ELSE $4 END"
                " WHERE app_id = $5 AND id = $6",
                external_id, json.dumps(profile), json.dumps(metadata), int(discarded.authenticated),
                app_id, surviving.id)
            await tx.execute(
                "INSERT INTO merges (id, app_id, surviving_user_id, discarded_user_id, reason, merged_client_ids,"
                " discarded_metadata, discarded_user, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                record.id, app_id, surviving.id, discarded.id, reason, json.dumps(record.merged_client_ids),
                json.dumps(dropped), msgspec.json.encode(discarded).decode(), record.created_at)
        return record

    async def list_merges(self, app_id: str, user_id: str) -> list[MergeRecord]:
        """The audit log of merges the user took part in (as survivor or discarded), oldest first."""
        rows = await self.db.fetch(
            "SELECT * FROM merges WHERE app_id = $1 AND (surviving_user_id = $2 OR discarded_user_id = $2)"
            " ORDER BY created_at", app_id, user_id)
        return [_merge_record(r) for r in rows]


    async def search_users(self, app_id: str, query: str, limit: int = 50) -> list[str]:
        """Users of the app named by `query`: their externalId, a channel identity (exactly, a
        phone number however written), or a part of their profile (name, e-mail; ASCII
        case-insensitive)."""
        text = query.strip()
        if not text:
            return []
        found: dict[str, None] = {}
        for row in await self.db.fetch("SELECT id FROM users WHERE app_id = $1 AND external_id = $2", app_id, text):
            found[row["id"]] = None
        keys = {text, text.lower()}
        number = re.sub(r"[\s\-().]", "", text)
        if re.fullmatch(r"\+?\d{6,15}", number):  # a phone number, however it was written
            digits = number.lstrip("+")
            keys |= {digits, f"+{digits}"}
        marks = ", ".join(f"${n}" for n in range(2, len(keys) + 2))
        for row in await self.db.fetch(f"SELECT user_id FROM clients WHERE app_id = $1 AND external_id IN ({marks})"
                                       f" LIMIT {int(limit)}", app_id, *sorted(keys)):
            found[row["user_id"]] = None
        for row in await self.db.fetch(  # WhatsApp senders known by a BSUID, their number an alias
                "SELECT c.user_id FROM client_aliases a JOIN clients c ON c.id = a.client_id"
                f" WHERE a.app_id = $1 AND a.alias IN ({marks}) LIMIT {int(limit)}", app_id, *sorted(keys)):
            found[row["user_id"]] = None
        pattern = like_containing(json.dumps(text.lower())[1:-1])  # as the profile's JSON text has it
        for row in await self.db.fetch("SELECT id FROM users WHERE app_id = $1 AND lower(profile) LIKE $2 ESCAPE '!'"
                                       f" LIMIT {int(limit)}", app_id, pattern):
            found[row["id"]] = None
        return list(found)[:limit]

    async def similar_users(self, app_id: str, user_id: str, limit: int = 10) -> list[SimilarUser]:
        """Other users of the app sharing a phone number (WhatsApp's wa_id, an SMS number) or an
        e-mail address (a profile's, an e-mail client's) with this one; most recently seen first."""
        row = await self.db.fetchrow("SELECT profile FROM users WHERE app_id = $1 AND id = $2", app_id, user_id)
        if row is None:
            return []
        mine = await self.db.fetch("SELECT type, external_id, info FROM clients WHERE user_id = $1", user_id)
        digits: set[str] = set()
        emails: set[str] = set()
        profile_email = json.loads(row["profile"] or "{}").get("email")
        if isinstance(profile_email, str) and "@" in profile_email:
            emails.add(profile_email.strip().lower())
        for client in mine:
            if client["type"] in ("whatsapp", "twilio"):
                wa_id = json.loads(client["info"] or "{}").get("wa_id") if client["type"] == "whatsapp" else None
                number = "".join(ch for ch in str(wa_id or client["external_id"]) if ch.isdigit())
                if 6 <= len(number) <= 15:
                    digits.add(number)
            elif client["type"] == "mailgun":
                emails.add(str(client["external_id"]).lower())
        found: dict[str, SimilarUser] = {}
        keys = sorted({*digits, *(f"+{d}" for d in digits), *emails})
        if keys:
            marks = ", ".join(f"${n}" for n in range(3, len(keys) + 3))
            for other in await self.db.fetch(
                    "SELECT c.user_id, c.type, c.external_id FROM clients c WHERE c.app_id = $1 AND c.user_id <> $2"
                    f" AND c.type IN ('whatsapp', 'twilio', 'mailgun') AND c.external_id IN ({marks})"
                    " ORDER BY c.last_seen DESC LIMIT 50", app_id, user_id, *keys):
                reason: Literal["phone", "email"] = "email" if other["type"] == "mailgun" else "phone"
                entry = found.setdefault(other["user_id"], SimilarUser(user_id=other["user_id"], reason=reason))
                if other["type"] not in entry.channels:
                    entry.channels.append(other["type"])
            for alias in await self.db.fetch(
                    "SELECT c.user_id FROM client_aliases a JOIN clients c ON c.id = a.client_id"
                    f" WHERE a.app_id = $1 AND c.user_id <> $2 AND a.alias IN ({marks}) LIMIT 50",
                    app_id, user_id, *keys):
                entry = found.setdefault(alias["user_id"], SimilarUser(user_id=alias["user_id"], reason="phone"))
                if "whatsapp" not in entry.channels:
                    entry.channels.append("whatsapp")
        for email in sorted(emails):
            for other in await self.db.fetch(
                    "SELECT id, profile FROM users WHERE app_id = $1 AND id <> $2 AND lower(profile) LIKE $3 ESCAPE '!'"
                    " LIMIT 20", app_id, user_id, like_containing(email)):
                theirs = json.loads(other["profile"] or "{}").get("email")
                if isinstance(theirs, str) and theirs.strip().lower() == email:
                    found.setdefault(other["id"], SimilarUser(user_id=other["id"], reason="email"))
        return list(found.values())[:limit]


class UserGone(LookupError):
    """The user a merge would discard no longer exists (deleted, or merged into another user)."""


def _merge_record(r: Row) -> MergeRecord:
    return MergeRecord(id=r["id"], app_id=r["app_id"], surviving_user_id=r["surviving_user_id"],
                       discarded_user_id=r["discarded_user_id"], reason=r["reason"],
                       merged_client_ids=json.loads(r["merged_client_ids"]),
                       discarded_metadata=json.loads(r["discarded_metadata"]), created_at=r["created_at"])


async def _merge_of(tx: Connection, app_id: str, surviving_id: str, discarded_id: str) -> MergeRecord | None:
    row = await tx.fetchrow(
        "SELECT * FROM merges WHERE app_id = $1 AND surviving_user_id = $2 AND discarded_user_id = $3"
        " ORDER BY created_at DESC LIMIT 1", app_id, surviving_id, discarded_id)
    return None if row is None else _merge_record(row)


async def _scrub_merges(tx: Connection, app_id: str, user_id: str) -> None:
    """Keep the merge log's ids, reasons and times for the user and every user merged into it
    (transitively), and drop what it kept of their persons: the discarded user as it was and
    the metadata the merge dropped (inside a transaction)."""
    people = {user_id}
    frontier = [user_id]
    while frontier:
        marks = _marks(2, len(frontier))
        found = {str(row[0]) for row in await tx.fetch(
            f"SELECT discarded_user_id FROM merges WHERE app_id = $1 AND surviving_user_id IN ({marks})",
            app_id, *frontier)}
        frontier = sorted(found - people)
        people |= found
    marks = _marks(2, len(people))
    await tx.execute(
        "UPDATE merges SET discarded_user = '{\"id\":\"' || discarded_user_id || '\"}', discarded_metadata = '{}'"
        f" WHERE app_id = $1 AND (surviving_user_id IN ({marks}) OR discarded_user_id IN ({marks}))",
        app_id, *sorted(people))


def _marks(first: int, count: int) -> str:
    """`$first, …` — `count` numbered placeholders for an IN list."""
    return ", ".join(f"${n}" for n in range(first, first + count))
