"""The desk's database: agents, teams, sessions, the desk's record of each conversation it handles
(its ticket: status, queue place, assignment, labels), and private notes.

One set of SQL for both engines (`shared.db`). Routing decisions run in `Store.transaction` after
`serialize(tx, "desk:<app>")`, so two replicas never decide one app's queue at once, and every
assignment is also a conditional update (`WHERE agent_id IS NULL` / the expected holder): a
decision made on a stale read changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.db import (
    Connection,
    Database,
    DatabaseSettings,
    Migration,
    Row,
    like_containing,
    open_database,
)

from . import routing
from .auth import SessionRecord

MIGRATION = Migration([
    """
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        email TEXT NOT NULL,
        display_name TEXT NOT NULL,
        role TEXT NOT NULL,
        password_hash TEXT,
        capacity INTEGER NOT NULL,
        presence TEXT NOT NULL DEFAULT 'offline',
        skills TEXT NOT NULL DEFAULT '[]',
        channels TEXT NOT NULL DEFAULT '[]',
        disabled INTEGER NOT NULL DEFAULT 0,
        last_assigned_at REAL,
        last_seen_at REAL,
        created_at REAL NOT NULL,
        UNIQUE (app_id, email)
    );
    CREATE INDEX agents_presence ON agents (presence, last_seen_at);
    CREATE TABLE teams (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        name TEXT NOT NULL,
        skills TEXT NOT NULL DEFAULT '[]',
        channels TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        UNIQUE (app_id, name)
    );
    CREATE TABLE team_members (
        team_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        PRIMARY KEY (team_id, agent_id)
    );
    CREATE INDEX team_members_agent ON team_members (agent_id);
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_seen_at REAL NOT NULL,
        idle_timeout REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX sessions_agent ON sessions (agent_id);
    CREATE INDEX sessions_expires ON sessions (expires_at);
    CREATE TABLE tickets (
        conversation_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        user_id TEXT,
        channel TEXT NOT NULL DEFAULT 'unknown',
        status TEXT NOT NULL,
        queued INTEGER NOT NULL DEFAULT 0,
        agent_id TEXT,
        assigned_at REAL,
        assign_reason TEXT,
        team_id TEXT,
        priority INTEGER NOT NULL DEFAULT 0,
        required_skills TEXT NOT NULL DEFAULT '[]',
        enqueued_at REAL,
        last_agent_id TEXT,
        transfer_to_agent_id TEXT,
        previous_agent_id TEXT,
        transferred_from_agent_id TEXT,
        requeued_at REAL,
        snoozed_until REAL,
        labels TEXT NOT NULL DEFAULT '[]',
        last_message_at REAL,
        last_message_text TEXT,
        last_author TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX tickets_queue ON tickets (app_id, queued);
    CREATE INDEX tickets_agent ON tickets (agent_id);
    CREATE INDEX tickets_app_updated ON tickets (app_id, updated_at);
    CREATE INDEX tickets_user ON tickets (app_id, user_id);
    CREATE INDEX tickets_snoozed ON tickets (snoozed_until) WHERE snoozed_until IS NOT NULL;
    CREATE TABLE notes (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        author_name TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX notes_conversation ON notes (conversation_id, created_at);
    CREATE TABLE canned_replies (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        shortcut TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (app_id, shortcut)
    )
    """,
    # What happened to a conversation besides its messages, shown inline in the desk's timeline:
    # a customer moving to another channel (a handoff), a merge of two customers.
    """
    CREATE TABLE timeline_events (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        channel TEXT,
        text TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX timeline_events_conversation ON timeline_events (conversation_id, created_at)
    """,
    # Per app: the business's context panel (a URL the desk calls with the customer, signed with a
    # secret sealed at rest).
    """
    CREATE TABLE app_settings (
        app_id TEXT PRIMARY KEY,
        context_url TEXT,
        context_secret TEXT,
        updated_at REAL NOT NULL
    )
    """,
    # A canned reply may stand for an approved WhatsApp template (`{"name", "language"}`): what the
    # desk offers once WhatsApp's 24-hour window is closed.
    """
    ALTER TABLE canned_replies ADD COLUMN whatsapp_template TEXT
    """,
    # Single sign-on with OpenID Connect: the app's provider (the client secret sealed at rest) and
    # the sign-ins under way (keyed by the state's hash, single use).
    """
    ALTER TABLE app_settings ADD COLUMN sso_issuer TEXT;
    ALTER TABLE app_settings ADD COLUMN sso_client_id TEXT;
    ALTER TABLE app_settings ADD COLUMN sso_client_secret TEXT;
    CREATE TABLE sso_states (
        state_hash TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        nonce TEXT NOT NULL,
        verifier TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX sso_states_created ON sso_states (created_at)
    """,
    # An agent's edits are compare-and-set on this: two admins editing one agent at once, the
    # second is told (409) instead of silently undoing the first.
    """
    ALTER TABLE agents ADD COLUMN version INTEGER NOT NULL DEFAULT 0
    """,
])

OPEN, PENDING, SNOOZED, RESOLVED = "open", "pending", "snoozed", "resolved"
STATUSES = (OPEN, PENDING, SNOOZED, RESOLVED)
_TICKET_COLUMNS = (
    "conversation_id, app_id, user_id, channel, status, queued, agent_id, assigned_at, assign_reason, team_id,"
    " priority, required_skills, enqueued_at, last_agent_id, transfer_to_agent_id, previous_agent_id,"
    " transferred_from_agent_id, requeued_at, snoozed_until, labels, last_message_at, last_message_text,"
    " last_author, created_at, updated_at")
_AGENT_COLUMNS = ("id, app_id, email, display_name, role, password_hash, capacity, presence, skills, channels,"
                  " disabled, last_assigned_at, last_seen_at, created_at, version")


def _list(value: str | None) -> list[str]:
    if not value:
        return []
    loaded = json.loads(value)
    return [str(item) for item in loaded] if isinstance(loaded, list) else []


def _dump(values: Iterable[str]) -> str:
    return json.dumps(sorted(set(values)), ensure_ascii=False)



@dataclass(frozen=True, slots=True)
class AgentRow:
    """An agent account as stored."""

    id: str
    app_id: str
    email: str
    display_name: str
    role: str
    password_hash: str | None
    capacity: int
    presence: str
    skills: list[str]
    channels: list[str]
    disabled: bool
    last_assigned_at: float | None
    last_seen_at: float | None
    created_at: float
    # Bumped by every edit (`Store.update_agent` compares it).
    version: int = 0

    @classmethod
    def of(cls, row: Row) -> AgentRow:
        return cls(id=row["id"], app_id=row["app_id"], email=row["email"], display_name=row["display_name"],
                   role=row["role"], password_hash=row["password_hash"], capacity=int(row["capacity"]),
                   presence=row["presence"], skills=_list(row["skills"]), channels=_list(row["channels"]),
                   disabled=bool(row["disabled"]), last_assigned_at=row["last_assigned_at"],
                   last_seen_at=row["last_seen_at"], created_at=float(row["created_at"]), version=int(row["version"]))


@dataclass(frozen=True, slots=True)
class TeamRow:
    """A team as stored, with its members."""

    id: str
    app_id: str
    name: str
    skills: list[str]
    channels: list[str]
    members: list[str]
    created_at: float


@dataclass(frozen=True, slots=True)
class Ticket:
    """The desk's record of one conversation it handles."""

    conversation_id: str
    app_id: str
    user_id: str | None
    channel: str
    status: str
    queued: bool
    agent_id: str | None
    assigned_at: float | None
    assign_reason: str | None
    team_id: str | None
    priority: int
    required_skills: list[str]
    enqueued_at: float | None
    last_agent_id: str | None
    transfer_to_agent_id: str | None
    previous_agent_id: str | None
    transferred_from_agent_id: str | None
    requeued_at: float | None
    snoozed_until: float | None
    labels: list[str]
    last_message_at: float | None
    last_message_text: str | None
    last_author: str | None
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, row: Row) -> Ticket:
        return cls(
            conversation_id=row["conversation_id"], app_id=row["app_id"], user_id=row["user_id"],
            channel=row["channel"], status=row["status"], queued=bool(row["queued"]), agent_id=row["agent_id"],
            assigned_at=row["assigned_at"], assign_reason=row["assign_reason"], team_id=row["team_id"],
            priority=int(row["priority"]), required_skills=_list(row["required_skills"]),
            enqueued_at=row["enqueued_at"], last_agent_id=row["last_agent_id"],
            transfer_to_agent_id=row["transfer_to_agent_id"], previous_agent_id=row["previous_agent_id"],
            transferred_from_agent_id=row["transferred_from_agent_id"], requeued_at=row["requeued_at"],
            snoozed_until=row["snoozed_until"], labels=_list(row["labels"]), last_message_at=row["last_message_at"],
            last_message_text=row["last_message_text"], last_author=row["last_author"],
            created_at=float(row["created_at"]), updated_at=float(row["updated_at"]))

    def routing_record(self) -> routing.QueuedConversation:
        """The ticket as the routing engine sees a waiting conversation."""
        return routing.QueuedConversation(
            app_id=self.app_id, conversation_id=self.conversation_id, channel=self.channel,
            enqueued_at=self.enqueued_at if self.enqueued_at is not None else self.created_at,
            priority=self.priority, team_id=self.team_id, required_skills=frozenset(self.required_skills),
            last_agent_id=self.last_agent_id, transfer_to_agent_id=self.transfer_to_agent_id,
            previous_agent_id=self.previous_agent_id, transferred_from_agent_id=self.transferred_from_agent_id,
            requeued_at=self.requeued_at)


@dataclass(frozen=True, slots=True)
class NoteRow:
    """A private note: agents see it, the customer never does."""

    id: str
    app_id: str
    conversation_id: str
    agent_id: str
    author_name: str
    text: str
    created_at: float


@dataclass(frozen=True, slots=True)
class TicketFilter:
    """Which tickets an inbox lists (None: any)."""

    agent_id: str | None = None
    unassigned: bool = False
    team_ids: Sequence[str] | None = None
    statuses: Sequence[str] | None = None
    channel: str | None = None
    label: str | None = None
    user_ids: Sequence[str] | None = None
    # A search's matches: these conversations, or these customers', or this text in a label or
    # the last message's preview.
    search: SearchMatches | None = None


@dataclass(frozen=True, slots=True)
class SearchMatches:
    """What a search matched elsewhere (conversations, identity) and its text."""

    text: str
    conversation_ids: Sequence[str] = ()
    user_ids: Sequence[str] = ()


class Store:
    """The desk's tables on one of `shared.db`'s engines."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Store:
        """Open (and migrate) the desk's database."""
        return cls(await open_database(settings, MIGRATION))

    async def close(self) -> None:
        """Close the connections."""
        await self.db.close()

    def transaction(self) -> Any:
        """A transaction on the database (`async with store.transaction() as tx`)."""
        return self.db.transaction()

    # --- agents --------------------------------------------------------------------------------

    async def insert_agent(self, tx: Connection, agent: AgentRow) -> bool:
        """Create an agent; False when the app already has one with that e-mail."""
        inserted = await tx.execute(
            f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14, 0) ON CONFLICT (app_id, email) DO NOTHING",
            agent.id, agent.app_id, agent.email, agent.display_name, agent.role, agent.password_hash,
            agent.capacity, agent.presence, _dump(agent.skills), _dump(agent.channels), int(agent.disabled),
            agent.last_assigned_at, agent.last_seen_at, agent.created_at)
        return inserted > 0

    async def agent(self, agent_id: str, tx: Connection | None = None) -> AgentRow | None:
        """An agent by id."""
        row = await (tx or self.db).fetchrow(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE id = $1", agent_id)
        return None if row is None else AgentRow.of(row)

    async def agent_by_email(self, app_id: str, email: str) -> AgentRow | None:
        """An app's agent by (normalized) e-mail."""
        row = await self.db.fetchrow(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE app_id = $1 AND email = $2",
                                     app_id, email)
        return None if row is None else AgentRow.of(row)

    async def agents(self, app_id: str, tx: Connection | None = None) -> list[AgentRow]:
        """An app's agents, by display name."""
        rows = await (tx or self.db).fetch(
            f"SELECT {_AGENT_COLUMNS} FROM agents WHERE app_id = $1 ORDER BY display_name, id", app_id)
        return [AgentRow.of(row) for row in rows]

    async def update_agent(self, tx: Connection, agent: AgentRow) -> bool:
        """Write an agent's editable fields (not presence, which `set_presence` owns) if nobody
        edited the agent since `agent` was read (its `version`); False otherwise."""
        return await tx.execute(
            "UPDATE agents SET display_name = $2, role = $3, password_hash = $4, capacity = $5, skills = $6,"
            " channels = $7, disabled = $8, version = version + 1 WHERE id = $1 AND version = $9",
            agent.id, agent.display_name, agent.role, agent.password_hash, agent.capacity, _dump(agent.skills),
            _dump(agent.channels), int(agent.disabled), agent.version) > 0

    async def delete_agent(self, tx: Connection, agent_id: str) -> None:
        """Remove an agent, their team memberships and sessions (their tickets are released first)."""
        await tx.execute("DELETE FROM team_members WHERE agent_id = $1", agent_id)
        await tx.execute("DELETE FROM sessions WHERE agent_id = $1", agent_id)
        await tx.execute("DELETE FROM agents WHERE id = $1", agent_id)

    async def set_presence(self, tx: Connection, agent_id: str, presence: str, seen_at: float | None) -> None:
        """An agent's presence (and when they were last heard from)."""
        await tx.execute("UPDATE agents SET presence = $2, last_seen_at = COALESCE($3, last_seen_at) WHERE id = $1",
                         agent_id, presence, seen_at)

    async def touch_agent(self, agent_id: str, seen_at: float) -> None:
        """The agent's desk was heard from."""
        await self.db.execute("UPDATE agents SET last_seen_at = $2 WHERE id = $1 AND"
                              " (last_seen_at IS NULL OR last_seen_at < $2)", agent_id, seen_at)

    async def silent_agents(self, before: float) -> list[AgentRow]:
        """Agents online or away whose desk has not been heard from since `before`."""
        rows = await self.db.fetch(
            f"SELECT {_AGENT_COLUMNS} FROM agents WHERE presence <> 'offline'"
            " AND (last_seen_at IS NULL OR last_seen_at < $1)", before)
        return [AgentRow.of(row) for row in rows]

    async def has_free_seat(self, tx: Connection, app_id: str) -> bool:
        """Whether an online, enabled agent of the app holds fewer open conversations than their
        capacity (no routing pass can assign anything otherwise)."""
        return await tx.fetchval(
            "SELECT 1 FROM agents a WHERE a.app_id = $1 AND a.presence = 'online' AND a.disabled = 0 AND a.capacity >"
            " (SELECT COUNT(*) FROM tickets t WHERE t.agent_id = a.id AND t.status IN ('open', 'pending')) LIMIT 1",
            app_id) is not None

    async def routing_agents(self, tx: Connection, app_id: str) -> list[routing.Agent]:
        """An app's enabled agents as routing sees them: teams, skills (their own and their teams'),
        channels, and the conversations they hold now."""
        agents = await self.agents(app_id, tx)
        memberships: dict[str, set[str]] = {}
        team_skills: dict[str, list[str]] = {}
        for row in await tx.fetch("SELECT id, skills FROM teams WHERE app_id = $1", app_id):
            team_skills[row["id"]] = _list(row["skills"])
        for row in await tx.fetch(
                "SELECT m.team_id, m.agent_id FROM team_members m JOIN teams t ON t.id = m.team_id"
                " WHERE t.app_id = $1", app_id):
            memberships.setdefault(row["agent_id"], set()).add(row["team_id"])
        held: dict[str, set[str]] = {}
        for row in await tx.fetch("SELECT conversation_id, agent_id FROM tickets WHERE app_id = $1"
                                  " AND agent_id IS NOT NULL AND status IN ('open', 'pending')", app_id):
            held.setdefault(row["agent_id"], set()).add(row["conversation_id"])
        result = []
        for agent in agents:
            if agent.disabled:
                continue
            teams = memberships.get(agent.id, set())
            skills = set(agent.skills).union(*(team_skills.get(team, []) for team in teams))
            presence: routing.Presence = agent.presence if agent.presence in routing.PRESENCES else "offline"  # type: ignore[assignment]
            result.append(routing.Agent(
                agent_id=agent.id, app_id=agent.app_id, presence=presence, capacity=agent.capacity,
                teams=frozenset(teams), skills=frozenset(skills), channels=frozenset(agent.channels),
                assigned=frozenset(held.get(agent.id, set())), last_assigned_at=agent.last_assigned_at))
        return result

    # --- teams ---------------------------------------------------------------------------------

    async def insert_team(self, tx: Connection, team: TeamRow) -> bool:
        """Create a team (and its members); False when the app already has one of that name."""
        inserted = await tx.execute(
            "INSERT INTO teams (id, app_id, name, skills, channels, created_at) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (app_id, name) DO NOTHING",
            team.id, team.app_id, team.name, _dump(team.skills), _dump(team.channels), team.created_at)
        if inserted:
            await self.set_members(tx, team.id, team.members)
        return inserted > 0

    async def update_team(self, tx: Connection, team: TeamRow) -> bool:
        """Write a team's name, skills, channels and members; False when another team of the app
        has that name."""
        taken = await tx.fetchval("SELECT id FROM teams WHERE app_id = $1 AND name = $2 AND id <> $3",
                                  team.app_id, team.name, team.id)
        if taken is not None:
            return False
        await tx.execute("UPDATE teams SET name = $2, skills = $3, channels = $4 WHERE id = $1",
                         team.id, team.name, _dump(team.skills), _dump(team.channels))
        await self.set_members(tx, team.id, team.members)
        return True

    async def set_members(self, tx: Connection, team_id: str, members: Iterable[str]) -> None:
        """Make `members` the team's members."""
        await tx.execute("DELETE FROM team_members WHERE team_id = $1", team_id)
        await tx.executemany("INSERT INTO team_members (team_id, agent_id) VALUES ($1, $2)",
                             [(team_id, agent_id) for agent_id in sorted(set(members))])

    async def delete_team(self, tx: Connection, team_id: str) -> None:
        """Remove a team; conversations queued for it fall back to the app's default team."""
        await tx.execute("DELETE FROM team_members WHERE team_id = $1", team_id)
        await tx.execute("UPDATE tickets SET team_id = NULL WHERE team_id = $1", team_id)
        await tx.execute("DELETE FROM teams WHERE id = $1", team_id)

    async def teams(self, app_id: str, tx: Connection | None = None) -> list[TeamRow]:
        """An app's teams with their members, by name."""
        conn = tx or self.db
        members: dict[str, list[str]] = {}
        for row in await conn.fetch("SELECT m.team_id, m.agent_id FROM team_members m JOIN teams t"
                                    " ON t.id = m.team_id WHERE t.app_id = $1 ORDER BY m.agent_id", app_id):
            members.setdefault(row["team_id"], []).append(row["agent_id"])
        rows = await conn.fetch("SELECT id, app_id, name, skills, channels, created_at FROM teams WHERE app_id = $1"
                                " ORDER BY name, id", app_id)
        return [TeamRow(id=row["id"], app_id=row["app_id"], name=row["name"], skills=_list(row["skills"]),
                        channels=_list(row["channels"]), members=members.get(row["id"], []),
                        created_at=float(row["created_at"])) for row in rows]

    async def team(self, team_id: str, tx: Connection | None = None) -> TeamRow | None:
        """A team by id."""
        row = await (tx or self.db).fetchrow("SELECT app_id FROM teams WHERE id = $1", team_id)
        if row is None:
            return None
        return next((team for team in await self.teams(row["app_id"], tx) if team.id == team_id), None)

    # --- sessions (auth.SessionStore) ------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        await self.db.execute(
            "INSERT INTO sessions (token_hash, agent_id, app_id, created_at, last_seen_at, idle_timeout, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", record.token_hash, record.agent_id, record.app_id,
            record.created_at, record.last_seen_at, record.idle_timeout, record.expires_at)

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        row = await self.db.fetchrow(
            "SELECT token_hash, agent_id, app_id, created_at, last_seen_at, idle_timeout, expires_at FROM sessions"
            " WHERE token_hash = $1", token_hash)
        if row is None:
            return None
        return SessionRecord(token_hash=row["token_hash"], agent_id=row["agent_id"], app_id=row["app_id"],
                             created_at=float(row["created_at"]), last_seen_at=float(row["last_seen_at"]),
                             idle_timeout=float(row["idle_timeout"]), expires_at=float(row["expires_at"]))

    async def touch_session(self, token_hash: str, last_seen_at: float) -> None:
        await self.db.execute("UPDATE sessions SET last_seen_at = $2 WHERE token_hash = $1", token_hash,
                              last_seen_at)

    async def delete_session(self, token_hash: str) -> None:
        await self.db.execute("DELETE FROM sessions WHERE token_hash = $1", token_hash)

    async def delete_agent_sessions(self, agent_id: str, keep: str | None = None) -> int:
        return await self.db.execute("DELETE FROM sessions WHERE agent_id = $1 AND token_hash <> $2", agent_id,
                                     keep or "")

    async def prune_sessions(self, now: float) -> int:
        """Forget sessions past their absolute expiry."""
        return await self.db.execute("DELETE FROM sessions WHERE expires_at <= $1", now)

    # --- tickets -------------------------------------------------------------------------------

    async def ticket(self, conversation_id: str, tx: Connection | None = None) -> Ticket | None:
        """The desk's record of a conversation, if the desk has handled it."""
        row = await (tx or self.db).fetchrow(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE conversation_id = $1",
                                             conversation_id)
        return None if row is None else Ticket.of(row)

    async def save_ticket(self, tx: Connection, ticket: Ticket) -> None:
        """Insert or overwrite a ticket (inside a transaction that read it)."""
        await tx.execute(
            f"INSERT INTO tickets ({_TICKET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)"
            " ON CONFLICT (conversation_id) DO UPDATE SET user_id = excluded.user_id, channel = excluded.channel,"
            " status = excluded.status, queued = excluded.queued, agent_id = excluded.agent_id,"
            " assigned_at = excluded.assigned_at, assign_reason = excluded.assign_reason,"
            " team_id = excluded.team_id, priority = excluded.priority, required_skills = excluded.required_skills,"
            " enqueued_at = excluded.enqueued_at, last_agent_id = excluded.last_agent_id,"
            " transfer_to_agent_id = excluded.transfer_to_agent_id, previous_agent_id = excluded.previous_agent_id,"
            " transferred_from_agent_id = excluded.transferred_from_agent_id, requeued_at = excluded.requeued_at,"
            " snoozed_until = excluded.snoozed_until, labels = excluded.labels,"
            " last_message_at = excluded.last_message_at, last_message_text = excluded.last_message_text,"
            " last_author = excluded.last_author, updated_at = excluded.updated_at",
            ticket.conversation_id, ticket.app_id, ticket.user_id, ticket.channel, ticket.status, int(ticket.queued),
            ticket.agent_id, ticket.assigned_at, ticket.assign_reason, ticket.team_id, ticket.priority,
            _dump(ticket.required_skills), ticket.enqueued_at, ticket.last_agent_id, ticket.transfer_to_agent_id,
            ticket.previous_agent_id, ticket.transferred_from_agent_id, ticket.requeued_at, ticket.snoozed_until,
            _dump(ticket.labels), ticket.last_message_at, ticket.last_message_text, ticket.last_author,
            ticket.created_at, ticket.updated_at)

    async def note_message(self, conversation_id: str, at: float, preview: str, author: str,
                           channel: str | None, user_id: str | None, *,
                           only_while_handled: bool = False) -> Ticket | None:
        """A message in a conversation the desk handles: the inbox's preview (only the columns it
        owns, so a routing decision committed meanwhile is never written over) and the ticket as
        written; None without a ticket, for a message older than its preview, or, with
        `only_while_handled`, unless the ticket is open and assigned or queued."""
        handled = " AND status = 'open' AND (agent_id IS NOT NULL OR queued = 1)" if only_while_handled else ""
        # A transaction of its own, one row locked: a group commit of several tickets' previews
        # would lock them in another order than a routing pass assigning them (a deadlock on
        # PostgreSQL).
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "UPDATE tickets SET last_message_at = $2, last_message_text = $3, last_author = $4,"
                " channel = COALESCE($5, channel), user_id = COALESCE(user_id, $6),"
                " updated_at = CASE WHEN updated_at > $2 THEN updated_at ELSE $2 END"
                " WHERE conversation_id = $1 AND (last_message_at IS NULL OR last_message_at <= $2)"
                f"{handled} RETURNING {_TICKET_COLUMNS}",
                conversation_id, at, preview, author, channel, user_id)
        return None if row is None else Ticket.of(row)

    async def set_labels(self, conversation_id: str, labels: Sequence[str], at: float) -> None:
        """Replace a ticket's labels (that column alone)."""
        await self.db.execute("UPDATE tickets SET labels = $2, updated_at = $3 WHERE conversation_id = $1",
                              conversation_id, _dump(labels), at)

    async def set_channel(self, conversation_id: str, channel: str, at: float) -> bool:
        """The customer's current channel changed (a handoff); False without a ticket or no change."""
        return await self.db.execute(
            "UPDATE tickets SET channel = $2, updated_at = CASE WHEN updated_at > $3 THEN updated_at ELSE $3 END"
            " WHERE conversation_id = $1 AND channel <> $2", conversation_id, channel, at) > 0

    async def forget_previews(self, conversation_id: str, before: float | None) -> bool:
        """Drop a ticket's message preview (expired messages: when its message is older than
        `before`); whether there was one to drop."""
        if before is None:
            changed = await self.db.execute("UPDATE tickets SET last_message_text = NULL WHERE conversation_id = $1"
                                            " AND last_message_text IS NOT NULL", conversation_id)
        else:
            changed = await self.db.execute("UPDATE tickets SET last_message_text = NULL WHERE conversation_id = $1"
                                            " AND last_message_at < $2 AND last_message_text IS NOT NULL",
                                            conversation_id, before)
        return changed > 0

    async def user_conversations(self, app_id: str | None, user_id: str) -> list[str]:
        """The conversations the desk handled for a user."""
        rows = await self.db.fetch("SELECT conversation_id FROM tickets WHERE user_id = $1"
                                   + (" AND app_id = $2" if app_id else ""), *((user_id, app_id) if app_id
                                                                              else (user_id,)))
        return [row["conversation_id"] for row in rows]

    async def delete_ticket(self, tx: Connection, conversation_id: str) -> None:
        """Forget a conversation (removed from the app), its notes and timeline events."""
        await tx.execute("DELETE FROM notes WHERE conversation_id = $1", conversation_id)
        await tx.execute("DELETE FROM timeline_events WHERE conversation_id = $1", conversation_id)
        await tx.execute("DELETE FROM tickets WHERE conversation_id = $1", conversation_id)

    async def queued(self, tx: Connection, app_id: str) -> list[Ticket]:
        """An app's tickets waiting for an agent."""
        rows = await tx.fetch(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE app_id = $1 AND queued = 1", app_id)
        return [Ticket.of(row) for row in rows]

    async def queued_count(self) -> int:
        """Conversations waiting for an agent, every app."""
        return int(await self.db.fetchval("SELECT COUNT(*) FROM tickets WHERE queued = 1"))

    async def held_by(self, tx: Connection, agent_id: str) -> list[Ticket]:
        """The unresolved tickets an agent holds."""
        rows = await tx.fetch(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE agent_id = $1"
                              " AND status IN ('open', 'pending')", agent_id)
        return [Ticket.of(row) for row in rows]

    async def assign(self, tx: Connection, assignment: routing.Assignment) -> bool:
        """Give a waiting ticket to an agent; False when it no longer waits (another decision won)."""
        changed = await tx.execute(
            "UPDATE tickets SET agent_id = $2, assigned_at = $3, assign_reason = $4, queued = 0,"
            " last_agent_id = $2, transfer_to_agent_id = NULL, transferred_from_agent_id = NULL,"
            " status = CASE WHEN status = 'resolved' THEN 'open' ELSE status END, updated_at = $3"
            " WHERE conversation_id = $1 AND queued = 1",
            assignment.conversation_id, assignment.agent_id, assignment.assigned_at, assignment.reason)
        if changed:
            await tx.execute("UPDATE agents SET last_assigned_at = $2 WHERE id = $1 AND"
                             " (last_assigned_at IS NULL OR last_assigned_at < $2)",
                             assignment.agent_id, assignment.assigned_at)
        return changed > 0

    async def last_agent_of_user(self, app_id: str, user_id: str, tx: Connection | None = None) -> str | None:
        """The agent who last served this customer in any of their conversations."""
        return await (tx or self.db).fetchval(  # type: ignore[no-any-return]
            "SELECT last_agent_id FROM tickets WHERE app_id = $1 AND user_id = $2 AND last_agent_id IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT 1", app_id, user_id)

    async def due_snoozes(self, now: float) -> list[Ticket]:
        """Snoozed tickets whose time has come."""
        rows = await self.db.fetch(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE status = 'snoozed'"
                                   " AND snoozed_until IS NOT NULL AND snoozed_until <= $1", now)
        return [Ticket.of(row) for row in rows]

    async def tickets(self, app_id: str, where: TicketFilter, *, before: tuple[float, str] | None,
                      limit: int) -> list[Ticket]:
        """An inbox: the app's tickets matching `where`, most recently updated first, keyset-paged
        (`before` = the last (updated_at, conversation_id) of the previous page)."""
        clauses = ["app_id = $1"]
        args: list[Any] = [app_id]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if where.agent_id is not None:
            clauses.append(f"agent_id = {arg(where.agent_id)}")
        if where.unassigned:
            clauses.append("agent_id IS NULL")
        if where.team_ids is not None:
            if not where.team_ids:
                return []
            clauses.append(f"team_id IN ({', '.join(arg(team) for team in where.team_ids)})")
        if where.statuses:
            clauses.append(f"status IN ({', '.join(arg(status) for status in where.statuses)})")
        if where.channel is not None:
            clauses.append(f"channel = {arg(where.channel)}")
        if where.label is not None:
            label = json.dumps(where.label, ensure_ascii=False)  # as the labels column's JSON has it
            clauses.append(f"labels LIKE {arg(like_containing(label))} ESCAPE '!'")
        if where.user_ids is not None:
            if not where.user_ids:
                return []
            clauses.append(f"user_id IN ({', '.join(arg(user) for user in where.user_ids)})")
        if where.search is not None:
            found = where.search
            text = arg(like_containing(found.text.lower()))
            alternatives = [f"lower(last_message_text) LIKE {text} ESCAPE '!'", f"lower(labels) LIKE {text} ESCAPE '!'",
                            f"conversation_id = {arg(found.text)}"]
            if found.conversation_ids:
                alternatives.append(f"conversation_id IN ({', '.join(arg(c) for c in found.conversation_ids)})")
            if found.user_ids:
                alternatives.append(f"user_id IN ({', '.join(arg(u) for u in found.user_ids)})")
            clauses.append(f"({' OR '.join(alternatives)})")
        if before is not None:
            at, conversation_id = before
            clauses.append(f"(updated_at < {arg(at)} OR (updated_at = {arg(at)} AND conversation_id < "
                           f"{arg(conversation_id)}))")
        rows = await self.db.fetch(
            f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE {' AND '.join(clauses)}"
            f" ORDER BY updated_at DESC, conversation_id DESC LIMIT {arg(limit)}", *args)
        return [Ticket.of(row) for row in rows]

    async def user_tickets(self, app_id: str, user_id: str) -> list[Ticket]:
        """Every ticket of one customer (their previous conversations), newest first."""
        rows = await self.db.fetch(f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE app_id = $1 AND user_id = $2"
                                   " ORDER BY updated_at DESC LIMIT 50", app_id, user_id)
        return [Ticket.of(row) for row in rows]

    # --- notes ---------------------------------------------------------------------------------

    async def insert_note(self, note: NoteRow) -> None:
        """Keep a private note."""
        await self.db.execute(
            "INSERT INTO notes (id, app_id, conversation_id, agent_id, author_name, text, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", note.id, note.app_id, note.conversation_id, note.agent_id,
            note.author_name, note.text, note.created_at)

    async def delete_notes(self, conversation_id: str) -> None:
        """Forget a conversation's private notes."""
        await self.db.execute("DELETE FROM notes WHERE conversation_id = $1", conversation_id)

    async def notes(self, conversation_id: str) -> list[NoteRow]:
        """A conversation's private notes, oldest first."""
        rows = await self.db.fetch("SELECT id, app_id, conversation_id, agent_id, author_name, text, created_at"
                                   " FROM notes WHERE conversation_id = $1 ORDER BY created_at, id", conversation_id)
        return [NoteRow(id=row["id"], app_id=row["app_id"], conversation_id=row["conversation_id"],
                        agent_id=row["agent_id"], author_name=row["author_name"], text=row["text"],
                        created_at=float(row["created_at"])) for row in rows]

    # --- canned replies ------------------------------------------------------------------------

    async def canned_replies(self, app_id: str) -> list[dict[str, Any]]:
        """An app's canned replies, by shortcut."""
        rows = await self.db.fetch("SELECT id, shortcut, text, whatsapp_template, created_at FROM canned_replies"
                                   " WHERE app_id = $1 ORDER BY shortcut", app_id)
        return [{"id": row["id"], "shortcut": row["shortcut"], "text": row["text"],
                 "whatsappTemplate": json.loads(row["whatsapp_template"]) if row["whatsapp_template"] else None,
                 "createdAt": float(row["created_at"])} for row in rows]

    async def insert_canned_reply(self, app_id: str, reply_id: str, shortcut: str, text: str, at: float,
                                  whatsapp_template: dict[str, str] | None = None) -> bool:
        """Add a canned reply; False when the app already has that shortcut."""
        return await self.db.execute(
            "INSERT INTO canned_replies (id, app_id, shortcut, text, created_at, whatsapp_template)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (app_id, shortcut) DO NOTHING", reply_id, app_id, shortcut,
            text, at, json.dumps(whatsapp_template) if whatsapp_template else None) > 0

    async def delete_canned_reply(self, app_id: str, reply_id: str) -> bool:
        """Remove one of the app's canned replies; False when there is none."""
        return await self.db.execute("DELETE FROM canned_replies WHERE id = $1 AND app_id = $2", reply_id,
                                     app_id) > 0

    # --- timeline events -----------------------------------------------------------------------

    async def insert_timeline_event(self, event: dict[str, Any]) -> bool:
        """Keep a timeline event once (its id is the conversation event's)."""
        return await self.db.execute(
            "INSERT INTO timeline_events (id, app_id, conversation_id, kind, channel, text, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING", event["id"], event["appId"],
            event["conversationId"], event["kind"], event.get("channel"), event["text"], event["createdAt"]) > 0

    async def timeline_events(self, conversation_id: str) -> list[dict[str, Any]]:
        """A conversation's timeline events, oldest first."""
        rows = await self.db.fetch("SELECT id, app_id, conversation_id, kind, channel, text, created_at"
                                   " FROM timeline_events WHERE conversation_id = $1 ORDER BY created_at, id",
                                   conversation_id)
        return [{"id": row["id"], "appId": row["app_id"], "conversationId": row["conversation_id"],
                 "kind": row["kind"], "channel": row["channel"], "text": row["text"],
                 "createdAt": float(row["created_at"])} for row in rows]

    # --- app settings ------------------------------------------------------------------------------

    async def app_settings(self, app_id: str) -> tuple[str | None, str | None]:
        """An app's context panel: (URL, sealed secret), each None when unset."""
        row = await self.db.fetchrow("SELECT context_url, context_secret FROM app_settings WHERE app_id = $1", app_id)
        return (None, None) if row is None else (row["context_url"], row["context_secret"])

    async def set_app_settings(self, app_id: str, context_url: str | None, sealed_secret: str | None,
                               at: float) -> None:
        """Write an app's context panel settings."""
        await self.db.execute(
            "INSERT INTO app_settings (app_id, context_url, context_secret, updated_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (app_id) DO UPDATE SET context_url = excluded.context_url,"
            " context_secret = excluded.context_secret, updated_at = excluded.updated_at",
            app_id, context_url, sealed_secret, at)

    # --- single sign-on -------------------------------------------------------------------------

    async def sso_settings(self, app_id: str) -> tuple[str, str, str] | None:
        """An app's provider: (issuer, client id, sealed client secret), None when it has none."""
        row = await self.db.fetchrow("SELECT sso_issuer, sso_client_id, sso_client_secret FROM app_settings"
                                     " WHERE app_id = $1", app_id)
        if row is None or not row["sso_issuer"]:
            return None
        return row["sso_issuer"], row["sso_client_id"], row["sso_client_secret"]

    async def set_sso_settings(self, app_id: str, sso: tuple[str, str, str] | None, at: float) -> None:
        """Set (or clear, with None) an app's provider."""
        issuer, client_id, sealed = sso if sso is not None else (None, None, None)
        await self.db.execute(
            "INSERT INTO app_settings (app_id, sso_issuer, sso_client_id, sso_client_secret, updated_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (app_id) DO UPDATE SET sso_issuer = excluded.sso_issuer,"
            " sso_client_id = excluded.sso_client_id, sso_client_secret = excluded.sso_client_secret,"
            " updated_at = excluded.updated_at", app_id, issuer, client_id, sealed, at)

    async def put_sso_state(self, state_hash: str, app_id: str, nonce: str, verifier: str, at: float) -> None:
        """Keep a sign-in under way (and forget those older than ten minutes)."""
        await self.db.execute("DELETE FROM sso_states WHERE created_at < $1", at - 600)
        await self.db.execute("INSERT INTO sso_states (state_hash, app_id, nonce, verifier, created_at)"
                              " VALUES ($1, $2, $3, $4, $5)", state_hash, app_id, nonce, verifier, at)

    async def take_sso_state(self, state_hash: str, not_before: float) -> tuple[str, str, str] | None:
        """(app id, nonce, verifier) of a sign-in under way, once: it is deleted here, so a replayed
        callback finds nothing; None when unknown or older than `not_before`."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow("SELECT app_id, nonce, verifier, created_at FROM sso_states WHERE state_hash = $1",
                                    state_hash)
            if row is None or not await tx.execute("DELETE FROM sso_states WHERE state_hash = $1", state_hash):
                return None
        if float(row["created_at"]) < not_before:
            return None
        return row["app_id"], row["nonce"], row["verifier"]
