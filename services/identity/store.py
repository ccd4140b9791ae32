"""Users and clients, in the identity service's own SQLite database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

import aiosqlite
import msgspec

from shared.ids import iso, new_id, now
from shared.messages.identity import MergeRecord, RegisterDevice, ResolveClient
from shared.store import open_db, open_hot_connection, transaction, truncate_wal, write_lock
from shared.sunco import Client, Device, Profile, User

MIGRATIONS = (
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
    """
    CREATE TABLE client_aliases (
        app_id TEXT NOT NULL,
        integration_id TEXT NOT NULL,
        alias TEXT NOT NULL,
        client_id TEXT NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
        PRIMARY KEY (app_id, integration_id, alias)
    );
    CREATE INDEX client_aliases_client ON client_aliases (client_id);
    INSERT INTO client_aliases (app_id, integration_id, alias, client_id)
        SELECT app_id, integration_id, json_extract(info, '$.wa_id'), id FROM clients
        WHERE type = 'whatsapp' AND json_extract(info, '$.wa_id') IS NOT NULL
          AND json_extract(info, '$.wa_id') != external_id
        ON CONFLICT DO NOTHING
    """,
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
)
MAX_METADATA_BYTES = 4096


class Conflict(Exception):
    """A uniqueness rule (externalId per app) would be broken."""


def _user(row: aiosqlite.Row) -> User:
    return User(
        id=row["id"], external_id=row["external_id"], signed_up_at=iso(row["signed_up_at"]),
        authenticated=bool(row["authenticated"]),
        profile=msgspec.convert(json.loads(row["profile"]), Profile),
        metadata=json.loads(row["metadata"]),
    )


def _client(row: aiosqlite.Row) -> Client:
    return Client(
        id=row["id"], type=row["type"], status=row["status"], integration_id=row["integration_id"],
        external_id=row["external_id"], display_name=row["display_name"], avatar_url=row["avatar_url"],
        info=json.loads(row["info"]) or None, raw=json.loads(row["raw"]) or None,
        linked_at=iso(row["linked_at"]), last_seen=iso(row["last_seen"]),
    )


def _device(row: aiosqlite.Row) -> Device:
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


_CLIENT_BY_KEY = "SELECT * FROM clients WHERE app_id = ? AND integration_id = ? AND external_id = ?"
_CLIENT_BY_ALIAS = ("SELECT c.* FROM client_aliases a JOIN clients c ON c.id = a.client_id"
                    " WHERE a.app_id = ? AND a.integration_id = ? AND a.alias = ?")
_ADD_ALIAS = ("INSERT INTO client_aliases (app_id, integration_id, alias, client_id) VALUES (?,?,?,?)"
              " ON CONFLICT (app_id, integration_id, alias) DO NOTHING")
_INSERT_USER = "INSERT INTO users (id, app_id, external_id, signed_up_at, profile) VALUES (?,?,NULL,?,?)"
_INSERT_CLIENT = (
    "INSERT INTO clients (id, app_id, user_id, type, status, integration_id, external_id,"
    " display_name, avatar_url, info, raw, linked_at, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (app_id, integration_id, external_id) DO NOTHING")


def _profile_from_name(display_name: str | None) -> dict[str, Any]:
    if not display_name:
        return {}
    given, _, surname = display_name.partition(" ")
    return {"givenName": given, **({"surname": surname} if surname else {})}


def _client_now(hot: sqlite3.Connection, app_id: str, integration_id: str, key: str) -> tuple[User, Client] | None:
    row = hot.execute(_CLIENT_BY_KEY, (app_id, integration_id, key)).fetchone()
    if row is None:
        row = hot.execute(_CLIENT_BY_ALIAS, (app_id, integration_id, key)).fetchone()
    if row is None:
        return None
    user = hot.execute("SELECT * FROM users WHERE app_id = ? AND id = ?", (app_id, row["user_id"])).fetchone()
    return None if user is None else (_user(user), _client(row))


def _resolve_now(hot: sqlite3.Connection, identity: ChannelIdentity) -> Resolution | None:
    """One identity of `IdentityStore.resolve_clients`, inside its transaction."""
    req, wa_id = identity
    found = _client_now(hot, req.app_id, req.integration_id, req.channel_user_id)
    if found is None and wa_id:
        found = _client_now(hot, req.app_id, req.integration_id, wa_id)
        if found is not None:
            user, client = found
            hot.execute(_ADD_ALIAS, (req.app_id, req.integration_id, req.channel_user_id, client.id))
            info = {**(client.info or {}), **req.info}
            if info != (client.info or {}):
                hot.execute("UPDATE clients SET info = ? WHERE app_id = ? AND id = ?",
                            (json.dumps(info), req.app_id, client.id))
                client = msgspec.structs.replace(client, info=info)
            found = user, client
    if found is not None:
        return Resolution(found[0], found[1], False, False)
    if req.user_id is not None and hot.execute(
            "SELECT 1 FROM users WHERE app_id = ? AND id = ?", (req.app_id, req.user_id)).fetchone() is None:
        return None
    ts = now()
    user_id = req.user_id or new_id()
    client_id = new_id()
    if req.user_id is None:
        hot.execute(_INSERT_USER, (user_id, req.app_id, ts, json.dumps(_profile_from_name(req.display_name))))
    hot.execute(_INSERT_CLIENT, (client_id, req.app_id, user_id, req.client_type, "active", req.integration_id,
                                 req.channel_user_id, req.display_name, req.avatar_url, json.dumps(req.info),
                                 json.dumps(req.raw), ts, ts))
    if wa_id:
        # Keyed by its BSUID: its number finds it too (direct linking by phone).
        hot.execute(_ADD_ALIAS, (req.app_id, req.integration_id, wa_id, client_id))
    created = _client_now(hot, req.app_id, req.integration_id, req.channel_user_id)
    assert created is not None
    return Resolution(created[0], created[1], req.user_id is None, True)


class IdentityStore:
    """Reads and writes users and clients; every write is one transaction."""

    def __init__(self, db: aiosqlite.Connection, hot: sqlite3.Connection) -> None:
        self.db = db
        # First contacts are resolved on this connection, on the event loop thread, a batch per
        # transaction (see `resolve_clients`); it writes only under `write_lock(self.db)`.
        self.hot = hot

    @classmethod
    async def open(cls, path: str) -> IdentityStore:
        db = await open_db(path, MIGRATIONS)
        return cls(db, open_hot_connection(path))

    async def close(self) -> None:
        self.hot.close()
        await self.db.close()

    async def resolve_clients(self, identities: Sequence[ChannelIdentity]) -> list[Resolution | None]:
        """Find or create the client (and its user) behind each channel identity, in order, in one
        transaction: None for one whose `user_id` names no user. The same identity twice in a
        batch is created once. A WhatsApp sender unknown by its key whose wa_id names a client
        (made by direct linking from the number, or first seen without its BSUID) is that client,
        with its key as a new alias; a new WhatsApp client's wa_id becomes its alias."""
        async with write_lock(self.db):
            self.hot.execute("BEGIN IMMEDIATE")
            try:
                results = [_resolve_now(self.hot, identity) for identity in identities]
                self.hot.execute("COMMIT")
            except BaseException:
                self.hot.execute("ROLLBACK")
                raise
            return results

    # A read runs to its end in one hop to aiosqlite's thread: an open SELECT stepped over several
    # hops holds a snapshot that a transaction another coroutine begins on this connection would
    # inherit, and once the hot-path connection has committed that snapshot cannot write.
    async def _one(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self.db.execute_fetchall(sql, params)
        return next(iter(rows), None)  # type: ignore[arg-type]

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        return list(await self.db.execute_fetchall(sql, params))  # type: ignore[arg-type]

    async def find_user(self, app_id: str, id_or_external_id: str) -> User | None:
        """A user by id, else by externalId (SunCo's `{userIdOrExternalId}`)."""
        row = await self._one(
            "SELECT * FROM users WHERE app_id = ? AND id = ?", (app_id, id_or_external_id))
        if row is None:
            row = await self._one(
                "SELECT * FROM users WHERE app_id = ? AND external_id = ?", (app_id, id_or_external_id))
        return _user(row) if row is not None else None

    async def create_user(self, app_id: str, external_id: str | None, profile: Profile,
                          metadata: dict[str, Any], signed_up_at: float | None = None) -> User:
        user_id = new_id()
        try:
            async with write_lock(self.db):
                await self.db.execute(
                "INSERT INTO users (id, app_id, external_id, signed_up_at, profile, metadata) VALUES (?,?,?,?,?,?)",
                (user_id, app_id, external_id, signed_up_at or now(),
                 msgspec.json.encode(profile).decode(), json.dumps(metadata)),
            )
        except aiosqlite.IntegrityError as exc:
            raise Conflict(f"A user with externalId {external_id!r} already exists") from exc
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
            async with write_lock(self.db):
                await self.db.execute(
                "UPDATE users SET external_id = ?, profile = ?, metadata = ? WHERE id = ? AND app_id = ?",
                (external_id if external_id is not None else user.external_id,
                 json.dumps(merged_profile), json.dumps(merged_metadata), user.id, app_id),
            )
        except aiosqlite.IntegrityError as exc:
            raise Conflict(f"A user with externalId {external_id!r} already exists") from exc
        updated = await self.find_user(app_id, user.id)
        assert updated is not None
        return updated

    async def delete_user(self, app_id: str, user_id: str) -> list[str]:
        """Delete a user with its clients, their aliases and devices, and the personal data the
        merge log kept of it (see `_scrub_merges`), leaving no byte of it on disk; returns the
        deleted client ids."""
        clients = await self.list_clients(app_id, user_id)
        async with transaction(self.db):
            await self._scrub_merges(app_id, user_id)
            await self.db.execute("DELETE FROM devices WHERE app_id = ? AND user_id = ?", (app_id, user_id))
            await self.db.execute("DELETE FROM clients WHERE app_id = ? AND user_id = ?", (app_id, user_id))
            await self.db.execute("DELETE FROM users WHERE app_id = ? AND id = ?", (app_id, user_id))
        await self.checkpoint()
        return [c.id for c in clients]

    async def delete_personal_information(self, app_id: str, user_id: str) -> User | None:
        """SunCo's Delete User Personal Information: the profile (all but `locale`) and metadata,
        each client's displayName, avatarUrl, info and raw, devices' info and what the merge log
        kept are cleared; the user, its externalId, clients and history stay."""
        user = await self.find_user(app_id, user_id)
        if user is None:
            return None
        profile = {"locale": user.profile.locale} if user.profile.locale else {}
        async with transaction(self.db):
            await self._scrub_merges(app_id, user_id)
            await self.db.execute("UPDATE users SET profile = ?, metadata = '{}' WHERE app_id = ? AND id = ?",
                                  (json.dumps(profile), app_id, user_id))
            await self.db.execute("UPDATE clients SET display_name = NULL, avatar_url = NULL, info = '{}', raw = '{}'"
                                  " WHERE app_id = ? AND user_id = ?", (app_id, user_id))
            await self.db.execute("UPDATE devices SET info = '{}' WHERE app_id = ? AND user_id = ?", (app_id, user_id))
        await self.checkpoint()
        return await self.find_user(app_id, user_id)

    async def _scrub_merges(self, app_id: str, user_id: str) -> None:
        """Keep the merge log's ids, reasons and times for the user and every user merged into it
        (transitively), and drop what it kept of their persons: the discarded user as it was and
        the metadata the merge dropped (inside a transaction)."""
        people = {user_id}
        frontier = [user_id]
        while frontier:
            marks = ",".join("?" * len(frontier))
            found = {str(row[0]) for row in await self._all(
                f"SELECT discarded_user_id FROM merges WHERE app_id = ? AND surviving_user_id IN ({marks})",
                (app_id, *frontier))}
            frontier = sorted(found - people)
            people |= found
        marks = ",".join("?" * len(people))
        await self.db.execute(
            "UPDATE merges SET discarded_user = '{\"id\":\"' || discarded_user_id || '\"}', discarded_metadata = '{}'"
            f" WHERE app_id = ? AND (surviving_user_id IN ({marks}) OR discarded_user_id IN ({marks}))",
            (app_id, *people, *people))

    async def checkpoint(self) -> bool:
        """Truncate the write-ahead log: erased rows' older page versions leave the disk."""
        async with write_lock(self.db):
            return await truncate_wal(self.db)

    async def list_clients(self, app_id: str, user_id: str) -> list[Client]:
        rows = await self._all(
            "SELECT * FROM clients WHERE app_id = ? AND user_id = ? ORDER BY linked_at", (app_id, user_id))
        return [_client(row) for row in rows]

    async def set_client_status(self, app_id: str, client_id: str, status: str) -> tuple[User, Client] | None:
        """Set a client's status; returns its user and the updated client (None: no such client)."""
        async with write_lock(self.db):
            await self.db.execute("UPDATE clients SET status = ? WHERE app_id = ? AND id = ?",
                                  (status, app_id, client_id))
        row = await self._one("SELECT * FROM clients WHERE app_id = ? AND id = ?", (app_id, client_id))
        if row is None:
            return None
        user = await self.find_user(app_id, row["user_id"])
        return None if user is None else (user, _client(row))

    async def find_client(self, app_id: str, integration_id: str, channel_user_id: str) -> tuple[User, Client] | None:
        """The client a channel identity names: by its key, else by one of its aliases."""
        row = await self._one(
            "SELECT * FROM clients WHERE app_id = ? AND integration_id = ? AND external_id = ?",
            (app_id, integration_id, channel_user_id))
        if row is None:
            row = await self._one(
                "SELECT c.* FROM client_aliases a JOIN clients c ON c.id = a.client_id"
                " WHERE a.app_id = ? AND a.integration_id = ? AND a.alias = ?",
                (app_id, integration_id, channel_user_id))
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
        ts = now()
        new_user_id = user_id or new_id()
        client_id = new_id()
        async with write_lock(self.db):
            await self.db.execute("BEGIN")
            try:
                if user_id is None:
                    await self.db.execute(_INSERT_USER, (new_user_id, app_id, ts,
                                                         json.dumps(_profile_from_name(display_name))))
                cur = await self.db.execute(
                    _INSERT_CLIENT, (client_id, app_id, new_user_id, client_type, status, integration_id,
                                     channel_user_id, display_name, avatar_url, json.dumps(info), json.dumps(raw),
                                     ts, ts))
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            inserted = cur.rowcount == 1
            # A concurrent resolve created this client first: drop our user too.
            await self.db.execute("COMMIT" if inserted else "ROLLBACK")
        found = await self.find_client(app_id, integration_id, channel_user_id)
        assert found is not None
        user, client = found
        return user, client, inserted and user_id is None, inserted

    async def attach_client(self, app_id: str, client_id: str, user_id: str, status: str) -> None:
        """Give the client to `user_id` with `status` (a direct link: moved, never merged)."""
        async with write_lock(self.db):
            await self.db.execute(
                "UPDATE clients SET user_id = ?, status = ?, linked_at = ? WHERE app_id = ? AND id = ?",
                (user_id, status, now(), app_id, client_id))

    async def move_client(self, app_id: str, client_id: str, user_id: str) -> None:
        """Give one client, with its devices, to `user_id` (an SDK login that proves only it)."""
        async with transaction(self.db):
            await self.db.execute("UPDATE clients SET user_id = ?, linked_at = ? WHERE app_id = ? AND id = ?",
                                  (user_id, now(), app_id, client_id))
            await self.db.execute("UPDATE devices SET user_id = ? WHERE app_id = ? AND client_id = ?",
                                  (user_id, app_id, client_id))

    async def set_proven_by(self, app_id: str, client_id: str, proven_by: str | None) -> None:
        """Record which SDK client proved it reads this client's address (None: none did)."""
        async with write_lock(self.db):
            await self.db.execute("UPDATE clients SET proven_by = ? WHERE app_id = ? AND id = ?",
                                  (proven_by, app_id, client_id))

    async def proven_by(self, app_id: str, sdk_client_id: str) -> set[str]:
        """The clients whose address the SDK client proved it reads."""
        rows = await self._all("SELECT id FROM clients WHERE app_id = ? AND proven_by = ?",
                                   (app_id, sdk_client_id))
        return {str(row["id"]) for row in rows}

    async def remove_client(self, app_id: str, user_id: str, client_id: str) -> Client | None:
        """Delete one of the user's clients (its aliases and devices go with it); the client as it was."""
        row = await self._one("SELECT * FROM clients WHERE app_id = ? AND id = ? AND user_id = ?",
                                   (app_id, client_id, user_id))
        if row is None:
            return None
        async with write_lock(self.db):
            await self.db.execute("DELETE FROM clients WHERE app_id = ? AND id = ?", (app_id, client_id))
        return _client(row)

    async def register_device(self, req: RegisterDevice) -> Device | None:
        """Upsert the device `(client, guid)`; None when the client is not the user's sdk client."""
        if await self._one("SELECT id FROM clients WHERE app_id = ? AND id = ? AND user_id = ?",
                                   (req.app_id, req.client_id, req.user_id)) is None:
            return None
        token = req.push_notification_token or None
        async with transaction(self.db):
            if token is not None:
                await self.db.execute(
                    "UPDATE devices SET push_token = NULL, status = 'inactive'"
                    " WHERE app_id = ? AND push_token = ? AND NOT (client_id = ? AND guid = ?)",
                    (req.app_id, token, req.client_id, req.guid))
            await self.db.execute(
                "INSERT INTO devices (id, app_id, user_id, client_id, integration_id, type, guid, status, push_token,"
                " app_version, info, last_seen) VALUES (?,?,?,?,?,?,?,'active',?,?,?,?)"
                " ON CONFLICT (client_id, guid) DO UPDATE SET status = 'active',"
                " push_token = COALESCE(excluded.push_token, devices.push_token),"
                " app_version = COALESCE(excluded.app_version, devices.app_version),"
                " info = CASE WHEN excluded.info = '{}' THEN devices.info ELSE excluded.info END,"
                " integration_id = excluded.integration_id, last_seen = excluded.last_seen",
                (new_id(), req.app_id, req.user_id, req.client_id, req.integration_id, req.device_type, req.guid, token,
                 req.app_version, json.dumps(req.info), now()))
        row = await self._one("SELECT * FROM devices WHERE client_id = ? AND guid = ?",
                                   (req.client_id, req.guid))
        assert row is not None
        return _device(row)

    async def list_devices(self, app_id: str, user_id: str) -> list[Device]:
        rows = await self._all("SELECT * FROM devices WHERE app_id = ? AND user_id = ? ORDER BY last_seen DESC",
                                   (app_id, user_id))
        return [_device(row) for row in rows]

    async def drop_push_token(self, app_id: str, device_id: str, token: str) -> Device | None:
        """Forget a dead push token (only if it is still the device's token)."""
        async with write_lock(self.db):
            await self.db.execute(
                "UPDATE devices SET push_token = NULL, status = 'inactive'"
                " WHERE app_id = ? AND id = ? AND push_token = ?",
                (app_id, device_id, token))
        row = await self._one("SELECT * FROM devices WHERE app_id = ? AND id = ?", (app_id, device_id))
        return None if row is None else _device(row)

    async def merge_users(self, app_id: str, *, surviving: User, discarded: User, reason: str) -> MergeRecord:
        """Move `discarded`'s clients and devices to `surviving`, fold its metadata and profile
        in (the survivor's values win; keys past SunCo's 4 KB are dropped and reported), take
        its externalId when the survivor has none, delete it and log the merge — one transaction."""
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
        async with transaction(self.db):
            await self.db.execute("UPDATE clients SET user_id = ? WHERE app_id = ? AND user_id = ?",
                                  (surviving.id, app_id, discarded.id))
            await self.db.execute("UPDATE devices SET user_id = ? WHERE app_id = ? AND user_id = ?",
                                  (surviving.id, app_id, discarded.id))
            await self.db.execute("DELETE FROM users WHERE app_id = ? AND id = ?", (app_id, discarded.id))
            await self.db.execute(
                "UPDATE users SET external_id = ?, profile = ?, metadata = ?,"
                " authenticated = MAX(authenticated, ?) WHERE app_id = ? AND id = ?",
                (external_id, json.dumps(profile), json.dumps(metadata), int(discarded.authenticated),
                 app_id, surviving.id))
            await self.db.execute(
                "INSERT INTO merges (id, app_id, surviving_user_id, discarded_user_id, reason, merged_client_ids,"
                " discarded_metadata, discarded_user, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (record.id, app_id, surviving.id, discarded.id, reason, json.dumps(record.merged_client_ids),
                 json.dumps(dropped), msgspec.json.encode(discarded).decode(), record.created_at))
        return record

    async def list_merges(self, app_id: str, user_id: str) -> list[MergeRecord]:
        """The audit log of merges the user took part in (as survivor or discarded), oldest first."""
        rows = await self._all(
            "SELECT * FROM merges WHERE app_id = ? AND (surviving_user_id = ? OR discarded_user_id = ?)"
            " ORDER BY created_at", (app_id, user_id, user_id))
        return [MergeRecord(id=r["id"], app_id=r["app_id"], surviving_user_id=r["surviving_user_id"],
                            discarded_user_id=r["discarded_user_id"], reason=r["reason"],
                            merged_client_ids=json.loads(r["merged_client_ids"]),
                            discarded_metadata=json.loads(r["discarded_metadata"]), created_at=r["created_at"])
                for r in rows]
